"""Reconnect hooks: real commands, a real local HTTP endpoint, and the Kubernetes client against a
minimal API server on loopback (no Kubernetes cluster can run here; the fake stands at the HTTP
boundary, the client library and our code are real)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tasks.config import KubernetesHook, ReconnectHook
from tasks.hooks import ReconnectEvent, run_hook, run_hooks

EVENT = ReconnectEvent(
    cluster="gravl",
    event="failover",
    new_primary="standby-1",
    old_primary="home",
    host="127.0.0.2",
    dns_record="db.gravl.internal.",
)


def test_command_hook_gets_the_event_in_its_environment(tmp_path: Path) -> None:
    out = tmp_path / "env.txt"
    hook = ReconnectHook(
        command=["sh", "-c", f'echo "$GRAVL_DR_EVENT $GRAVL_DR_NEW_PRIMARY $GRAVL_DR_NEW_HOST" > {out}']
    )
    res = run_hook(hook, EVENT)
    assert res.ok and res.kind == "command"
    assert out.read_text().strip() == "failover standby-1 127.0.0.2"


def test_failing_command_is_reported_with_its_stderr() -> None:
    res = run_hook(ReconnectHook(command=["sh", "-c", "echo 'no such unit' >&2; exit 5"]), EVENT)
    assert not res.ok and "exited 5" in res.message and "no such unit" in res.message


def test_command_timeout_is_enforced() -> None:
    res = run_hook(ReconnectHook(command=["sleep", "5"], timeout=0.3), EVENT)
    assert not res.ok and "timed out" in res.message and res.seconds < 3


def test_every_hook_runs_even_after_a_failure(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    results = run_hooks(
        [ReconnectHook(command=["false"]), ReconnectHook(command=["touch", str(marker)])], EVENT
    )
    assert [r.ok for r in results] == [False, True] and marker.exists()


def test_a_hook_needs_exactly_one_kind() -> None:
    from tasks.config import parse_config
    from tasks.errors import ConfigError

    with pytest.raises(ConfigError, match="exactly one of command, webhook, kubernetes"):
        parse_config(
            {
                "primary": {"dsn": "host=x"},
                "repository": {"url": "file:///tmp/x"},
                "reconnect": [{"command": ["true"], "webhook": "http://x"}],
            }
        )


class _Recorder(BaseHTTPRequestHandler):
    """A tiny HTTP server: a webhook receiver and a Kubernetes apps/v1 Deployments API."""

    calls: list[tuple[str, str, Any]]
    deployments: dict[str, dict[str, Any]]
    status_code = 200

    def log_message(self, *args: Any) -> None:
        pass

    def _reply(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"null")

    def _deployment(self) -> tuple[str, dict[str, Any] | None]:
        parts = self.path.split("?")[0].strip("/").split("/")
        # apis/apps/v1/namespaces/{ns}/deployments/{name}[/status]
        name = f"{parts[4]}/{parts[6]}" if len(parts) >= 7 else ""
        return name, self.deployments.get(name)

    def do_POST(self) -> None:
        self.calls.append(("POST", self.path, self._body()))
        self._reply(self.status_code, {"ok": self.status_code < 300})

    def do_PATCH(self) -> None:
        body = self._body()
        self.calls.append(("PATCH", self.path, body))
        name, dep = self._deployment()
        if dep is None:
            self._reply(404, {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404})
            return
        dep["metadata"]["generation"] += 1
        dep["spec"]["template"] = body["spec"]["template"]
        # the "controller": the rollout completes at once
        dep["status"] = {
            "observedGeneration": dep["metadata"]["generation"],
            "replicas": 2,
            "updatedReplicas": 2,
            "availableReplicas": 2,
            "readyReplicas": 2,
        }
        self._reply(200, dep)

    def do_GET(self) -> None:
        name, dep = self._deployment()
        if dep is None:
            self._reply(404, {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404})
            return
        self._reply(200, dep)


@pytest.fixture
def http_server() -> Iterator[tuple[str, type[_Recorder]]]:
    handler = type("Handler", (_Recorder,), {"calls": [], "deployments": {}, "status_code": 200})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def test_webhook_posts_the_event_as_json(http_server: tuple[str, type[_Recorder]]) -> None:
    url, handler = http_server
    res = run_hook(ReconnectHook(webhook=f"{url}/hooks/db-moved?token=s3cret"), EVENT)
    assert res.ok and res.message == "HTTP 200"
    method, path, body = handler.calls[0]
    assert method == "POST" and path.startswith("/hooks/db-moved")
    assert body["new_primary"] == "standby-1" and body["host"] == "127.0.0.2" and body["event"] == "failover"
    assert "s3cret" not in res.target  # the query string may carry a token: never reported


def test_webhook_error_status_fails_the_hook(http_server: tuple[str, type[_Recorder]]) -> None:
    url, handler = http_server
    handler.status_code = 503
    res = run_hook(ReconnectHook(webhook=f"{url}/hooks"), EVENT)
    assert not res.ok and "HTTP 503" in res.message


def test_unreachable_webhook_fails_within_its_timeout() -> None:
    from tasks.pgcluster import free_port

    res = run_hook(ReconnectHook(webhook=f"http://127.0.0.1:{free_port()}/x", timeout=2), EVENT)
    assert not res.ok and "unreachable" in res.message


def _kubeconfig(tmp_path: Path, server: str) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "test",
                "clusters": [{"name": "test", "cluster": {"server": server}}],
                "users": [{"name": "test", "user": {"token": "test-token"}}],
                "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
            }
        )
    )
    return str(path)


def _deployment(ns: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns, "generation": 1},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": []}},
        },
        "status": {"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2},
    }


def test_kubernetes_rollout_restart_bumps_the_template_and_waits(
    http_server: tuple[str, type[_Recorder]],
    tmp_path: Path,
) -> None:
    url, handler = http_server
    for name in ("gravl-api", "gravl-worker"):
        handler.deployments[f"gravl-prod/{name}"] = _deployment("gravl-prod", name)
    hook = ReconnectHook(
        kubernetes=KubernetesHook(
            namespace="gravl-prod",
            deployments=["gravl-api", "gravl-worker"],
            kubeconfig=_kubeconfig(tmp_path, url),
        ),
        timeout=20,
    )
    res = run_hook(hook, EVENT)
    assert res.ok, res.message
    assert "rollout finished" in res.message
    patches = [c for c in handler.calls if c[0] == "PATCH"]
    assert [p[1].split("?")[0] for p in patches] == [
        "/apis/apps/v1/namespaces/gravl-prod/deployments/gravl-api",
        "/apis/apps/v1/namespaces/gravl-prod/deployments/gravl-worker",
    ]
    annotations = patches[0][2]["spec"]["template"]["metadata"]["annotations"]
    assert "kubectl.kubernetes.io/restartedAt" in annotations


def test_kubernetes_rollout_that_never_finishes_fails_the_hook_naming_what_is_pending(
    http_server: tuple[str, type[_Recorder]],
    tmp_path: Path,
) -> None:
    # GIVEN a deployment that wants 3 replicas while its controller only ever brings up 2
    url, handler = http_server
    dep = _deployment("gravl-prod", "gravl-api")
    dep["spec"]["replicas"] = 3
    handler.deployments["gravl-prod/gravl-api"] = dep
    hook = ReconnectHook(
        kubernetes=KubernetesHook(
            namespace="gravl-prod", deployments=["gravl-api"], kubeconfig=_kubeconfig(tmp_path, url)
        ),
        timeout=1,
    )
    # WHEN the hook runs THEN it gives up at its timeout, naming the deployment still rolling out
    res = run_hook(hook, EVENT)
    assert not res.ok
    assert "rollout of gravl-api in gravl-prod not finished after 1s" in res.message, res.message


def test_kubernetes_missing_deployment_fails_the_hook(
    http_server: tuple[str, type[_Recorder]],
    tmp_path: Path,
) -> None:
    url, _ = http_server
    hook = ReconnectHook(
        kubernetes=KubernetesHook(
            namespace="gravl-prod", deployments=["nope"], kubeconfig=_kubeconfig(tmp_path, url)
        ),
        timeout=10,
    )
    res = run_hook(hook, EVENT)
    assert not res.ok and "gravl-prod/nope" in res.message and "404" in res.message
