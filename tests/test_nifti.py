"""NIfTI I/O and geometry: bad inputs give clear errors naming the file; slice axis and voxel
area come from the affine whatever the storage order."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations as nio

from helpers.errors import GeometryMismatchError, InputFileError
from helpers.nifti import (
    Volume,
    check_same_grid,
    load_image,
    load_mask,
    save_like,
    slice_axis,
    subject_from_filename,
    voxel_area_mm2,
)

ZOOMS = (0.9, 0.8, 4.4)


def _lps_affine(zooms=ZOOMS) -> np.ndarray:
    aff = np.diag([-zooms[0], -zooms[1], zooms[2], 1.0])
    aff[:3, 3] = (100.0, 80.0, -40.0)
    return aff


def _image(shape=(12, 10, 5), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 500, shape).astype(np.float32)


def _save(path, data, affine=None, *, qform=True, sform=True):
    affine = _lps_affine() if affine is None else affine
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine if qform else None, code=1 if qform else 0)
    img.set_sform(affine if sform else None, code=1 if sform else 0)
    nib.save(img, path)
    return path


def _reorient(data, affine, codes):
    transform = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(codes))
    return nio.apply_orientation(data, transform), affine @ nio.inv_ornt_aff(transform, data.shape)


# --------------------------------------------------------------------------------------------
# Reading good files
# --------------------------------------------------------------------------------------------


def test_load_image_and_mask_of_the_example(example_dir):
    img = load_image(example_dir / "sub-0001_T1w.nii.gz")
    mask = load_mask(example_dir / "sub-0001_T1w_dseg.nii.gz")
    assert img.data.dtype == np.float32
    assert mask.data.dtype == np.int16
    assert img.data.shape == mask.data.shape == (256, 208, 20)
    assert img.axcodes == ("L", "P", "S")
    assert img.zooms_mm == pytest.approx((0.9375, 0.9375, 4.4), abs=2e-3)
    # qform only on the image, sform only on the mask: same grid all the same
    check_same_grid(img, mask)
    assert set(np.unique(mask.data)) == set(range(9))
    raw = np.asarray(nib.load(example_dir / "sub-0001_T1w.nii.gz").dataobj)
    assert np.array_equal(img.data, raw.astype(np.float32))


def test_load_image_applies_scaling_and_takes_qform_or_sform(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    img = nib.Nifti1Image(data, _lps_affine())
    img.header.set_slope_inter(2.0, 1.0)
    nib.save(img, tmp_path / "scaled.nii.gz")
    vol = load_image(tmp_path / "scaled.nii.gz")
    assert np.array_equal(vol.data, data * 2.0 + 1.0)
    q = load_image(_save(tmp_path / "q.nii.gz", _image(), sform=False))
    s = load_image(_save(tmp_path / "s.nii.gz", _image(), qform=False))
    assert np.allclose(q.affine, _lps_affine(), atol=1e-5)
    assert np.allclose(s.affine, _lps_affine(), atol=1e-5)


def test_single_volume_4d_is_read_as_3d(tmp_path):
    vol = load_image(_save(tmp_path / "one.nii.gz", _image((6, 5, 4, 1))))
    assert vol.data.shape == (6, 5, 4)


# --------------------------------------------------------------------------------------------
# Bad inputs: each a clear error naming the file
# --------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "absent_T2w.nii.gz"
    with pytest.raises(InputFileError, match="file not found") as err:
        load_image(path)
    assert str(path) in str(err.value)
    with pytest.raises(InputFileError, match="file not found"):
        load_mask(path)


def test_truncated_gz(tmp_path):
    path = _save(tmp_path / "full.nii.gz", _image((40, 40, 10)))
    cut = tmp_path / "cut_T2w.nii.gz"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputFileError, match=r"truncated|unreadable|not a readable") as err:
        load_image(cut)
    assert "cut_T2w.nii.gz" in str(err.value)
    with pytest.raises(InputFileError, match=r"truncated|unreadable|not a readable"):
        load_mask(cut)


def test_truncated_uncompressed_and_garbage(tmp_path):
    path = _save(tmp_path / "full.nii", _image((20, 20, 10)))
    cut = tmp_path / "cut.nii"
    cut.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(InputFileError, match=r"cut\.nii"):
        load_image(cut)
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(gzip.compress(b"this is not nifti" * 10))
    with pytest.raises(InputFileError, match=r"junk\.nii\.gz"):
        load_image(junk)
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    with pytest.raises(InputFileError, match=r"empty\.nii\.gz"):
        load_image(empty)


@pytest.mark.parametrize("shape", [(10, 10), (6, 5, 4, 2), (6, 5, 4, 1, 3)])
def test_not_3d(tmp_path, shape):
    path = _save(tmp_path / "bad.nii.gz", _image(shape))
    with pytest.raises(InputFileError, match=r"expected a 3-D volume, got \d-D") as err:
        load_image(path)
    assert "bad.nii.gz" in str(err.value)
    with pytest.raises(InputFileError, match="expected a 3-D volume"):
        load_mask(path)


def test_nan_and_inf_intensities(tmp_path):
    data = _image()
    data[1, 2, 3] = np.nan
    data[2, 2, 2] = np.inf
    with pytest.raises(InputFileError, match="2 voxels are NaN or infinite") as err:
        load_image(_save(tmp_path / "nan.nii.gz", data))
    assert "nan.nii.gz" in str(err.value)


def test_constant_image(tmp_path):
    with pytest.raises(InputFileError, match="constant"):
        load_image(_save(tmp_path / "flat.nii.gz", np.full((5, 5, 5), 7.0, np.float32)))


def test_nan_affine(tmp_path):
    path = _save(tmp_path / "ok.nii.gz", _image())
    img = nib.load(path)
    hdr = img.header.copy()
    hdr["srow_x"] = [np.nan, 0, 0, 0]
    hdr.set_qform(None, code=0)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), None, hdr), tmp_path / "nanaff.nii.gz")
    with pytest.raises(InputFileError, match="affine"):
        load_image(tmp_path / "nanaff.nii.gz")


def test_singular_affine(tmp_path):
    path = _save(tmp_path / "ok.nii.gz", _image())
    img = nib.load(path)
    hdr = img.header.copy()
    for row in ("srow_x", "srow_y", "srow_z"):
        vals = hdr[row].copy()
        vals[2] = 0.0  # slice direction collapsed
        hdr[row] = vals
    hdr.set_qform(None, code=0)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), None, hdr), tmp_path / "flat_aff.nii.gz")
    with pytest.raises(InputFileError, match="singular") as err:
        load_image(tmp_path / "flat_aff.nii.gz")
    assert "flat_aff.nii.gz" in str(err.value)


def test_mask_value_checks(tmp_path):
    frac = np.zeros((5, 5, 5), np.float32)
    frac[1, 1, 1] = 0.5
    with pytest.raises(InputFileError, match="non-integer"):
        load_mask(_save(tmp_path / "frac.nii.gz", frac))
    neg = np.zeros((5, 5, 5), np.int16)
    neg[0, 0, 0] = -2
    with pytest.raises(InputFileError, match="negative label -2"):
        load_mask(_save(tmp_path / "neg.nii.gz", neg))
    nan = np.zeros((5, 5, 5), np.float32)
    nan[0, 0, 0] = np.nan
    with pytest.raises(InputFileError, match="NaN"):
        load_mask(_save(tmp_path / "nanmask.nii.gz", nan))
    big = np.zeros((5, 5, 5), np.int32)
    big[0, 0, 0] = 40000
    with pytest.raises(InputFileError, match="40000"):
        load_mask(_save(tmp_path / "big.nii.gz", big))
    ok = np.zeros((5, 5, 5), np.float32)
    ok[2, 2, 2] = 3.0
    vol = load_mask(_save(tmp_path / "floatmask.nii.gz", ok))
    assert vol.data.dtype == np.int16
    assert vol.data[2, 2, 2] == 3


# --------------------------------------------------------------------------------------------
# Grid checks
# --------------------------------------------------------------------------------------------


def test_grid_mismatch_shape_and_affine(tmp_path):
    ref = Volume(_image(), _lps_affine(), tmp_path / "img_T2w.nii.gz")
    other = Volume(np.zeros((12, 10, 6), np.int16), _lps_affine(), tmp_path / "mask.nii.gz")
    with pytest.raises(GeometryMismatchError, match=r"shape \(12, 10, 6\) differs") as err:
        check_same_grid(ref, other)
    assert "mask.nii.gz" in str(err.value)
    moved = _lps_affine()
    moved[0, 3] += 0.5
    with pytest.raises(GeometryMismatchError, match=r"affine differs .* by up to 0\.5 mm"):
        check_same_grid(ref, Volume(np.zeros((12, 10, 5)), moved, tmp_path / "m.nii.gz"))
    tiny = _lps_affine()
    tiny[0, 3] += 5e-4  # float32 header round-off: still the same grid
    check_same_grid(ref, Volume(np.zeros((12, 10, 5)), tiny))
    flipped = _lps_affine() @ np.diag([-1.0, 1.0, 1.0, 1.0])
    with pytest.raises(GeometryMismatchError):
        check_same_grid(ref, Volume(np.zeros((12, 10, 5)), flipped))
    # is a GeometryMismatchError also an InputFileError / ValueError for generic callers
    assert issubclass(GeometryMismatchError, InputFileError)
    assert issubclass(GeometryMismatchError, ValueError)


def test_grid_mismatch_from_files(tmp_path):
    img = load_image(_save(tmp_path / "a_T2w.nii.gz", _image()))
    mask = load_mask(_save(tmp_path / "a_dseg.nii.gz", np.zeros((12, 10, 5), np.uint8),
                           _lps_affine((0.9, 0.8, 5.0))))
    with pytest.raises(GeometryMismatchError, match=r"a_dseg\.nii\.gz"):
        check_same_grid(img, mask)


# --------------------------------------------------------------------------------------------
# Slice axis and voxel area from the affine
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "codes",
    [("L", "P", "S"), ("R", "A", "S"), ("L", "A", "S"), ("R", "A", "I"), ("P", "I", "R"),
     ("S", "L", "P"), ("A", "S", "L")],
)
def test_slice_axis_and_area_in_any_storage_order(codes):
    data = np.zeros((12, 10, 5))
    stored, aff = _reorient(data, _lps_affine(), codes)
    assert nib.aff2axcodes(aff) == codes
    ax = slice_axis(aff)
    assert codes[ax] in "SI"
    assert stored.shape[ax] == 5
    assert voxel_area_mm2(aff, ax) == pytest.approx(ZOOMS[0] * ZOOMS[1])
    vol = Volume(stored, aff)
    assert sorted(vol.zooms_mm) == pytest.approx(sorted(ZOOMS))
    assert vol.axcodes == codes


def test_slice_axis_and_area_oblique():
    theta = np.deg2rad(20.0)
    rot_x = np.array([[1, 0, 0], [0, np.cos(theta), -np.sin(theta)],
                      [0, np.sin(theta), np.cos(theta)]])
    aff = np.eye(4)
    aff[:3, :3] = rot_x @ np.diag([0.7, 0.7, 3.0])  # axial slices tilted by 20 degrees
    assert slice_axis(aff) == 2
    assert voxel_area_mm2(aff, 2) == pytest.approx(0.49)
    # sheared in-plane axes: area is the parallelogram, not the product of lengths
    sheared = np.diag([1.0, 1.0, 4.0, 1.0])
    sheared[0, 1] = 1.0  # second axis = (1, 1, 0)
    assert voxel_area_mm2(sheared, 2) == pytest.approx(1.0)
    # the example's own (slightly oblique) affine
    ex = np.array([[-0.9375, -4.3e-4, -2.4e-2, 114.1], [-4.3e-4, -0.9246, 0.7272, 35.0],
                   [-5.2e-3, 0.1549, 4.3394, -59.5], [0, 0, 0, 1.0]])
    assert slice_axis(ex) == 2
    expected = np.linalg.norm(np.cross(ex[:3, 0], ex[:3, 1]))
    assert voxel_area_mm2(ex, 2) == pytest.approx(expected)
    assert voxel_area_mm2(ex, 2) == pytest.approx(0.9375 * 0.9375, rel=0.02)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def test_save_like_round_trip_and_types(tmp_path):
    ref = Volume(_image(), _lps_affine())
    labels = np.zeros((12, 10, 5), np.int64)
    labels[2:4, 2:4, 1] = 7
    out = save_like(labels, ref, tmp_path / "sub" / "m_dseg.nii.gz")
    back = nib.load(out)
    assert back.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(back.dataobj), labels)
    assert np.allclose(back.affine, ref.affine)
    assert int(back.header["qform_code"]) == 1
    assert int(back.header["sform_code"]) == 1
    assert not list((tmp_path / "sub").glob("*.tmp*"))
    # values beyond uint8/int16 keep their values
    for values, dtype in (([0, 300], np.int16), ([0, 40000], np.uint16), ([-5, 3], np.int16),
                          ([0, 70000], np.int32)):
        arr = np.zeros((12, 10, 5), np.int64)
        arr[0, 0, 0], arr[1, 1, 1] = values
        back = nib.load(save_like(arr, ref, tmp_path / f"v{values[1]}.nii.gz"))
        assert back.get_data_dtype() == dtype
        assert np.array_equal(np.asarray(back.dataobj), arr)
    floats = save_like(_image(), nib.Nifti1Image(np.zeros((12, 10, 5)), ref.affine),
                       tmp_path / "f.nii.gz")
    assert nib.load(floats).get_data_dtype() == np.float32


def test_subject_from_filename():
    assert subject_from_filename("/d/sub-0001_T2w.nii.gz") == "sub-0001"
    assert subject_from_filename("case7_0000.nii.gz") == "case7"
    assert subject_from_filename("case7_T2w_0000.nii") == "case7"
    assert subject_from_filename("plain.nii") == "plain"
