"""`medfed study init|check` and `medfed data check` on a store `medfed deid run` made of pydicom's real files.

Also the labels CSV keyed by each DICOM identifier, resolved through the site's pseudonyms.
"""

from __future__ import annotations

import csv
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from anonymization.errors import LabelsError
from anonymization.labels import load_labels, read_labels
from anonymization.pseudonyms import Pseudonymizer
from medfed.cli import app
from models.dataset import StudyDataset
from models.study import load_study

runner = CliRunner()

#: (pydicom test file, patient, label or None for no row in the labels CSV)
FILES = [
    ("CT_small.dcm", "PAT-A", "absent"),
    ("693_J2KR.dcm", "PAT-B", "present"),  # CT, JPEG 2000
    ("693_UNCI.dcm", "PAT-C", "absent"),
    ("MR_small.dcm", "PAT-A", "present"),
    ("MR_small_RLE.dcm", "PAT-B", "absent"),  # MR, RLE
    ("emri_small_jpeg_ls_lossless.dcm", "PAT-C", "present"),  # MR, 10 frames, JPEG-LS
    ("MR_small_jp2klossless.dcm", "PAT-D", None),  # no label
]


@dataclass
class Site:
    root: Path
    deid: Path
    originals: dict[str, str]  # file -> original SOPInstanceUID
    output: str = ""


def _testfile(name: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return str(get_testdata_file(name))


def _write_study(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    root = tmp_path_factory.mktemp("site")
    raw = root / "raw"
    raw.mkdir()
    originals = {}
    lines = ["SeriesInstanceUID,label"]
    for i, (name, patient, label) in enumerate(FILES):
        ds = pydicom.dcmread(_testfile(name))
        ds.PatientID = patient
        ds.PatientName = f"Doe^{patient}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(raw / f"{i}.dcm")
        originals[name] = str(ds.SOPInstanceUID)
        if label is not None:
            lines.append(f"{ds.SeriesInstanceUID},{label}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    deid = root / "deid"
    result = runner.invoke(app, ["deid", "run", str(raw), str(deid), "--key", str(root / "keys" / "site.key"),
                                 "--labels", str(root / "labels.csv"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert len(list(csv.DictReader((deid / "manifest.csv").open()))) == len(FILES)
    return Site(root, deid, originals)


def _check(site: Site, study: Path, *extra: str) -> tuple[int, list[str]]:
    result = runner.invoke(app, ["data", "check", str(site.deid), "--study", str(study), *extra])
    assert "Traceback" not in result.output
    for uid in site.originals.values():
        assert uid not in result.output  # only pseudonyms and store paths
    assert "Doe^" not in result.output and "PAT-" not in result.output
    return result.exit_code, result.output.strip().splitlines()


def test_ct_study_uses_the_ct_images_whatever_their_syntax(site: Site, tmp_path: Path) -> None:
    study = tmp_path / "ct.toml"
    assert runner.invoke(app, ["study", "init", str(study), "--task", "binary", "--modality", "CT"]).exit_code == 0
    code, lines = _check(site, study)
    assert code == 0, "\n".join(lines)
    assert lines[-1] == "3 usable, 3 refused, 1 unlabelled"
    text = "\n".join(lines)
    assert "modality MR, not the study's CT" in text
    assert any(line.split()[:2] == ["absent", "2"] for line in lines)
    assert any(line.split()[:2] == ["present", "1"] for line in lines)
    assert "128x128 x1" in text and "512x512 x2" in text
    assert "3 preprocessed now, 0 reused" in text or "6 preprocessed now, 0 reused" in text
    _code, again = _check(site, study)
    assert "0 preprocessed now, 6 reused" in "\n".join(again) and again[-1] == lines[-1]


def test_mr_study_with_all_frames(site: Site, tmp_path: Path) -> None:
    study = tmp_path / "mr.toml"
    runner.invoke(app, ["study", "init", str(study), "--task", "binary", "--modality", "MR"])
    study.write_text(study.read_text().replace('frames = "middle"', 'frames = "all"'))
    code, lines = _check(site, study)
    assert code == 0, "\n".join(lines)
    assert lines[-1] == "3 usable, 3 refused, 1 unlabelled"
    assert "12 example(s) from 3 image(s)" in "\n".join(lines)  # 1 + 1 + 10 frames
    ds = StudyDataset(site.deid, load_study(study), "all")
    assert len(ds) == 12 and ds[0][0].shape == (1, 64, 64)
    assert ds.cache.stats.built == 0  # data check built the cache training reads


def test_a_label_the_study_cannot_read_is_refused_and_training_would_stop(site: Site, tmp_path: Path) -> None:
    study = tmp_path / "three.toml"
    runner.invoke(app, ["study", "init", str(study), "--task", "multiclass", "--classes", "a,b,c",
                        "--modality", "CT"])
    code, lines = _check(site, study)
    assert code == 1
    assert lines[-1] == "0 usable, 6 refused, 1 unlabelled"
    assert "training refuses this store" in "\n".join(lines)
    assert "not one of the study's classes" in "\n".join(lines)


def test_a_file_not_marked_de_identified_is_named_and_fails_the_check(site: Site, tmp_path: Path) -> None:
    copy = tmp_path / "deid"
    import shutil

    shutil.copytree(site.deid, copy, ignore=shutil.ignore_patterns(".cache"))
    row = next(r for r in csv.DictReader((copy / "manifest.csv").open()) if r["label"] == "absent")
    ds = pydicom.dcmread(copy / row["path"])
    ds.PatientIdentityRemoved = "NO"
    ds.save_as(copy / row["path"])
    study = tmp_path / "ct.toml"
    runner.invoke(app, ["study", "init", str(study), "--task", "binary", "--modality", "CT"])
    result = runner.invoke(app, ["data", "check", str(copy), "--study", str(study)])
    assert result.exit_code == 1
    assert f"{row['path']}: is not marked PatientIdentityRemoved=YES" in result.output
    assert result.output.strip().splitlines()[-1].endswith("refused, 1 unlabelled")


def test_data_check_of_a_folder_that_is_not_a_store(tmp_path: Path) -> None:
    study = tmp_path / "s.toml"
    runner.invoke(app, ["study", "init", str(study), "--task", "binary", "--modality", "CT"])
    result = runner.invoke(app, ["data", "check", str(tmp_path), "--study", str(study)])
    assert result.exit_code == 1 and "medfed deid run" in result.output and "Traceback" not in result.output


# ---- study init / check -----------------------------------------------------------------------
@pytest.mark.parametrize(("task", "classes", "modality", "network"), [
    ("binary", None, "CT", "scatter-head"),
    ("multiclass", "4", "MR", "resnet18"),
    ("multilabel", "effusion,nodule", "DX", "densenet121"),
    ("binary", None, "US", "scatter-head"),  # one channel: the template picks grey
    ("multiclass", "a,b,c", "XC", "efficientnet-b0"),
    ("binary", "2", "MG", "resnet50"),
])
def test_study_init_writes_a_template_that_checks(tmp_path: Path, task: str, classes: str | None, modality: str,
                                                  network: str) -> None:
    path = tmp_path / "my study.toml"
    args = ["study", "init", str(path), "--task", task, "--modality", modality, "--network", network,
            "--image-size", "128"] + (["--classes", classes] if classes else [])
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    study = load_study(path)
    assert (study.task, study.modality, study.network.name, study.image_size) == (task, modality, network, 128)
    if classes and not classes.isdigit():
        assert list(study.classes) == classes.split(",")
    assert "#" in path.read_text()  # commented
    check = runner.invoke(app, ["study", "check", str(path)])
    assert check.exit_code == 0 and study.digest() in check.output and study.preprocessing_digest() in check.output
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "--force" in again.output


def test_study_init_refuses_bad_options_without_writing(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    result = runner.invoke(app, ["study", "init", str(path), "--task", "multiclass", "--classes", "2",
                                 "--modality", "CT"])
    assert result.exit_code == 1 and "classes" in result.output and not path.exists()
    result = runner.invoke(app, ["study", "init", str(path), "--task", "binary", "--modality", "PET"])
    assert result.exit_code == 1 and "modality" in result.output and not path.exists()


@pytest.mark.parametrize(("edit", "field"), [
    (lambda t: t.replace('task = "binary"', 'task = "regression"'), "task"),
    (lambda t: t.replace("image-size = 64", "image-size = 30"), "image-size"),
    (lambda t: t + "\nunknown-key = 1\n", "unknown-key"),
    (lambda t: t.replace("[preprocessing]", '[preprocessing]\nnormalise = "zscore"'), "normalise"),
    (lambda t: t.replace("windows = [[40.0, 400.0]]", "windows = [[40.0, -1.0]]"), "windows"),
    (lambda t: t.replace('key = "AccessionNumber"', 'key = "PatientID"'), "labels.key"),
    (lambda t: t.replace("[network]", '[network]\nweights = "w.pt"'), "weights-sha256"),
    (lambda t: t.replace("rotate-degrees = 0.0", "rotate-degrees = 90"), "rotate"),
    (lambda t: t.replace("test-fraction = 0.25", "test-fraction = [0.25"), "not valid TOML"),
])
def test_bad_study_files_are_refused_field_by_field(tmp_path: Path, edit, field: str) -> None:  # noqa: ANN001
    path = tmp_path / "s.toml"
    runner.invoke(app, ["study", "init", str(path), "--task", "binary", "--modality", "CT"])
    path.write_text(edit(path.read_text()))
    result = runner.invoke(app, ["study", "check", str(path)])
    assert result.exit_code == 1, result.output
    assert field in result.output and "Traceback" not in result.output
    missing = runner.invoke(app, ["study", "check", str(tmp_path / "none.toml")])
    assert missing.exit_code == 1 and "medfed study init" in missing.output


# ---- labels keyed by any identifier -----------------------------------------------------------
SECRET = b"0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("key", ["AccessionNumber", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_labels_keyed_by_each_identifier_become_the_manifest_pseudonyms(tmp_path: Path, key: str) -> None:
    p = Pseudonymizer(SECRET)
    value = "ACC-17" if key == "AccessionNumber" else "1.2.826.0.1.3680043.8.498.1"
    path = tmp_path / "labels.csv"
    path.write_text(f"{key},label\n{value},effusion|nodule\n")
    table = read_labels(path, p)
    expected = p.accession(value) if key == "AccessionNumber" else p.uid(value)
    column = {"AccessionNumber": "accession", "StudyInstanceUID": "study_uid", "SeriesInstanceUID": "series_uid",
              "SOPInstanceUID": "sop_uid"}[key]
    assert (table.key, table.column, table.labels) == (key, column, {expected: "effusion|nodule"})
    assert value not in str(table.labels)
    if key != "AccessionNumber":
        assert read_labels(path, p, retain_uids=True).labels == {value: "effusion|nodule"}
        with pytest.raises(LabelsError, match="AccessionNumber,label"):
            load_labels(path, p)
    else:
        assert load_labels(path, p) == {expected: "effusion|nodule"}


def test_labels_are_checked_against_a_study_only_when_given(tmp_path: Path) -> None:
    p = Pseudonymizer(SECRET)
    path = tmp_path / "labels.csv"
    path.write_text("AccessionNumber,label\nA1,grade 2\nA2,grade 3\n")
    assert read_labels(path, p).labels[p.accession("A2")] == "grade 3"
    study = tomllib.loads('task = "multiclass"\nclasses = ["grade 1", "grade 2", "grade 4"]\n')
    from models.study import parse_study

    with pytest.raises(LabelsError, match="line 3") as err:
        read_labels(path, p, study=parse_study(study))
    assert "A2" not in str(err.value)
    sop = parse_study({"labels": {"key": "SOPInstanceUID"}})
    with pytest.raises(LabelsError, match="keyed by AccessionNumber"):
        read_labels(path, p, study=sop)
    for bad in ("x;drop", '"two\nlines"', "x" * 2000):  # not a class-name label: refused by line, never echoed
        path.write_text(f"AccessionNumber,label\nA1,{bad}\n")
        with pytest.raises(LabelsError, match=r"line \d: a label is") as err:
            read_labels(path, p)
        assert bad.strip('"') not in str(err.value)
    path.write_text("AccessionNumber,SOPInstanceUID,label\nA,1.2,x\n")
    with pytest.raises(LabelsError, match="one key column"):
        read_labels(path, p)
