"""The network registry: every network builds, is DP-trainable, loads only pinned weights, freezes what it says."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from models import features
from models.registry import (
    DEFAULT_MODE,
    NetworkError,
    SplitNetwork,
    apply_trainable,
    build_network,
    check_private,
    head_module,
    load_initial_weights,
    prepare_network,
)
from models.study import NETWORKS, TRAINABLE, Study
from models.training import GRAD_SAMPLE_MODES, DPSettings, train_local
from tests.models_factory import torch_threads

MONAI = [n for n in NETWORKS if n != "scatter-head"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


def _study(name: str, *, channels: int = 1, size: int = 64, task: str = "multiclass", **network: object) -> Study:
    classes = {"binary": ["absent", "present"], "multiclass": ["a", "b", "c"], "multilabel": ["x", "y"]}[task]
    modality = {"modality": "US"} if channels == 3 else {"modality": "CT"}
    return Study.model_validate({"task": task, "classes": classes, "image-size": size, **modality,
                                 "network": {"name": name, **network}})


def _flat(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _data(n: int, channels: int, size: int, task: str = "binary") -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, channels, size, size, generator=gen)
    y = {"binary": (torch.arange(n) % 2).float(), "multiclass": torch.arange(n) % 3,
         "multilabel": torch.stack([torch.arange(n) % 2, torch.arange(n) // 2 % 2], 1).float()}[task]
    return TensorDataset(x, y)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", NETWORKS)
def test_every_network_builds_for_the_study_and_is_private(name: str, channels: int) -> None:
    if name == "scatter-head" and channels == 3:
        with pytest.raises(ValueError, match="scatter-head network takes one channel"):
            _study(name, channels=3)
        return
    study = _study(name, channels=channels)
    assert study.in_channels == channels
    model = build_network(study)
    check_private(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    out = model.eval()(torch.randn(2, channels, 64, 64))
    assert out.shape == (2, 3)
    # same layout at every site
    assert [(k, v.shape) for k, v in build_network(study).state_dict().items()] == \
           [(k, v.shape) for k, v in model.state_dict().items()]


@pytest.mark.parametrize("name", NETWORKS)
def test_one_dp_sgd_step_in_the_default_mode_and_in_ghost(name: str) -> None:
    """A real DP-SGD step through the whole network, per-sample gradients in its default mode and ghost clipping."""
    study = _study(name, size=32, task="binary")
    data = _data(4, 1, 32)
    for mode in dict.fromkeys([DEFAULT_MODE[name], "ghost"]):
        torch.manual_seed(0)
        model = build_network(study)
        before = _flat(model)
        out = train_local(model, data, epochs=1, batch_size=4, lr=0.05, dp=DPSettings(1.0, 1.0), seed=0,
                          grad_sample_mode=mode)
        assert out.steps == 1
        after = model.state_dict()
        moved = [k for k, p in model.named_parameters() if not torch.equal(before[k], after[k])]
        assert len(moved) == sum(1 for _ in model.parameters()), (name, mode)
        assert all(torch.isfinite(v).all() for v in after.values())
        for p in model.parameters():
            assert not hasattr(p, "grad_sample") and p.grad is None


def test_default_modes_are_known_modes() -> None:
    assert set(DEFAULT_MODE) == set(NETWORKS) and set(DEFAULT_MODE.values()) <= set(GRAD_SAMPLE_MODES)


def test_a_network_with_batchnorm_is_refused_naming_the_layer() -> None:
    from monai.networks.nets import DenseNet121

    with pytest.raises(NetworkError, match=r"features\.norm0 \(BatchNorm2d\).*GroupNorm"):
        check_private(DenseNet121(spatial_dims=2, in_channels=1, out_channels=1))
    frozen = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(1))
    for p in frozen[1].parameters():
        p.requires_grad_(False)
    # frozen or not, a BatchNorm in training mode mixes the examples of a batch
    with pytest.raises(NetworkError, match=r"layer 1 \(BatchNorm2d\)"):
        check_private(frozen)


def test_opacus_validators_run_on_other_layers() -> None:
    """Layers Opacus' own validators refuse (here an LSTM) are named with Opacus' fix."""
    with pytest.raises(NetworkError, match=r"layer rnn \(LSTM\).*ModuleValidator\.fix"):
        check_private(nn.ModuleDict({"rnn": nn.LSTM(4, 4)}))


# ---- initial weights ---------------------------------------------------------------------------
def _pin(tmp_path: Path, state: object, name: str = "init.pt") -> tuple[str, str]:
    path = tmp_path / name
    torch.save(state, path)
    return name, hashlib.sha256(path.read_bytes()).hexdigest()


def test_pinned_weights_load_and_a_head_left_out_stays_fresh(tmp_path: Path) -> None:
    study0 = _study("resnet18", size=32)
    torch.manual_seed(1)
    source = build_network(study0).state_dict()
    without_head = {k: v for k, v in source.items() if not k.startswith("fc.")}
    for state in (source, without_head):
        name, digest = _pin(tmp_path, state)
        study = _study("resnet18", size=32, weights=name, **{"weights-sha256": digest})
        torch.manual_seed(2)
        model = build_network(study)
        fresh_head = head_module(model).weight.detach().clone()
        assert load_initial_weights(model, study, tmp_path) is True
        got = model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in without_head.items())
        expected_head = source["fc.weight"] if state is source else fresh_head
        assert torch.equal(got["fc.weight"], expected_head)
    assert load_initial_weights(build_network(study0), study0, tmp_path) is False


@pytest.mark.adversarial
def test_weights_with_a_wrong_hash_are_refused_and_nothing_is_loaded(tmp_path: Path) -> None:
    name, digest = _pin(tmp_path, build_network(_study("densenet121", size=32)).state_dict())
    study = _study("densenet121", size=32, weights=name, **{"weights-sha256": "0" * 64})
    model = build_network(study)
    before = _flat(model)
    with pytest.raises(NetworkError, match=f"SHA-256 {digest}, but the study pins 0000"):
        load_initial_weights(model, study, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(NetworkError, match="do not exist"):
        load_initial_weights(model, study, tmp_path / "elsewhere")
    with pytest.raises(NetworkError, match="give the study file's folder"):
        prepare_network(study)


@pytest.mark.adversarial
def test_a_pinned_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    """Even a file the study pins is read with weights_only: a pickle that runs code is refused, unrun."""
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self) -> tuple:
            return (Path.touch, (marker,))

    name, digest = _pin(tmp_path, {"w": Evil()})
    study = _study("resnet18", size=32, weights=name, **{"weights-sha256": digest})
    with pytest.raises(NetworkError, match="not a PyTorch state dict"):
        load_initial_weights(build_network(study), study, tmp_path)
    assert not marker.exists()


def test_weights_of_another_network_are_refused_naming_the_tensor(tmp_path: Path) -> None:
    three = build_network(_study("resnet18", channels=3, size=32)).state_dict()
    name, digest = _pin(tmp_path, three)
    study = _study("resnet18", size=32, weights=name, **{"weights-sha256": digest})
    model = build_network(study)
    before = _flat(model)
    with pytest.raises(NetworkError, match=r"conv1\.weight is \(64, 3, 7, 7\), the network's \(64, 1, 7, 7\)"):
        load_initial_weights(model, study, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    name, digest = _pin(tmp_path, {k: v for k, v in three.items() if not k.startswith("layer4.")}, "cut.pt")
    with pytest.raises(NetworkError, match=r"missing layer4\."):
        load_initial_weights(model, _study("resnet18", channels=3, size=32, weights=name,
                                           **{"weights-sha256": digest}), tmp_path)
    name, digest = _pin(tmp_path, [1, 2], "list.pt")
    with pytest.raises(NetworkError, match="not a state dict"):
        load_initial_weights(model, _study("resnet18", size=32, weights=name, **{"weights-sha256": digest}), tmp_path)


# ---- what is trained ---------------------------------------------------------------------------
def _trained_names(model: nn.Module) -> set[str]:
    return {k for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", MONAI)
def test_trainable_parts_freeze_what_they_say(name: str) -> None:
    study = _study(name, size=32)
    full = build_network(study)
    total = sum(1 for _ in full.parameters())
    head = head_module(full)
    head_count = sum(p.numel() for p in head.parameters())

    assert _trained_names(apply_trainable(build_network(study), "all")) == {k for k, _ in full.named_parameters()}

    nb = apply_trainable(build_network(study), "norm-and-bias")
    assert not isinstance(nb, SplitNetwork)
    trained = _trained_names(nb)
    norms = {f"{m}.{p}" for m, mod in nb.named_modules() if isinstance(mod, nn.GroupNorm)
             for p, _ in mod.named_parameters()}
    assert norms and norms <= trained
    head_ids = {id(p) for p in head_module(nb).parameters()}
    assert head_ids <= {id(nb.get_parameter(k)) for k in trained}
    assert all(k in norms or k.endswith(".bias") or id(nb.get_parameter(k)) in head_ids for k in trained)
    convs = [k for k, mod in nb.named_modules() if isinstance(mod, nn.Conv2d)]
    assert convs and not any(nb.get_parameter(f"{c}.weight").requires_grad for c in convs)
    assert 0 < len(trained) < total

    hd = apply_trainable(build_network(study), "head")
    assert isinstance(hd, SplitNetwork)
    assert sum(p.numel() for p in hd.parameters()) == head_count
    assert all(p.requires_grad for p in hd.parameters())
    assert not any(p.requires_grad for p in hd.fixed_front.parameters())

    lb = apply_trainable(build_network(study), "last-block")
    n_last = sum(p.numel() for p in lb.parameters())
    assert head_count < n_last < sum(p.numel() for p in full.parameters())
    # exchanged state = the trained part only; frozen front outside the module tree
    assert set(lb.state_dict()) == {f"trainable.{k}" for k in lb.trainable.state_dict()}
    assert not any(p.requires_grad for p in lb.fixed_front.parameters())


@pytest.mark.parametrize("part", ["head", "last-block"])
@pytest.mark.parametrize("name", MONAI)
def test_split_network_is_the_whole_network(name: str, part: str) -> None:
    study = _study(name, size=32)
    torch.manual_seed(0)
    whole = build_network(study).eval()
    x = torch.randn(3, 1, 32, 32)
    expected = whole(x)
    split = apply_trainable(whole, part)
    split.train()
    assert not split.fixed_front.training  # a fixed function of the image
    split.eval()
    torch.testing.assert_close(split(x), expected)
    torch.testing.assert_close(split(x), split.trainable(split.fixed_front(x)))
    split.double()  # .to() reaches the front although it is not a registered child
    assert next(split.fixed_front.parameters()).dtype == torch.float64
    check_private(split)


def test_scatter_head_trains_all_or_head_only() -> None:
    model = build_network(_study("scatter-head"))
    assert apply_trainable(model, "head") is model and apply_trainable(model, "all") is model
    with pytest.raises(NetworkError, match="trainable must be all or head"):
        apply_trainable(model, "last-block")
    with pytest.raises(NetworkError, match="trainable must be one of"):
        apply_trainable(model, "everything")
    assert set(TRAINABLE) == {"all", "last-block", "head", "norm-and-bias"}


def test_prepare_network_fine_tunes_the_last_block_on_precomputed_features(tmp_path: Path) -> None:
    """End to end: pinned weights, last block trained privately; the front runs once per dataset."""
    torch.manual_seed(3)
    name, digest = _pin(tmp_path, build_network(_study("densenet121", size=32, task="binary")).state_dict())
    study = _study("densenet121", size=32, task="binary", weights=name, trainable="last-block",
                   **{"weights-sha256": digest})
    model = prepare_network(study, tmp_path)
    assert isinstance(model, SplitNetwork)
    calls = []
    model.fixed_front.register_forward_hook(lambda *_: calls.append(1))
    data = _data(8, 1, 32)
    before = _flat(model)
    for _ in range(2):
        out = train_local(model, data, epochs=1, batch_size=4, lr=0.05, dp=DPSettings(1.0, 1.0), seed=0,
                          grad_sample_mode=DEFAULT_MODE["densenet121"])
        assert out.steps == 2
    assert len(calls) == 2  # features: one size probe and one pass over the 8 images, reused in round 2
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_features_of_fronts_with_different_weights_are_not_shared() -> None:
    data = _data(4, 1, 32)
    a = apply_trainable(build_network(_study("resnet18", size=32)), "head")
    b = apply_trainable(build_network(_study("resnet18", size=32)), "head")
    fa, fb = features.precompute(a.fixed_front, data), features.precompute(b.fixed_front, data)
    assert fa is not None and fb is not None and not torch.equal(fa.tensors[0], fb.tensors[0])
    assert features.precompute(a.fixed_front, data) is fa


def test_features_keep_multiclass_and_multilabel_targets() -> None:
    for task, shape in (("multiclass", (6,)), ("multilabel", (6, 2))):
        model = apply_trainable(build_network(_study("resnet18", size=32, task=task)), "head")
        feats = features.precompute(model.fixed_front, _data(6, 1, 32, task))
        assert feats is not None and feats.tensors[1].shape == shape
