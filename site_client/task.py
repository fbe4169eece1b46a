"""What a site does in a round, as plain functions the tests call without Flower.

``train_round`` refuses a hostile global model and checks the privacy budget
before training, trains with DP-SGD against the run's single accountant, commits
the spend to the ledger, and only then hands back the update. ``evaluate_round``
scores the global model on the site's own test split.

Nothing in a train reply is a function of the exact training-set size: the site
publishes a coarse size bucket fixed at enrolment, and the Poisson rate, steps,
noise and ε are planned on that bucket (docs/privacy.md, "What leaves a site").
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from anonymization.audit import AuditTrail
from medfed.files import open_atomic, write_text
from medfed.settings import ConfigError, OutOfBounds, RunConfig, SiteConfig
from models.accounting import MAX_NOISE_MULTIPLIER, AccountingError, Segment, calibrate_noise, epsilon_of_history
from models.dataset import DatasetError, StudyDataset
from models.evaluation import predict
from models.registry import apply_trainable, build_network, grad_sample_mode
from models.study import DEFAULT_STUDY, Study, served_study, study_from_json, study_of
from models.training import DPSettings, planned_steps, round_lr, train_local
from site_client.ledger import EVALUATED, EVALUATION_SAMPLE_RATE, CapExceeded, LedgerError, PrivacyLedger
from site_client.secagg import range_problem
from site_client.trail import audit_for  # noqa: F401 - re-exported; light for the egress guard

log = logging.getLogger(__name__)


class SiteRefusal(Exception):
    """The site will not take part as asked (bad privacy settings, a hostile model); the message says why."""


#: Where a site keeps the size bucket it published at enrolment (in its state folder).
ENROLMENT_FILE = "enrolment.json"


def size_bucket(n: int) -> int:
    """``n`` to one significant digit, rounded down (4,321 -> 4,000; 987 -> 900; 16 -> 10).

    Within a factor of 2 below ``n``, readable, and what an operator would write in site.toml.
    """
    if n < 1:
        raise ValueError(f"a size bucket needs at least one example (got {n})")
    scale = 10 ** (len(str(int(n))) - 1)
    return (int(n) // scale) * scale


def published_size_bucket(site: SiteConfig) -> int | None:
    """The bucket this site publishes: ``size-bucket`` from site.toml, else the one enrolment fixed (or None)."""
    if site.size_bucket is not None:
        return site.size_bucket
    path = site.state_dir / ENROLMENT_FILE
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text())["size-bucket"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"size-bucket {value!r} is not a positive integer")
        return value
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SiteRefusal(
            f"site {site.name}: {path} is unreadable ({err}); restore it from the state backup or set "
            "size-bucket in site.toml (the site never derives a second bucket)"
        ) from None


def enrolled_size_bucket(site: SiteConfig, n: int) -> int:
    """The published bucket; at a site's first training, derived from its ``n`` and fixed in STATE for good.

    Deriving it once (not per round) means the only thing ever said about ``n`` is this one coarse value.
    """
    bucket = published_size_bucket(site)
    if bucket is not None:
        return bucket
    bucket = size_bucket(n)
    path = site.state_dir / ENROLMENT_FILE
    write_text(
        path,
        json.dumps(
            {
                "size-bucket": bucket,
                "rule": "training examples to one significant digit, rounded down",
                "enrolled": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            }
        ),
        mode=None,
    )
    log.info("site %s: enrolled with size bucket %d (from %d training examples); kept in %s",
             site.name, bucket, n, path)
    return bucket


def _non_finite(tensors: Any) -> str | None:
    """The name of the first tensor in a (nested) dict/list holding NaN or inf, else None."""
    stack: list[tuple[str, Any]] = [("", tensors)]
    while stack:
        name, value = stack.pop()
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return name or "(tensor)"
        elif isinstance(value, Mapping):
            stack.extend((f"{name}.{k}" if name else str(k), v) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((f"{name}[{i}]", v) for i, v in enumerate(value))
    return None


def check_model(site: SiteConfig, state: Mapping[str, torch.Tensor]) -> None:
    """Refuse (:class:`SiteRefusal`) a global model with a non-finite value or one over ``max-model-abs``.

    Called before anything is read from the ledger or spent: one NaN would make the DP update all-NaN
    (and poison the saved optimizer state); huge weights are how a hostile model overflows training.
    """
    for name, value in state.items():
        if not value.is_floating_point():
            continue
        finite = torch.isfinite(value)
        if not bool(finite.all()):
            raise SiteRefusal(
                f"site {site.name} refuses the global model: {name!r} holds {int((~finite).sum())} non-finite "
                "value(s) (NaN or inf); the site trains and scores only finite models (nothing was spent)"
            )
        top = float(value.detach().abs().max()) if value.numel() else 0.0
        if top > site.max_model_abs:
            raise SiteRefusal(
                f"site {site.name} refuses the global model: {name!r} holds a value of magnitude {top:.3g}, over "
                f"the site's max-model-abs {site.max_model_abs:g}; this network's weights are O(1), so the model "
                "is corrupt or hostile (nothing was spent). If it is legitimate, raise max-model-abs in site.toml"
            )


@dataclass
class TrainReply:
    """A site's answer to a train request: an update, or a decline with its reason."""

    state_dict: dict[str, torch.Tensor] | None
    metrics: dict[str, float] = field(default_factory=dict)
    declined: str | None = None


def run_study(site: SiteConfig, cfg: RunConfig) -> Study:
    """The run's study, if this site serves it (models.study.served_study), else a refusal saying why."""
    try:
        return served_study(site, cfg)
    except (ConfigError, OutOfBounds) as err:
        raise SiteRefusal(str(err)) from None


def site_dataset(site: SiteConfig, study: Study, split: str) -> StudyDataset:
    """The site's images for ``study``, or a refusal saying why the site cannot serve it."""
    try:
        return _dataset(str(site.data_dir), split, study.canonical_json(), str(site.state_dir / "cache"))
    except DatasetError as err:
        raise SiteRefusal(f"site {site.name} cannot serve study {study.name!r}: {err}") from None


@functools.lru_cache(maxsize=8)
def _dataset(data_dir: str, split: str, study_json: str, cache_dir: str) -> StudyDataset:
    # Cached per process: a simulation actor or SuperNode serves many rounds.
    return StudyDataset(Path(data_dir), study_from_json(study_json), split=split,  # type: ignore[arg-type]
                        cache_dir=Path(cache_dir))


def site_network(study: Study, state: Mapping[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """The study's network with ``state`` loaded and the study's trainable part unfrozen."""
    model = build_network(study)
    if state is not None:
        model.load_state_dict(state)
    apply_trainable(model, study.network.trainable)
    return model


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
        state = dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as err:  # noqa: BLE001 - a torn file costs only warm-up, never privacy
        log.warning("optimizer state %s unreadable (%s); this round starts a fresh optimizer", path, err)
        return {}
    bad = _non_finite(state)
    if bad is not None:  # NaN moments would make every later update NaN
        log.warning("optimizer state %s holds non-finite values (%s); this round starts a fresh optimizer", path, bad)
        return {}
    return state


def save_optimizer_state(site: SiteConfig, run_id: str, state: dict[str, object]) -> None:
    """Write atomically (temporary name, then rename), so a crash leaves the last good state.

    A state holding NaN or inf is not written (the last good one stays): it would poison every later round.
    """
    path = _optimizer_state_path(site, run_id)
    bad = _non_finite(state)
    if bad is not None:
        log.warning("optimizer state of run %s holds non-finite values (%s); not saved, %s keeps the last good one",
                    run_id, bad, path)
        return
    with open_atomic(path, mode=None) as fh:
        torch.save(state, fh)


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
    try:
        study = study_of(cfg)
    except ConfigError as err:
        raise SiteRefusal(f"this site cannot serve the run's study: {err}") from None
    return build_network(study).state_dict()


def _device(cfg: RunConfig) -> str:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SiteRefusal("run config asks for device=cuda but this site has no CUDA device; use device=cpu")
    return cfg.device


def _caps(site: SiteConfig, ledger: PrivacyLedger, run_id: str) -> list[tuple[str, list[Segment], float]]:
    """(name, history so far, cap) of each cap a round must stay under: the lifetime, and the run if capped."""
    caps = [("lifetime", ledger.lifetime_history(), site.epsilon_cap)]
    if site.epsilon_cap_per_run is not None:
        caps.append(("per-run", ledger.history(run_id), site.epsilon_cap_per_run))
    return caps


def evaluations_reserved(site: SiteConfig, cfg: RunConfig, ledger: PrivacyLedger, run_id: str,
                          study: Study | None = None) -> list[Segment]:
    """The run's evaluations still to come (one a round if fraction-evaluate > 0), priced in by calibration.

    Each is priced as evaluate_round pays it: the study's sensitivity sets its noise multiplier.
    """
    from site_client.dp_evaluation import evaluation_segment

    planned = cfg.num_server_rounds if cfg.fraction_evaluate > 0 else 0
    done = sum(1 for r in ledger.rounds(run_id) if r["status"] == EVALUATED)
    left = max(0, planned - done)
    sigma, q, _ = evaluation_segment(site.evaluation_noise, study or DEFAULT_STUDY)
    return [(sigma, q, left)] if left else []


def _round_noise(
    site: SiteConfig, cfg: RunConfig, ledger: PrivacyLedger, run_id: str, server_round: int, n: int, steps: int,
    q: float, study: Study | None = None,
) -> tuple[float, str | None]:
    """The noise multiplier this round trains at, or (floor, reason) to decline it.

    The σ keeps both the site's lifetime ε (every run composed) and this run's ε (if
    the site caps runs) under their caps, with the run's planned evaluations reserved.
    Raises :class:`SiteRefusal` before the run's first spend when the run cannot meet a
    cap at all (one round at the floor σ crosses it, or calibration needs an absurd σ).
    Texts name the cap and ε figures, never the data's size.
    """
    first = not ledger.history(run_id)
    caps = _caps(site, ledger, run_id)
    sigma = cfg.noise_multiplier
    rounds_left = max(1, cfg.num_server_rounds - server_round + 1)
    per_run = "" if site.epsilon_cap_per_run is None else f", per-run cap {site.epsilon_cap_per_run:g}"
    where = f"site {site.name} (lifetime cap {site.epsilon_cap:g}{per_run}, delta={site.delta:g}, " \
            f"accountant {cfg.accountant})"
    if cfg.calibrate_noise:
        reserve = evaluations_reserved(site, cfg, ledger, run_id, study)
        need = sigma
        for name, history, cap in caps:  # the largest σ any cap needs meets them all
            try:
                need = calibrate_noise(history, q, steps, rounds_left, cap, site.delta, cfg.accountant,
                                       floor=need, ceiling=max(MAX_NOISE_MULTIPLIER, sigma), reserve=reserve)
            except AccountingError as err:
                what = f"calibrate-noise over {rounds_left} round(s), {name} cap {cap:g}: {err}"
                if first:
                    raise SiteRefusal(f"{where} refuses the run: {what}") from None
                return sigma, f"site {site.name} declines round {server_round}: {what}"
        return need, None
    if first:
        for name, history, cap in caps:
            before = epsilon_of_history(history, site.delta, cfg.accountant)
            one = epsilon_of_history(history + [(sigma, q, steps)], site.delta, cfg.accountant)
            if one <= cap:
                continue
            hints = []
            for rounds in sorted({1, rounds_left}):
                try:
                    fit = calibrate_noise(history, q, steps, rounds, cap, site.delta, cfg.accountant, floor=sigma)
                    hints.append(f"noise-multiplier >= {fit:g} fits {rounds} round(s)")
                except AccountingError:
                    most = epsilon_of_history(history + [(MAX_NOISE_MULTIPLIER, q, steps * rounds)], site.delta,
                                              cfg.accountant)
                    hints.append(f"even noise-multiplier {MAX_NOISE_MULTIPLIER:g} takes it to epsilon {most:.3g} "
                                 f"in {rounds} round(s)")
            raise SiteRefusal(
                f"{where} refuses the run: one round at noise-multiplier {sigma:g} alone takes the {name} epsilon "
                f"{before:.4g} -> {one:.4g}, over the {name} cap {cap:g}; {'; '.join(hints)}. Raise "
                "noise-multiplier (or set calibrate-noise = true), lower local-epochs or raise batch-size, or raise "
                f"the site's {'epsilon-cap' if name == 'lifetime' else 'epsilon-cap-per-run'}"
            )
    return sigma, None


def _over_cap(site: SiteConfig, ledger: PrivacyLedger, run_id: str, accountant: str, segment: Segment,
              what: str) -> str | None:
    """Why ``segment`` (one more release) would cross a cap, naming the cap with ε numbers; None if it fits."""
    life_before = epsilon_of_history(ledger.lifetime_history(), site.delta, accountant)
    life_after = epsilon_of_history(ledger.lifetime_history() + [segment], site.delta, accountant)
    if life_after > site.epsilon_cap:
        return (f"site {site.name} declines {what}: it would take the site's lifetime epsilon {life_before:.3f} -> "
                f"{life_after:.3f}, over its lifetime cap of {site.epsilon_cap:g} (delta={site.delta:g})")
    if site.epsilon_cap_per_run is not None:
        run_before = epsilon_of_history(ledger.history(run_id), site.delta, accountant)
        run_after = epsilon_of_history(ledger.history(run_id) + [segment], site.delta, accountant)
        if run_after > site.epsilon_cap_per_run:
            return (f"site {site.name} declines {what}: it would take run {run_id}'s epsilon {run_before:.3f} -> "
                    f"{run_after:.3f}, over the site's per-run cap of {site.epsilon_cap_per_run:g} "
                    f"(delta={site.delta:g})")
    return None


def _record_policy(site: SiteConfig, cfg: RunConfig, ledger: PrivacyLedger, audit: AuditTrail,
                   bucket: int | None = None) -> None:
    """The site's caps in its ledger (so the ledger alone prices its lifetime) and in its audit trail."""
    ledger.record_policy(epsilon_cap=site.epsilon_cap, delta=site.delta, epsilon_cap_per_run=site.epsilon_cap_per_run,
                         accountant=cfg.accountant)
    audit.record_policy("privacy", {"site": site.name, "epsilon_cap": site.epsilon_cap,
                                    "epsilon_cap_per_run": site.epsilon_cap_per_run, "delta": site.delta,
                                    "evaluation_noise": site.evaluation_noise, "size_bucket": bucket,
                                    "max_model_abs": site.max_model_abs})


def _decline_round(site: SiteConfig, cfg: RunConfig, ledger: PrivacyLedger, audit: AuditTrail, run_id: str,
                   server_round: int, reason: str, eps_before: float, eps_projected: float, steps: int,
                   sample_rate: float, sigma: float) -> TrainReply:
    """Record a declined round (ledger and audit trail, no spend) and answer with the reason."""
    ledger.record_decline(
        run_id, server_round, reason=reason, epsilon_before=eps_before, epsilon_projected=eps_projected,
        epsilon_cap=site.epsilon_cap, steps=steps, sample_rate=sample_rate, noise_multiplier=sigma,
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
    What leaves depends on the training split only through the update (DP) and the size bucket.
    """
    check_model(site, global_state)  # before the ledger is opened: a hostile model costs nothing
    study = run_study(site, cfg)
    dataset = site_dataset(site, study, "train")
    n = len(dataset)  # never leaves: the bucket stands for it in the reply, the sampling and the accounting
    bucket = enrolled_size_bucket(site, n)
    if site.delta >= 1.0 / max(n, bucket):
        raise SiteRefusal(
            f"delta={site.delta:g} is too large for this site: it must be below 1/size-bucket = 1/{bucket} and "
            f"below 1/(training examples); set the site's delta below {0.1 / bucket:.2g}"
        )
    if cfg.noise_multiplier <= 0:
        raise SiteRefusal("noise-multiplier must be > 0: this site trains only with differential privacy")
    if cfg.secagg:  # before any spend: refuse a model SecAgg+ would already clip (the update is checked again)
        problem = range_problem((v.detach().cpu().numpy() for v in global_state.values()),
                                1 if cfg.secagg_uniform_weights else bucket, cfg.secagg_weight_bound,
                                cfg.secagg_clipping_range)
        if problem is not None:
            raise SiteRefusal(f"{problem} (nothing was spent)")

    ledger = ledger_for(site)
    try:
        ledger.open_account(run_id, cfg.accountant)  # the run's accountant, fixed from its first round
    except LedgerError as err:
        raise SiteRefusal(str(err)) from None
    audit = audit_for(site)
    _record_policy(site, cfg, ledger, audit, bucket)
    # q = batch-size / bucket (capped at 1): steps, q, σ and ε are functions of the bucket, not of n.
    steps, sample_rate = planned_steps(bucket, cfg.batch_size, cfg.local_epochs)
    eps_before = ledger.epsilon(run_id, site.delta)
    try:
        sigma, decline = _round_noise(site, cfg, ledger, run_id, server_round, bucket, steps, sample_rate, study)
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
    if decline is None:
        decline = _over_cap(site, ledger, run_id, cfg.accountant, (sigma, sample_rate, steps), f"round {server_round}")
    if decline is not None:
        return _decline_round(site, cfg, ledger, audit, run_id, server_round, decline, eps_before, eps_projected,
                              steps, sample_rate, sigma)

    model = site_network(study, global_state)
    accountant = ledger.accountant(run_id, cfg.accountant)
    opt_state = load_optimizer_state(site, run_id) if cfg.keep_optimizer_state else None
    lr = round_lr(cfg.lr, server_round, cfg.num_server_rounds, cfg.lr_schedule)
    mode = grad_sample_mode(study.network.name, cfg.grad_sample_mode)
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
        grad_sample_mode=mode,
        proximal_mu=cfg.proximal_mu if cfg.strategy == "fedprox" else 0.0,
        seed=None,
        sampling_size=bucket,
        task=study.task,
    )
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    bad = _non_finite(state)
    if bad is not None:  # before the commit: never released, no spend recorded
        raise SiteRefusal(
            f"site {site.name} refuses to release round {server_round}: training on the global model it was sent "
            f"produced non-finite values in {bad!r}; nothing was released and no spend recorded"
        )
    if before_commit is not None:
        before_commit(state)
    # docs/design.md invariant 3: the spend is durable before the update can be released. The ledger checks
    # the caps again under its write lock (another run may have spent meanwhile); refused, nothing is released.
    try:
        eps_before, eps_after = ledger.commit_spend(
            run_id, server_round, accountant, delta=site.delta, epsilon_cap=site.epsilon_cap,
            epsilon_cap_per_run=site.epsilon_cap_per_run,
            steps=outcome.steps, sample_rate=outcome.sample_rate, noise_multiplier=sigma,
        )
    except CapExceeded as err:
        return _decline_round(site, cfg, ledger, audit, run_id, server_round,
                              f"site {site.name} declines round {server_round}: {err}", eps_before, eps_projected,
                              steps, sample_rate, sigma)
    if opt_state is not None:
        save_optimizer_state(site, run_id, opt_state)
    audit.append(
        "round_trained", run_id=run_id, server_round=server_round, steps=outcome.steps,
        sample_rate=outcome.sample_rate, noise_multiplier=sigma, noise_calibrated=cfg.calibrate_noise,
        lr=lr,
        accountant=cfg.accountant, grad_sample_mode=mode,
        max_grad_norm=cfg.max_grad_norm, epsilon_before=eps_before, epsilon_after=eps_after,
        epsilon_cap=site.epsilon_cap, delta=site.delta, declined=False, update=update_summary(state),
    )
    audit.close()  # seals the round
    # No training loss (a crafted model turns it into a label count) and no exact n: the bucket weighs the
    # site in FedAvg; steps, sample rate and σ are planned on the bucket, so they say nothing more.
    metrics = {
        "num-examples": int(bucket),
        "epsilon": float(eps_after),
        "epsilon-cap": float(site.epsilon_cap),
        "delta": float(site.delta),
        "steps": int(outcome.steps),
        "sample-rate": float(outcome.sample_rate),
        "noise-multiplier": float(sigma),
    }
    return TrainReply(state_dict=state, metrics=metrics)


def evaluate_round(site: SiteConfig, cfg: RunConfig, run_id: str, global_state: dict[str, torch.Tensor],
                   server_round: int = 0, *, study: Study | None = None,
                   build: Callable[[], torch.nn.Module] | None = None,
                   dataset: Dataset | None = None) -> dict[str, float | list[float]]:
    """Score the global model on this site's test split and release DP metrics, paid for once per model.

    The figures come from per-class score histograms (and, multiclass, a confusion matrix) with Gaussian
    noise (σ = the site's ``evaluation-noise``; site_client.dp_evaluation); the spend, the segment
    (σ / sensitivity of the study, 1.0, 1), is committed to the run's account before anything is
    released. The same global model and study asked again gets the same noisy figures at no cost. An
    evaluation that would cross a cap raises :class:`SiteRefusal`, with nothing spent. ``study`` (default:
    the binary CT study), ``build`` (the study's network, untrained) and ``dataset`` (the test split) say
    what is scored.
    """
    from site_client.dp_evaluation import (
        EvaluationStore,
        evaluation_segment,
        metrics_from_histograms,
        noisy_histograms,
        sensitivity,
        store_key,
    )
    from site_client.replay import arrays_digest

    check_model(site, global_state)
    study = study or run_study(site, cfg)

    digest = arrays_digest(global_state)
    key = store_key(digest, study)
    ledger = ledger_for(site)
    try:
        accountant = ledger.open_account(run_id, cfg.accountant)
    except LedgerError as err:
        raise SiteRefusal(str(err)) from None
    audit = audit_for(site)
    _record_policy(site, cfg, ledger, audit)
    store = EvaluationStore(site.state_dir)
    released = store.lookup(key, study)
    if released is not None:
        hists = released[0]
        audit.append("evaluation_resent", run_id=run_id, server_round=server_round, global_digest=digest,
                     first_run=released[1].get("run_id"))
    else:
        done = sum(1 for r in ledger.rounds(run_id) if r["status"] == EVALUATED)
        if done >= site.run_bounds.max_evaluations:
            raise OutOfBounds(f"site {site.name} refuses evaluation {done + 1} of run {run_id}: above the site's "
                              f"bound max-evaluations = {site.run_bounds.max_evaluations} (site.toml [run-bounds])")
        sigma = site.evaluation_noise
        segment = evaluation_segment(sigma, study)  # the noise multiplier is σ over the release's sensitivity
        what = f"to evaluate the model of round {server_round} (run {run_id})"
        decline = _over_cap(site, ledger, run_id, accountant, segment, what)
        eps_before = ledger.epsilon(run_id, site.delta)
        if decline is None:
            model = build() if build is not None else build_network(study)
            model.load_state_dict(global_state)
            test = dataset if dataset is not None else site_dataset(site, study, "test")
            logits, labels = predict(model, test, device=_device(cfg))
            hists = noisy_histograms(logits.numpy(), labels.numpy(), sigma, study=study)
            try:  # durable before release; the ledger re-checks the caps under its write lock
                eps_before, eps_after = ledger.commit_evaluation(
                    run_id, server_round, noise_multiplier=segment[0], digest=digest, delta=site.delta,
                    epsilon_cap=site.epsilon_cap, epsilon_cap_per_run=site.epsilon_cap_per_run, accountant=accountant)
            except CapExceeded as err:
                decline = f"site {site.name} declines {what}: {err}"
        if decline is not None:
            ledger.record_decline(
                run_id, server_round, reason=decline, epsilon_before=eps_before,
                epsilon_projected=epsilon_of_history(ledger.history(run_id) + [segment], site.delta, accountant),
                epsilon_cap=site.epsilon_cap, steps=1, sample_rate=EVALUATION_SAMPLE_RATE, noise_multiplier=segment[0],
                evaluation=True, digest=digest,
            )
            audit.append("evaluation_declined", run_id=run_id, server_round=server_round, global_digest=digest,
                         evaluation_noise=sigma, epsilon_cap=site.epsilon_cap, delta=site.delta, reason=decline)
            audit.close()
            log.info(decline)
            raise SiteRefusal(decline)
        store.save(key, hists, study, run_id=run_id, server_round=server_round)
        audit.append("evaluation_released", run_id=run_id, server_round=server_round, global_digest=digest,
                     evaluation_noise=sigma, sensitivity=sensitivity(study), noise_multiplier=segment[0],
                     task=study.task, epsilon_before=eps_before, epsilon_after=eps_after,
                     epsilon_cap=site.epsilon_cap, delta=site.delta)
    audit.close()
    metrics = metrics_from_histograms(hists, study)
    metrics["epsilon"] = float(ledger.epsilon(run_id, site.delta))
    metrics["epsilon-cap"] = float(site.epsilon_cap)
    return metrics
