"""Our ε against an independent accountant (Google's dp-accounting PLD) and the Gaussian closed form.

``python -m tests.models.test_privacy_accounting`` prints the cross-check table the README shows.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
import time

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant

from models.accounting import (
    DEFAULT_ACCOUNTANT,
    PRV_EPS_ERROR,
    PRV_MAX_EPSILON,
    AccountingError,
    calibrate_noise,
    epsilon,
    epsilon_of_history,
    gaussian_epsilon,
    plan,
)
from models.training import planned_steps

#: Fine enough that PLD's pessimistic rounding adds < 1e-3 to ε, coarse enough to stay fast.
PLD_INTERVAL = 1e-4
GRID = list(itertools.product([0.01, 0.1, 0.5], [1.0, 2.5], [1, 40, 400], [1e-5])) + [
    (0.05, 1.0, 100, 1e-3), (0.02, 4.0, 200, 1e-3), (0.3, 1.2, 20, 1e-6),
]


def pld_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Google's PLD accountant (pessimistic estimate) on the same Poisson-subsampled Gaussian steps."""
    acc = PLDAccountant(value_discretization_interval=PLD_INTERVAL)
    for sigma, q, steps in history:
        event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(sigma)
        if q < 1:
            event = dp_accounting.PoissonSampledDpEvent(q, event)
        acc.compose(event, steps)
    return float(acc.get_epsilon(delta))


def test_prv_within_two_percent_of_pld_and_never_below() -> None:
    rows = []
    for q, sigma, steps, delta in GRID:
        ref = pld_epsilon([(sigma, q, steps)], delta)
        rdp, prv = epsilon(q, sigma, steps, delta, "rdp"), epsilon(q, sigma, steps, delta, "prv")
        rows.append((q, sigma, steps, delta, rdp, prv, ref))
    low = [r for r in rows if min(r[4], r[5]) < 0.99 * r[6]]
    assert not low, f"below PLD by more than 1% (q, σ, T, δ, rdp, prv, pld): {low}"
    # tight everywhere on the grid, small ε included: a relative error, no additive slack
    loose = [r for r in rows if r[5] > 1.02 * r[6]]
    assert not loose, f"PRV above 1.02 x PLD (q, σ, T, δ, rdp, prv, pld): {loose}"
    assert all(r[5] <= r[4] for r in rows)  # PRV never looser than RDP: we keep the smaller bound
    assert DEFAULT_ACCOUNTANT == "prv"


def test_heterogeneous_history_against_pld() -> None:
    # Rounds at different σ and q (e.g. noise calibration, a site whose data grew) compose.
    history = [(1.0, 0.1, 30), (1.6, 0.1, 30), (0.9, 0.08, 40)]
    ref = pld_epsilon(history, 1e-5)
    for accountant in ("rdp", "prv"):
        ours = epsilon_of_history(history, 1e-5, accountant)
        assert ours >= 0.99 * ref, accountant
        assert ours > epsilon_of_history(history[:2], 1e-5, accountant)
    assert epsilon_of_history(history, 1e-5, "prv") <= 1.02 * ref


@pytest.mark.parametrize("history", [
    [(1.0, 0.1, 300), (10.0, 1.0, 20)],                      # a run and its 20 evaluations
    [(1.2, 0.3, 60), (10.0, 1.0, 20), (1.5, 0.3, 30)],       # two runs on one site, evaluations between
    [(10.0, 1.0, 1), (2.5, 0.01, 1)],                        # small ε: one evaluation, one light step
])
def test_evaluations_compose_with_training_as_pld_says(history: list[tuple[float, float, int]]) -> None:
    # An evaluation is the plain Gaussian mechanism (q = 1) between subsampled DP-SGD segments.
    ref = pld_epsilon(history, 1e-5)
    prv = epsilon_of_history(history, 1e-5, "prv")
    assert 0.99 * ref <= prv <= 1.02 * ref
    assert epsilon_of_history(history, 1e-5, "rdp") >= 0.99 * ref
    # composition does not depend on order: the ledger may price runs in any order
    assert epsilon_of_history(list(reversed(history)), 1e-5, "prv") == prv


@pytest.mark.parametrize(
    ("sigma", "steps", "delta"), [(1.0, 1, 1e-5), (2.0, 10, 1e-5), (5.0, 100, 1e-3), (0.8, 3, 1e-6)]
)
def test_full_batch_equals_gaussian_closed_form(sigma: float, steps: int, delta: float) -> None:
    mu = math.sqrt(steps) / sigma
    closed = gaussian_epsilon(mu, delta)
    # the closed form solves δ = Φ(-ε/μ + μ/2) - e^ε Φ(-ε/μ - μ/2) ...
    from scipy.stats import norm

    assert norm.cdf(-closed / mu + mu / 2) - math.exp(closed) * norm.cdf(-closed / mu - mu / 2) == pytest.approx(
        delta, rel=1e-6)
    # ... and an independent implementation agrees
    assert closed == pytest.approx(pld_epsilon([(sigma, 1.0, steps)], delta), rel=2e-3)
    assert epsilon(1.0, sigma, steps, delta, "prv") == pytest.approx(closed, rel=1e-9)
    assert epsilon(1.0, sigma, steps, delta, "rdp") >= closed  # RDP is an upper bound, looser at q = 1
    # full-batch rounds at different σ compose as one Gaussian with μ² = Σ T/σ²
    mixed = epsilon_of_history([(sigma, 1.0, steps), (2 * sigma, 1.0, 4 * steps)], delta, "prv")
    assert mixed == pytest.approx(gaussian_epsilon(math.sqrt(2 * steps) / sigma, delta), rel=1e-9)


def test_prv_is_opacus_prv_and_rdp_widens_opacus_orders() -> None:
    # We run Opacus' PRV computation step by step (to cache its RDP curves): at Opacus' own error it gives
    # Opacus' number; our ε asks for a relative error (0.3% of ε), so it stays close to Opacus' and above PLD.
    from opacus.accountants import PRVAccountant, RDPAccountant

    from models.accounting import N_OPACUS_ORDERS, RDP_ORDERS, opacus_prv_upper

    history = [(1.2, 0.1, 30), (1.5, 0.1, 50)]
    acc = PRVAccountant()
    acc.history = list(history)
    opacus = acc.get_epsilon(1e-5)
    assert opacus_prv_upper(tuple(history), 1e-5, PRV_EPS_ERROR, 1e-5 / 1000) == opacus
    assert 0.99 * pld_epsilon(history, 1e-5) <= epsilon_of_history(history, 1e-5, "prv") <= 1.005 * opacus
    assert list(RDP_ORDERS[:N_OPACUS_ORDERS]) == RDPAccountant.DEFAULT_ALPHAS
    rdp = RDPAccountant()
    rdp.history = list(history)
    assert epsilon_of_history(history, 1e-5, "rdp") <= rdp.get_epsilon(1e-5)


def test_history_splits_compose_exactly_under_rdp() -> None:
    whole = epsilon(0.1, 1.0, 100, 1e-5, "rdp")
    assert epsilon_of_history([(1.0, 0.1, 60), (1.0, 0.1, 40)], 1e-5, "rdp") == pytest.approx(whole, rel=1e-12)
    assert epsilon_of_history([], 1e-5, "prv") == 0.0 == epsilon(0.1, 1.0, 0, 1e-5)
    assert epsilon(0.1, 0.0, 10, 1e-5) == math.inf  # no noise, no privacy


def test_prv_failures_fall_back_to_rdp(caplog: pytest.LogCaptureFixture) -> None:
    # δ = 1e-16: Opacus' PRV refuses ("floating point errors will dominate"); RDP answers.
    with caplog.at_level(logging.WARNING, logger="models.accounting"):
        eps = epsilon(0.1, 1.0, 100, 1e-16, "prv")
    assert eps == epsilon(0.1, 1.0, 100, 1e-16, "rdp")
    assert "PRV accountant failed" in caplog.text
    # far above any sensible cap PRV is slow and returns inf; the RDP bound is used
    big = epsilon(0.5, 0.6, 2000, 1e-5, "prv")
    assert big == epsilon(0.5, 0.6, 2000, 1e-5, "rdp") and big > PRV_MAX_EPSILON
    # tiny ε: PRV's upper bound carries its error (at least PRV_EPS_ERROR_FLOOR), so it is safe
    assert epsilon(0.001, 8.0, 1, 1e-5, "prv") >= pld_epsilon([(8.0, 0.001, 1)], 1e-5) > 0


def test_bad_parameters_are_refused_with_the_field() -> None:
    with pytest.raises(AccountingError, match="accountant must be one of"):
        epsilon(0.1, 1.0, 10, 1e-5, "gdp")
    with pytest.raises(AccountingError, match="delta"):
        epsilon(0.1, 1.0, 10, 1.5)
    with pytest.raises(AccountingError, match="sample_rate"):
        epsilon(1.5, 1.0, 10, 1e-5)
    with pytest.raises(AccountingError, match="steps"):
        epsilon(0.1, 1.0, 2.5, 1e-5)  # type: ignore[arg-type]


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibrate_noise_is_the_smallest_sigma_within_the_cap(accountant: str) -> None:
    past = [(1.2, 0.1, 30)]
    sigma = calibrate_noise(past, 0.1, 10, 5, 4.0, 1e-5, accountant, floor=0.5)
    assert epsilon_of_history(past + [(sigma, 0.1, 50)], 1e-5, accountant) <= 4.0
    # 1% less noise would overspend: it is (nearly) the smallest
    assert epsilon_of_history(past + [(sigma * 0.99, 0.1, 50)], 1e-5, accountant) > 4.0
    # a high floor is returned as is when it already fits
    assert calibrate_noise(past, 0.1, 10, 5, 4.0, 1e-5, accountant, floor=3.0) == 3.0


def test_calibrate_noise_says_why_it_cannot() -> None:
    with pytest.raises(AccountingError, match=r"already spent.*cap 1"):
        calibrate_noise([(0.8, 0.1, 100)], 0.1, 10, 3, 1.0, 1e-5)
    with pytest.raises(AccountingError, match=r"even noise multiplier 20 .* cap 0.01 over 50 round"):
        calibrate_noise([], 0.5, 2, 50, 0.01, 1e-5)
    # reserved evaluations that alone fill the cap leave no room
    with pytest.raises(AccountingError, match=r"with the planned evaluations reserved"):
        calibrate_noise([], 0.1, 10, 3, 0.5, 1e-5, reserve=[(1.0, 1.0, 3)])


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibration_reserves_the_planned_evaluations(accountant: str) -> None:
    # The σ leaves room for the evaluations still to come: training plus them meets the cap, no more.
    reserve = [(10.0, 1.0, 5)]
    plain = calibrate_noise([], 0.1, 10, 5, 3.0, 1e-5, accountant, floor=0.5)
    sigma = calibrate_noise([], 0.1, 10, 5, 3.0, 1e-5, accountant, floor=0.5, reserve=reserve)
    assert sigma > plain
    assert epsilon_of_history([(sigma, 0.1, 50)] + reserve, 1e-5, accountant) <= 3.0
    assert epsilon_of_history([(plain, 0.1, 50)] + reserve, 1e-5, accountant) > 3.0


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_plan_meets_the_target_tightly(accountant: str) -> None:
    p = plan(3.0, 1e-5, dataset_size=300, batch_size=32, rounds=10, local_epochs=2, accountant=accountant)
    steps, q = planned_steps(300, 32, 2)
    assert (p.steps_per_round, p.sample_rate, p.steps) == (steps, q, 10 * steps)
    assert p.epsilon == pytest.approx(epsilon(q, p.noise_multiplier, 10 * steps, 1e-5, accountant))
    assert 0.97 * 3.0 <= p.epsilon <= 3.0
    with pytest.raises(AccountingError, match=r"not below 1/n = 1/300"):
        plan(3.0, 1 / 200, 300, 32, 10, 2)


def _table(grid: list[tuple[float, float, int, float]]) -> None:
    print("| q | σ | T | δ | ε RDP (ours) | ε PRV (ours) | ε PLD (dp-accounting) | PRV / PLD |")
    print("|---|---|---|---|---|---|---|---|")
    for q, sigma, steps, delta in grid:
        rdp, prv = epsilon(q, sigma, steps, delta, "rdp"), epsilon(q, sigma, steps, delta, "prv")
        ref = pld_epsilon([(sigma, q, steps)], delta)
        print(f"| {q:g} | {sigma:g} | {steps} | {delta:g} | {rdp:.4f} | {prv:.4f} | {ref:.4f} | {prv / ref:.3f} |")


if __name__ == "__main__":
    t0 = time.monotonic()
    _table(GRID + [(1.0, s, t, 1e-5) for s, t in [(1.0, 1), (2.0, 10), (5.0, 100)]])
    print(f"({time.monotonic() - t0:.0f}s)", file=sys.stderr)
