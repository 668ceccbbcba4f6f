"""The lean upstream client over TLS (real providers are https): verified, pooled, and refusing an
untrusted certificate. Uses a throwaway self-signed certificate made with the openssl CLI."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
from aiohttp import web

from hedge.fastclient import FastUpstream
from hedge.upstream import UpstreamError

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    key, crt = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(crt),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return crt, key


async def test_https_upstream(cert: tuple[Path, Path]) -> None:
    crt, key = cert
    sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    sctx.load_cert_chain(str(crt), str(key))
    seen: list[int] = []

    async def handler(req: web.Request) -> web.Response:
        seen.append(len(await req.read()))
        return web.Response(body=b'{"ok": true}', content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=sctx)
    await site.start()
    port = runner.addresses[0][1]
    trusted = FastUpstream(ssl_context=ssl.create_default_context(cafile=str(crt)))
    untrusted = FastUpstream()  # the system trust store does not know our certificate
    try:
        for _ in range(2):
            resp = await trusted.open(
                f"https://localhost:{port}/v1/chat/completions", {"Content-Type": "application/json"}, b"{}",
                connect_timeout=5, read_timeout=5,
            )  # fmt: skip
            assert resp.status == 200
            assert await resp.read_all(1000) == b'{"ok": true}'
            resp.release()
        assert seen == [2, 2]
        assert trusted.pool_size() == 1  # the TLS connection was kept alive and reused
        with pytest.raises(UpstreamError) as e:
            await untrusted.open(
                f"https://localhost:{port}/v1/chat/completions", {}, b"{}", connect_timeout=5, read_timeout=5
            )
        assert e.value.reason == "connect"
    finally:
        await trusted.close()
        await untrusted.close()
        await runner.cleanup()
