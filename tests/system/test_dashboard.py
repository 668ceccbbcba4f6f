"""The Grafana dashboard against a real Prometheus scraping a loaded proxy (README "Observability").

A dashboard whose queries return nothing looks fine in review and is useless in an incident, so this
test evaluates every panel query from ``grafana/dashboard.json`` through Prometheus's HTTP API while
Prometheus scrapes a proxy under a short mixed load (hedges, stalls, errors, an open breaker, client
cancellations, gateway keys), and asserts each returns at least one finite sample. Prometheus is Debian's
package, installed by ``.ci/apt-install.sh`` (from ``.ci/run``); it runs here as a child process with a
temporary config (generated from ``grafana/prometheus.yml``), storage and port, and is killed in a
``finally``.

The dashboard's well-formedness (ids, grid, datasources, variables, coverage of every metric the proxy
exports) is checked without Prometheus.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from hedge.metrics import Metrics
from hedge.simprovider import Behaviour, LatencyProfile

from ..conftest import chat, raw_config, read_stream, run_proxy, sims

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "grafana" / "dashboard.json"
SCRAPE_CONFIG = ROOT / "grafana" / "prometheus.yml"

# Values for Grafana's template variables when a query is sent to Prometheus directly. The rate window
# spans the whole load (which lasts a few seconds), so every counter has a non-zero rate at query time.
TEMPLATE_VALUES = {
    "__rate_interval": "30s",
    "__interval": "15s",
    "__range": "5m",
    "route": ".*",
    "provider": ".*",
}
GRAFANA_GLOBALS = {"__rate_interval", "__interval", "__range", "__range_s", "__interval_ms"}
# Panel datasources must come from the dashboard's variable, so the JSON works on any Grafana.
DATASOURCE_REFS = {"${datasource}", "${DS_PROMETHEUS}"}
_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")

API_KEY = "sk-gammainfra-dashboard-test"
# First in the route and always 503: early fast-lane requests fail over at once (error hedges) until its
# breaker opens; it then half-opens every second and fails its probe again (an erroring provider's series).
FLAKY = Behaviour(status=503)
# Usually ~20 ms, a quarter of the time 0.5 s: delay hedges, cancelled losers and budget refusals.
FAST_STALLY = LatencyProfile(
    ttft_median=0.02, ttft_sigma=0.3, token_gap=0.002, tokens=5, stall_prob=0.25, stall_ttft=0.5
)
SLOW = LatencyProfile(ttft_median=0.12, ttft_sigma=0.2, token_gap=0.003, tokens=5)
LOAD_SECONDS = 4.0  # long enough to span several 1 s scrapes
MAX_ROUNDS = 40


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panel_targets(dash: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) for every target of every panel."""
    return [(p["title"], t["refId"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def substitute(expr: str) -> str:
    """Replace Grafana variables the way Grafana would for the values in TEMPLATE_VALUES."""

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in TEMPLATE_VALUES:
            raise KeyError(f"no test value for template variable ${name} in {expr!r}")
        return TEMPLATE_VALUES[name]

    return _VAR.sub(repl, expr)


# ------------------------------------------------------------------------------- well-formedness


def test_dashboard_json_is_well_formed() -> None:
    dash = load_dashboard()
    assert dash.get("uid") and dash.get("title")
    assert 36 <= dash["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds_var = variables.get("datasource")
    assert ds_var is not None and ds_var["type"] == "datasource" and ds_var["query"] == "prometheus"

    panels = dash["panels"]
    assert panels
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    cells: dict[tuple[int, int], int] = {}
    for p in panels:
        where = f"panel {p['id']} {p.get('title')!r}"
        assert p.get("title") and p.get("type"), where
        assert p["type"] != "row", f"{where}: rows carry no query; keep the dashboard flat"
        ds = p.get("datasource")
        assert isinstance(ds, dict) and ds.get("type") == "prometheus", where
        assert ds.get("uid") in DATASOURCE_REFS, where
        gp = p.get("gridPos")
        assert isinstance(gp, dict) and {"x", "y", "w", "h"} <= gp.keys(), where
        assert all(isinstance(gp[k], int) for k in "xywh"), where
        assert gp["x"] >= 0 and gp["y"] >= 0 and gp["w"] > 0 and gp["h"] > 0, where
        assert gp["x"] + gp["w"] <= 24, f"{where}: wider than the 24-column grid"
        for x in range(gp["x"], gp["x"] + gp["w"]):  # no two panels cover the same grid cell
            for y in range(gp["y"], gp["y"] + gp["h"]):
                assert (x, y) not in cells, f"{where} overlaps panel {cells[(x, y)]}"
                cells[(x, y)] = p["id"]
        targets = p.get("targets")
        assert targets, f"{where}: no targets"
        refs = [t.get("refId") for t in targets]
        assert all(refs) and len(refs) == len(set(refs)), f"{where}: refIds {refs}"
        for t in targets:
            assert isinstance(t.get("expr"), str) and t["expr"].strip(), where
            assert t.get("datasource", ds) == ds, f"{where}: target datasource differs from the panel's"
            for m in _VAR.finditer(t["expr"]):
                name = m.group(1) or m.group(2) or m.group(3)
                assert name in variables or name in GRAFANA_GLOBALS, f"{where}: unknown variable ${name}"
            substitute(t["expr"])  # every variable has a test value


def test_dashboard_covers_every_exported_metric() -> None:
    """Each metric family the proxy exports is on some panel, so a new metric does not go unseen."""
    exprs = " ".join(expr for _, _, expr in panel_targets(load_dashboard()))
    missing = []
    for family in Metrics().registry.collect():
        if family.type == "counter":
            name = family.name + "_total"
        elif family.type == "histogram":
            name = family.name + "_bucket"
        else:
            name = family.name
        if not re.search(rf"\b{re.escape(name)}\b", exprs):
            missing.append(name)
    assert not missing, f"metrics on no dashboard panel: {missing}"


# ------------------------------------------------------------------------- against Prometheus


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape_config_for(proxy_addr: str) -> str:
    """grafana/prometheus.yml with the test proxy as the target and 1 s scrapes."""
    text = SCRAPE_CONFIG.read_text()
    text, n_target = re.subn(r"127\.0\.0\.1:8080", proxy_addr, text)
    assert n_target == 1, "grafana/prometheus.yml should scrape exactly 127.0.0.1:8080"
    text = re.sub(r"(scrape_interval|evaluation_interval):\s*\S+", r"\1: 1s", text)
    text = re.sub(r"scrape_timeout:\s*\S+", "scrape_timeout: 900ms", text)
    return text


async def _prom_query(http: aiohttp.ClientSession, base: str, expr: str) -> list[dict[str, Any]]:
    async with http.post(
        base + "/api/v1/query", data={"query": expr}, timeout=aiohttp.ClientTimeout(total=10)
    ) as r:
        body = await r.json()
    assert body.get("status") == "success", f"{expr!r}: {body}"
    data = body["data"]
    if data["resultType"] == "scalar":
        return [{"metric": {}, "value": data["result"]}]
    assert data["resultType"] == "vector", f"{expr!r}: {data['resultType']}"
    return data["result"]


async def _wait_for(pred: Any, timeout: float, what: str, log: Path) -> None:
    """Await `pred()` (async, returns bool) until true, at most `timeout` s (polls every 0.2 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if await pred():
                return
        except (aiohttp.ClientError, OSError, AssertionError):
            pass
        await asyncio.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s waiting for {what}; prometheus log tail:\n{_tail(log)}")


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


async def _generate_load(http: aiohttp.ClientSession, url: str) -> dict[str, int]:
    """Mixed traffic for a few seconds: fast-lane streams and non-streams (hedges, stalls, an erroring
    first candidate), pinned successes, pinned failures and client cancellations. Bounded in rounds
    and time; returns counts of status codes for the assertion messages."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    codes: dict[str, int] = {}

    def note(code: str) -> None:
        codes[code] = codes.get(code, 0) + 1

    async def call(model: str, stream: bool = True) -> None:
        async with http.post(url, json=chat(model, stream=stream), headers=auth) as r:
            await (read_stream(r) if stream else r.read())
            note(str(r.status))

    async def other_api(path: str, body: dict[str, Any]) -> None:
        """The per-API panels: a Responses stream, a legacy completions stream, an embeddings race."""
        async with http.post(url.replace("/chat/completions", path), json=body, headers=auth) as r:
            await read_stream(r)
            note(str(r.status))

    async def cancelled(model: str) -> None:
        try:
            async with http.post(
                url, json=chat(model), headers=auth, timeout=aiohttp.ClientTimeout(total=0.04)
            ) as r:
                await read_stream(r)
                note(str(r.status))
        except TimeoutError:
            note("client-timeout")

    loop = asyncio.get_running_loop()
    deadline = loop.time() + LOAD_SECONDS
    rounds = 0
    while rounds < MAX_ROUNDS and loop.time() < deadline:
        rounds += 1
        await asyncio.gather(
            *(call("gammainfra/fast") for _ in range(4)),
            call("gammainfra/fast", stream=False),
            call("m/slow"),
            call("m/flaky"),
            cancelled("m/slow"),
            other_api("/responses", {"model": "gammainfra/fast", "input": "hi", "stream": True}),
            other_api("/completions", {"model": "gammainfra/fast", "prompt": "hi", "stream": True}),
            other_api("/embeddings", {"model": "m/emb", "input": "hi"}),
        )
        await asyncio.sleep(0.05)
    return codes


@pytest.mark.prometheus
async def test_every_panel_query_returns_data(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        reason = "no `prometheus` binary on PATH (install it with .ci/apt-install.sh, see .ci/run)"
        if os.environ.get("HEDGE_REQUIRE_PROMETHEUS"):
            pytest.fail(reason + "; HEDGE_REQUIRE_PROMETHEUS is set")
        pytest.skip(reason)

    targets = [(title, ref, substitute(expr)) for title, ref, expr in panel_targets(load_dashboard())]
    async with sims(("flaky", FLAKY), ("fast", FAST_STALLY), ("slow", SLOW)) as ps:
        # The median as hedge quantile and a 10 % budget with a burst of 2: delay hedges are wanted far
        # more often than the budget allows, so both hedges and refusals have samples.
        raw = raw_config(
            {n: p.base_url for n, p in ps.items()},
            fast={"quantile": 0.5, "default_delay_ms": 40, "hedge_budget": 0.1, "hedge_burst": 2},
            feedback={"failure_threshold": 3, "base_backoff_s": 1.0, "max_backoff_s": 1.0},
        )
        raw["models"]["m/emb"] = {  # for the embeddings panel
            "input_usd_per_mtok": 0.02, "tags": ["embeddings"],
            "serve": [{"provider": "fast", "model": "emb"}, {"provider": "slow", "model": "emb"}],
        }  # fmt: skip
        async with run_proxy(raw, api_keys=(API_KEY,)) as px:
            prom_port = _free_port()
            base = f"http://127.0.0.1:{prom_port}"
            cfg = tmp_path / "prometheus.yml"
            cfg.write_text(scrape_config_for(px.url.removeprefix("http://")))
            log = tmp_path / "prometheus.log"
            with log.open("wb") as log_f:
                proc = await asyncio.create_subprocess_exec(
                    prometheus,
                    f"--config.file={cfg}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_f,
                    stderr=log_f,
                )
            try:

                async def ready() -> bool:
                    async with http.get(base + "/-/ready") as r:
                        return r.status == 200

                async def scraped_up() -> bool:
                    res = await _prom_query(http, base, 'up{job="hedge"} == 1')
                    return bool(res)

                await _wait_for(ready, 20.0, "Prometheus to be ready", log)
                await _wait_for(scraped_up, 10.0, "a first successful scrape of the proxy", log)

                codes = await _generate_load(http, px.url + "/v1/chat/completions")
                load_end = time.time()

                async def scraped_after_load() -> bool:  # two scrapes after the last request
                    res = await _prom_query(http, base, 'timestamp(up{job="hedge"} == 1)')
                    return bool(res) and float(res[0]["value"][1]) > load_end + 1.0

                await _wait_for(scraped_after_load, 10.0, "two scrapes after the load", log)

                empty: list[str] = []
                for title, ref, expr in targets:
                    res = await _prom_query(http, base, expr)
                    values = [float(s["value"][1]) for s in res]
                    if not any(math.isfinite(v) for v in values):
                        empty.append(f"{title} [{ref}]: {expr}  ->  {values or 'no series'}")
                assert not empty, (
                    f"{len(empty)} of {len(targets)} panel queries returned no data "
                    f"(load answered {codes}):\n" + "\n".join(empty)
                )
            finally:
                if proc.returncode is None:
                    proc.terminate()
                    try:
                        await asyncio.wait_for(proc.wait(), 5.0)
                    except TimeoutError:
                        proc.kill()
                        await proc.wait()
