"""The load-test tool: percentile and report code, the lean client's parser, scenarios, and two short
end-to-end smoke runs (`run` and `overhead` as subprocesses, checking the JSON, never timings)."""

from __future__ import annotations

import itertools
import random
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import orjson
import pytest

from hedge.config import parse_config
from loadtest import report
from loadtest.client import Exchange, Target, _Conn, first_token_in_event
from loadtest.providers import parse_tag
from loadtest.run import metrics_delta, parse_metrics, proxy_config, sum_by, timeline
from loadtest.scenarios import SCENARIOS, ErrorBursts, ProviderPlan, Ramp, Window, get, request_rng

REPO = Path(__file__).resolve().parent.parent.parent

# ------------------------------------------------------------------------------------ percentiles


def test_percentile_interpolates_between_ranks() -> None:
    xs = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert report.percentile(xs, 0) == 1.0
    assert report.percentile(xs, 50) == 3.0
    assert report.percentile(xs, 100) == 5.0
    assert report.percentile(xs, 25) == 2.0
    assert report.percentile(xs, 90) == pytest.approx(4.6)
    assert report.percentile(xs, 99.9) == pytest.approx(4.996)


def test_percentile_edges() -> None:
    assert report.percentile([], 50) is None
    assert report.percentile([7.0], 99.9) == 7.0
    with pytest.raises(ValueError):
        report.percentile([1.0, 2.0], 101)
    with pytest.raises(ValueError):
        report.percentile([1.0, 2.0], float("nan"))


def test_percentile_is_monotone_and_within_range() -> None:
    rng = random.Random(3)
    for _ in range(50):
        xs = sorted(rng.lognormvariate(0, 1) for _ in range(rng.randint(1, 40)))
        last = -1.0
        for p in (0, 1, 10, 50, 90, 99, 99.9, 100):
            v = report.percentile(xs, p)
            assert v is not None and xs[0] <= v <= xs[-1] and v >= last
            last = v


def test_distribution_reports_milliseconds() -> None:
    d = report.distribution([0.010, 0.020, 0.030])
    assert d["n"] == 3
    assert d["p50_ms"] == 20.0 and d["min_ms"] == 10.0 and d["max_ms"] == 30.0
    assert d["mean_ms"] == pytest.approx(20.0)
    assert set(d) >= {"p90_ms", "p99_ms", "p99.9_ms"}
    empty = report.distribution([])
    assert empty["n"] == 0 and empty["p99.9_ms"] is None


def test_summarize_mode_counts_errors_load_and_winners() -> None:
    s = report.summarize_mode(
        [0.05, 0.06, 0.07],
        [0.25, 0.26, 0.27],
        ["http_429", "timeout", "http_429"],
        sent=6,
        upstream_requests=9,
        upstream_disconnects=2,
        endpoints=["m@a", "m@a", "m@b", None],
    )
    assert s["sent"] == 6 and s["ok"] == 3 and s["errors"] == 3
    assert s["error_rate"] == 0.5
    assert s["errors_by_reason"] == {"http_429": 2, "timeout": 1}
    assert s["upstream_per_request"] == 1.5
    assert s["served_by"] == {"m@a": 2, "m@b": 1}
    assert s["ttft"]["p50_ms"] == 60.0


def test_format_table_has_a_row_per_mode() -> None:
    rows = {
        "direct": report.summarize_mode([0.05, 2.0], [0.3, 2.2], [], sent=2, upstream_requests=2),
        "fast": report.summarize_mode([], [], ["connect"], sent=1),
    }
    text = report.format_table(rows)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["mode", "sent", "errors"]
    assert lines[2].startswith("direct") and "1.00" in lines[2]
    assert lines[3].startswith("fast") and "1 (100.0%)" in lines[3] and " - " in lines[3]
    assert "ttft p99.9" in lines[0] and "upstream/req" in lines[0]


def test_spread_and_ratio() -> None:
    assert report.spread([3.0, 1.0, 2.0]) == {"min": 1.0, "median": 2.0, "max": 3.0}
    assert report.ratio(3.0, 2.0) == 1.5
    assert report.ratio(1.0, 0.0) is None and report.ratio(None, 1.0) is None


def test_timeline_buckets_by_send_time() -> None:
    from loadtest.run import Sample

    samples = [
        Sample(0, 0.1, 0.0, 0.05, 0.2, None, "a"),
        Sample(1, 0.9, 0.0, 0.07, 0.2, None, "a"),
        Sample(2, 1.5, 0.0, None, None, "http_503", None),
    ]
    rows = timeline(samples)
    assert [r["t"] for r in rows] == [0.0, 1.0]
    assert rows[0]["n"] == 2 and rows[0]["errors"] == 0 and rows[0]["ttft_p50_ms"] == 60.0
    assert rows[1]["errors"] == 1 and rows[1]["ttft_p50_ms"] is None


# ---------------------------------------------------------------------------------------- metrics


METRICS_TEXT = """# HELP hedge_attempts_total Upstream attempts by outcome
# TYPE hedge_attempts_total counter
hedge_attempts_total{model="sim-small",outcome="won",provider="alpha"} 10.0
hedge_attempts_total{model="sim-small",outcome="cancelled",provider="alpha"} 2.0
hedge_attempts_total{model="sim-small",outcome="won",provider="beta"} 3.0
hedge_hedges_total{reason="delay",route="gammainfra/fast"} 4.0
hedge_upstream_ttft_seconds_bucket{le="0.1",model="sim-small",provider="alpha"} 9.0
"""


def test_parse_metrics_and_deltas() -> None:
    before = parse_metrics(METRICS_TEXT)
    assert before["hedge_attempts_total{model=sim-small,outcome=won,provider=alpha}"] == 10.0
    assert not any(k.startswith("hedge_upstream_ttft") for k in before)
    after = dict(before)
    after["hedge_attempts_total{model=sim-small,outcome=won,provider=alpha}"] = 15.0
    after["hedge_hedges_total{reason=error,route=gammainfra/fast}"] = 1.0
    d = metrics_delta(before, after)
    assert sum_by(d, "hedge_attempts_total", "outcome") == {"won": 5.0}
    assert sum_by(d, "hedge_hedges_total", "reason") == {"error": 1.0}
    assert sum_by(parse_metrics(METRICS_TEXT), "hedge_attempts_total", "outcome") == {
        "won": 13.0,
        "cancelled": 2.0,
    }


# ----------------------------------------------------------------------------------------- client


class FakeTransport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written += data

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str) -> Any:
        return None


def _chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


ROLE = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
TOKEN = b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n'
MORE = b'data: {"choices":[{"index":0,"delta":{"content":" there"}}]}\n\n'
FINISH = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
DONE = b"data: [DONE]\n\n"
HEAD_200 = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
    b"X-GammaInfra-Endpoint: m@alpha\r\n\r\n"
)


async def _feed(response: bytes, step: int) -> tuple[Exchange, _Conn, FakeTransport, list[Any]]:
    import asyncio

    pool: Any = __import__("collections").deque()
    conn = _Conn(pool, set())
    tr = FakeTransport()
    conn.connection_made(tr)  # type: ignore[arg-type]
    ex = Exchange(asyncio.get_running_loop())
    conn.send(ex, Target("http://127.0.0.1:9/v1").request_bytes(b"{}"))
    for i in range(0, len(response), step):
        conn.data_received(response[i : i + step])
    return ex, conn, tr, list(pool)


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64, 100_000])
async def test_client_parses_chunked_sse_split_anywhere(step: int) -> None:
    # one SSE event split across chunked frames, and frames split across reads
    body = _chunked(ROLE, TOKEN[:20], TOKEN[20:], MORE + FINISH, DONE)
    ex, conn, tr, pool = await _feed(HEAD_200 + body, step)
    assert ex.done.done() and ex.error is None and ex.status == 200
    assert ex.endpoint == "m@alpha"
    assert ex.ttft is not None and ex.total is not None and ex.ttft <= ex.total
    assert pool == [conn] and not tr.aborted  # kept alive for the next request
    assert tr.written.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")


async def test_client_content_length_error_body() -> None:
    body = b'{"error":{"message":"slow down"}}'
    resp = b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    ex, _, _, pool = await _feed(resp, 5)
    assert ex.error == "http_429" and bytes(ex.err_body) == body and ex.ttft is None
    assert len(pool) == 1


async def test_client_flags_error_events_and_missing_done() -> None:
    err = b'data: {"error":{"message":"boom"}}\n\n'
    ex, *_ = await _feed(HEAD_200 + _chunked(ROLE, TOKEN, err), 4)
    assert ex.error == "stream_error"
    ex, *_ = await _feed(HEAD_200 + _chunked(ROLE, err), 4)
    assert ex.error == "stream_error" and ex.ttft is None
    ex, *_ = await _feed(HEAD_200 + _chunked(ROLE, TOKEN, FINISH), 4)
    assert ex.error == "truncated"
    ex, *_ = await _feed(HEAD_200 + _chunked(ROLE, DONE), 4)
    assert ex.error == "no_token"


async def test_client_connection_lost_midstream_is_a_reset() -> None:
    body = _chunked(ROLE, TOKEN)[:-5]  # no terminating chunk
    ex, conn, _, _ = await _feed(HEAD_200 + body, 50)
    assert not ex.done.done()
    conn.connection_lost(ConnectionResetError())
    assert ex.error == "reset" and ex.ttft is not None


def test_first_token_rule() -> None:
    assert not first_token_in_event({"choices": [{"delta": {"role": "assistant", "content": ""}}]})
    assert first_token_in_event({"choices": [{"delta": {"content": "x"}}]})
    assert first_token_in_event({"choices": [{"delta": {}, "finish_reason": "stop"}]})
    assert first_token_in_event({"choices": [{"delta": {"tool_calls": [{"index": 0}]}}]})
    assert not first_token_in_event({"choices": [], "usage": {"prompt_tokens": 1}})
    assert not first_token_in_event([1, 2])


def test_target_paths() -> None:
    assert Target("http://127.0.0.1:9001/v1").path == "/v1/chat/completions"
    assert Target("http://127.0.0.1:8080").path == "/v1/chat/completions"
    t = Target("http://127.0.0.1:8080/")
    assert t.port == 8080 and t.request_bytes(b"ab").endswith(b"Content-Length: 2\r\n\r\nab")
    with pytest.raises(ValueError):
        Target("https://example.com")


# -------------------------------------------------------------------------------------- scenarios


def test_scenarios_exist_with_a_primary() -> None:
    assert set(SCENARIOS) >= {"steady", "stalls", "degrade", "errors", "outage", "all-slow"}
    for s in SCENARIOS.values():
        assert s.primary == s.providers[0].name and len(s.providers) == 3
        assert all(s.describe(30.0).values())


def test_degrade_slows_only_inside_its_window() -> None:
    alpha = get("degrade").providers[0]
    d = 30.0

    def median_ttft(elapsed: float | None) -> float:
        xs = sorted(alpha.behaviour(elapsed, d, request_rng(1, 0, k, 0)).ttft for k in range(301))
        return xs[150]

    before, during, after = median_ttft(1.0), median_ttft(12.0), median_ttft(25.0)
    assert during > 4 * before and during > 4 * after
    assert median_ttft(None) == pytest.approx(before)  # warm-up: base profile


def test_outage_and_bursts_windows() -> None:
    w = Window(0.3, 0.6)
    assert not w.contains(None, 10) and not w.contains(2.9, 10) and w.contains(3.0, 10)
    assert not w.contains(6.0, 10)
    b = ErrorBursts(period_s=5.0, length_s=1.5, prob=1.0, status=429, offset_s=1.0)
    assert not b.active(None) and not b.active(0.5) and b.active(1.0) and b.active(2.4)
    assert not b.active(2.6) and b.active(6.2)
    errs = get("errors").providers[0]
    statuses = {errs.behaviour(0.5, 30, request_rng(1, 0, k, 0)).status for k in range(50)}
    assert 429 in statuses and 200 in statuses
    assert get("outage").providers[0].outage is not None


def test_same_request_same_luck_across_modes() -> None:
    """Common random numbers: the draw depends on (seed, provider, seq, nth), not on arrival order."""
    alpha = get("stalls").providers[0]
    a = [alpha.behaviour(5.0, 30, request_rng(7, 0, k, 0)).ttft for k in range(200)]
    b = [alpha.behaviour(5.0, 30, request_rng(7, 0, k, 0)).ttft for k in reversed(range(200))]
    assert a == b[::-1]
    assert any(t == 2.0 for t in a)  # some stalls among 200 at 4%
    other = [alpha.behaviour(5.0, 30, request_rng(8, 0, k, 0)).ttft for k in range(200)]
    assert other != a


def test_parse_tag() -> None:
    assert parse_tag("lt/fast/12") == ("fast", 12)
    assert parse_tag("lt/fast/x") is None and parse_tag("user-1") is None and parse_tag(None) is None


def test_generated_proxy_config_is_valid() -> None:
    text = proxy_config(
        {"alpha": "http://127.0.0.1:9001/v1", "beta": "http://127.0.0.1:9002/v1"},
        port=8099,
        route={"hedge_budget": 0.2},
        feedback={"half_life_s": 5.0},
    )
    cfg = parse_config(tomllib.loads(text))
    assert [s.provider for s in cfg.models["lt/chat"].serve] == ["alpha", "beta"]
    fast = cfg.routes["gammainfra/fast"]
    assert fast.strategy == "hedge" and fast.hedge_budget == 0.2 and fast.max_attempts == 2
    assert cfg.feedback.half_life_s == 5.0 and cfg.server.port == 8099


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from loadtest.plot import plot_run

    rng = random.Random(1)
    samples = {m: [rng.lognormvariate(4, 0.5) for _ in range(200)] for m in ("direct", "fast")}
    tl = {"fast": [{"t": 0.0, "ttft_p50_ms": 50.0, "ttft_p99_ms": 90.0}]}
    path = plot_run(samples, tmp_path / "x.png", title="t", timeline=tl, events=[{"t": 0.5}])
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -------------------------------------------------------------------------------------- end to end


def _run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def test_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _run_cli(
        "run", "--scenario", "stalls", "--duration", "2", "--rate", "10", "--modes", "direct,fast",
        "--warmup", "0.5", "--out", str(out), "--no-plot", "--quiet",
    )  # fmt: skip
    doc = orjson.loads((out / "report.json").read_bytes())
    assert "direct" in proc.stdout and "fast" in proc.stdout and "ttft p99" in proc.stdout
    assert doc["scenario"]["name"] == "stalls" and doc["load"]["modes"] == ["direct", "fast"]
    assert set(doc["modes"]) == {"direct", "fast"}
    for mode in ("direct", "fast"):
        m = doc["modes"][mode]
        assert m["sent"] == 20 and m["errors"] == 0 and m["ok"] == 20
        assert 0 < m["ttft"]["p50_ms"] <= m["ttft"]["p99_ms"] <= m["ttft"]["p99.9_ms"]
        assert m["ttft"]["p50_ms"] <= m["total"]["p50_ms"]
        assert len(doc["samples"][mode]["ttft_ms"]) == 20
    assert doc["modes"]["direct"]["upstream_per_request"] == 1.0
    assert 1.0 <= doc["modes"]["fast"]["upstream_per_request"] <= 3.0
    assert doc["modes"]["direct"]["served_by"] == {"alpha": 20}
    assert doc["proxy"]["pid"] and doc["proxy"]["attempts_by_outcome"].get("won", 0) >= 20
    assert doc["providers"]["alpha"]["by_mode"]["direct"]["requests"] == 20
    assert (out / "proxy.toml").exists()


def test_smoke_client_bench() -> None:
    proc = _run_cli("client", "--requests", "80", "--concurrency", "4", "--rounds", "2", "--streams", "5")
    assert "lean client receive path" in proc.stdout and "llhttp alone" in proc.stdout
    assert "ratio fast/aiohttp" in proc.stdout


def test_smoke_cpu_with_profile() -> None:
    # a round's figure is the proxy's CPU per request; under --profile the proxy must still drain on
    # SIGTERM, or cProfile never writes its file and no module is ranked
    proc = _run_cli(
        "cpu", "--requests", "200", "--concurrency", "8", "--rounds", "2", "--warmup", "20", "--profile",
        "--model", "gammainfra/fast",
    )  # fmt: skip
    head = re.search(r"median ([0-9.]+) us \(rounds: ([0-9.]+), ([0-9.]+)\)", proc.stdout)
    assert head is not None, proc.stdout
    assert all(float(x) > 0 for x in head.groups())
    ranked = re.findall(r"^  (\S+\.py) +([0-9.]+) us$", proc.stdout, re.M)
    assert {"proxy.py", "cycle.py", "dialects.py"} <= {name for name, _ in ranked}


def test_smoke_overhead(tmp_path: Path) -> None:
    out = tmp_path / "ov"
    proc = _run_cli(
        "overhead", "--requests", "120", "--throughput-requests", "200", "--throughput-concurrency", "8",
        "--warmup", "30", "--rounds", "2", "--out", str(out),
    )  # fmt: skip
    doc = orjson.loads((out / "overhead.json").read_bytes())
    assert "PASS" in proc.stdout or "FAIL" in proc.stdout
    (p,) = doc["passes"]
    assert set(p["latency"]) == {"direct", "baseline", "hedge", "fast"} == set(p["throughput"])
    for phase, n in (("latency", 120), ("throughput", 200)):
        for t, s in p[phase].items():
            assert s["requests"] == n and s["ok"] == n and not s["errors"], (phase, t, s)
            assert s["ttft"]["p50_ms"] > 0 and s["throughput_rps"] > 0
            cpu = s["proxy_cpu_ms_per_req"]
            assert (cpu is None) == (t == "direct") and (cpu is None or cpu >= 0)
    names = [c["name"] for c in p["derived"]["checks"]]
    assert (
        any("CPU" in n for n in names) and any("p50" in n for n in names) and any("p99" in n for n in names)
    )
    assert all(isinstance(c["pass"], bool) for c in p["derived"]["checks"])
    assert doc["memory"]["hedge"]["peak_rss_mb"] > 0 and doc["memory"]["baseline"]["peak_rss_mb"] > 0


def test_timeline_plot_colours_by_provider(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from loadtest.plot import plot_timeline
    from loadtest.run import Sample, served_by

    pts = {
        "fast": [(t * 0.1, 50.0 + t, "alpha" if t < 50 else "beta") for t in range(100)],
        "direct": [(t * 0.1, 50.0, "alpha") for t in range(100)],
    }
    path = plot_timeline(
        pts, [(0.0, 80.0), (5.0, 120.0)], tmp_path / "t.png", title="t", spans=[(5, 10, "x")]
    )
    assert path is not None and path.stat().st_size > 1000
    ok = Sample(1, 0.0, 0.0, 0.05, 0.2, None, "m@beta")
    assert served_by(ok, "fast", "alpha") == "beta"
    assert served_by(Sample(1, 0.0, 0.0, 0.05, 0.2, None, None), "direct", "alpha") == "alpha"
    assert served_by(Sample(1, 0.0, 0.0, None, None, "reset", None), "fast", "alpha") is None


def test_issue_9_scenarios_are_there() -> None:
    for name in ("slowdown", "drift", "flapping", "recovery", "erroring"):
        s = get(name)
        assert s.describe(30.0)
    flap = get("flapping").providers[0]
    assert [flap.slow_at(t, 10.0) for t in (0.5, 1.5, 2.5, 3.5)] == [False, True, False, True]


def test_drift_ramps_the_primary_gradually_and_stays() -> None:
    """The simulator's `drift`: a TTFT ramp (geometric, 1 -> 5x across 30-70 % of the run), no step."""
    d = 20.0
    alpha = get("drift").providers[0]
    assert alpha.ramp is not None and get("drift").change_at == 0.30
    factors = [alpha.ttft_factor(t, d) for t in (None, 0.0, 5.9, 6.0, 10.0, 14.0, 19.9)]
    assert factors[:4] == [1.0, 1.0, 1.0, 1.0]
    assert factors[4] == pytest.approx(5.0**0.5) and factors[5] == factors[6] == pytest.approx(5.0)
    ts = [6.0 + 0.1 * k for k in range(81)]
    fs = [alpha.ttft_factor(t, d) for t in ts]
    assert all(b > a for a, b in itertools.pairwise(fs))  # strictly growing: no instant of news
    assert max(b / a for a, b in itertools.pairwise(fs)) < 1.03

    def median_ttft(elapsed: float) -> float:
        return sorted(alpha.behaviour(elapsed, d, request_rng(1, 0, k, 0)).ttft for k in range(301))[150]

    assert median_ttft(18.0) == pytest.approx(5 * median_ttft(2.0), rel=1e-9)  # the same draws, 5x
    assert "ramps x1 -> x5 over 6-14 s" in alpha.describe(d)
    flat = ProviderPlan("x", alpha.profile, ramp=Ramp(Window(0.5, 0.5), 3.0))
    assert flat.ttft_factor(9.0, d) == 1.0 and flat.ttft_factor(10.0, d) == 3.0  # a zero-length ramp: a step


def test_after_change_measure_and_lead_time() -> None:
    """Issue 9's slowdown measure: the mode's p99 (failures in the tail) against the best single
    provider's own p99 on the same requests, and the extra load over the window."""
    ttfts = [0.1] * 98 + [0.2, float("inf")]
    own = {"alpha": [1.0] * 100, "beta": [0.05] * 98 + [0.15, 0.15], "gamma": [0.3] * 100}
    m = report.after_change(ttfts, own, [1] * 90 + [2] * 10)
    assert m["n"] == 100 and m["p99_ms"] == 200.0 and not m["p99_inf"]  # nearest rank: the 99th of 100
    assert m["best"] == "beta" and m["own_p99_ms"]["beta"] == 150.0 and m["own_p99_ms"]["alpha"] == 1000.0
    assert m["ratio"] == pytest.approx(0.2 / 0.15) and m["extra_load"] == pytest.approx(0.1)
    worse = report.after_change([float("inf")] * 2 + [0.1] * 8, {"b": [0.1] * 10}, [1] * 10)
    assert worse["p99_inf"] and worse["p99_ms"] is None and worse["ratio"] == float("inf")
    assert report.nearest_rank([], 99.0) is None
    pts = [(k * 0.1, "alpha" if k < 30 else "beta") for k in range(100)]
    assert report.lead_time(pts, "beta", 1.0) == pytest.approx(1.8)  # from 2.8 s: 18 of the next 20
    assert report.lead_time(pts, "gamma", 1.0) is None


def test_own_ttft_follows_the_plan() -> None:
    alpha = get("slowdown").providers[0]
    rng = request_rng(1, 0, 5, 0)
    assert alpha.own_ttft(8.05, 20.0, rng) == float("inf")  # restarting: connections refused
    before = alpha.own_ttft(5.0, 20.0, request_rng(1, 0, 5, 0))
    after = alpha.own_ttft(15.0, 20.0, request_rng(1, 0, 5, 0))
    assert after == pytest.approx(10 * before)
    erroring = get("erroring").providers[0]
    outs = [erroring.own_ttft(1.0, 20.0, request_rng(1, 0, k, 0)) for k in range(100)]
    assert 10 < sum(x == float("inf") for x in outs) < 50  # 30 % fail: forever, for the own p99


def test_smoke_drift_run_prints_the_after_change_measure(tmp_path: Path) -> None:
    """`drift` end to end (ramp in the provider process) and the after-the-change line: a short run
    whose change is at 30 % (0.9 s of 3 s)."""
    out = tmp_path / "drift"
    proc = _run_cli(
        "run", "--scenario", "drift", "--duration", "3", "--rate", "10", "--modes", "direct,fast",
        "--warmup", "0.5", "--out", str(out), "--no-plot", "--quiet",
    )  # fmt: skip
    doc = orjson.loads((out / "report.json").read_bytes())
    assert doc["scenario"]["name"] == "drift" and "ramps x1 -> x5" in doc["scenario"]["providers"]["alpha"]
    m = doc["after_change"]
    assert m is not None and m["change_s"] == pytest.approx(0.9) and m["from_s"] == pytest.approx(1.9)
    assert 10 <= m["n"] <= 11 and set(m["own_p99_ms"]) == {"alpha", "beta", "gamma"}
    assert m["ratio"] is not None and m["ratio"] > 0 and m["extra_load"] is not None and m["extra_load"] >= 0
    assert "seqs" not in doc["providers"]
    assert "after the change at 0.9 s" in proc.stdout and "own p99" in proc.stdout
    # the direct mode's late requests met the ramp: alpha's median there is above its warm-up median
    direct = doc["modes"]["direct"]["timeline"]
    assert direct[-1]["ttft_p50_ms"] > direct[0]["ttft_p50_ms"]
