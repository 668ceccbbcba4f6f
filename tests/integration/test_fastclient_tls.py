"""The lean upstream client over TLS (real providers are https): verified, pooled, and refusing an
untrusted certificate. Uses a throwaway self-signed certificate made with the openssl CLI.

Without the CLI the test skips locally, but fails where HEDGE_REQUIRE_OPENSSL is set (.ci/run sets it, as it
sets HEDGE_REQUIRE_PROMETHEUS for the dashboard test), so CI can never pass with the HTTPS path untested."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
from aiohttp import web

from hedge.fastclient import FastUpstream
from hedge.upstream import UpstreamError


def need_openssl() -> str:
    """The openssl CLI's path; skips without it, or fails when HEDGE_REQUIRE_OPENSSL is set (CI)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        reason = "no `openssl` CLI on PATH (Debian package `openssl`)"
        if os.environ.get("HEDGE_REQUIRE_OPENSSL"):
            pytest.fail(reason + "; HEDGE_REQUIRE_OPENSSL is set")
        pytest.skip(reason)
    return openssl


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    openssl = need_openssl()
    key, crt = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(crt),
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


def test_missing_openssl_fails_where_required(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CI switch works: no CLI + HEDGE_REQUIRE_OPENSSL is a failure, no CLI alone a skip."""
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    monkeypatch.setenv("HEDGE_REQUIRE_OPENSSL", "1")
    with pytest.raises(pytest.fail.Exception, match="HEDGE_REQUIRE_OPENSSL"):
        need_openssl()
    monkeypatch.delenv("HEDGE_REQUIRE_OPENSSL")
    with pytest.raises(pytest.skip.Exception):
        need_openssl()
