"""Synthetic phantoms: the planted truth is right, orientation-free, mirrored correctly, seeded.

The truth is recomputed here by an independent route (the written NIfTI files read back with
plain nibabel, areas from the header's pixel sizes, pandas group-bys) and compared with the
phantom's own tables.
"""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from helpers import synthetic as syn
from helpers.errors import ConfigError
from helpers.labels import load_labels
from helpers.nifti import load_image, load_mask

RIGHT = (1, 3, 5, 7)
LEFT = (2, 4, 6, 8)


@pytest.fixture(scope="module")
def small_las():
    return syn.make_phantom("syn-t01", template="small", seed=11, orientation="LAS",
                            bias_lr=0.25)


@pytest.fixture(scope="module")
def example_lps():
    return syn.make_phantom("syn-t02", template="example", seed=5, orientation="LPS",
                            fat_pct={("erector_spinae", "left"): 18.0,
                                     ("erector_spinae", "right"): 6.0},
                            cdi={"multifidus": 0.2})


def _recount(mask_path, ff: np.ndarray, levels: pd.DataFrame) -> pd.DataFrame:
    """Independent truth: nibabel + numpy + pandas, slices along the axis nearest world z."""
    img = nib.load(mask_path)
    data = np.asarray(img.dataobj).astype(int)
    codes = nib.aff2axcodes(img.affine)
    ax = next(i for i, c in enumerate(codes) if c in "SI")
    zooms = img.header.get_zooms()[:3]
    area = float(np.prod([z for i, z in enumerate(zooms) if i != ax]))
    idx = np.nonzero(data)
    df = pd.DataFrame({"value": data[idx], "slice": idx[ax], "f": ff[idx]})
    per = df.groupby(["value", "slice"]).agg(n=("f", "size"), fsum=("f", "sum")).reset_index()
    per = per.merge(levels, on="slice", how="left")
    rows = []
    groups = list(per.groupby(["value", "level"]))
    groups += [((v, "all"), g) for v, g in per.groupby("value")]
    for (value, level), grp in groups:
        csa = grp["n"].mean() * area
        fat = 100 * grp["fsum"].sum() / grp["n"].sum()
        rows.append({"value": value, "level": level, "n_slices": len(grp), "csa_mm2": csa,
                     "fat_pct": fat, "fcsa_mm2": csa * (1 - fat / 100)})
    return pd.DataFrame(rows)


def _truth_agg(ph) -> pd.DataFrame:
    tr = ph.truth[ph.truth["slice"].isna()].copy()
    value = {(lab.muscle, lab.side): lab.value for lab in ph.labels.labels}
    tr["value"] = [value[(m, s)] for m, s in zip(tr["muscle"], tr["side"], strict=True)]
    return tr


def test_truth_equals_independent_recount(small_las, tmp_path):
    paths = syn.write_phantom(small_las, tmp_path, fat_fraction=True)
    ff = np.asarray(nib.load(paths["fat_fraction"]).dataobj)
    levels = pd.read_csv(paths["levels"])
    ref = _recount(paths["mask"], ff, levels)
    tr = _truth_agg(small_las)
    merged = tr.merge(ref, on=["value", "level"], suffixes=("", "_ref"))
    assert len(merged) == len(ref) == tr["n_slices"].gt(0).sum()
    for col in ("n_slices", "csa_mm2", "fat_pct", "fcsa_mm2"):
        assert np.allclose(merged[col], merged[f"{col}_ref"], rtol=1e-5, atol=1e-6), col
    # rows of muscles absent from a level are NaN, never 0
    absent = tr[tr["n_slices"] == 0]
    assert absent[["csa_mm2", "fat_pct", "fcsa_mm2"]].isna().all().all()
    # per-slice rows: counts per file slice index
    mask = np.asarray(nib.load(paths["mask"]).dataobj)
    per = small_las.truth[small_las.truth["slice"].notna()]
    area = float(np.prod(small_las.image.header.get_zooms()[:2]))
    for _, row in per.sample(10, random_state=0).iterrows():
        value = small_las.labels.labels[[(lab.muscle, lab.side) for lab in
                                         small_las.labels.labels].index((row.muscle, row.side))]
        n = int((mask[:, :, int(row.slice)] == value.value).sum())
        assert row.csa_mm2 == pytest.approx(n * area)


def test_asymmetry_truth_formulas(example_lps):
    tr = _truth_agg(example_lps)
    for _, row in example_lps.asymmetry.iterrows():
        sub = tr[(tr["level"] == row.level) & (tr["muscle"] == row.muscle)].set_index("side")
        fl, fr = sub.loc["left", "fcsa_mm2"], sub.loc["right", "fcsa_mm2"]
        il, ir = sub.loc["left", "fat_pct"], sub.loc["right", "fat_pct"]
        if not (np.isfinite(fl) and np.isfinite(fr)):
            continue
        assert row.cdi == pytest.approx((fl - fr) / ((fl + fr) / 2))
        assert row.cdi_abs == pytest.approx(abs(row.cdi))
        assert row.lfiar == pytest.approx(il / max(ir, 0.5))
        assert row.lfiar_log == pytest.approx(math.log(row.lfiar))


def test_planted_fat_and_cdi_come_out(example_lps):
    tr = _truth_agg(example_lps)
    every = tr[tr["level"] == "all"].set_index(["muscle", "side"])
    assert every.loc[("erector_spinae", "left"), "fat_pct"] == pytest.approx(18.0, abs=0.01)
    assert every.loc[("erector_spinae", "right"), "fat_pct"] == pytest.approx(6.0, abs=0.01)
    assert every.loc[("psoas_major", "left"), "fat_pct"] == pytest.approx(
        syn.DEFAULT_FAT_PCT["psoas_major"], abs=0.01)
    asym = example_lps.asymmetry.set_index(["level", "muscle"])
    assert asym.loc[("all", "multifidus"), "cdi"] == pytest.approx(0.2, abs=1e-3)
    assert asym.loc[("all", "erector_spinae"), "lfiar"] == pytest.approx(3.0, rel=0.01)
    # partial volume: many muscle voxels are part fat, in 1/16 steps (4 x 4 sub-voxels)
    mask = np.asarray(example_lps.mask.dataobj)
    f = example_lps.fat_fraction[mask > 0]
    assert 0.05 < np.mean((f > 0) & (f < 1)) < 0.9
    assert np.allclose(f * 16, np.round(f * 16), atol=1e-4)


def test_csa_scale_changes_area_as_planted():
    base = syn.make_phantom(template="small", seed=2)
    grown = syn.make_phantom(template="small", seed=2,
                             csa_scale={("erector_spinae", "left"): 1.3,
                                        ("psoas_major", "right"): 0.7})
    a = _truth_agg(base).set_index(["level", "muscle", "side"])["csa_mm2"]
    b = _truth_agg(grown).set_index(["level", "muscle", "side"])["csa_mm2"]
    assert b[("all", "erector_spinae", "left")] / a[("all", "erector_spinae", "left")] == (
        pytest.approx(1.3, rel=0.06))
    assert b[("all", "psoas_major", "right")] / a[("all", "psoas_major", "right")] == (
        pytest.approx(0.7, rel=0.06))
    assert b[("all", "multifidus", "right")] == pytest.approx(
        a[("all", "multifidus", "right")], rel=0.03)


def test_orientation_does_not_change_truth_and_sides_are_anatomical():
    phs = {o: syn.make_phantom(template="small", seed=4, orientation=o, bias_lr=0.3)
           for o in ("LPS", "RAS", "LAS", "PIR")}
    ref = phs["LPS"]
    for o, ph in phs.items():
        assert "".join(nib.aff2axcodes(ph.image.affine)) == o
        assert np.allclose(ph.image.affine, ph.mask.affine)
        agg = _truth_agg(ph).reset_index(drop=True)
        pd.testing.assert_frame_equal(agg, _truth_agg(ref).reset_index(drop=True))
        pd.testing.assert_frame_equal(ph.asymmetry, ref.asymmetry)
        # same voxels in the world: bring back to LPS and compare
        back = syn.reorient(ph.image, ("L", "P", "S"))
        assert np.array_equal(np.asarray(back.dataobj), np.asarray(ref.image.dataobj))
        assert np.allclose(back.affine, ref.image.affine)
        # every right label at larger world x than its left twin
        mask = np.asarray(ph.mask.dataobj)
        for r, l in zip(RIGHT, LEFT, strict=True):
            xr = nib.affines.apply_affine(ph.mask.affine, np.argwhere(mask == r))[:, 0].mean()
            xl = nib.affines.apply_affine(ph.mask.affine, np.argwhere(mask == l))[:, 0].mean()
            assert xr > xl, (o, r)
    # PIR stores slices inferior-first reversed: slice indices follow the file's own order
    pir = phs["PIR"]
    nz = pir.mask.shape[1]
    lev_lps = ref.levels.set_index("slice")["level"]
    lev_pir = pir.levels.set_index("slice")["level"]
    assert all(lev_pir[nz - 1 - k] == lev_lps[k] for k in range(nz))
    per = pir.truth[pir.truth["slice"].notna()]
    mask = np.asarray(pir.mask.dataobj)
    row = per.iloc[0]
    value = next(lab.value for lab in pir.labels.labels
             if (lab.muscle, lab.side) == (row.muscle, row.side))
    area = abs(np.linalg.det(pir.mask.affine[:3, :3])) / pir.mask.header.get_zooms()[1]
    assert row.csa_mm2 == pytest.approx((mask[:, int(row.slice), :] == value).sum() * area)


def test_mirror_swaps_sides_negates_cdi_inverts_lfiar(small_las):
    mir = syn.mirror_left_right(small_las)
    a = small_las.asymmetry.set_index(["level", "muscle"])
    b = mir.asymmetry.set_index(["level", "muscle"])
    ok = a["cdi"].notna()
    assert np.allclose(b.loc[ok, "cdi"], -a.loc[ok, "cdi"])
    ta = _truth_agg(small_las).set_index(["level", "muscle", "side"])
    both = (ta["fat_pct"].unstack("side") >= 0.5).all(axis=1)
    inv = both[both].index
    assert np.allclose(b.loc[inv, "lfiar"], 1 / a.loc[inv, "lfiar"])
    # the mirrored volume, measured afresh, gives the swapped truth
    mask = np.asarray(mir.mask.dataobj)
    re = syn.truth_from_arrays(mask, mir.fat_fraction, mir.mask.affine, mir.labels,
                               mir.levels, mir.subject)
    pd.testing.assert_frame_equal(re, mir.truth)
    tb = _truth_agg(mir).set_index(["level", "muscle", "side"])
    flip = {"left": "right", "right": "left"}
    for (level, muscle, side), row in ta.iterrows():
        other = tb.loc[(level, muscle, flip[side])]
        assert other["csa_mm2"] == pytest.approx(row["csa_mm2"], nan_ok=True)
        assert other["fat_pct"] == pytest.approx(row["fat_pct"], nan_ok=True)
    # labels stay anatomical: right labels at larger world x than left ones
    for r, l in zip(RIGHT, LEFT, strict=True):
        xr = nib.affines.apply_affine(mir.mask.affine, np.argwhere(mask == r))[:, 0].mean()
        xl = nib.affines.apply_affine(mir.mask.affine, np.argwhere(mask == l))[:, 0].mean()
        assert xr > xl
    # and the image is the mirror of the original
    assert np.array_equal(np.asarray(mir.image.dataobj),
                          np.asarray(small_las.image.dataobj)[::-1])


def test_same_seed_same_phantom_other_seed_differs():
    a = syn.make_phantom(template="small", seed=7)
    b = syn.make_phantom(template="small", seed=7)
    c = syn.make_phantom(template="small", seed=8)
    assert np.array_equal(np.asarray(a.image.dataobj), np.asarray(b.image.dataobj))
    assert np.array_equal(a.fat_fraction, b.fat_fraction)
    pd.testing.assert_frame_equal(a.truth, b.truth)
    assert not np.array_equal(np.asarray(a.image.dataobj), np.asarray(c.image.dataobj))


def test_noise_bias_and_contrast_follow_parameters():
    flat = syn.make_phantom(template="small", seed=3, bias_lr=0.0, bias_ap=0.0,
                            bias_smooth=0.0, snr=20.0)
    tilted = syn.make_phantom(template="small", seed=3, bias_lr=0.3, bias_ap=0.0,
                              bias_smooth=0.0, snr=20.0)
    for ph, lo, hi in ((flat, 0.97, 1.03), (tilted, 1.25, 1.6)):
        img = np.asarray(ph.image.dataobj)
        xyz = nib.affines.apply_affine(ph.image.affine, np.indices(img.shape).reshape(3, -1).T)
        x = xyz[:, 0].reshape(img.shape)
        fat = ph.fat_fraction == 1.0
        ratio = np.median(img[fat & (x > 40)]) / np.median(img[fat & (x < -40)])
        assert lo < ratio < hi  # patient's right brighter with bias_lr > 0
    # Rayleigh background: mean = sigma * sqrt(pi / 2), sigma = I_fat / snr
    img = np.asarray(flat.image.dataobj)
    mask = np.asarray(flat.mask.dataobj)
    air = (flat.fat_fraction == 0) & (mask == 0) & _outside_body(flat)
    assert air.sum() > 1000
    sigma = syn.I_FAT / 20.0
    assert img[air].mean() == pytest.approx(sigma * math.sqrt(math.pi / 2), rel=0.1)
    # fat bright, muscle dark (T2 without fat suppression)
    lean = (mask > 0) & (flat.fat_fraction == 0)
    assert np.median(img[flat.fat_fraction == 1]) > 5 * np.median(img[lean])


def _outside_body(ph) -> np.ndarray:
    """Voxels in the posterior air (behind the skin): well outside the body outline."""
    img_shape = ph.image.shape
    xyz = nib.affines.apply_affine(ph.image.affine, np.indices(img_shape).reshape(3, -1).T)
    y = xyz[:, 1].reshape(img_shape)
    mask = np.asarray(ph.mask.dataobj)
    y_back = nib.affines.apply_affine(ph.mask.affine, np.argwhere(mask > 0))[:, 1].min()
    return y < y_back - ph.params["body"]["fat_post_mm"] - 12.0


def test_intensities_resemble_the_example(example_dir, example_lps):
    real = load_image(example_dir / "sub-0001_T1w.nii.gz").data
    real_mask = load_mask(example_dir / "sub-0001_T1w_dseg.nii.gz").data
    img = np.asarray(example_lps.image.dataobj)
    mask = np.asarray(example_lps.mask.dataobj)
    # bright tissue (the fat) within 30 % of the real scan's, muscle/fat contrast within 2x
    bright_real, bright_syn = np.percentile(real, 95), np.percentile(img, 95)
    assert bright_syn == pytest.approx(bright_real, rel=0.3)
    ratio_real = np.median(real[real_mask > 0]) / bright_real
    ratio_syn = np.median(img[mask > 0]) / bright_syn
    assert ratio_real / 2 < ratio_syn < ratio_real * 2
    # muscle areas within 25 % of the real mask's (shapes come from it)
    for value in range(1, 9):
        n_real = (real_mask == value).sum()
        n_syn = (mask == value).sum()
        if value not in (1, 2):  # multifidus carries the planted cdi of 0.2
            assert n_syn == pytest.approx(n_real, rel=0.25), value


def test_write_phantom_round_trip(small_las, tmp_path):
    paths = syn.write_phantom(small_las, tmp_path)
    assert paths["image"].name == "syn-t01_T2w.nii.gz"
    assert paths["mask"].name == "syn-t01_dseg.nii.gz"
    image = load_image(paths["image"])
    mask = load_mask(paths["mask"])
    assert np.array_equal(image.data, np.asarray(small_las.image.dataobj))
    assert np.array_equal(mask.data, np.asarray(small_las.mask.dataobj))
    assert image.axcodes == ("L", "A", "S")
    assert load_labels(paths["labels"]).labels == small_las.labels.labels
    levels = pd.read_csv(paths["levels"])
    assert list(levels.columns) == ["slice", "level"]
    pd.testing.assert_frame_equal(levels, small_las.levels)
    truth = pd.read_csv(paths["truth"])
    assert list(truth.columns) == syn.TRUTH_COLUMNS
    assert np.allclose(truth["csa_mm2"], small_las.truth["csa_mm2"], equal_nan=True)
    assert list(pd.read_csv(paths["asymmetry"]).columns) == syn.ASYMMETRY_COLUMNS
    assert json.loads(paths["params"].read_text())["seed"] == 11
    assert not list(tmp_path.glob("*.tmp*"))


def test_example_labels_match_data_example(example_dir):
    assert load_labels(example_dir / "labels.json").labels == syn.LABELS.labels


def test_cohort_with_plan(tmp_path):
    plan = pd.DataFrame({"subject": ["p-1", "p-2", "p-3"], "es_cdi": [-0.25, 0.0, 0.15],
                         "fat_multifidus_left": [20.0, np.nan, 5.0],
                         "orientation": ["RAS", "LPS", "LAS"]})
    man = syn.make_cohort(0, tmp_path, template="small", plan=plan, seed=1)
    assert list(man["subject"]) == ["p-1", "p-2", "p-3"]
    assert np.allclose(man["es_cdi_true"], plan["es_cdi"], atol=1e-3)
    assert list(man["orientation"]) == ["RAS", "LPS", "LAS"]
    for path in man["image"]:
        assert sorted(load_image(path).data.shape) == [8, 96, 96]
    truth = pd.read_csv(tmp_path / "truth.csv")
    mf = truth[(truth["level"] == "all") & truth["slice"].isna()
               & (truth["muscle"] == "multifidus") & (truth["side"] == "left")]
    assert mf.set_index("subject").loc["p-1", "fat_pct"] == pytest.approx(20.0, abs=0.01)
    levels = pd.read_csv(tmp_path / "levels.csv")
    assert list(levels.columns) == ["subject", "slice", "level"]
    assert set(levels["subject"]) == {"p-1", "p-2", "p-3"}
    asym = pd.read_csv(tmp_path / "asymmetry_truth.csv")
    assert set(asym["subject"]) == {"p-1", "p-2", "p-3"}


def test_cohort_draws_realistic_parameters(tmp_path):
    man = syn.make_cohort(6, tmp_path, template="small", seed=3, layout="flat")
    assert list(man["subject"]) == [f"syn-00{i}" for i in range(1, 7)]
    assert man.loc[0, "image"] == str(tmp_path / "syn-001_T2w.nii.gz")
    truth = pd.read_csv(tmp_path / "truth.csv")
    own = pd.read_csv(tmp_path / "syn-001_truth.csv")  # flat layout: the tables carry a prefix
    pd.testing.assert_frame_equal(own, truth[truth["subject"] == "syn-001"].reset_index(drop=True))
    image, mask = load_image(man.loc[0, "image"]), load_mask(man.loc[0, "mask"])
    assert image.data.shape == mask.data.shape
    assert set(np.unique(mask.data)) > {0}  # the mask holds muscles
    agg = truth[(truth["level"] == "all") & truth["slice"].isna()]
    assert agg["fat_pct"].between(2.9, 25.1).all()
    asym = pd.read_csv(tmp_path / "asymmetry_truth.csv")
    assert asym.loc[asym["level"] == "all", "cdi"].abs().max() <= 0.3 + 1e-3
    assert man["bias_lr"].abs().max() <= 0.3
    again = syn.make_cohort(2, tmp_path / "again", template="small", seed=3)
    assert np.allclose(again["es_cdi_true"], man["es_cdi_true"][:2])


def test_module_main_writes_a_sample(tmp_path):
    assert syn.main([str(tmp_path), "--n", "1", "--template", "small"]) == 0
    manifest = pd.read_csv(tmp_path / "manifest.csv", dtype=str)
    assert manifest["subject"].tolist() == ["syn-001"]
    image = nib.load(tmp_path / "syn-001" / "syn-001_T2w.nii.gz")
    mask = np.asarray(nib.load(tmp_path / "syn-001" / "syn-001_dseg.nii.gz").dataobj)
    assert image.shape == mask.shape
    labels = json.loads((tmp_path / "syn-001" / "labels.json").read_text())["labels"]
    assert set(np.unique(mask)) - {0} <= {int(lab["value"]) for lab in labels}


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"template": "huge"}, "template must be one of"),
        ({"orientation": "LPX"}, "orientation"),
        ({"orientation": "LL"}, "orientation"),
        ({"fat_pct": {("deltoid", "left"): 5.0}}, "unknown muscle"),
        ({"fat_pct": {("multifidus", "left"): -1.0}}, "non-negative"),
        ({"snr": 0.0}, "snr must be positive"),
        ({"shape": (10, 10)}, "three positive integers"),
        ({"levels": ["L4"]}, "levels has 1 entries"),
        ({"cdi": {"multifidus": 3.0}}, r"cdi\['multifidus'\]"),
    ],
)
def test_bad_arguments_raise_config_errors(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        syn.make_phantom(**{"template": "small", **kwargs})


def test_reorient_keeps_world_positions(small_las):
    out = syn.reorient(small_las.mask, "PIR")
    assert nib.aff2axcodes(out.affine) == ("P", "I", "R")
    src = np.argwhere(np.asarray(small_las.mask.dataobj) == 3)
    dst = np.argwhere(np.asarray(out.dataobj) == 3)
    a = nib.affines.apply_affine(small_las.mask.affine, src)
    b = nib.affines.apply_affine(out.affine, dst)
    assert np.allclose(np.sort(a, axis=0), np.sort(b, axis=0))
    assert out.get_data_dtype() == np.uint8


def test_cohort_speed_small_template(tmp_path):
    """The scale path: small phantoms must be cheap (1000 in about 2 minutes of CPU)."""
    import time

    syn.make_phantom(template="small")  # warm the template cache
    start = time.process_time()
    syn.make_cohort(5, tmp_path, template="small")
    per = (time.process_time() - start) / 5
    assert per < 0.4  # generous: about 0.1 s on a quiet core
