"""What a synthetic study's classes are, how often each occurs, and what each looks like.

A class must be learnable by a small network from a few hundred images, so each
has its own appearance: in CT, the multiclass grades of a liver finding differ by
size, rim and number of lesions, and the multilabel findings are different
structures (lesion, calcification, free fluid, renal cyst); in DX, the grades are
the number of consolidated lung zones, and the findings are a nodule, an effusion,
a large heart and a consolidation. Binary CT is the original lesion-present study,
drawn exactly as before so that its files stay byte-identical for a seed.
"""

from __future__ import annotations

import math

import numpy as np

from medfed.synth._chest import ZONES, ChestFindings
from medfed.synth._phantom import Lesion, draw_lesion
from models.study import MULTILABEL_SEPARATOR, NO_FINDING

TASKS: tuple[str, ...] = ("binary", "multiclass", "multilabel")
#: Modalities the generator writes (DICOM Modality values).
SYNTH_MODALITIES: tuple[str, ...] = ("CT", "DX")
BINARY_CLASSES: tuple[str, str] = ("absent", "present")
NORMAL = "normal"
#: Multilabel findings per modality, in the order ``--classes K`` takes them.
FINDINGS: dict[str, tuple[str, ...]] = {
    "CT": ("liver-lesion", "calcification", "ascites", "renal-cyst"),
    "DX": ("nodule", "effusion", "cardiomegaly", "consolidation"),
}
#: Relative frequency of each multilabel finding (times the site's prevalence).
FINDING_FREQUENCY: tuple[float, ...] = (1.0, 0.8, 0.7, 0.6)
#: Multiclass: "normal" and up to this many grades.
MAX_GRADES = 4
#: DX consolidation grades: how many of the six lung zones are opacified.
GRADE_ZONES: tuple[int, ...] = (1, 2, 4, 6)

Target = int | tuple[bool, ...]


def class_names(task: str, classes: int | None, modality: str) -> tuple[str, ...]:
    """The study's class names for ``task`` with ``classes`` classes; ValueError says what to pass."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)} (got {task!r})")
    if modality not in SYNTH_MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(SYNTH_MODALITIES)} (got {modality!r})")
    if task == "binary":
        if classes not in (None, 2):
            raise ValueError(f"a binary study has 2 classes (got --classes {classes}); drop --classes "
                             "or choose --task multiclass")
        return BINARY_CLASSES
    if task == "multiclass":
        k = 3 if classes is None else classes
        if not isinstance(k, int) or isinstance(k, bool) or not 3 <= k <= MAX_GRADES + 1:
            raise ValueError(f"a multiclass study has 3 to {MAX_GRADES + 1} classes (got --classes {classes}): "
                             "normal and up to four grades")
        return (NORMAL,) + tuple(f"grade-{g}" for g in range(1, k))
    names = FINDINGS[modality]
    k = 2 if classes is None else classes
    if not isinstance(k, int) or isinstance(k, bool) or not 2 <= k <= len(names):
        raise ValueError(f"a multilabel {modality} study has 2 to {len(names)} findings "
                         f"({', '.join(names)}); got --classes {classes}")
    return names[:k]


def _apportion(n: int, weights: list[float]) -> list[int]:
    """Split ``n`` into counts proportional to ``weights`` (largest remainder), so a site hits its mix."""
    total = sum(weights)
    exact = [n * w / total for w in weights]
    counts = [math.floor(e) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: counts[i] - exact[i])
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def draw_targets(rng: np.random.Generator, task: str, classes: tuple[str, ...], n: int,
                 prevalence: float) -> list[Target]:
    """Targets of a site's ``n`` images (multiclass, multilabel); ``prevalence``: share with any finding."""
    if task == "multiclass":
        grades = len(classes) - 1
        counts = _apportion(n, [1.0 - prevalence] + [prevalence / grades] * grades)
        order = rng.permutation(n)
        targets = [0] * n
        start = 0
        for c, count in enumerate(counts):
            for i in order[start:start + count]:
                targets[int(i)] = c
            start += count
        return targets
    if task == "multilabel":
        p = np.array([prevalence * f for f in FINDING_FREQUENCY[: len(classes)]])
        present = rng.random((n, len(classes))) < p
        return [tuple(bool(v) for v in row) for row in present]
    raise ValueError(f"draw_targets covers multiclass and multilabel, not {task}")


def label_text(task: str, classes: tuple[str, ...], target: Target) -> str:
    """The label a site's CSV carries: 0/1, a class name, or present findings joined by '|' ('none')."""
    if task == "binary":
        return str(int(target))  # type: ignore[arg-type]
    if task == "multiclass":
        return classes[int(target)]  # type: ignore[arg-type]
    found = [c for c, on in zip(classes, target, strict=True) if on]  # type: ignore[arg-type]
    return MULTILABEL_SEPARATOR.join(found) if found else NO_FINDING


def has_finding(task: str, target: Target) -> bool:
    """Whether the image shows anything (for counts and prevalence)."""
    return any(target) if task == "multilabel" else bool(target)  # type: ignore[arg-type]


# ---- CT ------------------------------------------------------------------------------


def _disc_point(rng: np.random.Generator) -> tuple[float, float]:
    """A point of the disc of radius 0.6 (inside a liver or a lung, in its own semi-axes)."""
    while True:
        u, v = (float(t) for t in rng.uniform(-1.0, 1.0, size=2))
        if u * u + v * v <= 1.0:
            return 0.6 * u, 0.6 * v


def _lesion(rng: np.random.Generator, diameter: tuple[float, float], hu: tuple[float, float],
            rim: tuple[float, float] | None = None) -> Lesion:
    """A conspicuous lesion: ``hu`` is the signed contrast range."""
    x, y = _disc_point(rng)
    return Lesion(x_rel=x, y_rel=y, diameter_mm=float(rng.uniform(*diameter)), delta_hu=float(rng.uniform(*hu)),
                  aspect=float(rng.uniform(0.85, 1.15)), angle=float(rng.uniform(0.0, math.pi)),
                  rim_hu=float(rng.uniform(*rim)) if rim else 0.0)


def draw_ct(rng: np.random.Generator, task: str, target: Target) -> tuple[Lesion | tuple[Lesion, ...] | None, dict]:
    """Findings of one CT image: the ``lesion`` argument and keyword arguments of ``render_slice``."""
    if task == "binary":
        return (draw_lesion(rng) if target else None), {}
    if task == "multiclass":
        grade = int(target)  # type: ignore[arg-type]
        if grade == 0:
            return None, {}
        if grade == 1:
            return _lesion(rng, (12.0, 18.0), (-120.0, -80.0)), {}
        if grade == 2:
            return _lesion(rng, (26.0, 36.0), (-120.0, -80.0)), {}
        if grade == 3:
            return _lesion(rng, (26.0, 36.0), (-90.0, -60.0), rim=(120.0, 180.0)), {}
        return tuple(_lesion(rng, (15.0, 24.0), (-120.0, -80.0)) for _ in range(3)), {}
    flags = dict(zip(FINDINGS["CT"], target, strict=False))  # type: ignore[arg-type]
    lesions: list[Lesion] = []
    if flags.get("liver-lesion"):
        lesions.append(_lesion(rng, (18.0, 32.0), (-120.0, -80.0)))
    if flags.get("calcification"):
        lesions.append(_lesion(rng, (6.0, 10.0), (350.0, 600.0)))
    kwargs = {}
    if flags.get("ascites"):
        kwargs["ascites_mm"] = float(rng.uniform(10.0, 22.0))
    if flags.get("renal-cyst"):
        kwargs["renal_cyst_mm"] = float(rng.uniform(16.0, 26.0))
    return tuple(lesions) or None, kwargs


# ---- DX ------------------------------------------------------------------------------


def _zones(rng: np.random.Generator, n: int) -> tuple[tuple[int, int], ...]:
    return tuple(ZONES[int(i)] for i in sorted(rng.choice(len(ZONES), size=n, replace=False)))


def draw_dx(rng: np.random.Generator, task: str, target: Target) -> ChestFindings:
    """Findings of one chest radiograph."""
    if task == "binary":
        return ChestFindings(consolidation=_zones(rng, int(rng.integers(1, 3)))) if target else ChestFindings()
    if task == "multiclass":
        grade = int(target)  # type: ignore[arg-type]
        return ChestFindings(consolidation=_zones(rng, GRADE_ZONES[grade - 1])) if grade else ChestFindings()
    flags = dict(zip(FINDINGS["DX"], target, strict=False))  # type: ignore[arg-type]
    nodules: tuple[tuple[int, float, float, float], ...] = ()
    if flags.get("nodule"):
        x, y = _disc_point(rng)
        nodules = ((int(rng.choice([-1, 1])), x, y, float(rng.uniform(14.0, 26.0))),)
    effusion = (0.0, 0.0)
    if flags.get("effusion"):
        height = float(rng.uniform(40.0, 80.0))
        effusion = (height, 0.0) if rng.random() < 0.5 else (0.0, height)
    heart = float(rng.uniform(0.56, 0.66)) if flags.get("cardiomegaly") else None
    zones = _zones(rng, int(rng.integers(1, 3))) if flags.get("consolidation") else ()
    return ChestFindings(nodules=nodules, effusion_mm=effusion, heart_ratio=heart, consolidation=zones)
