"""Shared state, the pure part: one instance's contribution, and how the peers' ones merge (no I/O).

Several gateway instances (replicas, or `--workers N`) each see a share of the traffic. Through Redis
(hedge/sharedredis.py, the I/O edge) each one *publishes its own contribution* and *merges the others'*
on every sync interval, off the request path. This module is what is published and how it is merged;
it never touches a socket, so it is tested with plain objects and an injected clock.

What is shared, per candidate and per feedback lane (streaming, non-streaming):

* the TTFT and duration histograms (`DecayingHistogram`): forward-decay, log-bucketed. Two histograms
  of the same shape add *exactly* once their weights are expressed at one common time: a sample's weight
  at time T is ``2**(-(T - observed)/half_life)`` whoever observed it. A contribution carries its weights
  decayed to its publication time ``t``; the reader decays them on to its own now and adds them;
* the decayed success and failure counts behind the error rate (the same algebra);
* the policy's evidence (`policy.Evidence`): the instance's last few ended attempts, each with its end
  time, its TTFT or, if cancelled, "more than t". The reader keeps the newest `EVIDENCE_N` of its own
  and the peers' by end time, so the window the order is decided by is the fleet's: a slowdown that
  one instance's traffic meets demotes the leader everywhere at the next sync, and a candidate the
  peers measured recently is neither unknown nor stale (due for exploration) here;
* breaker openings, with their reopen time and ``Retry-After`` deadline: an instance adopts a peer's
  opening (`CircuitBreaker.adopt_opening`), so an outage seen by one instance protects all.

No double counting: an instance publishes only its *local* contribution. The peers' merged one is held
beside it (`set_remote`) and replaced wholesale on every sync, so a peer's samples are counted once,
however often they are re-read, and vanish when the peer does. Adopted breaker openings are remembered
and not re-published, so a closed breaker is not re-opened by its own echo.

* Responses API affinity (response id -> owning provider, hedge/affinity.py): each document carries
  the ids the instance recorded itself within the last `affinity_window_s` (the newest
  `AFFINITY_SHARE_MAX`), with their creation time (key ``aff``, absent from older peers' documents).
  A reader installs them into its map's separate remote part (`AffinityMap.adopt`), which is never
  re-published and is bounded and aged like the local part; a peer's ids stay after the peer leaves
  (the response lives at the provider, not at the instance). A reader that syncs at least once per
  window sees every id a peer made, unless a peer made more than `AFFINITY_SHARE_MAX` in one window.

Not shared (each instance keeps its own): attempts in flight (the policy's censored-at-their-age
evidence: a peer's would be stale by up to a sync interval, and their outcome arrives as an ended
attempt anyway), exploration, the hedge budget (each instance's budget ratio already bounds the
fleet's extra load), and the half-open probe (after a shared opening each instance probes for itself).

Times cross process (and host) boundaries as wall-clock seconds: each instance converts with one fixed
offset (wall - monotonic) taken at start, so a value echoed back converts to what it was. Hosts' clocks
should agree to well under a half-life (NTP does: milliseconds against seconds).

Censored samples are merged as each instance placed them (their weight is exact; where the weight went
followed the shape that instance saw, which includes the peers' contribution). The property test
(tests/unit/test_shared.py) shows the exactness for exact samples and outcomes: merging any split of a sample
stream gives the statistics of the whole stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from .affinity import AffinityMap
from .catalog import Candidate
from .feedback import Feedback
from .policy import EVIDENCE_N, Ended

__all__ = ["AFFINITY_SHARE_MAX", "FORMAT", "MAX_BLOB_BYTES", "BadContribution", "SharedSync"]

FORMAT = 1
"""Version of the published document; a peer on another version is ignored (counted as a mismatch)."""

MAX_BLOB_BYTES = 4 << 20
"""A contribution larger than this is not parsed (a wrong or hostile value must not exhaust memory)."""


AFFINITY_SHARE_MAX = 4096
"""Response ids per published document at most (the newest): ~300 KB of JSON in the worst case."""

MAX_ID_CHARS = 256
"""A peer's response id or provider name longer than this makes its document bad data."""


class BadContribution(ValueError):
    """A peer's published document that cannot be merged. ``kind``: bad_data | mismatch."""

    def __init__(self, kind: str, why: str) -> None:
        super().__init__(why)
        self.kind = kind


@dataclass(slots=True)
class _Acc:
    """The peers' merged contribution for one candidate in one lane, decayed to the reader's now."""

    ttft: dict[int, float] = field(default_factory=dict)
    total: dict[int, float] = field(default_factory=dict)
    succ: float = 0.0
    fail: float = 0.0
    ended: list[Ended] = field(default_factory=list)  # the peers' kept attempts, on the reader's clock
    exact: tuple[float, float] | None = None  # the peers' latest exact answer (arrived at, TTFT), ditto


def _flat(weights: Mapping[int, float]) -> list[float]:
    out: list[float] = []
    for i, w in weights.items():
        out += (i, w)
    return out


def _finite(x: Any, what: str, *, lo: float = -math.inf) -> float:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x) or x < lo:
        raise BadContribution("bad_data", f"{what}: not a finite number >= {lo}")
    return float(x)


_INT: frozenset[type] = frozenset({int})
_NUM: frozenset[type] = frozenset({int, float})


def _check_weights(flat: Any, n: int, what: str) -> None:
    """A flat [bucket, weight, ...] list: int buckets in [0, n), finite weights >= 0 (bulk checks)."""
    if not isinstance(flat, list) or len(flat) % 2:
        raise BadContribution("bad_data", f"{what}: expected a flat [bucket, weight, ...] list")
    if not flat:
        return
    idx, ws = flat[0::2], flat[1::2]
    if not set(map(type, idx)) <= _INT or min(idx) < 0 or max(idx) >= n:
        raise BadContribution("bad_data", f"{what}: bucket index out of range")
    if not set(map(type, ws)) <= _NUM:
        raise BadContribution("bad_data", f"{what}: weights must be numbers")
    if min(ws) < 0.0 or not math.isfinite(math.fsum(ws)):  # a finite sum: no inf, no nan
        raise BadContribution("bad_data", f"{what}: weights must be finite and >= 0")


def _check_ended(flat: Any) -> None:
    """A flat [ended at (wall), seconds, censored (0|1), ...] list of at most `EVIDENCE_N` attempts."""
    if not isinstance(flat, list) or len(flat) % 3 or len(flat) > 3 * EVIDENCE_N:
        raise BadContribution("bad_data", f"ev: expected a flat [at, s, 0|1, ...] list, <= {EVIDENCE_N}")
    for k in range(0, len(flat), 3):
        _finite(flat[k], "ev")
        _finite(flat[k + 1], "ev", lo=0.0)
        if flat[k + 2] not in (0, 1) or isinstance(flat[k + 2], bool):
            raise BadContribution("bad_data", "ev: censored must be 0 or 1")


def _check_affinity(flat: Any) -> None:
    """A flat [response id, provider, created (wall), ...] list of at most `AFFINITY_SHARE_MAX` ids."""
    if not isinstance(flat, list) or len(flat) % 3 or len(flat) > 3 * AFFINITY_SHARE_MAX:
        raise BadContribution(
            "bad_data", f"aff: expected a flat [id, provider, t, ...] list, <= {AFFINITY_SHARE_MAX}"
        )
    for k in range(0, len(flat), 3):
        for x in flat[k : k + 2]:
            if not isinstance(x, str) or not 0 < len(x) <= MAX_ID_CHARS:
                raise BadContribution("bad_data", "aff: ids and providers must be short strings")
        _finite(flat[k + 2], "aff")


def _add_weights(into: dict[int, float], flat: list[Any], f: float) -> None:
    get = into.get
    for k in range(0, len(flat), 2):
        i = flat[k]
        into[i] = get(i, 0.0) + flat[k + 1] * f


class SharedSync:
    """One instance's side of the shared state: `publish` its contribution, `absorb` the peers'.

    ``lanes``: name -> `Feedback` (the proxy's streaming and non-streaming lanes); ``candidates``: every
    candidate the catalog knows (the set the statistics are kept for). ``clock`` is the proxy's
    monotonic clock, ``wall`` the wall clock: their difference is taken once, here.
    """

    def __init__(
        self,
        lanes: Mapping[str, Feedback],
        candidates: Sequence[Candidate],
        instance_id: str,
        *,
        clock: Callable[[], float],
        wall: Callable[[], float],
        affinity: AffinityMap[str] | None = None,
        affinity_window_s: float = 30.0,
    ) -> None:
        if not lanes:
            raise ValueError("need at least one feedback lane")
        self.lanes = dict(lanes)
        self.candidates = {c.key: c for c in candidates}
        self.instance_id = instance_id
        self.clock = clock
        self.offset = wall() - clock()  # wall = monotonic + offset, fixed for the process's life
        first = next(iter(self.lanes.values()))
        self.half_life_s = first.cfg.half_life_s
        probe = first.stats(candidates[0]).ttft if candidates else None
        self._shape = list(probe.shape()) if probe is not None else []
        self._adopted: dict[str, float] = {}  # candidate key -> the opening we adopted (not re-published)
        self.remote_candidates = 0  # candidates with a peer contribution after the last absorb
        self.affinity = affinity  # response id -> provider (Responses API), shared when given
        self.affinity_window_s = affinity_window_s  # ids recorded this recently are published
        self._providers = {c.provider.name for c in candidates}

    # ---------------------------------------------------------------------------------- publish

    def contribution(self, now: float) -> dict[str, Any]:
        """This instance's own evidence at monotonic time ``now``, as a plain document."""
        off = self.offset
        lanes: dict[str, dict[str, Any]] = {}
        for name, fb in self.lanes.items():
            out: dict[str, Any] = {}
            for key, c in self.candidates.items():
                s = fb.stats(c)
                ttft, total = s.ttft.local_weights(now), s.total.local_weights(now)
                succ, fail = s.local_outcomes(now)
                ended = fb.evidence(c).local_ended()
                lx = fb.evidence(c).local_exact()
                if not (ttft or total or succ or fail or ended or lx):
                    continue
                ev: list[float] = []
                for at, secs, censored in ended:
                    ev += (at + off, secs, censored)
                out[key] = {"ttft": _flat(ttft), "total": _flat(total), "ok": succ, "err": fail, "ev": ev}
                if lx is not None:  # the latest answer may predate the kept attempts (all cancelled since)
                    out[key]["lx"] = [lx[0] + off, lx[1]]
            lanes[name] = out
        opens: dict[str, list[float | None]] = {}
        seen: set[int] = set()
        for fb in self.lanes.values():
            for key, c in self.candidates.items():
                b = fb.breaker(c)
                if id(b) in seen:
                    continue  # lanes share their breakers (Feedback health_from)
                seen.add(id(b))
                until = b.open_until
                if until is None or until <= now or until == self._adopted.get(key):
                    continue  # closed, half-open, or a peer's opening we only adopted
                hold = b.hold_until
                opens[key] = [until + off, hold + off if hold is not None and hold > now else None]
        doc: dict[str, Any] = {
            "v": FORMAT,
            "id": self.instance_id,
            "t": now + off,
            "hl": self.half_life_s,
            "shape": self._shape,
            "lanes": lanes,
            "open": opens,
        }
        if self.affinity is not None:
            aff: list[Any] = []
            for rid, created, owner in self.affinity.recent(now - self.affinity_window_s, AFFINITY_SHARE_MAX):
                aff += (rid, owner, created + off)
            doc["aff"] = aff
        return doc

    def publish(self, now: float) -> bytes:
        """`contribution` serialised (JSON: small, readable with redis-cli, no schema compiler)."""
        return orjson.dumps(self.contribution(now))

    # ----------------------------------------------------------------------------------- absorb

    def decode(self, blob: bytes) -> dict[str, Any]:
        """Parse a peer's document and check its header; raises `BadContribution`. (`check` does the
        entries.)"""
        if len(blob) > MAX_BLOB_BYTES:
            raise BadContribution("bad_data", "contribution too large")
        try:
            doc = orjson.loads(blob)
        except orjson.JSONDecodeError:
            raise BadContribution("bad_data", "not JSON") from None
        if not isinstance(doc, dict):
            raise BadContribution("bad_data", "not a JSON object")
        if doc.get("v") != FORMAT:
            raise BadContribution("mismatch", f"format {doc.get('v')!r}, expected {FORMAT}")
        hl = _finite(doc.get("hl"), "hl", lo=0.0)
        if abs(hl - self.half_life_s) > 1e-9 * self.half_life_s or doc.get("shape") != self._shape:
            raise BadContribution("mismatch", "peer runs another feedback.half_life_s or histogram shape")
        _finite(doc.get("t"), "t")
        if not isinstance(doc.get("id"), str):
            raise BadContribution("bad_data", "id: expected a string")
        if not isinstance(doc.get("lanes"), dict) or not isinstance(doc.get("open"), dict):
            raise BadContribution("bad_data", "lanes/open: expected objects")
        return doc

    def check(self, doc: dict[str, Any]) -> None:
        """Everything `merge` reads from a decoded document, checked first, so a bad entry drops the
        whole peer and never half of it. Raises `BadContribution`."""
        n = int(self._shape[2]) if self._shape else 0
        for cands in doc["lanes"].values():
            if not isinstance(cands, dict):
                raise BadContribution("bad_data", "lane: expected an object")
            for e in cands.values():
                if not isinstance(e, dict):
                    raise BadContribution("bad_data", "candidate entry: expected an object")
                _check_weights(e.get("ttft", []), n, "ttft")
                _check_weights(e.get("total", []), n, "total")
                _finite(e.get("ok", 0.0), "ok", lo=0.0)
                _finite(e.get("err", 0.0), "err", lo=0.0)
                _check_ended(e.get("ev", []))
                lx = e.get("lx")
                if lx is not None:
                    if not isinstance(lx, list) or len(lx) != 2:
                        raise BadContribution("bad_data", "lx: expected [at, seconds]")
                    _finite(lx[0], "lx")
                    _finite(lx[1], "lx", lo=0.0)
        for o in doc["open"].values():
            if not isinstance(o, list) or len(o) != 2:
                raise BadContribution("bad_data", "open: expected [until, hold]")
            _finite(o[0], "open")
            if o[1] is not None:
                _finite(o[1], "hold")
        _check_affinity(doc.get("aff", []))

    def merge(
        self, docs: Iterable[dict[str, Any]], now: float
    ) -> tuple[dict[str, dict[str, _Acc]], dict[str, tuple[float, float | None]]]:
        """Sum checked documents into per-lane, per-candidate contributions decayed to ``now``, and
        collect breaker openings (latest reopen time and Retry-After deadline per candidate), as
        monotonic times of this instance. Candidates or lanes this instance does not know are skipped."""
        t_now = now + self.offset
        acc: dict[str, dict[str, _Acc]] = {name: {} for name in self.lanes}
        opens: dict[str, tuple[float, float | None]] = {}
        inv_tau = math.log(2.0) / self.half_life_s
        for doc in docs:
            f = math.exp(-max(0.0, t_now - doc["t"]) * inv_tau)  # a clock ahead of ours: no growth
            for lane, cands in doc["lanes"].items():
                mine = acc.get(lane)
                if mine is None:
                    continue
                for key, e in cands.items():
                    if key not in self.candidates:
                        continue
                    a = mine.get(key)
                    if a is None:
                        a = mine[key] = _Acc()
                    _add_weights(a.ttft, e.get("ttft", []), f)
                    _add_weights(a.total, e.get("total", []), f)
                    a.succ += e.get("ok", 0.0) * f
                    a.fail += e.get("err", 0.0) * f
                    ev = e.get("ev", [])
                    for k in range(0, len(ev), 3):  # a clock ahead of ours: ended now, not later
                        a.ended.append((min(now, ev[k] - self.offset), float(ev[k + 1]), int(ev[k + 2])))
                    lx = e.get("lx")
                    if lx is not None:
                        x = (min(now, lx[0] - self.offset), float(lx[1]))
                        if a.exact is None or x[0] > a.exact[0]:
                            a.exact = x
            for key, (until_w, hold_w) in doc["open"].items():
                if key not in self.candidates:
                    continue
                until = until_w - self.offset
                hold = None if hold_w is None else hold_w - self.offset
                if until <= now:
                    continue
                prev = opens.get(key)
                if prev is not None:
                    until = max(until, prev[0])
                    if prev[1] is not None:
                        hold = prev[1] if hold is None else max(hold, prev[1])
                opens[key] = (until, hold)
        return acc, opens

    def absorb(self, blobs: Iterable[bytes], now: float) -> tuple[int, dict[str, int]]:
        """Merge the peers' published contributions and install the result (replacing the previous
        one). Bad or mismatched documents are skipped and counted. Returns (peers merged, {kind: n}).

        ``absorb([], now)`` forgets every peer (used when Redis has been unreachable for too long)."""
        out: list[tuple[int, dict[str, int]]] = []
        for _ in self.absorb_steps(blobs, now, out):
            pass
        return out[0]

    def absorb_steps(
        self, blobs: Iterable[bytes], now: float, out: list[tuple[int, dict[str, int]]]
    ) -> Iterator[None]:
        """`absorb` in slices: yields after each peer document and each candidate, so the I/O edge can
        let requests run in between (a merge of many peers and candidates takes milliseconds; no
        request should wait for it). Appends (peers merged, {kind: n}) to ``out`` at the end."""
        docs: list[dict[str, Any]] = []
        bad: dict[str, int] = {}
        for blob in blobs:
            try:
                doc = self.decode(blob)
                if doc["id"] == self.instance_id:
                    continue
                self.check(doc)  # whole, before it counts: one bad entry drops the peer
            except BadContribution as e:
                bad[e.kind] = bad.get(e.kind, 0) + 1
                continue
            docs.append(doc)
            yield
        acc, opens = self.merge(docs, now)
        yield
        yield from self.install_steps(acc, opens, now)
        yield from self.adopt_ids(docs)
        out.append((len(docs), bad))

    def adopt_ids(self, docs: Iterable[dict[str, Any]]) -> Iterator[None]:
        """Install the peers' response ids into the affinity map's remote part (ids of a provider this
        instance does not know are skipped: it could not reach them). Yields every 1024 ids."""
        aff = self.affinity
        if aff is None:
            return
        off, known = self.offset, self._providers
        n = 0
        for doc in docs:
            flat = doc.get("aff", [])
            for k in range(0, len(flat), 3):
                if flat[k + 1] in known:
                    aff.adopt(flat[k], flat[k + 1], flat[k + 2] - off)
                n += 1
                if n % 1024 == 0:
                    yield

    def install(
        self,
        acc: Mapping[str, Mapping[str, _Acc]],
        opens: Mapping[str, tuple[float, float | None]],
        now: float,
    ) -> None:
        """Make the merged peers' contribution the `remote` part of every candidate's statistics and
        evidence, and adopt their breaker openings."""
        for _ in self.install_steps(acc, opens, now):
            pass

    def install_steps(
        self,
        acc: Mapping[str, Mapping[str, _Acc]],
        opens: Mapping[str, tuple[float, float | None]],
        now: float,
    ) -> Iterator[None]:
        """`install`, yielding after each candidate. ``acc`` is decayed to ``now``; each candidate is
        installed at the clock's time then (requests may have recorded samples in between), its
        contribution decayed on to that time, so the merge stays exact."""
        empty = _Acc()
        remote = 0
        inv_tau = math.log(2.0) / self.half_life_s
        for name, fb in self.lanes.items():
            lane = acc.get(name, {})
            for key, c in self.candidates.items():
                a = lane.get(key, empty)
                t = max(now, self.clock())
                d = math.exp(-(t - now) * inv_tau)
                if a is not empty:
                    remote += 1
                s = fb.stats(c)
                s.ttft.set_remote({i: w * d for i, w in a.ttft.items()}, t)
                s.total.set_remote({i: w * d for i, w in a.total.items()}, t)
                s.set_remote_outcomes(a.succ * d, a.fail * d, t)
                fb.evidence(c).set_remote(a.ended, a.exact)
                yield
        self.remote_candidates = remote
        first = next(iter(self.lanes.values()))
        t = max(now, self.clock())
        for key, (until, hold) in opens.items():
            b = first.breaker(self.candidates[key])
            if b.adopt_opening(until, hold, t):
                self._adopted[key] = until if b.open_until is None else b.open_until
