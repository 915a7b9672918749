"""DICOM ingest: geometry against a volume the test writes as DICOM itself, detection of unusable
series, pseudonyms, and a byte-level scan of every output for the fake identity."""

from __future__ import annotations

import gzip
import logging
import os
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
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
        ("T2_TSE_TRA_FS", {}, "keyword FS in the series name"),
        ("AX T2 FATSAT", {}, "keyword FATSAT in the series name"),
        ("t2_tse_tra_spair", {}, "keyword SPAIR in the series name"),
        ("AX T2 FRFSE", {"ScanOptions": ["FS", "PFP"]}, "FS in ScanOptions"),
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
    assert f"fat_suppressed: {expected}" in row["issues"]
    assert not list((tmp_path / "out").glob("*.nii.gz"))


def test_fat_suppressed_series_written_when_allowed(tmp_path, secret):
    rules = IngestRules(allow_fat_suppressed=True)
    row = run_one(tmp_path, Series(ramp((6, 5, 3)), axial_affine(), description="T2 FS"), rules)
    assert row["status"] == "written"
    assert "fat_suppressed: keyword FS" in row["issues"]


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
    assert "not_t2: named another contrast (T1)" in table.loc[0, "issues"]
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
