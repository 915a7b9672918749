"""DICOM ingest: geometry against a volume the test writes as DICOM itself, detection of unusable
series, pseudonyms, and a byte-level scan of every output for the fake identity."""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from dicom_factory import IDENTITY, LPS, OTHER_IDENTITY, Series, ds_number, write_series
from pydicom.uid import ImplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from helpers import dicom
from helpers.cli import main
from helpers.dicom import IngestRules, classify_t2, detect_fat_suppression, ingest, series_geometry
from helpers.errors import ConfigError, InputFileError
from helpers.nifti import load_image


def ramp(shape: tuple[int, int, int], start: int = 100) -> np.ndarray:
    """Volume with a different value in every voxel (so any misplacement shows)."""
    return (np.arange(np.prod(shape)).reshape(shape) + start).astype(np.float64)


def axial_affine(zooms=(0.9, 0.8, 4.4), origin=(60.0, 40.0, -30.0)) -> np.ndarray:
    """RAS+ affine of an LPS-stored axial volume (like the example scan)."""
    aff = np.diag([-zooms[0], -zooms[1], zooms[2], 1.0])
    aff[:3, 3] = origin
    return aff


def assert_same_world(nifti: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Every output voxel lies within 1e-3 mm of an input voxel with the same value."""
    img = nib.load(nifti)
    out = np.asarray(img.dataobj, dtype=np.float64)
    assert sorted(out.shape) == sorted(data.shape)
    assert np.allclose(img.get_qform(), img.get_sform(), atol=1e-6)
    idx = np.indices(out.shape).reshape(3, -1)
    world = img.affine @ np.vstack([idx, np.ones(idx.shape[1])])
    back = np.linalg.inv(affine) @ world
    nearest = np.rint(back[:3]).astype(int)
    assert np.all(nearest >= 0)
    assert np.all(nearest < np.array(data.shape)[:, None])
    again = affine @ np.vstack([nearest, np.ones(idx.shape[1])])
    assert np.max(np.abs(again[:3] - world[:3])) < 1e-3  # mm
    assert np.array_equal(out.reshape(-1), data[tuple(nearest)])


def ingest_table(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "ingest.csv", keep_default_na=False)


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dicom.SECRET_ENV, "test-secret")


# ---------------------------------------------------------------------------------- geometry
def oblique_affine() -> np.ndarray:
    angle = np.radians(15)
    rot = np.array(
        [[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]]
    )
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([-0.7, -0.7, 3.3])
    aff[:3, 3] = [10.0, -20.0, 5.0]
    return aff


GEOMETRIES = {
    # array axis 0 -> patient left, 1 -> posterior, 2 -> superior (standard DICOM axial)
    "lps_axial": axial_affine(),
    # slices stored inferior-going: ingest must sort them by position, not file or instance order
    "reversed_slices": axial_affine()
    @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, 5], [0, 0, 0, 1.0]]),
    # rows stored towards the patient's right and anterior (a RAS-ish row direction)
    "ras_rows": np.array(
        [[0.7, 0, 0, -80.0], [0, 1.1, 0, -60.0], [0, 0, 5.0, 12.5], [0, 0, 0, 1.0]]
    ),
    # in-plane axes swapped: rows run anterior-posterior, columns left-right
    "transposed": np.array(
        [[0, -0.6, 0, 50.0], [0.9, 0, 0, -30.0], [0, 0, 4.0, -7.0], [0, 0, 0, 1.0]]
    ),
    "oblique_15deg": oblique_affine(),
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_geometry_matches_the_volume_written_as_dicom(tmp_path, secret, name):
    data = ramp((12, 10, 6))
    affine = GEOMETRIES[name]
    write_series(tmp_path / "dicom", Series(data, affine))
    result = ingest(tmp_path / "dicom", tmp_path / "out")
    assert len(result.images) == 1
    assert_same_world(result.images[0], data, affine)
    # the toolkit's own loader sees the same geometry and values
    vol = load_image(result.images[0])
    assert sorted(vol.zooms_mm) == pytest.approx(sorted(np.linalg.norm(affine[:3, :3], axis=0)))
    table = ingest_table(tmp_path / "out")
    assert table.loc[0, "status"] == "written"
    assert table.loc[0, "n_slices"] == 6
    assert table.loc[0, "orientation"] == "".join(
        nib.aff2axcodes(nib.load(result.images[0]).affine)
    )


def test_reversed_slices_come_out_ascending_in_z(tmp_path, secret):
    data = ramp((8, 7, 5))
    affine = GEOMETRIES["reversed_slices"]
    write_series(tmp_path / "dicom", Series(data, affine))
    img = nib.load(ingest(tmp_path / "dicom", tmp_path / "out").images[0])
    assert img.affine[2, 2] == pytest.approx(4.4)  # spacing from positions, ascending
    out = np.asarray(img.dataobj)
    assert np.array_equal(out, data[:, :, ::-1])


def test_slice_spacing_comes_from_positions_not_slice_thickness(tmp_path, secret):
    data = ramp((6, 5, 4))
    affine = axial_affine(zooms=(1.0, 1.0, 6.0))  # 4 mm slices with a 2 mm gap
    series = Series(data, affine, extra={"SliceThickness": ds_number(4.0)})
    write_series(tmp_path / "dicom", series)
    img = nib.load(ingest(tmp_path / "dicom", tmp_path / "out").images[0])
    assert img.header.get_zooms()[2] == pytest.approx(6.0)


def test_series_geometry_unit():
    g = series_geometry([1, 0, 0, 0, 1, 0], [[5, 5, 10], [5, 5, 2], [5, 5, 6]], [0.5, 0.25])
    assert g.order == [1, 2, 0]
    # columns along DICOM row direction (LPS +x = left) -> RAS -x; PixelSpacing[1] is its step
    assert g.affine_ras[:3, :3] == pytest.approx(np.diag([-0.25, -0.5, 4.0]))
    assert g.affine_ras[:3, 3] == pytest.approx([-5, -5, 2])
    assert g.issues == []


# ---------------------------------------------------------------------------------- rescale
def test_rescale_slope_and_intercept_are_applied(tmp_path, secret):
    data = ramp((6, 5, 4)) * 2.0 + 10.0
    write_series(tmp_path / "dicom", Series(data, axial_affine(), slope=2.0, intercept=10.0))
    result = ingest(tmp_path / "dicom", tmp_path / "out")
    assert_same_world(result.images[0], data, axial_affine())
    issues = ingest_table(tmp_path / "out").loc[0, "issues"]
    assert "rescaled: slope 2, intercept 10 applied" in issues


def test_slopes_varying_per_slice_are_applied_per_slice(tmp_path, secret):
    data = ramp((6, 5, 4)) * 2.0
    data[:, :, 1] *= 1.5  # stored values x slope: exact for slope 3 on slice 1
    slopes = [2.0, 3.0, 2.0, 2.0]
    write_series(tmp_path / "dicom", Series(data, axial_affine(), slope=slopes))
    result = ingest(tmp_path / "dicom", tmp_path / "out")
    assert_same_world(result.images[0], data, axial_affine())
    issues = ingest_table(tmp_path / "out").loc[0, "issues"]
    assert "2 different slope/intercept pairs, applied per slice" in issues


def test_non_integer_rescale_is_written_as_float(tmp_path, secret):
    data = ramp((6, 5, 3)) * 0.5
    write_series(tmp_path / "dicom", Series(data, axial_affine(), slope=0.5))
    img = nib.load(ingest(tmp_path / "dicom", tmp_path / "out").images[0])
    assert img.get_data_dtype() == np.float32
    assert np.allclose(np.asarray(img.dataobj), data)


# ------------------------------------------------------------------------------- detections
def run_one(tmp_path: Path, series: Series, rules: IngestRules | None = None) -> pd.Series:
    write_series(tmp_path / "dicom", series)
    ingest(tmp_path / "dicom", tmp_path / "out", rules=rules)
    table = ingest_table(tmp_path / "out")
    assert len(table) == 1
    return table.iloc[0]


@pytest.mark.parametrize(
    ("description", "extra", "expected"),
    [
        ("T2_TSE_TRA_FS", {}, "keyword in SeriesDescription (rule fat_suppression_pattern)"),
        ("AX T2 FATSAT", {}, "keyword in SeriesDescription (rule fat_suppression_pattern)"),
        ("t2_tse_tra_spair", {}, "keyword in SeriesDescription (rule fat_suppression_pattern)"),
        ("AX T2 FRFSE", {"ScanOptions": ["FS", "PFP"]}, "option in ScanOptions (rule fat_"),
        (
            "AX T2 5MM",
            {"ScanningSequence": ["SE", "IR"], "InversionTime": ds_number(150)},
            "inversion recovery with TI 150 ms (STIR)",
        ),
    ],
)
def test_fat_suppressed_series_are_refused(tmp_path, secret, description, extra, expected):
    row = run_one(
        tmp_path, Series(ramp((6, 5, 3)), axial_affine(), description=description, extra=extra)
    )
    assert row["status"] == "refused"
    assert row["image"] == ""
    assert "fat_suppressed: " in row["issues"]
    assert expected in row["issues"]
    assert not list((tmp_path / "out").glob("*.nii.gz"))


def test_fat_suppressed_series_written_when_allowed(tmp_path, secret):
    rules = IngestRules(allow_fat_suppressed=True)
    row = run_one(tmp_path, Series(ramp((6, 5, 3)), axial_affine(), description="T2 FS"), rules)
    assert row["status"] == "written"
    assert "fat_suppressed: fat-suppression keyword in SeriesDescription" in row["issues"]


def test_plain_t2_names_are_not_taken_for_fat_suppression():
    for text in ("AX T2 FRFSE", "T2_TSE_TRA", "sT2W_TSE", "T2 FSE SAG"):
        assert detect_fat_suppression(text) is None, text


@pytest.mark.parametrize(
    ("orientation", "angle"),
    [([0, 1, 0, 0, 0, -1], 90), ([1, 0, 0, 0, 0, -1], 90), ([1, 0, 0, 0, 0.5, -0.866025], 60)],
)
def test_non_axial_series_are_skipped_with_reason(tmp_path, secret, orientation, angle):
    row_dir, col_dir = np.array(orientation[:3], float), np.array(orientation[3:], float)
    normal = np.cross(row_dir, col_dir)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = row_dir * 0.8, col_dir * 0.8, normal * 4.0
    row = run_one(tmp_path, Series(ramp((6, 5, 3)), LPS @ lps))
    assert row["status"] == "skipped"
    assert f"non_axial: slice normal {angle} deg from the head-foot axis" in row["issues"]


def test_oblique_axial_within_tolerance_is_written_and_noted(tmp_path, secret):
    row = run_one(tmp_path, Series(ramp((6, 5, 3)), oblique_affine()))
    assert row["status"] == "written"
    assert "oblique: 15.0 deg from axial" in row["issues"]


def test_eight_bit_data_is_refused_as_windowed(tmp_path, secret):
    data = np.arange(6 * 5 * 3).reshape(6, 5, 3).astype(float)  # 0..89, fits 8 bits
    row = run_one(tmp_path, Series(data, axial_affine(), bits=8))
    assert row["status"] == "refused"
    assert "windowed: 8-bit data" in row["issues"]


def test_saturated_data_is_refused_as_windowed(tmp_path, secret):
    data = np.minimum(ramp((10, 10, 4)), 400.0)  # values clipped at a display maximum
    row = run_one(tmp_path, Series(data, axial_affine()))
    assert row["status"] == "refused"
    n_top = int(np.count_nonzero(data == 400.0))
    fraction = 100 * n_top / np.count_nonzero(data > data.min())
    assert f"windowed: saturated: {fraction:.1f} % of voxels at the maximum 400" in row["issues"]


def test_secondary_capture_is_refused_unless_allowed(tmp_path, secret):
    series = Series(ramp((6, 5, 3)), axial_affine(), sop_class=SecondaryCaptureImageStorage)
    row = run_one(tmp_path, series)
    assert row["status"] == "refused"
    assert "windowed: secondary capture (rendered export)" in row["issues"]
    row = run_one(tmp_path, series, IngestRules(allow_windowed=True))
    assert row["status"] == "written"


def test_window_center_alone_is_not_a_finding(tmp_path, secret):
    row = run_one(tmp_path, Series(ramp((6, 5, 3)), axial_affine()))  # carries WindowCenter
    assert row["status"] == "written"
    assert row["issues"] == ""


def positions_lps(affine: np.ndarray, z_steps: list[float]) -> list[np.ndarray]:
    lps = LPS @ affine
    return [lps[:3, 3] + lps[:3, 2] / np.linalg.norm(lps[:3, 2]) * z for z in z_steps]


def test_missing_slices_are_refused(tmp_path, secret):
    affine = axial_affine()
    zs = [0.0, 4.4, 8.8, 17.6, 22.0]  # the slice at 13.2 mm is missing
    row = run_one(tmp_path, Series(ramp((6, 5, 5)), affine, positions=positions_lps(affine, zs)))
    assert row["status"] == "refused"
    assert "missing_slices: gap 8.80 mm after slice 3 (median spacing 4.40 mm)" in row["issues"]


def test_mixed_slice_spacing_is_refused(tmp_path, secret):
    affine = axial_affine()
    zs = [0.0, 4.0, 8.0, 12.5, 16.5]
    row = run_one(tmp_path, Series(ramp((6, 5, 5)), affine, positions=positions_lps(affine, zs)))
    assert row["status"] == "refused"
    assert "mixed_spacing: slice spacing 4.00-4.50 mm (median 4.00 mm)" in row["issues"]
    assert "missing_slices" not in row["issues"]


def test_small_spacing_jitter_is_accepted(tmp_path, secret):
    affine = axial_affine(zooms=(0.9, 0.8, 4.0))
    zs = [0.0, 4.0, 8.01, 12.0, 16.0]  # 0.25 % jitter, under the 5 % tolerance
    row = run_one(tmp_path, Series(ramp((6, 5, 5)), affine, positions=positions_lps(affine, zs)))
    assert row["status"] == "written"


def test_duplicate_positions_are_refused(tmp_path, secret):
    affine = axial_affine()
    zs = [0.0, 4.4, 4.4, 8.8]
    row = run_one(tmp_path, Series(ramp((6, 5, 4)), affine, positions=positions_lps(affine, zs)))
    assert row["status"] == "refused"
    assert "duplicate_slices: 1 slice(s) repeat a position" in row["issues"]


def test_truncated_pixel_data_is_refused_not_crashing(tmp_path, secret):
    paths = write_series(tmp_path / "dicom", Series(ramp((16, 16, 3)), axial_affine()))
    raw = paths[1].read_bytes()
    paths[1].write_bytes(raw[: len(raw) - 200])
    ingest(tmp_path / "dicom", tmp_path / "out")
    row = ingest_table(tmp_path / "out").iloc[0]
    assert row["status"] == "refused"
    assert "unreadable: pixel data cannot be decoded" in row["issues"]


@pytest.mark.parametrize(
    ("text", "te", "tr", "is_t2"),
    [
        ("t2_tse_tra", 96.0, 3500.0, True),
        ("sT2W_TSE", 100.0, 4000.0, True),
        ("AX T2 FRFSE", None, None, True),
        ("t1_tse_tra", 12.0, 600.0, False),
        ("T1W_TSE", 100.0, 4000.0, False),  # the name wins over the timing
        ("t2_me2d_tra T2*", 20.0, 700.0, False),
        ("T2STAR", 20.0, 700.0, False),
        ("T2 MAP", 50.0, 2000.0, False),
        ("PD_T2_TSE", 15.0, 3000.0, False),
        ("AX 5MM", 100.0, 4000.0, True),  # name silent: timing
        ("AX 5MM", 15.0, 500.0, False),
        ("AX 5MM", None, None, False),
        ("T2_TSE", 12.0, 3000.0, False),  # named T2 with a T1/PD echo time
    ],
)
def test_t2_rule(text, te, tr, is_t2):
    assert classify_t2(text, te, tr)[0] is is_t2


def test_t2_rule_is_configurable(tmp_path, secret):
    series = Series(ramp((6, 5, 3)), axial_affine(), description="AX BODY", echo_time=45.0)
    assert run_one(tmp_path, series)["status"] == "skipped"
    rules = IngestRules.from_mapping({"echo_time_ms": [40, 200]})
    assert run_one(tmp_path, series, rules)["status"] == "written"


def test_rules_from_mapping_rejects_unknown_keys():
    with pytest.raises(ConfigError, match=r"ingest: unknown key\(s\) \['max_angle'\]"):
        IngestRules.from_mapping({"max_angle": 10})
    with pytest.raises(ConfigError, match=r"ingest\.gap_factor: must be > 1"):
        IngestRules.from_mapping({"gap_factor": 0.5})


# ------------------------------------------------------------------- files, grouping, naming
def test_non_dicom_files_are_skipped_with_a_note(tmp_path, secret, caplog):
    write_series(tmp_path / "dicom" / "a", Series(ramp((6, 5, 3)), axial_affine()))
    (tmp_path / "dicom" / "README.txt").write_text("export notes")
    (tmp_path / "dicom" / "a" / "thumbs.db").write_bytes(os.urandom(300))
    with caplog.at_level(logging.INFO, logger="helpers.dicom"):
        result = ingest(tmp_path / "dicom", tmp_path / "out")
    assert (result.n_files, result.skipped_files, len(result.images)) == (5, 2, 1)
    assert "skipped 2 of 5 files that are not DICOM images" in caplog.text


def test_folder_without_dicom_is_an_input_error(tmp_path, secret):
    (tmp_path / "dicom").mkdir()
    (tmp_path / "dicom" / "notes.txt").write_text("nothing")
    with pytest.raises(InputFileError, match=r"dicom: no DICOM image files found \(1 files"):
        ingest(tmp_path / "dicom", tmp_path / "out")
    with pytest.raises(InputFileError, match="DICOM folder not found"):
        ingest(tmp_path / "missing", tmp_path / "out")


def test_key_inside_the_output_folder_is_refused(tmp_path, secret):
    write_series(tmp_path / "dicom", Series(ramp((6, 5, 3)), axial_affine()))
    with pytest.raises(ConfigError, match="must not be inside the output folder"):
        ingest(tmp_path / "dicom", tmp_path / "out", key_path=tmp_path / "out" / "key.csv")
    assert not (tmp_path / "out").exists()


def test_several_series_and_studies_per_patient_get_runs(tmp_path, secret):
    data = ramp((6, 5, 3))
    later = dict(IDENTITY, StudyDate="20240301")
    write_series(tmp_path / "dicom" / "s2", Series(data + 1000, axial_affine(), identity=later))
    study = generate_uid()
    write_series(
        tmp_path / "dicom" / "s1", Series(data, axial_affine(), study_uid=study, series_number=5)
    )
    write_series(
        tmp_path / "dicom" / "s1b",
        Series(data + 2000, axial_affine(), study_uid=study, series_number=7),
    )
    write_series(
        tmp_path / "dicom" / "t1",
        Series(
            data,
            axial_affine(),
            study_uid=study,
            description="T1_TSE_TRA",
            echo_time=12,
            series_number=2,
        ),
    )
    result = ingest(tmp_path / "dicom", tmp_path / "out")
    table = ingest_table(tmp_path / "out")
    subject = table.loc[0, "subject"]
    assert table["subject"].nunique() == 1
    assert table["status"].tolist() == ["skipped", "written", "written", "written"]
    assert table["image"].tolist() == [
        "",
        f"{subject}_T2w.nii.gz",
        f"{subject}_run-2_T2w.nii.gz",
        f"{subject}_run-3_T2w.nii.gz",
    ]
    assert "not_t2: named another contrast in SeriesDescription" in table.loc[0, "issues"]
    # ordered by study date, then series number
    firsts = [float(np.asarray(nib.load(p).dataobj).min()) for p in result.images]
    assert firsts == [100.0, 2100.0, 1100.0]


def test_pseudonyms_are_stable_keyed_and_the_key_maps_back(tmp_path, monkeypatch):
    monkeypatch.delenv(dicom.SECRET_ENV, raising=False)
    write_series(tmp_path / "dicom" / "a", Series(ramp((6, 5, 3)), axial_affine()))
    write_series(
        tmp_path / "dicom" / "b",
        Series(ramp((6, 5, 3)), axial_affine(), identity=dict(OTHER_IDENTITY)),
    )
    first = ingest(tmp_path / "dicom", tmp_path / "study" / "images")
    key_path = tmp_path / "study" / dicom.DEFAULT_KEY_NAME
    assert first.key_path == key_path
    secret_path = key_path.with_suffix(".secret")
    for private in (key_path, secret_path):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = pd.read_csv(key_path, dtype=str, keep_default_na=False)
    assert list(key.columns) == list(dicom.KEY_COLUMNS)
    assert set(key["patient_id"]) == {"PID-123456", "PID-654321"}
    secret = secret_path.read_text().strip().encode()
    for _, row in key.iterrows():
        assert row["pseudonym"] == dicom.pseudonym(row["patient_id"], secret)
        assert row["image"] == f"{row['pseudonym']}_T2w.nii.gz"
        assert row["pseudonym"].startswith("sub-")
        assert len(row["pseudonym"]) == 14
    # a second run (another output folder, same key) gives the same names; the key keeps rows
    second = ingest(tmp_path / "dicom" / "a", tmp_path / "study" / "again")
    assert [p.name for p in second.images] == [
        key.loc[key["patient_id"] == "PID-123456", "image"].item()
    ]
    assert len(pd.read_csv(key_path)) == 2
    # another secret gives other names
    monkeypatch.setenv(dicom.SECRET_ENV, "another")
    third = ingest(tmp_path / "dicom" / "a", tmp_path / "other" / "images")
    assert third.images[0].name != second.images[0].name


def test_lost_secret_with_an_existing_key_stops(tmp_path, monkeypatch):
    monkeypatch.delenv(dicom.SECRET_ENV, raising=False)
    write_series(tmp_path / "dicom", Series(ramp((6, 5, 3)), axial_affine()))
    ingest(tmp_path / "dicom", tmp_path / "study" / "images")
    (tmp_path / "study" / "esma_pseudonym_key.secret").unlink()
    with pytest.raises(ConfigError, match="secret file missing but the key"):
        ingest(tmp_path / "dicom", tmp_path / "study" / "images")


# ---------------------------------------------------------------------- identity never leaks
def all_output_bytes(folder: Path) -> dict[Path, bytes]:
    """Every file under ``folder``, .gz files decompressed as well as raw."""
    found = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        raw = path.read_bytes()
        found[path] = raw
        if path.name.endswith(".gz"):
            found[path.with_name(path.name + "|decompressed")] = gzip.decompress(raw)
    return found


def identity_strings() -> list[str]:
    out = []
    for ident in (IDENTITY, OTHER_IDENTITY):
        out += list(ident.values())
        # family and given names on their own (4+ letters: shorter would match binary data)
        out += [part for part in ident["PatientName"].split("^") if len(part) >= 4]
        out.append(f"{ident['StudyDate'][:4]}-{ident['StudyDate'][4:6]}-{ident['StudyDate'][6:]}")
        out.append(f"{ident['PatientBirthDate'][:4]}-{ident['PatientBirthDate'][4:6]}")
    return sorted(set(out))


def test_no_identity_in_any_output_byte_nor_log(tmp_path, monkeypatch, caplog, capsys):
    """Two patients, two studies, a series of each kind the ingest refuses or skips; scan all."""
    monkeypatch.delenv(dicom.SECRET_ENV, raising=False)
    data, affine = ramp((8, 6, 4)), axial_affine()
    src = tmp_path / "export"
    study_uids = [generate_uid() for _ in range(3)]
    write_series(src / "1", Series(data, affine, study_uid=study_uids[0]))
    write_series(src / "2", Series(data, affine, study_uid=study_uids[0], description="T2 FS"))
    write_series(
        src / "3",
        Series(data, LPS @ np.diag([0.8, 0.8, 4, 1.0])[[1, 2, 0, 3]], study_uid=study_uids[0]),
    )
    write_series(
        src / "4",
        Series(
            data,
            affine,
            identity=dict(IDENTITY, StudyDate="20240301"),
            study_uid=study_uids[1],
            transfer_syntax=ImplicitVRLittleEndian,
        ),
    )
    write_series(
        src / "5", Series(data, affine, identity=dict(OTHER_IDENTITY), study_uid=study_uids[2])
    )
    (src / "DICOMDIR.txt").write_text("index")
    out = tmp_path / "study" / "images"
    with caplog.at_level(logging.INFO):
        code = main(["ingest", str(src), "--out", str(out)])
    assert code == 1  # one series refused (fat-suppressed)
    table = ingest_table(out)
    assert sorted(table["status"]) == ["refused", "skipped", "written", "written", "written"]

    outputs = all_output_bytes(out)
    assert len([p for p in outputs if p.name.endswith(".nii.gz")]) == 3
    captured = capsys.readouterr()
    outputs[Path("<log>")] = caplog.text.encode()
    outputs[Path("<stdout+stderr>")] = (captured.out + captured.err).encode()
    needles = identity_strings() + study_uids
    for path, content in outputs.items():
        lowered = content.lower()
        for needle in needles:
            assert needle.lower().encode() not in lowered, f"{needle!r} leaked into {path}"
    # NIfTI text fields are empty and there are no extensions
    for path in out.glob("*.nii.gz"):
        header = nib.load(path).header
        for key in ("descrip", "aux_file", "intent_name", "db_name"):
            assert header[key].item() in (b"", ""), (path, key)
        assert len(header.extensions) == 0
    # ... while the key, outside the output folder, does map back
    key_text = (tmp_path / "study" / dicom.DEFAULT_KEY_NAME).read_text()
    assert "PID-123456" in key_text
    assert "PID-654321" in key_text
    assert not any(out.rglob("*key*"))


def test_cli_exit_codes(tmp_path, secret, capsys):
    write_series(tmp_path / "good", Series(ramp((6, 5, 3)), axial_affine()))
    assert main(["ingest", str(tmp_path / "good"), "--out", str(tmp_path / "o1")]) == 0
    (tmp_path / "empty").mkdir()
    assert main(["ingest", str(tmp_path / "empty"), "--out", str(tmp_path / "o2")]) == 2
    assert "esma ingest: error:" in capsys.readouterr().err
    write_series(tmp_path / "fs", Series(ramp((6, 5, 3)), axial_affine(), description="T2 STIR"))
    args = ["ingest", str(tmp_path / "fs"), "--out", str(tmp_path / "o3")]
    assert main(args) == 1
    assert main([*args, "--allow-fat-suppressed"]) == 0


def test_identity_scan_finds_a_planted_name(tmp_path):
    """The scan above can fail: a name hidden in a gzipped NIfTI header is found."""
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4))
    img.header["descrip"] = b"DOE^JANE"
    nib.save(img, tmp_path / "x.nii.gz")
    found = all_output_bytes(tmp_path)
    assert b"DOE^JANE" not in found[tmp_path / "x.nii.gz"]  # compressed: invisible raw
    assert b"doe^jane" in found[tmp_path / "x.nii.gz|decompressed"].lower()


# --------------------------------------------------------------- ingesting again (ingest_once)
def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir()) if p.is_file()}


def test_ingest_once_reuses_only_an_unchanged_complete_ingest(tmp_path, secret, monkeypatch):
    src, out, key = tmp_path / "dicom", tmp_path / "study" / "nifti", tmp_path / "private" / "k.csv"
    write_series(src / "a", Series(ramp((6, 5, 3)), axial_affine()))
    first = dicom.ingest_once(src, out, key_path=key)
    assert not first.reused
    assert len(first.images) == 1
    before = _mtimes(out)

    again = dicom.ingest_once(src, out, key_path=key)
    assert again.reused
    assert [p.name for p in again.images] == [p.name for p in first.images]
    assert again.table.equals(pd.read_csv(out / "ingest.csv", dtype=str, keep_default_na=False))
    assert _mtimes(out) == before  # nothing rewritten

    # other rules: ingested again
    assert not dicom.ingest_once(src, out, key_path=key, rules=IngestRules(gap_factor=2)).reused
    assert dicom.ingest_once(src, out, key_path=key, rules=IngestRules(gap_factor=2)).reused
    # a new series in the export: ingested again, and it is found
    write_series(src / "b", Series(ramp((6, 5, 3)), axial_affine(), identity=dict(OTHER_IDENTITY)))
    grown = dicom.ingest_once(src, out, key_path=key, rules=IngestRules(gap_factor=2))
    assert not grown.reused
    assert len(grown.images) == 2
    rules = IngestRules(gap_factor=2)
    # an image torn after the ingest (its marker no longer matches): ingested again
    image = grown.images[0]
    image.write_bytes(image.read_bytes()[:50])
    redo = dicom.ingest_once(src, out, key_path=key, rules=rules)
    assert not redo.reused
    assert load_image(image).data.shape == (6, 5, 3)
    # an ingest killed before its last marker: not taken as done
    (out / ("ingest.csv" + ".done.json")).unlink()
    assert not dicom.ingest_once(src, out, key_path=key, rules=rules).reused
    # the key deleted: ingested again, so that the key maps every pseudonym again
    key.unlink()
    assert not dicom.ingest_once(src, out, key_path=key, rules=rules).reused
    assert len(pd.read_csv(key)) == 2
    # another secret: refused into this folder (issue 16); another folder gets other pseudonyms
    monkeypatch.setenv(dicom.SECRET_ENV, "another-secret")
    with pytest.raises(ConfigError, match="ingested with another pseudonym secret"):
        dicom.ingest_once(src, out, key_path=key, rules=rules)
    other = dicom.ingest_once(src, out.with_name("nifti2"), key_path=key, rules=rules)
    assert not other.reused
    assert {p.name for p in other.images}.isdisjoint({p.name for p in grown.images})


def test_fingerprint_sees_added_grown_and_renamed_files(tmp_path):
    folder = tmp_path / "export"
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "IM1").write_bytes(b"abc")
    digest, n = dicom.dicom_fingerprint(folder)
    assert n == 1
    assert dicom.dicom_fingerprint(folder) == (digest, 1)  # stable
    (folder / "a" / "IM1").write_bytes(b"abcd")
    grown = dicom.dicom_fingerprint(folder)[0]
    assert grown != digest
    (folder / "a" / "IM1").rename(folder / "a" / "IM2")
    assert dicom.dicom_fingerprint(folder)[0] not in (digest, grown)
    (folder / "b").mkdir()
    (folder / "b" / "IM1").write_bytes(b"")
    assert dicom.dicom_fingerprint(folder)[1] == 2


def _ingest_study(root: Path, rules: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(
        Path(__file__).parents[1] / "data" / "example" / "labels.json", root / "labels.json"
    )
    (root / "model.zip").write_bytes(b"stand-in")
    doc = {
        "study": "dicomstudy",
        "labels": "labels.json",
        "model": "model.zip",
        "output": "out",
        "ingest": {"dicom": "../export", "key": "../private/key.csv", "rules": rules or {}},
    }
    path = root / "study.yml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_cli_ingest_from_the_study_file(tmp_path, secret, capsys, caplog):
    write_series(tmp_path / "export" / "a", Series(ramp((6, 5, 3)), axial_affine()))
    write_series(
        tmp_path / "export" / "b",
        Series(ramp((6, 5, 3)), axial_affine(), description="T2 STIR", series_number=5),
    )
    study = _ingest_study(tmp_path / "study")
    with caplog.at_level(logging.INFO):
        assert main(["ingest", "--study", str(study)]) == 1  # the STIR series is refused
    out = tmp_path / "study" / "out" / "ingested"
    assert sorted(ingest_table(out)["status"]) == ["refused", "written"]
    assert "1 written, 1 refused" in caplog.text
    key = pd.read_csv(tmp_path / "private" / "key.csv", dtype=str)
    written = ingest_table(out).query("status == 'written'")
    assert len(key) == 1  # the refused series is not keyed
    assert key.loc[0, "patient_id"] == IDENTITY["PatientID"]
    assert key.loc[0, "pseudonym"] in written["image"].iloc[0]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["ingest", "--study", str(study)]) == 1  # same outcome, nothing redone
    assert "reused" in caplog.text

    # the rules come from the study file
    allowed = _ingest_study(tmp_path / "study", {"allow_fat_suppressed": True})
    assert main(["ingest", "--study", str(allowed)]) == 0
    assert sorted(ingest_table(out)["status"]) == ["written", "written"]

    capsys.readouterr()
    assert main(["ingest", "--study", str(study), "--out", str(tmp_path / "x")]) == 2
    assert "esma ingest: error: --study takes" in capsys.readouterr().err
    assert main(["ingest"]) == 2
    assert "give DICOM_DIR and --out DIR, or --study" in capsys.readouterr().err
    (tmp_path / "plain.yml").write_text("study: p\nimages: x/*.nii.gz\nlabels: l.json\n")
    assert main(["ingest", "--study", str(tmp_path / "plain.yml")]) == 2


def test_study_without_a_usable_series_stops_before_any_run(tmp_path, secret, capsys, monkeypatch):
    """Nothing written by the ingest: esma run stops with exit code 2 and no run folder; a
    notebook opened on a study not ingested yet says what to run."""
    from helpers import runs

    root = logging.getLogger()  # open_study adds a notebook log handler: keep it in this test
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    sagittal = LPS @ np.diag([0.8, 0.8, 4, 1.0])[[1, 2, 0, 3]]
    write_series(tmp_path / "export" / "sag", Series(ramp((8, 6, 4)), sagittal))
    study = _ingest_study(tmp_path / "study")
    with pytest.raises(ConfigError, match="has not been ingested yet"):
        runs.open_study(study)
    assert main(["run", "--quiet", str(study)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the ingest's log lines
    assert err.startswith("esma run: error: ")
    assert err.endswith(
        "ingest.csv: no image to analyse: 1 DICOM series of 1 subject: 0 written, 0 refused, "
        "1 skipped (see its issues column)"
    )
    out = tmp_path / "study" / "out"
    assert sorted(p.name for p in out.iterdir()) == ["ingested"]  # no run folder


# ------------------------------------------------------- end to end: esma run from DICOM
THIRD_IDENTITY = {
    "PatientName": "POE^EDGARINE",
    "PatientID": "PID-246810",
    "PatientBirthDate": "19390119",
    "AccessionNumber": "ACC135791",
    "InstitutionName": "Fake County Clinic",
    "ReferringPhysicianName": "HOUSE^GREGORY",
    "StudyDate": "20210305",
}


@pytest.mark.e2e
def test_run_study_from_dicom_end_to_end_leaks_no_identity(tmp_path, monkeypatch, caplog, capsys):
    """``esma run`` of a study whose images come from ``ingest:``: the export has three
    patients (in folders named after them), one with a good, a fat-suppressed and a sagittal
    series, one with a good series, one with a sagittal series only.  The run ingests, measures
    the two good scans, lists the refused series and the patient without an image in
    failures.csv and index.html, and a second run reuses the ingest.  No identity in any byte
    the toolkit wrote (runs, work folder, ingested NIfTI decompressed), nor in its log."""
    from helpers import runner, synthetic

    monkeypatch.setenv(dicom.SECRET_ENV, "e2e-secret")
    phantoms = synthetic.make_cohort(
        2, tmp_path / "phantoms", seed=3, template="small", orientations=("LPS",)
    )
    export, study_dir = tmp_path / "export", tmp_path / "study"
    identities = [IDENTITY, OTHER_IDENTITY]
    study_uids = [generate_uid() for _ in range(3)]
    subjects = []
    for i, row in enumerate(phantoms.itertuples(index=False)):
        img = nib.load(row.image)
        data = np.asarray(img.dataobj, dtype=np.float64)
        folder = export / f"{identities[i]['PatientName'].replace('^', '_')}_{i}"
        write_series(
            folder / "t2",
            Series(data, img.affine, identity=dict(identities[i]), study_uid=study_uids[i]),
        )
        subject = dicom.pseudonym(identities[i]["PatientID"], b"e2e-secret")
        subjects.append(subject)
        mask = nib.load(row.mask)
        (study_dir / "masks").mkdir(parents=True, exist_ok=True)
        nib.save(
            nib.Nifti1Image(np.asarray(mask.dataobj), img.affine),
            study_dir / "masks" / f"{subject}_dseg.nii.gz",
        )
        (study_dir / "levels").mkdir(exist_ok=True)
        shutil.copyfile(row.levels, study_dir / "levels" / f"{subject}.csv")
    sagittal = LPS @ np.diag([0.8, 0.8, 4, 1.0])[[1, 2, 0, 3]]
    write_series(
        export / "DOE_JANE_0" / "fs",
        Series(
            ramp((8, 6, 4)),
            axial_affine(),
            description="T2 TSE FS TRA",
            study_uid=study_uids[0],
            series_number=4,
        ),
    )
    write_series(
        export / "DOE_JANE_0" / "sag",
        Series(
            ramp((8, 6, 4)),
            sagittal,
            description="T2 SAG",
            study_uid=study_uids[0],
            series_number=2,
        ),
    )
    write_series(
        export / "POE_EDGARINE_2",
        Series(ramp((8, 6, 4)), sagittal, identity=dict(THIRD_IDENTITY), study_uid=study_uids[2]),
    )
    lost = dicom.pseudonym(THIRD_IDENTITY["PatientID"], b"e2e-secret")
    shutil.copyfile(phantoms["labels"].iloc[0], study_dir / "labels.json")
    doc = {
        "study": "fromdicom",
        "labels": "labels.json",
        "masks": "masks/{subject}_dseg.nii.gz",
        "levels": "levels/{subject}.csv",
        "metrics": {"bias_correction": True},
        "executor": {"kind": "sequential"},
        "output": "out",
        "ingest": {"dicom": "../export", "key": "../private/key.csv"},
    }
    study = study_dir / "study.yml"
    study.write_text(yaml.safe_dump(doc))

    with caplog.at_level(logging.INFO):
        first = runner.run_study(study, notebooks=["01_segment", "03_metrics"], progress=False)
        ingested = study_dir / "out" / "ingested"
        images_before = _mtimes(ingested)
        second = runner.run_study(study, notebooks=["01_segment"], progress=False)
    assert first.exit_code == 1  # finished, with failures
    run = first.run_dir
    metrics = pd.read_csv(run / "metrics.csv")
    assert sorted(metrics["subject"].unique()) == sorted(subjects)
    failures = pd.read_csv(run / "failures.csv", dtype=str, keep_default_na=False)
    assert list(failures["stage"]) == ["ingest", "ingest"]
    by_subject = dict(zip(failures["subject"], failures["error"], strict=True))
    assert set(by_subject) == {subjects[0], lost}
    assert (
        "refused (another series of this subject was used): fat_suppressed"
        in by_subject[subjects[0]]
    )
    assert by_subject[lost].startswith("no axial T2 series (series 1: non_axial")
    excluded = pd.read_csv(run / "excluded.csv", dtype=str, keep_default_na=False)
    assert list(excluded["subject"]) == [lost]  # the refused series' subject is analysed
    index = (run / "index.html").read_text(encoding="utf-8")
    assert "DICOM ingest" in index
    assert "5 DICOM series of 3 subjects: 2 written, 1 refused, 2 skipped" in index
    assert lost in index
    stages = json.loads((run / "stages" / "ingest.json").read_text())
    assert (stages["n_computed"], stages["n_failed"]) == (2, 1)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["n_subjects"] == 2
    assert "DICOM ingest table" in {c["role"] for c in manifest["checksums"]}

    # the second run reuses the ingest: nothing in the ingest folder rewritten
    assert json.loads((second.run_dir / "stages" / "ingest.json").read_text())["n_reused"] == 2
    assert _mtimes(ingested) == images_before
    assert second.exit_code == 1  # the same failures, reported again

    # identity: every byte esma wrote (and its log) is clean; the key maps back
    outputs = all_output_bytes(study_dir / "out")
    assert sum(p.suffix == ".html" for p in outputs) >= 3
    assert sum(p.name.endswith(".ipynb") for p in outputs) >= 3
    assert sum(p.name.endswith("_T2w.nii.gz|decompressed") for p in outputs) == 2
    captured = capsys.readouterr()
    outputs[Path("<log>")] = caplog.text.encode()
    outputs[Path("<console>")] = (captured.out + captured.err).encode()
    needles = identity_strings() + study_uids + list(THIRD_IDENTITY.values()) + ["EDGARINE"]
    for path, content in outputs.items():
        lowered = content.lower()
        for needle in needles:
            assert needle.lower().encode() not in lowered, f"{needle!r} leaked into {path}"
    key = pd.read_csv(tmp_path / "private" / "key.csv", dtype=str)
    assert set(key["patient_id"]) == {IDENTITY["PatientID"], OTHER_IDENTITY["PatientID"]}
