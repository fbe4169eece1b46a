"""The networks a study may name, built so that Opacus can train them privately.

Why a registry: a consortium picks its network by name in the study file and
every site and the coordinator must build the same thing from it, with the same
parameter layout. The scattering head (`models.network`) suits tiny data under
DP; for real images the published answer is fine-tuning a pretrained,
BatchNorm-free network (De et al. 2022; Berrada et al. 2023), so the MONAI
networks here use GroupNorm (through their own ``norm=`` argument).

A network is prepared in four steps, each its own function so that tests and
tools can use one alone: :func:`build_network` (fresh weights),
:func:`load_initial_weights` (a local file the study pins by SHA-256; nothing is
ever downloaded), :func:`apply_trainable` (freeze what the study does not train)
and :func:`check_private` (refuse what Opacus cannot train privately);
:func:`prepare_network` runs all four.

What a site exchanges is ``model.state_dict()``. When the frozen part is a
prefix of the network (``trainable = "head"`` or ``"last-block"``) the model is
a :class:`SplitNetwork`: its frozen front is held outside the module tree, so its
state dict, parameters and Opacus' view are the trained part only, and
`models.features` computes the front's output once per dataset. With ``all`` or
``norm-and-bias`` the state dict is the whole network (frozen tensors included,
identical at every site).
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medfed.settings import ConfigError
from models.network import IMAGE_MULTIPLE, MIN_IMAGE_SIZE, ScatterCTNet
from models.study import NETWORKS, TRAINABLE, Study
from models.training import DEFAULT_GRAD_SAMPLE_MODE

logger = logging.getLogger(__name__)

#: GroupNorm groups per network: every normalised channel count must divide by it
#: (DenseNet's and ResNet's are multiples of 32; EfficientNet-B0's of 8: 16, 24, 40, 112 ...).
GROUPS: dict[str, int] = {"densenet121": 32, "resnet18": 32, "resnet50": 32, "efficientnet-b0": 8}
#: The fastest Opacus per-sample-gradient mode per network on CPU (bench/dp_networks.py, bench/RESULTS.md);
#: a run's ``grad-sample-mode = "auto"`` (the default) trains each network in its own.
DEFAULT_MODE: dict[str, str] = {
    "scatter-head": DEFAULT_GRAD_SAMPLE_MODE,
    "densenet121": "ew",
    "resnet18": "ew",
    "resnet50": "ew",
    "efficientnet-b0": "functorch",
}
#: Bytes read at a time when hashing a weights file.
_CHUNK = 1 << 20


def grad_sample_mode(network: str, requested: str) -> str:
    """The Opacus mode a site trains ``network`` with: the run's choice, or for ``auto`` the fastest measured."""
    return DEFAULT_MODE[network] if requested == "auto" else requested


class NetworkError(ConfigError):
    """A network or its initial weights cannot be used; the message says what to do."""


class SplitNetwork(nn.Module):
    """A frozen front, then the trained part: ``model(x) == trainable(fixed_front(x))``.

    The front is kept out of the module tree (not a registered child), so the
    state dict, ``parameters()`` and Opacus see only the trained part; it still
    follows ``.to()`` and stays in eval mode (it is a fixed function of the image).
    """

    def __init__(self, front: nn.Module, trained: nn.Module) -> None:
        super().__init__()
        for p in front.parameters():
            p.requires_grad_(False)
        self.__dict__["_front"] = front.eval()
        self.trainable = trained

    @property
    def fixed_front(self) -> nn.Module:
        return self.__dict__["_front"]

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> SplitNetwork:  # type: ignore[override]
        self.fixed_front._apply(fn)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> SplitNetwork:
        super().train(mode)
        self.fixed_front.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trainable(self.fixed_front(x))


def _residual_classes() -> tuple[type[nn.Module], type[nn.Module]]:
    """MONAI's residual blocks with ``out = out + residual`` instead of ``out += residual`` (same numbers)."""
    from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck

    class Block(ResNetBlock):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
            residual = x if self.downsample is None else self.downsample(x)
            return self.act(out + residual)

    class Bottleneck(ResNetBottleneck):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.act(self.bn1(self.conv1(x)))
            out = self.bn3(self.conv3(self.act(self.bn2(self.conv2(out)))))
            residual = x if self.downsample is None else self.downsample(x)
            return self.act(out + residual)

    Block.__name__, Bottleneck.__name__ = "ResNetBlock", "ResNetBottleneck"
    return Block, Bottleneck


_ResNetBlock, _ResNetBottleneck = _residual_classes()


# ---- building ---------------------------------------------------------------------------------
def _scatter_head(study: Study) -> nn.Module:
    size = study.image_size
    if size < MIN_IMAGE_SIZE or size % IMAGE_MULTIPLE:
        raise NetworkError(f"the scatter-head network needs an image size that is a multiple of {IMAGE_MULTIPLE} and "
                           f"at least {MIN_IMAGE_SIZE} (got {size}); change image-size in the study")
    if study.in_channels != 1:
        raise NetworkError("the scatter-head network takes one channel; choose a MONAI network for more")
    return ScatterCTNet(image_size=size, num_outputs=study.num_outputs)


def _densenet121(study: Study) -> nn.Module:
    from monai.networks.nets import DenseNet121

    return DenseNet121(spatial_dims=2, in_channels=study.in_channels, out_channels=study.num_outputs,
                       norm=("group", {"num_groups": GROUPS["densenet121"]}))


def _resnet(depth: int) -> Callable[[Study], nn.Module]:
    def build(study: Study) -> nn.Module:
        from monai.networks.nets import resnet18, resnet50
        from opacus.validators import ModuleValidator

        make = {18: resnet18, 50: resnet50}[depth]
        # Stride-2 stem as in He et al.'s ImageNet ResNet (MONAI defaults to 1, which quadruples the cost).
        model = make(spatial_dims=2, n_input_channels=study.in_channels, num_classes=study.num_outputs,
                     conv1_t_stride=2, norm=("group", {"num_groups": GROUPS[f"resnet{depth}"]}))
        # MONAI 1.6 does not pass ``norm`` on to the residual blocks: Opacus' fixer swaps their
        # BatchNorms for GroupNorm(min(32, C), C) (all ResNet widths are multiples of 32).
        return ModuleValidator.fix(model)

    return build


def _efficientnet_b0(study: Study) -> nn.Module:
    from monai.networks.nets import EfficientNetBN

    model = EfficientNetBN("efficientnet-b0", pretrained=False, progress=False, spatial_dims=2,
                           in_channels=study.in_channels, num_classes=study.num_outputs,
                           norm=("group", {"num_groups": GROUPS["efficientnet-b0"]}))
    # The memory-efficient swish is a custom autograd Function that functorch cannot vmap; plain swish is the same.
    model.set_swish(memory_efficient=False)
    return model


_BUILDERS: dict[str, Callable[[Study], nn.Module]] = {
    "scatter-head": _scatter_head,
    "densenet121": _densenet121,
    "resnet18": _resnet(18),
    "resnet50": _resnet(50),
    "efficientnet-b0": _efficientnet_b0,
}
assert set(_BUILDERS) == set(NETWORKS) == set(DEFAULT_MODE)


def _out_of_place(model: nn.Module) -> nn.Module:
    """No in-place activations or residual sums: Opacus' backward hooks refuse a layer output modified in place."""
    from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck

    for mod in model.modules():
        if isinstance(getattr(mod, "inplace", None), bool):
            mod.inplace = False
        if type(mod) is ResNetBlock:
            mod.__class__ = _ResNetBlock
        elif type(mod) is ResNetBottleneck:
            mod.__class__ = _ResNetBottleneck
    return model


def build_network(study: Study) -> nn.Module:
    """The study's network with fresh weights: ``(B, in_channels, S, S)`` images to ``(B, num_outputs)`` logits.

    Every site and the coordinator build it from the same study, so parameter arrays line up.
    """
    model = _out_of_place(_BUILDERS[study.network.name](study))
    logger.debug("built %s for %d channel(s), %d px, %d output(s): %d parameters", study.network.name,
                 study.in_channels, study.image_size, study.num_outputs, sum(p.numel() for p in model.parameters()))
    return model


# ---- the network as stages: what "head" and "last-block" mean -------------------------------
def _stages(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], str, str]:
    """``(stages, first stage of the last block, first stage of the head)``: the network run in order.

    Running the stages one after the other is the network's own ``forward``.
    """
    from monai.networks.nets import DenseNet, EfficientNet, ResNet

    if isinstance(model, DenseNet):
        stages = [*model.features.named_children(), *model.class_layers.named_children()]
        return stages, "denseblock4", "out"
    if isinstance(model, ResNet):
        names = ["conv1", "bn1", "act", *([] if model.no_max_pool else ["maxpool"]),
                 "layer1", "layer2", "layer3", "layer4", "avgpool"]
        stages = [(n, getattr(model, n)) for n in names] + [("flatten", nn.Flatten(1)), ("fc", model.fc)]
        return stages, "layer4", "fc"
    if isinstance(model, EfficientNet):
        blocks = list(model._blocks.named_children())
        stages = [("stem_padding", model._conv_stem_padding), ("stem", model._conv_stem), ("bn0", model._bn0),
                  ("swish0", model._swish), *[(f"blocks{n}", b) for n, b in blocks],
                  ("head_padding", model._conv_head_padding), ("conv_head", model._conv_head), ("bn1", model._bn1),
                  ("swish1", model._swish), ("pool", model._avg_pooling), ("flatten", nn.Flatten(1)),
                  ("dropout", model._dropout), ("fc", model._fc)]
        return stages, f"blocks{blocks[-1][0]}", "fc"
    raise NetworkError(f"{type(model).__name__} is not a network of models.registry; build it with build_network")


def head_module(model: nn.Module) -> nn.Module:
    """The last layer (the classifier): fresh for a new task, so always trained."""
    if isinstance(model, ScatterCTNet):
        return model.classifier.head
    stages, _, head = _stages(model)
    return dict(stages)[head]


def _head_prefix(model: nn.Module) -> str:
    """State-dict prefix of the head's tensors (a weights file may omit them)."""
    head = head_module(model)
    for name, mod in model.named_modules():
        if mod is head:
            return f"{name}."
    raise NetworkError("the network's head is not one of its modules")  # pragma: no cover - by construction


def apply_trainable(model: nn.Module, part: str) -> nn.Module:
    """Freeze all but ``part`` (``all | last-block | head | norm-and-bias``) and return the model to train.

    ``head`` and ``last-block`` freeze a prefix of the network: the result is a
    :class:`SplitNetwork` whose fixed front `models.features` precomputes once per
    dataset. ``norm-and-bias`` trains every normalisation layer, every bias and
    the head in place. ``all`` trains everything. The scattering network's front
    has no weights, so its ``head`` and ``all`` are the same.
    """
    if part not in TRAINABLE:
        raise NetworkError(f"trainable must be one of {', '.join(TRAINABLE)} (got {part!r})")
    for p in model.parameters():
        p.requires_grad_(True)
    if isinstance(model, ScatterCTNet):
        if part not in ("all", "head"):
            raise NetworkError("the scatter-head network has a fixed front end: trainable must be all or head")
        return model
    if part == "all":
        return model
    if part == "norm-and-bias":
        return _norm_and_bias(model)
    return _split(model, part)


def _norm_and_bias(model: nn.Module) -> nn.Module:
    """Train every normalisation scale and shift, every bias and the head; freeze the rest in place."""
    keep = {id(p) for m in model.modules() if isinstance(m, nn.GroupNorm | nn.LayerNorm) for p in m.parameters()}
    keep |= {id(p) for p in head_module(model).parameters()}
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) in keep or name.endswith(".bias"))
    return model


def _split(model: nn.Module, part: str) -> SplitNetwork:
    """Freeze the stages before the last block (``last-block``) or before the head (``head``)."""
    stages, last_block, head_name = _stages(model)
    cut = [n for n, _ in stages].index(last_block if part == "last-block" else head_name)
    front = nn.Sequential(OrderedDict(stages[:cut]))
    trained = nn.Sequential(OrderedDict(stages[cut:]))
    return SplitNetwork(front, trained)


# ---- privacy check ---------------------------------------------------------------------------
def check_private(model: nn.Module) -> None:
    """Refuse a network Opacus cannot train privately, naming each offending layer and the fix.

    Any BatchNorm is refused, frozen or not: in training mode it normalises each
    example by its batch's statistics, so one patient's output depends on the others'.
    Other layers go through Opacus' own validators where they have trainable weights.
    """
    from opacus.validators import ModuleValidator

    batchnorms: list[str] = []
    problems: list[str] = []
    for name, mod in model.named_modules():
        label = f"{name or type(model).__name__} ({type(mod).__name__})"
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            batchnorms.append(label)
            continue
        validator = ModuleValidator.VALIDATORS.get(type(mod))
        if validator is not None and any(p.requires_grad for p in mod.parameters(recurse=False)):
            problems += [f"layer {label}: {str(err).split('. ')[0]}; opacus.validators.ModuleValidator.fix(model) "
                         "replaces it with a DP-ready layer" for err in validator(mod)]
    if batchnorms:
        more = f" and {len(batchnorms) - 3} more" if len(batchnorms) > 3 else ""
        problems.insert(0, f"layer {', '.join(batchnorms[:3])}{more}: BatchNorm mixes the examples of a batch; "
                        "replace it with GroupNorm (build the network with norm=('group', {'num_groups': G}) "
                        "or run opacus.validators.ModuleValidator.fix(model), then retrain)")
    if problems:
        raise NetworkError("this network cannot be trained with DP-SGD:\n  " + "\n  ".join(problems))


# ---- initial weights -------------------------------------------------------------------------
def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def load_initial_weights(model: nn.Module, study: Study, base_dir: str | Path) -> bool:
    """Load ``study.network.weights`` (relative to ``base_dir``) into ``model``; False when the study names none.

    The file's SHA-256 must equal the study's ``weights-sha256`` before it is
    read as tensors (``torch.load(weights_only=True)``: no code runs). It holds a
    state dict of :func:`build_network`'s network for this study, before
    :func:`apply_trainable`; it may leave out the head (the last layer), which then
    keeps its fresh weights, as when weights learnt for other classes are fine-tuned.
    Any other missing, extra or mis-shaped tensor is refused and nothing is loaded.
    """
    net = study.network
    if net.weights is None or net.weights_sha256 is None:
        return False
    path = Path(base_dir) / net.weights
    if not path.is_file():
        raise NetworkError(f"initial weights {path} do not exist; put the file the study pins there "
                           "(network.weights is relative to the study file's folder)")
    found = file_sha256(path)
    if found != net.weights_sha256:
        raise NetworkError(f"initial weights {path} have SHA-256 {found}, but the study pins {net.weights_sha256}; "
                           "use the exact file the consortium approved (nothing is loaded)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise NetworkError(f"initial weights {path} are not a PyTorch state dict ({type(err).__name__}: {err}); "
                           "save them with torch.save(model.state_dict(), FILE)") from None
    _check_state(model, state, path)
    model.load_state_dict(state, strict=False)
    logger.info("loaded initial weights %s (sha256 %s…) into %s", path, found[:12], net.name)
    return True


def _some(label: str, keys: list[str]) -> str:
    return f"{label} {', '.join(keys[:3])}" + ("…" if len(keys) > 3 else "")


def _mismatch(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], head: str) -> str:
    """What in ``state`` does not fit ``own`` (empty when it fits); the head's tensors may be missing."""
    extra = sorted(set(state) - set(own))
    missing = sorted(k for k in set(own) - set(state) if not k.startswith(head))
    wrong = sorted(k for k in set(state) & set(own) if state[k].shape != own[k].shape)
    parts = [_some("unexpected", extra)] if extra else []
    parts += [_some("missing", missing)] if missing else []
    parts += [f"{k} is {tuple(state[k].shape)}, the network's {tuple(own[k].shape)}" for k in wrong[:3]]
    return "; ".join(parts)


def _check_state(model: nn.Module, state: object, path: Path) -> None:
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise NetworkError(f"initial weights {path} are not a state dict (names to tensors); "
                           "save them with torch.save(model.state_dict(), FILE)")
    head = _head_prefix(model)
    detail = _mismatch(model.state_dict(), state, head)
    if detail:
        raise NetworkError(f"initial weights {path} do not fit the study's {type(model).__name__} ({detail}); "
                           "save build_network(study).state_dict() for the same network, channels and classes "
                           f"(the head, {head}*, may be left out); nothing is loaded")


def prepare_network(study: Study, base_dir: str | Path | None = None) -> nn.Module:
    """The network a site trains for ``study``: built, initial weights loaded, frozen as asked, checked for DP."""
    model = build_network(study)
    if study.network.weights is not None:
        if base_dir is None:
            raise NetworkError("the study pins initial weights: give the study file's folder to find them")
        load_initial_weights(model, study, base_dir)
    model = apply_trainable(model, study.network.trainable)
    check_private(model)
    return model
