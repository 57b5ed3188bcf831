"""Entry point: ``gravl-dr guard`` — run on a database host before PostgreSQL starts there.

systemd ``ExecStartPre=/usr/bin/gravl-dr guard --node home`` or a Kubernetes init container:
it reads the cluster's role history from the repository and, when this node was demoted by a
failover and not made primary again since, keeps it in standby mode (standby.signal and
primary_conninfo to the current primary) or, with ``--refuse``, fails so that it does not start.
It never imports Prefect: it must answer in well under a second.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.errors import ConfigError, DRError, PreconditionFailed, one_line

if TYPE_CHECKING:
    from tasks.config import Node

GUARD_REFUSED_EXIT_CODE = 4


class GuardRefused(PreconditionFailed):
    exit_code = GUARD_REFUSED_EXIT_CODE


def register(sub: Any) -> None:
    p = sub.add_parser(
        "guard",
        help="before PostgreSQL starts: keep a demoted node in standby mode "
        "(systemd ExecStartPre, Kubernetes init container)",
    )
    p.add_argument("--node", required=True, help="this host's node name in the config")
    p.add_argument("--pgdata", help="its data directory (default: the node's pgdata in the config)")
    p.add_argument(
        "--refuse",
        action="store_true",
        help=f"exit {GUARD_REFUSED_EXIT_CODE} instead of configuring standby mode when it was demoted",
    )
    p.add_argument(
        "--on-unknown",
        choices=("refuse", "allow"),
        default="refuse",
        help="when the role history cannot be read: refuse to start (default) or allow it",
    )
    p.set_defaults(func=cmd_guard)


def cmd_guard(args: argparse.Namespace) -> int:
    from tasks.config import load_config
    from tasks.repository import open_repository
    from tasks.roles import demotion_of, primary_by_history, role_history
    from tasks.topology import configure_standby

    cfg = load_config(args.config)
    nodes = {n.name: n for n in [cfg.primary, *cfg.replicas]}
    node, pgdata = _this_node(nodes, args.node, args.pgdata)
    if (pgdata / "standby.signal").exists():
        print(f"guard: {node.name} starts as a standby (standby.signal present)")
        return 0
    try:
        history = role_history(open_repository(cfg.repository))
    except DRError as exc:
        if args.on_unknown == "allow":
            sys.stderr.write(
                f"gravl-dr: WARNING: role history unreadable ({one_line(exc)}); "
                f"{node.name} allowed to start (--on-unknown allow)\n"
            )
            return 0
        raise GuardRefused(
            f"cannot read the role history ({one_line(exc)}): not letting {node.name} start "
            "as a primary (--on-unknown allow to override)"
        ) from None
    demoted = demotion_of(history, node.name)
    current = primary_by_history(history, cfg.primary.name)
    if demoted is None:
        print(
            f"guard: {node.name} may start"
            + (" as the primary" if current == node.name else "")
            + f" (role history: primary {current})"
        )
        return 0
    what = (
        f"{node.name} was demoted by the {demoted.event} of {demoted.at:%Y-%m-%d %H:%M:%S} UTC "
        f"(primary now {current}, timeline {demoted.timeline or '?'})"
    )
    if args.refuse:
        raise GuardRefused(f"{what}: refusing to start it; run `gravl-dr failback` to rebuild it")
    upstream = nodes.get(current)
    if upstream is None:
        (pgdata / "standby.signal").touch()
        print(
            f"guard: {what}; standby.signal written (the config does not name {current}: no primary_conninfo)"
        )
        return 0
    configure_standby(pgdata, upstream, node.name, os_user=_owner(pgdata))
    print(f"guard: {what}; it starts as a standby of {current} (standby.signal, primary_conninfo)")
    return 0


def _this_node(nodes: dict[str, Node], name: str, pgdata_option: str | None) -> tuple[Node, Path]:
    """The node named by --node and its data directory (--pgdata, else the config's)."""
    node = nodes.get(name)
    if node is None:
        raise ConfigError(f"--node {name}: no such node in the config ({', '.join(nodes)})")
    pgdata_text = pgdata_option or node.pgdata
    if not pgdata_text:
        raise ConfigError(f"--pgdata: the config gives no pgdata for {node.name}")
    pgdata = Path(pgdata_text)
    if not (pgdata / "PG_VERSION").is_file():
        raise PreconditionFailed(f"{pgdata} is not a PostgreSQL data directory")
    return node, pgdata


def _owner(path: Path) -> str:
    import pwd

    return pwd.getpwuid(path.stat().st_uid).pw_name
