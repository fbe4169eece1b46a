"""What a site does in a round, as plain functions the tests call without Flower.

``train_round`` checks the privacy budget before training, trains with DP-SGD
against the run's single accountant, commits the spend to the ledger, and only
then hands back the update. ``evaluate_round`` scores the global model on the
site's own test split.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from anonymization.audit import AuditTrail, open_trail
from anonymization.audit_keys import SIGNING_KEY_NAME
from medfed.settings import RunConfig, SiteConfig
from models.dataset import ManifestDataset
from models.evaluation import evaluate
from models.network import build_model
from models.accounting import MAX_NOISE_MULTIPLIER, AccountingError, calibrate_noise
from models.training import DPSettings, planned_steps, round_lr, train_local
from site_client.ledger import LedgerError, PrivacyLedger
from site_client.secagg import range_problem
from site_client.trail import audit_for  # noqa: F401 - re-exported; light for the egress guard

log = logging.getLogger(__name__)


class SiteRefusal(Exception):
    """The site will not take part as asked (bad privacy settings); the message says why."""


@dataclass
class TrainReply:
    """A site's answer to a train request: an update, or a decline with its reason."""

    state_dict: dict[str, torch.Tensor] | None
    metrics: dict[str, float] = field(default_factory=dict)
    declined: str | None = None


@functools.lru_cache(maxsize=8)
def _dataset(data_dir: str, split: str, image_size: int) -> ManifestDataset:
    # Cached per process: a simulation actor or SuperNode serves many rounds.
    return ManifestDataset(Path(data_dir), split=split, image_size=image_size)  # type: ignore[arg-type]


def ledger_for(site: SiteConfig) -> PrivacyLedger:
    """The site's privacy ledger in its state folder."""
    return PrivacyLedger(site.state_dir / "privacy-ledger.sqlite")


def _optimizer_state_path(site: SiteConfig, run_id: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in run_id) or "run"
    return site.state_dir / "optimizer-state" / f"{safe}.pt"


def load_optimizer_state(site: SiteConfig, run_id: str) -> dict[str, object]:
    """The site's optimizer state from its last round of this run (empty at the first).

    Kept on the site's own disk, never sent: Adam's moments let each round go on
    where the last stopped instead of re-warming, which DP training needs most.
    """
    path = _optimizer_state_path(site, run_id)
    if not path.exists():
        return {}
    try:
        return dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as err:  # noqa: BLE001 - a torn file costs only warm-up, never privacy
        log.warning("optimizer state %s unreadable (%s); this round starts a fresh optimizer", path, err)
        return {}


def save_optimizer_state(site: SiteConfig, run_id: str, state: dict[str, object]) -> None:
    """Write atomically (temporary name, then rename), so a crash leaves the last good state."""
    path = _optimizer_state_path(site, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def update_summary(state: dict[str, torch.Tensor]) -> dict[str, object]:
    """What an update puts on the wire (names, shapes, dtypes, bytes, SHA-256) for the audit trail.

    Packed as the ClientApp sends it (medfed.wire), serialized as Flower's ArrayRecord does and
    hashed as the egress guard hashes, so the round's record and the egress record of the reply
    carry the same digest.
    """
    from medfed.wire import pack, summarize  # Flower's types; the training itself never needs them

    return summarize(pack(state))


def model_template(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """This site's network for the run (names, shapes, dtypes): what an arriving model is cut back into."""
    return build_model(cfg.image_size).state_dict()


def _device(cfg: RunConfig) -> str:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SiteRefusal("run config asks for device=cuda but this site has no CUDA device; use device=cpu")
    return cfg.device


def _round_noise(
    site: SiteConfig, cfg: RunConfig, ledger: PrivacyLedger, run_id: str, server_round: int, n: int, steps: int,
    q: float,
) -> tuple[float, str | None]:
    """The noise multiplier this round trains at, or (floor, reason) to decline it.

    Raises :class:`SiteRefusal` before the run's first spend when the run cannot meet the
    site's cap at all (one round at the floor σ crosses it, or calibration needs an absurd σ).
    """
    history = ledger.history(run_id)
    sigma = cfg.noise_multiplier
    rounds_left = max(1, cfg.num_server_rounds - server_round + 1)
    where = (f"site {site.name} (n={n}, sample rate {q:.4g}, {steps} step(s)/round, "
             f"cap {site.epsilon_cap:g}, delta={site.delta:g}, accountant {cfg.accountant})")
    if cfg.calibrate_noise:
        try:
            return calibrate_noise(history, q, steps, rounds_left, site.epsilon_cap, site.delta, cfg.accountant,
                                   floor=cfg.noise_multiplier, ceiling=max(MAX_NOISE_MULTIPLIER, sigma)), None
        except AccountingError as err:
            if not history:
                raise SiteRefusal(f"{where} refuses the run: calibrate-noise over {rounds_left} round(s): {err}") from None
            return sigma, f"site {site.name} declines round {server_round}: calibrate-noise: {err}"
    if not history and ledger.project(run_id, noise_multiplier=sigma, sample_rate=q, steps=steps,
                                      delta=site.delta) > site.epsilon_cap:
        one = ledger.project(run_id, noise_multiplier=sigma, sample_rate=q, steps=steps, delta=site.delta)
        hints = []
        for rounds in sorted({1, rounds_left}):
            try:
                need = calibrate_noise((), q, steps, rounds, site.epsilon_cap, site.delta, cfg.accountant, floor=sigma)
                hints.append(f"noise-multiplier >= {need:g} fits {rounds} round(s)")
            except AccountingError:
                most = ledger.project(run_id, noise_multiplier=MAX_NOISE_MULTIPLIER, sample_rate=q,
                                      steps=steps * rounds, delta=site.delta)
                hints.append(f"even noise-multiplier {MAX_NOISE_MULTIPLIER:g} spends epsilon {most:.3g} in "
                             f"{rounds} round(s)")
        raise SiteRefusal(
            f"{where} refuses the run: one round at noise-multiplier {sigma:g} alone spends epsilon {one:.4g}, over "
            f"the cap; {'; '.join(hints)}. Raise noise-multiplier (or set calibrate-noise = true), lower "
            "local-epochs or raise batch-size, or raise the site's epsilon-cap"
        )
    return sigma, None


def train_round(
    site: SiteConfig,
    cfg: RunConfig,
    run_id: str,
    server_round: int,
    global_state: dict[str, torch.Tensor],
    before_commit: Callable[[dict[str, torch.Tensor]], None] | None = None,
) -> TrainReply:
    """One round of local DP-SGD, or a decline if it would cross the site's ε cap.

    ``before_commit`` gets the update just before its spend is committed (site_client.replay keeps it).
    """
    dataset = _dataset(str(site.data_dir), "train", cfg.image_size)
    n = len(dataset)
    if site.delta >= 1.0 / n:
        raise SiteRefusal(
            f"delta={site.delta:g} is not below 1/n = 1/{n}; set the site's delta below {1.0 / n:.2g}"
        )
    if cfg.noise_multiplier <= 0:
        raise SiteRefusal("noise-multiplier must be > 0: this site trains only with differential privacy")
    if cfg.secagg:  # before any spend: refuse a model SecAgg+ would already clip (the update is checked again)
        problem = range_problem((v.detach().cpu().numpy() for v in global_state.values()),
                                1 if cfg.secagg_uniform_weights else n, cfg.secagg_weight_bound,
                                cfg.secagg_clipping_range)
        if problem is not None:
            raise SiteRefusal(f"{problem} (nothing was spent)")

    ledger = ledger_for(site)
    try:
        ledger.open_account(run_id, cfg.accountant)  # the run's accountant, fixed from its first round
    except LedgerError as err:
        raise SiteRefusal(str(err)) from None
    audit = audit_for(site)
    audit.record_policy("privacy", {"site": site.name, "epsilon_cap": site.epsilon_cap, "delta": site.delta})
    steps, sample_rate = planned_steps(n, cfg.batch_size, cfg.local_epochs)
    eps_before = ledger.epsilon(run_id, site.delta)
    try:
        sigma, decline = _round_noise(site, cfg, ledger, run_id, server_round, n, steps, sample_rate)
    except SiteRefusal as err:  # the ledger says why this run spent nothing here
        ledger.record_decline(
            run_id, server_round, reason=str(err), epsilon_before=eps_before,
            epsilon_projected=ledger.project(run_id, noise_multiplier=cfg.noise_multiplier, sample_rate=sample_rate,
                                             steps=steps, delta=site.delta),
            epsilon_cap=site.epsilon_cap, steps=steps, sample_rate=sample_rate, noise_multiplier=cfg.noise_multiplier,
        )
        raise
    eps_projected = ledger.project(
        run_id, noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=site.delta
    )
    if decline is not None or eps_projected > site.epsilon_cap:
        reason = decline or (
            f"site {site.name} declines round {server_round}: it would spend epsilon "
            f"{eps_before:.3f} -> {eps_projected:.3f}, over its cap of {site.epsilon_cap:g} (delta={site.delta:g})"
        )
        ledger.record_decline(
            run_id, server_round, reason=reason, epsilon_before=eps_before, epsilon_projected=eps_projected,
            epsilon_cap=site.epsilon_cap, steps=steps, sample_rate=sample_rate,
            noise_multiplier=sigma,
        )
        audit.append(
            "round_declined", run_id=run_id, server_round=server_round, epsilon_before=eps_before,
            epsilon_projected=eps_projected, epsilon_cap=site.epsilon_cap, delta=site.delta, steps=steps,
            sample_rate=sample_rate, noise_multiplier=sigma, max_grad_norm=cfg.max_grad_norm,
            declined=True, reason=reason,
        )
        audit.close()  # seals the round
        log.info(reason)
        return TrainReply(state_dict=None, declined=reason)

    model = build_model(cfg.image_size)
    model.load_state_dict(global_state)
    accountant = ledger.accountant(run_id, cfg.accountant)
    opt_state = load_optimizer_state(site, run_id) if cfg.keep_optimizer_state else None
    lr = round_lr(cfg.lr, server_round, cfg.num_server_rounds, cfg.lr_schedule)
    outcome = train_local(
        model,
        dataset,
        epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        lr=lr,
        optimizer=cfg.optimizer,
        optimizer_state=opt_state,
        device=_device(cfg),
        dp=DPSettings(noise_multiplier=sigma, max_grad_norm=cfg.max_grad_norm),
        accountant=accountant,
        grad_sample_mode=cfg.grad_sample_mode,
        proximal_mu=cfg.proximal_mu if cfg.strategy == "fedprox" else 0.0,
        seed=None,
    )
    if before_commit is not None:
        before_commit({k: v.detach().cpu() for k, v in model.state_dict().items()})
    # Invariant 3: the spend is durable before the update can be released.
    eps_before, eps_after = ledger.commit_spend(
        run_id, server_round, accountant, delta=site.delta, epsilon_cap=site.epsilon_cap,
        steps=outcome.steps, sample_rate=outcome.sample_rate, noise_multiplier=sigma,
    )
    if opt_state is not None:
        save_optimizer_state(site, run_id, opt_state)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    audit.append(
        "round_trained", run_id=run_id, server_round=server_round, steps=outcome.steps,
        sample_rate=outcome.sample_rate, noise_multiplier=sigma, noise_calibrated=cfg.calibrate_noise,
        lr=lr,
        accountant=cfg.accountant, grad_sample_mode=cfg.grad_sample_mode,
        max_grad_norm=cfg.max_grad_norm, epsilon_before=eps_before, epsilon_after=eps_after,
        epsilon_cap=site.epsilon_cap, delta=site.delta, declined=False, update=update_summary(state),
    )
    audit.close()  # seals the round
    metrics = {
        "num-examples": int(outcome.num_examples),
        "train-loss": float(outcome.loss),
        "epsilon": float(eps_after),
        "epsilon-cap": float(site.epsilon_cap),
        "delta": float(site.delta),
        "steps": int(outcome.steps),
        "sample-rate": float(outcome.sample_rate),
        "noise-multiplier": float(sigma),
    }
    return TrainReply(state_dict=state, metrics=metrics)


def evaluate_round(site: SiteConfig, cfg: RunConfig, run_id: str, global_state: dict[str, torch.Tensor]) -> dict[str, float]:
    """Score the global model on this site's test split (scalars only)."""
    dataset = _dataset(str(site.data_dir), "test", cfg.image_size)
    model = build_model(cfg.image_size)
    model.load_state_dict(global_state)
    scores = evaluate(model, dataset, device=_device(cfg))
    ledger = ledger_for(site)
    metrics = {k: float(scores[k]) for k in ("auc", "accuracy", "sensitivity", "specificity", "f1", "loss")}
    metrics["num-examples"] = int(scores["num_examples"])
    metrics["epsilon"] = float(ledger.epsilon(run_id, site.delta))
    metrics["epsilon-cap"] = float(site.epsilon_cap)
    for k, v in metrics.items():
        if isinstance(v, float) and math.isinf(v):
            metrics[k] = float("nan")
    return metrics
