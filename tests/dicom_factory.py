"""Synthetic DICOM with planted PHI, for the anonymization tests.

Every identifying value is a distinctive marker (see :data:`PHI_MARKERS`) so a
test can scan raw bytes of every output file for it. Pixel values stay below
0x0800, so no run of pixel bytes can spell an ASCII marker by chance.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

ORG_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root: looks like a real site's UIDs

PHI_MARKERS: tuple[str, ...] = (
    "Phiname",
    "Zelda",
    "PHIPID-837261",
    "PHIACC99182",
    "PHIADDR Elm Street",
    "Phidoc",
    "Phiperf",
    "Phioper",
    "PHIINST Saint Mercy",
    "PHIINSTADDR",
    "PHISTATION",
    "PHICOMMENT",
    "PHIOTHERID",
    "PHITEL5551234",
    "PHIREQPROC",
    "PHIREASON",
    "PHIISSUER",
    "Phideep",
    "PHIDEEPTEXT",
    "PHIPRIVATE",
    "PHIVENDOR",
    "PHIOVERLAYCOMMENT",
    "PHICURVE",
    "PHINAMETOUSE",
    "PHISTUDYDESC",
    "PHISERIESDESC",
    "PHIPROTOCOL",
    "19610417",  # birth date
)

# A tag of PS3.15 Table E.1-1 that pydicom 3.0.2's dictionary does not know.
NAME_TO_USE = 0x00100012


@dataclass(frozen=True)
class Patient:
    """One synthetic patient; ``index`` varies every identifier but keeps the markers."""

    index: int = 0

    @property
    def patient_id(self) -> str:
        return f"PHIPID-837261-{self.index}"

    @property
    def name(self) -> str:
        return f"Phiname{self.index}^Zelda"

    def accession(self, study: int) -> str:
        return f"PHIACC99182{self.index}{study}"  # <= 16 chars (SH)


def uid(*parts: object) -> str:
    """Deterministic 'site' UID for the given parts (like a real scanner's UIDs)."""
    return generate_uid(prefix=ORG_ROOT, entropy_srcs=[str(p) for p in parts])


def pixels(seed: int, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2000, size=(size, size), dtype=np.int16)


def _item(**values: object) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def make_ct(
    patient: Patient = Patient(),
    *,
    study: int = 0,
    series: int = 0,
    instance: int = 0,
    study_date: dt.date = dt.date(2021, 3, 15),
    burned_in: bool = False,
) -> Dataset:
    """A CT image full of planted PHI in every place the profile must handle."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid(patient.index, study, series, instance, "sop")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = ORG_ROOT + "1"
    ds.file_meta.ImplementationVersionName = "PHISCANNER"
    ds.file_meta.SourceApplicationEntityTitle = "PHISTATION"

    day = study_date.strftime("%Y%m%d")
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid(patient.index, study, "study")
    ds.SeriesInstanceUID = uid(patient.index, study, series, "series")
    ds.FrameOfReferenceUID = uid(patient.index, study, "frame")
    ds.InstanceCreatorUID = ORG_ROOT + "99"
    ds.StudyDate = day
    ds.SeriesDate = day
    ds.AcquisitionDate = day
    ds.ContentDate = day
    ds.InstanceCreationDate = day
    ds.StudyTime = "101500"
    ds.SeriesTime = "101600"
    ds.AcquisitionDateTime = f"{day}101530.123456+0100"
    ds.AccessionNumber = patient.accession(study)
    ds.Modality = "CT"
    ds.Manufacturer = "ACME"
    ds.InstitutionName = "PHIINST Saint Mercy Hospital"
    ds.InstitutionAddress = "PHIINSTADDR 1 Hospital Road"
    ds.ReferringPhysicianName = "Phidoc^Referrer"
    ds.PerformingPhysicianName = "Phiperf^Doctor"
    ds.OperatorsName = "Phioper^Tech"
    ds.StationName = "PHISTATION1"
    ds.StudyDescription = "PHISTUDYDESC chest"
    ds.SeriesDescription = "PHISERIESDESC axial"
    ds.ProtocolName = "PHIPROTOCOL Zelda"
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = "19610417"
    ds.PatientSex = "F"
    ds.PatientAge = "059Y"
    ds.PatientAddress = "PHIADDR Elm Street 12, Springfield"
    ds.PatientTelephoneNumbers = "PHITEL5551234"
    ds.OtherPatientIDs = "PHIOTHERID-1"
    ds.ImageComments = "PHICOMMENT patient Zelda complained"
    ds.StudyID = "PHISTUDY1"
    ds.SeriesNumber = series + 1
    ds.InstanceNumber = instance + 1
    ds.BurnedInAnnotation = "YES" if burned_in else "NO"
    ds.add_new(NAME_TO_USE, "LO", "PHINAMETOUSE")  # not in pydicom's dictionary

    # Listed sequence (X): everything inside goes, two levels deep.
    ds.RequestAttributesSequence = Sequence(
        [
            _item(
                RequestedProcedureID="PHIREQPROC",
                ReasonForTheRequestedProcedure="PHIREASON Zelda",
                AccessionNumber=patient.accession(study),
                IssuerOfAccessionNumberSequence=Sequence([_item(LocalNamespaceEntityID="PHIISSUER")]),
            )
        ]
    )
    # Unlisted sequences: kept, cleaned by VR two levels deep.
    deep = _item(
        CodeValue="T-D3000",
        CodingSchemeDesignator="SRT",
        CodeMeaning="Chest",
        CodingSchemeUID="2.16.840.1.113883.6.96",  # SNOMED: well known, not an instance
    )
    deep.add_new(0x0040A123, "PN", "Phideep^Person")  # Person Name (table: D)
    deep.add_new(0x00400031, "UT", "PHIDEEPTEXT")  # Local Namespace Entity ID: unlisted free text
    deep.add_new(0x00080021, "DA", day)  # a date deep down: shifted
    deep.add_new(0x00081155, "UI", uid(patient.index, "deep"))  # instance UID deep down
    ds.AnatomicRegionSequence = Sequence(
        [
            _item(
                CodeValue="T-D3000",
                CodingSchemeDesignator="SRT",
                CodeMeaning="Chest",
                DerivationCodeSequence=Sequence([deep]),
            )
        ]
    )
    ds.IssuerOfAccessionNumberSequence = Sequence([_item(LocalNamespaceEntityID="PHIISSUER")])
    ds.ReferencedImageSequence = Sequence(
        [
            _item(
                ReferencedSOPClassUID=CTImageStorage,
                ReferencedSOPInstanceUID=uid(patient.index, study, series, instance + 1, "sop"),
            )
        ]
    )

    # Private block with PHI, including a private sequence.
    block = ds.private_block(0x0009, "PHIVENDOR", create=True)
    block.add_new(0x01, "LO", "PHIPRIVATE Zelda")
    block.add_new(0x02, "SQ", Sequence([_item(PatientName="Phiname^Zelda")]))

    # Overlay group 6000 (data and comments are listed by pattern rows) and a curve.
    ds.add_new(0x60000010, "US", 32)
    ds.add_new(0x60000011, "US", 32)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60003000, "OW", b"\xff\x00" * 64)
    ds.add_new(0x60004000, "LT", "PHIOVERLAYCOMMENT")
    ds.add_new(0x50000005, "US", 1)
    ds.add_new(0x50002500, "LO", "PHICURVE")

    arr = pixels(patient.index * 1000 + study * 100 + series * 10 + instance)
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.PixelData = arr.tobytes()
    return ds


def write(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a DICOM file (with preamble and file meta)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.preamble = b"\x00" * 128
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def tree_digest(root: Path) -> str:
    """Digest of every file (path and bytes) under ``root``: proves SRC was not touched."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def all_bytes_under(root: Path) -> dict[Path, bytes]:
    """Raw bytes of every file under ``root`` (manifest, audit, images...)."""
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
