"""Bench helper: S3 over HTTPS on loopback — moto behind a small TLS-terminating proxy.

pgBackRest's S3 client speaks HTTPS only and moto serves plain HTTP, so the S3 side-by-side
run puts this proxy in front of moto: a self-signed certificate for 127.0.0.1 (made with the
openssl command), TLS terminated here, bytes forwarded both ways to moto's port. Both tools go
through the same endpoint: gravl-dr (boto3) trusts the certificate through AWS_CA_BUNDLE,
pgBackRest through repo1-s3-ca-file.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

PUMP = 1 << 20


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate (and its key) valid for 127.0.0.1, for one run."""
    cert, key = directory / "tls.crt", directory / "tls.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:127.0.0.1",  # pgBackRest matches DNS names only
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then close the writing side: on the TLS side asyncio sends close_notify,
    which pgBackRest's OpenSSL insists on (a bare TCP close is "unexpected eof")."""
    try:
        while data := await reader.read(PUMP):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()
            else:
                writer.close()


class TLSProxy:
    """Listen on 127.0.0.1 with TLS; forward each connection to ``upstream_port`` in plain TCP
    (an asyncio loop in a thread of its own)."""

    def __init__(self, upstream_port: int, cert: Path, key: Path) -> None:
        self.upstream_port = upstream_port
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True, name="tlsproxy").start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ctx), self._loop
        ).result(timeout=30)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(_pipe(client_r, up_w), _pipe(up_r, client_w))
        for w in (client_w, up_w):
            with contextlib.suppress(OSError, RuntimeError):
                w.close()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)


def start_moto(port: int) -> subprocess.Popen[bytes]:
    """moto's S3 server on 127.0.0.1:port (plain HTTP), ready when this returns."""
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return proc
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto_server did not start")
