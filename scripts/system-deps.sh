#!/usr/bin/env bash
# Installs the system programs gravl-dr and its tests use (Debian packages) when run as root;
# otherwise names what is missing in one line and fails.
set -euo pipefail
need=()
have() { command -v "$1" >/dev/null 2>&1 || [ -x "$1" ]; }
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || need+=(postgresql-15)
have zstd || need+=(zstd)
have tar || need+=(tar)
if [ "${1:-}" = "test" ]; then
  have promtool || need+=(prometheus)
  have prometheus-pushgateway || need+=(prometheus-pushgateway)
  have named || need+=(bind9)
  have nsupdate || need+=(bind9-dnsutils)
  have pgbackrest || need+=(pgbackrest)
  have chromium || need+=(chromium)   # scripts/ui_check.py: the Prefect UI in a headless browser
  have strace || need+=(strace)       # tests: the order of a restore's syncfs and pg_control rename
fi
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "gravl-dr: missing system packages: ${need[*]} (install them with: sudo apt-get install ${need[*]})" >&2
  exit 1
fi
echo "installing system packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian starts services on install where it can; gravl-dr starts its own on loopback.
for svc in prometheus prometheus-pushgateway named bind9 postgresql; do
  (command -v systemctl >/dev/null && systemctl stop "$svc" >/dev/null 2>&1) || true
  (command -v service >/dev/null && service "$svc" stop >/dev/null 2>&1) || true
done
