"""A consortium's study: what is learnt, from which images and labels, with which network.

One file (``study.toml``) describes the task, its classes, where the labels come from,
the modality and its preprocessing, the network and its initial weights, and the
metrics. The coordinator ships it with a run; every site validates it field by field
and serves only a study its privacy officer approved (by digest). The preprocessing
digest keys each site's image cache, so a change of preprocessing rebuilds the cache.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medfed.labelling import CLASS_NAME, LABEL_KEYS, MULTILABEL_SEPARATOR, NO_FINDING
from medfed.settings import ConfigError, OutOfBounds, RunConfig, SiteConfig, describe_validation

Task = Literal["binary", "multiclass", "multilabel"]
#: Modalities a study may name (DICOM Modality values). Colour objects are US, SC and XC (photographs).
Modality = Literal["CT", "CR", "DX", "MG", "MR", "US", "SC", "XC"]
MODALITIES: tuple[str, ...] = ("CT", "CR", "DX", "MG", "MR", "US", "SC", "XC")
#: Modalities whose pixels are projection radiographs (VOI LUT or window, MONOCHROME1 inverted).
RADIOGRAPHY: tuple[str, ...] = ("CR", "DX", "MG")
#: Modalities that may carry colour pixels.
COLOUR: tuple[str, ...] = ("US", "SC", "XC")
#: Networks of models.registry (the scattering head, and MONAI networks with GroupNorm).
NETWORKS: tuple[str, ...] = ("scatter-head", "densenet121", "resnet18", "resnet50", "efficientnet-b0")
#: What of the network is trained; the rest keeps its initial weights.
TRAINABLE: tuple[str, ...] = ("all", "last-block", "head", "norm-and-bias")
#: Metrics a study may ask for (models.metrics computes each per class and macro-averaged).
METRICS: tuple[str, ...] = (
    "auc", "accuracy", "sensitivity", "specificity", "precision", "f1", "confusion", "calibration-error",
)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = CLASS_NAME


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class Labels(_Section):
    """Where the labels come from: a site CSV keyed by one DICOM identifier, turned into pseudonyms."""

    key: Literal["AccessionNumber", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"] = "AccessionNumber"

    @property
    def level(self) -> str:
        """``study``, ``series`` or ``image``: every image below the key's level takes its label."""
        return LABEL_KEYS[self.key]


class Preprocessing(_Section):
    """How pixels become the network's input; fields that do not apply to the modality are refused."""

    #: CT: (centre, width) in HU per channel; default one soft-tissue window.
    windows: tuple[tuple[float, float], ...] | None = None
    #: CR/DX/MG: "file" applies the file's VOI LUT or window (percentiles if it has none); "percentile" ignores it.
    voi: Literal["file", "percentile"] | None = None
    #: CR/DX/MG and MR "percentile": intensity percentiles mapped to [0, 1].
    percentiles: tuple[float, float] | None = None
    #: MR: per-image z-score or percentile scaling.
    normalise: Literal["zscore", "percentile"] | None = None
    #: US/SC/XC: keep three colour channels, or convert to one grey channel.
    colour: Literal["rgb", "grey"] | None = None
    #: Multi-frame objects: which frames become examples.
    frames: Literal["first", "middle", "all"] | tuple[int, ...] = "middle"

    @field_validator("windows")
    @classmethod
    def _windows(cls, v: tuple[tuple[float, float], ...] | None) -> tuple[tuple[float, float], ...] | None:
        if v is not None:
            if not 1 <= len(v) <= 4:
                raise ValueError("give 1 to 4 windows, one per channel, as [centre, width] in HU")
            if any(width <= 0 for _, width in v):
                raise ValueError("every window width must be > 0 HU")
        return v

    @field_validator("percentiles")
    @classmethod
    def _percentiles(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0.0 <= v[0] < v[1] <= 100.0:
            raise ValueError("percentiles must be [low, high] with 0 <= low < high <= 100")
        return v

    @field_validator("frames")
    @classmethod
    def _frames(cls, v: object) -> object:
        if isinstance(v, tuple) and (not v or any(i < 0 for i in v)):
            raise ValueError('frames is "first", "middle", "all" or a non-empty list of 0-based frame numbers')
        return v


class Augmentation(_Section):
    """Per-image random augmentation at training time (each example is still used once per step)."""

    flip: bool = False
    rotate_degrees: float = Field(0.0, ge=0.0, le=30.0, alias="rotate-degrees")
    intensity_jitter: float = Field(0.0, ge=0.0, le=0.5, alias="intensity-jitter")


class Network(_Section):
    """The network, its initial weights (a local file the study pins by SHA-256) and what is trained."""

    name: Literal["scatter-head", "densenet121", "resnet18", "resnet50", "efficientnet-b0"] = "scatter-head"
    #: A local file, relative to the study file's folder; nothing is ever downloaded.
    weights: str | None = None
    weights_sha256: str | None = Field(None, alias="weights-sha256")
    trainable: Literal["all", "last-block", "head", "norm-and-bias"] = "all"

    @model_validator(mode="after")
    def _pinned(self) -> Network:
        if (self.weights is None) != (self.weights_sha256 is None):
            raise ValueError("weights and weights-sha256 go together: the study pins its initial weights by hash")
        if self.weights_sha256 is not None and not _SHA256.match(self.weights_sha256):
            raise ValueError("weights-sha256 must be 64 lower-case hex digits (`sha256sum FILE`)")
        if self.name == "scatter-head" and self.trainable not in ("all", "head"):
            raise ValueError("the scatter-head network has a fixed front end: trainable must be all or head")
        return self


class Metrics(_Section):
    """Which metrics are reported, per site and pooled, per class and macro-averaged."""

    names: tuple[str, ...] = METRICS
    #: Decision threshold on a class's probability (binary and multilabel; multiclass takes the arg-max).
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    #: Bins of the calibration error.
    calibration_bins: int = Field(10, ge=2, le=50, alias="calibration-bins")

    @field_validator("names")
    @classmethod
    def _known(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [n for n in v if n not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
        return v


class Study(_Section):
    """One study: validated as a whole, so every site and the coordinator agree on what it means."""

    name: str = "study"
    task: Task = "binary"
    #: binary: [negative, positive]; multiclass: K >= 3 names; multilabel: K >= 2 finding names.
    classes: tuple[str, ...] = ("absent", "present")
    modality: Modality = "CT"
    image_size: int = Field(64, ge=16, le=512, multiple_of=4, alias="image-size")
    #: Fraction of patients held out for evaluation at each site (by a hash of the pseudonym).
    test_fraction: float = Field(0.25, gt=0.0, lt=1.0, alias="test-fraction")
    labels: Labels = Labels()
    preprocessing: Preprocessing = Preprocessing()
    augmentation: Augmentation = Augmentation()
    network: Network = Network()
    metrics: Metrics = Metrics()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("name: 1-64 letters, digits, space, '.', '_' or '-', starting with a letter or digit")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Study:
        self._check_classes()
        self._check_preprocessing()
        return self

    def _check_classes(self) -> None:
        names = self.classes
        if len(set(names)) != len(names) or any(not _NAME.match(n) for n in names):
            raise ValueError("classes must be distinct names (letters, digits, space, '.', '_', '-')")
        if any(MULTILABEL_SEPARATOR in n or n.lower() == NO_FINDING for n in names):
            raise ValueError(f"a class may not contain {MULTILABEL_SEPARATOR!r} or be {NO_FINDING!r}")
        need = {"binary": (2, 2), "multiclass": (3, 64), "multilabel": (2, 64)}[self.task]
        if not need[0] <= len(names) <= need[1]:
            raise ValueError(f"a {self.task} study needs {need[0]}" + (f" to {need[1]}" if need[1] != need[0] else "")
                             + f" classes (got {len(names)})")

    def _check_preprocessing(self) -> None:
        p = self.preprocessing
        allowed = {
            "windows": self.modality == "CT",
            "voi": self.modality in RADIOGRAPHY,
            "percentiles": self.modality in RADIOGRAPHY or self.modality == "MR",
            "normalise": self.modality == "MR",
            "colour": self.modality in COLOUR,
        }
        for field, ok in allowed.items():
            if getattr(p, field) is not None and not ok:
                raise ValueError(f"preprocessing.{field} does not apply to modality {self.modality}; remove it")
        if self.network.name == "scatter-head" and self.in_channels != 1:
            raise ValueError("the scatter-head network takes one channel: use one CT window or colour = \"grey\", "
                             "or choose a MONAI network (densenet121, resnet18, resnet50, efficientnet-b0)")

    # ---- derived facts: one place for what the rest of medfed needs to know ----------------
    @property
    def num_outputs(self) -> int:
        """Logits the network emits: one for binary, one per class otherwise."""
        return 1 if self.task == "binary" else len(self.classes)

    @property
    def windows(self) -> tuple[tuple[float, float], ...]:
        """CT windows, with the soft-tissue default."""
        return self.preprocessing.windows or ((40.0, 400.0),)

    @property
    def in_channels(self) -> int:
        """Input channels: one per CT window, three for colour kept as RGB, else one."""
        if self.modality == "CT":
            return len(self.windows)
        if self.modality in COLOUR and (self.preprocessing.colour or "rgb") == "rgb":
            return 3
        return 1

    def preprocessing_digest(self) -> str:
        """SHA-256 of everything that decides a cached input tensor (modality, preprocessing, size)."""
        key = {"modality": self.modality, "image-size": self.image_size,
               "preprocessing": self.preprocessing.model_dump(mode="json"), "version": 1}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def digest(self) -> str:
        """SHA-256 of the whole study, canonically; what a privacy officer approves."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def canonical_json(self) -> str:
        """The study as canonical JSON (sorted keys, aliases): what a run carries to the sites."""
        return json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True, separators=(",", ":"))

    def target(self, label: str) -> int | tuple[float, ...]:
        """The training target of a manifest label: a class index, or a 0/1 vector for multilabel.

        Binary accepts 0/1 or the class names; multiclass a class name or its index; multilabel the
        present findings joined by ``|`` (``none`` for no finding). Raises ValueError naming the fix.
        """
        text = label.strip()
        if self.task == "multilabel":
            if text.lower() == NO_FINDING:
                return tuple(0.0 for _ in self.classes)
            found = [t.strip() for t in text.split(MULTILABEL_SEPARATOR)]
            unknown = [t for t in found if t not in self.classes]
            if unknown:
                raise ValueError(f"label names finding(s) not in the study's classes ({', '.join(self.classes)}); "
                                 f"write present findings joined by '{MULTILABEL_SEPARATOR}', or '{NO_FINDING}'")
            return tuple(1.0 if c in found else 0.0 for c in self.classes)
        if text in self.classes:
            return self.classes.index(text)
        if text.isdigit() and int(text) < len(self.classes):
            return int(text)
        raise ValueError(f"label is not one of the study's classes ({', '.join(self.classes)}) "
                         f"or an index 0-{len(self.classes) - 1}")


def parse_study(data: dict, source: str | Path = "study") -> Study:
    """Validate a study table; a bad field is refused with its name and the fix."""
    table = data.get("study", data) if isinstance(data, dict) else data
    try:
        return Study.model_validate(table)
    except ValidationError as err:
        raise ConfigError(describe_validation(source, err, "Fix the field(s) above (`medfed study check FILE`).")) \
            from None


def load_study(path: str | Path) -> Study:
    """Read and validate ``study.toml``."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"study file {path} does not exist; write one with `medfed study init {path} ...`") \
            from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read study file {path}: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML ({err}); fix it and run `medfed study check {path}`") from None
    return parse_study(data, path)


def study_from_json(text: str, source: str = "the run's study") -> Study:
    """The study a run carries (canonical JSON), validated as strictly as a file."""
    try:
        data = json.loads(text)
    except ValueError:
        raise ConfigError(f"{source} is not valid JSON; the coordinator must ship a study made by medfed") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source} is not a table; the coordinator must ship a study made by medfed")
    return parse_study(data, source)


#: The study every run used before studies existed, and `medfed demo`'s: soft-tissue CT, binary, 64 px.
DEFAULT_STUDY = Study()


def study_of(cfg: RunConfig) -> Study:
    """The study a run config names: its ``study`` JSON, else the default study at ``image-size``."""
    if cfg.study:
        return study_from_json(cfg.study)
    return DEFAULT_STUDY.model_copy(update={"image_size": cfg.image_size})


def served_study(site: SiteConfig, cfg: RunConfig) -> Study:
    """The run's study if ``site`` serves it: valid, and the default or one its privacy officer approved.

    Light (no torch), so the egress guard checks it with the run bounds, before anything runs on the data.
    Raises ConfigError for a malformed study and OutOfBounds for one the site has not approved.
    """
    try:
        study = study_of(cfg)
    except ConfigError as err:
        raise ConfigError(f"site {site.name} cannot serve this run's study: {err}") from None
    if cfg.study and study.digest() not in site.approved_studies:
        raise OutOfBounds(
            f"site {site.name} refuses study {study.name!r} (sha256 {study.digest()}): this site's privacy officer "
            "has not approved it; to approve, add that SHA-256 to approved-studies in the site's site.toml"
        )
    return study
