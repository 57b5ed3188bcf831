"""Test helper: a fault-injecting HTTP proxy on loopback in front of the moto S3 server.

Point a repository's ``endpoint_url`` at ``proxy.url`` instead of moto's; every request is
forwarded unchanged (moto does not check signatures, so the Host header may name the proxy)
unless a rule matches it. Rules are tried in the order they were added; the first one that
matches and still has shots left fires once (``times`` shots, ``None`` = forever).

Actions (``action=``):

- ``"error"``       answer ``status`` with an S3 XML error ``code`` without forwarding
                    (503 SlowDown, 500 InternalError, 404 NoSuchKey...).
- ``"drop"``        close the connection without forwarding and without an answer.
- ``"lost_reply"``  forward the request (moto applies it), then close the connection without
                    answering: the client sees a reset, the server state has changed.
- ``"delay"``       sleep ``delay`` seconds, then forward (a slow lock write, a slow part).
- ``"after_error"`` forward, then answer ``status``/``code`` instead of moto's reply
                    (a reply replaced by a 500 after the write happened).
- ``"corrupt"``     forward, then flip one byte in the middle of moto's reply body (an object
                    damaged at rest or on the way: status and headers say all is well).

Matching: ``method`` ("GET", "PUT", "HEAD", "DELETE", "POST" or "*"), ``key`` a regex searched in
the object key (the path after ``/<bucket>/``, URL-decoded), ``query`` a substring of the raw
query string (``"uploadId"``, ``"uploads"``, ``"partNumber=3"``).

HEAD-ok-then-GET-404 (an object listed, then gone)::

    proxy.add("GET", r"wal/.*000000010000000000000003", action="error", status=404, code="NoSuchKey")

Lost reply to the manifest PUT::

    proxy.add("PUT", r"manifest\\.json$", action="lost_reply")

Every request seen is appended to ``proxy.log`` as ``(method, key, query, outcome)`` where outcome
is the status forwarded/answered or the action name; ``proxy.fired(rule)`` counts shots.

Fixture ``s3_fault_proxy`` (registered through ``pytest_plugins`` in conftest) gives one proxy per
test in front of the session moto server; rules are cleared between tests.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import pytest

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


@dataclass
class Rule:
    method: str
    key: str
    action: str
    times: int | None = 1
    query: str | None = None
    status: int = 503
    code: str = "SlowDown"
    delay: float = 0.0
    shots: int = 0
    _re: re.Pattern[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.action not in ("error", "drop", "lost_reply", "delay", "after_error", "corrupt"):
            raise ValueError(f"unknown action {self.action!r}")
        self._re = re.compile(self.key)

    def matches(self, method: str, key: str, query: str) -> bool:
        if self.times is not None and self.shots >= self.times:
            return False
        if self.method != "*" and self.method != method:
            return False
        if self.query is not None and self.query not in query:
            return False
        return bool(self._re.search(key))


def _error_body(code: str, key: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>injected by s3fault</Message>"
        f"<Key>{key}</Key><RequestId>s3fault</RequestId></Error>"
    ).encode()


class S3FaultProxy:
    """A loopback HTTP proxy to ``upstream`` (``http://127.0.0.1:PORT``) that injects faults."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.rules: list[Rule] = []
        self.log: list[tuple[str, str, str, str]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _handle(self) -> None:
                proxy._serve(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="s3fault")
        self._thread.start()

    # ------------------------------------------------------------ API

    def add(
        self,
        method: str = "*",
        key: str = "",
        *,
        action: str,
        times: int | None = 1,
        query: str | None = None,
        status: int = 503,
        code: str = "SlowDown",
        delay: float = 0.0,
    ) -> Rule:
        """Add a rule; see the module docstring. Returns it (``rule.shots`` counts firings)."""
        rule = Rule(
            method=method.upper(),
            key=key,
            action=action,
            times=times,
            query=query,
            status=status,
            code=code,
            delay=delay,
        )
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self.log.clear()

    def fired(self, rule: Rule) -> int:
        return rule.shots

    def requests(self, method: str | None = None, key: str = "") -> list[tuple[str, str, str, str]]:
        """Logged requests, optionally filtered by method and a key regex."""
        pat = re.compile(key)
        with self._lock:
            return [r for r in self.log if (method is None or r[0] == method.upper()) and pat.search(r[1])]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------ internals

    def _pick(self, method: str, key: str, query: str) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.matches(method, key, query):
                    rule.shots += 1
                    return rule
        return None

    def _record(self, method: str, key: str, query: str, outcome: str) -> None:
        with self._lock:
            self.log.append((method, key, query, outcome))

    @staticmethod
    def _read_body(h: BaseHTTPRequestHandler) -> bytes:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += h.rfile.read(size)
                h.rfile.readline()
        length = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(length) if length else b""

    @staticmethod
    def _hang_up(h: BaseHTTPRequestHandler) -> None:
        h.close_connection = True
        with contextlib.suppress(OSError):
            h.connection.shutdown(socket.SHUT_RDWR)

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        method = h.command
        raw_path, _, query = h.path.partition("?")
        path = unquote(raw_path).lstrip("/")
        key = path.split("/", 1)[1] if "/" in path else ""
        body = self._read_body(h)
        rule = self._pick(method, key, query)
        action = rule.action if rule else "forward"
        if rule is not None and rule.action == "error":
            self._record(method, key, query, f"error {rule.status}")
            self._answer(
                h,
                rule.status,
                [("Content-Type", "application/xml")],
                b"" if method == "HEAD" else _error_body(rule.code, key),
            )
            return
        if rule is not None and rule.action == "drop":
            self._record(method, key, query, "drop")
            self._hang_up(h)
            return
        if rule is not None and rule.action == "delay":
            time.sleep(rule.delay)
        status, headers, payload = self._forward(method, h.path, h.headers.items(), body)
        if rule is not None and rule.action == "lost_reply":
            self._record(method, key, query, f"lost_reply (upstream {status})")
            self._hang_up(h)
            return
        if rule is not None and rule.action == "after_error":
            self._record(method, key, query, f"after_error {rule.status} (upstream {status})")
            self._answer(
                h,
                rule.status,
                [("Content-Type", "application/xml")],
                b"" if method == "HEAD" else _error_body(rule.code, key),
            )
            return
        if rule is not None and rule.action == "corrupt" and payload:
            middle = len(payload) // 2
            payload = payload[:middle] + bytes([payload[middle] ^ 0xFF]) + payload[middle + 1 :]
        self._record(method, key, query, str(status) if action == "forward" else f"{action} {status}")
        self._answer(h, status, headers, payload, head=method == "HEAD")

    def _forward(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=120)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                if name.lower() in _HOP or name.lower() == "content-length":
                    continue
                conn.putheader(name, value)
            if body or method in ("PUT", "POST"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            payload = resp.read()
            out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP]
            return resp.status, out, payload
        finally:
            conn.close()

    @staticmethod
    def _answer(
        h: BaseHTTPRequestHandler,
        status: int,
        headers: list[tuple[str, str]],
        payload: bytes,
        head: bool = False,
    ) -> None:
        h.send_response_only(status)
        has_length = False
        for name, value in headers:
            if name.lower() == "content-length":
                has_length = True
                if not head:
                    value = str(len(payload))
            h.send_header(name, value)
        if not has_length:
            h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        if not head and payload:
            h.wfile.write(payload)
        h.wfile.flush()


@pytest.fixture(scope="session")
def _s3_fault_proxy_session(moto_endpoint: str) -> Iterator[S3FaultProxy]:
    proxy = S3FaultProxy(moto_endpoint)
    yield proxy
    proxy.close()


@pytest.fixture
def s3_fault_proxy(_s3_fault_proxy_session: S3FaultProxy) -> Iterator[S3FaultProxy]:
    """The session proxy in front of moto, with no rules; cleared again after the test."""
    _s3_fault_proxy_session.clear()
    yield _s3_fault_proxy_session
    _s3_fault_proxy_session.clear()
