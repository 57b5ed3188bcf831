"""Adapter: application reconnect hooks run after a promotion — a command, a webhook, a Kubernetes rollout restart.

Each hook has a timeout and reports its own outcome; a failing hook never raises here, so every
hook runs and the flow decides (it fails after the database steps are done, never undoing them).
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from tasks.config import KubernetesHook, ReconnectHook
from tasks.errors import DRError, PermanentError, one_line
from tasks.polling import Progress, poll_until
from tasks.proc import run

log = logging.getLogger(__name__)


class ReconnectEvent(BaseModel):
    """What moved, as told to every hook (env vars for commands, JSON body for webhooks)."""

    model_config = ConfigDict(frozen=True)

    cluster: str
    event: str  # failover | failback
    new_primary: str
    old_primary: str
    host: str  # the new primary's DNS value / host
    dns_record: str | None = None


class HookResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: str
    target: str
    ok: bool
    seconds: float
    message: str


def describe_hook(hook: ReconnectHook) -> tuple[str, str]:
    if hook.command:
        return "command", " ".join(hook.command)
    if hook.webhook:
        return "webhook", _redact_url(hook.webhook)
    assert hook.kubernetes is not None
    return "kubernetes", f"{hook.kubernetes.namespace}/{','.join(hook.kubernetes.deployments)}"


def _redact_url(url: str) -> str:
    """Webhook URLs may carry a token in the query string: keep scheme, host and path only."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def run_hook(hook: ReconnectHook, event: ReconnectEvent) -> HookResult:
    kind, target = describe_hook(hook)
    t0 = time.monotonic()
    try:
        if hook.command:
            message = _run_command(hook.command, event, hook.timeout)
        elif hook.webhook:
            message = _call_webhook(hook.webhook, event, hook.timeout)
        else:
            assert hook.kubernetes is not None
            message = rollout_restart(hook.kubernetes, hook.timeout)
        ok = True
    except DRError as exc:
        ok, message = False, one_line(exc)
    except Exception as exc:  # noqa: BLE001 - a hook's failure is reported, not raised
        ok, message = False, f"{type(exc).__name__}: {one_line(exc)}"
    seconds = time.monotonic() - t0
    (log.info if ok else log.error)(
        "reconnect hook %s %s: %s (%.1fs)", kind, target, message if ok else f"FAILED: {message}", seconds
    )
    return HookResult(kind=kind, target=target, ok=ok, seconds=seconds, message=message)


def run_hooks(hooks: Sequence[ReconnectHook], event: ReconnectEvent) -> list[HookResult]:
    return [run_hook(h, event) for h in hooks]


def _run_command(argv: list[str], event: ReconnectEvent, timeout: float) -> str:
    env = {
        "GRAVL_DR_EVENT": event.event,
        "GRAVL_DR_CLUSTER": event.cluster,
        "GRAVL_DR_NEW_PRIMARY": event.new_primary,
        "GRAVL_DR_OLD_PRIMARY": event.old_primary,
        "GRAVL_DR_NEW_HOST": event.host,
        "GRAVL_DR_DNS_RECORD": event.dns_record or "",
    }
    proc = run(argv, timeout=timeout, env=env)
    out = proc.stdout.strip().splitlines()
    return f"exited 0{': ' + out[-1][:200] if out else ''}"


class HookFailed(PermanentError):
    """A reconnect hook failed; the flow reports it and the operator re-runs it (no blind retry)."""


def _call_webhook(url: str, event: ReconnectEvent, timeout: float) -> str:
    body = json.dumps({**event.model_dump(), "at": datetime.now(UTC).isoformat()}).encode()
    req = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json", "User-Agent": "gravl-dr"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        raise HookFailed(f"webhook {_redact_url(url)} answered HTTP {exc.code}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise HookFailed(f"webhook {_redact_url(url)} unreachable: {reason}") from None


def _k8s_apps_api(spec: KubernetesHook) -> Any:
    from kubernetes import client, config

    if spec.kubeconfig or not os.environ.get("KUBERNETES_SERVICE_HOST"):
        api_client = config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=spec.kubeconfig, context=spec.context
        )
    else:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
        api_client = client.ApiClient()
    return client.AppsV1Api(api_client)


def rollout_restart(spec: KubernetesHook, timeout: float) -> str:
    """What `kubectl rollout restart` does — bump a pod-template annotation — then wait for the rollout."""
    api = _k8s_apps_api(spec)
    deadline = time.monotonic() + timeout
    patched = _restart_deployments(api, spec, deadline)
    if not spec.wait:
        return f"restarted {len(patched)} deployment(s) in {spec.namespace}"
    _wait_for_rollout(api, spec, patched, deadline, timeout)
    return f"restarted {len(patched)} deployment(s) in {spec.namespace}; rollout finished"


def _restart_deployments(api: Any, spec: KubernetesHook, deadline: float) -> dict[str, int]:
    """Bump each deployment's restartedAt annotation; deployment name -> the generation it got."""
    from kubernetes.client.exceptions import ApiException

    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = {"spec": {"template": {"metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": stamp}}}}}
    patched: dict[str, int] = {}
    for name in spec.deployments:
        try:
            dep = api.patch_namespaced_deployment(
                name, spec.namespace, body, _request_timeout=max(1.0, deadline - time.monotonic())
            )
        except ApiException as exc:
            raise HookFailed(
                f"kubernetes: cannot restart deployment {spec.namespace}/{name}: "
                f"HTTP {exc.status} {exc.reason}"
            ) from None
        except Exception as exc:  # noqa: BLE001 - urllib3 connection errors, whatever their class
            raise HookFailed(
                f"kubernetes API unreachable restarting {spec.namespace}/{name}: {type(exc).__name__}"
            ) from None
        patched[name] = int(dep.metadata.generation or 0)
    return patched


def rollout_done(status: Any, spec_replicas: int | None, generation: int) -> bool:
    """Whether a deployment finished rolling out ``generation``: the controller saw it and every
    replica is updated and available, none left over (kubectl rollout status's condition,
    deployment_util.go). ``status`` is a V1DeploymentStatus (or anything with its fields)."""
    want = spec_replicas if spec_replicas is not None else 1
    return (
        (status.observed_generation or 0) >= generation
        and (status.updated_replicas or 0) >= want
        and (status.available_replicas or 0) >= want
        and (status.replicas or 0) <= want
    )


def _wait_for_rollout(
    api: Any, spec: KubernetesHook, patched: dict[str, int], deadline: float, timeout: float
) -> None:
    from kubernetes.client.exceptions import ApiException

    pending = dict(patched)
    progress = Progress(f"the rollout of {', '.join(sorted(patched))} in {spec.namespace}", timeout, log)

    def all_rolled_out() -> bool:
        for name, generation in list(pending.items()):
            try:
                dep = api.read_namespaced_deployment_status(
                    name, spec.namespace, _request_timeout=max(1.0, deadline - time.monotonic())
                )
            except ApiException as exc:
                raise HookFailed(
                    f"kubernetes: cannot read {spec.namespace}/{name}: HTTP {exc.status}"
                ) from None
            if rollout_done(dep.status, dep.spec.replicas, generation):
                del pending[name]
        if pending:
            progress.tick(
                f"{len(patched) - len(pending)} of {len(patched)} rolled out, waiting for "
                f"{', '.join(sorted(pending))}"
            )
        return not pending

    if not poll_until(
        all_rolled_out,
        timeout=deadline - time.monotonic(),
        interval=lambda waited: 0.5 if waited < 10 else 2.0,
    ):
        raise HookFailed(
            f"kubernetes: rollout of {', '.join(sorted(pending))} in {spec.namespace} "
            f"not finished after {timeout:.0f}s"
        )
