"""Windowed latency and error estimators for one upstream candidate (sans-IO, O(1) updates).

The proxy needs, per candidate (provider + upstream model), a running estimate of the time to first
token (TTFT) that follows a provider that slows down or recovers within seconds, so that the hedge delay
(a high quantile of the running candidate's TTFT) and the candidate order track reality.

Design
------
* **Log buckets.** Latencies span four orders of magnitude (1 ms .. 2 min) and what matters is relative
  error, so samples go into logarithmically spaced buckets (20 per decade = ~12 % wide by default).
  Quantiles interpolate log-linearly inside a bucket, so the error is below one bucket width.
* **Forward decay** (Cormode et al., "Forward decay: a practical time decay model for streaming
  systems", ICDE 2009). Instead of multiplying every bucket by ``exp(-dt/tau)`` on every update, a sample
  observed at ``now`` is *added* with weight ``exp((now - t0)/tau)`` relative to a landmark ``t0``. The
  decayed weight of everything at time ``now`` is the stored weight times ``exp(-(now - t0)/tau)``, a
  common factor. Hence an update touches one bucket (O(1)), and the *shape* of the distribution (every
  quantile) only changes on updates, never with the mere passage of time: quantiles can be cached
  until the next update. When the stored weights grow large (``(now - t0)/tau > 32``), all buckets are
  rescaled to a new landmark ``t0 = now`` (O(buckets), once every ~46 half-lives) and buckets whose
  weight has decayed below 1e-9 of a fresh sample are dropped, so stale outliers disappear entirely.
* **Censored samples** (attempts cancelled before their first token). When an attempt loses the race and
  is cancelled after running ``c`` seconds we learn only that its TTFT exceeded ``c``. Dropping such
  samples would be dishonest: a slow provider that always loses would only ever report its rare fast
  answers and would look fast. Recording ``c`` as if it were a TTFT would be just as wrong. We use
  Efron's *redistribute-to-the-right* estimator (Efron 1967; it equals Kaplan-Meier): the censored
  sample's weight is given to the observations known to be larger than ``c``, in proportion to their
  current (decayed) weight, i.e. here to the buckets strictly above ``c``'s bucket. If there is
  (practically) no weight above ``c`` the whole weight goes into the bucket just above ``c``'s: the
  lower bound is all we know, and placing the sample there is the smallest value consistent with it.

  Consequences:

  - A censored sample never adds mass at or below ``c``, so it can only make the estimate *slower*,
    never faster. A provider whose true TTFT is 2 s but which is always cancelled at 0.5 s reports a
    median just above 0.5 s (never below), and as soon as some of its real 2 s answers arrive, the
    censored mass follows them up to 2 s.
  - Censored samples count towards :meth:`DecayingHistogram.weight` (they are real observations), so a
    candidate known only through cancellations still gets an estimate: the honest lower bound. (Except
    those dropped for lying clearly below the whole distribution; see below.)
  - Weight above ``c`` that has decayed to less than 1/20 of one fresh sample (older than ~4.3
    half-lives) is treated as absent. Otherwise a single ancient slow sample would absorb every new
    censored sample and resurrect a latency the estimator had already forgotten.
  - A censored sample whose ``c`` lies clearly *below* everything the histogram holds (no weight in
    ``c``'s bucket, the next one up, or below) is dropped. Redistribution would only rescale the whole
    distribution (every quantile stays as it is), so it carries no information about the shape; all it
    would add is weight, and that weight would go to old mass. That matters when a provider recovers:
    a candidate remembered as slow (3 s), now launched only as a hedge and cancelled 50 ms later when
    the primary answers, would have its stale 3 s belief refreshed by every such cancellation and would
    never decay to *unknown*, so it would never be tried first and re-measured. Within one bucket of
    the lowest mass the sample is kept: that is a lower bound being confirmed (a provider always
    cancelled at 0.5 s keeps its weight just above 0.5 s, so it stays known and stays behind).
  - Redistribution is O(number of occupied buckets above ``c``); cancellations happen at most once per
    losing attempt and ``c`` is usually near the top of the distribution (it is the hedge delay or the
    winner's TTFT), so this is a handful of buckets.

Nothing here reads a clock: every method that needs the time takes ``now`` (seconds, monotonic).
"""

from __future__ import annotations

from bisect import bisect_left
from itertools import accumulate
from math import ceil, exp, isfinite, log

__all__ = ["CandidateStats", "DecayingHistogram"]

_LN2 = log(2.0)
# Rescale the forward-decay weights once they reach e**32 (~8e13): far below float overflow, and the
# relative precision lost on data that old (weight < 1e-13 of a fresh sample) is irrelevant.
_RENORM_EXPONENT = 32.0
# On rescaling, buckets lighter than this (in units of one fresh sample, ~30 half-lives old) are dropped.
_DROP_BELOW = 1e-9
# Weight above a censoring point lighter than this fraction of one fresh sample counts as "none".
_CENSOR_MIN_ABOVE = 0.05


class DecayingHistogram:
    """Log-bucketed histogram with exponential forgetting (forward decay).

    New observations get weight ``exp((now - t0)/tau)`` instead of decaying every bucket on every update;
    the weights are renormalised when they grow large. See the module docstring for the censoring method.
    ``quantile`` returns ``None`` while the effective number of samples is below ``min_weight`` so that
    callers fall back to a configured default instead of trusting one or two samples.
    """

    __slots__ = (
        "_cache",
        "_counts",
        "_hi",
        "_hi_i",
        "_inv_log_r",
        "_inv_tau",
        "_lo",
        "_lo_i",
        "_log_lo",
        "_log_r",
        "_n",
        "_remote",
        "_renorm_s",
        "_t0",
        "_total",
        "half_life_s",
        "min_weight",
    )

    def __init__(
        self,
        half_life_s: float = 10.0,
        lo: float = 0.001,
        hi: float = 120.0,
        buckets_per_decade: int = 20,
        *,
        min_weight: float = 3.0,
    ) -> None:
        if not (isfinite(half_life_s) and half_life_s > 0):
            raise ValueError(f"half_life_s must be a positive number, got {half_life_s!r}")
        if not (isfinite(lo) and isfinite(hi) and 0 < lo < hi):
            raise ValueError(f"need 0 < lo < hi (finite), got lo={lo!r} hi={hi!r}")
        if not (isinstance(buckets_per_decade, int) and buckets_per_decade >= 1):
            raise ValueError(f"buckets_per_decade must be an int >= 1, got {buckets_per_decade!r}")
        if not (isfinite(min_weight) and min_weight >= 0):
            raise ValueError(f"min_weight must be >= 0, got {min_weight!r}")
        self.half_life_s = float(half_life_s)
        self.min_weight = float(min_weight)
        tau = half_life_s / _LN2
        self._inv_tau = 1.0 / tau
        self._renorm_s = _RENORM_EXPONENT * tau
        self._lo = float(lo)
        self._hi = float(hi)
        # Spread the buckets evenly (in log space) over exactly [lo, hi]: at least buckets_per_decade
        # per decade, so a bucket is never wider than 10**(1/buckets_per_decade).
        span = log(hi / lo)
        self._n = n = max(1, ceil(span / log(10.0) * buckets_per_decade - 1e-9))
        self._log_lo = log(lo)
        self._log_r = span / n
        self._inv_log_r = n / span
        self._counts: list[float] = [0.0] * n
        self._total = 0.0  # sum of _counts (forward-decay scale, landmark _t0)
        self._t0 = 0.0
        self._lo_i = n  # lowest occupied bucket (n when empty)
        self._hi_i = -1  # highest occupied bucket (-1 when empty)
        self._cache: dict[float, float] = {}
        # Peers' contribution (shared state, hedge/shared.py), already included in _counts, on the same
        # landmark; None when there is none. Kept so the local contribution can be told apart.
        self._remote: list[float] | None = None

    # -- introspection -------------------------------------------------------------------------------
    @property
    def bucket_ratio(self) -> float:
        """Width of one bucket as a ratio (upper edge / lower edge); the quantile error bound."""
        return exp(self._log_r)

    def bucket_index(self, value: float) -> int:
        """Index of the bucket ``value`` falls into (values outside [lo, hi] clamp to the end buckets)."""
        if value <= self._lo:
            return 0
        if value >= self._hi:
            return self._n - 1
        i = int((log(value) - self._log_lo) * self._inv_log_r)
        return i if i < self._n else self._n - 1

    def bucket_bounds(self, i: int) -> tuple[float, float]:
        """(lower, upper) edge of bucket ``i``."""
        return exp(self._log_lo + i * self._log_r), exp(self._log_lo + (i + 1) * self._log_r)

    # -- updates -------------------------------------------------------------------------------------
    def _scale(self, now: float) -> float:
        """Forward-decay weight of a sample observed at ``now``, rescaling first if it grew large."""
        if self._hi_i < 0:  # empty: start a fresh landmark (also avoids exp overflow on the first call)
            self._t0 = now
            return 1.0
        x = now - self._t0
        if x > self._renorm_s:
            self._renormalise(now)
            if self._hi_i < 0:
                return 1.0
            x = 0.0
        return exp(x * self._inv_tau)

    def _renormalise(self, now: float) -> None:
        """Move the landmark to ``now``: O(buckets), rare (once per ~46 half-lives)."""
        f = exp(-(now - self._t0) * self._inv_tau)
        counts = self._counts
        remote = self._remote
        if remote is not None:
            self._remote = remote = [r * f for r in remote]
        lo_i, hi_i = self._n, -1
        total = 0.0
        for i in range(self._lo_i, self._hi_i + 1):
            c = counts[i] * f
            if c < _DROP_BELOW:
                c = 0.0
                if remote is not None:
                    remote[i] = 0.0
            else:
                total += c
                if i < lo_i:
                    lo_i = i
                hi_i = i
            counts[i] = c
        self._t0 = now
        self._total = total
        self._lo_i, self._hi_i = lo_i, hi_i
        self._cache.clear()

    def observe(self, value: float, now: float) -> None:
        """Record one exact sample (e.g. a TTFT) taken at time ``now``. O(1)."""
        x = now - self._t0
        if self._hi_i >= 0 and x <= self._renorm_s:  # fast path of _scale()
            w = exp(x * self._inv_tau)
        else:
            w = self._scale(now)
        if value <= self._lo:
            i = 0
        elif value >= self._hi:
            i = self._n - 1
        else:
            i = int((log(value) - self._log_lo) * self._inv_log_r)
            if i >= self._n:
                i = self._n - 1
        self._counts[i] += w
        self._total += w
        if i < self._lo_i:
            self._lo_i = i
        if i > self._hi_i:
            self._hi_i = i
        if self._cache:
            self._cache.clear()

    def observe_censored(self, lower_bound: float, now: float) -> None:
        """Record a sample known only to exceed ``lower_bound`` (redistribute-to-the-right).

        The sample's weight goes to the buckets strictly above ``lower_bound``'s bucket in proportion to
        their current weight, or, when there is (practically) none, into the bucket just above. It is
        dropped when ``lower_bound`` lies clearly below all the weight (see the module docstring). Cost:
        O(occupied buckets above ``lower_bound``).
        """
        w = self._scale(now)
        k = self.bucket_index(lower_bound)
        counts = self._counts
        start, stop = k + 1, self._hi_i + 1
        above = sum(counts[start:stop]) if start < stop else 0.0
        clear = k + 2  # from here up, at least one whole bucket above c's
        if clear < stop and self._total - sum(counts[clear:stop]) < _CENSOR_MIN_ABOVE * w <= above:
            return  # c is below the whole distribution: no shape information, only stale weight
        if above >= _CENSOR_MIN_ABOVE * w:
            f = 1.0 + w / above
            counts[start:stop] = [c * f for c in counts[start:stop]]
        else:
            j = start if start < self._n else self._n - 1
            counts[j] += w
            if j < self._lo_i:
                self._lo_i = j
            if j > self._hi_i:
                self._hi_i = j
        self._total += w
        if self._cache:
            self._cache.clear()

    # -- shared state (hedge/shared.py) --------------------------------------------------------------
    def shape(self) -> tuple[float, float, int, float]:
        """(lo, hi, buckets, half-life): two histograms add bucket by bucket only if these agree."""
        return (self._lo, self._hi, self._n, self.half_life_s)

    def local_weights(self, now: float) -> dict[int, float]:
        """This histogram's own contribution (without the peers' from :meth:`set_remote`), as sparse
        bucket -> weight decayed to ``now`` (in units of one fresh sample). O(buckets).

        With forward decay two histograms with the same shape add exactly once expressed at a common
        time: the weight of every sample at ``now`` is ``2**(-age/half_life)`` whoever observed it.
        """
        if self._hi_i < 0:
            return {}
        f = exp(-(now - self._t0) * self._inv_tau)
        counts, remote = self._counts, self._remote
        out: dict[int, float] = {}
        for i in range(self._lo_i, self._hi_i + 1):
            c = counts[i] - remote[i] if remote is not None else counts[i]
            w = c * f
            if w > _DROP_BELOW:
                out[i] = w
        return out

    def set_remote(self, weights: dict[int, float], now: float) -> None:
        """Replace the peers' contribution with ``weights`` (bucket -> weight decayed to ``now``).

        Queries then answer for local + remote samples, exactly as one histogram that saw them all.
        O(buckets); called once per sync interval, off the request path.
        """
        if self._remote is None and not weights:
            return  # nothing from peers before or now: nothing to do
        if self._hi_i >= 0 and now - self._t0 > self._renorm_s:
            self._renormalise(now)
        if self._hi_i < 0:
            self._t0 = now  # nothing held: a fresh landmark
            self._remote = None
        g = exp((now - self._t0) * self._inv_tau)  # decayed-at-now -> stored scale
        n = self._n
        new = [0.0] * n
        for i, w in weights.items():
            if 0 <= i < n and w > 0.0 and isfinite(w):
                new[i] += w * g
        old = self._remote
        counts = self._counts
        lo_i, hi_i, total = n, -1, 0.0
        tiny = _DROP_BELOW * g  # rounding residue of the subtraction: below 1e-9 of a fresh sample
        for i in range(n):
            c = counts[i] + new[i]
            if old is not None:
                c -= old[i]
            if c <= tiny:
                c = 0.0
            else:
                total += c
                if i < lo_i:
                    lo_i = i
                hi_i = i
            counts[i] = c
        self._total = total
        self._lo_i, self._hi_i = lo_i, hi_i
        self._remote = new if hi_i >= 0 and any(new) else None
        self._cache.clear()

    # -- queries -------------------------------------------------------------------------------------
    def weight(self, now: float) -> float:
        """Effective (decayed) number of samples at ``now``: each sample counts 2**(-age/half_life)."""
        if self._total <= 0.0:
            return 0.0
        return self._total * exp(-(now - self._t0) * self._inv_tau)

    def survival(self, value: float, now: float) -> float | None:
        """The share of the decayed weight above ``value`` (1 - CDF), or ``None`` when weight(now) <
        min_weight; log-linear inside a bucket, the inverse of ``quantile``. O(occupied buckets)."""
        total = self._total
        if total <= 0.0 or total * exp((self._t0 - now) * self._inv_tau) < self.min_weight:
            return None
        if value <= self._lo:
            return 1.0
        pos = (log(value) - self._log_lo) * self._inv_log_r
        i = int(pos)
        if i > self._hi_i:
            return 0.0
        counts = self._counts
        above = sum(counts[i + 1 : self._hi_i + 1])
        if i >= self._lo_i:
            above += counts[i] * (1.0 - (pos - i))
        else:
            above = total
        return min(1.0, above / total)

    def quantile(self, q: float, now: float) -> float | None:
        """The q-quantile of the decayed distribution, or ``None`` when weight(now) < min_weight.

        Accurate to within one bucket (log-linear interpolation inside it). O(occupied buckets) when the
        answer is not cached; the cache (per q) survives until the next update, because with forward
        decay the shape of the distribution does not change between updates.
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile q must be in [0, 1], got {q!r}")
        total = self._total
        if total <= 0.0 or total * exp((self._t0 - now) * self._inv_tau) < self.min_weight:
            return None
        v = self._cache.get(q)
        if v is not None:
            return v
        if q > 0.5:
            # High quantiles (the hedge delay): walk down from the top, touching only the tail's buckets.
            counts = self._counts
            rem = (1.0 - q) * total
            acc = 0.0
            i = self._hi_i
            lo_i = self._lo_i
            while i > lo_i:
                c = counts[i]
                if acc + c >= rem and c > 0.0:
                    break
                acc += c
                i -= 1
            c = counts[i]
            f = 1.0 - (rem - acc) / c if c > 0.0 else 1.0
            pos = i + (f if f > 0.0 else 0.0)
        else:
            lo_i = self._lo_i
            cum = list(accumulate(self._counts[lo_i : self._hi_i + 1]))
            target = q * cum[-1]
            j = bisect_left(cum, target)  # first bucket whose cumulative weight reaches the target
            if j >= len(cum):
                j = len(cum) - 1
            prev = cum[j - 1] if j else 0.0
            c = cum[j] - prev
            f = (target - prev) / c if c > 0.0 else 0.0
            if f < 0.0:
                f = 0.0
            elif f > 1.0:
                f = 1.0
            pos = lo_i + j + f
        v = exp(self._log_lo + pos * self._log_r)
        self._cache[q] = v
        return v


class CandidateStats:
    """Everything the proxy learns about one candidate (provider + upstream model).

    * ``ttft``: time to first content token of attempts that got one (exact samples) and of attempts
      cancelled before one (censored samples, see the module docstring).
    * ``recent``: the exact samples only, forgetting per *sample* instead of per second (half-life
      ``recent_half_life_samples``: its clock is the count of exact samples), for deciding the *order*
      (see :meth:`current_ttft`): a primary that suddenly slows down must lose its place within its
      next few answers, and keep that verdict until new answers say otherwise, however long that takes.
      Censored samples stay out of it: a demoted candidate's lost hedges (cancelled soon after launch)
      would otherwise wash its slow verdict out; censoring is honoured by the long window instead.
    * ``total``: total duration of completed attempts.
    * a decayed error rate of attempts before their first token.

    The recorders are independent: ``record_first_token`` feeds only the TTFT histogram, and
    ``record_success`` / ``record_failure`` feed only the error rate, so a winning attempt is reported
    with both ``record_first_token`` and ``record_success``. Cancelled losers are neither successes nor
    failures; they are reported with ``record_censored`` only.
    """

    __slots__ = (
        "_err_t", "_fail", "_inv_tau", "_last", "_n", "_r_fail", "_r_succ", "_r_t", "_succ",
        "half_life_s", "recent", "total", "ttft",
    )  # fmt: skip

    def __init__(
        self, half_life_s: float = 10.0, min_weight: float = 3.0, recent_half_life_samples: float = 2.0
    ) -> None:
        self.half_life_s = float(half_life_s)
        self.ttft = DecayingHistogram(half_life_s, min_weight=min_weight)
        # two answers are enough to demote: the verdict is the median of the last few, not one outlier
        self.recent = DecayingHistogram(recent_half_life_samples, min_weight=min(2.0, min_weight))
        self._n = 0  # samples recorded: the clock of `recent`
        self.total = DecayingHistogram(half_life_s, min_weight=min_weight)
        self._inv_tau = _LN2 / half_life_s
        self._succ = 0.0  # decayed counts as of _err_t
        self._fail = 0.0
        self._err_t = 0.0
        self._last: float | None = None
        # peers' outcomes (shared state), included in _succ/_fail, decayed counts as of _r_t
        self._r_succ = 0.0
        self._r_fail = 0.0
        self._r_t = 0.0

    def record_first_token(self, ttft: float, now: float) -> None:
        """An attempt produced its first content token ``ttft`` seconds after launch."""
        self.ttft.observe(ttft, now)
        self._n += 1
        self.recent.observe(ttft, self._n)
        self._last = now

    def record_censored(self, elapsed: float, now: float) -> None:
        """An attempt was cancelled after ``elapsed`` seconds without a first token (TTFT > elapsed)."""
        self.ttft.observe_censored(elapsed, now)
        self._last = now

    def record_total(self, duration: float, now: float) -> None:
        """A completed attempt took ``duration`` seconds in all."""
        self.total.observe(duration, now)
        self._last = now

    def _decay_counts(self, now: float) -> None:
        dt = now - self._err_t
        if dt > 0.0:
            f = exp(-dt * self._inv_tau)
            self._succ *= f
            self._fail *= f
            self._err_t = now

    def record_success(self, now: float) -> None:
        """The attempt reached its first token (or a 2xx body). O(1)."""
        self._decay_counts(now)
        self._succ += 1.0
        self._last = now

    def record_failure(self, now: float) -> None:
        """The attempt failed before its first token (connect error, timeout, 429/5xx, bad stream). O(1)."""
        self._decay_counts(now)
        self._fail += 1.0
        self._last = now

    def error_rate(self, now: float) -> float:
        """Decayed failures / (failures + successes); 0.0 with no data.

        Both counts decay by the same factor, so the ratio changes only when an outcome is recorded:
        decay makes recent outcomes count more than old ones rather than drift the rate over idle time.
        """
        n = self._succ + self._fail
        return self._fail / n if n > 0.0 else 0.0

    def outcome_weight(self, now: float) -> float:
        """Effective (decayed) number of outcomes behind :meth:`error_rate`, to judge its confidence."""
        n = self._succ + self._fail
        if n <= 0.0:
            return 0.0
        dt = now - self._err_t
        return n * exp(-dt * self._inv_tau) if dt > 0.0 else n

    def expected_ttft(self, now: float) -> float | None:
        """Median TTFT, or ``None`` (unknown) while there are too few samples."""
        return self.ttft.quantile(0.5, now)

    @property
    def samples(self) -> int:
        """Exact samples recorded so far: the clock of `recent`."""
        return self._n

    def recent_ttft(self) -> float | None:
        """Median of the last few exact answers (the recent window alone), None while too few."""
        return self.recent.quantile(0.5, self._n)

    def current_ttft(self, now: float) -> float | None:
        """The larger of the recent-samples and the long-window median TTFT (what the order is decided by).

        Quick to demote, slow to promote (the idea of Finagle's peak EWMA): a slowdown shows in the last
        few answers at once, while a speed-up must convince the long window too. The recent window alone
        would fall into the winners-only trap (a hedge target completes only its fast answers); the long
        window, where cancelled attempts count as censored samples, is honest about that.
        """
        long = self.ttft.quantile(0.5, now)
        short = self.recent.quantile(0.5, self._n)
        if short is None or long is None:
            return long
        return short if short > long else long

    def ttft_quantile(self, q: float, now: float) -> float | None:
        """The q-quantile of TTFT (e.g. the hedge delay), or ``None`` while there are too few samples."""
        return self.ttft.quantile(q, now)

    def last_update(self) -> float | None:
        """Time of the most recent record of any kind, or ``None`` if nothing was recorded yet."""
        return self._last

    # -- shared state (hedge/shared.py) --------------------------------------------------------------
    def local_outcomes(self, now: float) -> tuple[float, float]:
        """This instance's own (successes, failures), decayed to ``now``, without the peers' share."""
        f = exp(-(now - self._err_t) * self._inv_tau) if now > self._err_t else 1.0
        g = exp(-(now - self._r_t) * self._inv_tau) if now > self._r_t else 1.0
        succ = self._succ * f - self._r_succ * g
        fail = self._fail * f - self._r_fail * g
        return (succ if succ > 1e-9 else 0.0, fail if fail > 1e-9 else 0.0)

    def set_remote_outcomes(self, succ: float, fail: float, now: float) -> None:
        """Replace the peers' (successes, failures), decayed to ``now``: the error rate then counts
        every instance's outcomes, as if one instance had seen them all."""
        local_s, local_f = self.local_outcomes(now)
        ok = isfinite(succ) and isfinite(fail)
        succ, fail = (max(0.0, succ), max(0.0, fail)) if ok else (0.0, 0.0)
        self._succ, self._fail = local_s + succ, local_f + fail
        self._err_t = now
        self._r_succ, self._r_fail, self._r_t = succ, fail, now
