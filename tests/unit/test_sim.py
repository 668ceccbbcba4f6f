"""Issue 9's targets, measured in the discrete-event simulator (`hedge.sim`): fake clock, no sockets.

Every run is a pure function of its seed, and the references (race-all oracle, best fixed stagger at
equal load) see the same per-request luck as the policy. The assertions are the issue's targets, over
five seeds each; `python -m pytest -s tests/unit/test_sim.py` prints the scenario table and every figure.
"""

from __future__ import annotations

import math
import statistics

import pytest

from hedge import sim

SEEDS = range(1, 6)
BUDGET = 0.1  # the scenarios' hedge_budget (sim.make_plan's default)


def show(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print("\n" + text)


def test_scenario_table(capsys: pytest.CaptureFixture[str]) -> None:
    rows = [sim.row(sim.simulate(s, seed=1)) for s in sim.SCENARIOS.values()]
    show(capsys, "SIM seed=1 (TTFT ms; extra = upstream attempts per request - 1)\n" + sim.table(rows))
    assert {r.scenario for r in rows} == set(sim.SCENARIOS)
    for r in rows:
        # the oracle races everything: nothing is faster at its p99
        assert r.oracle_p99 <= r.p99 * 1.0001, r
        # the stagger reference never uses more extra load than the policy did, unless none can: with
        # errors, failing over in config order alone costs more than the policy spent in all
        assert r.stagger_extra <= r.extra + 1e-9 or r.stagger_d >= sim.NO_STAGGER, r
        assert 0.0 <= r.extra <= 1.0 and math.isfinite(r.p99)
    # a run is a pure function of its seed
    again = sim.row(sim.simulate(sim.SCENARIOS["flapping"], seed=1))
    assert again == next(r for r in rows if r.scenario == "flapping")


def test_abrupt_slowdown_is_followed_by_the_order(capsys: pytest.CaptureFixture[str]) -> None:
    lines = []
    for seed in SEEDS:
        ratio, extra = sim.slowdown_targets(sim.simulate(sim.SCENARIOS["slowdown"], seed=seed), BUDGET)
        lines.append(f"seed {seed}: {ratio.detail} ({ratio.value:.2f}x); {extra.detail}")
        assert ratio.met, ratio  # p99 from 1 s after the change <= 1.3x the best remaining own p99
        assert extra.met, extra  # at <= budget + 2 % extra load
    show(capsys, "SIM slowdown\n" + "\n".join(lines))


def test_abrupt_slowdown_at_one_fleet_instances_rate(capsys: pytest.CaptureFixture[str]) -> None:
    """The same target at 10 req/s with the load test fleet's providers (50/80/110 ms): one instance's
    share in `python -m loadtest fleet`. Here the slowed leader's answers arrive fast enough that its
    median stays *identified* (at 500 ms), the challengers stay bounds, and exploration earns one token
    per 8 s: before the `LEAD_MARGIN` rule and the exploration reserve, 4 of these 5 seeds missed
    (p99 4-5.7x, p50 after the change up to 486 ms)."""
    lines = []
    for seed in SEEDS:
        run = sim.simulate(sim.SCENARIOS["slowdown-10rps"], seed=seed)
        ratio, extra = sim.slowdown_targets(run, BUDGET)
        lines.append(f"seed {seed}: {ratio.detail} ({ratio.value:.2f}x); {extra.detail}")
        assert ratio.met, ratio
        assert extra.met, extra
    show(capsys, "SIM slowdown at 10 req/s\n" + "\n".join(lines))


def test_a_drifting_leader_is_followed_by_the_order(capsys: pytest.CaptureFixture[str]) -> None:
    """The load test's drift (its providers, a ramps 50 -> 250 ms over 8 s): p99 over the 11 s from
    1 s after the ramp starts <= 1.3x the best provider's own p99. The leader stays identified while it
    slows, and its challenger, which only loses races, has no recent answer; before a leader twice its
    own usual median counted as clearly degraded (`strategy.Fastest.rank`), b led only when a was
    3-4x slower, and these seeds read 1.30-1.58x (1.13-2.26x over seeds 1-12), now 1.00-1.17x."""
    targets = [sim.drift_target(sim.simulate(sim.SCENARIOS["drift-fleet"], seed=s)) for s in SEEDS]
    show(capsys, "SIM drift-fleet: " + ", ".join(f"{t.detail} ({t.value:.2f}x)" for t in targets))
    assert all(t.met for t in targets), targets


def test_a_recovered_provider_leads_again_within_5_s(capsys: pytest.CaptureFixture[str]) -> None:
    times = [sim.recovery_target(sim.simulate(sim.SCENARIOS["recovery"], seed=s)) for s in SEEDS]
    show(capsys, "SIM recovery: leads again after " + ", ".join(t.detail for t in times))
    assert all(t.met for t in times), times


def test_all_slow_extra_load_stays_within_the_budget(capsys: pytest.CaptureFixture[str]) -> None:
    loads = [sim.all_slow_target(sim.simulate(sim.SCENARIOS["all-slow"], seed=s), BUDGET) for s in SEEDS]
    show(capsys, "SIM all-slow: " + ", ".join(t.detail for t in loads))
    assert all(t.met for t in loads), loads  # <= budget + 1 %


@pytest.mark.parametrize(
    ("quantile", "budget"), [(0.9, 0.1), (0.95, 0.15), (0.5, 0.2), (0.99, 0.05), (0.75, 0.3)]
)
def test_steady_tails_against_the_best_fixed_stagger(
    quantile: float, budget: float, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's target: p99 <= 1.1x the best fixed stagger at equal or lower extra load in *every*
    run, whatever `quantile` and `hedge_budget` are. Over seeds 1-10 of each setting here (50 runs):
    1.00-1.08x, median 1.01x. Two policy gaps were behind the earlier 1.11x (and the 1.2-1.3x at
    (0.99, 0.05), a setting not tested before): the hedge bucket paid for re-measuring a third
    provider whose statistics had merely decayed (~2 % of requests: refusals, so stalls waited out 2 s),
    now only for news; and with 3 % stalls above the 1 - b/2 quantile the delay sat at the
    `TAIL_FACTOR` cap instead of the knee of the tail (`policy.knee`). `quantile` does not matter
    (the delay's quantile is 1 - budget/2); before this policy, (0.5, 0.2) was ~12x."""
    route = {"quantile": quantile, "hedge_budget": budget}
    runs = [sim.simulate(sim.SCENARIOS["steady"], seed=s, route=route) for s in SEEDS]
    rows = [sim.row(run) for run in runs]
    targets = [sim.steady_target(run, r) for run, r in zip(runs, rows, strict=True)]
    values = [t.value for t in targets]
    show(
        capsys,
        f"SIM steady quantile={quantile} budget={budget}: p99 / best fixed stagger at equal load "
        + ", ".join(f"{v:.3f}" for v in values)
        + f" (spread {min(values):.3f}-{max(values):.3f}, median {statistics.median(values):.3f})\n  "
        + "\n  ".join(t.detail for t in targets),
    )
    for r in rows:
        # the stagger is compared at extra load <= ours (found by bisection on the same draws), and
        # it is the best such: a smaller stagger would cost more than we spent
        assert r.stagger_extra <= r.extra + 1e-9, r
        assert r.stagger_d < sim.NO_STAGGER, r
    assert all(t.met for t in targets), values  # <= 1.1x in every run


def test_beats_the_finagle_anchor(capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 9's anchor: Finagle's power of two choices on peak-EWMA x (pending + 1) as the order,
    everything else (delay, budget, breakers, race) as ours. Ours has the lower p99 in steady tails and
    after an abrupt slowdown, on every seed (three here; `python -m hedge.sim` has the table)."""
    lines = []
    for seed in SEEDS[:3]:
        for name in ("steady", "slowdown"):
            s = sim.SCENARIOS[name]
            ours, anchor = sim.simulate(s, seed=seed), sim.simulate(s, seed=seed, policy=sim.p2c_policy)
            t0 = None if s.change_at is None else s.change_at + 1.0
            p_ours = sim.pct(sim.ttfts(sim.window(ours, t0)), 0.99)
            p_anchor = sim.pct(sim.ttfts(sim.window(anchor, t0)), 0.99)
            lines.append(
                f"seed {seed} {name}: p99 ours {p_ours * 1000:.0f} ms, P2C peak-EWMA {p_anchor * 1000:.0f} ms"
            )
            assert p_ours < p_anchor, lines[-1]
    show(capsys, "SIM against the Finagle anchor\n" + "\n".join(lines))
