"""Study YAML validation (helpers.config): cohort discovery, path resolution, messages."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from helpers.config import load_study, parse_study, resolved_document
from helpers.errors import ConfigError


def _nifti(path: Path, value: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.full((6, 5, 3), value, dtype=np.int16)
    data[0, 0, 0] = 0
    nib.save(nib.Nifti1Image(data, np.diag([0.9, 0.9, 4.0, 1.0])), path)
    return path


@pytest.fixture
def study_dir(tmp_path: Path, example_dir: Path) -> Path:
    """A study folder: three images, their masks, a label file, a model stand-in, clinical."""
    root = tmp_path / "study"
    for subject in ("sub-03", "sub-01", "sub-02"):
        _nifti(root / "images" / f"{subject}_T2w.nii.gz")
        _nifti(root / "masks" / f"{subject}_dseg.nii.gz")
    shutil.copyfile(example_dir / "labels.json", root / "labels.json")
    (root / "model.zip").write_bytes(b"stand-in; the config only checks it exists")
    clinical = pd.DataFrame(
        {
            "subject": ["sub-01", "sub-02", "sub-03"],
            "sex": ["M", "F", "M"],
            "age": [60, 70, 65],
            "bmi": [25.0, 27.5, 30.1],
            "Name": ["A", "B", "C"],
        }
    )
    clinical.to_csv(root / "clinical.csv", index=False)
    return root


def _write(root: Path, doc: dict, name: str = "study.yml") -> Path:
    path = root / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


BASE = {
    "study": "trial",
    "images": "images/*_T2w.nii.gz",
    "labels": "labels.json",
    "model": "model.zip",
}


def _error(root: Path, doc: dict) -> str:
    with pytest.raises(ConfigError) as info:
        load_study(_write(root, doc))
    return str(info.value)


# ------------------------------------------------------------------------- cohort discovery
def test_glob_pattern_resolves_against_the_yaml_folder(study_dir, tmp_path, monkeypatch):
    path = _write(study_dir, BASE)
    monkeypatch.chdir(tmp_path)  # a cwd where the relative paths would not resolve
    study = load_study(path)
    assert study.subject_ids == ["sub-01", "sub-02", "sub-03"]
    assert study.subjects[0].image == (study_dir / "images" / "sub-01_T2w.nii.gz").resolve()
    assert study.labels == (study_dir / "labels.json").resolve()
    assert study.model == (study_dir / "model.zip").resolve()
    assert study.output == (study_dir / "reports" / "trial").resolve()
    assert study.work_dir == study.output / "work"
    assert study.decisions_path == study.output / "qc_decisions.csv"
    assert not study.uses_given_masks
    assert study.statistics.covariates == ("age", "bmi")


def test_manifest_names_subjects_and_resolves_paths_against_itself(study_dir):
    manifest_dir = study_dir / "lists"
    manifest_dir.mkdir()
    pd.DataFrame(
        {
            "subject": ["P7", "P9"],
            "image": ["../images/sub-01_T2w.nii.gz", "../images/sub-02_T2w.nii.gz"],
            "mask": ["../masks/sub-01_dseg.nii.gz", ""],
        }
    ).to_csv(manifest_dir / "cohort.csv", index=False)
    study = load_study(_write(study_dir, {**BASE, "images": "lists/cohort.csv"}))
    assert study.subject_ids == ["P7", "P9"]
    assert study.subject("P7").mask == (study_dir / "masks" / "sub-01_dseg.nii.gz").resolve()
    assert study.subject("P9").mask is None
    assert study.images_spec == "manifest cohort.csv"


def test_manifest_missing_file_names_the_line(study_dir):
    pd.DataFrame({"image": ["images/sub-01_T2w.nii.gz", "images/nope_T2w.nii.gz"]}).to_csv(
        study_dir / "m.csv", index=False
    )
    msg = _error(study_dir, {**BASE, "images": "m.csv"})
    assert msg.startswith("study.yml: images: m.csv line 3: image ")
    assert "nope_T2w.nii.gz: file not found" in msg


def test_bids_like_tree(study_dir):
    bids = study_dir / "bids"
    _nifti(bids / "sub-01" / "anat" / "sub-01_T2w.nii.gz")
    _nifti(bids / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_T2w.nii.gz")
    _nifti(bids / "sub-02" / "anat" / "sub-02_T1w.nii.gz")  # not a T2w: ignored
    study = load_study(_write(study_dir, {**BASE, "images": "bids"}))
    assert study.subject_ids == ["sub-01", "sub-02_ses-1"]
    assert study.images_spec == "BIDS-like folder bids"


def test_bids_folder_without_t2w_explains(study_dir):
    (study_dir / "empty").mkdir()
    msg = _error(study_dir, {**BASE, "images": "empty"})
    assert "study.yml: images:" in msg
    assert "no sub-*/anat/*_T2w.nii.gz" in msg


def test_given_masks_replace_segmentation_and_model_becomes_optional(study_dir):
    doc = {k: v for k, v in BASE.items() if k != "model"}
    study = load_study(
        _write(study_dir, {**doc, "masks": "masks/{subject}_dseg.nii.gz", "manual_masks": "masks"})
    )
    assert study.uses_given_masks
    assert study.model is None
    assert all(s.mask is not None and s.manual_mask is not None for s in study.subjects)
    assert study.subject("sub-02").mask.name == "sub-02_dseg.nii.gz"


def test_one_levels_csv_for_the_cohort(study_dir):
    pd.DataFrame({"subject": ["sub-01"], "slice": [0], "level": ["L4"]}).to_csv(
        study_dir / "levels.csv", index=False
    )
    study = load_study(_write(study_dir, {**BASE, "levels": "levels.csv"}))
    assert {s.levels for s in study.subjects} == {(study_dir / "levels.csv").resolve()}


def test_clinical_mapping_is_kept(study_dir):
    doc = {**BASE, "clinical": {"path": "clinical.csv", "columns": {"Name": "subject"}}}
    with pytest.raises(
        ConfigError,
        match=r"^study.yml: clinical.path: .*clinical.csv: column\(s\) "
        r"\['subject'\] exist in the file and are also mapping targets",
    ):
        load_study(_write(study_dir, doc))
    ok = {
        **BASE,
        "clinical": {"path": "clinical.csv", "skip_invalid": False, "missing_values": ["NA"]},
    }
    study = load_study(_write(study_dir, ok))
    assert study.clinical.mapping == {"missing_values": ["NA"]}
    assert study.clinical.skip_invalid is False


# ----------------------------------------------------------------------------- messages
@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"imgaes": "x"}, "study.yml: imgaes: unknown key (did you mean 'images'?); allowed:"),
        (
            {"metrics": {"fat_method": "gmm4"}},
            (
                "study.yml: metrics.fat_method: 'gmm4' is not one of unmix, gmm3, gmm2, kmeans2, otsu "
                "(did you mean 'gmm3'?)"
            ),
        ),
        (
            {"metrics": {"bias_corection": True}},
            "study.yml: metrics.bias_corection: unknown key (did you mean 'bias_correction'?)",
        ),
        (
            {"dixon": {"erode": 1}},
            "study.yml: dixon.erode: unknown key (did you mean 'erode_mm'?); allowed:",
        ),
        (
            {"dixon": {"segment_on": "watr"}},
            (
                "study.yml: dixon.segment_on: 'watr' is not one of sum, water, fat, image "
                "(did you mean 'water'?)"
            ),
        ),
        (
            {"metrics": {"cdi_formula": "normalised_difference"}},
            "study.yml: metrics.cdi_formula: 'normalised_difference' is not one of",
        ),
        (
            {"executor": {"kind": "threads"}},
            "study.yml: executor.kind: 'threads' is not one of sequential, processes, dask",
        ),
        ({"qc": {"min_dice": 1.5}}, "study.yml: qc.min_dice: 1.5 is outside the allowed range"),
        (
            {"segmentation": {"devise": "cpu"}},
            "study.yml: segmentation.devise: unknown key (did you mean 'device'?)",
        ),
        (
            {"segmentation": {"device": "gpu"}},
            "study.yml: segmentation.device: must be auto, cpu, cuda or mps, got 'gpu'",
        ),
        (
            {"statistics": {"indices": ["cdi", "lfair"]}},
            "study.yml: statistics.indices: 'lfair' is not one of",
        ),
        ({"statistics": {"top_pairs": -1}}, "study.yml: statistics.top_pairs: expected an integer"),
        ({"study": "my study"}, "study.yml: study: 'my study' may hold only letters"),
        ({"labels": "nolabels.json"}, "study.yml: labels: "),
        ({"model": "missing.zip"}, "study.yml: model: "),
        ({"images": "scans/*.nii.gz"}, "study.yml: images: pattern 'scans/*.nii.gz' matches no"),
        ({"images": "masks/*.nii.gz"}, "also matches mask files"),
        ({"clinical": "nothere.csv"}, "study.yml: clinical.path: "),
        (
            {"clinical": {"path": "clinical.csv", "columns": {"Name": "patient"}}},
            "study.yml: clinical.columns.Name: unknown standard column 'patient'",
        ),
        (
            {"clinical": {"path": "clinical.csv", "sheets": 1}},
            "study.yml: clinical.sheets: unknown key (did you mean 'sheet'?)",
        ),
    ],
)
def test_messages_name_the_key_and_the_problem(study_dir, change, expected):
    msg = _error(study_dir, {**BASE, **change})
    assert expected in msg
    assert msg.startswith("study.yml: ")
    assert "\n" not in msg


def test_missing_required_key(study_dir):
    doc = {k: v for k, v in BASE.items() if k != "labels"}
    assert _error(study_dir, doc) == "study.yml: labels: required key is missing"


def test_no_model_and_no_masks(study_dir):
    doc = {k: v for k, v in BASE.items() if k != "model"}
    msg = _error(study_dir, doc)
    assert msg.startswith("study.yml: model: no segmentation model given and no mask for sub-01")


def test_duplicate_subjects(study_dir):
    _nifti(study_dir / "images2" / "sub-01_T2w.nii")
    msg = _error(study_dir, {**BASE, "images": "image*/sub-01_T2w.nii*"})
    assert "subject 'sub-01' appears twice" in msg


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "study.yml"
    bad.write_text("study: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"study.yml: not valid YAML"):
        load_study(bad)
    with pytest.raises(ConfigError, match=r"nothere.yml: study file not found"):
        load_study(tmp_path / "nothere.yml")
    with pytest.raises(ConfigError, match=r"expected a mapping"):
        parse_study(["a", "list"], tmp_path / "study.yml")


# ------------------------------------------------------------------------------ freezing
def test_resolved_document_round_trips(study_dir, tmp_path, monkeypatch):
    doc = {**BASE, "clinical": {"path": "clinical.csv", "missing_values": ["NA"]}}
    doc.update(
        metrics={"fat_method": "gmm3", "bias_correction": False},
        executor={"kind": "processes", "workers": 2},
        statistics={"covariates": ["age"], "levels": ["all"]},
        masks="masks/{subject}_dseg.nii.gz",
        output="out",
    )
    study = load_study(_write(study_dir, doc))
    run = tmp_path / "run"
    run.mkdir()
    manifest = run / "cohort.csv"
    study.cohort_table().to_csv(manifest, index=False)
    frozen = _write(run, resolved_document(study, manifest))
    # the frozen copy lives elsewhere and every path in it is absolute
    monkeypatch.chdir(tmp_path)
    again = load_study(frozen)
    for field in (
        "name",
        "subjects",
        "labels",
        "model",
        "clinical",
        "segmentation",
        "metrics",
        "qc",
        "statistics",
        "executor",
        "output",
    ):
        assert getattr(again, field) == getattr(study, field), field


# ------------------------------------------------------------------------- DICOM ingest
INGEST = {
    "study": "trial",
    "labels": "labels.json",
    "model": "model.zip",
    "output": "out",
    "ingest": {"dicom": "dicom", "key": "../private/key.csv"},
}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"images": "images/*_T2w.nii.gz"}, "study.yml: images: give either images: or ingest:"),
        ({"ingest": {"dicom": "dicom"}}, "study.yml: ingest.key: required key is missing"),
        (
            {"ingest": {"dicom": "nowhere", "key": "../k.csv"}},
            "study.yml: ingest.dicom: ",
        ),
        (
            {"ingest": {"dicom": "dicom", "key": "out/key.csv"}},
            "study.yml: ingest.key: ",
        ),
        (
            {"ingest": {"dicom": "dicom", "key": "../k.csv", "out": "nifti", "secret": "nifti/s"}},
            "study.yml: ingest.secret: ",
        ),
        (
            {"ingest": {"dicom": "dicom", "key": "dicom/key.csv"}},
            "study.yml: ingest.key: ",
        ),
        (
            {"ingest": {"dicom": "dicom", "key": "../k.csv", "out": "dicom/nifti"}},
            "study.yml: ingest.out: ",
        ),
        (
            {"ingest": {"dicom": "dicom", "key": "../k.csv", "outt": "x"}},
            "study.yml: ingest.outt: unknown key (did you mean 'out'?)",
        ),
        (
            {"ingest": {"dicom": "dicom", "key": "../k.csv", "rules": {"allow_fatsup": True}}},
            "study.yml: ingest.rules.allow_fatsup: unknown key",
        ),
        (
            {"ingest": {"dicom": "dicom", "key": "../k.csv", "rules": {"allow_windowed": "yes"}}},
            "study.yml: ingest.rules.allow_windowed: expected true or false, got 'yes'",
        ),
        (
            {"ingest": {"dicom": "dicom", "key": "../k.csv", "rules": {"gap_factor": 1}}},
            "study.yml: ingest.rules.gap_factor: must be > 1, got 1",
        ),
        (
            {"ingest": {"dicom": "dicom", "key": "../k.csv", "rules": {"echo_time_ms": [90]}}},
            "study.yml: ingest.rules.echo_time_ms: expected [low, high] in ms, got [90]",
        ),
        (
            {"ingest": {"dicom": "dicom", "key": "../k.csv", "rules": {"t2_pattern": "T2("}}},
            "study.yml: ingest.rules.t2_pattern: not a valid regular expression",
        ),
    ],
)
def test_ingest_section_messages_name_the_key_and_the_problem(study_dir, change, expected):
    (study_dir / "dicom").mkdir()
    msg = _error(study_dir, {**INGEST, **change})
    assert msg.startswith(expected), msg
    assert "\n" not in msg
    if "lies inside" in msg:
        assert "keep it outside" in msg


def test_key_outside_the_study_and_the_out_folder_is_accepted(study_dir):
    (study_dir / "dicom").mkdir()
    doc = {**INGEST, "ingest": {**INGEST["ingest"], "rules": {"allow_fat_suppressed": True}}}
    study = load_study(_write(study_dir, doc))
    assert study.ingest.out == (study_dir / "out" / "ingested").resolve()  # default
    assert study.ingest.key == (study_dir.parent / "private" / "key.csv").resolve()
    assert study.ingest.ingest_rules().allow_fat_suppressed is True
    assert study.ingest.ingest_rules().gap_factor == 1.5


def test_ingest_cohort_is_what_the_ingest_wrote(study_dir):
    """Before the first ingest the study has no subject; afterwards the written images, runs
    as subjects of their own, and the given masks are matched to the pseudonyms."""
    (study_dir / "dicom").mkdir()
    doc = {**INGEST, "masks": "masks/{subject}_dseg.nii.gz"}
    path = _write(study_dir, doc)
    before = load_study(path)
    assert before.subjects == ()
    assert before.images_spec == "DICOM ingest (ingested/)"

    out = study_dir / "out" / "ingested"
    for name in ("sub-01_T2w.nii.gz", "sub-02_T2w.nii.gz", "sub-02_run-2_T2w.nii.gz"):
        _nifti(out / name)
    _nifti(out / "sub-09_T2w.nii.gz")  # left over from an earlier ingest: not in ingest.csv
    rows = [
        ("sub-01", "sub-01_T2w.nii.gz", "written"),
        ("sub-02", "sub-02_T2w.nii.gz", "written"),
        ("sub-02", "", "refused"),
        ("sub-02", "sub-02_run-2_T2w.nii.gz", "written"),
        ("sub-03", "", "skipped"),
    ]
    pd.DataFrame(rows, columns=["subject", "image", "status"]).to_csv(
        out / "ingest.csv", index=False
    )
    after = load_study(path)
    assert after.subject_ids == ["sub-01", "sub-02", "sub-02_run-2"]
    assert after.subject("sub-02_run-2").image == (out / "sub-02_run-2_T2w.nii.gz").resolve()
    assert after.subject("sub-01").mask == (study_dir / "masks" / "sub-01_dseg.nii.gz").resolve()

    # a listed image gone: not taken as ingested (the ingest runs again first)
    (out / "sub-01_T2w.nii.gz").unlink()
    assert load_study(path).subjects == ()


@pytest.mark.parametrize("name", ["starter", "demo"])
def test_bundled_model_by_name(study_dir, name):
    from helpers.segment import BUNDLED_MODELS

    study = load_study(_write(study_dir, {**BASE, "model": name}))
    assert study.model == BUNDLED_MODELS[name]
    assert study.model.is_file()
    # a file of that name in the study folder is not what the name means
    assert "model not found" in _error(study_dir, {**BASE, "model": "starter.zip"})
