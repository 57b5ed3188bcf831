#!/usr/bin/env bash
# Prints a Python >= 3.11 that every user can execute (PostgreSQL's server user runs
# `gravl-dr wal-push`/`wal-fetch`): a system interpreter first, then whatever python3 is.
for py in /usr/bin/python3.13 /usr/bin/python3.12 /usr/bin/python3.11 /usr/bin/python3 "$(command -v python3)"; do
  [ -x "$py" ] || continue
  "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null || continue
  if [ "$(id -u)" -eq 0 ] && id postgres >/dev/null 2>&1; then
    runuser -u postgres -- "$py" -c 'pass' 2>/dev/null || continue
  fi
  echo "$py"
  exit 0
done
echo "gravl-dr: no Python >= 3.11 found that the postgres user can run (install python3.11)" >&2
exit 1
