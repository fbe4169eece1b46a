"""Site-level differential privacy (the second layer over each site's record-level DP-SGD).

The coordinator wraps its strategy in one of Flower's DP wrappers — client-side
fixed clipping (with ``fixedclipping_mod`` at the sites), server-side fixed or
adaptive clipping — and reports the resulting *site-level* ε: how much the
released models can reveal about whether a whole hospital took part.

The neighbouring relation follows from how sites are sampled each round:

- ``poisson``: every site joins a round independently with probability q (our
  strategy samples so, and divides by the *expected* number of sites qN).
  Neighbouring federations differ by adding or removing one site. Accounted
  with Opacus' RDP accountant for the Poisson-subsampled Gaussian mechanism.
- ``fixed``: m of the N sites are sampled without replacement (Flower's own
  sampler; m = N for fraction 1.0). N is public, so neighbours differ by
  *replacing* one site's data, which moves the clipped sum by up to 2C: the
  Gaussian mechanism has noise multiplier σ/2 relative to that sensitivity.
  Accounted with Google's dp-accounting RDP accountant (replace-one relation,
  sampling without replacement: Wang, Balle & Kasiviswanathan 2019). About
  twice the Poisson figure for moderate ε (more when ε is large).

Only rounds that released a model count (Flower's wrappers skip a round in
which a sampled site failed or declined: nothing is published then).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from medfed.settings import RunConfig

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy

#: RDP orders: Opacus' defaults extended, so both accountants search the same grid.
ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512])


def epsilon_poisson(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """Site-level ε with Poisson sampling of sites (add/remove one site), Opacus RDP."""
    from opacus.accountants import RDPAccountant

    _check(noise_multiplier, rounds, delta)
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample rate {sample_rate} must be in (0, 1]")
    if rounds == 0:
        return 0.0
    acc = RDPAccountant()
    acc.history = [(noise_multiplier, sample_rate, rounds)]
    return float(acc.get_epsilon(delta, alphas=list(ORDERS)))


def epsilon_fixed(noise_multiplier: float, sample_size: int, num_sites: int, rounds: int, delta: float) -> float:
    """Site-level ε with m of N sites sampled without replacement (replace one site), dp-accounting RDP."""
    import dp_accounting as dpa
    from dp_accounting.rdp import RdpAccountant

    _check(noise_multiplier, rounds, delta)
    if not 1 <= sample_size <= num_sites:
        raise ValueError(f"sample size {sample_size} must be between 1 and the number of sites {num_sites}")
    if rounds == 0:
        return 0.0
    # Replacing one site moves the clipped sum by up to 2C: noise multiplier sigma/2 relative to that.
    base = dpa.GaussianDpEvent(noise_multiplier / 2.0)
    event = base if sample_size == num_sites else dpa.SampledWithoutReplacementDpEvent(
        source_dataset_size=num_sites, sample_size=sample_size, event=base)
    acc = RdpAccountant(orders=list(ORDERS), neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    acc.compose(dpa.SelfComposedDpEvent(event, rounds))
    return float(acc.get_epsilon(delta))


def _check(noise_multiplier: float, rounds: int, delta: float) -> None:
    if noise_multiplier <= 0:
        raise ValueError("site-level DP needs a noise multiplier > 0")
    if rounds < 0:
        raise ValueError("rounds must be >= 0")
    if not 0.0 < delta < 1.0:
        raise ValueError("delta must be in (0, 1)")


@dataclass
class SiteDPPlan:
    """How site-level DP runs for this federation, and how it is accounted."""

    mode: str                 # client-fixed | server-fixed | server-adaptive
    sampling: str             # fixed | poisson
    num_sites: int            # N: sites in the federation when the run started
    sample_size: int          # m (fixed) — or the expected number qN rounded (poisson)
    sample_rate: float        # q = m/N (fixed) or the Poisson probability
    noise_multiplier: float   # effective σ of the whole release (adaptive: update and count together)
    clipping_norm: float
    delta: float

    @property
    def relation(self) -> str:
        return "add/remove one site" if self.sampling == "poisson" else "replace one site"

    @property
    def expected_sites(self) -> float:
        """The denominator the noise is calibrated to: m, or qN with Poisson sampling."""
        return self.sample_rate * self.num_sites if self.sampling == "poisson" else float(self.sample_size)

    def epsilon(self, rounds_released: int) -> float:
        if self.sampling == "poisson":
            return epsilon_poisson(self.noise_multiplier, self.sample_rate, rounds_released, self.delta)
        return epsilon_fixed(self.noise_multiplier, self.sample_size, self.num_sites, rounds_released, self.delta)

    def report(self, rounds_released: int) -> dict[str, Any]:
        """What metrics.json and the summary show."""
        eps = self.epsilon(rounds_released)
        return {
            "mode": self.mode, "sampling": self.sampling, "neighbouring": self.relation,
            "num_sites": self.num_sites, "sample_size": self.sample_size, "sample_rate": self.sample_rate,
            "noise_multiplier": self.noise_multiplier, "clipping_norm": self.clipping_norm,
            "delta": self.delta, "rounds_released": rounds_released,
            "epsilon": None if math.isinf(eps) else eps,
            "accountant": "opacus-rdp" if self.sampling == "poisson" else "dp-accounting-rdp (replace-one, WOR)",
        }


def plan(cfg: RunConfig, num_sites: int) -> SiteDPPlan | None:
    """The run's site-level DP plan for ``num_sites`` connected sites (None when site-dp is off)."""
    if cfg.site_dp == "off":
        return None
    if cfg.site_sampling == "poisson":
        q = cfg.fraction_train
        m = max(1, round(q * num_sites))
    else:
        m = min(num_sites, max(int(num_sites * cfg.fraction_train), cfg.min_train_nodes))
        q = m / num_sites
    return SiteDPPlan(mode=cfg.site_dp, sampling=cfg.site_sampling, num_sites=num_sites, sample_size=m,
                      sample_rate=q, noise_multiplier=cfg.site_dp_noise_multiplier,
                      clipping_norm=cfg.site_dp_clipping_norm, delta=cfg.site_dp_delta)


def wrap(strategy: Strategy, cfg: RunConfig, p: SiteDPPlan) -> Strategy:
    """``strategy`` inside the Flower DP wrapper the run config asks for."""
    from flwr.serverapp.strategy import (
        DifferentialPrivacyClientSideFixedClipping,
        DifferentialPrivacyServerSideAdaptiveClipping,
        DifferentialPrivacyServerSideFixedClipping,
    )

    denom = p.expected_sites
    if p.mode == "client-fixed":
        return DifferentialPrivacyClientSideFixedClipping(strategy, p.noise_multiplier, p.clipping_norm,
                                                          denom)  # type: ignore[arg-type]
    if p.mode == "server-fixed":
        return DifferentialPrivacyServerSideFixedClipping(strategy, p.noise_multiplier, p.clipping_norm,
                                                          denom)  # type: ignore[arg-type]
    # Adaptive (Andrew et al. 2019): Flower splits σ between the update and the clipped-count query so
    # that the two together have noise multiplier σ; the count's σ_b must exceed σ/2 — we use max(m/20, σ).
    return DifferentialPrivacyServerSideAdaptiveClipping(
        strategy, p.noise_multiplier, denom,  # type: ignore[arg-type]
        initial_clipping_norm=p.clipping_norm, target_clipped_quantile=cfg.site_dp_target_quantile,
        clip_norm_lr=cfg.site_dp_clip_lr, clipped_count_stddev=max(denom / 20.0, p.noise_multiplier))
