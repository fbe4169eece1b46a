"""A "public" labelled set for pretraining, from a seed space no synthetic site uses.

Benchmarks pretrain a network on a public archive before fine-tuning it privately at
the sites, as the DP literature does with ImageNet or public chest X-ray sets. This
set plays that archive: same anatomy and findings as the sites, another device (a
domain shift), balanced classes, and no patient any site has. It is arrays, not
DICOM (a public archive is already de-identified and preprocessed): one grey channel
in [0, 1], bright = dense as a reader sees it (CT through the study's default
window, DX through its window and the MONOCHROME1 inversion), resized to
``image_size``.

Written under ``out``: ``public.npz`` (``images`` float32 N x 1 x S x S; ``targets``
int64 N, or float32 N x K for multilabel) and ``public.json`` (what it is).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from medfed.synth._chest import Detector, display, draw_thorax, render_chest, voi_window
from medfed.synth._findings import Target, class_names, draw_ct, draw_dx, draw_targets
from medfed.synth._phantom import Scanner, draw_body, render_slice
from models.study import DEFAULT_STUDY

#: Spawn key of the public stream: sites draw from SeedSequence([seed, site]) with no spawn key,
#: so no seed makes a public image the same random stream as any site's.
PUBLIC_SPAWN_KEY = (0x9B1C,)
PUBLIC_FILE, PUBLIC_JSON = "public.npz", "public.json"
MAX_PUBLIC = 100_000
_PUBLIC_SCANNER = Scanner(matrix=224, fov_mm=355.0, gain=1.0, offset_hu=4.0, noise_hu=16.0, blur_mm=0.9,
                          table_y_mm=132.0)
_PUBLIC_DETECTOR = Detector(rows=288, columns=272, pixel_mm=1.55, bits_stored=12, gain=400.0, exposure_level=0.88,
                            noise=8.0, blur_mm=1.2)


@dataclass(frozen=True)
class PublicSet:
    """Where the public set is and what it holds."""

    path: Path  # public.npz
    images: int
    task: str
    modality: str
    classes: tuple[str, ...]
    class_counts: dict[str, int]


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    pil = Image.fromarray(img.astype(np.float32))
    return np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def public_image(rng: np.random.Generator, task: str, target: Target, modality: str, image_size: int) -> np.ndarray:
    """One public image (image_size x image_size, [0, 1], bright = dense)."""
    if modality == "CT":
        lesion, extras = draw_ct(rng, task, target)
        hu = render_slice(rng, draw_body(rng), lesion, _PUBLIC_SCANNER, **extras)
        centre, width = DEFAULT_STUDY.windows[0]
        grey = np.clip((hu - (centre - width / 2.0)) / width, 0.0, 1.0)
    else:
        stored = render_chest(rng, draw_thorax(rng), draw_dx(rng, task, target), _PUBLIC_DETECTOR)
        grey = display(stored, voi_window(stored, _PUBLIC_DETECTOR))
    return np.clip(_resize(grey, image_size), 0.0, 1.0)


def generate_public(
    out: Path,
    n: int,
    task: str = "binary",
    classes: int | None = None,
    modality: str = "CT",
    seed: int = 0,
    *,
    image_size: int = 64,
) -> PublicSet:
    """Write ``n`` labelled public images for pretraining under ``out`` (see the module docstring)."""
    names = class_names(task, classes, modality)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_PUBLIC:
        raise ValueError(f"n must be an integer from 1 to {MAX_PUBLIC} (got {n!r})")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer (got {seed!r})")
    if not isinstance(image_size, int) or not 16 <= image_size <= 512:
        raise ValueError(f"image_size must be an integer from 16 to 512 (got {image_size!r})")
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=PUBLIC_SPAWN_KEY))
    if task == "binary":
        targets: list[Target] = [int(v) for v in rng.permutation(np.arange(n) % 2)]
    else:  # balanced: half the images with a finding (multiclass: grades share that half)
        targets = draw_targets(rng, task, names, n, 0.5 if task == "multilabel" else 1.0 - 1.0 / len(names))
    images = np.stack([public_image(rng, task, t, modality, image_size) for t in targets])[:, None]
    if task == "multilabel":
        y = np.array(targets, dtype=np.float32).reshape(n, len(names))
        counts = {c: int(y[:, j].sum()) for j, c in enumerate(names)}
    else:
        y = np.array(targets, dtype=np.int64)
        counts = {c: int((y == j).sum()) for j, c in enumerate(names)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / PUBLIC_FILE, images=images.astype(np.float32), targets=y)
    meta = {
        "generator": "medfed synth (public set)", "seed": seed, "images": n, "task": task, "modality": modality,
        "classes": list(names), "class_counts": counts, "image_size": image_size,
        "pixels": "one channel in [0, 1], bright = dense (CT: default study window; DX: window, MONOCHROME1 inverted)",
        "targets": "class index" if task != "multilabel" else "0/1 per finding, in the order of classes",
    }
    (out / PUBLIC_JSON).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return PublicSet(out / PUBLIC_FILE, n, task, modality, names, counts)
