"""The fixed scattering front end: the same transform as the reference, and what it must guarantee."""

from __future__ import annotations

import pytest
import torch

from models.scattering import Scattering2D, num_coefficients, padded_size


@pytest.mark.parametrize(("size", "J"), [(64, 2), (32, 2), (32, 3), (16, 1)])
def test_matches_kymatio(size: int, J: int) -> None:
    """Same filters, padding and subsampling as kymatio's 2-D scattering, channel for channel."""
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    torch.manual_seed(size + J)
    x = torch.randn(5, 1, size, size)
    ref = ScatteringTorch2D(J=J, shape=(size, size), L=8)(x)[:, 0]
    ours = Scattering2D(size, J=J)(x)
    assert ours.shape == ref.shape == (5, num_coefficients(J), size // 2**J, size // 2**J)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_batches_are_independent_of_chunking() -> None:
    """A batch larger than the internal chunk gives the same result as one image at a time."""
    s = Scattering2D(32)
    x = torch.randn(40, 1, 32, 32)
    whole = s(x)
    singles = torch.cat([s(x[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(whole, singles)


def test_no_parameters_and_nothing_in_the_state_dict() -> None:
    """The filters are fixed: nothing to train, nothing for a site to send."""
    s = Scattering2D(64)
    assert list(s.parameters()) == []
    assert s.state_dict() == {}
    assert len(list(s.buffers())) > 0


def test_invariant_to_small_translations_of_a_blob() -> None:
    """Low-passed at scale 2**J, the coefficients of a blob barely move when it shifts by one pixel."""
    size = 64
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")

    def blob(cx: float, cy: float) -> torch.Tensor:
        return torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 3.0**2)).float()[None, None]

    s = Scattering2D(size)
    a, b = s(blob(30, 30)), s(blob(31, 30))
    far = s(blob(30, 30) * 0 + blob(12, 50))
    assert float((a - b).norm() / a.norm()) < 0.25
    assert float((a - far).norm() / a.norm()) > 0.5


def test_finds_a_faint_lesion_where_it_is() -> None:
    """A faint 8-pixel lesion in noise lights up the coarse first-order channels at its place."""
    torch.manual_seed(0)
    size = 64
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    noise = 0.05 * torch.randn(1, 1, size, size)
    lesion = 0.3 * (((xx - 40) ** 2 + (yy - 24) ** 2) < 16).float()[None, None]
    s = Scattering2D(size)
    coarse = slice(1 + 8, 1 + 16)  # first order, j = 1, all eight angles
    plain = s(noise)[0, coarse].mean(0)
    seen = s(noise + lesion)[0, coarse].mean(0)
    assert float(seen.max()) > 2 * float(plain.max())
    row, col = divmod(int(seen.argmax()), seen.shape[1])
    assert abs(row - 24 // 4) <= 1 and abs(col - 40 // 4) <= 1


def test_padded_grid() -> None:
    assert padded_size(64, 2) == 72
    assert padded_size(32, 2) == 40
    assert padded_size(64, 3) == 80


@pytest.mark.parametrize(("size", "J", "L"), [(30, 2, 8), (4, 2, 8), (64, 0, 8), (64, 2, 0)])
def test_refuses_what_it_cannot_transform(size: int, J: int, L: int) -> None:
    with pytest.raises(ValueError):
        Scattering2D(size, J=J, L=L)


def test_refuses_wrong_input_shape() -> None:
    with pytest.raises(ValueError, match=r"\(B, 1, 32, 32\)"):
        Scattering2D(32)(torch.zeros(2, 1, 64, 64))


@pytest.mark.parametrize(("sigma", "slant", "summed"), [(0.8, 0.5, 4), (1.6, 0.5, 16), (1.6, 1.0, 4)])
def test_copies_that_underflow_are_skipped_and_the_filter_is_the_same_bit_for_bit(
        sigma: float, slant: float, summed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Building the filters is most of building a scattering head (every round, every site): a periodic
    copy whose every term underflows to 0.0 adds nothing, so skipping it changes no bit."""
    import math

    import numpy as np

    import models.scattering as scattering

    size = padded_size(64, 2)
    calls = []
    meshgrid = np.meshgrid
    monkeypatch.setattr(scattering.np, "meshgrid", lambda *a, **k: calls.append(1) or meshgrid(*a, **k))
    for theta in (0.0, 3 * math.pi / 8):
        fast = scattering.gabor_2d(size, sigma, theta, 0.75 * math.pi / sigma, slant)
        assert len(calls) == summed  # of 25 copies
        calls.clear()
        with monkeypatch.context() as every:
            every.setattr(scattering, "_UNDERFLOW", math.inf)
            full = scattering.gabor_2d(size, sigma, theta, 0.75 * math.pi / sigma, slant)
        assert len(calls) == 25 and fast.tobytes() == full.tobytes()
        calls.clear()
