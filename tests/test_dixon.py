"""Dixon water/fat input (issue 18): fat fraction against planted truth, and what goes wrong."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from helpers.cli import main
from helpers.dixon import (
    DixonSettings,
    measure_dixon,
    measure_dixon_files,
    segmentation_image,
    write_segmentation_image,
)
from helpers.errors import ConfigError, GeometryMismatchError, InputFileError
from helpers.nifti import Volume, load_image, slice_axis
from helpers.synthetic_dixon import make_dixon_phantom, write_dixon_phantom
from helpers.validate import SettingError

KEY = ["level", "muscle", "side"]


def _vol(img: nib.Nifti1Image, data: np.ndarray | None = None) -> Volume:
    arr = np.asarray(img.dataobj) if data is None else data
    return Volume(np.asarray(arr), img.affine.astype(np.float64), None)


def _measure(dp, **kwargs):
    ph = dp.phantom
    return measure_dixon(_vol(dp.water), _vol(dp.fat), _vol(ph.mask), ph.labels,
                         subject=ph.subject, levels=ph.levels, **kwargs)


def _against_truth(result, ph) -> pd.DataFrame:
    m = result.metrics
    truth = ph.truth
    agg = m[m["slice"].isna()].merge(truth[truth["slice"].isna()], on=KEY, suffixes=("", "_t"))
    assert len(agg) == len(truth[truth["slice"].isna()])
    return agg


@pytest.fixture(scope="module")
def clean_lps():
    return make_dixon_phantom("dx-lps", template="small", seed=3, orientation="LPS",
                              cdi={"erector_spinae": 0.2},
                              fat_pct={("multifidus", "left"): 18, ("multifidus", "right"): 7})


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "LAS"])
def test_noise_free_dixon_is_exact(orientation, clean_lps):
    dp = clean_lps if orientation == "LPS" else make_dixon_phantom(
        f"dx-{orientation}", template="small", seed=3, orientation=orientation,
        cdi={"erector_spinae": 0.2},
        fat_pct={("multifidus", "left"): 18, ("multifidus", "right"): 7})
    res = _measure(dp)
    ph = dp.phantom
    agg = _against_truth(res, ph)
    ok = agg["n_slices_t"] > 0
    assert np.array_equal(agg["csa_mm2"].isna(), ~ok)
    # CSA exact; fat within 0.1 pp (it is exact to float rounding) on every aggregate row
    assert float(np.max(np.abs(agg.loc[ok, "csa_mm2"] - agg.loc[ok, "csa_mm2_t"]))) == 0.0
    assert float(np.max(np.abs(agg.loc[ok, "fat_pct"] - agg.loc[ok, "fat_pct_t"]))) < 0.1
    # per slice too
    m, t = res.metrics, ph.truth
    per = m[m["slice"].notna()].merge(t[t["slice"].notna()], on=[*KEY, "slice"],
                                      suffixes=("", "_t"))
    per = per[per["csa_mm2"].notna()]
    assert len(per) > 50
    assert float(np.max(np.abs(per["fat_pct"] - per["fat_pct_t"]))) < 0.1
    # asymmetry: planted cdi and lfiar
    a = res.asymmetry.merge(ph.asymmetry, on=["level", "muscle"], suffixes=("", "_t"))
    a = a[a["cdi_t"].notna()]
    assert float(np.max(np.abs(a["cdi"] - a["cdi_t"]))) < 1e-3
    assert float(np.max(np.abs(a["lfiar"] / a["lfiar_t"] - 1))) < 1e-3
    es = a[(a["level"] == "all") & (a["muscle"] == "erector_spinae")]
    assert float(es["cdi"].iloc[0]) == pytest.approx(0.2, abs=2e-3)
    mf = a[(a["level"] == "all") & (a["muscle"] == "multifidus")]
    assert float(mf["lfiar"].iloc[0]) == pytest.approx(18 / 7, rel=1e-3)  # left fattier: > 1
    assert set(res.metrics["method"]) == {"dixon"}
    assert res.reference["method"] == "dixon"
    assert not res.metrics["flags"].str.contains("psoas_t2_unreliable").any()


@pytest.mark.parametrize(("noise", "snr", "correction", "template"), [
    ("gaussian", 20.0, "none", "example"),
    ("rician", 50.0, "rician", "example"),
])
def test_noisy_dixon_within_one_point(noise, snr, correction, template):
    dp = make_dixon_phantom("dx-noisy", template=template, seed=5, noise=noise, dixon_snr=snr)
    res = _measure(dp, dixon=DixonSettings(noise_correction=correction))
    agg = _against_truth(res, dp.phantom)
    ok = agg["n_slices_t"] > 0
    assert float(np.max(np.abs(agg.loc[ok, "csa_mm2"] - agg.loc[ok, "csa_mm2_t"]))) == 0.0
    err = (agg.loc[ok, "fat_pct"] - agg.loc[ok, "fat_pct_t"]).abs()
    assert float(err.max()) < 1.0
    if correction == "rician":
        assert res.reference["noise"]["applied"] is True
        sd = 1000.0 / snr
        assert res.reference["noise"]["fat_sd"] == pytest.approx(sd, rel=0.05)


def test_magnitude_noise_floor_biases_plain_mean_upwards():
    """The known limit the README states: plain F/(W+F) of magnitude images at SNR 50 reads
    lean muscle about 2 points too fat; the Rician correction removes most of it."""
    dp = make_dixon_phantom("dx-rice", template="small", seed=3, noise="rician", dixon_snr=50.0)
    plain = _against_truth(_measure(dp), dp.phantom)
    fixed = _against_truth(_measure(dp, dixon=DixonSettings(noise_correction="rician")),
                           dp.phantom)
    ok = plain["n_slices_t"] > 0
    bias_plain = float((plain.loc[ok, "fat_pct"] - plain.loc[ok, "fat_pct_t"]).mean())
    bias_fixed = float((fixed.loc[ok, "fat_pct"] - fixed.loc[ok, "fat_pct_t"]).mean())
    assert 1.5 < bias_plain < 2.5
    assert 0 < bias_fixed < 1.0


def test_swapped_pair_is_refused(tmp_path):
    dp = make_dixon_phantom("dx-swap", template="small", seed=2, swap=True)
    paths = write_dixon_phantom(dp, tmp_path)
    with pytest.raises(InputFileError, match=r"swapped") as err:
        measure_dixon_files(paths["water"], paths["fat"], paths["mask"], paths["labels"])
    assert err.value.path == paths["fat"]
    assert "water: dx-swap_water.nii.gz" in str(err.value)


def test_grids_must_match(clean_lps):
    ph = clean_lps.phantom
    fat = np.asarray(clean_lps.fat.dataobj)
    shifted = clean_lps.fat.affine.copy()
    shifted[0, 3] += 2.0
    fat_vol = Volume(fat, shifted, None)
    with pytest.raises(GeometryMismatchError, match="grid mismatch"):
        measure_dixon(_vol(clean_lps.water), fat_vol, _vol(ph.mask), ph.labels, subject="x")
    cropped = Volume(fat[:-1], clean_lps.fat.affine, None)
    with pytest.raises(GeometryMismatchError, match="shape"):
        measure_dixon(_vol(clean_lps.water), cropped, _vol(ph.mask), ph.labels, subject="x")


def test_noise_floor_voxels_left_out_and_flagged(clean_lps):
    dp = clean_lps
    ph = dp.phantom
    mask = np.asarray(ph.mask.dataobj)
    water = np.asarray(dp.water.dataobj).copy()
    fat = np.asarray(dp.fat.dataobj).copy()
    ff = fat / np.where(water + fat > 0, water + fat, 1)
    lab = ph.labels
    value = next(x.value for x in lab.labels if x.muscle == "erector_spinae" and x.side == "left")
    vox = np.flatnonzero(mask.ravel() == value)
    void = vox[::4]  # a quarter of the muscle's voxels: signal void
    water.ravel()[void] = 0.5
    fat.ravel()[void] = 0.5  # W + F = 1, far below the floor; F/(W+F) = 0.5 would bias it up
    res = measure_dixon(_vol(dp.water, water), _vol(dp.fat, fat), _vol(ph.mask), lab,
                        subject="x")
    m = res.metrics
    row = m[(m["level"] == "all") & (m["muscle"] == "erector_spinae") & (m["side"] == "left")]
    kept = np.setdiff1d(vox, void)
    # per slice: mean over the slice's kept voxels; pooled over slices by their voxel counts
    ax = slice_axis(ph.mask.affine)
    k_all = np.unravel_index(vox, mask.shape)[ax]
    k_kept = np.unravel_index(kept, mask.shape)[ax]
    expect = 0.0
    for k in np.unique(k_all):
        expect += np.count_nonzero(k_all == k) * ff.ravel()[kept[k_kept == k]].mean()
    expect = 100 * expect / vox.size
    assert float(row["fat_pct"].iloc[0]) == pytest.approx(expect, abs=1e-6)
    truth = ph.truth
    t = truth[(truth["level"] == "all") & (truth["muscle"] == "erector_spinae")
              & (truth["side"] == "left")]
    assert float(row["csa_mm2"].iloc[0]) == float(t["csa_mm2"].iloc[0])  # CSA keeps them
    assert "dixon_low_signal" in row["flags"].iloc[0]
    other = m[(m["level"] == "all") & (m["muscle"] == "erector_spinae") & (m["side"] == "right")]
    assert "dixon_low_signal" not in other["flags"].iloc[0]
    assert res.reference["noise_floor"]["voxels_left_out"] == void.size


def test_mask_off_the_body_is_refused(clean_lps):
    ph = clean_lps.phantom
    mask = np.asarray(ph.mask.dataobj)
    air = (np.asarray(clean_lps.water.dataobj) + np.asarray(clean_lps.fat.dataobj)) == 0
    moved = np.zeros_like(mask)
    moved.ravel()[np.flatnonzero(air.ravel())[:300]] = 1  # in the air
    moved.ravel()[np.flatnonzero(mask.ravel() == 1)[:200]] = 1  # 40 % of it on muscle
    with pytest.raises(InputFileError, match="does not lie on muscle"):
        measure_dixon(_vol(clean_lps.water), _vol(clean_lps.fat), _vol(ph.mask, moved),
                      ph.labels, subject="x")


def test_strongly_negative_image_is_refused(clean_lps):
    ph = clean_lps.phantom
    water = np.asarray(clean_lps.water.dataobj) - 600.0  # an offset
    with pytest.raises(InputFileError, match="water image: 1 % of the muscle voxels"):
        measure_dixon(_vol(clean_lps.water, water), _vol(clean_lps.fat), _vol(ph.mask),
                      ph.labels, subject="x")


def test_fat_over_half_flags_possible_swap():
    dp = make_dixon_phantom("dx-fatty", template="small", seed=4,
                            fat_pct={("multifidus", "left"): 62})
    res = _measure(dp)
    m = res.metrics
    whole = m[m["level"] == "all"].set_index(["muscle", "side"])
    assert whole.loc[("multifidus", "left"), "fat_pct"] == pytest.approx(62, abs=0.1)
    assert "possible_water_fat_swap" in whole.loc[("multifidus", "left"), "flags"]
    assert "possible_water_fat_swap" not in whole.loc[("multifidus", "right"), "flags"]
    a = res.asymmetry
    assert "possible_water_fat_swap" in a[(a["level"] == "all")
                                          & (a["muscle"] == "multifidus")]["flags"].iloc[0]


def test_erosion_leaves_border_voxels_out_of_fat_only(clean_lps):
    dp = clean_lps
    ph = dp.phantom
    mask = np.asarray(ph.mask.dataobj)
    res0 = _measure(dp)
    res = _measure(dp, dixon=DixonSettings(erode_mm=2.6))  # 2.5 mm voxels: one ring off
    ff = np.asarray(ph.fat_fraction, dtype=np.float64)
    ax = slice_axis(ph.mask.affine)
    value = next(x.value for x in ph.labels.labels
                 if x.muscle == "erector_spinae" and x.side == "right")
    lab = mask == value
    structure = np.zeros((3, 3, 3), dtype=bool)
    index = [1, 1, 1]
    for a in range(3):
        if a != ax:
            for d in (0, 2):
                idx = list(index)
                idx[a] = d
                structure[tuple(idx)] = True
    structure[1, 1, 1] = True
    core = ndi.binary_erosion(lab, structure=structure, border_value=0)  # 4-neighbour ring
    expect_sum = 0.0
    moved_lab, moved_core = np.moveaxis(lab, ax, -1), np.moveaxis(core, ax, -1)
    moved_ff = np.moveaxis(ff, ax, -1)
    for k in range(lab.shape[ax]):
        n = int(moved_lab[..., k].sum())
        if not n:
            continue
        use = moved_core[..., k] if moved_core[..., k].any() else moved_lab[..., k]
        expect_sum += n * moved_ff[..., k][use].mean()
    expect = 100 * expect_sum / int(lab.sum())
    m, m0 = res.metrics, res0.metrics
    sel = (m["level"] == "all") & (m["muscle"] == "erector_spinae") & (m["side"] == "right")
    sel0 = (m0["level"] == "all") & (m0["muscle"] == "erector_spinae") & (m0["side"] == "right")
    assert float(m.loc[sel, "fat_pct"].iloc[0]) == pytest.approx(expect, abs=1e-6)
    assert float(m.loc[sel, "fat_pct"].iloc[0]) != pytest.approx(
        float(m0.loc[sel0, "fat_pct"].iloc[0]), abs=0.05)  # the border is fattier here
    assert float(m.loc[sel, "csa_mm2"].iloc[0]) == float(m0.loc[sel0, "csa_mm2"].iloc[0])
    assert res.reference["erosion"]["voxels_left_out"] > 0


def test_settings_are_validated():
    with pytest.raises(SettingError, match=r"^dixon\.erode_mm: must be a number in \[0, 20\]") as err:
        DixonSettings(erode_mm=-1)
    assert err.value.key == "dixon.erode_mm"
    with pytest.raises(SettingError, match="did you mean 'water'") as err:
        DixonSettings(segment_on="watr")
    assert err.value.key == "dixon.segment_on"
    with pytest.raises(SettingError, match=r"^dixon\.erode: unknown key \(did you mean 'erode_mm'") as err:
        DixonSettings.from_mapping({"erode": 1})
    assert err.value.key == "dixon.erode"
    assert DixonSettings.from_mapping({"erode_mm": 1}).erode_mm == 1.0


def test_segmentation_image(clean_lps, tmp_path):
    w, f = _vol(clean_lps.water), _vol(clean_lps.fat)
    total = segmentation_image(w, f)
    assert np.allclose(total, w.data + f.data)
    assert np.array_equal(segmentation_image(w, f, "fat"), f.data)
    with pytest.raises(ConfigError, match="needs the subject's single-contrast image"):
        segmentation_image(w, f, "image")
    paths = write_dixon_phantom(clean_lps, tmp_path)
    out = write_segmentation_image(paths["water"], paths["fat"], tmp_path / "seg.nii.gz")
    back = load_image(out)
    assert np.allclose(back.data, total, atol=1e-3)
    assert np.allclose(back.affine, w.affine)


def test_cli_metrics_dixon(clean_lps, tmp_path, capsys):
    paths = write_dixon_phantom(clean_lps, tmp_path / "in")
    out = tmp_path / "out"
    code = main(["metrics", "--water", str(paths["water"]), "--fat", str(paths["fat"]),
                 "--mask", str(paths["mask"]), "--labels", str(paths["labels"]),
                 "--out", str(out), "--levels", str(paths["levels"])])
    assert code == 0
    metrics = pd.read_csv(out / "metrics.csv")
    truth = clean_lps.phantom.truth
    assert set(metrics["subject"]) == {"dx-lps"}  # from dx-lps_water.nii.gz
    agg = metrics[metrics["slice"].isna()].merge(truth[truth["slice"].isna()], on=KEY,
                                                 suffixes=("", "_t"))
    ok = agg["n_slices_t"] > 0
    assert float(np.max(np.abs(agg.loc[ok, "fat_pct"] - agg.loc[ok, "fat_pct_t"]))) < 0.1
    ref = json.loads((out / "reference.json").read_text())
    assert ref["method"] == "dixon"
    assert ref["contrast"] == "dixon"
    # usage errors: exit 2 with a one-line reason
    for args, needle in (
        (["--water", str(paths["water"])], "go together"),
        (["--water", str(paths["water"]), "--fat", str(paths["fat"]), "--image",
          str(paths["image"])], "not both"),
        ([], "give --image"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["metrics", *args, "--mask", str(paths["mask"]), "--labels",
                  str(paths["labels"]), "--out", str(tmp_path / "x")])
        assert exc.value.code == 2
        assert needle in capsys.readouterr().err
    # swapped files: one line naming the fat file, exit 2
    code = main(["metrics", "--water", str(paths["fat"]), "--fat", str(paths["water"]),
                 "--mask", str(paths["mask"]), "--labels", str(paths["labels"]),
                 "--out", str(tmp_path / "swap")])
    assert code == 2
    err = capsys.readouterr().err
    assert "dx-lps_water.nii.gz: subcutaneous fat reads" in err
    assert not (tmp_path / "swap" / "metrics.csv").exists()
