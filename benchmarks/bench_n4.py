"""N4 bias-field correction: the plain fit against cheaper ones, speed and accuracy in one run.

Speed: :func:`helpers.bias.n4_correct` as the metrics stage calls it (fit on a copy shrunk to
``n4_fit_spacing_mm``, field evaluated at full resolution, one thread), wall-clock and process
CPU seconds (best of ``--repeats``), on realistic volumes: the real example scan
(``data/example``, 256 x 208 x 20 at 0.94 x 0.94 x 4.4 mm), a phantom on the example's grid, and
a 400 x 400 x 30 phantom at 1 x 1 x 4 mm.

Accuracy: the default method (``unmix``, N4 on) measured with each N4 configuration on the six
phantoms of ``bench_fat_methods.PHANTOMS`` and the twelve independent ones of
``bench_fat_methods.independent_phantoms`` (SNR 25), every figure against the planted truth.

The configurations: ``plain`` (the metrics stage's fit: 7.5 mm grid, three levels of 50
iterations), coarser fit grids (``n4_fit_spacing_mm``), fewer iterations and fewer fitting
levels (``n4_iterations``).  Writes
``benchmarks/results/n4_speed.json``.

Usage::

    .venv/bin/python benchmarks/bench_n4.py [--repeats 2] [--quick]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fat_methods import PHANTOMS, QUICK, compare, independent_phantoms, volumes

from helpers import bias, tissue_geometry
from helpers.metrics import MetricsSettings, measure
from helpers.nifti import load_image, load_mask
from helpers.synthetic import Template, make_phantom

RESULTS = Path(__file__).resolve().parent / "results" / "n4_speed.json"
EXAMPLE = Path(__file__).resolve().parents[1] / "data" / "example"
#: (name, n4_fit_spacing_mm, n4_iterations); the first is the plain fit.
CONFIGS: list[tuple[str, float, tuple[int, ...]]] = [
    ("plain (7.5 mm grid, 3 x 50 iterations)", 7.5, (50, 50, 50)),
    ("10 mm grid", 10.0, (50, 50, 50)),
    ("15 mm grid", 15.0, (50, 50, 50)),
    ("3 x 25 iterations", 7.5, (25, 25, 25)),
    ("two levels (2 x 50)", 7.5, (50, 50)),
]
BIG = Template("big", (400, 400, 30), (400.0, 400.0, 120.0))


def _speed_volumes() -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(name, image, affine, muscle) of the volumes timed."""
    out = []
    image = load_image(EXAMPLE / "sub-0001_T1w.nii.gz")
    mask = load_mask(EXAMPLE / "sub-0001_T1w_dseg.nii.gz")
    out.append(("real example 256x208x20 (0.94x0.94x4.4 mm)",
                np.ascontiguousarray(image.data, dtype=np.float32), image.affine,
                np.asarray(mask.data) > 0))
    for name, kw in (("phantom 256x208x20 (0.94x0.94x4.4 mm)", {}),
                     ("phantom 400x400x30 (1x1x4 mm)", {"template": BIG})):
        ph = make_phantom("speed", seed=1, bias_lr=0.25, **kw)
        img, msk = volumes(ph)
        out.append((name, np.ascontiguousarray(img.data), img.affine, np.asarray(msk.data) > 0))
    return out


def speed(repeats: int) -> list[dict]:
    """Best wall and CPU seconds of each configuration's N4 on each volume."""
    rows = []
    for name, img, affine, muscle in _speed_volumes():
        body = tissue_geometry.body_mask(img, affine, muscle)
        zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        fields = {}
        for label, spacing, its in CONFIGS:
            shrink = max(1, round(spacing / float(zooms.min())))
            walls, cpus = [], []
            for _ in range(repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                _, field = bias.n4_correct(img, affine, body, shrink_factor=shrink, iterations=its)
                walls.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
            fields[label] = field
            plain = fields[CONFIGS[0][0]]
            dev = np.abs(field[muscle] / plain[muscle] - 1)
            rows.append({"volume": name, "shape": list(img.shape), "config": label,
                         "shrink_factor": shrink, "iterations": list(its),
                         "wall_s": min(walls), "cpu_s": min(cpus),
                         "field_vs_plain_max_rel_dev_in_muscle": float(dev.max())})
            print(f"{name:42s} {label:40s} wall {min(walls):6.2f} s  cpu {min(cpus):5.2f} s  "
                  f"field vs plain {100 * float(dev.max()):.2f} %", flush=True)
    return rows


def accuracy(quick: bool) -> list[dict]:
    """Default-method figures against planted truth with each N4 configuration."""
    sets = [("bench_fat_methods six", [(n, kw) for n, kw in PHANTOMS if not quick or n in QUICK]),
            ("independent twelve", independent_phantoms(4 if quick else 12))]
    rows = []
    for set_name, phantoms in sets:
        per: dict[str, list[dict]] = {label: [] for label, _, _ in CONFIGS}
        for name, kw in phantoms:
            ph = make_phantom(name, **kw)
            img, msk = volumes(ph)
            for label, spacing, its in CONFIGS:
                settings = MetricsSettings(n4_fit_spacing_mm=spacing, n4_iterations=its)
                res = measure(img, msk, ph.labels, subject=name, settings=settings,
                              levels=ph.levels)
                per[label].append(compare(res, ph))
            print(f"{set_name}: {name} done", flush=True)
        for label, errs in per.items():
            t = pd.DataFrame(errs)
            rows.append({
                "phantoms": set_name, "config": label, "n_phantoms": len(t),
                "fat_mae_pp": float(t["fat_mae_pp"].mean()),
                "fat_max_abs_pp": float(t["fat_max_abs_pp"].max()),
                "cdi_abs_err_max": float(t["cdi_abs_err_max"].max()),
                "cdi_abs_err_mean": float(t["cdi_abs_err_mean"].mean()),
                "lfiar_rel_err_median": float(t["lfiar_rel_err_median"].mean()),
                "sides_swapped": int(t["sides_swapped"].sum()),
            })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="fewer phantoms for accuracy")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    t_all = time.perf_counter()
    speed_rows = speed(args.repeats)
    acc_rows = accuracy(args.quick)
    doc = {
        "what": "N4 wall/CPU seconds (best of repeats, one thread) of the plain fit and coarser "
                "fit grids on realistic volumes; the default method's accuracy against planted "
                "truth with each (lfiar_rel_err_median: mean over phantoms of each phantom's "
                "median)",
        "configs": [{"config": c, "n4_fit_spacing_mm": s, "n4_iterations": list(i)}
                    for c, s, i in CONFIGS],
        "speed": speed_rows,
        "accuracy": acc_rows,
        "seconds_total": time.perf_counter() - t_all,
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                    "cpu_count": os.cpu_count(),
                    "note": "2-core machine shared with other jobs: wall times inflated; CPU "
                            "seconds approximate a quiet core"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(pd.DataFrame(acc_rows).to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
