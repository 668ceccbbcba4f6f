"""The aiohttp upstream client's error mapping, with aioresponses as the fake session.

Which `UpstreamError.reason` an aiohttp exception becomes decides what the race does next (a connect
error or a timeout fails over at once, a broken body ends a committed stream with an error event). Real
sockets cover the common cases in test_faults.py; here aioresponses raises the exact aiohttp exceptions
that are awkward to provoke from a real server. (aioresponses 0.7.9 cannot build *responses* for
aiohttp 3.14, whose ClientResponse wants a `stream_writer`; raising exceptions works, and responses are
tested over real sockets in test_faults.py and test_fastclient.py.)
"""

from __future__ import annotations

import aiohttp
import pytest
from aioresponses import aioresponses

from hedge.aiohttp_client import AiohttpUpstream
from hedge.upstream import UpstreamError

URL = "http://provider.invalid/v1/chat/completions"


async def open_(up: AiohttpUpstream) -> object:
    return await up.open(URL, {"Content-Type": "application/json"}, b"{}", connect_timeout=1, read_timeout=1)


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (aiohttp.ClientConnectorError(aiohttp.client_reqrep.ConnectionKey(
            "provider.invalid", 80, False, True, None, None, None), OSError(111, "refused")), "connect"),
        (aiohttp.ConnectionTimeoutError("connect timed out"), "timeout"),
        (aiohttp.ServerTimeoutError("read timed out"), "timeout"),
        (TimeoutError(), "timeout"),
        (aiohttp.ServerDisconnectedError(), "reset"),
        (aiohttp.ClientOSError(104, "reset by peer"), "reset"),
        (ConnectionResetError(), "reset"),
    ],
)  # fmt: skip
async def test_failures_before_headers_map_to_reasons(exc: BaseException, reason: str) -> None:
    up = AiohttpUpstream()
    try:
        with aioresponses() as mock:
            mock.post(URL, exception=exc)
            with pytest.raises(UpstreamError) as e:
                await open_(up)
        assert e.value.reason == reason
    finally:
        await up.close()
