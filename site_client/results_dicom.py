"""Results a PACS and a radiologist can read: one Comprehensive 3D SR per study, Grad-CAM as Secondary Capture.

Built with highdicom (TID 1500 measurement report), so the structure follows the standard rather than
our own reading of it. Every result names the model it came from: the algorithm identification carries
the release's name, version, threshold and FAB hash, and the observer device's UID is derived from the
weights' SHA-256 (models.release.device_uid), so one UID means exactly one set of weights.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from medfed.files import write_file

if TYPE_CHECKING:
    import torch

    from models.release import Release
    from site_client.inference import Scored

log = logging.getLogger(__name__)
# highdicom narrates every module it copies at INFO; a person running predict wants our lines only.
logging.getLogger("highdicom").setLevel(logging.WARNING)

MANUFACTURER = "medfed"
#: Our own coding scheme for a study's class names (they are the consortium's, not SNOMED's).
SCHEME = "99MEDFED"
_NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
_FINDING = codes.DCM.Finding
_PRESENT, _ABSENT = codes.SCT.Present, codes.SCT.Absent


def _code(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value[:16], SCHEME, meaning[:64])


def algorithm(release: Release, thresholds: tuple[float, ...], threshold_label: str) -> hd.sr.AlgorithmIdentification:
    """What produced the result: release name and version, threshold, FAB and weights hashes."""
    card = release.card
    return hd.sr.AlgorithmIdentification(
        name=str(card.get("name", release.study.name))[:64],
        version=f"{card.get('medfed_version', '')} {card.get('date', '')}"[:64],
        parameters=[f"threshold {threshold_label} {' '.join(f'{t:.4g}' for t in thresholds)}"[:64],
                    f"fab sha256 {card.get('fab_sha256') or 'none'}"[:64],
                    f"weights sha256 {release.weights_sha256}"[:64]],
    )


def _observation_context(release: Release) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=release.device_uid, name=str(release.card.get("name", "medfed model"))[:64],
        manufacturer_name=MANUFACTURER, model_name=str(release.card.get("network", ""))[:64])
    return hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))


def _group(s: Scored, release: Release, algo: hd.sr.AlgorithmIdentification) -> list:
    """One TID 1501 group per image and class: its score, present/absent, and the image it refers to."""
    study = release.study
    h = s.header
    frames = [s.frame + 1] if int(h.get("NumberOfFrames", 1) or 1) > 1 else None
    classes = study.classes[1:] if study.task == "binary" else study.classes
    groups = []
    for k, name in enumerate(classes):
        ref = hd.sr.SourceImageForMeasurement(h.SOPClassUID, h.SOPInstanceUID, referenced_frame_numbers=frames)
        score = hd.sr.Measurement(name=_code(f"score-{k}", f"Probability of {name}"), value=float(s.scores[k]),
                                  unit=_NO_UNITS, algorithm_id=algo, referenced_images=[ref])
        call = hd.sr.QualitativeEvaluation(_FINDING, _PRESENT if s.positive[k] else _ABSENT)
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(),
                                                         identifier=f"{name} {h.SOPInstanceUID}"[:64]),
            finding_type=_code(f"class-{k}", name), algorithm_id=algo, measurements=[score],
            qualitative_evaluations=[call],
            source_images=[hd.sr.SourceImageForMeasurementGroup(h.SOPClassUID, h.SOPInstanceUID,
                                                                referenced_frame_numbers=frames)]))
    return groups


def build_sr(study_items: list[Scored], release: Release, thresholds: tuple[float, ...], threshold_label: str,
             series_uid: str, instance_number: int) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 report of one study's images."""
    algo = algorithm(release, thresholds, threshold_label)
    groups = [g for s in study_items for g in _group(s, release, algo)]
    report = hd.sr.MeasurementReport(observation_context=_observation_context(release),
                                     procedure_reported=codes.SCT.Imaging, imaging_measurements=groups)
    evidence = list({s.header.SOPInstanceUID: s.header for s in study_items}.values())
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report, series_instance_uid=series_uid, series_number=900,
        sop_instance_uid=generate_uid(), instance_number=instance_number, manufacturer=MANUFACTURER,
        is_complete=True, is_final=False, is_verified=False)
    sr.SeriesDescription = f"medfed {release.study.name}"[:64]
    return sr


def write_srs(folder: Path, scored: list[Scored], release: Release, thresholds: tuple[float, ...],
              threshold_label: str) -> list[Path]:
    """One SR per study in ``folder``, named by the study's UID; returns the paths."""
    by_study: dict[str, list[Scored]] = defaultdict(list)
    for s in scored:
        by_study[str(s.header.StudyInstanceUID)].append(s)
    series_uid = generate_uid()
    paths = []
    for n, (uid, items) in enumerate(sorted(by_study.items()), start=1):
        sr = build_sr(items, release, thresholds, threshold_label, series_uid, n)
        path = folder / f"{uid}.dcm"
        write_file(path, _bytes(sr))
        paths.append(path)
    return paths


def _bytes(ds: object) -> bytes:
    import io

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)  # type: ignore[attr-defined]
    return buf.getvalue()


def cam_layer(model: torch.nn.Module) -> str:
    """The last 2-D convolution: Grad-CAM's usual target (finest spatial map that still sees the class)."""
    import torch

    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    if not names:
        raise ValueError("the network has no 2-D convolution for Grad-CAM")
    return names[-1]


def _letters(cosines: list[float]) -> str:
    """PS3.3 C.7.6.1.1.1 orientation letters of a direction (dominant axes first, up to two)."""
    names = (("L", "R"), ("P", "A"), ("H", "F"))
    order = sorted(range(3), key=lambda i: -abs(cosines[i]))
    return "".join(names[i][0 if cosines[i] > 0 else 1] for i in order[:2] if abs(cosines[i]) > 0.25) or "L"


def patient_orientation(header: object) -> tuple[str, str]:
    """The source's Patient Orientation, else derived from its Image Orientation (Patient).

    The saliency map is the source image resized, so its rows and columns point where the source's do.
    """
    value = getattr(header, "PatientOrientation", None)
    if value is not None and len(value) == 2 and all(value):
        return str(value[0]), str(value[1])
    iop = getattr(header, "ImageOrientationPatient", None)
    if iop is not None and len(iop) == 6:
        cos = [float(v) for v in iop]
        return _letters(cos[:3]), _letters(cos[3:])
    return "L", "P"  # no geometry at all: the axial default of the study's CT (rows run to the left)


def _overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The input's first channel in grey with the heat map blended in colour, as 8-bit RGB."""
    from matplotlib import colormaps

    grey = np.clip((image[0] + 1.0) / 2.0, 0.0, 1.0)
    colour = colormaps["jet"](np.clip(heat, 0.0, 1.0))[..., :3]
    alpha = 0.4 * np.clip(heat, 0.0, 1.0)[..., None]
    rgb = (1 - alpha) * grey[..., None] + alpha * colour
    return np.ascontiguousarray((rgb * 255).round().astype(np.uint8))


def write_saliency(folder: Path, model: torch.nn.Module, files: list[Path], src: Path, scored: list[Scored],
                   release: Release, device: str) -> list[Path]:
    """A Grad-CAM (MONAI) of the decided class of each image, as a Secondary Capture referencing its source."""
    import torch
    from monai.visualize import GradCAM

    from models.preprocess import preprocess, read_dicom

    study = release.study
    cam = GradCAM(nn_module=model, target_layers=cam_layer(model))
    series_uid = generate_uid()
    paths = []
    for n, s in enumerate(scored, start=1):
        done = preprocess(read_dicom(src / s.path), study)
        x = torch.from_numpy(done.arrays[done.frames.index(s.frame)])[None].to(device)
        k = 0 if study.task == "binary" else int(np.argmax(s.scores))
        with torch.enable_grad():
            heat = cam(x=x, class_idx=k)[0, 0].detach().cpu().numpy()
        rgb = _overlay(done.arrays[done.frames.index(s.frame)], heat)
        name = study.classes[1] if study.task == "binary" else study.classes[k]
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=s.header, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
            coordinate_system="PATIENT", patient_orientation=patient_orientation(s.header),
            series_instance_uid=series_uid, series_number=901,
            sop_instance_uid=generate_uid(), instance_number=n, manufacturer=MANUFACTURER)
        sc.SeriesDescription = f"medfed Grad-CAM {study.name}"[:64]
        sc.DerivationDescription = (f"Grad-CAM of class {name} by {release.card.get('name')} "
                                    f"(device {release.device_uid})")[:1024]
        sc.BurnedInAnnotation = "NO"
        # Type 2C in General Series: the source's laterality, or present and empty when it has none.
        sc.Laterality = str(s.header.get("Laterality", "") or "")
        path = folder / f"{s.header.SOPInstanceUID}-{s.frame}.dcm"
        write_file(path, _bytes(sc))
        paths.append(path)
    return paths
