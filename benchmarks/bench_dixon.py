"""Dixon fat fraction, and the single-image methods against it, on the same phantoms.

Each phantom of ``bench_fat_methods.PHANTOMS`` is also imaged as a Dixon water/fat pair
(:func:`helpers.synthetic_dixon.make_dixon_phantom`: same anatomy, same planted per-voxel fat
fractions).  The Dixon pair is measured noise-free, with magnitude (Rician) noise at SNR 50 and
100 (plain and with ``noise_correction="rician"``) and with signed (Gaussian) noise at SNR 20;
the single-image methods measure the phantom's fat-bright T2-like image (N4 on).  Every result
is compared with the noise-free Dixon measurement of the same phantom (the Dixon truth, equal
to the planted fractions) on the aggregate rows of every level and the whole stack.  Writes
``benchmarks/results/dixon.json``.

Usage::

    .venv/bin/python benchmarks/bench_dixon.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fat_methods import PHANTOMS, QUICK, core_errors, one_thread, paired, vol

from helpers import fat
from helpers.dixon import DixonSettings, measure_dixon
from helpers.metrics import MetricsSettings, measure
from helpers.synthetic_dixon import make_dixon_phantom

RESULTS = Path(__file__).resolve().parent / "results" / "dixon.json"
#: Dixon variants: (name, make_dixon_phantom noise kwargs, DixonSettings kwargs).
DIXON_VARIANTS = [
    ("dixon noise-free", {"noise": "none"}, {}),
    ("dixon rician snr50", {"noise": "rician", "dixon_snr": 50.0}, {}),
    ("dixon rician snr50 corrected", {"noise": "rician", "dixon_snr": 50.0},
     {"noise_correction": "rician"}),
    ("dixon rician snr100", {"noise": "rician", "dixon_snr": 100.0}, {}),
    ("dixon gaussian snr20", {"noise": "gaussian", "dixon_snr": 20.0}, {}),
]


def against(result, reference) -> dict[str, float]:
    """Errors of one measurement against the Dixon truth (aggregate rows)."""
    m, a = paired(result, reference.metrics, reference.asymmetry, "_d")
    return core_errors(m, a, "_d")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three phantoms instead of six")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    one_thread()
    rows = []
    t_all = time.perf_counter()
    for name, kw in (p for p in PHANTOMS if not args.quick or p[0] in QUICK):
        truth_res = None
        for variant, noise_kw, dixon_kw in DIXON_VARIANTS:
            dp = make_dixon_phantom(name, **noise_kw, **kw)
            ph = dp.phantom
            res = measure_dixon(vol(dp.water), vol(dp.fat), vol(ph.mask, np.int16), ph.labels,
                                subject=name, levels=ph.levels,
                                dixon=DixonSettings(**dixon_kw))
            if truth_res is None:
                truth_res, truth_ph = res, ph
            rows.append({"phantom": name, "method": variant, **against(res, truth_res)})
        img, msk = vol(truth_ph.image), vol(truth_ph.mask, np.int16)
        for method in fat.FAT_METHODS:
            res = measure(img, msk, truth_ph.labels, subject=name, levels=truth_ph.levels,
                          settings=MetricsSettings(fat_method=method))
            rows.append({"phantom": name, "method": method, **against(res, truth_res)})
        print(f"{name}: done ({time.perf_counter() - t_all:.0f} s)", flush=True)
    table = pd.DataFrame(rows)
    maxed = ("fat_max_abs_pp", "csa_max_abs_mm2", "cdi_abs_err_max")
    summary = table.groupby("method", sort=False).agg(
        {c: ("max" if c in maxed else "mean") for c in table.columns if c not in
         ("phantom", "method")}).reset_index()
    doc = {
        "what": "fat_pct / CDI / LFIAR of Dixon variants and single-image methods vs the "
                "noise-free Dixon measurement (the Dixon truth) of the same phantoms",
        "summary": json.loads(summary.to_json(orient="records")),
        "per_phantom": json.loads(table.to_json(orient="records")),
        "seconds_total": time.perf_counter() - t_all,
        "machine": {"python": sys.version.split()[0], "platform": platform.platform()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(summary.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
