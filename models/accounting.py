"""Privacy accounting for DP-SGD: ε of a history of steps, planning and noise calibration.

Plain functions over Opacus' accountants (RDP, PRV), so the site ledger, the
`medfed privacy` command and the tests all price a run the same way. A history
is Opacus' own: a list of ``(noise_multiplier, sample_rate, steps)`` segments,
composed in order. Every ε returned here is an *upper* bound on the true ε of
the Poisson-subsampled Gaussian mechanism; where Opacus' PRV accountant is
numerically fragile we fall back to a bound that is never lower than the truth.

A segment with ``q = 1`` is the plain Gaussian mechanism (a released, noised
histogram: the site's evaluation); it composes with the DP-SGD segments.

PRV quirks handled (Opacus 1.6, ``opacus.accountants.analysis.prv``):

* the error is *relative*: PRV's upper bound is its estimate plus ``eps_error``, and
  Opacus' fixed 0.01 makes a small ε loose by 50% or more; we price a coarse pass first
  and then ask for an error of :data:`PRV_EPS_RELATIVE_ERROR` of it (never below
  :data:`PRV_EPS_ERROR_FLOOR`), so PRV stays within about 0.5% of Google's PLD;
* all steps with ``q = 1``: the composition is exactly the Gaussian mechanism with
  ``μ = sqrt(Σ T_i / σ_i²)`` (μ-GDP), so we return the closed form; ``q = 1`` segments
  among subsampled ones get an exact Gaussian privacy random variable (Opacus' subsampled
  one takes ``log(1 - q)``, -inf there);
* very large ε (above :data:`PRV_MAX_EPSILON` by RDP): RDP is used there (no cap is that high);
* errors ("Discrete mean differs significantly", "Cannot compute epsilon", floating-point
  errors for tiny δ) or a non-finite result: RDP is used, with a warning;
* the result is ``min(PRV, RDP)``: both are upper bounds, so their minimum is one too.

Composition does not depend on order, so a history is priced with equal (σ, q)
segments merged: the lifetime history of a site (every run, every evaluation)
stays a handful of segments.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.optimize import brentq
from scipy.special import log_ndtr, ndtr

from models.training import planned_steps

log = logging.getLogger(__name__)

AccountantName = Literal["rdp", "prv"]
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
#: The accountant used where none is named: PRV, within 0.5% of Google's PLD (tests/models/test_privacy_accounting.py).
DEFAULT_ACCOUNTANT = "prv"
#: One segment of an Opacus history: (noise multiplier σ, sample rate q, steps T).
Segment = tuple[float, float, int]

#: Above this ε (by RDP) the PRV accountant is not run: no cap is that high, and RDP answers at once.
PRV_MAX_EPSILON = 500.0
#: Opacus' default additive error of the PRV estimate: the least error of our first, coarse pass ...
PRV_EPS_ERROR = 0.01
#: ... which may be up to this fraction of RDP's ε (it only sizes the final pass; a coarse mesh is fast).
PRV_COARSE_RELATIVE_ERROR = 0.01
#: The error asked of the final PRV pass, relative to the coarse ε: the upper bound is at most this much loose.
PRV_EPS_RELATIVE_ERROR = 0.003
#: ... but never below this (a finer mesh for a tiny ε costs memory and time, and 1e-4 of ε is nothing).
PRV_EPS_ERROR_FLOOR = 1e-4
#: A noise multiplier above this drowns the gradient; calibration refuses to go beyond it.
MAX_NOISE_MULTIPLIER = 20.0
#: RDP orders: Opacus' defaults (1.1 ... 63) plus larger ones, which tighten the bound for small ε
#: (Opacus' own list floors it near 0.1) and keep it a valid upper bound.
RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    + [64, 80, 96, 128, 160, 192, 256, 384, 512, 768, 1024]
)
#: Opacus' RDPAccountant.DEFAULT_ALPHAS are the first this many of RDP_ORDERS (checked by a test).
N_OPACUS_ORDERS = 99 + 52
#: Smallest noise multiplier `plan` considers (the search's lower end).
MIN_NOISE_MULTIPLIER = 0.05


class AccountingError(ValueError):
    """Bad accounting parameters, or a target that cannot be met; the message says what to change."""


def check_accountant(name: str) -> AccountantName:
    """Validate an accountant's name ("rdp" or "prv")."""
    if name not in ACCOUNTANTS:
        raise AccountingError(f"accountant must be one of {', '.join(ACCOUNTANTS)} (got {name!r})")
    return name  # type: ignore[return-value]


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise AccountingError(f"delta must lie strictly between 0 and 1 (got {delta})")


def _normalise(history: Iterable[Sequence[float]]) -> tuple[Segment, ...]:
    """Validated segments with steps > 0 (a zero-step segment spends nothing)."""
    out: list[Segment] = []
    for seg in history:
        if len(seg) != 3:
            raise AccountingError(f"a history segment is (noise_multiplier, sample_rate, steps), got {tuple(seg)}")
        sigma, q, steps = float(seg[0]), float(seg[1]), seg[2]
        if int(steps) != steps or steps < 0:
            raise AccountingError(f"steps must be a whole number >= 0 (got {steps})")
        if not 0.0 <= q <= 1.0:
            raise AccountingError(f"sample_rate must lie in [0, 1] (got {q})")
        if sigma < 0 or math.isnan(sigma):
            raise AccountingError(f"noise_multiplier must be >= 0 (got {sigma})")
        if int(steps) > 0 and q > 0:
            out.append((sigma, q, int(steps)))
    return tuple(out)


def gaussian_epsilon(mu: float, delta: float) -> float:
    """ε of a μ-GDP mechanism at δ (Dong, Roth & Su 2019, Cor. 2.13), solved numerically.

    δ(ε) = Φ(-ε/μ + μ/2) - e^ε Φ(-ε/μ - μ/2); the second term is evaluated in log space.
    """
    _check_delta(delta)
    if mu <= 0:
        return 0.0
    if math.isinf(mu):
        return math.inf

    def delta_of(eps: float) -> float:
        return float(ndtr(-eps / mu + mu / 2) - np.exp(eps + log_ndtr(-eps / mu - mu / 2)))

    if delta_of(0.0) <= delta:
        return 0.0
    hi = max(1.0, mu * mu)
    while delta_of(hi) > delta:
        hi *= 2.0
    return float(brentq(lambda e: delta_of(e) - delta, 0.0, hi, xtol=1e-12, rtol=1e-12))


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(sigma: float, q: float) -> np.ndarray:
    # RDP composes linearly in steps; one step's curve per (σ, q) is the costly part (fractional orders).
    from opacus.accountants.analysis import rdp as rdp_analysis

    curve = np.asarray(rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(RDP_ORDERS)))
    curve.flags.writeable = False  # shared through the cache
    return curve


def _rdp_epsilon(history: tuple[Segment, ...], delta: float, opacus_orders: bool = False) -> float:
    """RDP ε over our orders, or over Opacus' default orders only (the head of ours)."""
    from opacus.accountants.analysis import rdp as rdp_analysis

    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    n = N_OPACUS_ORDERS if opacus_orders else len(RDP_ORDERS)
    rdp = sum(t * _rdp_per_step(s, q)[:n] for s, q, t in history)
    with warnings.catch_warnings():
        # Opacus warns when the best order is at an end of the list; the bound is still valid there.
        warnings.simplefilter("ignore")
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(RDP_ORDERS[:n]), rdp=rdp, delta=delta)
    return max(0.0, float(eps))


class GaussianPRV:
    """Privacy random variable of the Gaussian mechanism (sensitivity 1, noise σ): N(μ²/2, μ²), μ = 1/σ.

    The ``q = 1`` segment Opacus' subsampled PRV cannot take; exact, so it composes with them.
    """

    def __init__(self, noise_multiplier: float) -> None:
        self.noise_multiplier = noise_multiplier
        self.sample_rate = 1.0
        self._mu = 1.0 / noise_multiplier

    def pdf(self, t):  # noqa: ANN001, ANN201 - numpy arrays in and out, as Opacus' PRVs
        mu = self._mu
        return np.exp(-((t - mu * mu / 2) ** 2) / (2 * mu * mu)) / (mu * math.sqrt(2 * math.pi))

    def cdf(self, t):  # noqa: ANN001, ANN201
        mu = self._mu
        return ndtr((t - mu * mu / 2) / mu)

    def rdp(self, alpha: float) -> float:
        return alpha / (2 * self.noise_multiplier**2)


def opacus_prv_upper(history: tuple[Segment, ...], delta: float, eps_error: float, delta_error: float) -> float:
    """Opacus' ``PRVAccountant.get_epsilon``, step for step, with its safe-domain RDP bounds cached.

    Why not call the accountant: ~90% of its time goes to RDP curves for the safe domain
    (Gopi et al., remark 5.6), recomputed on every call; calibration calls it a dozen
    times on nearly the same history. Same building blocks, same orders, same result
    (a ``q = 1`` segment uses :class:`GaussianPRV`, which Opacus lacks).
    """
    from opacus.accountants.analysis.prv import (
        Domain,
        PoissonSubsampledGaussianPRV,
        TruncatedPrivacyRandomVariable,
        compose_heterogeneous,
        discretize,
    )

    counts = [t for _, _, t in history]
    total = sum(counts)
    # compute_safe_domain_size: the RDP ε of the whole history at δ_err/4, and of one step of each segment.
    big = _rdp_epsilon(history, delta_error / 4, opacus_orders=True)
    for s, q, _ in history:
        big = max(big, _rdp_epsilon(((s, q, 1),), delta_error / (8 * total), opacus_orders=True))
    half_width = max(big, eps_error) + 3
    mesh = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
    domain = Domain.create_aligned(-half_width, half_width, mesh)
    dprvs = [
        discretize(TruncatedPrivacyRandomVariable(
            GaussianPRV(s) if q == 1.0 else PoissonSubsampledGaussianPRV(q, s),  # type: ignore[arg-type]
            domain.t_min, domain.t_max), domain)
        for s, q, _ in history
    ]
    composed = compose_heterogeneous(dprvs=dprvs, num_self_compositions=counts)
    _, _, upper = composed.compute_epsilon(delta, delta_error, eps_error)
    return float(upper)


def _prv_epsilon(history: tuple[Segment, ...], delta: float) -> float:
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    if all(q == 1.0 for _, q, _ in history):
        # Full-batch steps: exactly the Gaussian mechanism, μ² = Σ T/σ².
        return gaussian_epsilon(math.sqrt(sum(t / (s * s) for s, _, t in history)), delta)
    rdp = _rdp_epsilon(history, delta)
    if rdp > PRV_MAX_EPSILON:
        log.debug("epsilon %.1f (RDP) is above %g: PRV not run, RDP reported", rdp, PRV_MAX_EPSILON)
        return rdp
    try:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # A coarse pass (its error scaled to RDP's ε) sizes the error of the final one.
            coarse_error = max(PRV_EPS_ERROR, PRV_COARSE_RELATIVE_ERROR * rdp)
            coarse = opacus_prv_upper(history, delta, coarse_error, delta / 1000)
            eps_error = max(PRV_EPS_ERROR_FLOOR, PRV_EPS_RELATIVE_ERROR * min(coarse, rdp))
            eps = opacus_prv_upper(history, delta, eps_error, delta / 1000) if eps_error < coarse_error else coarse
    except (RuntimeError, ValueError, FloatingPointError, OverflowError, ZeroDivisionError) as err:
        log.warning("PRV accountant failed on %s at delta=%g (%s); using the RDP bound %.4f", history, delta, err, rdp)
        return rdp
    if not math.isfinite(eps):
        log.warning("PRV accountant gave %s on %s at delta=%g; using the RDP bound %.4f", eps, history, delta, rdp)
        return rdp
    return min(max(eps, 0.0), rdp)


def _merged(history: tuple[Segment, ...]) -> tuple[Segment, ...]:
    """Equal (σ, q) segments merged, in a canonical order: composition does not depend on order."""
    steps: dict[tuple[float, float], int] = {}
    for s, q, t in history:
        steps[(s, q)] = steps.get((s, q), 0) + t
    return tuple(sorted((s, q, t) for (s, q), t in steps.items()))


@functools.lru_cache(maxsize=4096)
def _epsilon_cached(history: tuple[Segment, ...], delta: float, accountant: str) -> float:
    # Cached: the ledger and calibration price the same history several times a round.
    if not history:
        return 0.0
    return _prv_epsilon(history, delta) if accountant == "prv" else _rdp_epsilon(history, delta)


def epsilon_of_history(history: Iterable[Sequence[float]], delta: float, accountant: str = DEFAULT_ACCOUNTANT) -> float:
    """ε after every segment of ``history`` (σ, q, T) at ``delta``; 0 for an empty history."""
    check_accountant(accountant)
    _check_delta(delta)
    return _epsilon_cached(_merged(_normalise(history)), float(delta), accountant)


def epsilon(sample_rate: float, noise_multiplier: float, steps: int, delta: float,
            accountant: str = DEFAULT_ACCOUNTANT) -> float:
    """ε of ``steps`` DP-SGD steps at sampling rate ``q`` and noise multiplier ``σ``."""
    return epsilon_of_history([(noise_multiplier, sample_rate, steps)], delta, accountant)


def make_accountant(accountant: str, history: Iterable[Sequence[float]] = ()):  # -> IAccountant
    """An Opacus accountant of the given kind holding ``history`` (for Opacus' optimizer hook)."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = PRVAccountant() if check_accountant(accountant) == "prv" else RDPAccountant()
    acc.history = [(float(s), float(q), int(t)) for s, q, t in history]
    return acc


def _round_up(x: float, digits: int = 4) -> float:
    """``x`` rounded *up* to ``digits`` significant digits (so rounds share one σ and Opacus merges them)."""
    if x <= 0:
        return x
    scale = 10 ** (digits - 1 - math.floor(math.log10(x)))
    return math.ceil(x * scale - 1e-9) / scale


def calibrate_noise(
    history: Iterable[Sequence[float]],
    sample_rate: float,
    steps_per_round: int,
    rounds_left: int,
    epsilon_cap: float,
    delta: float,
    accountant: str = DEFAULT_ACCOUNTANT,
    floor: float = MIN_NOISE_MULTIPLIER,
    ceiling: float = MAX_NOISE_MULTIPLIER,
    rtol: float = 2e-3,
    reserve: Iterable[Sequence[float]] = (),
) -> float:
    """The smallest σ ≥ ``floor`` such that ``rounds_left`` more rounds at (σ, q, steps) keep ε ≤ cap.

    ``reserve`` is spend still to come whatever σ is (the run's planned evaluations): it is
    priced in, so calibrating never leaves it unpayable. Brent's method (ε falls as σ grows);
    the result is rounded up to 4 significant digits and checked. Raises
    :class:`AccountingError`, with the ε numbers (never the data's size), when the ε already
    spent leaves no room or the σ needed is above ``ceiling``.
    """
    check_accountant(accountant)
    _check_delta(delta)
    search = _Calibration(_normalise(history), _normalise(reserve), sample_rate, steps_per_round, rounds_left,
                          epsilon_cap, delta, accountant, floor, ceiling, rtol)
    search.check_arguments()
    committed = search.check_room()
    if search.eps_at(floor) <= epsilon_cap:
        return floor
    last = search.warm_start()
    if last is not None:
        return last
    return search.solve(search.upper_bracket(committed))


@dataclass(frozen=True)
class _Calibration:
    """One :func:`calibrate_noise` problem, and its steps: the spend so far and reserved, the rounds to come
    at (q, steps) each, the cap, and the bounds and tolerance of the search for σ."""

    past: tuple[Segment, ...]
    later: tuple[Segment, ...]
    sample_rate: float
    steps_per_round: int
    rounds_left: int
    epsilon_cap: float
    delta: float
    accountant: str
    floor: float
    ceiling: float
    rtol: float

    def eps_at(self, sigma: float) -> float:
        """ε after the past, the reserve and the rounds left at noise multiplier ``sigma``."""
        steps = self.rounds_left * self.steps_per_round
        return epsilon_of_history(self.past + self.later + ((sigma, self.sample_rate, steps),), self.delta,
                                  self.accountant)

    def check_arguments(self) -> None:
        """Refuse a plan that makes no sense: no round left, negative steps, no noise, an empty σ range or cap."""
        if self.rounds_left < 1:
            raise AccountingError(f"rounds_left must be >= 1 (got {self.rounds_left})")
        if self.steps_per_round < 0:
            raise AccountingError(f"steps_per_round must be >= 0 (got {self.steps_per_round})")
        if self.floor <= 0:
            raise AccountingError(f"the noise floor must be > 0 (got {self.floor}): training here is always DP")
        if self.ceiling < self.floor:
            raise AccountingError(f"ceiling {self.ceiling} is below the floor {self.floor}")
        if self.epsilon_cap <= 0:
            raise AccountingError(f"epsilon_cap must be > 0 (got {self.epsilon_cap})")

    def check_room(self) -> float:
        """ε spent and reserved already; refuse when it leaves no room under the cap, saying what to change."""
        spent = epsilon_of_history(self.past, self.delta, self.accountant)
        later = self.later
        committed = epsilon_of_history(self.past + later, self.delta, self.accountant) if later else spent
        if committed >= self.epsilon_cap:
            reserved = f" ({committed:.4g} with the planned evaluations reserved)" if later else ""
            fix = "raise the cap"
            if later and spent < self.epsilon_cap:
                fix = ("raise the cap, or raise the site's evaluation-noise, or plan fewer evaluated rounds "
                       "(num-server-rounds, fraction-evaluate = 0)")
            raise AccountingError(
                f"epsilon {spent:.4g} is already spent{reserved}, at or over the cap {self.epsilon_cap:g} "
                f"(delta={self.delta:g}): no noise multiplier lets another round in; {fix}"
            )
        return committed

    def warm_start(self) -> float | None:
        """The σ of the last round at this q when it still meets the cap and no smaller step would.

        A run calibrated last round needs (almost) the same σ now; two checks confirm it.
        """
        last = next((s for s, q, _ in reversed(self.past) if q == self.sample_rate), None)
        if last is None or last <= self.floor:
            return None
        return last if self.eps_at(last) <= self.epsilon_cap < self.eps_at(last / (1 + self.rtol)) else None

    def upper_bracket(self, committed: float) -> float:
        """A σ that meets the cap, to search below: RDP's answer under PRV, else the ceiling if it suffices.

        RDP is never below our PRV figure (we keep the smaller of the two), so the σ that meets the
        cap by RDP brackets PRV's from above, cheaply.
        """
        if self.accountant == "prv":
            try:
                return calibrate_noise(self.past, self.sample_rate, self.steps_per_round, self.rounds_left,
                                       self.epsilon_cap, self.delta, "rdp", self.floor, self.ceiling, self.rtol,
                                       self.later)
            except AccountingError:
                pass  # RDP sees no room where PRV may: search up to the ceiling by PRV
        if self.eps_at(self.ceiling) > self.epsilon_cap:
            raise AccountingError(
                f"even noise multiplier {self.ceiling:g} (the most that still lets the model learn) spends epsilon "
                f"{self.eps_at(self.ceiling):.4g} > cap {self.epsilon_cap:g} over {self.rounds_left} round(s) "
                f"(delta={self.delta:g}, {committed:.4g} already spent or reserved); raise the cap, or lower "
                "num-server-rounds or local-epochs, or raise batch-size"
            )
        return self.ceiling

    def solve(self, hi: float) -> float:
        """Brent's method on ε(σ) - cap in [floor, hi], rounded up to 4 digits and stepped up until the cap holds.

        ε is smooth and falling in σ, so a handful of evaluations do; the root may sit a hair below
        the σ that meets the cap.
        """
        cap, rtol = self.epsilon_cap, self.rtol
        root = float(brentq(lambda s: self.eps_at(s) - cap, self.floor, hi, xtol=1e-4, rtol=rtol / 4))
        sigma = _round_up(root)
        for _ in range(20):
            if self.eps_at(sigma) <= cap:
                return sigma
            sigma = _round_up(sigma * (1 + rtol / 4) + 1e-4)
        raise AccountingError(f"calibration did not converge for cap {cap:g}; try the rdp accountant")


@dataclass(frozen=True)
class Plan:
    """What `plan` found: the noise multiplier and what the run then spends."""

    noise_multiplier: float
    epsilon: float
    delta: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    accountant: str

    @property
    def steps(self) -> int:
        return self.steps_per_round * self.rounds


def plan(
    target_epsilon: float,
    delta: float,
    dataset_size: int,
    batch_size: int,
    rounds: int,
    local_epochs: int,
    accountant: str = DEFAULT_ACCOUNTANT,
) -> Plan:
    """The smallest noise multiplier that keeps a whole run (R rounds of L local epochs) within ε."""
    if dataset_size < 1 or batch_size < 1 or rounds < 1 or local_epochs < 1:
        raise AccountingError(
            f"dataset size, batch size, rounds and local epochs must all be >= 1 "
            f"(got {dataset_size}, {batch_size}, {rounds}, {local_epochs})"
        )
    if delta >= 1.0 / dataset_size:
        raise AccountingError(
            f"delta={delta:g} is not below 1/n = 1/{dataset_size}: a mechanism that leaks one record outright "
            f"with that probability would pass; choose delta below {1.0 / dataset_size:.2g}"
        )
    steps, q = planned_steps(dataset_size, batch_size, local_epochs)
    sigma = calibrate_noise((), q, steps, rounds, target_epsilon, delta, accountant,
                            floor=MIN_NOISE_MULTIPLIER, ceiling=1000.0)
    eps = epsilon_of_history([(sigma, q, steps * rounds)], delta, accountant)
    return Plan(noise_multiplier=sigma, epsilon=eps, delta=delta, sample_rate=q, steps_per_round=steps,
                rounds=rounds, accountant=accountant)
