"""Chest radiographs (PA projection) from a thorax phantom, as a digital detector stores them.

Projection adds: every structure contributes its line integral of attenuation
(``mu * thickness``), so lungs lower the total, ribs, spine, heart and any finding
raise it. The detector stores log exposure, so more attenuation gives a *lower*
stored value; files say MONOCHROME1 (lowest value displayed white), and bone
shows bright only once the viewer inverts: a preprocessor that forgets the
inversion sees a negative.

Findings (``medfed.synth._findings`` decides which an image has):
nodule (round opacity in a lung), effusion (fluid filling a lung base with a
meniscus), cardiomegaly (heart wider than half the thorax) and consolidation
(patchy opacity over lung zones; its extent is the multiclass grade).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medfed.synth._phantom import _gaussian_blur, _smooth_field

MU_SOFT = 0.02  # per mm: water-like soft tissue at an effective 60-70 keV
MU_BONE = 0.05  # per mm: cortical/trabecular bone mix
LUNG_AIR = 0.75  # fraction of lung volume that is air
N_RIBS = 10
#: Lung zones (side, level): side -1 image left (patient's right), +1 image right; level 0 upper to 2 lower.
ZONES: tuple[tuple[int, int], ...] = ((-1, 0), (1, 0), (-1, 1), (1, 1), (-1, 2), (1, 2))


@dataclass(frozen=True)
class Detector:
    """What a site's DX system does to the projection."""

    rows: int
    columns: int
    pixel_mm: float  # imager pixel spacing
    bits_stored: int  # 12-14
    gain: float  # stored units per unit of attenuation (log exposure)
    exposure_level: float  # stored value of unattenuated beam, as a fraction of full scale
    noise: float  # quantum noise, stored units at zero attenuation
    blur_mm: float


@dataclass(frozen=True)
class Thorax:
    """One patient's chest habitus; fixed across that patient's studies."""

    half_width: float  # mm, lateral semi-axis at the lung bases
    half_depth: float  # mm, antero-posterior semi-axis
    lung_height: float  # mm, apex to dome
    heart_ratio: float  # cardiothoracic ratio when normal
    shoulder_mm: float  # distance of the shoulders above the lung apices
    rib_spacing: float  # mm between posterior ribs
    tilt: float  # radians, slight patient rotation on the detector


@dataclass(frozen=True)
class ChestFindings:
    """What an image shows beyond normal anatomy (all optional)."""

    nodules: tuple[tuple[int, float, float, float], ...] = ()  # (side, u, v, diameter mm) in lung coordinates
    effusion_mm: tuple[float, float] = (0.0, 0.0)  # fluid height at the image-left, image-right base
    heart_ratio: float | None = None  # cardiothoracic ratio overriding the patient's (cardiomegaly)
    consolidation: tuple[tuple[int, int], ...] = ()  # opacified zones, from ZONES
    consolidation_density: float = 0.55


def draw_thorax(rng: np.random.Generator) -> Thorax:
    """Draw a patient's chest habitus."""
    half_width = float(rng.uniform(130.0, 170.0))
    return Thorax(
        half_width=half_width,
        half_depth=float(np.clip(half_width * rng.uniform(0.62, 0.8), 85.0, 130.0)),
        lung_height=float(rng.uniform(200.0, 260.0)),
        heart_ratio=float(rng.uniform(0.38, 0.47)),
        shoulder_mm=float(rng.uniform(15.0, 35.0)),
        rib_spacing=float(rng.uniform(19.0, 24.0)),
        tilt=float(rng.normal(0.0, 0.02)),
    )


def _ellipsoid(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, ax: float, ay: float, depth: float) -> np.ndarray:
    """Thickness (mm) of an ellipsoid with semi-axes ax, ay and ``depth`` along the beam."""
    r2 = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2
    return 2.0 * depth * np.sqrt(np.clip(1.0 - r2, 0.0, None))


def render_chest(rng: np.random.Generator, thorax: Thorax, findings: ChestFindings, det: Detector) -> np.ndarray:
    """Render one PA chest radiograph as stored values (uint16, rows x columns, MONOCHROME1).

    Image x runs to the patient's left (image right), image y to the feet. The
    random draws do not depend on ``findings``, so a finding changes only its own
    pixels.
    """
    rows, cols, ps = det.rows, det.columns, det.pixel_mm
    xs = (np.arange(cols) + 0.5 - cols / 2.0) * ps
    ys = (np.arange(rows) + 0.5 - rows / 2.0) * ps
    xx, yy = np.meshgrid(xs, ys)
    c, s = math.cos(thorax.tilt), math.sin(thorax.tilt)
    xx, yy = c * xx + s * yy, -s * xx + c * yy
    cx = float(rng.normal(0.0, 8.0))
    apex_y = -0.5 * rows * ps + float(rng.uniform(45.0, 75.0))
    A, B, H = thorax.half_width, thorax.half_depth, thorax.lung_height
    texture = _smooth_field(rng, max(rows, cols), 10)[:rows, :cols]
    fine = _smooth_field(rng, max(rows, cols), 40)[:rows, :cols]

    # trunk: an elliptic cylinder widening from the neck to the chest, shoulders on top
    top = apex_y - thorax.shoulder_mm
    width = np.where(yy < top, 55.0, A * np.clip(0.9 + 0.1 * (yy - top) / H, 0.9, 1.0) + 12.0)
    neck = np.clip((yy - (top - 60.0)) / 20.0, 0.0, 1.0)
    shoulders = np.clip(1.0 - np.abs(yy - top) / 30.0, 0.0, 1.0) * 30.0
    body_t = 2.0 * B * np.sqrt(np.clip(1.0 - ((xx - cx) / (width + shoulders)) ** 2, 0.0, None)) * neck
    atten = MU_SOFT * body_t

    # lungs: half-ellipsoids of air, domed diaphragm below, mediastinum between
    lung_t = np.zeros_like(xx)
    centres = {}
    for side in (-1, 1):
        lx = cx + side * 0.48 * A
        ly = apex_y + 0.55 * H
        ax = 0.42 * A
        lung = _ellipsoid(xx, yy, lx, ly, ax, 0.58 * H, 0.8 * B)
        dome = apex_y + H - 0.18 * H * np.clip(1.0 - ((xx - lx) / ax) ** 2, 0.0, 1.0) + (12.0 if side < 0 else 0.0)
        lung *= np.clip((dome - yy) / 6.0, 0.0, 1.0)
        lung_t += lung
        centres[side] = (lx, ly, ax, 0.58 * H)

    # heart: an ellipsoid displacing lung, to the patient's left (image right)
    heart_ratio = findings.heart_ratio or thorax.heart_ratio
    hw = heart_ratio * A  # half the heart width is the ratio times the thoracic half width
    hx, hy = cx + 0.22 * hw, apex_y + 0.78 * H
    heart = _ellipsoid(xx, yy, hx, hy, hw, 0.3 * H, 0.55 * B)
    lung_t = np.clip(lung_t - heart, 0.0, None)

    # lung markings: vessels fanning out from the hila, more central than peripheral
    markings = np.zeros_like(xx)
    for side in (-1, 1):
        lx, ly, ax, ay = centres[side]
        dist = np.sqrt(((xx - (cx + side * 0.2 * A)) / ax) ** 2 + ((yy - ly) / ay) ** 2)
        markings += np.exp(-1.5 * dist) * (0.6 + 0.4 * texture + 0.5 * np.abs(fine))
    air = lung_t * LUNG_AIR * (1.0 - 0.25 * markings)

    # findings that replace lung air by fluid or tissue
    fill = np.zeros_like(xx)
    for side, level in findings.consolidation:
        lx, ly, ax, ay = centres[side]
        zy = ly - ay + (level + 0.5) * (2.0 * ay / 3.0)
        zone = np.exp(-0.5 * (((xx - lx) / (0.75 * ax)) ** 2 + ((yy - zy) / (0.3 * ay)) ** 2))
        patch = zone * np.clip(0.75 + 0.35 * texture + 0.2 * fine, 0.3, 1.0)
        fill = np.maximum(fill, findings.consolidation_density * patch)
    for side, height in zip((-1, 1), findings.effusion_mm, strict=True):
        if height > 0.0:
            lx, ly, ax, ay = centres[side]
            base = apex_y + H  # the costophrenic angle
            lateral = np.clip(side * (xx - lx) / ax, -1.0, 1.0)  # meniscus climbs the lateral wall
            level = base - height * (0.7 + 0.5 * np.clip(lateral, 0.0, 1.0))
            mask = np.clip((yy - level) / 4.0, 0.0, 1.0) * (np.abs(xx - lx) < 1.2 * ax)
            fill = np.maximum(fill, mask)
    atten -= MU_SOFT * air * (1.0 - np.clip(fill, 0.0, 1.0))
    for side, u, v, diameter in findings.nodules:
        lx, ly, ax, ay = centres[side]
        r = diameter / 2.0
        atten += MU_SOFT * 1.1 * _ellipsoid(xx, yy, lx + u * ax, ly + v * ay, r, r, r) * (lung_t > 0)

    # bones: spine, posterior ribs, clavicles
    spine = 0.5 * 2.0 * 16.0 * np.sqrt(np.clip(1.0 - ((xx - cx) / 16.0) ** 2, 0.0, None))
    vertebrae = 0.8 + 0.2 * np.cos(2.0 * math.pi * (yy - apex_y) / thorax.rib_spacing)
    atten += MU_BONE * spine * vertebrae * (yy > top - 60.0)
    for side in (-1, 1):
        dx = side * (xx - cx)
        for i in range(N_RIBS):
            y0 = apex_y - 10.0 + i * thorax.rib_spacing
            centre = y0 + 0.35 * dx + 0.0009 * dx**2  # posterior ribs slope down laterally
            band = np.clip(1.0 - np.abs(yy - centre) / 5.0, 0.0, 1.0) * (dx > 18.0) * (dx < 0.98 * A)
            atten += MU_BONE * 5.0 * band * (yy < apex_y + 1.1 * H)
        clav_y = top + 12.0 - 0.12 * dx
        clav = np.clip(1.0 - np.abs(yy - clav_y) / 6.0, 0.0, 1.0) * (dx > 15.0) * (dx < 0.75 * A)
        atten += MU_BONE * 14.0 * clav

    atten = _gaussian_blur(atten, det.blur_mm / ps)
    full = 2**det.bits_stored - 1
    stored = det.exposure_level * full - det.gain * atten
    # quantum noise grows where fewer photons arrive (high attenuation)
    stored += rng.normal(0.0, 1.0, size=stored.shape) * det.noise * np.exp(0.25 * atten)
    return np.clip(np.rint(stored), 0, full).astype("<u2")


def body_mask(stored: np.ndarray, det: Detector) -> np.ndarray:
    """Pixels under the patient (attenuated clearly below the direct beam)."""
    return stored < det.exposure_level * (2**det.bits_stored - 1) - 0.8 * det.gain


def voi_window(stored: np.ndarray, det: Detector) -> tuple[float, float]:
    """Window (centre, width) a DX console would set from the histogram under the patient."""
    inside = stored[body_mask(stored, det)]
    if inside.size < 16:
        inside = stored.ravel()
    lo, hi = np.percentile(inside, [1.0, 99.0])
    width = max(float(hi - lo), 16.0)
    return float(round((lo + hi) / 2.0)), float(round(width))


def display(stored: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Display brightness in [0, 1]: window, then MONOCHROME1 inversion (bone bright)."""
    centre, width = window
    return 1.0 - np.clip((stored.astype(np.float64) - (centre - width / 2.0)) / width, 0.0, 1.0)
