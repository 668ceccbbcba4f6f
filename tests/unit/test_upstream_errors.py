"""Typed upstream errors (`hedge/upstream_errors.py`) and the upstream client registry
(`hedge/upstream.py`), without sockets.

The `reason` labels are a contract with the dashboards and the race (a timeout-only give-up is a 504):
they must stay the strings they were before the errors had types.
"""

from __future__ import annotations

import subprocess
import sys

import aiohttp
import pytest

from hedge.aiohttp_client import AiohttpUpstream
from hedge.config import parse_config
from hedge.fastclient import FastUpstream
from hedge.upstream import CLIENTS, make_client
from hedge.upstream_errors import (
    ConnectError,
    ConnectTimeout,
    ExceptionMapping,
    ProtocolError,
    ReadReset,
    ReadTimeout,
    TooLarge,
    UpstreamError,
    UpstreamTimeout,
    map_exceptions,
)

from ..conftest import raw_config


def test_reason_labels_are_unchanged() -> None:
    assert {cls: cls.reason for cls in (ConnectError, ConnectTimeout, ReadTimeout, ReadReset)} == {
        ConnectError: "connect",
        ConnectTimeout: "timeout",
        ReadTimeout: "timeout",
        ReadReset: "reset",
    }
    assert ProtocolError.reason == "reset"  # a malformed response was always labelled as a reset
    assert TooLarge.reason == "too_large"
    assert ReadTimeout("x").reason == UpstreamTimeout.reason  # instances read the class attribute


def test_every_error_is_an_upstream_error_and_timeouts_share_a_base() -> None:
    for cls in (ConnectError, ConnectTimeout, ReadTimeout, ReadReset, ProtocolError, TooLarge):
        assert issubclass(cls, UpstreamError)
    assert issubclass(ConnectTimeout, UpstreamTimeout) and issubclass(ReadTimeout, UpstreamTimeout)
    assert not issubclass(ReadReset, UpstreamTimeout)
    assert str(ReadReset()) == "reset"  # no detail: the label


def test_map_exceptions_first_match_wins_and_names_only_the_type() -> None:
    mapping: ExceptionMapping = {TimeoutError: ReadTimeout, OSError: ConnectError}
    secret = "Bearer sk-live-SECRET"
    with pytest.raises(ReadTimeout) as e, map_exceptions(mapping, "upstream"):
        raise aiohttp.ServerTimeoutError(secret)  # a TimeoutError *and* an OSError: listed first wins
    assert str(e.value) == "upstream (ServerTimeoutError)"
    with pytest.raises(ConnectError) as c, map_exceptions(mapping, "connecting"):
        raise ConnectionRefusedError(secret)
    assert secret not in str(c.value) and c.value.__cause__ is None and c.value.__suppress_context__


def test_map_exceptions_passes_ours_and_unmapped_ones_through() -> None:
    with pytest.raises(ProtocolError), map_exceptions({Exception: ReadReset}, "x"):
        raise ProtocolError("already typed")
    with pytest.raises(KeyError), map_exceptions({OSError: ReadReset}, "x"):
        raise KeyError("a bug, not an upstream failure")


# -------------------------------------------------------------------------------------- registry


async def test_registry_builds_each_client_by_name() -> None:
    assert set(CLIENTS) == {"fast", "aiohttp"}
    for name, cls in (("fast", FastUpstream), ("aiohttp", AiohttpUpstream)):
        client = make_client(name)
        assert isinstance(client, cls)
        await client.close()  # part of the interface
    with pytest.raises(ValueError, match="one of fast, aiohttp"):
        make_client("curl")


@pytest.mark.parametrize("name", sorted(CLIENTS))
def test_config_accepts_every_registered_client(name: str) -> None:
    cfg = parse_config(raw_config({"a": "http://127.0.0.1:1/v1"}, server={"upstream_client": name}))
    assert cfg.server.upstream_client == name


def test_lean_client_and_interface_do_not_import_aiohttp() -> None:
    code = (
        "import sys; import hedge.fastclient, hedge.upstream, hedge.upstream_errors, hedge.http11;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'aiohttp'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
