"""Tests of helpers.fat: noise model, tissue intensities, fat classification, N4."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from helpers import fat
from helpers.errors import InputFileError

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
