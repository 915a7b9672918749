"""Tests of helpers.fat: noise model, tissue intensities, fat classification, N4."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from plain_reference import plain_border_connected
from scipy import ndimage as ndi
from scipy import stats

from helpers import arrays, fat, intensity, synthetic
from helpers.errors import InputFileError
from helpers.nifti import load_image, load_mask

AFFINE_1MM = np.diag([1.0, 1.0, 4.0, 1.0])


# ------------------------------------------------------------------------------ hand-built body
def _body_phantom(
    fat_value: float = 600.0,
    muscle_value: float = 50.0,
    noise_sd: float = 0.0,
    field: np.ndarray | None = None,
    seed: int = 0,
    n: int = 64,
    nz: int = 4,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disc of fat (the body) holding a square 'muscle' (left half label 2, right half 1).

    Returns image, label mask and the true fat fraction.  Array axis 0 runs to the patient's
    left (affine +1 mm along world x would be right, so the test affine flips it).
    """
    ii, jj = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    r = np.hypot(ii - n / 2 + 0.5, jj - n / 2 + 0.5)
    body = r < n * 0.42
    muscle = (np.abs(ii - n / 2 + 0.5) < n * 0.25) & (np.abs(jj - n / 2 + 0.5) < n * 0.12)
    frac = np.where(body, 1.0, 0.0)
    frac[muscle] = 0.0
    rng = np.random.default_rng(seed)
    # 10 % fat streak voxels in the muscle
    streak = muscle & (rng.random(muscle.shape) < 0.10)
    frac[streak] = 1.0
    signal = np.where(body, frac * fat_value + (1 - frac) * muscle_value, 0.0)
    img = np.repeat(signal[..., None], nz, axis=2).astype(np.float64)
    if field is not None:
        img = img * field
    if noise_sd > 0:
        re = img + rng.normal(0, noise_sd, img.shape)
        im = rng.normal(0, noise_sd, img.shape)
        img = np.hypot(re, im)
    labels = np.zeros(img.shape, dtype=np.int16)
    m3 = np.repeat(muscle[..., None], nz, axis=2)
    labels[m3 & (ii[..., None] < n / 2)] = 1
    labels[m3 & (ii[..., None] >= n / 2)] = 2
    return img.astype(np.float32), labels, np.repeat(frac[..., None], nz, axis=2)


# ------------------------------------------------------------------------------ noise model
def test_rice_mean_matches_monte_carlo():
    rng = np.random.default_rng(1)
    for nu, sd in [(0.0, 10.0), (20.0, 10.0), (50.0, 24.0), (600.0, 24.0)]:
        mag = np.hypot(nu + rng.normal(0, sd, 400_000), rng.normal(0, sd, 400_000))
        assert float(fat.rice_mean(nu, sd)) == pytest.approx(mag.mean(), rel=2e-3)
    # scipy's Rice distribution agrees too (independent implementation)
    assert float(fat.rice_mean(30.0, 12.0)) == pytest.approx(
        stats.rice(b=30.0 / 12.0, scale=12.0).mean(), rel=1e-9
    )
    assert float(fat.rice_mean(42.0, 0.0)) == 42.0


def test_amplitude_from_mode_inverts_the_rice_mode():
    for nu, sd in [(50.0, 24.0), (10.0, 8.0), (300.0, 5.0)]:
        x = np.linspace(0.01, nu + 8 * sd, 200_001)
        mode = x[np.argmax(stats.rice(b=nu / sd, scale=sd).pdf(x))]
        assert fat.amplitude_from_mode(float(mode), sd) == pytest.approx(nu, rel=2e-3)
    assert fat.amplitude_from_mode(5.0, 10.0) == 0.0  # below the Rayleigh mode
    assert fat.amplitude_from_mode(55.0, 0.0) == 55.0


def test_noise_sd_from_background_and_fallbacks():
    img, lab, _ = _body_phantom(noise_sd=12.0, n=96)
    body = fat.body_mask(img, AFFINE_1MM, lab > 0)
    sd, source = fat.estimate_noise_sd(img, body)
    assert source == "background"
    assert sd == pytest.approx(12.0, rel=0.05)
    # a scanner that zeroes the background leaves only the muscle peak to go by
    zeroed = np.where(body, img, 0.0)
    sd2, source2 = fat.estimate_noise_sd(zeroed, body, muscle_values=zeroed[lab > 0])
    assert source2 == "muscle_peak"
    assert 6.0 < sd2 < 20.0
    assert fat.estimate_noise_sd(zeroed, body) == (0.0, "none")


# ------------------------------------------------------------------------------ body and fat
def test_body_mask_and_subcutaneous_band_geometry():
    img, lab, frac = _body_phantom(noise_sd=10.0, n=96)
    body = fat.body_mask(img, AFFINE_1MM, lab > 0)
    ii, jj = np.meshgrid(np.arange(96), np.arange(96), indexing="ij")
    truth = np.hypot(ii - 47.5, jj - 47.5) < 96 * 0.42
    iou = (body[..., 0] & truth).sum() / (body[..., 0] | truth).sum()
    assert iou > 0.9  # smoothing against noise widens the outline by about a voxel
    assert body[..., 0][truth].mean() > 0.995
    band = fat.subcutaneous_band(body, lab > 0, AFFINE_1MM, posterior_only=False)
    assert band.any()
    # only body voxels, all pure fat, none within 5 mm of the muscle
    assert not (band & ~body).any()
    assert (frac[band] == 1.0).mean() > 0.99
    depth_to_air = 96 * 0.42 - np.hypot(ii - 47.5, jj - 47.5)
    assert depth_to_air[band[..., 0]].max() <= 12.5
    assert depth_to_air[band[..., 0]].min() >= 0.0


def test_band_ignores_a_field_of_view_cut():
    """Where the body runs off the image edge there is no skin: no band there."""
    img, lab, _ = _body_phantom(noise_sd=5.0, n=96)
    cut = img[12:84]  # the disc now touches the left and right image borders
    body = fat.body_mask(cut, AFFINE_1MM, lab[12:84] > 0)
    band = fat.subcutaneous_band(body, lab[12:84] > 0, AFFINE_1MM, posterior_only=False)
    ii, jj = np.meshgrid(np.arange(12, 84), np.arange(96), indexing="ij")
    depth_to_skin = 96 * 0.42 - np.hypot(ii - 47.5, jj - 47.5)
    assert band.any()
    assert depth_to_skin[band[..., 0]].max() <= 12.5  # never measured from the image edge
    assert not band[0, 40:56].any()
    assert not band[-1, 40:56].any()


def test_tissue_intensities_recover_fat_and_lean_muscle():
    img, lab, _ = _body_phantom(noise_sd=10.0, n=96, fat_value=600.0, muscle_value=50.0)
    tis = fat.tissue_intensities(img, lab > 0, AFFINE_1MM, noise_sd=10.0)
    assert tis.fat == pytest.approx(600.0, rel=0.01)
    assert tis.muscle == pytest.approx(50.0, abs=1.5)
    assert tis.fat_source == "subcutaneous_band"


def test_tissue_intensities_scale_with_the_image():
    img, lab, _ = _body_phantom(noise_sd=10.0, n=96)
    a = fat.tissue_intensities(img, lab > 0, AFFINE_1MM, noise_sd=10.0)
    b = fat.tissue_intensities(img * 3.0, lab > 0, AFFINE_1MM, noise_sd=30.0)
    assert b.fat == pytest.approx(3 * a.fat, rel=1e-4)
    assert b.muscle == pytest.approx(3 * a.muscle, rel=1e-3)


def test_fat_suppressed_image_is_refused_naming_the_file():
    img, lab, _ = _body_phantom(noise_sd=3.0, n=96, fat_value=20.0, muscle_value=80.0)
    with pytest.raises(InputFileError, match=r"scan_T2w\.nii\.gz: fat darker than muscle"):
        fat.tissue_intensities(img, lab > 0, AFFINE_1MM, path="scan_T2w.nii.gz")


def test_no_fat_muscle_contrast_is_refused():
    img, lab, _ = _body_phantom(noise_sd=3.0, n=96, fat_value=100.0, muscle_value=80.0)
    with pytest.raises(InputFileError, match="too little fat/muscle contrast"):
        fat.tissue_intensities(img, lab > 0, AFFINE_1MM, path="x.nii.gz")


def test_empty_muscle_is_refused():
    img, _lab, _ = _body_phantom(n=64)
    with pytest.raises(InputFileError, match="no muscle voxels"):
        fat.tissue_intensities(img, np.zeros(img.shape, bool), AFFINE_1MM, path="x.nii.gz")


# ------------------------------------------------------------------------------ fat suppression
FAT_SUPPRESSED = r"fat not among the brightest tissues: fat-suppressed image\?"


def _skin_and_fluid(fat_value: float, fluid: float | None = 900.0) -> tuple[np.ndarray, np.ndarray]:
    """The disc phantom (noise-free) with a skin rim and a fluid pocket that keep their signal.

    Skin: body voxels within 2 mm of the air, 300.  Fluid: an 8 x 8 voxel pocket in front of the
    muscle (1.3 % of the body), ``fluid``.  Muscle 50 with 10 % streaks of fat.
    """
    img, lab, _ = _body_phantom(fat_value=fat_value, muscle_value=50.0, n=96, nz=2)
    body = img > 0
    depth = np.stack([ndi.distance_transform_edt(body[..., k]) for k in range(2)], axis=-1)
    img[body & (depth <= 2.0)] = 300.0
    if fluid is not None:
        assert not lab[44:52, 62:70].any()
        img[44:52, 62:70, :] = fluid
    return img, lab


def test_fat_to_bright_ratio_by_hand():
    """Median of the band without its skin rim / 99th percentile of the body, exactly."""
    img, lab = _skin_and_fluid(600.0)  # 64 fluid voxels per slice > 1 % of ~5000: p99 = 900
    tis = fat.tissue_intensities(img, lab > 0, AFFINE_1MM)
    assert tis.fat_to_bright == pytest.approx(600.0 / 900.0, rel=1e-9)
    assert tis.to_dict()["fat_to_bright"] == pytest.approx(2 / 3, rel=1e-9)
    assert tis.fat == pytest.approx(600.0)
    # without the fluid, fat is the brightest tissue
    img, lab = _skin_and_fluid(600.0, fluid=None)
    assert fat.tissue_intensities(img, lab > 0, AFFINE_1MM).fat_to_bright == pytest.approx(1.0)


@pytest.mark.parametrize("scale", [0.1, 0.3])
def test_fat_suppressed_with_bright_skin_is_refused(scale):
    """Suppressed fat (still brighter than lean muscle) under skin that keeps its signal.

    The band's bright class is the skin here, not fat: the check must look past the rim.
    """
    img, lab = _skin_and_fluid(600.0 * scale)
    body = fat.body_mask(img, AFFINE_1MM, lab > 0)
    band = fat.subcutaneous_band(body, lab > 0, AFFINE_1MM)
    assert np.percentile(img[band], 95) == 300.0  # bright skin in the band
    assert 600.0 * scale > 50.0  # fat not darker than muscle: the old check passed it
    with pytest.raises(InputFileError, match=r"scan_T2w\.nii\.gz: " + FAT_SUPPRESSED):
        fat.tissue_intensities(img, lab > 0, AFFINE_1MM, path="scan_T2w.nii.gz")


ALL_MUSCLES = [(m, s) for m in synthetic.MUSCLES for s in ("left", "right")]
#: Normal (not fat-suppressed) phantoms across the conditions the check must survive.
NORMAL_PHANTOMS = {
    "lps": {"seed": 3},
    "ras_bias+30_lean": {"seed": 4, "orientation": "RAS", "bias_lr": 0.3,
                         "fat_pct": {k: 0.5 for k in ALL_MUSCLES}},
    "pir_bias-30_fatty": {"seed": 5, "orientation": "PIR", "bias_lr": -0.3,
                          "fat_pct": {k: 40.0 for k in ALL_MUSCLES}},
    "las_snr6": {"seed": 6, "orientation": "LAS", "snr": 6.0, "bias_lr": -0.28},
}


@pytest.fixture(scope="module")
def small_phantoms() -> dict[str, synthetic.Phantom]:
    return {
        name: synthetic.make_phantom(template="small", shape=(48, 48, 4), **kw)
        for name, kw in NORMAL_PHANTOMS.items()
    }


def _arrays(ph: synthetic.Phantom) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.asarray(ph.image.dataobj, dtype=np.float32), np.asarray(ph.mask.dataobj) > 0,
            ph.image.affine)


@pytest.mark.parametrize("name", list(NORMAL_PHANTOMS))
def test_normal_phantoms_are_not_taken_for_fat_suppressed(small_phantoms, name):
    img, muscle, affine = _arrays(small_phantoms[name])
    tis = fat.tissue_intensities(img, muscle, affine, path="x.nii.gz")
    assert tis.fat_to_bright > 0.65  # the bar is 0.6
    assert 450 < tis.fat < 800  # pure fat 600, shaded by up to +-30 %


@pytest.mark.parametrize("name", ["lps", "pir_bias-30_fatty"])
@pytest.mark.parametrize("scale", [0.1, 0.3])
def test_fat_suppressed_phantoms_are_refused(small_phantoms, name, scale):
    """Every voxel scaled by (1 - (1 - scale) x true fat fraction): skin, fluid, bone unchanged."""
    ph = small_phantoms[name]
    img, muscle, affine = _arrays(ph)
    fs = img * (1 - (1 - scale) * ph.fat_fraction)
    with pytest.raises(InputFileError, match=r"fs_T2w\.nii\.gz: .*fat-suppressed image\?"):
        fat.tissue_intensities(fs, muscle, affine, path="fs_T2w.nii.gz")


@pytest.fixture(scope="module")
def example_arrays(example_dir) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple]:
    image = load_image(example_dir / "sub-0001_T1w.nii.gz")
    mask = load_mask(example_dir / "sub-0001_T1w_dseg.nii.gz")
    return np.asarray(image.data), np.asarray(mask.data) > 0, image.affine, image.zooms_mm


def test_real_example_is_not_taken_for_fat_suppressed(example_arrays):
    img, muscle, affine, _ = example_arrays
    tis = fat.tissue_intensities(img, muscle, affine, path="sub-0001_T1w.nii.gz")
    assert 0.7 < tis.fat_to_bright < 0.9
    assert 580 < tis.fat < 680  # its posterior subcutaneous fat: 600-650


@pytest.mark.parametrize("scale", [0.1, 0.3])
def test_real_example_with_suppressed_subcutaneous_fat_is_refused(example_arrays, scale):
    """The example's bright fat more than 10 mm from the muscles (the subcutaneous fat) scaled
    down; fat near and inside the muscles and everything darker keep their signal."""
    img, muscle, affine, zooms = example_arrays
    far = ndi.distance_transform_edt(~muscle, sampling=(zooms[0], zooms[1], 1e3)) > 10.0
    fs = np.where(far & (img > 300), img * scale, img).astype(np.float32)
    lean = fat.tissue_intensities(img, muscle, affine).muscle_mode
    assert np.median(fs[far & (img > 300)]) > 5 * lean  # still well above lean muscle
    with pytest.raises(InputFileError, match=r"sub-0001_T1w\.nii\.gz: " + FAT_SUPPRESSED):
        fat.tissue_intensities(fs, muscle, affine, path="sub-0001_T1w.nii.gz")


# ------------------------------------------------------------------------------ array shapes
def test_volumes_whose_last_axis_is_3_raise_no_rgb_warning():
    """scikit-image reads an array whose last axis has length 3 or 4 as RGB and warns."""
    from skimage.filters import threshold_otsu

    img, lab, _ = _body_phantom(noise_sd=5.0, n=64, nz=3)
    block = img[18:46, 26:38, :]  # inside the muscle square
    assert (lab[18:46, 26:38, :] > 0).all()
    assert block.shape[-1] == 3
    with pytest.warns(UserWarning, match="RGB"):  # the warning this test guards against
        threshold_otsu(block)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        body = fat.body_mask(img, AFFINE_1MM, lab > 0)
        tis = fat.tissue_intensities(img, lab > 0, AFFINE_1MM, body=body, noise_sd=5.0)
        for method in fat.FAT_METHODS:
            ref = fat.fit_reference(block, tis, method)
            flat = fat.fit_reference(block.ravel(), tis, method)
            assert ref.threshold == flat.threshold
            assert ref.n_voxels == block.size
            assert ref.fraction(block).shape == block.shape
    assert tis.fat == pytest.approx(600.0, rel=0.02)


# ------------------------------------------------------------------------------ classification
@pytest.fixture(scope="module")
def mixture() -> tuple[np.ndarray, fat.TissueIntensities]:
    """90 % lean (50 +- 8) and 10 % fat (600 +- 25) intensities; true fat share 10 %."""
    rng = np.random.default_rng(3)
    v = np.concatenate([rng.normal(50, 8, 45_000), rng.normal(600, 25, 5_000)])
    return rng.permutation(v), fat.TissueIntensities(50.0, 600.0, 600.0, 1000, "test")


@pytest.mark.parametrize("method", fat.FAT_METHODS)
def test_every_method_recovers_a_clear_mixture(method, mixture):
    values, tissues = mixture
    ref = fat.fit_reference(values, tissues, method)
    share = float(ref.fraction(values, clip=False).mean())
    assert share == pytest.approx(0.10, abs=0.005)
    if method == "unmix":
        assert ref.threshold is None
    else:
        assert 50 < ref.threshold < 600  # between the lean and fat means
        assert set(np.unique(ref.fraction(values))) <= {0.0, 1.0}
    assert ref.n_voxels == values.size
    assert not ref.collapsed


@pytest.mark.parametrize("method", fat.FAT_METHODS)
def test_fits_ignore_voxel_order_and_intensity_scale(method, mixture):
    values, tissues = mixture
    a = fat.fit_reference(values, tissues, method)
    b = fat.fit_reference(np.sort(values)[::-1], tissues, method)
    scaled = fat.TissueIntensities(tissues.muscle * 7, tissues.fat * 7, 4200.0, 1000, "test")
    c = fat.fit_reference(values * 7, scaled, method)
    np.testing.assert_array_equal(a.fraction(values), b.fraction(values))
    np.testing.assert_allclose(a.fraction(values), c.fraction(values * 7), atol=1e-6)
    if a.threshold is not None:
        assert c.threshold == pytest.approx(7 * a.threshold, rel=1e-6)


@pytest.mark.parametrize("method", ["gmm3", "gmm2", "kmeans2", "otsu"])
def test_lean_muscle_does_not_collapse_into_fat(method):
    """Nearly no fat: a free fit would split the lean peak and call half the muscle fat."""
    rng = np.random.default_rng(4)
    v = np.concatenate([rng.normal(50, 8, 50_000), rng.normal(600, 25, 100)])
    tissues = fat.TissueIntensities(50.0, 600.0, 600.0, 1000, "test")
    ref = fat.fit_reference(v, tissues, method)
    assert float(ref.fraction(v).mean()) < 0.005
    assert ref.threshold > 75  # above the bulk of the lean peak (50 +- 8)


def test_collapse_is_reported_and_falls_back_half_way():
    rng = np.random.default_rng(5)
    v = rng.normal(50, 8, 20_000)  # no fat at all: Otsu splits the lean peak
    tissues = fat.TissueIntensities(50.0, 600.0, 600.0, 1000, "test")
    ref = fat.fit_reference(v, tissues, "otsu")
    assert ref.collapsed
    assert ref.threshold == pytest.approx(325.0)
    assert ref.to_dict()["collapsed"] is True


def test_unmix_fraction_by_hand_and_with_noise_floor():
    ref = fat.FatReference("unmix", 100.0, 500.0, None, 1)
    np.testing.assert_allclose(
        ref.fraction(np.array([0.0, 100.0, 200.0, 300.0, 500.0, 900.0])),
        [0, 0, 0.25, 0.5, 1, 1],
    )
    np.testing.assert_allclose(ref.fraction(np.array([0.0, 900.0]), clip=False), [-0.25, 2.0])
    # With noise, the expected magnitude of lean muscle (not its amplitude) is fraction 0.
    lean_mean = float(fat.rice_mean(100.0, 40.0))
    assert lean_mean > 105
    assert float(ref.fraction(np.array([lean_mean]), noise_sd=40.0)[0]) == pytest.approx(0, abs=1e-6)


def test_unknown_method_is_rejected(mixture):
    values, tissues = mixture
    with pytest.raises(ValueError, match="unknown fat method 'gmm4'"):
        fat.fit_reference(values, tissues, "gmm4")


# ------------------------------------------------------------------------------ N4
def test_n4_removes_a_left_right_shading():
    n, nz = 64, 6
    x = np.linspace(-1, 1, n)
    truth_field = np.exp(0.25 * x)[:, None, None] * np.ones((n, n, nz))
    img, lab, _ = _body_phantom(field=truth_field, noise_sd=2.0, n=n, nz=nz)
    affine = np.diag([-2.0, 2.0, 5.0, 1.0])
    body = fat.body_mask(img, affine, lab > 0)
    corrected, field = fat.n4_correct(img, affine, body, shrink_factor=2, iterations=(50, 50, 50))
    assert corrected.shape == img.shape
    assert corrected.dtype == np.float32
    resid = np.log(field / truth_field)[body]
    resid -= np.median(resid)
    assert np.abs(resid).max() < 0.05  # the true field spans +-0.25 in log units
    np.testing.assert_allclose(corrected * field, img, rtol=1e-5)
    assert np.median(field[body]) == pytest.approx(1.0, abs=1e-3)
    band = fat.subcutaneous_band(body, lab > 0, affine, posterior_only=False)
    half = np.arange(n)[:, None, None] >= n / 2  # x = -2 i: larger i is the patient's left
    effect = fat.bias_correction_effect(img, corrected, field, body, band & half, band & ~half)
    assert effect["lr_ratio_before"] > 1.15  # the field grows with i, toward the left
    assert abs(effect["lr_ratio_after"] - 1) < 0.03
    assert effect["bias_cv_pct"] > 5


def test_bias_correction_effect_by_hand():
    field = np.array([1.0, 1.0, 2.0, 2.0]).reshape(4, 1, 1)
    body = np.ones((4, 1, 1), bool)
    left = np.array([True, True, False, False]).reshape(4, 1, 1)
    img = field * 10.0
    eff = fat.bias_correction_effect(img, img / field, field, body, left, ~left)
    assert eff["bias_cv_pct"] == pytest.approx(100 * 0.5 / 1.5)
    assert eff["bias_left_right_ratio"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------ fast exact paths
# The measurement replaces a few whole-volume numpy/scipy calls with faster ones that must give
# the very same numbers (issue 7: the metrics stage against the read-only floor).  Each is
# compared here with the call it stands for; tests/test_metrics.py compares whole measurements.


def _random_masks() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    out = []
    for level in (-0.3, 0.0, 0.4):
        x = ndi.gaussian_filter(rng.normal(size=(41, 37, 6)), 1.3) > level * 0.1
        out += [x, np.asfortranarray(x)]
    return out


def test_labels_equal_scipy_with_the_same_numbering():
    for mask in _random_masks():
        expected, n = ndi.label(mask)
        got, m = arrays._label(mask)
        assert m == n
        assert np.array_equal(got, expected)


@pytest.mark.parametrize("ax", [0, 1, 2])
def test_inplane_border_connection_equals_labelling_with_an_inplane_cross(ax):
    for mask in _random_masks():
        assert np.array_equal(arrays._border_connected_inplane(mask, ax), plain_border_connected(mask, ax))


def test_layout_helpers_keep_values():
    x = np.asfortranarray(np.random.default_rng(0).normal(size=(7, 5, 4)))
    c = fat.c_order(x, np.float32)
    assert c.flags.c_contiguous
    assert np.array_equal(c, x.astype(np.float32))
    for ax in range(3):
        stack = arrays._to_stack(x, ax)
        assert stack.flags.c_contiguous
        assert np.array_equal(stack, np.moveaxis(x, ax, 0))
        assert np.array_equal(arrays._from_stack(stack, ax), x)


@pytest.mark.parametrize("sampling", [(1.0, 1.0), (0.9375, 0.7617), (2.5, 2.5)])
def test_local_distance_maps_equal_the_whole_slice_transform_where_used(sampling):
    rng = np.random.default_rng(5)
    reach = arrays._NEAR_REACH_MM
    for _ in range(6):
        inside = ndi.gaussian_filter(rng.normal(size=(90, 70)), 4) > -0.05
        roi = ndi.gaussian_filter(rng.normal(size=inside.shape), 6) > 0.02
        full = ndi.distance_transform_edt(inside, sampling=sampling)
        near = (full <= reach) & roi
        depth = arrays._depth_mm(inside, sampling, reach, roi)
        assert np.array_equal(depth[near], full[near])
        assert np.all(depth[roi & ~near] > reach)
        features = ~inside
        full = ndi.distance_transform_edt(~features, sampling=sampling)
        near = (full <= reach) & roi
        dist = arrays._distance_to(features, sampling, 5.0, roi)
        assert np.array_equal(dist[near], full[near])
        assert np.all(dist[roi & ~near] > reach)
        everywhere = arrays._distance_to(features, sampling, 5.0)
        assert np.array_equal(everywhere[full <= reach], full[full <= reach])


def test_dilation_on_a_box_equals_the_whole_volume():
    rng = np.random.default_rng(2)
    mask = ndi.gaussian_filter(rng.normal(size=(40, 30, 9)), 2) > 0.1
    full = ~ndi.binary_dilation(mask, iterations=5)
    for region in [(slice(3, 20), slice(0, 30), slice(2, 7)), (slice(0, 40), slice(25, 30),
                                                                 slice(0, 9))]:
        assert np.array_equal(arrays._away_from(mask, 5, region), full[region])


def test_rice_mode_equals_the_search_over_the_whole_grid():
    from scipy.special import i0e

    def plain(nu: float, sd: float) -> float:  # argmax over all 4001 points, then the parabola
        x = np.linspace(1e-6, nu + 6 * sd, 4001)
        y = np.log(x) - (x - nu) ** 2 / (2 * sd**2) + np.log(i0e(x * nu / sd**2))
        i = int(np.argmax(y))
        if 0 < i < x.size - 1:
            y0, y1, y2 = y[i - 1], y[i], y[i + 1]
            denom = y0 - 2 * y1 + y2
            if denom < 0:
                return float(x[i] + (x[1] - x[0]) * 0.5 * (y0 - y2) / denom)
        return float(x[i])

    rng = np.random.default_rng(11)
    for nu, sd in [(0.0, 1.0), (50.0, 24.0), (600.0, 20.0), *rng.uniform(0.1, 400, (40, 2))]:
        assert intensity._rice_mode(float(nu), float(sd)) == plain(float(nu), float(sd))
