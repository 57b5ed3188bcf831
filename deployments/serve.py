"""Orchestration: serve prefect.yaml's deployments from this process, `prefect serve`-style.

For a host without a work pool and worker: ``python deployments/serve.py [--only NAME ...]``.
Names, entry points, parameters, schedules and concurrency limits are read from prefect.yaml, so
the served deployments cannot drift from the deployed ones. Flow runs execute in child processes
of this one and inherit its environment: point ``GRAVL_DR_CONFIG`` at the config (else
``./gravl-dr.yaml`` in the repository root is used). prefect.yaml's work-pool section (pull
steps, job variables) applies to workers only.

Serving never touches deployments a worker runs: ``prefect serve`` would overwrite a deployment
of the same name (dropping its pull step and job variables) and pause it when it stops, so this
script refuses to start, naming them, when any of its deployments exists on a work pool.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment
    from prefect.schedules import Schedule

REPO_ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = REPO_ROOT / "prefect.yaml"


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment of prefect.yaml, as much of it as serving needs."""

    name: str
    entrypoint: str
    parameters: dict[str, Any] = field(default_factory=dict)
    schedules: list[dict[str, Any]] = field(default_factory=list)
    description: str | None = None
    tags: list[str] = field(default_factory=list)
    concurrency_limit: int | None = None
    work_pool: str | None = None


def read_specs(path: Path = PREFECT_YAML) -> list[DeploymentSpec]:
    """The deployments of a prefect.yaml; a malformed entry raises ValueError naming it."""
    doc = yaml.safe_load(path.read_text())
    if not isinstance(doc, dict) or not isinstance(doc.get("deployments"), list):
        raise ValueError(f"{path}: no 'deployments' list")
    specs = []
    for i, dep in enumerate(doc["deployments"]):
        if not isinstance(dep, dict) or not dep.get("name") or not dep.get("entrypoint"):
            raise ValueError(f"{path}: deployment #{i} needs a name and an entrypoint")
        limit = dep.get("concurrency_limit")
        if isinstance(limit, dict):
            limit = limit.get("limit")
        specs.append(
            DeploymentSpec(
                name=str(dep["name"]),
                entrypoint=str(dep["entrypoint"]),
                parameters=dict(dep.get("parameters") or {}),
                schedules=list(dep.get("schedules") or []),
                description=dep.get("description"),
                tags=list(dep.get("tags") or []),
                concurrency_limit=int(limit) if limit is not None else None,
                work_pool=(dep.get("work_pool") or {}).get("name"),
            )
        )
    return specs


def to_schedule(item: dict[str, Any]) -> Schedule:
    """A prefect.yaml schedule entry (cron, interval or rrule, with timezone) as a Prefect Schedule."""
    from prefect.schedules import Cron, Interval, RRule

    active = bool(item.get("active", True))
    params = dict(item.get("parameters") or {})
    tz = item.get("timezone")
    if "cron" in item:
        return Cron(
            str(item["cron"]),
            timezone=tz,
            day_or=bool(item.get("day_or", True)),
            active=active,
            parameters=params,
        )
    if "interval" in item:
        return Interval(
            timedelta(seconds=float(item["interval"])), timezone=tz, active=active, parameters=params
        )
    if "rrule" in item:
        return RRule(str(item["rrule"]), timezone=tz, active=active, parameters=params)
    raise ValueError(f"schedule {item!r}: needs cron, interval or rrule")


def build_deployments(specs: Sequence[DeploymentSpec]) -> list[RunnerDeployment]:
    """Load each flow with Prefect's own entry-point loader and make its runner deployment.

    Entry points are relative to the repository root, like ``prefect deploy`` resolves them:
    call this with the repository root as the working directory.
    """
    from prefect.flows import Flow, load_flow_from_entrypoint

    deployments: list[RunnerDeployment] = []
    for spec in specs:
        flow: Flow[..., Any] = load_flow_from_entrypoint(spec.entrypoint)
        deployments.append(
            flow.to_deployment(  # type: ignore[arg-type]  # sync dispatch
                name=spec.name,
                schedules=[to_schedule(s) for s in spec.schedules],
                parameters=spec.parameters,
                description=spec.description,
                tags=spec.tags,
                concurrency_limit=spec.concurrency_limit,
            )
        )
    return deployments


def deployed_on_work_pools(deployments: Sequence[RunnerDeployment]) -> list[str]:
    """Those of ``deployments`` that the Prefect API already holds on a work pool, as text."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    found = []
    with get_client(sync_client=True) as client:
        for d in deployments:
            try:
                existing = client.read_deployment_by_name(f"{d.flow_name}/{d.name}")
            except ObjectNotFound:
                continue
            if existing.work_pool_name:
                found.append(f"{d.flow_name}/{d.name} (work pool {existing.work_pool_name})")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="serve only these deployments")
    parser.add_argument("--list", action="store_true", help="print the deployments and exit")
    parser.add_argument("--file", type=Path, default=PREFECT_YAML, help="the prefect.yaml to read")
    args = parser.parse_args(argv)
    specs = read_specs(args.file)
    if args.only:
        unknown = sorted(set(args.only) - {s.name for s in specs})
        if unknown:
            parser.error(f"no such deployment in {args.file}: {', '.join(unknown)}")
        specs = [s for s in specs if s.name in args.only]
    if args.list:
        for s in specs:
            when = ", ".join(str(x.get("cron") or x.get("interval") or x.get("rrule")) for x in s.schedules)
            print(f"{s.name:24} {s.entrypoint:36} {when or 'manual'}")
        return 0
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks,flows")
    os.chdir(args.file.resolve().parent)
    from prefect import serve

    deployments = build_deployments(specs)
    clash = deployed_on_work_pools(deployments)
    if clash:
        sys.stderr.write(
            f"serve.py: error: refusing to serve {len(clash)} deployment(s) a worker already runs: "
            f"{', '.join(clash)}. Serving would replace them (pull step, job variables) and pause "
            "them on exit. Run a worker for them instead, or serve others with --only NAME.\n"
        )
        return 2
    serve(*deployments)
    return 0


if __name__ == "__main__":
    sys.exit(main())
