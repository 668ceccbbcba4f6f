"""Child processes (providers, proxies) and what /proc says about them.

Every child is started through `Children`, which guarantees they all die with us: they are killed in
``close()`` (called from ``finally`` / ``with``), and on Linux each child also gets ``PR_SET_PDEATHSIG``
so even a SIGKILLed load test cannot leave a proxy or a provider behind.  Children run in their own
session, so a Ctrl-C reaches only the load test, which then shuts them down in order.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import aiohttp

_PR_SET_PDEATHSIG = 1
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


class ChildError(RuntimeError):
    """A child failed to start; the message carries the tail of its log."""


class Children:
    """The processes this run started; `close` ends all of them (SIGTERM, then SIGKILL)."""

    def __init__(self) -> None:
        self.procs: list[tuple[subprocess.Popen[bytes], str, IO[bytes] | None]] = []

    def spawn(
        self,
        name: str,
        args: Sequence[str],
        *,
        log_path: Path | None = None,
        stdout_pipe: bool = False,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``python -m ...``-style children; stderr (and stdout unless piped) go to `log_path`."""
        log = open(log_path, "wb") if log_path is not None else None
        proc = subprocess.Popen(
            [sys.executable, *args],
            stdin=subprocess.PIPE,  # a child may watch for EOF on stdin: its parent is gone
            stdout=subprocess.PIPE if stdout_pipe else (log or subprocess.DEVNULL),
            stderr=log or subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        self.procs.append((proc, name, log))
        return proc

    def close(self, timeout: float = 3.0) -> None:
        procs = list(self.procs)
        self.procs.clear()
        for proc, _, _ in procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for proc, _, log in procs:
            try:
                proc.wait(max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(2.0)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()
            if log is not None:
                log.close()

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def log_tail(path: Path | None, n: int = 20) -> str:
    if path is None or not path.exists():
        return ""
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-n:])


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral port that was free a moment ago (the child binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def read_ready_line(proc: subprocess.Popen[bytes], within: float, log: Path | None) -> bytes:
    """The first stdout line of a child that announces itself (the provider runner)."""
    assert proc.stdout is not None
    loop = asyncio.get_running_loop()
    try:
        line = await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), within)
    except TimeoutError:
        raise ChildError(f"child did not start within {within:g} s\n{log_tail(log)}") from None
    if not line:
        raise ChildError(f"child exited with {proc.wait()}\n{log_tail(log)}")
    return line


async def wait_http(
    url: str, proc: subprocess.Popen[bytes], *, within: float = 15.0, log: Path | None = None
) -> None:
    """Poll ``GET url`` until it answers 2xx; fail early (with the log tail) if the child exits."""
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as s:
        while True:
            if proc.poll() is not None:
                raise ChildError(f"{url}: child exited with {proc.returncode}\n{log_tail(log)}")
            try:
                async with s.get(url) as r:
                    if r.status < 300:
                        return
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise ChildError(f"{url} not ready after {within:g} s\n{log_tail(log)}")
            await asyncio.sleep(0.05)


# ------------------------------------------------------------------------------------------- /proc


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat, in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def status_kb(pid: int, key: str) -> int | None:
    """A ``kB`` line of /proc/<pid>/status (VmHWM = peak RSS, VmRSS = current)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def self_cpu_seconds() -> float:
    """This process's CPU time (the load client's own cost)."""
    t = os.times()
    return t.user + t.system


def describe_proc(pid: int) -> dict[str, Any]:
    return {"pid": pid, "peak_rss_mb": _mb(status_kb(pid, "VmHWM")), "rss_mb": _mb(status_kb(pid, "VmRSS"))}


def _mb(kb: int | None) -> float | None:
    return None if kb is None else round(kb / 1024, 1)
