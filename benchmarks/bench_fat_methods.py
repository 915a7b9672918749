"""Accuracy of every fat classification method on phantoms with planted truth.

Runs :func:`helpers.metrics.measure` with each method of :data:`helpers.fat.FAT_METHODS`, with
and without N4 bias correction, and with psoas in or out of the pooled reference fit, on the
same set of synthetic lumbar phantoms (both orientations, left-right bias fields up to +-30 %,
chosen fat and area asymmetries, one lean subject, one noisy one, one off-centre rotated one).
Compares every number with the phantom truth and writes the table to
``benchmarks/results/fat_methods.json``; the default method (:data:`helpers.fat.DEFAULT_FAT_METHOD`)
is the one with the smallest fat error there.

Usage::

    .venv/bin/python benchmarks/bench_fat_methods.py [--quick]

``--quick`` uses three phantoms instead of six.  ``--breakdown`` instead measures the default
method on independent phantoms (:func:`independent_phantoms`) and their noise-free twins and
writes where its worst CDI and LFIAR errors come from to ``results/fat_breakdown.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from helpers import fat
from helpers.metrics import MetricsSettings, measure
from helpers.nifti import Volume
from helpers.synthetic import make_phantom

RESULTS = Path(__file__).resolve().parent / "results" / "fat_methods.json"

#: The phantom set: (subject, make_phantom keyword arguments).
PHANTOMS: list[tuple[str, dict]] = [
    ("asym-lps", {"seed": 11, "orientation": "LPS", "bias_lr": 0.3, "fat_pct": {
        ("multifidus", "left"): 18, ("multifidus", "right"): 9,
        ("erector_spinae", "left"): 9, ("erector_spinae", "right"): 14,
        ("psoas_major", "left"): 3, ("psoas_major", "right"): 3,
        ("quadratus_lumborum", "left"): 6, ("quadratus_lumborum", "right"): 10},
        "cdi": {"multifidus": -0.15}}),
    ("asym-ras", {"seed": 12, "orientation": "RAS", "bias_lr": -0.3, "fat_pct": {
        ("multifidus", "left"): 6, ("multifidus", "right"): 12,
        ("erector_spinae", "left"): 20, ("erector_spinae", "right"): 12,
        ("psoas_major", "left"): 2, ("psoas_major", "right"): 4,
        ("quadratus_lumborum", "left"): 12, ("quadratus_lumborum", "right"): 6},
        "cdi": {"erector_spinae": 0.12}}),
    ("lean-las", {"seed": 13, "orientation": "LAS", "bias_lr": 0.2, "fat_pct": {
        (m, s): p for m, p in (("multifidus", 3), ("erector_spinae", 2.5), ("psoas_major", 1.5),
                               ("quadratus_lumborum", 2)) for s in ("left", "right")}}),
    ("fatty-shifted", {"seed": 14, "orientation": "LPS", "bias_lr": -0.15, "shift_mm": (15.0, 5.0),
                           "rotation_deg": 8.0, "fat_pct": {
        ("multifidus", "left"): 35, ("multifidus", "right"): 25,
        ("erector_spinae", "left"): 30, ("erector_spinae", "right"): 40,
        ("psoas_major", "left"): 6, ("psoas_major", "right"): 5,
        ("quadratus_lumborum", "left"): 15, ("quadratus_lumborum", "right"): 20}}),
    ("default-ras", {"seed": 15, "orientation": "RAS", "bias_lr": 0.25,
                         "cdi": {"quadratus_lumborum": 0.25}}),
    ("noisy-lps", {"seed": 16, "orientation": "LPS", "bias_lr": 0.3, "snr": 15.0, "fat_pct": {
        ("multifidus", "left"): 10, ("multifidus", "right"): 16}}),
]
QUICK = ("asym-lps", "asym-ras", "lean-las")


def vol(img, dtype=np.float32) -> Volume:
    """A nibabel image as a :class:`Volume` of ``dtype``."""
    return Volume(np.asarray(img.dataobj).astype(dtype), img.affine)


def volumes(ph) -> tuple[Volume, Volume]:
    """The phantom's image (float32) and mask (int16) as volumes."""
    return vol(ph.image), vol(ph.mask, np.int16)


def one_thread() -> None:
    """Every ITK filter on one thread (N4's result depends slightly on the thread count)."""
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    except ImportError:  # pragma: no cover
        pass


def paired(result, metrics: pd.DataFrame, asymmetry: pd.DataFrame, tag: str):
    """Aggregate rows of a measurement merged with a reference's (columns suffixed ``tag``):
    the metrics rows with a reference fat_pct, the asymmetry rows with a reference cdi."""
    got = result.metrics[result.metrics["slice"].isna()]
    m = got.merge(metrics[metrics["slice"].isna()], on=["level", "muscle", "side"],
                  suffixes=("", tag))
    m = m[m[f"fat_pct{tag}"].notna()]
    a = result.asymmetry.merge(asymmetry, on=["level", "muscle"], suffixes=("", tag))
    return m, a[a[f"cdi{tag}"].notna()]


def core_errors(m: pd.DataFrame, a: pd.DataFrame, tag: str) -> dict[str, float]:
    """The figures every accuracy benchmark reports, from :func:`paired` rows."""
    err = m["fat_pct"] - m[f"fat_pct{tag}"]
    return {
        "fat_mae_pp": float(err.abs().mean()),
        "fat_bias_pp": float(err.mean()),
        "fat_max_abs_pp": float(err.abs().max()),
        "csa_max_abs_mm2": float((m["csa_mm2"] - m[f"csa_mm2{tag}"]).abs().max()),
        "cdi_abs_err_max": float((a["cdi"] - a[f"cdi{tag}"]).abs().max()),
        "lfiar_rel_err_median": float((a["lfiar"] / a[f"lfiar{tag}"] - 1).abs().median()),
    }


def compare(result, ph) -> dict[str, float]:
    """Errors of one measurement against the phantom's truth (aggregate rows)."""
    truth = ph.truth[ph.truth["slice"].isna()]
    m, a = paired(result, ph.truth, ph.asymmetry, "_t")
    err = m["fat_pct"] - m["fat_pct_t"]
    paraspinal = ~m["muscle"].str.contains("psoas")
    cdi_err = (a["cdi"] - a["cdi_t"]).abs()
    rel = (a["lfiar"] / a["lfiar_t"] - 1).abs()
    a_whole = a["level"] == "all"
    # Sides: a swap flips the sign of a clear asymmetry (|CDI| > 0.02, or fat differing by more
    # than 1 percentage point between the sides).
    fi_t = truth.pivot_table(index=["level", "muscle"], columns="side", values="fat_pct")
    d_t = (fi_t["left"] - fi_t["right"]).rename("d_t").reset_index()
    a = a.assign(d=a["fat_pct_left"] - a["fat_pct_right"]).merge(d_t, on=["level", "muscle"])
    clear_cdi = a["cdi_t"].abs() > 0.02
    clear_fi = a["d_t"].abs() > 1.0
    swapped = int(
        (np.sign(a.loc[clear_cdi, "cdi"]) != np.sign(a.loc[clear_cdi, "cdi_t"])).sum()
        + (np.sign(a.loc[clear_fi, "d"]) != np.sign(a.loc[clear_fi, "d_t"])).sum()
    )
    whole = m["level"] == "all"
    return {
        **core_errors(m, a, "_t"),
        "fat_mae_pp_whole_stack": float(err[whole].abs().mean()),
        "fat_mae_pp_paraspinal": float(err[paraspinal].abs().mean()),
        "cdi_abs_err_max_whole_stack": float(cdi_err[a_whole].max()),
        "cdi_abs_err_mean": float(cdi_err.mean()),
        "lfiar_rel_err_median_whole_stack": float(rel[a_whole].median()),
        "lfiar_rel_err_p90": float(rel.quantile(0.9)),
        "sides_swapped": swapped,
        "n_rows": len(m),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three phantoms instead of six")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    one_thread()
    phantoms = [(n, kw) for n, kw in PHANTOMS if not args.quick or n in QUICK]
    configs = [(m, True, False) for m in fat.FAT_METHODS]
    configs += [(m, True, True) for m in fat.FAT_METHODS]
    configs += [(m, False, False) for m in fat.FAT_METHODS]
    rows = []
    t_all = time.perf_counter()
    for name, kw in phantoms:
        t0 = time.perf_counter()
        ph = make_phantom(name, **kw)
        print(f"{name}: phantom in {time.perf_counter() - t0:.1f} s", flush=True)
        img, msk = volumes(ph)
        for method, bc, pool in configs:
            settings = MetricsSettings(fat_method=method, bias_correction=bc, pool_psoas=pool)
            t0 = time.perf_counter()
            res = measure(img, msk, ph.labels, subject=name, settings=settings, levels=ph.levels)
            secs = time.perf_counter() - t0
            errs = compare(res, ph)
            collapsed = any(f.get("collapsed") for f in res.reference["fits"])
            rows.append({"phantom": name, "method": method, "bias_correction": bc,
                         "pool_psoas": pool, "collapsed": collapsed, "seconds": secs, **errs})
            print(f"  {method:8s} bc={bc!s:5s} psoas={pool!s:5s} fat MAE "
                  f"{errs['fat_mae_pp']:.2f} pp, cdi max {errs['cdi_abs_err_max']:.4f}, "
                  f"lfiar med {errs['lfiar_rel_err_median']:.3f}, swapped "
                  f"{errs['sides_swapped']}", flush=True)
    table = pd.DataFrame(rows)
    agg_cols = ["fat_mae_pp", "fat_mae_pp_whole_stack", "fat_mae_pp_paraspinal", "fat_bias_pp",
                "fat_max_abs_pp", "csa_max_abs_mm2", "cdi_abs_err_max", "cdi_abs_err_mean",
                "lfiar_rel_err_median", "lfiar_rel_err_p90", "sides_swapped", "seconds"]
    summary = (
        table.groupby(["method", "bias_correction", "pool_psoas"])
        .agg({c: ("max" if c.endswith("_max") or c in ("fat_max_abs_pp", "csa_max_abs_mm2",
                                                          "sides_swapped") else "mean")
              for c in agg_cols})
        .reset_index()
        .sort_values(["bias_correction", "fat_mae_pp"], ascending=[False, True])
    )
    default_rows = summary[summary["bias_correction"] & ~summary["pool_psoas"]]
    best = default_rows.iloc[0]
    pool_cmp = summary[summary["bias_correction"]].pivot(
        index="method", columns="pool_psoas", values="fat_mae_pp"
    )
    doc = {
        "what": "fat_pct / CDI / LFIAR error of every fat method vs phantom truth (aggregate rows "
                "of every level and the whole stack)",
        "phantoms": [{"subject": n, **{k: (str(v) if isinstance(v, dict) else v)
                                       for k, v in kw.items()}} for n, kw in phantoms],
        "summary": json.loads(summary.to_json(orient="records")),
        "best_method_with_bias_correction": str(best["method"]),
        "default_method_in_code": fat.DEFAULT_FAT_METHOD,
        "pool_psoas_fat_mae_pp": json.loads(pool_cmp.to_json()),
        "per_phantom": json.loads(table.to_json(orient="records")),
        "seconds_total": time.perf_counter() - t_all,
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                    "cpu_count": os.cpu_count()},
        "note": "Timings here include N4 and are noisy; see metrics_speed.json for speed.",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2, default=lambda o: None if (
        isinstance(o, float) and math.isnan(o)) else str(o)) + "\n")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(summary.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"best with bias correction: {best['method']} (code default "
          f"{fat.DEFAULT_FAT_METHOD}); wrote {args.out}")
    return 0


# ------------------------------------------------------------ worst-case breakdown (issue 18)
BREAKDOWN_RESULTS = RESULTS.with_name("fat_breakdown.json")
#: Storage orders of the independent set: flips of every axis and permuted axes.
_ORIENTATIONS = ("LPS", "RAS", "LAS", "RPI", "LPI", "RAI", "ASL", "PLS")
_CDI_MUSCLES = ("multifidus", "erector_spinae", "quadratus_lumborum")


def independent_phantoms(n: int = 12, seed: int = 2026) -> list[tuple[str, dict]]:
    """Phantoms independent of :data:`PHANTOMS`: the small template (2.5 mm voxels, so more
    partial volume at the muscle borders), left-right bias fields drawn from -25 % to +30 %,
    eight storage orders (flips of every axis, permuted axes), a planted CDI of -0.2 to 0.2
    on one muscle, the generator's default fat and noise (SNR 25)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        bias, cdi = float(rng.uniform(-0.25, 0.30)), float(rng.uniform(-0.2, 0.2))
        out.append((f"ind-{i:02d}", {
            "seed": 200 + i, "template": "small", "orientation": _ORIENTATIONS[i % 8],
            "bias_lr": round(bias, 4), "cdi": {_CDI_MUSCLES[i % 3]: round(cdi, 4)}}))
    return out


def _asymmetry_errors(res, ph, name: str, kw: dict) -> pd.DataFrame:
    a = res.asymmetry.merge(ph.asymmetry, on=["level", "muscle"], suffixes=("", "_t"))
    a = a[a["cdi_t"].notna()].copy()
    n = res.metrics[res.metrics["slice"].isna()].pivot_table(
        index=["level", "muscle"], columns="side", values="n_voxels").reset_index()
    n = n.rename(columns={"left": "n_voxels_left", "right": "n_voxels_right"})
    a = a.merge(n, on=["level", "muscle"], how="left")
    return pd.DataFrame({
        "phantom": name, "orientation": kw["orientation"], "bias_lr": kw["bias_lr"],
        "level": a["level"], "muscle": a["muscle"], "cdi_true": a["cdi_t"],
        "cdi_error": a["cdi"] - a["cdi_t"], "lfiar_rel_error": a["lfiar"] / a["lfiar_t"] - 1,
        "n_voxels_left": a["n_voxels_left"], "n_voxels_right": a["n_voxels_right"],
        "cdi_noise_sd": cdi_noise_sd(a, res.reference),
    })


def cdi_noise_sd(a: pd.DataFrame, reference: dict) -> NDArray[np.float64]:
    """Standard deviation of the CDI error that image noise alone causes in each row, for an
    unbiased per-voxel estimator (``unmix`` uses the unclipped fractions).

    Each voxel's fat fraction carries the noise ``sd / (I_fat - I_muscle)`` (the subject fit's
    noise sd and tissue intensities, corrected units; the field's left-right variation is left
    out); a side's pooled fraction averages it over its ``n`` voxels, and the normalized
    difference CDI of ``FCSA = CSA x (1 - f)`` propagates it linearly:
    ``dCDI/df_L = -4 CSA_L FCSA_R / (FCSA_L + FCSA_R)^2`` (and the mirror for the right side).
    """
    tissues = reference["fits"][0]["tissues"]
    per_voxel = tissues["noise_sd"] / (tissues["fat_intensity"] - tissues["muscle_intensity"])
    fl, fr = a["fcsa_left_mm2"].to_numpy(float), a["fcsa_right_mm2"].to_numpy(float)
    csa_l = fl / (1 - a["fat_pct_left"].to_numpy(float) / 100)
    csa_r = fr / (1 - a["fat_pct_right"].to_numpy(float) / 100)
    d_l = 4 * csa_l * fr / (fl + fr) ** 2
    d_r = 4 * csa_r * fl / (fl + fr) ** 2
    var = per_voxel**2 * (d_l**2 / a["n_voxels_left"].to_numpy(float)
                          + d_r**2 / a["n_voxels_right"].to_numpy(float))
    return np.sqrt(var)


def noise_floor(sds: NDArray, draws: int = 4000, seed: int = 0) -> dict[str, float]:
    """Worst |CDI error| over the rows of an estimator with no error but the noise: the
    median and 10-90 % range of ``max_i |N(0, sd_i)|`` over ``draws`` simulated sets."""
    rng = np.random.default_rng(seed)
    worst = np.abs(rng.normal(size=(draws, len(sds))) * np.asarray(sds)).max(axis=1)
    return {"median": float(np.median(worst)), "p10": float(np.quantile(worst, 0.1)),
            "p90": float(np.quantile(worst, 0.9)),
            "share_within_0.01": float(np.mean(worst <= 0.01))}


def breakdown(out: Path = BREAKDOWN_RESULTS, n: int = 12,
              settings: MetricsSettings | None = None) -> dict:
    """Where the default method's CDI and LFIAR errors come from, on independent phantoms.

    Each phantom is measured as generated (Rician noise, SNR 25) and as its noise-free twin
    (same anatomy, fat and shading, SNR 10^6): what the twin still gets wrong is the method's
    own (systematic) error, the rest is noise.  Writes ``benchmarks/results/fat_breakdown.json``
    and returns it.
    """
    rows = []
    for name, kw in independent_phantoms(n):
        for snr in (25.0, 1e6):
            ph = make_phantom(name, snr=snr, **kw)
            img, msk = volumes(ph)
            res = measure(img, msk, ph.labels, subject=name, levels=ph.levels, settings=settings)
            rows.append(_asymmetry_errors(res, ph, name, kw).assign(noise_free=snr > 1e3))
        print(f"{name}: done", flush=True)
    table = pd.concat(rows, ignore_index=True)
    table["abs_cdi_error"] = table["cdi_error"].abs()
    noisy, clean = table[~table["noise_free"]], table[table["noise_free"]]

    def figures(t: pd.DataFrame) -> dict[str, float]:
        whole = t["level"] == "all"
        return {
            "cdi_abs_err_max": float(t["abs_cdi_error"].max()),
            "cdi_abs_err_max_whole_stack": float(t.loc[whole, "abs_cdi_error"].max()),
            "cdi_abs_err_max_levels": float(t.loc[~whole, "abs_cdi_error"].max()),
            "lfiar_rel_err_median": float(t["lfiar_rel_error"].abs().median()),
            "rows_over_0.01": int((t["abs_cdi_error"] > 0.01).sum()),
            "rows": len(t),
        }

    twin = clean.set_index(["phantom", "level", "muscle"])["cdi_error"]
    noisy = noisy.assign(cdi_error_noise_free=[
        float(twin.get((p, lv, m), np.nan))
        for p, lv, m in zip(noisy["phantom"], noisy["level"], noisy["muscle"], strict=True)])
    # The noise's own part of each row's error, in units of its predicted sd.
    noisy = noisy.assign(noise_z=(noisy["cdi_error"] - noisy["cdi_error_noise_free"])
                         / noisy["cdi_noise_sd"])
    worst = noisy.sort_values("abs_cdi_error", ascending=False).head(10)
    by_muscle = noisy.groupby("muscle")["abs_cdi_error"].max().round(4).to_dict()
    by_phantom = noisy.groupby("phantom")["abs_cdi_error"].max().round(4).to_dict()
    doc = {
        "what": "default method (unmix, N4) on independent phantoms: CDI error and LFIAR "
                "relative error per level and muscle, with the noise-free twin of each phantom",
        "phantoms": [{"subject": n_, **{k: str(v) if isinstance(v, dict) else v
                                        for k, v in kw.items()}}
                     for n_, kw in independent_phantoms(n)],
        "noisy": figures(noisy),
        "noise_free": figures(clean),
        "noise_floor": {
            "what": "worst |CDI error| of an estimator whose only error is the image noise "
                    "(per-row sd from cdi_noise_sd, 4000 simulated sets of the same rows)",
            **noise_floor(noisy["cdi_noise_sd"].to_numpy(float)),
            "noise_z_sd": float(noisy["noise_z"].std()),
            "noise_z_abs_max": float(noisy["noise_z"].abs().max()),
        },
        "worst_rows": json.loads(worst.drop(columns=["noise_free"]).to_json(orient="records")),
        "cdi_abs_err_max_by_muscle": by_muscle,
        "cdi_abs_err_max_by_phantom": by_phantom,
        "rows": json.loads(table.to_json(orient="records")),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: doc[k] for k in ("noisy", "noise_free", "noise_floor")}, indent=2))
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(worst.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    return doc


if __name__ == "__main__":
    if "--breakdown" in sys.argv[1:]:
        one_thread()
        breakdown()
        sys.exit(0)
    sys.exit(main())
