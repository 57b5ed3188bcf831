#!/usr/bin/env python3
"""Check the Prefect UI as an operator sees it, in a real headless browser (Debian's chromium).

    python scripts/ui_check.py --ui http://127.0.0.1:4200 [--deployment backup/backup-nightly ...]
                               [--artifact backup-report-gravl]

For each deployment (default: every gravl-dr deployment on the server) it opens the custom-run
form and checks that every parameter is shown with its description; then it opens the newest
artifact with the given key (default: the newest backup-report-*) and checks that the markdown
report is rendered (a heading and a table, not raw markdown). Prints one line per check, exits 1
when one fails. The server must serve its UI (PREFECT_UI_ENABLED, the default for `prefect server
start`). tests/test_prefect_e2e.py runs it against its server.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from typing import Any

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def api_post(api: str, path: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(
        f"{api}{path}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def api_get(api: str, path: str) -> Any:
    with urllib.request.urlopen(f"{api}{path}", timeout=30) as resp:
        return json.loads(resp.read())


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("ui_check: error: chromium not found (apt-get install chromium)")


def render(url: str, budget_ms: int = 20000) -> str:
    """The DOM of ``url`` after its scripts ran, from a fresh profile."""
    with tempfile.TemporaryDirectory(prefix="gravl-ui-check-") as profile:
        proc = subprocess.run(
            [
                chromium(),
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--virtual-time-budget={budget_ms}",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=budget_ms / 1000 + 90,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"chromium exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def visible_text(dom: str) -> str:
    text = re.sub(r"(?s)<(script|style)\b.*?</\1>", " ", dom)
    text = re.sub(r"<[^>]+>", " ", text)
    return " ".join(html.unescape(text).split())


def words(text: str) -> str:
    return " ".join(text.split())


def check_form(ui: str, api: str, deployment: dict[str, Any], attempts: int = 3) -> list[str]:
    """Problems with one deployment's run form (empty when every parameter and its help shows).

    A busy machine may stop the page's scripts before they drew the form: look up to
    ``attempts`` times before calling a problem a problem."""
    problems: list[str] = []
    for _ in range(attempts):
        problems = _form_problems(ui, deployment)
        if not problems:
            break
    return problems


def _form_problems(ui: str, deployment: dict[str, Any]) -> list[str]:
    dom = render(f"{ui}/deployments/deployment/{deployment['id']}/run")
    text = visible_text(dom)
    props = (deployment.get("parameter_openapi_schema") or {}).get("properties") or {}
    problems = []
    for name, prop in props.items():
        description = words(str(prop.get("description") or ""))
        if not description:
            problems.append(f"{name}: no description in the schema")
            continue
        if name not in text and str(prop.get("title") or name) not in text:
            problems.append(f"{name}: not shown")
        # the UI may render the description as markdown: compare its first words
        probe = " ".join(re.sub(r"[`*]", "", description).split()[:6])
        if probe not in text:
            problems.append(f"{name}: description not shown ({probe!r})")
    if "Property is type None" in text:
        problems.append("a field shows 'Property is type None'")
    return problems


def check_artifact(ui: str, artifact: dict[str, Any], attempts: int = 3) -> list[str]:
    problems: list[str] = []
    for _ in range(attempts):
        problems = _artifact_problems(ui, artifact)
        if not problems:
            break
    return problems


def _artifact_problems(ui: str, artifact: dict[str, Any]) -> list[str]:
    dom = render(f"{ui}/artifacts/artifact/{artifact['id']}")
    first = next((ln for ln in str(artifact.get("data") or "").splitlines() if ln.startswith("# ")), "")
    heading = first.removeprefix("# ").strip()
    problems = []
    if not re.search(r"<h1\b", dom):
        problems.append("no rendered heading")
    if heading and heading not in visible_text(dom):
        problems.append(f"heading {heading!r} not shown")
    if not re.search(r"<table\b", dom):
        problems.append("no rendered table")
    if "|---|" in dom:
        problems.append("raw markdown table shown")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--ui", default="http://127.0.0.1:4200", help="the Prefect UI's base URL")
    parser.add_argument("--api", help="the API URL (default: UI + /api)")
    parser.add_argument(
        "--deployment",
        action="append",
        metavar="FLOW/NAME",
        help="check this deployment's form (repeatable; default: all tagged gravl-dr)",
    )
    parser.add_argument(
        "--artifact",
        metavar="KEY",
        help="check the newest artifact with this key (default: the newest backup-report-*)",
    )
    args = parser.parse_args(argv)
    ui = args.ui.rstrip("/")
    api = (args.api or f"{ui}/api").rstrip("/")
    failed = 0
    if args.deployment:
        deployments = [api_get(api, f"/deployments/name/{name}") for name in args.deployment]
    else:
        deployments = [
            d
            for d in api_post(api, "/deployments/filter", {"limit": 200})
            if "gravl-dr" in (d.get("tags") or [])
        ]
    if not deployments:
        print("ui_check: FAILED no gravl-dr deployments on this server")
        return 1
    for dep in deployments:
        problems = check_form(ui, api, dep)
        n = len((dep.get("parameter_openapi_schema") or {}).get("properties") or {})
        print(
            f"form {dep['name']}: {'OK' if not problems else 'FAILED'} ({n} parameter(s))"
            + "".join(f"\n  {p}" for p in problems)
        )
        failed += bool(problems)
    arts = api_post(api, "/artifacts/filter", {"sort": "CREATED_DESC", "limit": 200})
    wanted = [
        a
        for a in arts
        if a.get("key")
        and (a["key"] == args.artifact if args.artifact else a["key"].startswith("backup-report-"))
    ]
    if not wanted:
        print(f"artifact {args.artifact or 'backup-report-*'}: FAILED none on this server")
        return 1
    problems = check_artifact(ui, wanted[0])
    print(
        f"artifact {wanted[0]['key']}: {'OK' if not problems else 'FAILED'}"
        + "".join(f"\n  {p}" for p in problems)
    )
    failed += bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
