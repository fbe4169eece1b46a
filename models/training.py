"""Local training: plain SGD, or DP-SGD through Opacus, optionally with a FedProx pull.

Called by the site's Flower client once per round, and directly by tests. The
model is trained in place and handed back as the same plain ``nn.Module``, so
the caller can read its ``state_dict`` as the update to send. :func:`train_local`
is a short sequence of ``_prepare_*`` steps (as Opacus' ``make_private`` is), the
epochs, and :func:`_detach`, which strips everything Opacus attached.
"""

from __future__ import annotations

import logging
import math
import secrets
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, get_args

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from models import features
from models.conv_grad_sample import fast_conv_grad_samples
from models.study import Task

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
#: The fastest mode for the scattering head on CPU (bench/dp_overhead.py); other networks'
#: fastest modes are in models.registry.DEFAULT_MODE, which a run's ``grad-sample-mode = "auto"`` uses.
DEFAULT_GRAD_SAMPLE_MODE = "ew"
#: Examples per forward/backward pass when the caller does not say; a larger logical (Poisson)
#: batch is split into physical batches of at most this many (Opacus' BatchMemoryManager).
MAX_PHYSICAL_BATCH_SIZE = 128
#: Tasks a study may name; each has its loss (:class:`TaskLoss`).
TASKS: tuple[str, ...] = get_args(Task)
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


class TaskLoss(nn.Module):
    """The study's loss on ``(B, K)`` logits: binary and multilabel BCE-with-logits, multiclass cross-entropy.

    One module for every task, with a ``reduction`` attribute that Opacus' ghost
    clipping sets to ``"none"`` to get one loss per example (a multilabel example's
    loss is the mean over its findings, so the per-example losses average to the
    element-wise BCE mean).
    """

    def __init__(self, task: str = "binary", reduction: str = "mean") -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)} (got {task!r})")
        self.task = task
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.task == "multiclass":
            per = F.cross_entropy(logits, target.long().view(-1), reduction="none")
        elif self.task == "binary":
            per = F.binary_cross_entropy_with_logits(logits.view(-1), target.float().view(-1), reduction="none")
        else:
            per = F.binary_cross_entropy_with_logits(logits, target.float().view_as(logits), reduction="none")
            per = per.mean(dim=1)
        if self.reduction == "none":
            return per
        return per.sum() if self.reduction == "sum" else per.mean()


@dataclass
class _Run:
    """One call's state, shared by the ``_prepare_*`` steps, the epochs and :func:`_detach`."""

    model: nn.Module
    trained: nn.Module  # what is trained and clipped: the model, or its part after a fixed front end
    dataset: Dataset
    device: str
    was_training: bool
    params: list[nn.Parameter]
    global_params: list[torch.Tensor]  # FedProx anchor: the weights this round started from
    param_attrs: list[set[str]]
    module_attrs: list[tuple[nn.Module, set[str], Any]]
    criterion: nn.Module
    optim: torch.optim.Optimizer | None = None
    loader: DataLoader | None = None
    train_module: nn.Module | None = None
    gsm: Any = None  # Opacus' GradSampleModule while training privately
    steps: int = 0
    loss_sum: float = 0.0
    seen: int = 0


def train_local(
    model: nn.Module,
    dataset: Dataset,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    task: str = "binary",
    device: str = "cpu",
    dp: DPSettings | None = None,
    accountant: IAccountant | None = None,
    proximal_mu: float = 0.0,
    seed: int | None = None,
    optimizer: str = "sgd",
    optimizer_state: dict[str, Any] | None = None,
    grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE,
    sampling_size: int | None = None,
    max_physical_batch_size: int = MAX_PHYSICAL_BATCH_SIZE,
) -> TrainOutcome:
    """Train ``model`` in place on ``dataset``; with ``dp``, by DP-SGD recorded in ``accountant``.

    ``task`` picks the loss (:class:`TaskLoss`): binary targets are 0/1, multiclass
    targets class indices, multilabel targets 0/1 vectors.
    ``accountant`` is the caller's long-lived accountant (the site ledger's):
    this round's steps are appended to it so privacy spend composes across
    rounds. ``seed`` fixes batch sampling and DP noise (tests, reproducibility);
    leave it ``None`` in production so the noise is not predictable.
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
    ``max_physical_batch_size`` bounds how many examples go through the network at once; a larger
    (logical, Poisson) batch is split and its clipped gradients summed before the one noised step,
    so memory bounds the physical batch and never the privacy. ``device="cuda"`` trains in bfloat16
    autocast where the GPU supports it.
    """
    num_examples = len(dataset)  # type: ignore[arg-type]
    steps_expected, sample_rate = planned_steps(sampling_size or num_examples, batch_size, epochs)
    _check_args(lr=lr, proximal_mu=proximal_mu, grad_sample_mode=grad_sample_mode, optimizer=optimizer,
                max_physical_batch_size=max_physical_batch_size)
    if accountant is not None and dp is None:
        logger.warning("an accountant was given but dp is None: training without DP, nothing is recorded")
    run = _prepare_model(model, dataset, device, proximal_mu, TaskLoss(task))
    try:
        _prepare_optimizer(run, optimizer, lr, optimizer_state)
        gen = _make_generator(seed)
        run.loader = DataLoader(run.dataset, batch_size=batch_size, shuffle=True, generator=gen, drop_last=False)
        if dp is not None:
            _prepare_private(run, dp, accountant, seed=seed, grad_sample_mode=grad_sample_mode,
                             sample_rate=sample_rate, planned_size=sampling_size or num_examples,
                             steps_expected=steps_expected, epochs=epochs)
        _run_epochs(run, epochs, lr=lr, proximal_mu=proximal_mu, grad_sample_mode=grad_sample_mode,
                    max_physical_batch_size=max_physical_batch_size)
        _save_optimizer_state(run, optimizer_state)
    finally:
        _detach(run)
    loss_value = run.loss_sum / run.seen if run.seen else float("nan")
    logger.info("trained %d step(s) over %d example(s)%s, last-epoch loss %.4f", run.steps, num_examples,
                f" with DP-SGD (noise {dp.noise_multiplier}, clip {dp.max_grad_norm})" if dp else "", loss_value)
    return TrainOutcome(steps=run.steps, sample_rate=sample_rate, loss=loss_value, num_examples=num_examples)


def _check_args(*, lr: float, proximal_mu: float, grad_sample_mode: str, optimizer: str,
                max_physical_batch_size: int) -> None:
    if lr <= 0:
        raise ValueError(f"lr must be positive (got {lr})")
    if proximal_mu < 0:
        raise ValueError(f"proximal_mu must be >= 0 (got {proximal_mu})")
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode must be one of {', '.join(GRAD_SAMPLE_MODES)} (got {grad_sample_mode!r})")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)} (got {optimizer!r})")
    if max_physical_batch_size < 1:
        raise ValueError(f"max_physical_batch_size must be >= 1 (got {max_physical_batch_size})")


def _prepare_model(model: nn.Module, dataset: Dataset, device: str, proximal_mu: float,
                   criterion: nn.Module) -> _Run:
    """Move the model, pick what is trained, and snapshot what Opacus will attach so it can be removed."""
    was_training = model.training
    model.to(device)
    model.train()
    # A fixed front end runs once over the dataset; what is trained, clipped and noised is
    # the rest of the model, fed its output.
    trained, data = features.apply_front(model, dataset, device)
    params = [p for p in trained.parameters() if p.requires_grad]
    return _Run(
        model=model, trained=trained, dataset=data, device=device, was_training=was_training, params=params,
        global_params=[p.detach().clone() for p in params] if proximal_mu > 0 else [],
        param_attrs=[set(vars(p)) for p in params],
        module_attrs=[(m, set(vars(m)), m._is_full_backward_hook) for m in trained.modules()],
        criterion=criterion, train_module=trained,
    )


def _prepare_optimizer(run: _Run, optimizer: str, lr: float, state: dict[str, Any] | None) -> None:
    run.optim = (torch.optim.Adam(run.params, lr=lr) if optimizer == "adam"
                 else torch.optim.SGD(run.params, lr=lr, momentum=MOMENTUM))
    if state:
        try:
            run.optim.load_state_dict(state)
        except (ValueError, KeyError) as err:
            raise ValueError(f"optimizer_state does not fit this model and optimizer ({err}); start without it") \
                from None
        for group in run.optim.param_groups:  # the moments carry over; this call's learning rate rules
            group["lr"] = lr


def _prepare_private(run: _Run, dp: DPSettings, accountant: IAccountant | None, *, seed: int | None,
                     grad_sample_mode: str, sample_rate: float, planned_size: int, steps_expected: int,
                     epochs: int) -> None:
    """Make the run private: Opacus' engine on the caller's accountant, Poisson sampling at the planned rate."""
    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        # Opacus warns that secure_mode is off: secure mode needs torchcsprng, which
        # is unmaintained and not installed; noise comes from torch's PRNG instead.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=DEFAULT_ACCOUNTANT)
    if accountant is not None:
        engine.accountant = accountant  # this round composes with earlier ones
    assert run.loader is not None and run.optim is not None
    # Opacus sets q = 1 / len(loader) and samples every real example at that rate; a loader of
    # exactly the planned number of batches makes q the planned rate (only its length is read).
    planned = DataLoader(run.dataset, batch_sampler=[[0]] * round(1 / sample_rate), generator=run.loader.generator)
    private = engine.make_private(
        module=run.trained, optimizer=run.optim, criterion=run.criterion, data_loader=planned,
        noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm, poisson_sampling=True,
        noise_generator=_make_generator(None if seed is None else seed + 1, run.device),
        grad_sample_mode=grad_sample_mode,
    )
    if grad_sample_mode == "ghost":
        # Ghost clipping needs Opacus' criterion: it runs the two backward passes in loss.backward().
        run.gsm, run.optim, run.criterion, run.loader = private
    else:
        run.gsm, run.optim, run.loader = private
    run.train_module = run.gsm
    # Opacus divides the noised sum by len(dataset) * q; divide by the planned size * q instead,
    # so the release is the noised sum scaled by a constant that does not depend on n either.
    run.optim.expected_batch_size = max(1, int(planned_size * sample_rate))  # type: ignore[attr-defined]
    loader = run.loader
    if not math.isclose(loader.sample_rate, sample_rate) or len(loader) * epochs != steps_expected:  # type: ignore[attr-defined]
        raise RuntimeError(
            f"Opacus sampling (rate {loader.sample_rate}, {len(loader)} batches/epoch) differs from "  # type: ignore[attr-defined]
            f"planned_steps ({sample_rate}, {steps_expected} steps); the ledger's estimate would be wrong"
        )


def _autocast(device: str) -> AbstractContextManager[Any]:
    """bfloat16 autocast on a GPU that has it (no loss scaling needed, so Opacus' clipping is unchanged)."""
    if str(device).startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _physical_batches(run: _Run, max_physical_batch_size: int) -> AbstractContextManager[Any]:
    """The loader of physical batches: Opacus' BatchMemoryManager under DP, the logical loader otherwise."""
    if run.gsm is None:
        return nullcontext(run.loader)
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    return BatchMemoryManager(data_loader=run.loader, max_physical_batch_size=max_physical_batch_size,  # type: ignore[arg-type]
                              optimizer=run.optim)  # type: ignore[arg-type]


def _run_epochs(run: _Run, epochs: int, *, lr: float, proximal_mu: float, grad_sample_mode: str,
                max_physical_batch_size: int) -> None:
    fast_conv = fast_conv_grad_samples() if run.gsm is not None and grad_sample_mode == "ew" else nullcontext()
    with warnings.catch_warnings(), fast_conv, _physical_batches(run, max_physical_batch_size) as loader:
        # Opacus' backward hooks on the first layer fire although images do not
        # require grad; torch warns about that, harmlessly, on every step.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for epoch in range(epochs):
            run.loss_sum, run.seen = 0.0, 0
            for xb, yb in loader:
                if run.gsm is None:
                    _plain_step(run, xb, yb, max_physical_batch_size)
                else:
                    _private_step(run, xb, yb, grad_sample_mode)
                if _stepped(run) and proximal_mu > 0:
                    _proximal_pull(run, lr * proximal_mu)
            logger.debug("epoch %d/%d: %d examples seen", epoch + 1, epochs, run.seen)


def _stepped(run: _Run) -> bool:
    """Whether the last ``optim.step()`` updated the weights (not a physical batch inside a logical one)."""
    return not getattr(run.optim, "_is_last_step_skipped", False)


def _loss(run: _Run, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    with _autocast(run.device):
        logits = run.train_module(xb)  # type: ignore[misc]
    loss = run.criterion(logits.float(), yb)
    if xb.shape[0] > 0:
        run.loss_sum += float(loss.detach()) * xb.shape[0]
        run.seen += xb.shape[0]
    return loss


def _plain_step(run: _Run, xb: torch.Tensor, yb: torch.Tensor, max_physical_batch_size: int) -> None:
    """One SGD step on a batch, its gradient accumulated over physical chunks (same gradient, bounded memory)."""
    assert run.optim is not None
    run.optim.zero_grad(set_to_none=True)
    n = xb.shape[0]
    for start in range(0, n, max_physical_batch_size):
        x, y = xb[start : start + max_physical_batch_size], yb[start : start + max_physical_batch_size]
        (_loss(run, x.to(run.device), y.to(run.device)) * (x.shape[0] / n)).backward()
    run.optim.step()
    run.steps += 1


def _private_step(run: _Run, xb: torch.Tensor, yb: torch.Tensor, grad_sample_mode: str) -> None:
    """One physical batch of DP-SGD; Opacus steps (clips, noises, accounts) at the end of its logical batch."""
    assert run.optim is not None
    run.optim.zero_grad(set_to_none=True)  # keeps the summed clipped gradients of a logical batch
    xb, yb = xb.to(run.device), yb.to(run.device)
    if xb.shape[0] == 0 and grad_sample_mode in _NO_EMPTY_BATCH_MODES:
        # These modes cannot run a batch of 0 (ExpandedWeights / vmap refuse it); hand
        # Opacus the empty per-sample gradients the other modes would produce.
        for p in run.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    elif xb.shape[0] == 0:
        # An empty Poisson batch still takes a (pure-noise) DP step: the accountant counts it
        # and planned_steps includes it. A zero loss gives Opacus empty per-sample gradients.
        with _autocast(run.device):
            run.train_module(xb).sum().backward()  # type: ignore[misc]
    else:
        _loss(run, xb, yb).backward()
    run.optim.step()
    if _stepped(run):
        run.steps += 1


def _proximal_pull(run: _Run, rate: float) -> None:
    """FedProx as post-processing: w <- w - lr*mu*(w - w_global).

    It reads only the current and global weights, never the data, so by the
    post-processing property it leaves the DP guarantee untouched (a proximal
    *loss* term would not flow through Opacus' per-sample gradients anyway).
    """
    with torch.no_grad():
        for p, g in zip(run.params, run.global_params, strict=True):
            p.sub_(rate * (p - g))


def _save_optimizer_state(run: _Run, state: dict[str, Any] | None) -> None:
    if state is not None:
        inner = getattr(run.optim, "original_optimizer", run.optim)  # Opacus' DPOptimizer wraps the real one
        state.clear()
        state.update(inner.state_dict())  # type: ignore[union-attr]


def _detach(run: _Run) -> None:
    """Hand back the same plain module: remove Opacus' hooks and whatever it attached to modules and parameters."""
    if run.gsm is not None:
        run.gsm._close()
    for p, before in zip(run.params, run.param_attrs, strict=True):
        for attr in set(vars(p)) - before:
            delattr(p, attr)
        p.grad = None
    for mod, before, full_hook_flag in run.module_attrs:
        for attr in set(vars(mod)) - before:
            delattr(mod, attr)
        mod._is_full_backward_hook = full_hook_flag
    run.model.train(run.was_training)
