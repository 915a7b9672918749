"""Catalogue of bad inputs: each case is a test that checks the error type and its message
(the file named, the problem said).  Grouped by where the input enters the toolkit.

The counts per group are quoted in docs/reliability.md; keep them in step when adding cases.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from helpers import cli, files, nifti, synthetic
from helpers.clinical import ClinicalDataError, load_clinical
from helpers.errors import (
    GeometryMismatchError,
    InputFileError,
    LabelError,
    ModelError,
    OutputError,
)
from helpers.labels import load_labels
from helpers.scores import score_clinical
from helpers.segment import load_model
from helpers.stats import StatsInputError, load_asymmetry, load_scores, match_subjects

AFFINE = np.diag([-0.9, -0.9, 4.4, 1.0])
LABELS_DOC = {
    "labels": [
        {"value": 1, "muscle": "multifidus", "side": "right"},
        {"value": 2, "muscle": "multifidus", "side": "left"},
    ]
}


def image_data(shape=(16, 14, 4), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(100, 900, size=shape).astype(np.float32)


def mask_data(shape=(16, 14, 4)) -> np.ndarray:
    mask = np.zeros(shape, np.int16)
    mask[2:6, 4:9, :] = 1
    mask[9:13, 4:9, :] = 2
    return mask


def save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


# ------------------------------------------------------------------ images and masks (NIfTI)
def truncated(tmp: Path) -> Path:
    path = save(tmp / "sub-01_T2w.nii.gz", image_data((64, 64, 8)))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


def not_gzip(tmp: Path) -> Path:
    path = tmp / "sub-01_T2w.nii.gz"
    path.write_text("this is not an image")
    return path


def header_only(tmp: Path) -> Path:
    path = save(tmp / "sub-01_T2w.nii.gz", image_data())
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:352]))  # header, no voxels
    return path


def nan_affine(tmp: Path) -> Path:
    img = nib.Nifti1Image(image_data(), None)
    img.header.set_sform(np.vstack([np.full((3, 4), np.nan), [0, 0, 0, 1]]), code=1)
    nib.save(img, tmp / "sub-01_T2w.nii.gz")
    return tmp / "sub-01_T2w.nii.gz"


IMAGE_CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "truncated .nii.gz": (truncated, r"unreadable or truncated NIfTI"),
    "not gzip": (not_gzip, r"unreadable or truncated NIfTI|not a readable NIfTI"),
    "header without voxels": (header_only, r"unreadable or truncated NIfTI|not a readable NIfTI"),
    "missing file": (lambda tmp: tmp / "sub-01_T2w.nii.gz", r"file not found"),
    "2-D image": (
        lambda tmp: save(tmp / "sub-01_T2w.nii.gz", image_data()[:, :, 0]),
        r"expected a 3-D volume, got 2-D data of shape \(16, 14\)",
    ),
    "4-D image": (
        lambda tmp: save(tmp / "sub-01_T2w.nii.gz", np.stack([image_data()] * 2, axis=-1)),
        r"expected a 3-D volume, got 4-D data of shape \(16, 14, 4, 2\)",
    ),
    "NaN intensities": (
        lambda tmp: save(
            tmp / "sub-01_T2w.nii.gz", np.where(mask_data() == 1, np.nan, image_data())
        ),
        rf"{int((mask_data() == 1).sum())} voxels are NaN or infinite",
    ),
    "constant image": (
        lambda tmp: save(tmp / "sub-01_T2w.nii.gz", np.full((16, 14, 4), 7.0, np.float32)),
        r"image is constant \(no contrast to measure\)",
    ),
    "NaN affine": (nan_affine, r"affine contains NaN or infinity"),
}


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_bad_image(tmp_path, case):
    build, message = IMAGE_CASES[case]
    path = build(tmp_path)
    with pytest.raises(InputFileError, match=message) as info:
        nifti.load_image(path)
    assert str(info.value).startswith(str(path) + ": ")


MASK_CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "truncated mask": (truncated, r"unreadable or truncated NIfTI"),
    "4-D mask": (
        lambda tmp: save(tmp / "mask.nii.gz", np.stack([mask_data()] * 3, axis=-1)),
        r"expected a 3-D volume, got 4-D",
    ),
    "fractional labels": (
        lambda tmp: save(tmp / "mask.nii.gz", mask_data().astype(np.float32) * 0.5),
        r"mask holds non-integer values; expected integer labels",
    ),
    "negative labels": (
        lambda tmp: save(tmp / "mask.nii.gz", -mask_data()),
        r"mask holds negative label -2",
    ),
    "NaN in mask": (
        lambda tmp: save(
            tmp / "mask.nii.gz", np.where(mask_data() == 1, np.nan, 0.0).astype(np.float32)
        ),
        r"mask contains NaN or infinite values",
    ),
}


@pytest.mark.parametrize("case", list(MASK_CASES))
def test_bad_mask(tmp_path, case):
    build, message = MASK_CASES[case]
    path = build(tmp_path)
    with pytest.raises(InputFileError, match=message) as info:
        nifti.load_mask(path)
    assert str(info.value).startswith(str(path) + ": ")


@pytest.mark.parametrize(
    ("case", "mask_shape", "mask_affine", "message"),
    [
        ("shape", (16, 14, 5), AFFINE, r"grid mismatch: shape \(16, 14, 5\) differs from"),
        (
            "affine",
            (16, 14, 4),
            AFFINE @ np.diag([1, 1, 1.1, 1]),
            r"grid mismatch: affine differs from sub-01_T2w.nii.gz by up to 0.44 mm",
        ),
        (
            "flipped storage",
            (16, 14, 4),
            np.diag([0.9, -0.9, 4.4, 1.0]),
            r"grid mismatch: affine differs",
        ),
    ],
    ids=["shape", "affine", "flipped storage"],
)
def test_image_mask_grid_mismatch(tmp_path, case, mask_shape, mask_affine, message):
    img = nifti.load_image(save(tmp_path / "sub-01_T2w.nii.gz", image_data()))
    mask_path = save(tmp_path / "mask.nii.gz", np.zeros(mask_shape, np.int16), mask_affine)
    with pytest.raises(GeometryMismatchError, match=message) as info:
        nifti.check_same_grid(img, nifti.load_mask(mask_path))
    assert str(info.value).startswith(str(mask_path))


def test_unknown_labels_named_with_the_mask(tmp_path):
    labels_path = tmp_path / "labels.json"
    labels_path.write_text(json.dumps(LABELS_DOC))
    mask = mask_data()
    mask[0, 0, 0] = 9
    mask_path = save(tmp_path / "mask.nii.gz", mask)
    with pytest.raises(LabelError, match=r"mask holds label values \[9\] not in the label file"):
        load_labels(labels_path).check_values(np.unique(mask), mask_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", r"not valid JSON"),
        ('{"labels": [{"value": 0, "muscle": "multifidus", "side": "left"}]}', r"labels\[0\]"),
        ('{"items": []}', r'expected a JSON object with a "labels" list'),
    ],
    ids=["not JSON", "label value 0", "no labels list"],
)
def test_bad_label_file(tmp_path, content, message):
    path = tmp_path / "labels.json"
    path.write_text(content)
    with pytest.raises(LabelError, match=message) as info:
        load_labels(path)
    assert str(info.value).startswith(str(path))


# ------------------------------------------------------------------------------- clinical
def clinical_rows(n: int = 3) -> list[dict[str, object]]:
    rows = []
    for i in range(n):
        row: dict[str, object] = {"subject": f"sub-{i:02d}", "sex": "F", "age": 60, "bmi": 25}
        row.update({f"odi_{k}": 2 for k in range(1, 11)})
        row.update({"vas_back": 40, "vas_leg": 20})
        rows.append(row)
    return rows


def write_clinical(tmp: Path, rows: list[dict[str, object]]) -> Path:
    path = tmp / "clinical.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    ("case", "edit", "message"),
    [
        ("out of range", {"odi_3": 7}, r"column 'odi_3' \(row 2\): out of range"),
        ("not a number", {"age": "sixty"}, r"column 'age' \(row 2\): not a number"),
        ("fraction", {"odi_1": 2.5}, r"column 'odi_1' \(row 2\): not a whole number"),
        ("bad code", {"sex": "X"}, r"column 'sex' \(row 2\): not one of"),
        ("VAS over 100 mm", {"vas_back": 140}, r"column 'vas_back' \(row 2\): out of range"),
        ("blank subject", {"subject": ""}, r"column 'subject' \(row 2\): blank subject ID"),
    ],
    ids=[
        "out of range",
        "not a number",
        "fraction",
        "bad code",
        "VAS over 100 mm",
        "blank subject",
    ],
)
def test_clinical_bad_values(tmp_path, case, edit, message):
    rows = clinical_rows()
    rows[1].update(edit)
    path = write_clinical(tmp_path, rows)
    with pytest.raises(ClinicalDataError, match=message) as info:
        score_clinical(load_clinical(path))
    assert str(info.value).startswith(f"{path}: 1 invalid value")
    # the rest are still scored when asked to skip invalid rows
    scores, skipped = score_clinical(load_clinical(path), skip_invalid=True)
    assert len(scores) == 2
    assert skipped["row"].tolist() == [2]


def test_clinical_duplicate_subject(tmp_path):
    rows = clinical_rows()
    rows[2]["subject"] = "sub-00"
    path = write_clinical(tmp_path, rows)
    with pytest.raises(ClinicalDataError, match=r"duplicated subject \(rows \[1, 3\]\)") as info:
        score_clinical(load_clinical(path))
    assert str(info.value).startswith(f"{path}: 2 invalid values: subject 'sub-00'")


def test_clinical_file_problems(tmp_path):
    with pytest.raises(InputFileError, match=r"clinical file not found"):
        load_clinical(tmp_path / "missing.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("subject,sex,age,bmi\n")
    with pytest.raises(InputFileError, match=r"empty.csv: clinical table has no data rows"):
        load_clinical(empty)
    partial = write_clinical(
        tmp_path, [{"subject": "a", "sex": "F", "age": 1, "bmi": 20, "odi_1": 1}]
    )
    with pytest.raises(InputFileError, match=r"clinical.csv: .*ODI"):
        load_clinical(partial)


# ------------------------------------------------------------ subject IDs across the tables
def asymmetry_rows(subjects: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "subject": subjects,
            "level": "all",
            "muscle": "multifidus",
            "cdi": np.linspace(-0.1, 0.1, len(subjects)),
            "cdi_abs": np.linspace(0.1, 0.2, len(subjects)),
        }
    )


def test_duplicate_subject_in_scores_file(tmp_path):
    path = tmp_path / "scores.csv"
    pd.DataFrame({"subject": ["a", "b", "a"], "sex": ["F", "M", "F"], "odi_pct": [1, 2, 3]}).to_csv(
        path, index=False
    )
    with pytest.raises(
        InputFileError, match=r"scores.csv: subject 'a', column 'subject': duplicated subject"
    ):
        load_scores(path)


def test_duplicate_row_in_asymmetry_file(tmp_path):
    path = tmp_path / "asymmetry.csv"
    asymmetry_rows(["a", "b", "b"]).to_csv(path, index=False)
    with pytest.raises(
        InputFileError,
        match=r"asymmetry.csv: subject 'b', level 'all', muscle 'multifidus': duplicated row",
    ):
        load_asymmetry(path)


def test_unmatched_subjects_are_reported_not_dropped_silently():
    asym = asymmetry_rows(["sub-01", "sub-02", "sub-03"])
    scores = pd.DataFrame({"subject": ["sub-02", "sub-03", "sub-99"], "sex": ["F", "M", "F"]})
    merged, report = match_subjects(asym, scores)
    assert sorted(merged["subject"]) == ["sub-02", "sub-03"]
    notes = dict(zip(report["subject"], report["note"], strict=True))
    assert notes == {
        "sub-01": "no clinical scores: left out of every analysis",
        "sub-99": "no asymmetry rows: left out of every analysis",
    }


def test_no_subject_in_common_is_an_error():
    asym = asymmetry_rows(["sub-01", "sub-02"])
    scores = pd.DataFrame({"subject": ["1", "2"], "sex": ["F", "M"]})
    with pytest.raises(StatsInputError, match=r"no subject is in both the asymmetry table"):
        match_subjects(asym, scores)


# -------------------------------------------------------------------- outputs: folder, disk
def test_output_under_a_file_is_not_writable(tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("a file where a folder should be")
    target = blocker / "metrics.csv"
    with pytest.raises(OutputError, match=r"results/metrics.csv: cannot write output"):
        files.atomic_write_text(target, "x")
    with pytest.raises(OutputError, match=r"results/mask.nii.gz: cannot write output"):
        nifti.save_like(mask_data(), nib.Nifti1Image(mask_data(), AFFINE), blocker / "mask.nii.gz")


@pytest.mark.parametrize(
    ("err", "reason"),
    [
        (PermissionError(errno.EACCES, "Permission denied"), "folder not writable"),
        (OSError(errno.EROFS, "Read-only file system"), "folder not writable"),
        (OSError(errno.ENOSPC, "No space left on device"), "disk full"),
    ],
    ids=["EACCES", "EROFS", "ENOSPC"],
)
def test_failed_rename_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, err, reason):
    target = tmp_path / "metrics.csv"
    target.write_text("previous complete result")

    def refuse(*args, **kwargs):
        raise err

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OutputError, match=rf"metrics.csv: cannot write output \({reason}\)"):
        files.atomic_write_text(target, "new result")
    assert target.read_text() == "previous complete result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]


def test_disk_full_while_writing_a_nifti(tmp_path, monkeypatch):
    """ENOSPC raised by the write itself (not the rename): no partial file, old one intact."""
    target = tmp_path / "sub-01_dseg.nii.gz"
    nifti.save_like(mask_data(), nib.Nifti1Image(mask_data(), AFFINE), target)
    before = target.read_bytes()
    real_save = nib.save

    def full_disk(img, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\x1f\x8b partial")  # some bytes made it out
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nib, "save", full_disk)
    with pytest.raises(OutputError, match=r"sub-01_dseg.nii.gz: cannot write output \(disk full\)"):
        nifti.save_like(mask_data() * 0, nib.Nifti1Image(mask_data(), AFFINE), target)
    monkeypatch.setattr(nib, "save", real_save)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_half_written_file_is_never_taken_as_done(tmp_path):
    target = tmp_path / "sub-01_dseg.nii.gz"
    files.atomic_write_bytes(target, b"complete")
    files.mark_done(target, {"model": "m1"})
    assert files.is_done(target, {"model": "m1"})
    target.write_bytes(b"compl")  # torn by a crash outside the atomic writer
    assert not files.is_done(target, {"model": "m1"})
    files.atomic_write_bytes(target, b"complete")
    assert files.is_done(target, {"model": "m1"})
    assert not files.is_done(target, {"model": "m2"})  # other settings: redo
    marker = target.with_name(target.name + files.MARKER_SUFFIX)
    marker.write_text("{truncated")
    assert not files.is_done(target, {"model": "m1"})


# ---------------------------------------------------------------- `esma metrics`, end to end
@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> dict[str, Path]:
    """A small synthetic scan that `esma metrics` measures without complaint."""
    root = tmp_path_factory.mktemp("scan")
    ph = synthetic.make_phantom(seed=3, template="small", shape=(48, 48, 4))
    paths = {
        "image": root / "sub-01_T2w.nii.gz",
        "mask": root / "sub-01_dseg.nii.gz",
        "labels": root / "labels.json",
    }
    nib.save(ph.image, paths["image"])
    nib.save(ph.mask, paths["mask"])
    paths["labels"].write_text(json.dumps(synthetic.LABELS_DOC))
    paths["fat_fraction"] = root / "truth_ff.npy"
    np.save(paths["fat_fraction"], ph.fat_fraction)
    return paths


def esma_metrics(scan: dict[str, Path], out: Path, **override: Path) -> list[str]:
    files_ = {**scan, **override}
    return [
        "metrics",
        "--image",
        str(files_["image"]),
        "--mask",
        str(files_["mask"]),
        "--labels",
        str(files_["labels"]),
        "--out",
        str(out),
        "--no-bias-correction",
    ]


def test_good_scan_is_measured(scan, tmp_path):
    """The baseline of the cases below: the same files, unbroken, give exit code 0."""
    assert cli.main(esma_metrics(scan, tmp_path / "out")) == 0
    metrics = pd.read_csv(tmp_path / "out" / "metrics.csv", dtype={"level": str})
    # the scan's mask is the phantom's: every muscle's CSA is the planted one
    truth = synthetic.make_phantom(seed=3, template="small", shape=(48, 48, 4)).truth
    truth = truth[(truth["level"] == "all") & truth["slice"].isna()]
    measured = metrics[metrics["level"] == "all"].set_index(["muscle", "side"])["csa_mm2"]
    planted = truth.set_index(["muscle", "side"])["csa_mm2"]
    assert len(planted) > 0
    for key, csa in planted.items():
        assert measured.loc[key] == pytest.approx(csa, rel=1e-9), key


def _broken_mask_values(scan: dict[str, Path], tmp: Path) -> Path:
    img = nib.load(scan["mask"])
    data = np.asarray(img.dataobj).copy()
    data[data == 3] = 11  # a value the label file does not declare
    return save(tmp / "sub-01_dseg.nii.gz", data, img.affine)


def _other_grid_mask(scan: dict[str, Path], tmp: Path) -> Path:
    img = nib.load(scan["mask"])
    return save(tmp / "sub-01_dseg.nii.gz", np.asarray(img.dataobj)[:, :, :3], img.affine)


def _image_like(scan: dict[str, Path], tmp: Path, change: Callable[[np.ndarray], np.ndarray]):
    img = nib.load(scan["image"])
    data = change(np.asarray(img.dataobj, dtype=np.float32).copy())
    return save(tmp / "sub-01_T2w.nii.gz", data, img.affine)


def _nan_voxels(data: np.ndarray) -> np.ndarray:
    data[10:12, 10:12, 1] = np.nan
    return data


METRICS_CASES: dict[str, tuple[str, Callable[[dict, Path], Path], str]] = {
    "truncated image": ("image", lambda s, t: truncated(t), r"unreadable or truncated NIfTI"),
    "missing mask": ("mask", lambda s, t: t / "nope_dseg.nii.gz", r"file not found"),
    "2-D image": (
        "image",
        lambda s, t: _image_like(s, t, lambda d: d[:, :, 0]),
        r"expected a 3-D volume, got 2-D",
    ),
    "4-D mask": (
        "mask",
        lambda s, t: save(t / "m.nii.gz", np.stack([mask_data()] * 2, -1)),
        r"expected a 3-D volume, got 4-D",
    ),
    "grid mismatch": ("mask", _other_grid_mask, r"grid mismatch: shape \(48, 48, 3\) differs"),
    "unknown labels": ("mask", _broken_mask_values, r"mask holds label values \[11\]"),
    "NaN intensities": ("image", lambda s, t: _image_like(s, t, _nan_voxels), r"4 voxels are NaN"),
    "constant image": (
        "image",
        lambda s, t: _image_like(s, t, lambda d: np.full_like(d, 5.0)),
        r"image is constant",
    ),
    "label file not JSON": (
        "labels",
        lambda s, t: (t / "labels.json").write_text("{oops") and t / "labels.json",
        r"not valid JSON",
    ),
}


@pytest.mark.parametrize("case", list(METRICS_CASES))
def test_esma_metrics_bad_input(scan, tmp_path, capsys, case):
    which, build, message = METRICS_CASES[case]
    bad = build(scan, tmp_path)
    code = cli.main(esma_metrics(scan, tmp_path / "out", **{which: bad}))
    err = capsys.readouterr().err.strip()
    assert code == cli.EXIT_BAD_INPUT
    assert err.startswith(f"esma metrics: error: {bad}: "), err
    assert re.search(message, err), err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out" / "metrics.csv").exists()


def test_esma_metrics_empty_mask_is_refused_naming_the_mask(scan, tmp_path, capsys):
    """An empty mask (a failed segmentation) stops with the mask named; no 0 rows written."""
    img = nib.load(scan["mask"])
    empty = save(tmp_path / "sub-01_dseg.nii.gz", np.zeros(img.shape, np.uint8), img.affine)
    assert cli.main(esma_metrics(scan, tmp_path / "out", mask=empty)) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err == (
        f"esma metrics: error: {empty}: mask holds none of the muscles its label file declares: "
        "nothing to measure"
    )
    assert not (tmp_path / "out" / "metrics.csv").exists()


def test_muscle_missing_from_one_side_gives_nan_rows_not_zeros(scan, tmp_path):
    """A muscle the mask lacks (out of view) is not an error: NaN rows flagged 'absent'."""
    img = nib.load(scan["mask"])
    data = np.asarray(img.dataobj).copy()
    data[data == 4] = 0  # left erector spinae gone
    mask = save(tmp_path / "sub-01_dseg.nii.gz", data, img.affine)
    assert cli.main(esma_metrics(scan, tmp_path / "out", mask=mask)) == 0
    metrics = pd.read_csv(tmp_path / "out" / "metrics.csv", keep_default_na=False, na_values=[""])
    gone = metrics[(metrics["muscle"] == "erector_spinae") & (metrics["side"] == "left")]
    assert len(gone) >= 1
    assert gone["csa_mm2"].isna().all()
    assert gone["flags"].str.contains("absent").all()
    asym = pd.read_csv(tmp_path / "out" / "asymmetry.csv")
    assert asym.loc[asym["muscle"] == "erector_spinae", "cdi"].isna().all()
    assert asym.loc[asym["muscle"] == "multifidus", "cdi"].notna().all()


def test_esma_metrics_refuses_a_fat_suppressed_image(scan, tmp_path, capsys):
    truth = np.load(scan["fat_fraction"])
    fs = _image_like(scan, tmp_path, lambda d: d * (1 - 0.9 * truth))  # fat 10 x darker
    code = cli.main(esma_metrics(scan, tmp_path / "out", image=fs))
    assert code == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith(f"esma metrics: error: {fs}: "), err  # names the file
    assert "fat-suppressed" in err
    assert not (tmp_path / "out" / "metrics.csv").exists()


def test_esma_metrics_output_folder_not_writable(scan, tmp_path, capsys):
    blocker = tmp_path / "results"
    blocker.write_text("a file, not a folder")
    assert cli.main(esma_metrics(scan, blocker / "out")) == cli.EXIT_INFRASTRUCTURE  # issue 16
    err = capsys.readouterr().err
    assert re.search(r"esma metrics: error: .*results/out/\S+: cannot write output", err), err


def test_esma_metrics_disk_full_leaves_nothing_half_written(scan, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    real_replace = os.replace
    calls = {"n": 0}

    def full_after_first(src, dst):
        calls["n"] += 1
        if calls["n"] > 1:  # the first output lands, the disk fills before the second
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full_after_first)
    assert cli.main(esma_metrics(scan, out)) == cli.EXIT_INFRASTRUCTURE  # 3, not "bad input"
    assert "cannot write output (disk full)" in capsys.readouterr().err
    left = sorted(p.name for p in out.iterdir())
    assert not [n for n in left if ".tmp" in n], left  # no temporary file left behind
    for name in left:  # whatever landed is complete
        pd.read_csv(out / name) if name.endswith(".csv") else json.loads((out / name).read_text())


# ------------------------------------------------------------------------- segmentation model
def model_folder(root: Path, checkpoint: bytes | None = None) -> Path:
    """An nnU-Net results folder with the files esma looks for (weights made up)."""
    folder = root / "Dataset990_Bad" / "nnUNetTrainer__nnUNetPlans__2d"
    (folder / "fold_0").mkdir(parents=True)
    dataset = {
        "channel_names": {"0": "T2"},
        "labels": {"background": 0, "multifidus_right": 1, "multifidus_left": 2},
        "file_ending": ".nii.gz",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset))
    (folder / "plans.json").write_text(
        json.dumps({"configurations": {"2d": {}}, "image_reader_writer": "SimpleITKIO"})
    )
    if checkpoint is not None:
        (folder / "fold_0" / "checkpoint_final.pth").write_bytes(checkpoint)
    return root / "Dataset990_Bad"


def zip_folder(folder: Path, target: Path) -> Path:
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(folder.parent))
    return target


def truncated_checkpoint() -> bytes:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({"trainer_name": "nnUNetTrainer", "network_weights": {"w": torch.ones(64)}}, buffer)
    raw = buffer.getvalue()
    return raw[: len(raw) // 2]


#: What a truncated checkpoint is reported as (the file inside the model, and why).
CORRUPT_CHECKPOINT = r"fold_0/checkpoint_final.pth is unreadable \(RuntimeError: .*corrupted"


@pytest.fixture
def model_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ESMA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_model_missing(tmp_path, model_cache):
    with pytest.raises(ModelError, match=r"model.zip: model not found"):
        load_model(tmp_path / "model.zip")


def test_model_zip_truncated(tmp_path, model_cache):
    z = zip_folder(model_folder(tmp_path / "m", b"weights" * 100), tmp_path / "model.zip")
    z.write_bytes(z.read_bytes()[:-300])
    with pytest.raises(ModelError, match=r"model.zip: not a zip archive"):
        load_model(z)


def test_model_zip_member_corrupt(tmp_path, model_cache):
    z = zip_folder(model_folder(tmp_path / "m", b"WEIGHTS-" * 100), tmp_path / "model.zip")
    raw = z.read_bytes()
    z.write_bytes(raw.replace(b"WEIGHTS-WEIGHTS-", b"WEIGHTS-WEIGHTZ-", 1))  # bit rot
    with pytest.raises(
        ModelError, match=r"model.zip: corrupt zip: member .*checkpoint_final.pth fails its CRC"
    ):
        load_model(z)
    assert not any(model_cache.rglob("checkpoint_final.pth"))  # nothing half-installed


def test_model_zip_checksum_mismatch(tmp_path, model_cache):
    z = zip_folder(model_folder(tmp_path / "m", b"w" * 100), tmp_path / "model.zip")
    (tmp_path / "model.zip.sha256").write_text("0" * 64 + "  model.zip\n")
    with pytest.raises(ModelError, match=r"model.zip: checksum mismatch: sha256 is [0-9a-f]{64}"):
        load_model(z)


def test_model_without_checkpoint(tmp_path, model_cache):
    folder = model_folder(tmp_path / "m", checkpoint=None)
    with pytest.raises(
        ModelError, match=r"nnUNetTrainer__nnUNetPlans__2d has no fold_K/checkpoint_final.pth"
    ):
        load_model(folder)


def test_model_checkpoint_truncated(tmp_path, model_cache):
    """The zip is intact but the weights inside were cut short before it was made."""
    from helpers.segment import Segmenter, SegmentSettings

    z = zip_folder(model_folder(tmp_path / "m", truncated_checkpoint()), tmp_path / "model.zip")
    with pytest.raises(ModelError, match=CORRUPT_CHECKPOINT) as exc:
        Segmenter(load_model(z), SegmentSettings(device="cpu"))
    assert str(exc.value).startswith(f"{z}: ")


def test_esma_segment_with_corrupt_model(scan, tmp_path, model_cache, capsys):
    z = zip_folder(model_folder(tmp_path / "m", truncated_checkpoint()), tmp_path / "model.zip")
    args = ["segment", "--images", str(scan["image"]), "--model", str(z), "--out", str(tmp_path)]
    assert cli.main([*args, "--device", "cpu"]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"esma segment: error: {z}: "), err
    assert re.search(CORRUPT_CHECKPOINT, err), err
