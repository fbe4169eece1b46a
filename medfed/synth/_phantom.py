"""CT-like axial abdomen slices in Hounsfield units, and the scanner that images them.

The finding is a roughly round liver lesion (mostly hypodense). Normal anatomy is
deliberately cluttered (bowel loops, gas, vessels, fat islands, texture) and
lesion size and contrast vary widely, so that some positives are subtle: the
task must be learnable from pooled data, but hard from one small site alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

AIR_HU = -1000.0
TEXT_HU = 3000.0  # burned-in overlay: as bright as bone window allows

# Lesion distribution: the knobs that set how learnable the finding is. Most lesions
# are conspicuous once a reader knows where to look; a fraction are below what a
# 64x64 view can resolve (small and faint), as some findings are in real CT, which
# caps what any model can reach. Tuned so that the consortium's first network (an
# end-to-end CNN) trained on the pooled sites of `medfed demo` (600 patients at the
# largest) reached AUC ~0.86 at 64x64 without DP, and the smallest site alone about
# 0.54. The scattering network that replaced it learns far more from little data:
# on the 4,000-patient benchmark sites even the smallest (808 training images) alone
# reaches ~0.88 without DP, pooled ~0.91 (README, Benchmarks). Left as it is, so that
# figures stay comparable across sessions.
LESION_MIN_MM, LESION_MAX_MM, LESION_SIZE_POWER = 16.0, 40.0, 1.0
CONTRAST_MIN_HU, CONTRAST_MAX_HU, CONTRAST_POWER = 70.0, 150.0, 0.6
SUBTLE_FRACTION = 0.2
SUBTLE_MIN_MM, SUBTLE_MAX_MM = 4.0, 8.0
SUBTLE_MIN_HU, SUBTLE_MAX_HU = 8.0, 20.0
HYPODENSE_FRACTION = 0.8
LIVER_TILT = -0.35  # radians
# Clutter: normal structures that a detector must learn not to call lesions.
FAT_ISLANDS_MAX, BOWEL_LOOPS_MAX, VESSELS_MAX = 3, 5, 6


@dataclass(frozen=True)
class Scanner:
    """What a site's CT scanner does to the ideal slice."""

    matrix: int  # rows == columns
    fov_mm: float  # reconstruction diameter
    gain: float  # calibration error, multiplicative on HU
    offset_hu: float  # calibration error, additive
    noise_hu: float  # std of quantum noise (per native pixel)
    blur_mm: float  # point-spread sigma
    table_y_mm: float  # couch top, distance below isocentre

    @property
    def pixel_mm(self) -> float:
        """Pixel spacing that keeps the field of view constant across matrices."""
        return self.fov_mm / self.matrix


@dataclass(frozen=True)
class Body:
    """One patient's habitus; fixed across that patient's studies."""

    half_width: float  # lateral semi-axis, mm
    half_depth: float  # antero-posterior semi-axis, mm
    fat_mm: float  # subcutaneous fat thickness
    muscle_mm: float  # abdominal wall thickness
    liver_hu: float
    fat_hu: float
    aorta_hu: float  # contrast phase varies by patient
    liver_scale: float
    kidney_scale: float


@dataclass(frozen=True)
class Lesion:
    """The finding: a soft-edged, slightly elliptical blob."""

    x_rel: float  # position inside the liver, in units of its (rotated) semi-axes
    y_rel: float
    diameter_mm: float
    delta_hu: float  # contrast against the surrounding tissue
    aspect: float
    angle: float
    #: Enhancing rim around the lesion (HU added in a ring as wide as a fifth of the diameter); 0: none.
    rim_hu: float = 0.0


# Other findings of the multiclass and multilabel studies (``medfed.synth._findings``).
FLUID_HU = 8.0  # ascites and simple cysts: water-like
RIM_WIDTH = 0.2  # rim width as a fraction of the lesion diameter


def draw_body(rng: np.random.Generator) -> Body:
    """Draw a patient habitus (size, fat, organ sizes, enhancement)."""
    half_width = float(rng.uniform(118.0, 160.0))
    half_depth = float(np.clip(half_width * rng.uniform(0.64, 0.82), 80.0, 125.0))
    return Body(
        half_width=half_width,
        half_depth=half_depth,
        fat_mm=float(rng.uniform(6.0, 32.0)),
        muscle_mm=float(rng.uniform(7.0, 14.0)),
        liver_hu=float(rng.normal(58.0, 6.0)),
        fat_hu=float(rng.normal(-100.0, 8.0)),
        aorta_hu=float(rng.choice([42.0, 120.0, 180.0])) + float(rng.normal(0.0, 8.0)),
        liver_scale=float(rng.uniform(0.85, 1.15)),
        kidney_scale=float(rng.uniform(0.85, 1.15)),
    )


def draw_lesion(rng: np.random.Generator) -> Lesion:
    """Draw a liver lesion: usually conspicuous, sometimes too small and faint to see."""
    while True:
        u, v = (float(t) for t in rng.uniform(-1.0, 1.0, size=2))
        if u * u + v * v <= 1.0:
            break
    if rng.random() < SUBTLE_FRACTION:
        diameter = float(rng.uniform(SUBTLE_MIN_MM, SUBTLE_MAX_MM))
        magnitude = float(rng.uniform(SUBTLE_MIN_HU, SUBTLE_MAX_HU))
    else:
        diameter = LESION_MIN_MM + (LESION_MAX_MM - LESION_MIN_MM) * float(rng.random()) ** LESION_SIZE_POWER
        magnitude = CONTRAST_MIN_HU + (CONTRAST_MAX_HU - CONTRAST_MIN_HU) * float(rng.random()) ** CONTRAST_POWER
    sign = -1.0 if rng.random() < HYPODENSE_FRACTION else 1.0
    return Lesion(
        x_rel=0.72 * u,
        y_rel=0.72 * v,
        diameter_mm=diameter,
        delta_hu=sign * magnitude,
        aspect=float(rng.uniform(0.8, 1.2)),
        angle=float(rng.uniform(0.0, math.pi)),
    )


def _coverage(
    xx: np.ndarray,
    yy: np.ndarray,
    cx: float,
    cy: float,
    ax: float,
    ay: float,
    pixel_mm: float,
    angle: float = 0.0,
) -> np.ndarray:
    """Fraction of each pixel inside an ellipse (one-pixel partial-volume ramp)."""
    dx, dy = xx - cx, yy - cy
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    rho = np.sqrt((dx / ax) ** 2 + (dy / ay) ** 2)
    dist = np.sqrt(dx * dx + dy * dy)
    # distance (mm) to the boundary along the ray from the centre
    signed = dist * (1.0 - 1.0 / np.maximum(rho, 1e-6))
    return np.clip(0.5 - signed / pixel_mm, 0.0, 1.0)


def _paint(img: np.ndarray, cover: np.ndarray, hu: float | np.ndarray) -> None:
    """Replace tissue by ``hu`` where ``cover`` says so (in place)."""
    img *= 1.0 - cover
    img += cover * hu


def _gaussian_blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Separable Gaussian blur in plain numpy (no SciPy dependency)."""
    if sigma_px < 0.25:
        return img
    radius = max(1, int(math.ceil(3.0 * sigma_px)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma_px) ** 2)
    taps /= taps.sum()
    out = img
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for k, w in enumerate(taps):
            sl = [slice(None), slice(None)]
            sl[axis] = slice(k, k + n)
            acc += w * padded[tuple(sl)]
        out = acc
    return out


def _smooth_field(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """Low-frequency random field in [-1, 1]-ish, for tissue texture."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    field = Image.fromarray(coarse).resize((n, n), Image.Resampling.BICUBIC)
    return np.asarray(field, dtype=np.float64)


def render_slice(
    rng: np.random.Generator,
    body: Body,
    lesion: Lesion | Sequence[Lesion] | None,
    scanner: Scanner,
    *,
    ascites_mm: float = 0.0,
    renal_cyst_mm: float = 0.0,
) -> np.ndarray:
    """Render one axial slice in HU as seen by ``scanner`` (float64, matrix²).

    Image x runs to the patient's left, image y to posterior (supine, head first).
    The patient lies on the couch, so the body centre depends on body depth.
    ``lesion`` is none, one or several liver lesions; ``ascites_mm`` a rim of free
    fluid that thick inside the abdominal wall; ``renal_cyst_mm`` the diameter of a
    cyst on the image-right kidney. None of these draw from ``rng``, so the anatomy
    of an image does not depend on its findings.
    """
    n, ps = scanner.matrix, scanner.pixel_mm
    coords = (np.arange(n) + 0.5) * ps - scanner.fov_mm / 2.0
    xx, yy = np.meshgrid(coords, coords)
    img = np.full((n, n), AIR_HU)

    A, B = body.half_width, body.half_depth
    cx = float(rng.normal(0.0, 6.0))
    cy = scanner.table_y_mm - B - 1.0

    # couch: carbon-fibre shell over foam
    couch = (yy >= scanner.table_y_mm) & (yy < scanner.table_y_mm + 5.0) & (np.abs(xx) < 0.45 * scanner.fov_mm)
    img[couch] = 250.0
    foam = (yy >= scanner.table_y_mm + 5.0) & (yy < scanner.table_y_mm + 14.0) & (np.abs(xx) < 0.42 * scanner.fov_mm)
    img[foam] = -850.0

    texture = _smooth_field(rng, n, 9)
    fine = _smooth_field(rng, n, 24)

    body_cov = _coverage(xx, yy, cx, cy, A, B, ps)
    _paint(img, body_cov, body.fat_hu + 6.0 * texture)
    a1, b1 = A - body.fat_mm, B - 0.8 * body.fat_mm
    _paint(img, _coverage(xx, yy, cx, cy, a1, b1, ps), 50.0 + 4.0 * fine)
    # abdominal cavity: mix of bowel, mesentery and visceral fat
    a2, b2 = a1 - body.muscle_mm, b1 - body.muscle_mm
    cav_cx, cav_cy = cx, cy - 0.05 * b2
    b2 = 0.92 * b2
    cavity = _coverage(xx, yy, cav_cx, cav_cy, a2, b2, ps)
    _paint(img, cavity, 28.0 + 14.0 * texture + 6.0 * fine)

    # liver geometry first: bowel and mesentery are kept out of it
    ls = body.liver_scale
    lcx, lcy = cav_cx - 0.36 * a2, cav_cy - 0.12 * b2
    la, lb = 0.42 * a2 * ls, 0.58 * b2 * ls

    def outside_liver(px: float, py: float, margin: float) -> bool:
        c, s_ = math.cos(LIVER_TILT), math.sin(LIVER_TILT)
        dx, dy = px - lcx, py - lcy
        u, v = c * dx + s_ * dy, -s_ * dx + c * dy
        return (u / (la + margin)) ** 2 + (v / (lb + margin)) ** 2 > 1.0

    def free_spot(extent: float, margin: float) -> tuple[float, float]:
        """A point in the cavity, away from the liver and the posterior midline."""
        for _ in range(50):
            fx, fy = (float(t) for t in rng.uniform(-extent, extent, size=2))
            px, py = cav_cx + fx * a2, cav_cy + fy * b2
            if fx * fx + fy * fy < extent**2 and not (abs(fx) < 0.3 and fy > 0.3) and outside_liver(px, py, margin):
                return px, py
        return cav_cx + 0.3 * a2, cav_cy - 0.3 * b2

    # visceral fat islands
    for _ in range(int(rng.integers(0, FAT_ISLANDS_MAX + 1))):
        r = float(rng.uniform(6.0, 18.0))
        px, py = free_spot(0.75, 0.0)
        cov = _coverage(xx, yy, px, py, r * rng.uniform(0.7, 1.3), r, ps, float(rng.uniform(0, math.pi)))
        _paint(img, cov * cavity, body.fat_hu + 20.0)

    # bowel loops: walled, fluid/gas/enhancing content
    for _ in range(int(rng.integers(0, BOWEL_LOOPS_MAX + 1))):
        r = float(rng.uniform(5.0, 13.0))
        ry = r * float(rng.uniform(0.75, 1.0))
        ang = float(rng.uniform(0.0, math.pi))
        content = float(rng.choice([8.0, 15.0, 70.0, -950.0], p=[0.35, 0.3, 0.2, 0.15]))
        px, py = free_spot(0.8, r)
        _paint(img, _coverage(xx, yy, px, py, r, ry, ps, ang) * cavity, 45.0)
        inner = _coverage(xx, yy, px, py, max(r - 2.0, 1.5), max(ry - 2.0, 1.5), ps, ang)
        _paint(img, inner * cavity, content)

    # mesenteric vessels
    for _ in range(int(rng.integers(2, 7))):
        r = float(rng.uniform(2.5, 6.0))
        px, py = free_spot(0.7, r)
        _paint(img, _coverage(xx, yy, px, py, r, r, ps) * cavity, 0.6 * body.aorta_hu + 20.0)

    # spleen (image right), kidneys (posterior), liver (image left)
    spleen = _coverage(xx, yy, cav_cx + 0.62 * a2, cav_cy + 0.25 * b2, 0.16 * a2, 0.30 * b2, ps, 0.5)
    _paint(img, spleen * cavity, 47.0 + 4.0 * fine)
    ks = body.kidney_scale
    for side in (-1.0, 1.0):
        kid = _coverage(xx, yy, cav_cx + side * 0.42 * a2, cav_cy + 0.52 * b2, 0.11 * a2 * ks, 0.17 * b2 * ks, ps,
                        side * 0.5)
        _paint(img, kid * cavity, 32.0 + 0.3 * (body.aorta_hu - 42.0))
    if renal_cyst_mm > 0.0:  # exophytic: bulges lateral of the kidney's upper pole
        rc = renal_cyst_mm / 2.0
        cyst = _coverage(xx, yy, cav_cx + 0.42 * a2 + 0.06 * a2, cav_cy + 0.45 * b2, rc, rc, ps)
        _paint(img, cyst * cavity, FLUID_HU - 6.0 + 2.0 * fine)
    liver = _coverage(xx, yy, lcx, lcy, la, lb, ps, LIVER_TILT) * cavity
    _paint(img, liver, body.liver_hu + 5.0 * fine)

    c, s_ = math.cos(LIVER_TILT), math.sin(LIVER_TILT)

    def in_liver(u: float, v: float) -> tuple[float, float]:
        """Liver-normalised (u, v) → mm."""
        du, dv = u * la, v * lb
        return lcx + c * du - s_ * dv, lcy + s_ * du + c * dv

    # hepatic vessels: small, darker than liver without contrast, brighter with
    for _ in range(int(rng.integers(0, VESSELS_MAX + 1))):
        while True:
            u, v = (float(t) for t in rng.uniform(-0.8, 0.8, size=2))
            if u * u + v * v < 0.64:
                break
        r = float(rng.uniform(2.0, 4.0))
        px, py = in_liver(u, v)
        _paint(img, _coverage(xx, yy, px, py, r, r, ps) * liver, body.liver_hu - 18.0 + 0.7 * (body.aorta_hu - 42.0))

    lesions = () if lesion is None else (lesion,) if isinstance(lesion, Lesion) else tuple(lesion)
    for les in lesions:
        lx, ly = in_liver(les.x_rel, les.y_rel)
        r = les.diameter_mm / 2.0
        cov = _coverage(xx, yy, lx, ly, r * les.aspect, r / les.aspect, ps, les.angle)
        soft = _gaussian_blur(cov, 0.8 / ps)
        img += soft * liver * (les.delta_hu + 5.0 * fine)
        if les.rim_hu:
            w = RIM_WIDTH * les.diameter_mm
            outer = _coverage(xx, yy, lx, ly, r * les.aspect + w, r / les.aspect + w, ps, les.angle)
            img += _gaussian_blur(np.clip(outer - cov, 0.0, 1.0), 0.8 / ps) * liver * les.rim_hu

    if ascites_mm > 0.0:  # free fluid along the anterior and lateral abdominal wall, around the liver
        inner = _coverage(xx, yy, cav_cx, cav_cy, a2 - ascites_mm, b2 - ascites_mm, ps)
        rim = np.clip(cavity - inner, 0.0, 1.0) * (yy < cav_cy + 0.35 * b2)
        _paint(img, rim, FLUID_HU + 3.0 * fine)

    # spine, aorta, IVC, paraspinal muscles
    spine_y = cy + B - body.fat_mm * 0.8 - 48.0
    vr = 16.0 + 0.04 * (A - 118.0)
    _paint(img, _coverage(xx, yy, cx, spine_y, vr * 1.15, vr, ps), 700.0)
    _paint(img, _coverage(xx, yy, cx, spine_y, vr * 1.15 - 2.5, vr - 2.5, ps), 230.0 + 30.0 * fine)
    _paint(img, _coverage(xx, yy, cx, spine_y + vr + 14.0, 7.0, 13.0, ps), 600.0)
    for side in (-1.0, 1.0):
        _paint(img, _coverage(xx, yy, cx + side * 30.0, spine_y + vr + 10.0, 19.0, 15.0, ps), 52.0 + 4.0 * fine)
    _paint(img, _coverage(xx, yy, cx + 14.0, spine_y - vr - 9.0, 10.5, 10.5, ps), body.aorta_hu)
    _paint(img, _coverage(xx, yy, cx - 20.0, spine_y - vr - 7.0, 11.0, 8.5, ps), 0.8 * body.aorta_hu + 10.0)

    img = _gaussian_blur(img, scanner.blur_mm / ps)
    img = scanner.gain * img + scanner.offset_hu
    img += rng.normal(0.0, scanner.noise_hu, size=img.shape)
    return img


def burn_text(img: np.ndarray, lines: list[str]) -> tuple[int, int, int, int]:
    """Burn ``lines`` into the top-left corner at overlay intensity, in place.

    Returns the text box (left, top, right, bottom) in pixels, so callers and
    tests know where to look.
    """
    n = img.shape[0]
    size = max(9, round(n / 16))
    font = ImageFont.load_default(size=size)
    mask = Image.new("L", (img.shape[1], n), 0)
    draw = ImageDraw.Draw(mask)
    draw.fontmode = "1"  # crisp, unsmoothed glyphs, like a scanner console overlay
    margin = max(3, n // 40)
    y = margin
    for line in lines:
        draw.text((margin, y), line, fill=255, font=font)
        y += size + 2
    alpha = np.asarray(mask, dtype=np.float64) / 255.0
    img *= 1.0 - alpha
    img += alpha * TEXT_HU
    box = mask.getbbox() or (0, 0, 0, 0)
    return (int(box[0]), int(box[1]), int(box[2]), int(box[3]))
