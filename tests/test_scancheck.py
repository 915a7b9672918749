"""Image-only checks before segmentation (helpers.scancheck)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from helpers.errors import ConfigError, InputFileError
from helpers.nifti import Volume, load_image
from helpers.scancheck import ScanCheckSettings, check_scan, scan_findings, stack_plane
from helpers.synthetic import make_phantom, reorient
from helpers.trainset import EXAMPLE_DIR

EXAMPLE = EXAMPLE_DIR / "sub-0001_T1w.nii.gz"


def _rot_x(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    r = np.eye(4)
    r[1:3, 1:3] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return r


@pytest.mark.parametrize(("zooms", "plane"), [
    ((0.9, 0.9, 4.0), "axial"), ((4.0, 0.9, 0.9), "sagittal"), ((0.9, 4.0, 0.9), "coronal"),
])
def test_stack_plane_names_the_plane_of_the_thick_axis(zooms, plane) -> None:
    assert stack_plane(np.diag([*zooms, 1.0]))[0] == plane


@pytest.mark.parametrize("tilt", [0.0, 12.0, 29.0, 45.0])
def test_stack_plane_measures_the_tilt(tilt) -> None:
    aff = _rot_x(tilt) @ np.diag([0.9, 0.9, 4.0, 1.0])
    plane, got = stack_plane(aff)
    assert plane == "axial"
    assert got == pytest.approx(tilt, abs=1e-6)


def test_isotropic_volume_reads_along_the_axis_closest_to_superior() -> None:
    # 1 mm isotropic stored with the S-I axis first: readable as axial
    aff = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1.0]])
    assert stack_plane(aff) == ("axial", 0.0)


@pytest.fixture(scope="module")
def example() -> Volume:
    return load_image(EXAMPLE)


def test_real_example_passes_in_every_storage_order(example) -> None:
    widths = []
    for codes in ("LPS", "RAS", "PLS", "ARI"):
        img = reorient(nib.Nifti1Image(example.data, example.affine), codes)
        f = check_scan(Volume(np.asarray(img.dataobj), img.affine))
        assert f.plane == "axial"
        assert f.tilt_deg == pytest.approx(9.5, abs=0.1)  # the example's stack is tilted
        assert f.body_cut_by_fov  # a tight crop of the back
        widths.append(f.body_width_mm)
    assert max(widths) - min(widths) < 1e-6


def test_whole_cross_sections_pass() -> None:
    """Phantoms on a 420 mm field of view: the whole body with air around it."""
    from helpers.synthetic import Template

    tpl = Template("wide", (168, 168, 6), (420.0, 420.0, 88.0))
    for seed, orientation in ((1, "LPS"), (2, "PRS")):
        ph = make_phantom("p", seed=seed, template=tpl, orientation=orientation)
        f = check_scan(Volume(np.asarray(ph.image.dataobj), ph.image.affine))
        assert not f.body_cut_by_fov
        assert 250 <= f.body_width_mm <= 420


def _suppress(data: np.ndarray, fat: np.ndarray, factor: float) -> np.ndarray:
    """Simulated fat suppression: fat's signal times ``factor`` (partial volume kept)."""
    return data * (1 - (1 - factor) * fat)


def test_sagittal_and_too_oblique_stacks_are_refused(example, tmp_path) -> None:
    # the example's voxels read as a sagittal stack: its thick axis along left-right
    sag = np.array([[0, 0, 4.4, 0], [0.9375, 0, 0, 0], [0, 0.9375, 0, 0], [0, 0, 0, 1]])
    path = tmp_path / "sag.nii.gz"
    nib.save(nib.Nifti1Image(example.data, sag), path)
    with pytest.raises(InputFileError, match=r"sag\.nii\.gz: sagittal stack"):
        check_scan(path)
    cor = np.array([[0.9375, 0, 0, 0], [0, 0, 4.4, 0], [0, 0.9375, 0, 0], [0, 0, 0, 1]])
    with pytest.raises(InputFileError, match="coronal stack"):
        check_scan(Volume(example.data, cor, path))
    tilted = _rot_x(40.0) @ example.affine
    with pytest.raises(InputFileError, match="too oblique"):
        check_scan(Volume(example.data, tilted, path))
    # the limit is a setting
    f = check_scan(Volume(example.data, tilted, path), ScanCheckSettings(max_tilt_deg=60))
    assert f.tilt_deg > 30


def test_a_narrow_body_is_not_a_lumbar_cross_section() -> None:
    """A head-sized body (150 mm) with a fat rim, air around it: refused as not lumbar."""
    n, sp = 256, 1.0
    yy, xx = np.mgrid[:n, :n]
    r = np.hypot(xx - n / 2, yy - n / 2) * sp
    rng = np.random.default_rng(0)
    sl = np.where(r < 75, 300.0, 0.0) + np.where((r >= 65) & (r < 75), 500.0, 0.0)
    data = np.repeat(sl[:, :, None], 10, axis=2) + np.abs(rng.normal(0, 5, (n, n, 10)))
    aff = np.diag([-sp, -sp, 4.0, 1.0])
    f = scan_findings(Volume(data.astype(np.float32), aff))
    assert f.body_width_mm == pytest.approx(150, abs=6)
    assert not f.body_cut_by_fov
    with pytest.raises(InputFileError, match="not the lumbar region"):
        check_scan(Volume(data.astype(np.float32), aff))
    # switched off: passes
    check_scan(Volume(data.astype(np.float32), aff), ScanCheckSettings(checks=("plane",)))


def test_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="unknown scan checks"):
        ScanCheckSettings(checks=("plane", "lungs"))
    with pytest.raises(ConfigError, match="max_tilt_deg"):
        ScanCheckSettings(max_tilt_deg=95)


def test_segment_refuses_unsegmentable_scans_and_writes_no_mask(example, tmp_path) -> None:
    """esma segment with the demo model: a fat-suppressed phantom is refused after the network
    ran (fat around its muscles is not bright), a sagittal stack before it; no mask written."""
    from helpers.segment import SegmentSettings, segment_cohort

    demo = EXAMPLE_DIR.parent / "demo_model" / "esma_demo_model.zip"
    ph = make_phantom("p", seed=2)
    data = np.asarray(ph.image.dataobj, dtype=np.float32)
    images = tmp_path / "images"
    images.mkdir()
    nib.save(ph.image, images / "ok-01_T2w.nii.gz")
    nib.save(nib.Nifti1Image(_suppress(data, ph.fat_fraction, 0.15), ph.image.affine),
             images / "fs-01_T2w.nii.gz")
    sag = np.array([[0, 0, 4.4, 0], [0.9375, 0, 0, 0], [0, 0.9375, 0, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(example.data, sag), images / "sag-01_T2w.nii.gz")
    # a Dixon water + fat sum is segmented (fat not the brightest tissue, but bright)
    from helpers.synthetic_dixon import make_dixon_phantom

    dp = make_dixon_phantom("dx-01", seed=2)
    dixon_sum = (np.asarray(dp.water.dataobj, dtype=np.float32)
                 + np.asarray(dp.fat.dataobj, dtype=np.float32))
    nib.save(nib.Nifti1Image(dixon_sum, dp.water.affine), images / "dx-01_T2w.nii.gz")
    settings = SegmentSettings(device="cpu", fast=True, num_threads=1)
    out = tmp_path / "masks"
    table = segment_cohort(sorted(images.iterdir()), demo, out, settings, progress=False)
    status = dict(zip(table["subject"], table["status"], strict=True))
    errors = dict(zip(table["subject"], table["error"], strict=True))
    assert status == {"dx-01": "done", "fs-01": "failed", "ok-01": "done", "sag-01": "failed"}
    assert "fs-01_T2w.nii.gz" in errors["fs-01"]
    assert "fat-suppressed" in errors["fs-01"]
    assert "sagittal stack" in errors["sag-01"]
    assert (out / "ok-01.nii.gz").is_file()
    assert not (out / "fs-01.nii.gz").exists()
    assert not (out / "sag-01.nii.gz").exists()
    # the checks can be switched off: then it is segmented (into whatever the model makes of it)
    off = SegmentSettings(device="cpu", fast=True, num_threads=1, check_scan=False)
    again = segment_cohort([images / "sag-01_T2w.nii.gz"], demo, tmp_path / "m2", off,
                           progress=False)
    assert again["status"].tolist() == ["done"]
