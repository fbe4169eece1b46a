"""`medfed study init|check` and `medfed data check`: a study file, and what it will use of a site's store.

A site checks its own folders before any deployment: which images the study uses per
class, which it refuses and why, and how many rows have no label. Reports name images
by their store-relative path (pseudonyms only), never a header value.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from medfed.cli.output import fail

study_app = typer.Typer(help="Write and validate a study file (study.toml).", no_args_is_help=True)
data_app = typer.Typer(help="Check a de-identified store against a study.", no_args_is_help=True)



def _load(path: Path):  # noqa: ANN202 - Study, imported lazily
    from medfed.settings import ConfigError
    from models.study import load_study

    try:
        return load_study(path)
    except ConfigError as err:
        fail(str(err), 1)


# ---- study init --------------------------------------------------------------------------
def _class_names(task: str, classes: str | None) -> list[str]:
    if classes is None:
        return {"binary": ["absent", "present"], "multiclass": ["class-0", "class-1", "class-2"],
                "multilabel": ["finding-0", "finding-1"]}[task]
    text = classes.strip()
    if text.isdigit():
        k = int(text)
        if task == "binary":
            return ["absent", "present"] if k == 2 else [f"class-{i}" for i in range(k)]
        prefix = "finding" if task == "multilabel" else "class"
        return [f"{prefix}-{i}" for i in range(k)]
    return [c.strip() for c in text.split(",") if c.strip()]


def _toml(value: object) -> str:
    """A TOML literal of a str, number, bool or (nested) list: enough for a study template."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(type(value))


def study_template(name: str, task: str, classes: list[str], modality: str, network: str, image_size: int) -> str:
    """A commented ``study.toml``: every section, the modality's preprocessing, the defaults spelt out."""
    from models.preprocess import DEFAULT_PERCENTILES
    from models.study import COLOUR, LABEL_KEYS, METRICS, NETWORKS, RADIOGRAPHY, TRAINABLE, Metrics

    pre: list[str] = []
    if modality == "CT":
        pre += ["# CT: one channel per window, [centre, width] in HU (1 to 4 windows); e.g. [[40, 400], [-600, 1500]]",
                "windows = [[40.0, 400.0]]"]
    elif modality in RADIOGRAPHY:
        pre += ['# "file": the file\'s VOI LUT or window (percentiles when it has none); "percentile": ignore it.',
                "# MONOCHROME1 images are inverted so that dense is bright everywhere.",
                'voi = "file"', "# intensity percentiles mapped to the full range",
                f"percentiles = {_toml(list(DEFAULT_PERCENTILES))}"]
    elif modality == "MR":
        pre += ['# "zscore": per-image mean 0, sd 1; "percentile": percentiles mapped to the full range',
                'normalise = "zscore"']
    elif modality in COLOUR:
        colour = "grey" if network == "scatter-head" else "rgb"
        pre += ['# "rgb": three channels (YBR and palette colour converted); "grey": one luminance channel',
                f"colour = {_toml(colour)}"]
    pre += ['# multi-frame objects: "first", "middle", "all" (each frame one example) or a list such as [0, 5]',
            'frames = "middle"']
    trainable = "all"
    lines = [
        "# A medfed study: what the consortium learns, from which images and labels, with which network.",
        f"# Check it with `medfed study check {name}.toml`; each site runs `medfed data check DEID --study FILE`.",
        "",
        f"name = {_toml(name)}",
        "# binary | multiclass | multilabel",
        f"task = {_toml(task)}",
        "# binary: [negative, positive]; multiclass: 3 or more names; multilabel: 2 or more finding names.",
        "# Labels name a class (or its index); multilabel labels join findings with '|', or say 'none'.",
        f"classes = {_toml(classes)}",
        "# DICOM Modality of the images used (CT, CR, DX, MG, MR, US, SC, XC); others are refused",
        f"modality = {_toml(modality)}",
        "# side of the square network input, in pixels (16 to 512, a multiple of 4)",
        f"image-size = {image_size}",
        "# fraction of each site's patients held out for evaluation",
        "test-fraction = 0.25",
        "",
        "[labels]",
        f"# the key column of the sites' labels CSV: {', '.join(LABEL_KEYS)}",
        'key = "AccessionNumber"',
        "",
        "[preprocessing]",
        *pre,
        "",
        "[augmentation]",
        "# random, training split only: left-right flip, rotation up to N degrees, intensity scaling by up to ±x",
        "flip = false",
        "rotate-degrees = 0.0",
        "intensity-jitter = 0.0",
        "",
        "[network]",
        f"# {', '.join(NETWORKS)}",
        f"name = {_toml(network)}",
        f"# what is trained: {', '.join(TRAINABLE)} (scatter-head: all or head)",
        f"trainable = {_toml(trainable)}",
        "# initial weights: a local file next to this one, pinned by SHA-256 (nothing is downloaded)",
        '# weights = "weights/pretrained.pt"',
        '# weights-sha256 = "<64 hex digits of `sha256sum weights/pretrained.pt`>"',
        "",
        "[metrics]",
        f"# any of {', '.join(METRICS)}",
        f"names = {_toml(list(METRICS))}",
        "# decision threshold on a class's probability (binary, multilabel)",
        f"threshold = {Metrics().threshold}",
        f"calibration-bins = {Metrics().calibration_bins}",
        "",
    ]
    return "\n".join(lines)


@study_app.command("init")
def study_init(
    file: Annotated[Path, typer.Argument(help="Study file to write (study.toml).")],
    task: Annotated[str, typer.Option(help="binary, multiclass or multilabel.")],
    modality: Annotated[str, typer.Option(help="DICOM Modality: CT, CR, DX, MG, MR, US, SC or XC.")],
    classes: Annotated[str | None, typer.Option(help="Number of classes, or their names separated by commas.")] = None,
    network: Annotated[str, typer.Option(help="Network of the registry.")] = "scatter-head",
    image_size: Annotated[int, typer.Option("--image-size", help="Input side in pixels.")] = 64,
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented study template that `medfed study check` accepts."""
    from medfed.files import write_file
    from medfed.settings import ConfigError
    from models.study import parse_study

    if file.exists() and not force:
        fail(f"{file} exists; choose another name or pass --force to overwrite it", 1)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", file.stem).strip("-._") or "study"
    text = study_template(name[:64], task, _class_names(task, classes), modality.upper(), network, image_size)
    import tomllib

    try:
        parse_study(tomllib.loads(text), file)
    except ConfigError as err:  # e.g. an unknown task or modality: say which option, write nothing
        fail(str(err).replace("`medfed study check FILE`", "the options of `medfed study init`"), 1)
    write_file(file, text.encode("utf-8"))
    typer.echo(f"wrote {file}; edit it, then run `medfed study check {file}`")


def describe_study(study) -> list[str]:  # noqa: ANN001 - Study, imported lazily
    """A few lines saying what a study means (for `study check` and `data check`)."""
    c, s = study.in_channels, study.image_size
    aug = study.augmentation
    augs = [n for n, on in (("flip", aug.flip), (f"rotate ±{aug.rotate_degrees:g}°", aug.rotate_degrees),
                            (f"intensity ±{aug.intensity_jitter:g}", aug.intensity_jitter)) if on]
    net = study.network
    return [
        f"study {study.name!r}: {study.task}, classes {', '.join(study.classes)}",
        f"  images: {study.modality}, input {c}x{s}x{s}; preprocessing "
        + ", ".join(f"{k}={v}" for k, v in study.preprocessing.model_dump(mode="json", exclude_none=True).items()),
        f"  labels: CSV keyed by {study.labels.key} ({study.labels.level} level); "
        f"test fraction {study.test_fraction:g}",
        f"  augmentation: {', '.join(augs) or 'none'}",
        f"  network: {net.name}, trainable {net.trainable}, initial weights "
        + (f"{net.weights} (sha256 {net.weights_sha256[:12]}…)" if net.weights else "random"),
        f"  metrics: {', '.join(study.metrics.names)}",
    ]


@study_app.command("check")
def study_check(file: Annotated[Path, typer.Argument(help="Study file (study.toml).")]) -> None:
    """Validate a study file field by field; print its digests and what it means."""
    study = _load(file)
    typer.echo(f"{file}: valid")
    for line in describe_study(study):
        typer.echo(line)
    typer.echo(f"preprocessing digest {study.preprocessing_digest()}")
    typer.echo(f"digest {study.digest()}")


# ---- data check --------------------------------------------------------------------------
@data_app.command("check")
def data_check(
    deid_dir: Annotated[Path, typer.Argument(help="The de-identified store (`medfed deid run` output).")],
    study_file: Annotated[Path, typer.Option("--study", help="Study file (study.toml).")],
    cache_dir: Annotated[Path | None, typer.Option(help="Image cache folder (default DEID_DIR/.cache).")] = None,
    max_listed: Annotated[int, typer.Option(help="Refused images listed one by one (the rest are counted).")] = 50,
) -> None:
    """List what the study will use: usable images per class, refused ones and why, sizes, unlabelled rows.

    Preprocesses every labelled image once, into the cache training will read. Exit 1 when
    training would refuse the store, or nothing is usable.
    """
    study = _load(study_file)
    root = deid_dir.resolve()
    store = _read_store(root, study)
    usage = _Usage(refused=[(rel or f"row {row}", reason) for row, rel, reason in store.bad], fatal=len(store.bad))
    rows_ok, items = _locate_files(root, store, usage)
    cache, entries, problems = _preprocess(root, study, cache_dir, rows_ok, items)
    _count_usable(study, store, rows_ok, entries, problems, usage)
    _print_usage(study, deid_dir, store, cache, usage, max_listed)
    if usage.fatal or not usage.usable:
        raise typer.Exit(1)


@dataclass
class _Usage:
    """What `data check` found, filled step by step: refusals (``fatal`` ones stop training) and counts."""

    refused: list[tuple[str, str]]
    fatal: int
    per_class: Counter[str] = field(default_factory=Counter)
    per_split: Counter[tuple[str, str]] = field(default_factory=Counter)
    sizes: Counter[str] = field(default_factory=Counter)
    usable: int = 0
    examples: int = 0

    def refuse(self, rel: str, reason: str, *, fatal: bool) -> None:
        """Record one refused image; a fatal refusal is one training would stop on, not just skip."""
        self.refused.append((rel, reason))
        self.fatal += fatal


def _read_store(root: Path, study):  # noqa: ANN001, ANN202 - Study and StoreRows, imported lazily
    """The store's manifest rows for this study; a folder that is no store ends the command (exit 1)."""
    from models.dataset import DatasetError, read_store_rows

    try:
        return read_store_rows(root, study)
    except DatasetError as err:
        fail(str(err), 1)


def _locate_files(root: Path, store, usage: _Usage) -> tuple[list, list]:  # noqa: ANN001 - StoreRows
    """Labelled rows whose file is inside the store and present, with the cache items to build for them.

    A path escaping the store or a missing file is a fatal refusal: training would stop on it too.
    """
    from models.dataset import DatasetError, fingerprint, safe_relative

    items = []
    rows_ok = []
    for r in store.labelled:
        try:
            full = safe_relative(root, r.path, r.row)
            items.append((r.path, fingerprint(full), full))
            rows_ok.append(r)
        except DatasetError as err:
            usage.refuse(r.path or f"row {r.row}", str(err).split(": ", 1)[-1], fatal=True)
        except OSError:
            usage.refuse(r.path, "file is missing from the store", fatal=True)
    return rows_ok, items


def _preprocess(root: Path, study, cache_dir: Path | None, rows_ok: list, items: list):  # noqa: ANN001, ANN202
    """Preprocess every located image into the cache training reads: (cache, entries, problems by path).

    A store problem (e.g. a file not marked de-identified) is kept per path, not raised, so the
    report lists them all; a cache that cannot be used ends the command (exit 1).
    """
    from models.cache import CacheError, ImageCache
    from models.dataset import StoreProblem, producer

    problems: dict[str, str] = {}
    produce = producer(study, rows_ok)

    def checked(rel: str, path: Path):  # noqa: ANN202
        try:
            return produce(rel, path)
        except StoreProblem as err:
            problems[rel] = str(err).split(f"{rel!r} ", 1)[-1]
            return None

    cache = ImageCache.for_store(root, study, cache_dir)
    try:
        entries = cache.ensure(items, checked)
    except CacheError as err:
        fail(str(err), 1)
    return cache, entries, problems


def _count_usable(study, store, rows_ok: list, entries: dict, problems: dict[str, str],  # noqa: ANN001
                  usage: _Usage) -> None:
    """Count usable images per class and split, examples and source sizes; refuse the rest.

    Store problems are fatal; an image the study cannot use (wrong modality, ...) is only skipped.
    """
    from models.dataset import assign_splits

    splits = assign_splits((r.patient for r in store.labelled), study.test_fraction) if store.labelled else {}
    for r in rows_ok:
        if r.path in problems:
            usage.refuse(r.path, problems[r.path], fatal=True)
            continue
        entry = entries.get(r.path)
        if entry is None or not entry.usable:
            usage.refuse(r.path, entry.reason if entry is not None else "not examined", fatal=False)
            continue
        usage.usable += 1
        usage.examples += len(entry.frames)
        usage.sizes[entry.size or "?"] += 1
        for name in _class_names_of(study, r.target):
            usage.per_class[name] += 1
            usage.per_split[(name, splits.get(r.patient, "train"))] += 1


def _class_names_of(study, target) -> list[str]:  # noqa: ANN001 - Study and a row's target
    """The class names a row's target stands for; a multilabel row with no finding counts as "none"."""
    if study.task == "multilabel":
        return [c for c, v in zip(study.classes, target, strict=True) if v] or ["none"]
    return [study.classes[int(target)]]


def _print_usage(study, deid_dir: Path, store, cache, usage: _Usage, max_listed: int) -> None:  # noqa: ANN001
    """Print the report: the study, the store and cache, counts per class, sizes, refusals and the verdict."""
    from models.dataset import MANIFEST_NAME

    for line in describe_study(study):
        typer.echo(line)
    typer.echo(f"store {deid_dir}: {store.total} manifest row(s); cache {cache.root} "
               f"({cache.stats.built} preprocessed now, {cache.stats.reused} reused)")
    _print_counts(study, usage)
    _print_refused(usage.refused, max_listed)
    if usage.fatal:
        typer.echo(f"training refuses this store until {usage.fatal} problem(s) are fixed (labels or files of "
                   f"{MANIFEST_NAME}); re-run `medfed deid run`")
    typer.echo(f"{usage.usable} usable, {len(usage.refused)} refused, {store.unlabelled} unlabelled")


def _print_counts(study, usage: _Usage) -> None:  # noqa: ANN001 - Study, imported lazily
    """Print usable images per class (train / test), examples when frames differ, and the commonest sizes."""
    typer.echo("usable images per class (train / test split by patient):")
    width = max(len(c) for c in (*study.classes, "none"))
    for name in (*study.classes, *(["none"] if study.task == "multilabel" else [])):
        typer.echo(f"  {name:<{width}}  {usage.per_class[name]:>7}  ({usage.per_split[(name, 'train')]} / "
                   f"{usage.per_split[(name, 'test')]})")
    if usage.examples != usage.usable:
        typer.echo(f"  {usage.examples} example(s) from {usage.usable} image(s) "
                   f"(frames: {study.preprocessing.frames})")
    sizes = usage.sizes
    if sizes:
        typer.echo("source sizes (rows x columns): "
                   + ", ".join(f"{s} x{n}" for s, n in sizes.most_common(8))
                   + (f", {len(sizes) - 8} more" if len(sizes) > 8 else ""))


def _print_refused(refused: list[tuple[str, str]], max_listed: int) -> None:
    """Print refused images (at most ``max_listed``, the rest counted) and a tally of refusals by kind."""
    if not refused:
        return
    typer.echo("refused:")
    for rel, reason in refused[:max_listed]:
        typer.echo(f"  {rel}: {reason}")
    if len(refused) > max_listed:
        typer.echo(f"  ... {len(refused) - max_listed} more")
    typer.echo("refusals by reason: " + "; ".join(
        f"{n} x {reason}" for reason, n in Counter(_kind(r) for _p, r in refused).most_common()))


def _kind(reason: str) -> str:
    """A refusal reason without its details in brackets, to count refusals by kind."""
    return re.sub(r"\s*\(.*?\)", "", reason).split(":")[0]


def register_data_commands(app: typer.Typer) -> None:
    """Add ``medfed study ...`` and ``medfed data ...`` to the main command."""
    app.add_typer(study_app, name="study")
    app.add_typer(data_app, name="data")
