"""Synthetic hospitals: raw CT DICOM with realistic PHI, plus a label table.

``medfed synth`` stands in for a consortium's PACS exports, so that the whole
pipeline (de-identification, DP training, federation) can be run and tested
without real patients. Sites differ the way real hospitals do: size,
prevalence, scanner calibration, noise, sharpness and matrix size.

Everything is a pure function of the arguments: the same seed gives
byte-identical files (no wall clock, no uuid4; numpy ``Generator`` only).

Layout written under ``out``::

    sites.json                         what each site is (parameters, counts)
    hospital-a/labels.csv              AccessionNumber,label
    hospital-a/dicom/<MRN>_<NAME>/<DATE>_<ACCESSION>/CT000001.dcm
    hospital-b/...
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import logging
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfed.synth import _people as people
from medfed.synth._dicom import Equipment, ImageRecord, build_dataset, make_uid, to_stored, write
from medfed.synth._phantom import Scanner, burn_text, draw_body, draw_lesion, render_slice

__all__ = ["SiteInfo", "generate_hospitals", "site_name", "MAX_SITES", "GENERATOR_VERSION"]

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2
MAX_SITES = 26
_SITE_DIR = re.compile(r"^hospital-[a-z]$")
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
    positives: int = 0
    burned_in: int = 0
    matrix: int = 0


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
        raise ValueError(f"sites must be an integer from 1 to {MAX_SITES} (got {sites!r}); pass --sites 3 for the usual demo")
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


def _equipment(index: int, prof: _Profile, rng: np.random.Generator) -> tuple[Equipment, str]:
    """The site's scanner and institution identity; later cycles become other campuses."""
    cycle = index // len(_PROFILES)
    suffix = f" Campus {cycle + 1}" if cycle else ""
    short = prof.short + (str(cycle + 1) if cycle else "")
    city, state, zip_prefix = people.REGIONS[index % len(people.REGIONS)][0]
    eq = Equipment(
        manufacturer=prof.manufacturer,
        model=prof.model,
        software=prof.software,
        serial=f"{prof.short[:2]}{int(rng.integers(100000, 1000000))}",
        station=f"{short}CT{int(rng.integers(1, 10)):02d}",
        institution=prof.institution + suffix,
        institution_address=f"{prof.street}, {city}, {state} {zip_prefix}01",
        department="DIAGNOSTIC RADIOLOGY",
        ae_title=f"{short}_PACS",
        kernel=prof.kernel,
        kvp=prof.kvp,
        pixel_representation=prof.pixel_representation,
        bits_stored=prof.bits_stored,
        rescale_intercept=prof.rescale_intercept,
        window_center=prof.window[0],
        window_width=prof.window[1],
        mrn_issuer=f"{short} MRN",
    )
    return eq, short


def _generate_site(
    root: Path,
    index: int,
    n_patients: int,
    seed: int,
    burned_in_fraction: float,
) -> tuple[dict, int, int, int]:
    """Write one site under ``root/<name>``; return its sites.json entry and counts."""
    name = site_name(index)
    prof = _PROFILES[index % len(_PROFILES)]
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    eq, short = _equipment(index, prof, rng)
    scanner = Scanner(
        matrix=prof.matrix,
        fov_mm=prof.fov_mm,
        gain=prof.gain,
        offset_hu=prof.offset_hu,
        noise_hu=prof.noise_hu,
        blur_mm=prof.blur_mm,
        table_y_mm=prof.table_y_mm,
    )

    # Staff recur across the site's studies, as at a real department.
    referrers = [people.make_person(rng) for _ in range(8)]
    radiologists = [people.make_person(rng) for _ in range(3)]
    technologists = [people.make_person(rng) for _ in range(4)]

    # Patients and their studies (1-2 each, months apart).
    mrns: set[str] = set()
    accession_serial = int(rng.integers(100000, 400000))
    studies: list[dict] = []
    for p in range(n_patients):
        person = people.make_person(rng)
        while True:
            mrn = f"{int(rng.integers(10_000_000, 100_000_000))}"
            if mrn not in mrns:
                mrns.add(mrn)
                break
        body = draw_body(rng)
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
            "address": people.make_address(rng, index),
            "phone": people.make_phone(rng),
            "body": body,
            "height": float(np.clip(rng.normal(1.76 if person.sex == "M" else 1.63, 0.07), 1.45, 2.05)),
            "uid": make_uid(seed, name, "patient", p),
            "folder": f"{mrn}_{_safe_name(person.last)}_{_safe_name(person.first)}",
        }
        for s, date in enumerate(dates):
            accession_serial += int(rng.integers(1, 60))
            studies.append(
                {
                    "patient": patient,
                    "index": (p, s),
                    "date": date,
                    "accession": f"{short}{date.year % 100:02d}{accession_serial:07d}",
                }
            )

    n_images = len(studies)
    n_pos = round(prof.prevalence * n_images)
    positive = np.zeros(n_images, dtype=bool)
    positive[rng.permutation(n_images)[:n_pos]] = True
    n_burn = round(burned_in_fraction * n_images)
    if burned_in_fraction > 0 and n_burn == 0:
        n_burn = 1
    burned = np.zeros(n_images, dtype=bool)
    burned[rng.choice(n_images, size=n_burn, replace=False)] = True

    site_dir = root / name
    dicom_dir = site_dir / "dicom"
    dicom_dir.mkdir(parents=True)
    labels = io.StringIO()
    writer = csv.writer(labels, lineterminator="\n")
    writer.writerow(["AccessionNumber", "label"])

    for i, st in enumerate(studies):
        pat = st["patient"]
        person: people.Person = pat["person"]
        p, s = st["index"]
        date: dt.date = st["date"]
        start = dt.datetime.combine(date, dt.time(7, 0)) + dt.timedelta(seconds=int(rng.integers(0, 13 * 3600)))
        series_t = start + dt.timedelta(seconds=int(rng.integers(120, 600)))
        acq_t = series_t + dt.timedelta(seconds=int(rng.integers(5, 60)))
        referrer = referrers[int(rng.integers(len(referrers)))]
        radiologist = radiologists[int(rng.integers(len(radiologists)))]
        tech = technologists[int(rng.integers(len(technologists)))]
        dob = pat["birth"].strftime("%Y%m%d")
        fill = {
            "name": person.display,
            "first": person.first.title(),
            "mrn": pat["mrn"],
            "dob": dob,
            "ref": referrer.last.title(),
            "op": tech.display,
            "address": pat["address"].title(),
            "dob_like": (date - dt.timedelta(days=int(rng.integers(3, 60)))).strftime("%d/%m/%Y"),
        }
        pick = lambda items: items[int(rng.integers(len(items)))]  # noqa: E731
        body = pat["body"]
        weight = 22.0 * pat["height"] ** 2 * (body.half_width / 135.0) ** 1.5 * (1.0 + body.fat_mm / 80.0)
        z = float(rng.uniform(-180.0, -80.0))
        pixel_mm = scanner.pixel_mm
        corner = -scanner.fov_mm / 2.0 + pixel_mm / 2.0

        lesion = draw_lesion(rng) if positive[i] else None
        hu = render_slice(rng, body, lesion, scanner)
        if burned[i]:
            burn_text(hu, [person.overlay, f"MRN {pat['mrn']}", f"{date:%d-%b-%Y}".upper()])
        pixels = to_stored(hu, eq)

        rec = ImageRecord(
            patient_name=person.pn,
            patient_display=person.display,
            patient_id=pat["mrn"],
            other_patient_id=pat["other_id"],
            birth_date=dob,
            sex=person.sex,
            age=_age(pat["birth"], date),
            size_m=pat["height"],
            weight_kg=round(weight, 1),
            address=pat["address"],
            phone=pat["phone"],
            patient_comment=pick(people.PATIENT_NOTES).format(**fill),
            patient_uid=pat["uid"],
            study_uid=make_uid(seed, name, "study", p, s),
            study_date=date.strftime("%Y%m%d"),
            study_time=_fmt_time(start),
            accession=st["accession"],
            study_id=str(int(rng.integers(1000, 99999))),
            referring=referrer.pn,
            reading=radiologist.pn,
            study_comment=pick(people.STUDY_NOTES).format(**fill),
            history=pick(people.HISTORY_NOTES).format(**fill),
            requested_procedure_id=f"RP{int(rng.integers(10**6, 10**7))}",
            scheduled_step_id=f"SPS{int(rng.integers(10**6, 10**7))}",
            series_uid=make_uid(seed, name, "series", p, s),
            series_number=int(rng.integers(2, 6)),
            series_time=_fmt_time(series_t),
            frame_uid=make_uid(seed, name, "frame", p, s),
            sop_uid=make_uid(seed, name, "image", p, s),
            instance_number=int(rng.integers(20, 90)),
            acquisition_time=_fmt_time(acq_t),
            performing=radiologist.pn,
            operator=tech.pn,
            image_comment=pick(people.IMAGE_NOTES).format(**fill),
            burned_in=bool(burned[i]),
            position=(corner, corner, round(z, 1)),
            pixel_mm=pixel_mm,
            slice_mm=5.0,
            table_height=scanner.table_y_mm + 40.0,
            ctdi=float(rng.uniform(6.0, 14.0)),
            mas=int(rng.integers(120, 320)),
        )
        ds = build_dataset(rec, eq, pixels)
        folder = dicom_dir / pat["folder"] / f"{rec.study_date}_{rec.accession}"
        folder.mkdir(parents=True, exist_ok=True)
        write(folder / f"CT{rec.instance_number:06d}.dcm", ds)
        writer.writerow([rec.accession, int(positive[i])])

    (site_dir / "labels.csv").write_text(labels.getvalue(), encoding="utf-8")
    entry = {
        "name": name,
        "institution": eq.institution,
        "dicom_dir": f"{name}/dicom",
        "labels_csv": f"{name}/labels.csv",
        "patients": n_patients,
        "studies": n_images,
        "images": n_images,
        "prevalence": prof.prevalence,
        "positives": int(n_pos),
        "burned_in_images": int(n_burn),
        "scanner": {
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
        },
    }
    return entry, n_images, int(n_pos), int(n_burn)


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
    existing = sorted(p for p in targets | {manifest} if p.exists())
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


def generate_hospitals(
    out: Path,
    sites: int = 3,
    patients: int = 200,
    seed: int = 0,
    *,
    burned_in_fraction: float = 0.1,
    overwrite: bool = False,
) -> list[SiteInfo]:
    """Write ``sites`` synthetic hospitals under ``out`` and describe them.

    ``patients`` is the patient count of the largest site; the others follow
    the ratio 10:5:2 (then 8:4:3, cycled). Output is written to a temporary
    folder inside ``out`` and moved into place at the end, so an interrupted
    run leaves no half-made site behind.
    """
    _check_args(sites, patients, seed, burned_in_fraction)
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
    try:
        for i in range(sites):
            n_patients = _patients_at(i, patients)
            entry, n_images, n_pos, n_burn = _generate_site(staging, i, n_patients, seed, burned_in_fraction)
            entries.append(entry)
            log.info(
                "synth: %s: %d patients, %d images, %d positive, %d with burned-in text",
                names[i], n_patients, n_images, n_pos, n_burn,
            )
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
                    matrix=entry["scanner"]["matrix"],
                )
            )
        manifest = {
            "generator": "medfed synth",
            "version": GENERATOR_VERSION,
            "seed": seed,
            "patients_largest_site": patients,
            "burned_in_fraction": burned_in_fraction,
            "label": "lesion present (1) or absent (0), one per AccessionNumber",
            "sites": entries,
        }
        (staging / "sites.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        for name in names:
            (staging / name).rename(out / name)
        (staging / "sites.json").rename(out / "sites.json")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("synth: wrote %d sites to %s in %.1f s", sites, out, time.perf_counter() - started)
    return infos
