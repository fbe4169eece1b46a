"""Raw CT and DX image files as a hospital PACS would export them, PHI included.

Every module a CT image needs is filled (Patient, General Study, Patient Study,
General Series, Frame of Reference, General Equipment, General Image, Image
Plane, Image Pixel, CT Image, VOI LUT, SOP Common; for DX: DX Series, DX Anatomy
Imaged, DX Image, DX Detector, VOI LUT), and identifiers are spread
the way real exports spread them: names and IDs in free text, in nested
sequences and in a private block, so the de-identifier has real work to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

# Root for synthetic test data only; the rest of each UID is a hash of the
# seed, site and object, so the same seed gives the same UIDs.
UID_ROOT = "1.2.826.0.1.3680043.10.732."
IMPLEMENTATION_CLASS_UID = UID_ROOT + "1.1"
IMPLEMENTATION_VERSION = "MEDFED_SYNTH_1"
PRIVATE_CREATOR = "MEDFED SYNTH"
PRIVATE_GROUP = 0x0009
# Retired but still sent by old RIS/PACS; used as a reference to study/patient.
DETACHED_STUDY_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"
DETACHED_PATIENT_SOP_CLASS = "1.2.840.10008.3.1.2.1.1"


def make_uid(*parts: object) -> str:
    """Deterministic UID from its parts (seed, site, kind, index...)."""
    return str(generate_uid(prefix=UID_ROOT, entropy_srcs=["medfed-synth", *map(str, parts)]))


def _ds(value: float, digits: int = 6) -> str:
    """Format a decimal string (DS, at most 16 characters)."""
    text = f"{value:.{digits}g}"
    return text if len(text) <= 16 else f"{value:.6e}"


@dataclass(frozen=True)
class Equipment:
    """Per-site scanner identity and storage conventions."""

    manufacturer: str
    model: str
    software: str
    serial: str
    station: str
    institution: str
    institution_address: str
    department: str
    ae_title: str
    kernel: str
    kvp: int
    pixel_representation: int  # 0 unsigned, 1 signed
    bits_stored: int
    rescale_intercept: float
    window_center: float
    window_width: float
    mrn_issuer: str


@dataclass(frozen=True)
class ImageRecord:
    """Everything one file says, identifiers and timestamps included."""

    # patient
    patient_name: str
    patient_display: str
    patient_id: str
    other_patient_id: str
    birth_date: str
    sex: str
    age: str
    size_m: float
    weight_kg: float
    address: str
    phone: str
    patient_comment: str
    patient_uid: str
    # study
    study_uid: str
    study_date: str
    study_time: str
    accession: str
    study_id: str
    referring: str
    reading: str
    study_comment: str
    history: str
    requested_procedure_id: str
    scheduled_step_id: str
    # series / image
    series_uid: str
    series_number: int
    series_time: str
    frame_uid: str
    sop_uid: str
    instance_number: int
    acquisition_time: str
    performing: str
    operator: str
    image_comment: str
    burned_in: bool
    position: tuple[float, float, float]
    pixel_mm: float
    slice_mm: float
    table_height: float
    ctdi: float
    mas: int


def to_stored(hu: np.ndarray, eq: Equipment) -> np.ndarray:
    """HU → stored values (slope 1), clipped to what BitsStored can hold."""
    stored = np.rint(hu - eq.rescale_intercept)
    if eq.pixel_representation == 0:
        lo, hi, dtype = 0, 2**eq.bits_stored - 1, "<u2"
    else:
        lo, hi, dtype = -(2 ** (eq.bits_stored - 1)), 2 ** (eq.bits_stored - 1) - 1, "<i2"
    return np.clip(stored, lo, hi).astype(dtype)


@dataclass(frozen=True)
class Exam:
    """What the exam is called, where the RIS and the modality write it."""

    sop_class: str
    modality: str
    image_type: tuple[str, ...]
    study_description: str
    series_description: str
    procedure: str  # requested procedure description
    step: str  # scheduled / performed procedure step description


CT_EXAM = Exam(CTImageStorage, "CT", ("ORIGINAL", "PRIMARY", "AXIAL"), "CT ABDOMEN WO CONTRAST",
                       "AXIAL 5MM ABD", "CT ABDOMEN", "CT ABDOMEN WO CONTRAST")
DX_EXAM = Exam(DigitalXRayImageStorageForPresentation, "DX", ("ORIGINAL", "PRIMARY"), "XR CHEST PA",
                       "CHEST PA", "XR CHEST 1 VIEW", "XR CHEST PA")


@dataclass(frozen=True)
class DXImage:
    """What a DX file says beyond the record: its window, and optionally a VOI LUT."""

    window_center: float
    window_width: float
    voi_lut: tuple[int, int, tuple[int, ...]] | None = None  # (first stored value mapped, output bits, table)
    detector_id: str = ""
    distance_source_to_detector: float = 1800.0
    distance_source_to_patient: float = 1650.0
    exposure_ms: int = 10


def _base(rec: ImageRecord, eq: Equipment, pixels: np.ndarray, proto: Exam) -> Dataset:
    """Modules every image has (patient, study, series, equipment, SOP common, pixels), PHI included."""
    rows, cols = pixels.shape
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = proto.sop_class
    meta.MediaStorageSOPInstanceUID = rec.sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    meta.SourceApplicationEntityTitle = eq.ae_title

    ds = Dataset()
    ds.file_meta = meta

    # SOP Common
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = list(proto.image_type)
    ds.InstanceCreationDate = rec.study_date
    ds.InstanceCreationTime = rec.acquisition_time
    ds.SOPClassUID = proto.sop_class
    ds.SOPInstanceUID = rec.sop_uid
    # General Study / Series / Image dates and times
    ds.StudyDate = rec.study_date
    ds.SeriesDate = rec.study_date
    ds.AcquisitionDate = rec.study_date
    ds.ContentDate = rec.study_date
    ds.StudyTime = rec.study_time
    ds.SeriesTime = rec.series_time
    ds.AcquisitionTime = rec.acquisition_time
    ds.ContentTime = rec.acquisition_time
    ds.AccessionNumber = rec.accession
    ds.Modality = proto.modality
    ds.Manufacturer = eq.manufacturer
    ds.InstitutionName = eq.institution
    ds.InstitutionAddress = eq.institution_address
    ds.ReferringPhysicianName = rec.referring
    ds.ReferringPhysicianTelephoneNumbers = "555-0100"
    ds.StationName = eq.station
    ds.StudyDescription = proto.study_description
    ds.SeriesDescription = proto.series_description
    ds.InstitutionalDepartmentName = eq.department
    ds.PhysiciansOfRecord = rec.referring
    ds.PerformingPhysicianName = rec.performing
    ds.NameOfPhysiciansReadingStudy = rec.reading
    ds.OperatorsName = rec.operator
    ds.ManufacturerModelName = eq.model

    ref_patient = Dataset()
    ref_patient.ReferencedSOPClassUID = DETACHED_PATIENT_SOP_CLASS
    ref_patient.ReferencedSOPInstanceUID = rec.patient_uid
    ds.ReferencedPatientSequence = Sequence([ref_patient])

    # Patient
    ds.PatientName = rec.patient_name
    ds.PatientID = rec.patient_id
    ds.IssuerOfPatientID = eq.mrn_issuer
    ds.PatientBirthDate = rec.birth_date
    ds.PatientSex = rec.sex
    ds.OtherPatientIDs = rec.other_patient_id
    other = Dataset()
    other.PatientID = rec.other_patient_id
    other.IssuerOfPatientID = "REGIONAL EMPI"
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = Sequence([other])
    ds.PatientAge = rec.age
    ds.PatientSize = _ds(rec.size_m, 3)
    ds.PatientWeight = _ds(rec.weight_kg, 3)
    ds.PatientAddress = rec.address
    ds.PatientTelephoneNumbers = rec.phone
    ds.AdditionalPatientHistory = rec.history
    ds.PatientComments = rec.patient_comment

    ds.DeviceSerialNumber = eq.serial
    ds.SoftwareVersions = eq.software

    # Study / series identification
    ds.StudyInstanceUID = rec.study_uid
    ds.SeriesInstanceUID = rec.series_uid
    ds.StudyID = rec.study_id
    ds.SeriesNumber = rec.series_number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = rec.instance_number
    ds.ImageComments = rec.image_comment

    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = eq.bits_stored
    ds.HighBit = eq.bits_stored - 1
    ds.PixelRepresentation = eq.pixel_representation
    ds.BurnedInAnnotation = "YES" if rec.burned_in else "NO"
    ds.LossyImageCompression = "00"

    # Study comments (retired, still common) and the requesting side
    ds.StudyComments = rec.study_comment
    ds.RequestingPhysician = rec.referring
    ds.RequestedProcedureDescription = proto.procedure
    ds.PerformedProcedureStepStartDate = rec.study_date
    ds.PerformedProcedureStepStartTime = rec.series_time
    ds.PerformedProcedureStepID = rec.scheduled_step_id
    ds.PerformedProcedureStepDescription = proto.step

    ref_study = Dataset()
    ref_study.ReferencedSOPClassUID = DETACHED_STUDY_SOP_CLASS
    ref_study.ReferencedSOPInstanceUID = rec.study_uid
    request = Dataset()
    request.AccessionNumber = rec.accession
    request.ReferencedStudySequence = Sequence([ref_study])
    request.StudyInstanceUID = rec.study_uid
    request.RequestedProcedureDescription = proto.procedure
    request.RequestedProcedureID = rec.requested_procedure_id
    request.ScheduledProcedureStepDescription = proto.step
    request.ScheduledProcedureStepID = rec.scheduled_step_id
    ds.RequestAttributesSequence = Sequence([request])

    # Vendor private block: this exporter copies identifiers into it.
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "LO", rec.patient_display)
    block.add_new(0x11, "LO", rec.patient_id)
    block.add_new(0x12, "DA", rec.birth_date)
    block.add_new(0x13, "LT", f"Exported for {rec.patient_display} by {eq.station}")
    block.add_new(0x14, "US", 1)

    ds.PixelData = pixels.tobytes()
    return ds


def build_dataset(rec: ImageRecord, eq: Equipment, pixels: np.ndarray) -> Dataset:
    """Assemble the full CT Image dataset with its file meta information."""
    cols = pixels.shape[1]
    ds = _base(rec, eq, pixels, CT_EXAM)

    # CT acquisition
    ds.BodyPartExamined = "ABDOMEN"
    ds.ScanOptions = "HELICAL MODE"
    ds.SliceThickness = _ds(rec.slice_mm)
    ds.KVP = str(eq.kvp)
    ds.DataCollectionDiameter = "500"
    ds.ProtocolName = "ABD ROUTINE"
    ds.ReconstructionDiameter = _ds(rec.pixel_mm * cols)
    ds.DistanceSourceToDetector = "1040"
    ds.DistanceSourceToPatient = "570"
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = _ds(rec.table_height)
    ds.RotationDirection = "CW"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = str(int(rec.mas * 2))
    ds.Exposure = str(rec.mas)
    ds.FilterType = "BODY FILTER"
    ds.GeneratorPower = "72"
    ds.FocalSpots = "1.2"
    ds.ConvolutionKernel = eq.kernel
    ds.PatientPosition = "HFS"
    ds.CTDIvol = round(rec.ctdi, 2)

    # Image plane and frame of reference
    ds.ImagePositionPatient = [_ds(v) for v in rec.position]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = rec.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(rec.position[2])

    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelSpacing = [_ds(rec.pixel_mm), _ds(rec.pixel_mm)]
    ds.WindowCenter = _ds(eq.window_center)
    ds.WindowWidth = _ds(eq.window_width)
    ds.RescaleIntercept = _ds(eq.rescale_intercept)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenterWidthExplanation = "ABDOMEN"
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def build_dx_dataset(rec: ImageRecord, eq: Equipment, pixels: np.ndarray, dx: DXImage) -> Dataset:
    """Digital X-Ray Image Storage - For Presentation: a PA chest, MONOCHROME1, log exposure."""
    ds = _base(rec, eq, pixels, DX_EXAM)
    # DX Series, DX Anatomy Imaged, DX Positioning
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BodyPartExamined = "CHEST"
    ds.AnatomicRegionSequence = Sequence([_code("51185008", "SCT", "Chest")])
    ds.ImageLaterality = "U"
    ds.ViewPosition = "PA"
    ds.ViewCodeSequence = Sequence([_code("399348003", "SCT", "postero-anterior")])
    ds.PatientOrientation = ["L", "F"]
    ds.ProtocolName = "CHEST PA"
    ds.AcquisitionContextSequence = Sequence()
    # DX Image: log exposure, higher value = more X-ray intensity (lung), displayed dark (MONOCHROME1)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "INVERSE"
    ds.AcquisitionDeviceProcessingDescription = "CHEST STANDARD"
    # DX Detector
    ds.DetectorType = "SCINTILLATOR"
    ds.DetectorConfiguration = "AREA"
    ds.DetectorID = dx.detector_id
    ds.ImagerPixelSpacing = [_ds(rec.pixel_mm), _ds(rec.pixel_mm)]
    # at the patient: the detector's spacing over the geometric magnification
    at_patient = rec.pixel_mm * dx.distance_source_to_patient / dx.distance_source_to_detector
    ds.PixelSpacing = [_ds(at_patient), _ds(at_patient)]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "MAGNIFICATION AT SOURCE TO PATIENT DISTANCE"
    ds.PositionerType = "COLUMN"
    # X-Ray Acquisition Dose / Generation
    ds.KVP = str(eq.kvp)
    ds.ExposureTime = str(dx.exposure_ms)
    ds.XRayTubeCurrent = str(int(rec.mas * 1000 / dx.exposure_ms))
    ds.Exposure = str(rec.mas)
    ds.DistanceSourceToDetector = _ds(dx.distance_source_to_detector)
    ds.DistanceSourceToPatient = _ds(dx.distance_source_to_patient)
    ds.ImageAndFluoroscopyAreaDoseProduct = _ds(rec.ctdi / 10.0, 4)
    ds.Grid = "FOCUSED"
    ds.FocalSpots = "1.2"
    # VOI LUT: a window always, a LUT table where the site's system writes one
    ds.WindowCenter = _ds(dx.window_center)
    ds.WindowWidth = _ds(dx.window_width)
    ds.WindowCenterWidthExplanation = "CHEST"
    ds.VOILUTFunction = "LINEAR"
    if dx.voi_lut is not None:
        first, bits, table = dx.voi_lut
        item = Dataset()
        item.LUTDescriptor = [len(table), first, bits]
        item.LUTExplanation = "CHEST SIGMOID"
        item.add_new(0x00283006, "US", list(table))  # LUT Data
        ds.VOILUTSequence = Sequence([item])
    return ds


def write(path: Path, ds: Dataset) -> None:
    """Write a standard DICOM file (preamble, DICM, group 2 meta)."""
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
