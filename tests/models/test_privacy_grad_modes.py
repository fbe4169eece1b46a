"""Every Opacus per-sample-gradient mode trains the same DP-SGD step: same clipping, same account."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from medfed.settings import RunConfig
from models.accounting import make_accountant
from models.network import build_model
from models.registry import DEFAULT_MODE, grad_sample_mode
from models.training import DEFAULT_GRAD_SAMPLE_MODE, GRAD_SAMPLE_MODES, DPSettings, train_local
from tests.models_factory import torch_threads


def _train(mode: str, ds: TensorDataset, noise: float) -> tuple[dict[str, torch.Tensor], list]:
    torch.manual_seed(0)
    model = build_model(16)
    acc = make_accountant("rdp")
    with torch_threads(1):
        # 12 examples, batch 3: Poisson batches of 0 occur, so the empty-batch path of each mode runs too
        train_local(model, ds, epochs=3, batch_size=3, lr=0.1, dp=DPSettings(noise, 0.05), accountant=acc,
                    seed=5, grad_sample_mode=mode)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, acc.history


def test_modes_agree_without_noise() -> None:
    gen = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(12, 1, 16, 16, generator=gen), (torch.rand(12, generator=gen) < 0.5).long())
    start = build_model(16).state_dict()
    ref, ref_hist = _train("hooks", ds, 0.0)
    assert any(not torch.allclose(ref[k], start[k]) for k in ref if k in start)
    for mode in GRAD_SAMPLE_MODES[1:]:
        got, hist = _train(mode, ds, 0.0)
        assert hist == ref_hist == [(0.0, 0.25, 12)]
        for k in ref:
            # clip 0.05 binds on every example, so a mode that clipped differently would drift
            assert torch.allclose(got[k], ref[k], atol=1e-5, rtol=1e-4), (mode, k)


def test_run_default_is_each_networks_fastest_mode_and_valid() -> None:
    """``auto`` resolves per network to the measured fastest mode; an explicit mode is kept as given."""
    assert RunConfig().grad_sample_mode == "auto"
    assert set(RunConfig.model_fields["grad_sample_mode"].annotation.__args__) == {"auto", *GRAD_SAMPLE_MODES}
    assert grad_sample_mode("scatter-head", "auto") == DEFAULT_GRAD_SAMPLE_MODE in GRAD_SAMPLE_MODES
    assert grad_sample_mode("efficientnet-b0", "auto") == DEFAULT_MODE["efficientnet-b0"] == "functorch"
    assert all(grad_sample_mode(name, "auto") in GRAD_SAMPLE_MODES for name in DEFAULT_MODE)
    assert grad_sample_mode("efficientnet-b0", "ghost") == "ghost"
    with pytest.raises(ValueError, match="grad_sample_mode must be one of"):
        train_local(build_model(16), TensorDataset(torch.zeros(2, 1, 16, 16), torch.zeros(2)), epochs=1,
                    batch_size=1, lr=0.1, dp=DPSettings(1.0, 1.0), grad_sample_mode="vmap")
