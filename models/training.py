"""Local training: plain SGD, or DP-SGD through Opacus, optionally with a FedProx pull.

Called by the site's Flower client once per round, and directly by tests. The
model is trained in place and handed back as the same plain ``nn.Module``, so
the caller can read its ``state_dict`` as the update to send.
"""

from __future__ import annotations

import logging
import math
import secrets
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from models import features
from models.conv_grad_sample import fast_conv_grad_samples

if TYPE_CHECKING:
    from opacus.accountants import IAccountant

logger = logging.getLogger(__name__)

#: SGD momentum; with DP-SGD it averages the injected noise over a few steps.
MOMENTUM = 0.9
#: Optimizers a site may use. Adam on the privatised gradient is still DP (post-processing)
#: and, on small sites with few steps, learns far more per unit of ε than SGD.
OPTIMIZERS = ("sgd", "adam")
#: Accountant used when the caller does not pass one (RDP: robust for any number of steps).
DEFAULT_ACCOUNTANT = "rdp"
#: Opacus' per-sample-gradient implementations a site may pick (RunConfig ``grad-sample-mode``).
GRAD_SAMPLE_MODES: tuple[str, ...] = ("hooks", "functorch", "ew", "ghost")
#: The fastest mode for our model on CPU as measured by bench/dp_overhead.py (see the README).
DEFAULT_GRAD_SAMPLE_MODE = "ew"
#: Modes that cannot take an empty Poisson batch through the model.
_NO_EMPTY_BATCH_MODES = ("functorch", "ew")


@dataclass
class DPSettings:
    """DP-SGD parameters: Gaussian noise scale (relative to the clip) and per-example clip norm."""

    noise_multiplier: float
    max_grad_norm: float

    def __post_init__(self) -> None:
        if self.noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0 (got {self.noise_multiplier})")
        if self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 (got {self.max_grad_norm})")


@dataclass
class TrainOutcome:
    """What one call of :func:`train_local` did.

    ``loss`` is the mean per-example training loss over the last epoch (NaN if
    that epoch drew no example); ``sample_rate`` is the per-example sampling
    probability the privacy accountant recorded (DP) or would record (no DP).
    """

    steps: int
    sample_rate: float
    loss: float
    num_examples: int


LR_SCHEDULES = ("cosine", "constant")
LR_FLOOR = 0.1  # cosine ends at this fraction of the base rate, not at zero


def round_lr(lr: float, server_round: int, num_rounds: int, schedule: str = "cosine") -> float:
    """The learning rate of a round (1-based): cosine from ``lr`` down to ``LR_FLOOR * lr``.

    Decaying the step size lets a DP-noised model settle instead of wandering at
    the noise floor; every site computes the same rate from the round number alone.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr schedule must be one of {', '.join(LR_SCHEDULES)} (got {schedule!r})")
    if num_rounds < 1 or not server_round >= 1:
        raise ValueError(f"need 1 <= server_round and num_rounds >= 1 (got {server_round}, {num_rounds})")
    if schedule == "constant":
        return lr
    progress = min(server_round - 1, num_rounds - 1) / max(1, num_rounds)
    return lr * (LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))


def planned_steps(num_examples: int, batch_size: int, epochs: int) -> tuple[int, float]:
    """Return ``(steps, sample_rate)`` exactly as :func:`train_local` will run and account them.

    Lets a site ledger price a round before training it. Mirrors Opacus 1.6's
    ``make_private(poisson_sampling=True)``: it sets ``sample_rate = 1 / len(loader)``
    where ``len(loader) = ceil(N / batch_size)`` and its Poisson sampler yields
    ``int(1 / sample_rate)`` batches per epoch. That equals ``batch_size / N``
    (capped at 1) when ``batch_size`` divides ``N``, and is slightly smaller otherwise.
    """
    if num_examples <= 0:
        raise ValueError(f"num_examples must be positive (got {num_examples})")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive (got {batch_size})")
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0 (got {epochs})")
    batches = math.ceil(num_examples / batch_size)
    sample_rate = 1 / batches  # the same float expressions Opacus evaluates
    steps_per_epoch = int(1 / sample_rate)
    return epochs * steps_per_epoch, sample_rate


def _make_generator(seed: int | None, device: str = "cpu") -> torch.Generator:
    """A private generator, so seeding never touches torch's global RNG.

    Without a seed it is seeded from the OS's entropy: DP noise and Poisson
    sampling must not follow torch's global RNG, which any code in the process
    (a library, a model initialiser) may have seeded with a known value.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(secrets.randbits(63) if seed is None else seed)
    return gen


def train_local(
    model: nn.Module,
    dataset: Dataset,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    device: str = "cpu",
    dp: DPSettings | None = None,
    accountant: IAccountant | None = None,
    proximal_mu: float = 0.0,
    seed: int | None = None,
    pos_weight: float | None = None,
    optimizer: str = "sgd",
    optimizer_state: dict[str, Any] | None = None,
    grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE,
    sampling_size: int | None = None,
    task: str = "binary",
) -> TrainOutcome:
    """Train ``model`` in place on ``dataset``; with ``dp``, by DP-SGD recorded in ``accountant``.

    ``accountant`` is the caller's long-lived accountant (the site ledger's):
    this round's steps are appended to it so privacy spend composes across
    rounds. ``seed`` fixes batch sampling and DP noise (tests, reproducibility);
    leave it ``None`` in production so the noise is not predictable.
    ``pos_weight`` weights positive examples in the loss; it must not be
    derived from the private labels without accounting for it.
    ``optimizer`` is ``"sgd"`` (momentum 0.9) or ``"adam"``. ``optimizer_state``,
    when given, is loaded into it first and replaced by its state at the end, so a
    site can keep Adam's moments across rounds (they are functions of the noised
    gradients only, so post-processing under DP; they never leave the site).
    ``grad_sample_mode`` is how Opacus computes per-sample gradients (one of
    :data:`GRAD_SAMPLE_MODES`; "ghost" clips without materialising them); the
    privacy guarantee is the same in every mode, only speed and memory differ.
    ``sampling_size`` (DP only) is the size the Poisson rate and step count are planned on instead of
    ``len(dataset)``: a site passes its published size bucket, so q, steps and hence ε are functions of
    the bucket while each real example is still drawn with probability q (amplification needs only q).
    """
    num_examples = len(dataset)  # type: ignore[arg-type]
    steps_expected, sample_rate = planned_steps(sampling_size or num_examples, batch_size, epochs)
    if lr <= 0:
        raise ValueError(f"lr must be positive (got {lr})")
    if proximal_mu < 0:
        raise ValueError(f"proximal_mu must be >= 0 (got {proximal_mu})")
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode must be one of {', '.join(GRAD_SAMPLE_MODES)} (got {grad_sample_mode!r})")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)} (got {optimizer!r})")
    if accountant is not None and dp is None:
        logger.warning("an accountant was given but dp is None: training without DP, nothing is recorded")

    was_training = model.training
    model.to(device)
    model.train()
    # A fixed front end (the scattering transform) runs once over the dataset; what
    # is trained, clipped and noised is the rest of the model, fed its output.
    trained, dataset = features.apply_front(model, dataset, device)
    params = [p for p in trained.parameters() if p.requires_grad]
    # FedProx anchor: the global weights this round started from.
    global_params = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    # Snapshot of Python attributes, to strip whatever Opacus attaches to
    # modules and parameters (activations, grad_sample, ...) once we are done.
    param_attrs_before = [set(vars(p)) for p in params]
    module_attrs_before = [(mod, set(vars(mod)), mod._is_full_backward_hook) for mod in trained.modules()]

    gen = _make_generator(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen, drop_last=False)
    optim: torch.optim.Optimizer = (
        torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr, momentum=MOMENTUM)
    )
    if optimizer_state:
        try:
            optim.load_state_dict(optimizer_state)
        except (ValueError, KeyError) as err:
            raise ValueError(
                f"optimizer_state does not fit this model and optimizer ({err}); start without it"
            ) from None
        for group in optim.param_groups:  # the moments carry over; this call's learning rate rules
            group["lr"] = lr
    pw = torch.tensor([pos_weight], device=device) if pos_weight is not None else None
    criterion = nn.BCEWithLogitsLoss(pos_weight=pw, reduction="mean")

    train_module: nn.Module = trained
    gsm = None
    steps = 0
    last_loss_sum = 0.0
    last_seen = 0
    try:
        if dp is not None:
            from opacus import PrivacyEngine

            with warnings.catch_warnings():
                # Opacus warns that secure_mode is off: secure mode needs torchcsprng, which
                # is unmaintained and not installed; noise comes from torch's PRNG instead.
                warnings.filterwarnings("ignore", message="Secure RNG turned off")
                engine = PrivacyEngine(accountant=DEFAULT_ACCOUNTANT)
            if accountant is not None:
                # Use the caller's accountant so this round composes with earlier ones.
                engine.accountant = accountant
            noise_gen = _make_generator(None if seed is None else seed + 1, device)
            # Opacus sets q = 1 / len(loader) and samples every real example at that rate; a loader of
            # exactly the planned number of batches makes q the planned rate (only its length is read).
            planned = DataLoader(dataset, batch_sampler=[[0]] * round(1 / sample_rate), generator=gen)
            private = engine.make_private(
                module=trained,
                optimizer=optim,
                criterion=criterion,
                data_loader=planned,
                noise_multiplier=dp.noise_multiplier,
                max_grad_norm=dp.max_grad_norm,
                poisson_sampling=True,
                noise_generator=noise_gen,
                grad_sample_mode=grad_sample_mode,
            )
            if grad_sample_mode == "ghost":
                # Ghost clipping needs Opacus' criterion: it runs the two backward passes in loss.backward().
                gsm, optim, criterion, loader = private
            else:
                gsm, optim, loader = private
            train_module = gsm
            # Opacus divides the noised sum by len(dataset) * q; divide by the planned size * q instead,
            # so the release is the noised sum scaled by a constant that does not depend on n either.
            expected = max(1, int((sampling_size or num_examples) * sample_rate))
            optim.expected_batch_size = expected  # type: ignore[attr-defined]
            if not math.isclose(loader.sample_rate, sample_rate) or len(loader) * epochs != steps_expected:
                raise RuntimeError(
                    f"Opacus sampling (rate {loader.sample_rate}, {len(loader)} batches/epoch) differs from "
                    f"planned_steps ({sample_rate}, {steps_expected} steps); the ledger's estimate would be wrong"
                )

        fast_conv = fast_conv_grad_samples() if gsm is not None and grad_sample_mode == "ew" else nullcontext()
        with warnings.catch_warnings(), fast_conv:
            # Opacus' backward hooks on the first layer fire although images do not
            # require grad; torch warns about that, harmlessly, on every step.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for epoch in range(epochs):
                last_loss_sum, last_seen = 0.0, 0
                for xb, yb in loader:
                    xb = xb.to(device)
                    yb = yb.to(device).float().view(-1)
                    optim.zero_grad(set_to_none=True)
                    if xb.shape[0] == 0 and gsm is not None and grad_sample_mode in _NO_EMPTY_BATCH_MODES:
                        # These modes cannot run a batch of 0 (ExpandedWeights / vmap refuse it); hand
                        # Opacus the empty per-sample gradients the other modes would produce.
                        for p in params:
                            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                    else:
                        logits = train_module(xb).view(-1)
                        if xb.shape[0] > 0:
                            loss = criterion(logits, yb)
                            last_loss_sum += float(loss.detach()) * xb.shape[0]
                            last_seen += xb.shape[0]
                        else:
                            # An empty Poisson batch still takes a (pure-noise) DP step: the
                            # accountant counts it and planned_steps includes it. A zero loss
                            # gives Opacus empty per-sample gradients to work with.
                            loss = logits.sum()
                        loss.backward()
                    optim.step()
                    steps += 1
                    if proximal_mu > 0:
                        # FedProx as post-processing: w <- w - lr*mu*(w - w_global). It reads
                        # only the current and global weights, never the data, so by the
                        # post-processing property it leaves the DP guarantee untouched
                        # (a proximal *loss* term would not flow through Opacus'
                        # per-sample gradients anyway, so it would be silently dropped).
                        with torch.no_grad():
                            for p, g in zip(params, global_params, strict=True):
                                p.sub_(lr * proximal_mu * (p - g))
                logger.debug("epoch %d/%d: %d examples seen", epoch + 1, epochs, last_seen)
        if optimizer_state is not None:
            inner = getattr(optim, "original_optimizer", optim)  # Opacus' DPOptimizer wraps the real one
            optimizer_state.clear()
            optimizer_state.update(inner.state_dict())
    finally:
        if gsm is not None:
            # Detach Opacus: remove its hooks and per-sample attributes so the
            # caller gets back the same plain module it passed in.
            gsm._close()
        for p, before in zip(params, param_attrs_before, strict=True):
            for attr in set(vars(p)) - before:
                delattr(p, attr)
            p.grad = None
        for mod, before, full_hook_flag in module_attrs_before:
            for attr in set(vars(mod)) - before:
                delattr(mod, attr)
            mod._is_full_backward_hook = full_hook_flag
        model.train(was_training)

    loss_value = last_loss_sum / last_seen if last_seen else float("nan")
    logger.info(
        "trained %d step(s) over %d example(s)%s, last-epoch loss %.4f",
        steps,
        num_examples,
        f" with DP-SGD (noise {dp.noise_multiplier}, clip {dp.max_grad_norm})" if dp else "",
        loss_value,
    )
    return TrainOutcome(steps=steps, sample_rate=sample_rate, loss=loss_value, num_examples=num_examples)
