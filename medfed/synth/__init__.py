"""Synthetic hospitals: raw CT or DX DICOM with realistic PHI, a label table, and their study.

``medfed synth`` stands in for a consortium's PACS exports, so that the whole
pipeline (de-identification, DP training, federation) can be run and tested
without real patients. Sites differ the way real hospitals do: size,
prevalence, scanner calibration, noise, sharpness and matrix size. The study is
binary, multiclass (normal and grades) or multilabel (several findings), on CT
abdomen slices or DX chest radiographs (MONOCHROME1); :func:`generate_public`
makes a separate labelled set for pretraining.

Everything is a pure function of the arguments: the same seed gives
byte-identical files (no wall clock, no uuid4; numpy ``Generator`` only).

Layout written under ``out``::

    sites.json                         what each site is (parameters, counts)
    study.toml                         the study (task, classes, modality, image size)
    hospital-a/labels.csv              AccessionNumber,label
    hospital-a/dicom/<MRN>_<NAME>/<DATE>_<ACCESSION>/CT000001.dcm   (DX000001.dcm)
    hospital-b/...
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import json
import logging
import re
import shutil
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfed.settings import ConfigError
from medfed.synth import _people as people
from medfed.synth._chest import Detector, draw_thorax, render_chest, voi_window
from medfed.synth._dicom import (
    DXImage,
    Equipment,
    ImageRecord,
    build_dataset,
    build_dx_dataset,
    make_uid,
    to_stored,
    write,
)
from medfed.synth._findings import (
    BINARY_CLASSES,
    FINDINGS,
    SYNTH_MODALITIES,
    TASKS,
    Target,
    class_names,
    draw_ct,
    draw_dx,
    draw_targets,
    has_finding,
    label_text,
)
from medfed.synth._phantom import Scanner, burn_text, draw_body, render_slice
from models.study import MULTILABEL_SEPARATOR, NO_FINDING, RADIOGRAPHY, parse_study

__all__ = [
    "SiteInfo", "generate_hospitals", "generate_public", "PublicSet", "study_toml", "class_names", "site_name",
    "MAX_SITES", "GENERATOR_VERSION", "STUDY_FILE", "TASKS", "SYNTH_MODALITIES", "FINDINGS",
]

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2
MAX_SITES = 26
_SITE_DIR = re.compile(r"^hospital-[a-z]$")
STUDY_FILE = "study.toml"
_LABEL_TEXT = {
    "binary": "finding present (1) or absent (0), one per AccessionNumber",
    "multiclass": "one class name per AccessionNumber",
    "multilabel": f"present findings joined by '{MULTILABEL_SEPARATOR}', or '{NO_FINDING}', one per AccessionNumber",
}
_FIRST_STUDY = dt.date(2018, 1, 8)
_STUDY_SPAN_DAYS = 6 * 365


@dataclass(frozen=True)
class SiteInfo:
    """One generated site, as the CLI and the demo need to find it."""

    name: str
    dicom_dir: Path
    labels_csv: Path
    patients: int
    images: int
    prevalence: float  # target fraction of positive images (realised up to rounding)
    positives: int = 0  # images with a finding (binary: positives)
    burned_in: int = 0
    matrix: int = 0  # CT: rows = columns; DX: rows
    task: str = "binary"
    modality: str = "CT"
    classes: tuple[str, ...] = BINARY_CLASSES
    #: Images per class; multilabel: images showing each finding, and "none".
    class_counts: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class _Profile:
    """Fixed character of a site; the list below is cycled for many sites."""

    ratio: int  # patients relative to the largest site (10)
    prevalence: float
    matrix: int
    fov_mm: float
    gain: float
    offset_hu: float
    noise_hu: float
    blur_mm: float
    table_y_mm: float
    manufacturer: str
    model: str
    software: str
    kernel: str
    kvp: int
    pixel_representation: int
    bits_stored: int
    rescale_intercept: float
    window: tuple[float, float]
    institution: str
    short: str  # accession / AE-title prefix
    street: str


@dataclass(frozen=True)
class _DXProfile:
    """A site's radiography room (the site's identity and size come from its ``_Profile``)."""

    model: str
    software: str
    kvp: int
    detector: Detector
    voi_lut: bool  # the system writes a VOI LUT Sequence besides the window


# Detector rows x columns at 1.3-1.7 mm: a 43 cm plate, binned; 12 to 14 bits stored.
_DX_PROFILES: tuple[_DXProfile, ...] = (
    _DXProfile("Aurora DR 2", "NW-DR 3.1", 120, Detector(320, 288, 1.40, 12, 420.0, 0.90, 6.0, 1.0), False),
    _DXProfile("HX Digital 43", "HXD 5.0.1", 125, Detector(288, 288, 1.50, 14, 1700.0, 0.85, 30.0, 1.3), True),
    _DXProfile("MeriDR 1", "MDR 1.4", 110, Detector(256, 240, 1.70, 12, 380.0, 0.92, 10.0, 1.6), True),
    _DXProfile("Aurora DR 1", "NW-DR 2.7", 120, Detector(352, 320, 1.30, 13, 800.0, 0.88, 14.0, 0.9), False),
    _DXProfile("HX Digital 35", "HXD 4.2", 125, Detector(288, 256, 1.50, 14, 1600.0, 0.90, 36.0, 1.2), True),
    _DXProfile("MeriDR 2", "MDR 2.0", 115, Detector(256, 256, 1.65, 12, 400.0, 0.87, 9.0, 1.4), False),
)


_PROFILES: tuple[_Profile, ...] = (
    _Profile(10, 0.50, 256, 350.0, 1.00, 0.0, 12.0, 0.7, 135.0,
             "Northwind Medical Systems", "Aurora CT 128", "NW-CT 4.2.1", "STANDARD", 120,
             0, 12, -1024.0, (40.0, 400.0), "Riverton General Hospital", "RGH", "100 HARBOR RD"),
    _Profile(5, 0.35, 192, 360.0, 1.05, 12.0, 18.0, 1.0, 125.0,
             "Helix Imaging", "HX Vista 64", "HXV 2.8.0", "B30f", 120,
             1, 16, -1024.0, (50.0, 350.0), "Northfield University Medical Center", "NUMC", "1 CAMPUS DR"),
    _Profile(2, 0.20, 160, 340.0, 0.94, -15.0, 24.0, 1.3, 140.0,
             "Meridian Tomography", "Meridian 16", "MT 1.9", "SOFT", 100,
             1, 16, 0.0, (40.0, 400.0), "Lakeshore Community Hospital", "LCH", "22 SHORE RD"),
    _Profile(8, 0.30, 224, 350.0, 1.02, -6.0, 15.0, 0.9, 130.0,
             "Northwind Medical Systems", "Aurora CT 64", "NW-CT 4.1.7", "STANDARD", 120,
             0, 12, -1024.0, (40.0, 400.0), "Mount Carrow Regional Hospital", "MCR", "5 SUMMIT WAY"),
    _Profile(4, 0.45, 192, 355.0, 0.97, 10.0, 20.0, 1.1, 138.0,
             "Helix Imaging", "HX Vista 128", "HXV 3.0.2", "B31s", 120,
             1, 16, -1024.0, (40.0, 400.0), "Eastbrook Memorial Hospital", "EBM", "300 MEMORIAL PKWY"),
    _Profile(3, 0.25, 160, 345.0, 1.07, 5.0, 22.0, 1.2, 128.0,
             "Meridian Tomography", "Meridian 32", "MT 2.1", "SOFT", 110,
             0, 12, -1024.0, (40.0, 400.0), "Saltmarsh District Hospital", "SDH", "9 ESTUARY LN"),
)


def site_name(index: int) -> str:
    """Folder name of the ``index``-th site (0 → ``hospital-a``)."""
    return f"hospital-{chr(ord('a') + index)}"


def _patients_at(index: int, largest: int) -> int:
    """Patients at site ``index``: the profile ratio applied to the largest site."""
    ratio = _PROFILES[index % len(_PROFILES)].ratio
    return max(2, round(largest * ratio / 10))


def _check_args(sites: int, patients: int, seed: int, burned_in_fraction: float) -> None:
    """Fail before touching the disk, saying which option to change."""
    if not isinstance(sites, int) or isinstance(sites, bool) or not 1 <= sites <= MAX_SITES:
        raise ValueError(f"sites must be an integer from 1 to {MAX_SITES} (got {sites!r}); "
                         "pass --sites 3 for the usual demo")
    if not isinstance(patients, int) or isinstance(patients, bool) or patients < 2:
        raise ValueError(
            f"patients must be an integer of at least 2 (got {patients!r}): it is the patient count of the "
            "largest site, the others are scaled from it; pass --patients 200 for the usual demo"
        )
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer (got {seed!r})")
    if not 0.0 <= float(burned_in_fraction) <= 1.0:
        raise ValueError(f"burned_in_fraction must be between 0 and 1 (got {burned_in_fraction!r})")


def _safe_name(text: str) -> str:
    """Folder-safe form of a name (PACS exports use such names in paths)."""
    return re.sub(r"[^A-Z0-9]+", "_", text.upper()).strip("_")


def _fmt_time(t: dt.datetime) -> str:
    """DICOM TM value (HHMMSS)."""
    return t.strftime("%H%M%S")


def _age(birth: dt.date, on: dt.date) -> str:
    """DICOM AS value (e.g. 057Y) at the study date."""
    years = on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))
    return f"{years:03d}Y"


def _equipment(index: int, prof: _Profile, rng: np.random.Generator, modality: str = "CT") -> tuple[Equipment, str]:
    """The site's scanner and institution identity; later cycles become other campuses."""
    cycle = index // len(_PROFILES)
    suffix = f" Campus {cycle + 1}" if cycle else ""
    short = prof.short + (str(cycle + 1) if cycle else "")
    city, state, zip_prefix = people.REGIONS[index % len(people.REGIONS)][0]
    dx = _DX_PROFILES[index % len(_DX_PROFILES)] if modality == "DX" else None
    eq = Equipment(
        manufacturer=prof.manufacturer,
        model=dx.model if dx else prof.model,
        software=dx.software if dx else prof.software,
        serial=f"{prof.short[:2]}{int(rng.integers(100000, 1000000))}",
        station=f"{short}{modality}{int(rng.integers(1, 10)):02d}",
        institution=prof.institution + suffix,
        institution_address=f"{prof.street}, {city}, {state} {zip_prefix}01",
        department="DIAGNOSTIC RADIOLOGY",
        ae_title=f"{short}_PACS",
        kernel="" if dx else prof.kernel,
        kvp=dx.kvp if dx else prof.kvp,
        pixel_representation=0 if dx else prof.pixel_representation,
        bits_stored=dx.detector.bits_stored if dx else prof.bits_stored,
        rescale_intercept=0.0 if dx else prof.rescale_intercept,
        window_center=prof.window[0],
        window_width=prof.window[1],
        mrn_issuer=f"{short} MRN",
    )
    return eq, short


def _voi_lut(window: tuple[float, float], bits_stored: int) -> tuple[int, int, tuple[int, ...]]:
    """A sigmoid VOI LUT over the window (first value mapped, output bits, table), as some DX systems write."""
    centre, width = window
    first = max(0, int(centre - width / 2.0))
    last = min(2**bits_stored - 1, int(centre + width / 2.0))
    x = np.arange(first, last + 1, dtype=np.float64)
    table = np.rint(4095.0 / (1.0 + np.exp(-4.0 * (x - centre) / width))).astype(int)
    return first, 12, tuple(int(v) for v in table)


def _generate_site(
    root: Path,
    index: int,
    n_patients: int,
    seed: int,
    burned_in_fraction: float,
    task: str = "binary",
    classes: tuple[str, ...] = BINARY_CLASSES,
    modality: str = "CT",
) -> tuple[dict, int, int, int]:
    """Write one site under ``root/<name>``; return its sites.json entry and counts.

    For binary CT every random draw happens in the order it always did, so a seed
    gives the same bytes as before multiclass, multilabel and DX existed: each step
    below draws from the site's one generator, in this order.
    """
    site = _Site.draw(index, seed, task, classes, modality)
    studies = site.draw_studies(n_patients)
    n_images = len(studies)
    targets, n_pos = site.draw_targets(n_images)
    burned, n_burn = _draw_burned(site.rng, n_images, burned_in_fraction)

    site_dir = root / site.name
    dicom_dir = site_dir / "dicom"
    dicom_dir.mkdir(parents=True)
    labels = io.StringIO()
    writer = csv.writer(labels, lineterminator="\n")
    writer.writerow(["AccessionNumber", "label"])
    for i, st in enumerate(studies):
        accession = site.write_image(dicom_dir, st, targets[i], bool(burned[i]))
        writer.writerow([accession, label_text(task, classes, targets[i])])
    (site_dir / "labels.csv").write_text(labels.getvalue(), encoding="utf-8")
    entry = site.entry(n_patients, n_images, n_pos, n_burn, targets)
    return entry, n_images, int(n_pos), int(n_burn)


def _draw_burned(rng: np.random.Generator, n_images: int, fraction: float) -> tuple[np.ndarray, int]:
    """Which images get burned-in text: ``fraction`` of them, at least one when the fraction is above 0."""
    n_burn = round(fraction * n_images)
    if fraction > 0 and n_burn == 0:
        n_burn = 1
    burned = np.zeros(n_images, dtype=bool)
    burned[rng.choice(n_images, size=n_burn, replace=False)] = True
    return burned, n_burn


@dataclass
class _Visit:
    """When one study was made and by whom: times of the study, series and acquisition, and the staff."""

    start: dt.datetime
    series_t: dt.datetime
    acq_t: dt.datetime
    referrer: people.Person
    radiologist: people.Person
    tech: people.Person


@dataclass
class _Pixels:
    """One image's pixels and geometry, with the patient weight its body implies (DX: the VOI to write)."""

    weight: float
    pixel_mm: float
    position: tuple[float, float, float]
    pixels: np.ndarray
    dx_image: DXImage | None = None


@dataclass
class _Site:
    """One synthetic site while it is written: its identity, equipment, staff and random generator.

    Every method draws from ``rng``; :func:`_generate_site` calls them in the order that keeps
    a seed's bytes.
    """

    name: str
    index: int
    seed: int
    task: str
    classes: tuple[str, ...]
    modality: str
    prof: _Profile
    rng: np.random.Generator
    eq: Equipment
    short: str
    scanner: Scanner
    dx_prof: _DXProfile | None
    referrers: list[people.Person]
    radiologists: list[people.Person]
    technologists: list[people.Person]

    @classmethod
    def draw(cls, index: int, seed: int, task: str, classes: tuple[str, ...], modality: str) -> _Site:
        """The site's equipment, then its staff (who recur across its studies, as at a real department)."""
        prof = _PROFILES[index % len(_PROFILES)]
        rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
        eq, short = _equipment(index, prof, rng, modality)
        scanner = Scanner(
            matrix=prof.matrix,
            fov_mm=prof.fov_mm,
            gain=prof.gain,
            offset_hu=prof.offset_hu,
            noise_hu=prof.noise_hu,
            blur_mm=prof.blur_mm,
            table_y_mm=prof.table_y_mm,
        )
        dx_prof = _DX_PROFILES[index % len(_DX_PROFILES)] if modality == "DX" else None
        referrers = [people.make_person(rng) for _ in range(8)]
        radiologists = [people.make_person(rng) for _ in range(3)]
        technologists = [people.make_person(rng) for _ in range(4)]
        return cls(site_name(index), index, seed, task, classes, modality, prof, rng, eq, short, scanner, dx_prof,
                   referrers, radiologists, technologists)

    def draw_studies(self, n_patients: int) -> list[dict]:
        """Patients and their studies (1-2 each, months apart), each study with its accession number."""
        mrns: set[str] = set()
        accession_serial = int(self.rng.integers(100000, 400000))
        studies: list[dict] = []
        for p in range(n_patients):
            patient, dates = self._draw_patient(p, mrns)
            for s, date in enumerate(dates):
                accession_serial += int(self.rng.integers(1, 60))
                studies.append(
                    {
                        "patient": patient,
                        "index": (p, s),
                        "date": date,
                        "accession": f"{self.short}{date.year % 100:02d}{accession_serial:07d}",
                    }
                )
        return studies

    def _draw_patient(self, p: int, mrns: set[str]) -> tuple[dict, list[dt.date]]:
        """Patient ``p``: identity, an MRN unique at the site, body, and the dates of their studies."""
        rng = self.rng
        person = people.make_person(rng)
        while True:
            mrn = f"{int(rng.integers(10_000_000, 100_000_000))}"
            if mrn not in mrns:
                mrns.add(mrn)
                break
        body = draw_thorax(rng) if self.dx_prof else draw_body(rng)
        first = _FIRST_STUDY + dt.timedelta(days=int(rng.integers(0, _STUDY_SPAN_DAYS)))
        birth = first - dt.timedelta(days=int(rng.integers(25 * 365, 89 * 365)))
        n_studies = 1 + int(rng.random() < 0.5)
        dates = [first]
        if n_studies == 2:
            dates.append(first + dt.timedelta(days=int(rng.integers(30, 720))))
        patient = {
            "person": person,
            "mrn": mrn,
            "other_id": f"E{int(rng.integers(10**8, 10**9))}",
            "birth": birth,
            "address": people.make_address(rng, self.index),
            "phone": people.make_phone(rng),
            "body": body,
            "height": float(np.clip(rng.normal(1.76 if person.sex == "M" else 1.63, 0.07), 1.45, 2.05)),
            "uid": make_uid(self.seed, self.name, "patient", p),
            "folder": f"{mrn}_{_safe_name(person.last)}_{_safe_name(person.first)}",
        }
        return patient, dates

    def draw_targets(self, n_images: int) -> tuple[list[Target], int]:
        """Each image's target and how many show a finding (binary: the site's prevalence, exactly)."""
        if self.task == "binary":
            n_pos = round(self.prof.prevalence * n_images)
            positive = np.zeros(n_images, dtype=bool)
            positive[self.rng.permutation(n_images)[:n_pos]] = True
            return [int(v) for v in positive], n_pos
        targets = draw_targets(self.rng, self.task, self.classes, n_images, self.prof.prevalence)
        return targets, sum(has_finding(self.task, t) for t in targets)

    def write_image(self, dicom_dir: Path, st: dict, target: Target, burned: bool) -> str:
        """Render and write one study's image where a PACS export puts it; return its accession number."""
        pat = st["patient"]
        person: people.Person = pat["person"]
        date: dt.date = st["date"]
        visit = self._draw_visit(date)
        fill = self._fill(pat, date, visit)
        overlay = [person.overlay, f"MRN {pat['mrn']}", f"{date:%d-%b-%Y}".upper()]
        if self.dx_prof is None:
            image = self._ct_pixels(pat, target, burned, overlay)
        else:
            image = self._dx_pixels(self.dx_prof, pat, target, burned, overlay)
        rec = self._record(st, visit, fill, burned, image)
        if image.dx_image is None:
            ds = build_dataset(rec, self.eq, image.pixels)
        else:
            ds = build_dx_dataset(rec, self.eq, image.pixels, image.dx_image)
        folder = dicom_dir / pat["folder"] / f"{rec.study_date}_{rec.accession}"
        folder.mkdir(parents=True, exist_ok=True)
        write(folder / f"{self.modality}{rec.instance_number:06d}.dcm", ds)
        return rec.accession

    def _draw_visit(self, date: dt.date) -> _Visit:
        """The study's time of day, series and acquisition a few minutes later, and the staff on duty."""
        rng = self.rng
        start = dt.datetime.combine(date, dt.time(7, 0)) + dt.timedelta(seconds=int(rng.integers(0, 13 * 3600)))
        series_t = start + dt.timedelta(seconds=int(rng.integers(120, 600)))
        acq_t = series_t + dt.timedelta(seconds=int(rng.integers(5, 60)))
        referrer = self.referrers[int(rng.integers(len(self.referrers)))]
        radiologist = self.radiologists[int(rng.integers(len(self.radiologists)))]
        tech = self.technologists[int(rng.integers(len(self.technologists)))]
        return _Visit(start, series_t, acq_t, referrer, radiologist, tech)

    def _fill(self, pat: dict, date: dt.date, visit: _Visit) -> dict[str, str]:
        """The values free-text notes quote (name, MRN, dates...), so PHI sits in text as it does in real files."""
        person: people.Person = pat["person"]
        return {
            "name": person.display,
            "first": person.first.title(),
            "mrn": pat["mrn"],
            "dob": pat["birth"].strftime("%Y%m%d"),
            "ref": visit.referrer.last.title(),
            "op": visit.tech.display,
            "address": pat["address"].title(),
            "dob_like": (date - dt.timedelta(days=int(self.rng.integers(3, 60)))).strftime("%d/%m/%Y"),
        }

    def _ct_pixels(self, pat: dict, target: Target, burned: bool, overlay: list[str]) -> _Pixels:
        """A CT slice through the patient's body (with the target's finding), in stored values."""
        rng, scanner, body = self.rng, self.scanner, pat["body"]
        weight = 22.0 * pat["height"] ** 2 * (body.half_width / 135.0) ** 1.5 * (1.0 + body.fat_mm / 80.0)
        z = float(rng.uniform(-180.0, -80.0))
        pixel_mm = scanner.pixel_mm
        corner = -scanner.fov_mm / 2.0 + pixel_mm / 2.0
        position = (corner, corner, round(z, 1))
        lesion, extras = draw_ct(rng, self.task, target)
        hu = render_slice(rng, body, lesion, scanner, **extras)
        if burned:
            burn_text(hu, overlay)
        return _Pixels(weight, pixel_mm, position, to_stored(hu, self.eq))

    def _dx_pixels(self, dx_prof: _DXProfile, pat: dict, target: Target, burned: bool, overlay: list[str]) -> _Pixels:
        """A chest radiograph on the room's detector (with the target's findings), its window and VOI LUT."""
        rng, body = self.rng, pat["body"]
        det = dx_prof.detector
        weight = 22.0 * pat["height"] ** 2 * (body.half_width / 150.0) ** 2
        pixels = render_chest(rng, body, draw_dx(rng, self.task, target), det)
        if burned:
            canvas = pixels.astype(np.float64)
            burn_text(canvas, overlay)
            pixels = np.clip(canvas, 0, 2**det.bits_stored - 1).astype("<u2")
        window = voi_window(pixels, det)
        dx_image = DXImage(
            window_center=window[0], window_width=window[1],
            voi_lut=_voi_lut(window, det.bits_stored) if dx_prof.voi_lut else None,
            detector_id=f"{self.short}D{self.index:02d}", exposure_ms=int(rng.integers(5, 25)),
        )
        return _Pixels(weight, det.pixel_mm, (0.0, 0.0, 0.0), pixels, dx_image)

    def _pick(self, items: tuple[str, ...] | list[str]) -> str:
        """One of ``items``, drawn from the site's generator."""
        return items[int(self.rng.integers(len(items)))]

    def _record(self, st: dict, visit: _Visit, fill: dict[str, str], burned: bool, image: _Pixels) -> ImageRecord:
        """Every header value of one image (keyword order is draw order: it keeps a seed's bytes)."""
        pat, rng, pick = st["patient"], self.rng, self._pick
        person: people.Person = pat["person"]
        p, s = st["index"]
        date: dt.date = st["date"]
        seed, name = self.seed, self.name
        return ImageRecord(
            patient_name=person.pn,
            patient_display=person.display,
            patient_id=pat["mrn"],
            other_patient_id=pat["other_id"],
            birth_date=pat["birth"].strftime("%Y%m%d"),
            sex=person.sex,
            age=_age(pat["birth"], date),
            size_m=pat["height"],
            weight_kg=round(image.weight, 1),
            address=pat["address"],
            phone=pat["phone"],
            patient_comment=pick(people.PATIENT_NOTES).format(**fill),
            patient_uid=pat["uid"],
            study_uid=make_uid(seed, name, "study", p, s),
            study_date=date.strftime("%Y%m%d"),
            study_time=_fmt_time(visit.start),
            accession=st["accession"],
            study_id=str(int(rng.integers(1000, 99999))),
            referring=visit.referrer.pn,
            reading=visit.radiologist.pn,
            study_comment=pick(people.STUDY_NOTES).format(**fill),
            history=pick(people.HISTORY_NOTES).format(**fill),
            requested_procedure_id=f"RP{int(rng.integers(10**6, 10**7))}",
            scheduled_step_id=f"SPS{int(rng.integers(10**6, 10**7))}",
            series_uid=make_uid(seed, name, "series", p, s),
            series_number=int(rng.integers(2, 6)),
            series_time=_fmt_time(visit.series_t),
            frame_uid=make_uid(seed, name, "frame", p, s),
            sop_uid=make_uid(seed, name, "image", p, s),
            instance_number=int(rng.integers(20, 90)),
            acquisition_time=_fmt_time(visit.acq_t),
            performing=visit.radiologist.pn,
            operator=visit.tech.pn,
            image_comment=pick(people.IMAGE_NOTES).format(**fill),
            burned_in=burned,
            position=image.position,
            pixel_mm=image.pixel_mm,
            slice_mm=5.0,
            table_height=self.scanner.table_y_mm + 40.0,
            ctdi=float(rng.uniform(6.0, 14.0)),
            mas=int(rng.integers(120, 320)) if image.dx_image is None else int(rng.integers(2, 8)),
        )

    def entry(self, n_patients: int, n_images: int, n_pos: int, n_burn: int, targets: list[Target]) -> dict:
        """The site's sites.json entry: where its files are, its counts, and its scanner or detector."""
        eq, prof, scanner, dx_prof = self.eq, self.prof, self.scanner, self.dx_prof
        entry = {
            "name": self.name,
            "institution": eq.institution,
            "dicom_dir": f"{self.name}/dicom",
            "labels_csv": f"{self.name}/labels.csv",
            "patients": n_patients,
            "studies": n_images,
            "images": n_images,
            "prevalence": prof.prevalence,
            "positives": int(n_pos),
            "burned_in_images": int(n_burn),
        }
        if dx_prof is None:
            entry["scanner"] = {
                "manufacturer": eq.manufacturer,
                "model": eq.model,
                "kvp": eq.kvp,
                "kernel": eq.kernel,
                "matrix": scanner.matrix,
                "fov_mm": scanner.fov_mm,
                "pixel_spacing_mm": scanner.pixel_mm,
                "gain": scanner.gain,
                "offset_hu": scanner.offset_hu,
                "noise_hu": scanner.noise_hu,
                "blur_mm": scanner.blur_mm,
                "pixel_representation": eq.pixel_representation,
                "bits_stored": eq.bits_stored,
                "rescale_intercept": eq.rescale_intercept,
            }
        else:
            entry["detector"] = {
                "manufacturer": eq.manufacturer, "model": eq.model, "kvp": eq.kvp, "voi_lut": dx_prof.voi_lut,
                **dataclasses.asdict(dx_prof.detector),
            }
        if (self.task, self.modality) != ("binary", "CT"):
            entry["class_counts"] = _class_counts(self.task, self.classes, targets)
        return entry


def _class_counts(task: str, classes: tuple[str, ...], targets: list[Target]) -> dict[str, int]:
    """Images per class (multilabel: images showing each finding; "none": images with none)."""
    if task == "multilabel":
        counts = {c: sum(bool(t[j]) for t in targets) for j, c in enumerate(classes)}  # type: ignore[index]
        counts[NO_FINDING] = sum(not any(t) for t in targets)  # type: ignore[arg-type]
        return counts
    return {c: sum(int(t) == j for t in targets) for j, c in enumerate(classes)}  # type: ignore[arg-type]


def _clear_previous(out: Path, names: list[str], overwrite: bool) -> None:
    """Refuse to mix runs; with ``overwrite``, remove only what synth wrote before."""
    manifest = out / "sites.json"
    targets = {out / n for n in names}
    if manifest.exists():
        try:
            previous = json.loads(manifest.read_text(encoding="utf-8"))
            targets |= {out / s["name"] for s in previous.get("sites", []) if _SITE_DIR.match(str(s.get("name", "")))}
        except (ValueError, AttributeError, TypeError):
            pass
    existing = sorted(p for p in targets | {manifest, out / STUDY_FILE} if p.exists())
    if not existing:
        return
    if not overwrite:
        raise FileExistsError(
            f"{out} already holds synthetic sites ({', '.join(p.name for p in existing)}); "
            "choose an empty folder or pass overwrite=True (--overwrite) to replace them"
        )
    foreign = [p for p in existing if p.is_dir() and not {c.name for c in p.iterdir()} <= {"dicom", "labels.csv"}]
    if foreign:
        raise FileExistsError(
            f"{', '.join(str(p) for p in foreign)} holds files medfed synth did not write; "
            "move them away or choose another output folder"
        )
    for path in existing:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def study_toml(task: str, classes: tuple[str, ...], modality: str, image_size: int) -> str:
    """The ``study.toml`` of a synthetic consortium: validated before it is returned."""
    quoted = ", ".join(f'"{c}"' for c in classes)
    lines = [
        "# The study these synthetic hospitals were made for (written by `medfed synth`).",
        "# Check with `medfed study check`; use with `medfed data check`, `train` and `simulate`.",
        "[study]",
        f'name = "synth-{modality.lower()}-{task}"',
        f'task = "{task}"',
        f"classes = [{quoted}]",
        f'modality = "{modality}"',
        f"image-size = {image_size}",
        "",
        "[study.labels]",
        'key = "AccessionNumber"  # each site\'s labels.csv: AccessionNumber,label',
    ]
    if modality in RADIOGRAPHY:
        lines += ["", "[study.preprocessing]", 'voi = "file"  # the file\'s VOI LUT or window, MONOCHROME1 inverted']
    text = "\n".join(lines) + "\n"
    try:
        parse_study(tomllib.loads(text), "the synthetic study")  # a bad argument fails here, not at a site
    except ConfigError as err:
        raise ValueError(str(err)) from None
    return text


def generate_hospitals(
    out: Path,
    sites: int = 3,
    patients: int = 200,
    seed: int = 0,
    *,
    task: str = "binary",
    classes: int | None = None,
    modality: str = "CT",
    image_size: int = 64,
    burned_in_fraction: float | None = None,
    overwrite: bool = False,
) -> list[SiteInfo]:
    """Write ``sites`` synthetic hospitals under ``out``, their ``sites.json`` and ``study.toml``.

    ``patients`` is the patient count of the largest site; the others follow
    the ratio 10:5:2 (then 8:4:3, cycled). ``task``/``classes``/``modality`` pick
    the study (see :func:`medfed.synth._findings.class_names`); ``burned_in_fraction``
    defaults to 0.1 for CT and 0 for DX. Output is written to a temporary folder
    inside ``out`` and moved into place at the end, so an interrupted run leaves
    no half-made site behind. Binary CT gives the same bytes for a seed as it
    always has.
    """
    names_of_classes = class_names(task, classes, modality)
    if burned_in_fraction is None:
        burned_in_fraction = 0.1 if modality == "CT" else 0.0
    _check_args(sites, patients, seed, burned_in_fraction)
    study_text = study_toml(task, names_of_classes, modality, image_size) if isinstance(image_size, int) else ""
    if not study_text:
        raise ValueError(f"image_size must be an integer (got {image_size!r})")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder; choose a folder for the synthetic sites")
    names = [site_name(i) for i in range(sites)]
    out.mkdir(parents=True, exist_ok=True)
    _clear_previous(out, names, overwrite)

    started = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=".synth-", dir=out))
    infos: list[SiteInfo] = []
    entries: list[dict] = []
    legacy = (task, modality) == ("binary", "CT")
    try:
        for i in range(sites):
            n_patients = _patients_at(i, patients)
            entry, n_images, n_pos, n_burn = _generate_site(
                staging, i, n_patients, seed, burned_in_fraction, task, names_of_classes, modality)
            entries.append(entry)
            log.info(
                "synth: %s: %d patients, %d images, %d with a finding, %d with burned-in text",
                names[i], n_patients, n_images, n_pos, n_burn,
            )
            device = entry.get("scanner") or entry["detector"]
            infos.append(
                SiteInfo(
                    name=names[i],
                    dicom_dir=out / names[i] / "dicom",
                    labels_csv=out / names[i] / "labels.csv",
                    patients=n_patients,
                    images=n_images,
                    prevalence=entry["prevalence"],
                    positives=n_pos,
                    burned_in=n_burn,
                    matrix=device.get("matrix", device.get("rows", 0)),
                    task=task,
                    modality=modality,
                    classes=names_of_classes,
                    class_counts=entry.get("class_counts") or {
                        BINARY_CLASSES[0]: n_images - n_pos, BINARY_CLASSES[1]: n_pos},
                )
            )
        manifest = {
            "generator": "medfed synth",
            "version": GENERATOR_VERSION,
            "seed": seed,
            "patients_largest_site": patients,
            "burned_in_fraction": burned_in_fraction,
            "label": "lesion present (1) or absent (0), one per AccessionNumber" if legacy else _LABEL_TEXT[task],
            "sites": entries,
        }
        if not legacy:  # the binary CT manifest stays as it always was
            manifest |= {"task": task, "modality": modality, "classes": list(names_of_classes)}
        (staging / "sites.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        (staging / STUDY_FILE).write_text(study_text, encoding="utf-8")
        for name in names:
            (staging / name).rename(out / name)
        (staging / "sites.json").rename(out / "sites.json")
        (staging / STUDY_FILE).rename(out / STUDY_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("synth: wrote %d sites to %s in %.1f s", sites, out, time.perf_counter() - started)
    return infos


from medfed.synth._public import PublicSet, generate_public  # noqa: E402 - uses the helpers above
