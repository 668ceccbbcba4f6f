"""The core imports no aiohttp: every decision module loads in a process where aiohttp cannot be imported.

aiohttp stays at the edge (docs/design.md, "Map of the package"): the race, the policy, the parsers, the
config and the error values are plain objects, so they can be driven by a fake clock, reused by the
simulator and the lean client, and moved to another server framework without touching a rule. A child
process installs a meta-path finder that refuses `aiohttp` and `aiohttp.*`, then imports each module.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent.parent / "hedge"

# Modules that must load without aiohttp.
CORE = (
    "race",  # the hedged race, sans-IO
    "cycle",  # one request's race with real attempt tasks: asyncio only, no HTTP framework
    "attempt",  # one upstream attempt, through the client interface
    "clock",  # the clock and the hedge timer on it
    "policy",  # evidence, delay, budget split
    "strategy",  # per-route ranking keys
    "feedback",  # order / delay / budget decisions; raises errors.NoCandidates, never an HTTP answer
    "stats",
    "budget",
    "health",
    "sse",
    "dialects",
    "http11",  # llhttp response parser behind an h11-like interface
    "decoding",
    "upstream",  # the client interface and registry (clients are imported lazily by their factories)
    "upstream_errors",
    "fastclient",  # the lean asyncio client: asyncio + http11, no aiohttp
    "request",
    "apirequests",
    "affinity",
    "apisupport",
    "catalog",
    "config",
    "auth",
    "errors",  # ApiError / NoCandidates as plain values
    "secrets",
    "shared",
    "sharedredis",  # redis-py only
    "body",  # body decoding and bounds, fed bytes by the edge
    "conn_limits",  # connection gate and head clock, wired into aiohttp by server.py
    "autoroute",
    "metrics",  # prometheus-client only
    "sim",  # the discrete-event simulator drives the core with a fake clock
    "simformats",
    "workers",  # the pre-fork supervisor; it imports the server only inside the child it starts
)

# Modules that are the edge: they speak aiohttp on purpose, and this is why.
EDGE = {
    "server": "the aiohttp application, routes and middlewares",
    "proxy": "the request handler: aiohttp requests in, aiohttp (stream) responses out",
    "http_errors": "the one place a domain error becomes an aiohttp response",
    "aiohttp_client": "the optional upstream client built on aiohttp's ClientSession",
    "simprovider": "simulated providers are real aiohttp servers for the integration tests",
    "cli": "starts the aiohttp server",
    "demo": "starts the aiohttp server with simulated providers",
    "__main__": "python -m hedge, i.e. cli",
    "__init__": "the package marker (imported by every case above)",
}

CHILD = r"""
import importlib, importlib.abc, json, sys

class NoAiohttp(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "aiohttp" or name.startswith("aiohttp."):
            raise ImportError(f"aiohttp is blocked here ({name})")
        return None

sys.meta_path.insert(0, NoAiohttp())
out = {}
for name in sys.argv[1:]:
    try:
        importlib.import_module("hedge." + name)
        out[name] = None
    except ImportError as e:
        out[name] = str(e)
    out[name + ":aiohttp_loaded"] = any(m == "aiohttp" or m.startswith("aiohttp.") for m in sys.modules)
print(json.dumps(out))
"""


def _import_without_aiohttp(names: list[str]) -> dict[str, object]:
    r = subprocess.run(
        [sys.executable, "-c", CHILD, *names],
        cwd=PACKAGE.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, object] = json.loads(r.stdout)
    return result


def test_every_module_is_either_core_or_edge() -> None:
    # a new module must be placed, so the list below cannot silently go stale
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert not set(CORE) & set(EDGE)
    assert modules == set(CORE) | set(EDGE), (
        modules - set(CORE) - set(EDGE),
        set(CORE) | set(EDGE) - modules,
    )


def test_core_modules_import_without_aiohttp() -> None:
    out = _import_without_aiohttp(list(CORE))
    failed = {name: out[name] for name in CORE if out[name] is not None}
    assert not failed, failed
    assert not any(out[f"{name}:aiohttp_loaded"] for name in CORE)


def test_the_block_is_real() -> None:
    # the same child refuses the edge: were the finder broken, the test above would prove nothing
    out = _import_without_aiohttp(["http_errors", "server"])
    assert "aiohttp is blocked" in str(out["http_errors"])
    assert "aiohttp is blocked" in str(out["server"])


def test_the_design_map_names_every_module() -> None:
    # docs/design.md opens with the map of the package; a module missing from it is a map gone stale
    design = (PACKAGE.parent / "docs" / "design.md").read_text()
    assert design.startswith("# hedge design\n\n## Map of the package\n")
    the_map = design.split("## Map of the package", 1)[1].split("\n## ", 1)[0]
    missing = sorted(m for m in set(CORE) | set(EDGE) - {"__init__"} if f"`{m}.py`" not in the_map)
    assert not missing, missing
