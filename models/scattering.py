"""A fixed wavelet scattering transform (Mallat; Bruna & Mallat 2013), the network's front end.

Why a fixed front end: under DP-SGD every trained weight receives noise, and a
network that must first learn its own edge and blob detectors from noised
gradients spends much of its privacy budget getting there (on the synthetic
hospitals, a plain CNN sat at the prevalence for a quarter of the run).
Scattering coefficients are a public, data-independent function of the image
that already localises blobs and edges at several scales and orientations, so
only a small head is trained (Tramèr & Boneh, "Differentially Private Learning
Needs Better Features", ICLR 2021).

Why our own code: kymatio, the reference implementation, has had no release
since 0.3.0 (2022) and its ``kymatio.torch`` entry point fails to import with
current SciPy (``scipy.special.sph_harm`` is gone). This module computes the same
transform (same Morlet filters, reflection padding and Fourier-domain
subsampling; a test compares it with kymatio's 2-D code path) with one batched
FFT per scale instead of one per filter.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

#: Scales: the output is subsampled by 2**J (64x64 -> 16x16).
DEFAULT_J = 2
#: Orientations per scale.
DEFAULT_L = 8
#: Periodic copies summed on each side when a filter is sampled on the padded grid.
_PERIODS = 2
#: Images per pass: the second order's (images x L x L) spectra of 16 images stay in cache;
#: 256 at once ran 3x slower on CPU (measured at 64x64, one thread).
_CHUNK = 16


def num_coefficients(J: int = DEFAULT_J, L: int = DEFAULT_L) -> int:
    """Channels of the output: one low-pass, ``J*L`` first-order, ``L*L*J*(J-1)/2`` second-order."""
    return 1 + J * L + L * L * J * (J - 1) // 2


def padded_size(size: int, J: int) -> int:
    """The FFT grid: ``size`` rounded up to a multiple of ``2**J`` with one extra ``2**J`` border."""
    step = 2**J
    return ((size + step) // step + 1) * step


#: exp(-x) is exactly 0.0 in float64 for x above about 745.13; a margin for rounding in the quadratic form.
_UNDERFLOW = 800.0


def _gap(e: int, size: int) -> int:
    """Distance from the origin to the nearest of ``e * size + (0 .. size-1)``."""
    lo, hi = e * size, e * size + size - 1
    return 0 if lo <= 0 <= hi else min(abs(lo), abs(hi))


def gabor_2d(size: int, sigma: float, theta: float, xi: float, slant: float) -> np.ndarray:
    """A Gabor filter on a ``size`` x ``size`` periodic grid, centred at the origin.

    g(u) = exp(-u^T R D R^T u / (2 sigma^2) + i xi (cos theta, sin theta) . u) / (2 pi sigma^2 / slant),
    with D = diag(1, slant^2), summed over 5 x 5 periods so that wide envelopes wrap.
    """
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    curv = rot @ np.diag([1.0, slant * slant]) @ rot.T / (2.0 * sigma * sigma)
    base = np.arange(size, dtype=np.float64)
    out = np.zeros((size, size), dtype=np.complex128)
    # A copy whose every point is so far from the origin that exp(-quad) underflows to 0 in float64
    # adds exactly nothing: skip it (the same filters bit for bit; most copies of a narrow filter).
    floor = min(1.0, slant * slant) / (2.0 * sigma * sigma)  # smallest eigenvalue of curv
    for ex in range(-_PERIODS, _PERIODS + 1):
        for ey in range(-_PERIODS, _PERIODS + 1):
            if floor * (_gap(ex, size) ** 2 + _gap(ey, size) ** 2) > _UNDERFLOW:
                continue
            xx, yy = np.meshgrid(base + ex * size, base + ey * size, indexing="ij")
            quad = curv[0, 0] * xx * xx + (curv[0, 1] + curv[1, 0]) * xx * yy + curv[1, 1] * yy * yy
            out += np.exp(-quad + 1j * xi * (c * xx + s * yy))
    # 3.1415, not pi: the normalisation kymatio uses, so that coefficients match it exactly.
    return out / (2 * 3.1415 * sigma * sigma / slant)


def morlet_2d(size: int, sigma: float, theta: float, xi: float, slant: float) -> np.ndarray:
    """A Morlet wavelet: the Gabor filter minus its envelope scaled to give exactly zero mean."""
    wave = gabor_2d(size, sigma, theta, xi, slant)
    envelope = gabor_2d(size, sigma, theta, 0.0, slant)
    return wave - (wave.sum() / envelope.sum()) * envelope


def periodize(filter_hat: np.ndarray, res: int) -> np.ndarray:
    """The filter's Fourier transform on the grid ``2**res`` times coarser (band-limit, then fold)."""
    if res == 0:
        return filter_hat.copy()
    n = filter_hat.shape[0]
    k = 2**res
    masked = filter_hat.copy()
    start, length = int(n * 2 ** (-res - 1)), int(n * (1 - 2 ** (-res)))
    masked[start : start + length, :] = 0
    masked[:, start : start + length] = 0
    m = n // k
    return masked.reshape(k, m, k, m).sum(axis=(0, 2))


def _fold(x_hat: torch.Tensor, k: int) -> torch.Tensor:
    """Subsample by ``k`` in space, computed in Fourier: the mean of the ``k x k`` spectral tiles."""
    if k == 1:
        return x_hat
    m = x_hat.shape[-1] // k
    # A sum of slices: a strided mean over the tile axes is several times slower on complex tensors.
    out = x_hat[..., :m, :m].clone()
    for a in range(k):
        for b in range(k):
            if a or b:
                out += x_hat[..., a * m : (a + 1) * m, b * m : (b + 1) * m]
    return out.div_(k * k)


class Scattering2D(nn.Module):
    """Order-2 scattering of ``(B, 1, S, S)`` images into ``(B, C, S / 2**J, S / 2**J)``.

    Channels are ordered as the reference implementation orders them: the
    low-pass, then first order by (scale, angle), then second order by
    (scale1, angle1, scale2, angle2) with scale2 > scale1. It has no
    parameters; its filters are non-persistent buffers, so they are neither
    trained nor part of the state dict that sites send.
    """

    def __init__(self, image_size: int, J: int = DEFAULT_J, L: int = DEFAULT_L) -> None:
        super().__init__()
        if J < 1 or L < 1:
            raise ValueError(f"J and L must be at least 1 (got J={J}, L={L})")
        if image_size % 2**J:
            raise ValueError(f"image_size {image_size} must be a multiple of 2**J = {2**J}")
        if image_size < 2**J * 2:
            raise ValueError(f"image_size {image_size} is too small for J={J}; use at least {2 ** (J + 1)}")
        self.image_size, self.J, self.L = image_size, J, L
        self.padded = padded_size(image_size, J)
        total = self.padded - image_size
        self.pad = (total // 2, (total + 1) // 2)
        n = self.padded
        # phi at every resolution 0..J-1; psi[j] at resolution 0 and each j1 < j (what the cascade visits).
        phi_hat = np.real(np.fft.fft2(gabor_2d(n, 0.8 * 2 ** (J - 1), 0.0, 0.0, 1.0)))
        for res in range(J):
            self.register_buffer(f"phi_{res}", torch.from_numpy(periodize(phi_hat, res)).float(), persistent=False)
        for j in range(J):
            sigma, xi, slant = 0.8 * 2**j, 0.75 * math.pi / 2**j, 4.0 / L
            angles = [(int(L - L / 2 - 1) - t) * math.pi / L for t in range(L)]
            psi_hat = [np.real(np.fft.fft2(morlet_2d(n, sigma, theta, xi, slant))) for theta in angles]
            for res in range(max(j, 1)):  # first order reads res 0, second order res j1 < j
                folded = np.stack([periodize(p, res) for p in psi_hat])
                self.register_buffer(f"psi_{j}_{res}", torch.from_numpy(folded).float(), persistent=False)

    @property
    def out_channels(self) -> int:
        return num_coefficients(self.J, self.L)

    @property
    def out_size(self) -> int:
        return self.image_size // 2**self.J

    def _buf(self, name: str) -> torch.Tensor:
        return self.get_buffer(name)

    def _lowpass(self, u_hat: torch.Tensor, res: int) -> torch.Tensor:
        """Average ``u_hat`` (given at resolution ``res``) down to the output grid, cut the border."""
        s = torch.fft.ifft2(_fold(u_hat * self._buf(f"phi_{res}"), 2 ** (self.J - res))).real
        return s[..., 1:-1, 1:-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4 and x.shape[0] > _CHUNK:
            return torch.cat([self.forward(chunk) for chunk in x.split(_CHUNK)])
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"expected images of shape (B, 1, {self.image_size}, {self.image_size}), got {tuple(x.shape)}"
            )
        before, after = self.pad
        x_hat = torch.fft.fft2(F.pad(x[:, 0], (before, after, before, after), mode="reflect"))  # (B, n, n)
        batch = x.shape[0]
        size = self.out_size
        # The reference order: low-pass, first order by (j1, theta1), then second
        # order by (j1, theta1) and within that by (j2, theta2).
        order0 = self._lowpass(x_hat, 0).unsqueeze(1)
        order1: list[torch.Tensor] = []
        order2: list[torch.Tensor] = []
        for j1 in range(self.J):
            # |x * psi_{j1, theta}| for all L angles at once, at resolution j1.
            u1 = torch.fft.ifft2(_fold(x_hat.unsqueeze(1) * self._buf(f"psi_{j1}_0"), 2**j1)).abs()
            u1_hat = torch.fft.fft2(u1)  # (B, L, n / 2**j1, n / 2**j1)
            order1.append(self._lowpass(u1_hat, j1))
            from_j1: list[torch.Tensor] = []
            for j2 in range(j1 + 1, self.J):
                # (B, L1, 1, m, m) * (L2, m, m): every (theta1, theta2) pair in one product.
                prod = u1_hat.unsqueeze(2) * self._buf(f"psi_{j2}_{j1}")
                u2 = torch.fft.ifft2(_fold(prod, 2 ** (j2 - j1))).abs()
                from_j1.append(self._lowpass(torch.fft.fft2(u2), j2))  # (B, L1, L2, o, o)
            if from_j1:
                order2.append(torch.cat(from_j1, dim=2).reshape(batch, -1, size, size))
        return torch.cat([order0, *order1, *order2], dim=1)
