"""Failure catalogue of issue #16 (reliability and data protection, round 2).

One test (or a few) per finding of the attack; each fails on the code before its fix.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from dicom_factory import IDENTITY, Series, write_series
from pydicom.dataelem import DataElement
from test_dicom import all_output_bytes, axial_affine, identity_strings, ingest_table, ramp

from helpers import dicom
from helpers.cli import main
from helpers.dicom import IngestRules, detect_fat_suppression, ingest

#: A fat-suppression keyword glued to the patient's identity (finding 1).
GLUED = "T2_TSE_AX_FATSUP_DOE_JANE_123456789"


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dicom.SECRET_ENV, "attack2-secret")


def _rewrite(folder: Path, **elements: DataElement) -> None:
    """Replace elements in every DICOM file of ``folder`` (e.g. a malformed VR)."""
    for path in folder.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        for keyword, element in elements.items():
            del ds[keyword]
            ds.add(element)
        ds.save_as(path)


# ------------------------------------------------------------------ 1. glued free text
def test_fat_suppression_reason_names_the_tag_never_the_text():
    pairs = [("SeriesDescription", GLUED), ("ProtocolName", "X"), ("SequenceName", "")]
    reason = detect_fat_suppression(pairs)
    assert reason == "fat-suppression keyword in SeriesDescription (rule fat_suppression_pattern)"
    reason = detect_fat_suppression("T2 TSE", scan_options="FATSUP_DOE_JANE")
    assert reason == "fat-suppression option in ScanOptions (rule fat_suppression_pattern)"
    assert "DOE" not in reason
    assert "JANE" not in reason
    other = dicom.classify_t2([("ProtocolName", "T1_DOE_JANE")], 12.0, 500.0)
    assert other == (False, "named another contrast in ProtocolName (rule not_t2_pattern)")


@pytest.mark.parametrize(
    ("description", "extra", "tag"),
    [
        (GLUED, {}, "SeriesDescription"),
        ("T2 TSE AX", {"ScanOptions": "FATSUP_DOE_JANE"}, "ScanOptions"),
    ],
)
def test_glued_identity_is_refused_and_never_echoed(
    tmp_path, secret, caplog, capsys, description, extra, tag
):
    write_series(
        tmp_path / "dicom",
        Series(ramp((6, 5, 3)), axial_affine(), description=description, extra=extra),
    )
    with caplog.at_level(logging.DEBUG):
        code = main(["ingest", str(tmp_path / "dicom"), "--out", str(tmp_path / "out")])
    assert code == 1
    row = ingest_table(tmp_path / "out").iloc[0]
    assert row["status"] == "refused"
    assert tag in row["issues"]
    assert "fat_suppression_pattern" in row["issues"]
    text = (tmp_path / "out" / "ingest.csv").read_text() + caplog.text
    text += "".join(capsys.readouterr())
    for needle in ("DOE", "JANE", "123456789", "FATSUP"):
        assert needle not in text.upper(), needle


# ------------------------------------------------------------------ 2. malformed header
def test_malformed_header_refuses_that_series_only_and_prints_no_value(
    tmp_path, secret, caplog, capsys
):
    """BitsStored stored as text holding the name: the other series is still written."""
    src = tmp_path / "dicom"
    write_series(src / "good", Series(ramp((6, 5, 3)), axial_affine()))
    write_series(
        src / "bad",
        Series(ramp((6, 5, 3)), axial_affine(), identity=dict(IDENTITY, PatientID="PID-BAD")),
    )
    _rewrite(src / "bad", BitsStored=DataElement(0x00280101, "LO", "DOE^JANE"))
    with caplog.at_level(logging.DEBUG):
        code = main(["ingest", str(src), "--out", str(tmp_path / "out")])
    assert code == 1
    table = ingest_table(tmp_path / "out").sort_values("status")
    assert list(table["status"]) == ["refused", "written"]
    assert "unreadable" in table.iloc[0]["issues"] or "header" in table.iloc[0]["issues"]
    seen = caplog.text + "".join(capsys.readouterr())
    seen += (tmp_path / "out" / "ingest.csv").read_text()
    assert "Traceback" not in seen
    assert "DOE" not in seen.upper()
    assert "JANE" not in seen.upper()


def test_an_unexpected_error_in_one_series_does_not_stop_the_others(tmp_path, secret, monkeypatch):
    src = tmp_path / "dicom"
    write_series(src / "a", Series(ramp((6, 5, 3)), axial_affine()))
    write_series(
        src / "b",
        Series(ramp((6, 5, 3)), axial_affine(), identity=dict(IDENTITY, PatientID="PID-2")),
    )
    real = dicom._ingest_series
    calls = []

    def boom(series, subject, *args):
        calls.append(subject)
        if len(calls) == 1:
            raise ValueError("invalid literal for int(): 'DOE^JANE'")
        return real(series, subject, *args)

    monkeypatch.setattr(dicom, "_ingest_series", boom)
    result = ingest(src, tmp_path / "out")
    table = result.table.sort_values("status")
    assert list(table["status"]) == ["refused", "written"]
    assert table.iloc[0]["issues"] == "header: series cannot be processed (ValueError)"
    assert len(result.images) == 1


def test_unparseable_header_value_is_reported_by_type_only(tmp_path):
    ds = pydicom.Dataset()
    ds.add(DataElement(0x00280010, "LO", "DOE^JANE"))  # Rows as text
    ds.SeriesInstanceUID = "1.2.3"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    assert dicom._parse_header(tmp_path / "x.dcm", ds).rows == 0
    reasons = dicom._header_windowing(
        pydicom.Dataset({0x00280004: DataElement(0x00280004, "CS", "DOE JANE")})
    )
    assert reasons == ("PhotometricInterpretation not a defined grey-scale term",)


# ------------------------------------------------------------------ 3. burned-in annotation
def test_burned_in_annotation_is_refused_by_default_and_listed(tmp_path, secret):
    series = Series(ramp((6, 5, 3)), axial_affine(), extra={"BurnedInAnnotation": "YES"})
    write_series(tmp_path / "dicom", series)
    result = ingest(tmp_path / "dicom", tmp_path / "out")
    row = result.table.iloc[0]
    assert row["status"] == "refused"
    assert row["issues"].startswith("burned_in: BurnedInAnnotation YES")
    assert result.failed
    assert not list((tmp_path / "out").glob("*.nii.gz"))
    allowed = ingest(tmp_path / "dicom", tmp_path / "out2", rules=IngestRules(allow_burned_in=True))
    assert allowed.table.iloc[0]["status"] == "written"
    assert "burned_in" in allowed.table.iloc[0]["issues"]
    assert IngestRules.from_mapping({"allow_burned_in": True}).allow_burned_in
    no = ingest(tmp_path / "dicom", tmp_path / "out3", rules=IngestRules())
    assert no.table.iloc[0]["status"] == "refused"


def test_burned_in_no_is_written(tmp_path, secret):
    series = Series(ramp((6, 5, 3)), axial_affine(), extra={"BurnedInAnnotation": "NO"})
    write_series(tmp_path / "dicom", series)
    assert ingest(tmp_path / "dicom", tmp_path / "out").table.iloc[0]["status"] == "written"


# ------------------------------------------------ evidence: identity in every tag and name
def test_identity_in_every_tag_file_and_folder_name_reaches_no_output(
    tmp_path, secret, caplog, capsys
):
    """An export whose folders, files and free-text tags all carry the identity, with one
    series of each kind attacked in round 2 (glued keyword, glued ScanOptions, malformed
    BitsStored, burned-in annotation) and one good series: nothing of it in any output."""
    named = dict(
        IDENTITY,
        OperatorsName="DOE^JANE",
        PerformingPhysicianName="HOUSE^GREGORY",
        StudyDescription="LUMBAR DOE JANE PID-123456",
        ImageComments="DOE JANE 19450203",
        PatientAddress="1 FAKE STREET SPRINGFIELD",
    )
    root = tmp_path / "DOE_JANE_PID-123456"
    cases = {
        "good": Series(
            ramp((6, 5, 3)),
            axial_affine(),
            description="T2_TSE_AX_DOE_JANE",
            extra=dict(named),
            series_number=1,
        ),
        "glued": Series(
            ramp((6, 5, 3)), axial_affine(), description=GLUED, extra=dict(named), series_number=2
        ),
        "options": Series(
            ramp((6, 5, 3)),
            axial_affine(),
            description="T2 AX DOE JANE",
            extra=dict(named, ScanOptions="FATSUP_DOE_JANE"),
            series_number=3,
        ),
        "bits": Series(ramp((6, 5, 3)), axial_affine(), extra=dict(named), series_number=4),
        "burned": Series(
            ramp((6, 5, 3)),
            axial_affine(),
            series_number=5,
            extra=dict(named, BurnedInAnnotation="YES"),
        ),
    }
    for name, series in cases.items():
        folder = root / f"DOE^JANE_{name}_19450203"
        write_series(folder, series)
        for path in folder.glob("*.dcm"):
            path.rename(path.with_name(f"DOE_JANE_PID-123456_{path.name}"))
    _rewrite(root / "DOE^JANE_bits_19450203", BitsStored=DataElement(0x00280101, "LO", "DOE^JANE"))
    (root / "DOE_JANE_notes.txt").write_text("DOE^JANE PID-123456")
    out = tmp_path / "study" / "images"
    with caplog.at_level(logging.INFO):
        code = main(["ingest", str(root), "--out", str(out)])
    assert code == 1
    table = ingest_table(out)
    assert sorted(table["status"]) == ["refused"] * 4 + ["written"]
    outputs = all_output_bytes(out)
    assert sum(p.name.endswith("|decompressed") for p in outputs) == 1
    captured = capsys.readouterr()
    outputs[Path("<log>")] = caplog.text.encode()
    outputs[Path("<console>")] = (captured.out + captured.err).encode()
    needles = [*identity_strings(), "123456789", "FATSUP", "SPRINGFIELD", "GREGORY"]
    for path, content in outputs.items():
        lowered = content.lower()
        for needle in needles:
            assert needle.lower().encode() not in lowered, f"{needle!r} leaked into {path}"
    assert len(pd.read_csv(tmp_path / "study" / dicom.DEFAULT_KEY_NAME)) == 1
    assert np.isfinite(table["n_slices"].astype(float)).all()


# ------------------------------------------------------- 9. duplicate keys, string booleans
def _study_text(tmp_path: Path, example_dir: Path, extra: str) -> Path:
    import shutil

    import nibabel as nib

    root = tmp_path / "study"
    (root / "images").mkdir(parents=True)
    data = np.ones((6, 5, 3), np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([0.9, 0.9, 4.0, 1])), root / "images" / "s1_T2w.nii.gz")
    shutil.copyfile(example_dir / "labels.json", root / "labels.json")
    (root / "model.zip").write_bytes(b"stand-in")
    path = root / "study.yml"
    path.write_text(
        "study: trial\nimages: images/*_T2w.nii.gz\nlabels: labels.json\nmodel: model.zip\n"
        + extra,
        encoding="utf-8",
    )
    return path


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            "model: other.zip\n",
            "study.yml: key 'model' appears twice in one mapping (lines 4 and 5)",
        ),
        (
            "segmentation:\n  fast: true\n  fast: false\n",
            "key 'fast' appears twice in one mapping (lines 6 and 7)",
        ),
        (
            "segmentation: {fast: 'false'}\n",
            "segmentation.fast: expected true or false, got 'false'",
        ),
        ("segmentation: {mirror_tta: 'no'}\n", "segmentation.mirror_tta: expected true or false"),
        (
            "metrics: {bias_correction: 0}\n",
            "metrics.bias_correction: expected true or false, got 0",
        ),
        ("metrics: {bias_correction: null}\n", "metrics.bias_correction: expected true or false"),
    ],
)
def test_duplicate_keys_and_non_boolean_booleans_are_refused(
    tmp_path, example_dir, extra, expected
):
    from helpers.config import load_study
    from helpers.errors import ConfigError

    with pytest.raises(ConfigError, match=r"study\.yml") as info:
        load_study(_study_text(tmp_path, example_dir, extra))
    assert expected in str(info.value)


def test_real_booleans_and_null_for_optional_ones_are_accepted(tmp_path, example_dir):
    from helpers.config import load_study

    extra = "segmentation: {fast: false, mirror_tta: null}\nmetrics: {bias_correction: true}\n"
    study = load_study(_study_text(tmp_path, example_dir, extra))
    assert study.segmentation == {"fast": False, "mirror_tta": None}
    assert study.metrics == {"bias_correction": True}


# ------------------------------------------------------------------ 10. gzip CRC
def _bad_crc(tmp_path: Path, name: str = "sub-01_T2w.nii.gz") -> Path:
    """A .nii.gz whose deflate stream is intact but whose CRC-32 trailer is wrong."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    data = rng.integers(1, 1000, (64, 64, 12)).astype(np.int16)
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, np.diag([0.9, 0.9, 4.0, 1.0])), path)
    raw = bytearray(path.read_bytes())
    raw[-8] ^= 0xFF  # first byte of the CRC-32 in the gzip trailer
    path.write_bytes(bytes(raw))
    return path


def test_gzip_with_a_failing_crc_is_refused(tmp_path):
    import nibabel as nib

    from helpers.errors import InputFileError
    from helpers.nifti import load_image, load_mask

    path = _bad_crc(tmp_path)
    assert np.asanyarray(nib.load(path).dataobj).shape == (64, 64, 12)  # nibabel alone reads it
    with pytest.raises(InputFileError, match=r"sub-01_T2w\.nii\.gz: .*corrupt gzip stream.*CRC"):
        load_image(path)
    with pytest.raises(InputFileError, match="corrupt gzip stream"):
        load_mask(path)


def test_cli_metrics_refuses_a_failing_crc(tmp_path, example_dir, capsys):
    path = _bad_crc(tmp_path)
    code = main(
        ["metrics", "--image", str(path), "--mask", str(path), "--labels",
         str(example_dir / "labels.json"), "--out", str(tmp_path / "out")]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "sub-01_T2w.nii.gz" in err
    assert "corrupt gzip stream" in err
    assert not (tmp_path / "out" / "metrics.csv").exists()


# ------------------------------------------------------- 11. two image files of one subject
def test_two_images_of_one_subject_are_an_error_naming_both(tmp_path, capsys):
    import nibabel as nib

    from helpers.errors import InputFileError
    from helpers.segment import find_images

    folder = tmp_path / "images"
    folder.mkdir()
    for name, value in (
        ("syn-001_T2w.nii.gz", 1),
        ("syn-001.nii.gz", 2),
        ("syn-002_T2w.nii.gz", 3),
    ):
        data = np.full((4, 4, 2), value, np.int16)
        nib.save(nib.Nifti1Image(data, np.eye(4)), folder / name)
    with pytest.raises(InputFileError) as info:
        find_images(folder)
    message = str(info.value)
    assert "syn-001.nii.gz and syn-001_T2w.nii.gz are two images of subject 'syn-001'" in message
    code = main(["segment", "--images", str(folder), "--model", str(tmp_path / "m.zip"),
                 "--out", str(tmp_path / "masks")])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "syn-001.nii.gz" in err
    assert "syn-001_T2w.nii.gz" in err
    assert not (tmp_path / "masks").exists()
    (folder / "syn-001.nii.gz").unlink()
    assert [p.name for p in find_images(folder)] == ["syn-001_T2w.nii.gz", "syn-002_T2w.nii.gz"]


# ------------------------------------------------------------------ 12. level "all" reserved
@pytest.mark.parametrize("name", ["all", "ALL", " All "])
def test_level_all_is_reserved(tmp_path, name):
    from helpers.errors import InputFileError
    from helpers.metrics import read_levels

    path = tmp_path / "levels.csv"
    path.write_text(f"slice,level\n0,L4\n1,{name}\n2,L5\n", encoding="utf-8")
    with pytest.raises(InputFileError, match=r"levels\.csv: .*slice 1\) is reserved"):
        read_levels(path)
    path.write_text("slice,level\n0,L4\n1,L4-L5\n2,allL5\n", encoding="utf-8")
    assert list(read_levels(path)["level"]) == ["L4", "L4-L5", "allL5"]


# ------------------------------------------------------- 13. sagittal, coronal, too oblique
def _rotated_stack(angle_deg: float, about: str = "x", zooms=(0.8, 0.8, 4.0)) -> np.ndarray:
    t = np.radians(angle_deg)
    c, s = np.cos(t), np.sin(t)
    if about == "x":
        rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    else:
        rot = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(zooms)
    return affine


SAGITTAL = np.array([[0, 0, 4.0, 0], [0.7, 0, 0, 0], [0, 0.7, 0, 0], [0, 0, 0, 1]])
CORONAL = np.array([[0.7, 0, 0, 0], [0, 0, 4.0, 0], [0, 0.7, 0, 0], [0, 0, 0, 1]])


@pytest.mark.parametrize(
    ("affine", "expected"),
    [
        (SAGITTAL, "a sagittal stack (slice normal 90 deg"),
        (CORONAL, "a coronal stack (slice normal 90 deg"),
        (_rotated_stack(50), "an oblique stack (slice normal 50 deg"),
        (_rotated_stack(-35, "y"), "an oblique stack (slice normal 35 deg"),
        (_rotated_stack(80, "y"), "a sagittal stack (slice normal 80 deg"),
    ],
)
def test_non_axial_and_too_oblique_stacks_are_refused(
    tmp_path, example_dir, capsys, affine, expected
):
    import nibabel as nib

    from helpers.nifti import check_axial_stack

    with pytest.raises(Exception, match="not an axial stack") as info:
        check_axial_stack(affine, "x.nii.gz")
    assert expected in str(info.value)
    rng = np.random.default_rng(1)
    shape = (24, 20, 6)
    image = rng.uniform(100, 1000, shape).astype(np.float32)
    mask = np.zeros(shape, np.int16)
    mask[2:8, 3:9, :] = 1
    mask[14:20, 3:9, :] = 2
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "s_T2w.nii.gz")
    nib.save(nib.Nifti1Image(mask, affine), tmp_path / "s_dseg.nii.gz")
    code = main(["metrics", "--image", str(tmp_path / "s_T2w.nii.gz"), "--mask",
                 str(tmp_path / "s_dseg.nii.gz"), "--labels", str(example_dir / "labels.json"),
                 "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "s_T2w.nii.gz: not an axial stack" in err
    assert expected in err
    assert "fat-suppressed" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("affine", "axis", "tilt"),
    [
        (np.diag([0.7, 0.7, 4.0, 1]), 2, 0.0),
        (_rotated_stack(20), 2, 20.0),
        (_rotated_stack(-30, "y"), 2, 30.0),
        (np.diag([1.0, 1.0, 1.2, 1]), 2, 0.0),  # near isotropic: cut axially
        (SAGITTAL @ np.diag([1, 1, 0.3, 1]), 1, 0.0),  # isotropic sagittal 3-D: reformattable
    ],
)
def test_axial_and_mildly_oblique_stacks_pass(affine, axis, tilt):
    from helpers.nifti import check_axial_stack, stack_orientation

    assert stack_orientation(affine)[:2] == (axis, pytest.approx(tilt, abs=1e-6))
    assert check_axial_stack(affine) == pytest.approx(tilt, abs=1e-6)


def test_a_phantom_tilted_within_the_limit_is_still_measured():
    """The same phantom tilted 20 degrees about x gives the same per-slice voxel counts."""
    from helpers.metrics import MetricsSettings, measure
    from helpers.nifti import Volume
    from helpers.synthetic import make_phantom

    ph = make_phantom("syn-tilt", template="small", shape=(48, 48, 4), seed=3)
    data = np.asarray(ph.image.dataobj, np.float32)
    labels = np.asarray(ph.mask.dataobj).astype(np.int16)
    settings = MetricsSettings(bias_correction=False)
    straight = measure(Volume(data, ph.image.affine), Volume(labels, ph.image.affine), ph.labels,
                       subject="s", settings=settings)  # fmt: skip
    tilted_affine = _rotated_stack(20) @ ph.image.affine
    tilted = measure(Volume(data, tilted_affine), Volume(labels, tilted_affine), ph.labels,
                     subject="s", settings=settings)  # fmt: skip
    assert (tilted.metrics["n_voxels"] > 0).any()
    np.testing.assert_array_equal(tilted.metrics["n_voxels"], straight.metrics["n_voxels"])


# ------------------------------------------------------------------ 14. 1-3 slice volumes
@pytest.mark.parametrize("n_slices", [1, 2, 3, 4])
@pytest.mark.parametrize("slice_mm", [1.0, 4.0])
def test_n4_on_thin_stacks_recovers_the_planted_shading(n_slices, slice_mm):
    """1-4 slices (thin ones used to be shrunk to a single voxel and crash inside ITK): the
    fitted field follows the planted log-shading 0.2 x (x from -1 to 1)."""
    from helpers import fat

    x = np.linspace(-1, 1, 64)
    truth = np.where(np.hypot(*np.meshgrid(x, x, indexing="ij")) < 0.5, 100.0, 300.0)
    shading = 0.2 * x
    image = np.repeat((truth * np.exp(shading)[:, None])[..., None], n_slices, axis=2)
    corrected, field = fat.n4_correct(image, np.diag([0.8, 0.8, slice_mm, 1.0]))
    assert corrected.shape == image.shape
    for k in range(n_slices):
        log_field = np.log(field[:, 32, k])
        assert np.corrcoef(log_field, shading)[0, 1] > 0.99
        assert np.std(log_field) == pytest.approx(np.std(shading), rel=0.1)


def test_cli_metrics_measures_a_two_slice_scan_with_bias_correction(tmp_path, capsys):
    import nibabel as nib

    from helpers.synthetic import LABELS_DOC, make_phantom

    ph = make_phantom("syn-thin", template="small", shape=(48, 48, 4), seed=5)
    affine = ph.image.affine.copy()
    affine[:3, 2] *= 0.25  # 1 mm slices: the shrink of the fit used to reach a single slice
    image = np.asarray(ph.image.dataobj, np.float32)[:, :, 1:3]
    mask = np.asarray(ph.mask.dataobj).astype(np.int16)[:, :, 1:3]
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "syn-thin_T2w.nii.gz")
    nib.save(nib.Nifti1Image(mask, affine), tmp_path / "syn-thin_dseg.nii.gz")
    (tmp_path / "labels.json").write_text(json.dumps(LABELS_DOC))
    code = main(["metrics", "--image", str(tmp_path / "syn-thin_T2w.nii.gz"), "--mask",
                 str(tmp_path / "syn-thin_dseg.nii.gz"), "--labels", str(tmp_path / "labels.json"),
                 "--out", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Traceback" not in err
    metrics = pd.read_csv(tmp_path / "out" / "metrics.csv")
    assert set(metrics["slice"].dropna().astype(int)) == {0, 1}
    assert np.isfinite(metrics["fat_pct"]).any()


# ------------------------------------------------- 8. label sides contradicting the anatomy
def _swap_sides(doc: dict) -> dict:
    out = json.loads(json.dumps(doc))
    for lab in out["labels"]:
        if lab.get("side") in ("left", "right"):
            lab["side"] = "left" if lab["side"] == "right" else "right"
    return out


def test_cli_metrics_refuses_a_label_file_with_swapped_sides(tmp_path, capsys):
    import nibabel as nib

    from helpers.synthetic import LABELS_DOC, make_phantom

    ph = make_phantom("syn-side", template="small", shape=(48, 48, 4), seed=7, bias_lr=0.0)
    nib.save(ph.image, tmp_path / "syn-side_T2w.nii.gz")
    nib.save(ph.mask, tmp_path / "syn-side_dseg.nii.gz")
    (tmp_path / "labels.json").write_text(json.dumps(LABELS_DOC))
    (tmp_path / "swapped.json").write_text(json.dumps(_swap_sides(LABELS_DOC)))
    base = ["metrics", "--image", str(tmp_path / "syn-side_T2w.nii.gz"), "--mask",
            str(tmp_path / "syn-side_dseg.nii.gz"), "--no-bias-correction"]  # fmt: skip
    assert (
        main([*base, "--labels", str(tmp_path / "labels.json"), "--out", str(tmp_path / "a")]) == 0
    )
    args = [*base, "--labels", str(tmp_path / "swapped.json"), "--out", str(tmp_path / "b")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "swapped.json: left and right contradict the anatomy in syn-side_dseg.nii.gz" in err
    assert "--no-side-check" in err
    assert not (tmp_path / "b").exists()
    # the explicit override measures, and every asymmetry's sign is flipped
    assert main([*args, "--no-side-check"]) == 0
    right = pd.read_csv(tmp_path / "a" / "asymmetry.csv").set_index(["muscle", "level"])
    flipped = pd.read_csv(tmp_path / "b" / "asymmetry.csv").set_index(["muscle", "level"])
    finite = np.isfinite(right["cdi"]) & (right["cdi"].abs() > 1e-3)
    assert finite.sum() >= 3
    np.testing.assert_allclose(flipped.loc[finite.index[finite], "cdi"], -right["cdi"][finite],
                               atol=1e-9)  # fmt: skip


def test_side_check_setting_is_validated_and_kept_out_of_default_records():
    from helpers.errors import ConfigError
    from helpers.metrics import MetricsSettings

    assert "side_check" not in MetricsSettings().to_dict()
    assert MetricsSettings(side_check=False).to_dict()["side_check"] is False
    with pytest.raises(ConfigError, match="side_check: must be true or false"):
        MetricsSettings.from_mapping({"side_check": "no"})


def test_run_fails_the_subject_whose_sides_contradict_the_anatomy(tmp_path, monkeypatch):
    """esma run: the subject with the right/left mask values exchanged is listed in
    failures.csv with the reason; the other subject is measured."""
    import nibabel as nib

    from helpers import runner

    study_file, subjects = _given_mask_study(tmp_path, seed=3, name="sides")
    pairs = {1: 2, 2: 1, 3: 4, 4: 3, 5: 6, 6: 5}
    doc_labels = json.loads((study_file.parent / "labels.json").read_text())
    sided = {lab["value"] for lab in doc_labels["labels"] if lab.get("side")}
    assert set(pairs) <= sided
    # exchange right and left in the first mask: the label file now contradicts it
    mask_path = study_file.parent / "masks" / f"{subjects[0]}_dseg.nii.gz"
    m = nib.load(mask_path)
    data = np.asarray(m.dataobj).copy()
    data = np.vectorize(lambda v: pairs.get(int(v), int(v)))(data).astype(data.dtype)
    nib.save(nib.Nifti1Image(data, m.affine), mask_path)
    result = runner.run_study(study_file, notebooks=["01_segment", "03_metrics"],
                                progress=False)  # fmt: skip
    assert result.exit_code == 1
    failures = pd.read_csv(result.run_dir / "failures.csv", dtype=str, keep_default_na=False)
    assert list(failures["subject"]) == [subjects[0]]
    assert "left and right contradict the anatomy" in failures["error"].iloc[0]
    metrics = pd.read_csv(result.run_dir / "metrics.csv")
    assert sorted(metrics["subject"].unique()) == [subjects[1]]


# ------------------------------------------------- 5. disk full during QC is no decision
def _given_mask_study(
    tmp_path: Path, n: int = 2, *, seed: int = 4, name: str = "diskfull"
) -> tuple[Path, list[str]]:
    """``study.yml`` over ``n`` synthetic subjects with their phantom masks given (LPS)."""
    import shutil

    import yaml

    from helpers import synthetic

    phantoms = synthetic.make_cohort(n, tmp_path / "ph", seed=seed, template="small",
                                     orientations=("LPS",))  # fmt: skip
    study = tmp_path / "study"
    for sub in ("images", "masks"):
        (study / sub).mkdir(parents=True)
    for row in phantoms.itertuples(index=False):
        shutil.copyfile(row.image, study / "images" / f"{row.subject}_T2w.nii.gz")
        shutil.copyfile(row.mask, study / "masks" / f"{row.subject}_dseg.nii.gz")
    shutil.copyfile(tmp_path / "ph" / "labels.json", study / "labels.json")
    doc = {
        "study": name,
        "images": "images/*_T2w.nii.gz",
        "labels": "labels.json",
        "masks": "masks/{subject}_dseg.nii.gz",
        "metrics": {"bias_correction": False},
        "executor": {"kind": "sequential"},
        "output": "out",
    }
    (study / "study.yml").write_text(yaml.safe_dump(doc))
    return study / "study.yml", sorted(phantoms["subject"])


def test_disk_full_during_qc_excludes_nobody_and_a_rerun_decides(tmp_path, monkeypatch):
    from helpers import qc, runs
    from helpers.errors import OutputError
    from helpers.stages import s1_segment, s3_qc

    study_file, subjects = _given_mask_study(tmp_path)
    real = qc.save_mosaic

    def full(*args, **kwargs):
        raise OutputError("mosaic.png: cannot write (No space left on device)")

    monkeypatch.setattr(qc, "save_mosaic", full)
    study, paths = runs.open_study(study_file, tmp_path / "run1")
    seg = s1_segment.segment_stage(study, paths, progress=False)
    out = s3_qc.qc_stage(study, paths, seg, progress=False)
    decisions = pd.read_csv(paths.decisions, dtype=str, keep_default_na=False)
    assert "exclude" not in set(decisions["decision"])
    assert set(decisions["subject"]).isdisjoint(subjects)
    assert out.excluded.empty
    failures = pd.read_csv(paths.run_dir / "failures_qc.csv", dtype=str)
    assert sorted(failures["subject"]) == subjects
    assert failures["error"].str.contains("No space left on device").all()

    # space freed: the re-run decides from the real QC (every phantom passes)
    monkeypatch.setattr(qc, "save_mosaic", real)
    study, paths = runs.open_study(study_file, tmp_path / "run2")
    seg = s1_segment.segment_stage(study, paths, progress=False)
    out = s3_qc.qc_stage(study, paths, seg, progress=False)
    decisions = pd.read_csv(paths.decisions, dtype=str, keep_default_na=False)
    assert sorted(decisions["subject"]) == subjects
    assert set(decisions["decision"]) == {"include"}
    assert out.excluded.empty


def test_auto_qc_rows_from_a_qc_that_could_not_run_are_reseeded(tmp_path):
    """A decisions file poisoned by the old behaviour heals; a reviewer's row never changes."""
    from helpers import qc

    path = tmp_path / "qc_decisions.csv"
    pd.DataFrame(
        [
            ["a", "exclude", "auto-qc", "QC fail: QC could not run: OutputError: disk full", "t"],
            ["b", "exclude", "dr-x", "QC could not run, but I exclude it anyway", "t"],
            ["c", "exclude", "auto-qc", "QC fail: 3 fail(s)", "t"],
        ],
        columns=list(qc.DECISION_COLUMNS),
    ).to_csv(path, index=False)
    summary = pd.DataFrame(
        {"subject": ["a", "b", "c"], "status": ["pass"] * 3, "reasons": [""] * 3}
    )
    decisions = qc.init_decisions(summary, path).set_index("subject")
    assert decisions.loc["a", "decision"] == "include"
    assert decisions.loc["b", ["decision", "reviewer"]].tolist() == ["exclude", "dr-x"]
    # an automatic decision follows the current QC (issue 15): c's QC now passes
    assert decisions.loc["c", ["decision", "reviewer"]].tolist() == ["include", "auto-qc"]


# ------------------------------------------------------- 7. two esma run on one output
def test_second_run_on_the_same_output_names_the_holder_and_exits_2(tmp_path, capsys):
    import subprocess
    import sys
    import time

    from helpers import runner
    from helpers.config import load_study
    from helpers.locks import RUN_LOCK_NAME, file_lock

    study_file, _ = _given_mask_study(tmp_path)
    lock = load_study(study_file).work_dir / RUN_LOCK_NAME
    script = (
        "import sys, time; from helpers.locks import file_lock\n"
        "with file_lock(sys.argv[1], 'x', command='esma run'):\n"
        "    print('held', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(lock)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.perf_counter()
        code = main(["run", str(study_file), "--quiet"])
        assert time.perf_counter() - t0 < 10  # refused at once, no waiting
        assert code == 2
        err = capsys.readouterr().err
        assert f"is locked by process {holder.pid} on " in err
        assert "(esma run)" in err
        assert [p.name for p in (tmp_path / "study" / "out").iterdir()] == ["work"]
    finally:
        holder.kill()
        holder.wait()
    # the kernel dropped the killed holder's lock: a run goes ahead, and releases it after
    result = runner.run_study(study_file, notebooks=["01_segment"], progress=False)
    assert result.exit_code == 0
    with file_lock(lock, "x"):
        pass


# ------------------------------------------- 6. workers die with the run; signals end cleanly
def _env_with_tests() -> dict[str, str]:
    import os

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "tests")])
    return env


def _still_running(procs: list, timeout: float) -> list[int]:
    """Pids of ``procs`` still running after ``timeout`` s (a zombie, dead but not yet reaped
    by whoever adopted it, counts as dead)."""
    import time

    import psutil

    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in procs:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p.pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


_POOL_SCRIPT = """
import sys
from helpers.executor import ExecutorConfig, run_tasks
from slow_task import slow_touch
items = {f"s{i}": f"{sys.argv[1]}/done-{i}" for i in range(4)}
run_tasks(slow_touch, items, ExecutorConfig(kind="processes", workers=2), progress=False)
"""


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_process_workers_die_with_a_killed_run_and_write_nothing(tmp_path, sig):
    import signal
    import subprocess
    import sys
    import time

    import psutil

    proc = subprocess.Popen([sys.executable, "-c", _POOL_SCRIPT, str(tmp_path)],
                            env=_env_with_tests())  # fmt: skip
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 60
        workers: list[psutil.Process] = []
        while time.monotonic() < deadline:
            workers = [c for c in parent.children(recursive=True)
                       if "spawn_main" in " ".join(c.cmdline())]  # fmt: skip
            if len(workers) >= 2:
                break
            time.sleep(0.1)
        assert len(workers) >= 2, "the pool never started"
        while len(list(tmp_path.glob("*.started"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # both workers are running a task (initialized, lock armed)
        assert len(list(tmp_path.glob("*.started"))) >= 2
        proc.send_signal(getattr(signal, sig))
        proc.wait(timeout=30)
        alive = _still_running(workers, timeout=3)
        assert not alive, f"workers survived the run: {alive}"
        time.sleep(5)  # longer than a task: a surviving worker would have written its result
        assert not [p for p in tmp_path.glob("done-*") if p.suffix != ".started"]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_kernel_of_a_killed_run_dies_with_it(tmp_path):
    """A process that calls what every notebook calls first (open_study's guard) under a
    parent named by ESMA_RUN_PID is killed when that parent is SIGKILLed."""
    import signal
    import subprocess
    import sys

    import psutil

    script = (
        "import os, subprocess, sys, time\n"
        "env = dict(os.environ, ESMA_RUN_PID=str(os.getpid()))\n"
        "child = subprocess.Popen([sys.executable, '-c', 'from helpers import runs; "
        "runs._kernel_dies_with_run(); print(1, flush=True); import time; time.sleep(60)'],"
        " env=env, stdout=subprocess.PIPE, text=True)\n"
        "print(child.pid, flush=True); child.stdout.readline(); print('armed', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env=_env_with_tests())  # fmt: skip
    try:
        kernel = psutil.Process(int(proc.stdout.readline()))
        assert proc.stdout.readline().strip() == "armed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert not _still_running([kernel], timeout=3), "the kernel outlived the killed run"
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize(("sig", "code", "what"), [("SIGTERM", 143, "SIGTERM"),
                                                   ("SIGINT", 130, "Ctrl-C")])  # fmt: skip
def test_sigterm_and_ctrl_c_end_with_one_line_and_exit_143_130(tmp_path, sig, code, what):
    import signal
    import subprocess
    import sys

    script = (
        "import signal, sys, time\n"
        # as at a terminal: a test run started in the background (nohup, make &) passes SIGINT
        # on ignored, and Python then installs no Ctrl-C handler in the child
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "import helpers.cli as cli\n"
        "def slow(args):\n"
        "    print('started', flush=True)\n"
        "    time.sleep(60)\n"
        "cli._cmd_run = slow\n"
        "sys.exit(cli.main(['run', 'study.yml']))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env_with_tests())  # fmt: skip
    assert proc.stdout.readline().strip() == "started"
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code
    assert "Traceback" not in err
    expected = (
        f"esma run: interrupted ({what}); finished work is kept, run the same command again "
        "to resume"
    )
    assert err.strip().splitlines() == [expected]


# ------------------------------------------- 4. two first-time ingests sharing one key
def test_racing_first_ingests_share_one_secret_and_one_key(tmp_path, monkeypatch):
    """Two ingests start at once with no secret yet; creating the secret is slowed down so
    that both would create one.  The lock makes the second wait and use the first's secret:
    the same patient gets one pseudonym, and the key holds the rows of both."""
    import secrets
    import threading
    import time

    monkeypatch.delenv(dicom.SECRET_ENV, raising=False)
    real = secrets.token_hex

    def slow_token(n: int) -> str:
        time.sleep(0.5)
        return real(n)

    monkeypatch.setattr(dicom.secrets, "token_hex", slow_token)
    key = tmp_path / "private" / "key.csv"
    for name, number in (("a", 3), ("b", 4)):
        write_series(tmp_path / name, Series(ramp((6, 5, 3)), axial_affine(), series_number=number))
    results: dict[str, object] = {}

    def run(name: str) -> None:
        try:
            results[name] = ingest(tmp_path / name, tmp_path / f"out-{name}", key_path=key)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            results[name] = exc

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    a, b = results["a"], results["b"]
    assert not isinstance(a, Exception), a
    assert not isinstance(b, Exception), b
    assert a.images[0].name == b.images[0].name  # one patient, one pseudonym
    table = pd.read_csv(key, dtype=str)
    assert len(table) == 2
    assert set(table["pseudonym"]) == {a.images[0].name.removesuffix("_T2w.nii.gz")}
    assert oct(key.with_suffix(".secret").stat().st_mode)[-3:] == "600"


def test_an_existing_secret_is_never_overwritten(tmp_path, monkeypatch):
    monkeypatch.delenv(dicom.SECRET_ENV, raising=False)
    key, secret_path = tmp_path / "k.csv", tmp_path / "k.secret"
    secret_path.write_text("first-secret\n")
    # the secret appears between the check and the creation: the creation must not replace it
    real_is_file = Path.is_file
    calls = {"n": 0}

    def racing_is_file(self: Path) -> bool:
        if self == secret_path and calls["n"] == 0:
            calls["n"] += 1
            return False
        return real_is_file(self)

    monkeypatch.setattr(Path, "is_file", racing_is_file)
    assert dicom._load_secret(secret_path, key) == b"first-secret"
    assert secret_path.read_text() == "first-secret\n"


def test_second_ingest_into_a_folder_made_with_another_key_is_refused(tmp_path, monkeypatch):
    from helpers.errors import ConfigError

    monkeypatch.delenv(dicom.SECRET_ENV, raising=False)
    write_series(tmp_path / "dicom", Series(ramp((6, 5, 3)), axial_affine()))
    out = tmp_path / "study" / "images"
    first = ingest(tmp_path / "dicom", out, key_path=tmp_path / "k1" / "key.csv")
    with pytest.raises(ConfigError, match="ingested with another pseudonym secret"):
        ingest(tmp_path / "dicom", out, key_path=tmp_path / "k2" / "key.csv")
    # same secret, another key file: pseudonyms would be split over two keys
    (tmp_path / "k3").mkdir()
    (tmp_path / "k3" / "key.secret").write_bytes((tmp_path / "k1" / "key.secret").read_bytes())
    with pytest.raises(ConfigError, match="another pseudonym key file"):
        ingest(tmp_path / "dicom", out, key_path=tmp_path / "k3" / "key.csv")
    assert [p.name for p in out.glob("*.nii.gz")] == [first.images[0].name]
    again = ingest(tmp_path / "dicom", out, key_path=tmp_path / "k1" / "key.csv")
    assert again.images == first.images


# ------------------------------------------------------------------ 15. the smaller ones
def _clinical_table(n: int = 6) -> pd.DataFrame:
    from helpers.clinical import simulate_asymmetry, simulate_clinical

    asym = simulate_asymmetry(n, seed=2, muscles=("erector_spinae",))
    clinical = simulate_clinical(asym, seed=2, p_missing=0.0)
    return asym, clinical


def test_latin1_clinical_csv_reads_with_an_encoding_option(tmp_path, capsys):
    from helpers.clinical import ClinicalMapping, load_clinical
    from helpers.errors import ConfigError, InputFileError

    _, clinical = _clinical_table()
    clinical = clinical.astype(object)
    clinical["site"] = "Zürich Hôpital"  # an extra column with non-ASCII text
    path = tmp_path / "clinical.csv"
    path.write_bytes(clinical.to_csv(index=False).encode("latin-1"))
    with pytest.raises(
        InputFileError, match=r"clinical\.csv: .*not utf-8-sig text.*encoding: latin-1"
    ):
        load_clinical(path)
    table = load_clinical(path, ClinicalMapping.from_dict({"encoding": "latin-1"}))
    assert set(table["site"]) == {"Zürich Hôpital"}
    assert list(table["subject"]) == list(clinical["subject"])
    with pytest.raises(ConfigError, match=r"mapping\.encoding: unknown text encoding .klingon."):
        ClinicalMapping.from_dict({"encoding": "klingon"})
    out = tmp_path / "scores.csv"
    assert main(["scores", "--clinical", str(path), "--out", str(out)]) == 2
    assert "--encoding latin-1" in capsys.readouterr().err
    args = ["scores", "--clinical", str(path), "--out", str(out), "--encoding", "latin-1"]
    assert main(args) == 0
    assert len(pd.read_csv(out)) == len(clinical)


def test_stats_refuses_a_raw_clinical_table_as_scores(tmp_path, capsys):
    from helpers.clinical import write_table
    from helpers.errors import InputFileError
    from helpers.stats import load_scores

    asym, clinical = _clinical_table(12)
    raw = write_table(clinical, tmp_path / "clinical.csv")
    write_table(asym, tmp_path / "asymmetry.csv")
    with pytest.raises(InputFileError, match=r"clinical\.csv: not a scores table.*esma scores"):
        load_scores(raw)
    code = main(["stats", "--asymmetry", str(tmp_path / "asymmetry.csv"), "--scores", str(raw),
                 "--out", str(tmp_path / "stats")])  # fmt: skip
    assert code == 2
    assert "not a scores table" in capsys.readouterr().err
    assert not (tmp_path / "stats").exists()
    # the same table scored is accepted
    assert main(["scores", "--clinical", str(raw), "--out", str(tmp_path / "scores.csv")]) == 0
    assert len(load_scores(tmp_path / "scores.csv")) == 12


def test_disk_full_has_its_own_exit_code(tmp_path, capsys, monkeypatch):
    import errno
    import os

    from helpers import cli

    path = _bad_crc(tmp_path)  # any file: the write fails first
    real = os.replace

    def full(src, dst):
        if str(dst).endswith(".csv"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "replace", full)
    folder = tmp_path / "in"
    folder.mkdir()
    code = cli.main(["ingest", str(folder), "--out", str(tmp_path / "o")])
    assert code == cli.EXIT_BAD_INPUT  # an empty DICOM folder is bad input
    write_series(tmp_path / "dicom", Series(ramp((6, 5, 3)), axial_affine()))
    monkeypatch.setenv(dicom.SECRET_ENV, "s")
    code = cli.main(["ingest", str(tmp_path / "dicom"), "--out", str(tmp_path / "o")])
    assert code == cli.EXIT_INFRASTRUCTURE == 3
    assert "cannot write output (disk full)" in capsys.readouterr().err
    assert path.exists()


def test_model_label_warning_reaches_index_html(tmp_path):
    from types import SimpleNamespace

    from helpers import provenance, runner, runs
    from helpers.config import load_study
    from helpers.stages import s1_segment
    from helpers.synthetic import LABELS_DOC

    study_file, _ = _given_mask_study(tmp_path)
    result = runner.run_study(study_file, notebooks=["01_segment"], progress=False)
    study = load_study(study_file)
    seg = tmp_path / "seg"
    seg.mkdir()
    model_doc = json.loads(json.dumps(LABELS_DOC))
    model_doc["labels"] = model_doc["labels"][:2]
    (seg / "labels.json").write_text(json.dumps(model_doc))
    paths = SimpleNamespace(seg_dir=seg, run_dir=result.run_dir)
    message = s1_segment.check_model_labels(study, paths)
    assert message.startswith("the model's output labels differ from the study's label file")
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    failures = runs.collect_failures(result.run_dir)
    index = provenance.write_index(
        result.run_dir, manifest, failures, runs.collect_excluded(result.run_dir, failures)
    )
    page = index.read_text(encoding="utf-8")
    assert "<h2>Warnings</h2>" in page
    assert "the model&#x27;s output labels differ from the study&#x27;s label file" in page
    s1_segment.check_model_labels(study, paths)  # recorded once
    assert len(runs.read_run_warnings(result.run_dir)) == 1
