"""Segmentation speed on CPU: nnU-Net's own CLI with its defaults vs ``esma segment``.

Same model (the demo model unless ``--model``), same volumes (the real example scan and held-out
synthetic cases, all 256 x 208 x ~20), same machine, in one run.  Each method runs as a fresh
command-line process (start-up, model loading and writing included, as a user runs it):

``nnunet_default``
    ``nnUNetv2_predict_from_modelfolder -device cpu -f <all folds>``: nnU-Net's defaults
    (mirror test-time augmentation, step 0.5, 3 + 3 worker processes).
``esma_default``
    ``esma segment --device cpu`` (same settings as nnU-Net's defaults, one process).
``esma_fast``
    ``esma segment --device cpu --fast`` (one fold, no mirror TTA, step 0.75, torch resampling of the class scores).

Each method runs twice: on all ``N`` volumes (default 10) and on the first volume alone, which
splits its time into a fixed start-up (imports, model loading, worker pools) and a marginal cost
per volume: ``marginal = (T_N - T_1) / (N - 1)``, ``start-up = T_1 - marginal``.
``seconds_per_volume`` is ``T_N / N`` (start-up included, as a user running a cohort of N sees it).

Dice of every method against the reference masks is computed per muscle with sides merged, so
that nnU-Net's output (the model's unsided labels) and esma's sided output compare like for
like; the report also says whether ``esma_default`` equals nnU-Net voxel for voxel.  Target:
``esma_fast`` at least 3x faster per volume than ``nnunet_default`` (start-up included, N
volumes) with a mean Dice within 0.01.

    .venv/bin/python benchmarks/bench_segment.py            # writes benchmarks/results/segment_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from helpers.files import atomic_write_text
from helpers.labels import load_labels
from helpers.nifti import subject_from_filename
from helpers.overlap import dice_per_label
from helpers.segment import load_model
from helpers.trainset import make_training_set

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo_model" / "esma_demo_model.zip"
RESULT = REPO / "benchmarks" / "results" / "segment_speed.json"
BIN = Path(sys.executable).parent
MUSCLES = ("multifidus", "erector_spinae", "psoas_major", "quadratus_lumborum")


def _run(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall


def _muscle_map(mask: np.ndarray, labels) -> np.ndarray:
    """Label mask -> muscle index (1 + position in ``MUSCLES``), sides merged."""
    out = np.zeros(mask.shape, np.uint8)
    for lab in labels.labels:
        out[mask == lab.value] = MUSCLES.index(lab.muscle) + 1
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEMO)
    p.add_argument("--n-synthetic", type=int, default=9, help="held-out synthetic volumes")
    p.add_argument("--out", type=Path, default=RESULT)
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="esma-bench-seg-"))
    env = dict(os.environ, ESMA_CACHE=str(work / "cache"), PYTHONUNBUFFERED="1")
    os.environ["ESMA_CACHE"] = env["ESMA_CACHE"]
    try:
        info = load_model(args.model)
        example = REPO / "data" / "example"
        n_ex = args.n_synthetic // 2
        held, _, _ = make_training_set(work / "held", n_ex, args.n_synthetic - n_ex, seed=4242,
                                       prefix="bench", merge_sides=False)
        images = work / "images"
        images.mkdir()
        refs = {}
        shutil.copy(example / "sub-0001_T1w.nii.gz", images / "sub-0001_T2w.nii.gz")
        refs["sub-0001"] = example / "sub-0001_T1w_dseg.nii.gz"
        for c in held:
            shutil.copy(c.image, images / c.image.name)
            refs[subject_from_filename(c.image)] = c.mask
        nn_in = work / "nn_in"
        nn_in.mkdir()
        for img in images.iterdir():
            shutil.copy(img, nn_in / f"{subject_from_filename(img)}_0000.nii.gz")
        one, one_nn = work / "one", work / "one_nn"
        one.mkdir()
        one_nn.mkdir()
        shutil.copy(images / "sub-0001_T2w.nii.gz", one / "sub-0001_T2w.nii.gz")
        shutil.copy(nn_in / "sub-0001_0000.nii.gz", one_nn / "sub-0001_0000.nii.gz")
        sided_ref = load_labels(example / "labels.json")
        n = len(refs)
        folds = [str(f) for f in info.folds]

        def commands(src: Path, src_nn: Path, tag: str) -> dict[str, list[str]]:
            return {
                "nnunet_default": [str(BIN / "nnUNetv2_predict_from_modelfolder"), "-i", str(src_nn),
                                   "-o", str(work / f"nnunet_default{tag}"), "-m", str(info.folder),
                                   "-f", *folds, "-device", "cpu", "--disable_progress_bar"],
                "esma_default": [str(BIN / "esma"), "segment", "--images", str(src), "--model",
                                 str(args.model), "--out", str(work / f"esma_default{tag}"),
                                 "--device", "cpu"],
                "esma_fast": [str(BIN / "esma"), "segment", "--images", str(src), "--model",
                              str(args.model), "--out", str(work / f"esma_fast{tag}"),
                              "--device", "cpu", "--fast"],
            }

        runs = commands(images, nn_in, "")
        singles = commands(one, one_nn, "_one")
        load_before = os.getloadavg()
        results: dict[str, dict] = {}
        for name, cmd in runs.items():
            single = _run(singles[name], env)
            wall = _run(cmd, env)
            marginal = (wall - single) / (n - 1) if n > 1 else float("nan")
            out_labels = info.labels if name == "nnunet_default" else load_labels(work / name / "labels.json")
            dices, per_label = [], {}
            for subject, ref_path in refs.items():
                pred = _muscle_map(np.asarray(nib.load(work / name / f"{subject}.nii.gz").dataobj), out_labels)
                ref = _muscle_map(np.asarray(nib.load(ref_path).dataobj), sided_ref)
                d = dice_per_label(pred, ref, range(1, len(MUSCLES) + 1))
                dices.append(np.nanmean(list(d.values())))
                for v, x in d.items():
                    per_label.setdefault(MUSCLES[v - 1], []).append(x)
            results[name] = {
                "seconds_total": round(wall, 2),
                "seconds_per_volume": round(wall / n, 2),
                "seconds_one_volume": round(single, 2),
                "marginal_seconds_per_volume": round(marginal, 2),
                "startup_seconds": round(single - marginal, 2),
                "mean_dice": round(float(np.mean(dices)), 4),
                "dice_per_muscle": {k: round(float(np.nanmean(v)), 4) for k, v in per_label.items()},
            }
            print(name, results[name])
        esma_labels = load_labels(work / "esma_default" / "labels.json")
        identical = all(
            np.array_equal(
                _muscle_map(np.asarray(nib.load(work / "nnunet_default" / f"{s}.nii.gz").dataobj), info.labels),
                _muscle_map(np.asarray(nib.load(work / "esma_default" / f"{s}.nii.gz").dataobj), esma_labels))
            for s in refs)
        speedup = results["nnunet_default"]["seconds_per_volume"] / results["esma_fast"]["seconds_per_volume"]
        speedup_marginal = (results["nnunet_default"]["marginal_seconds_per_volume"]
                            / results["esma_fast"]["marginal_seconds_per_volume"])
        dice_gap = round(results["nnunet_default"]["mean_dice"] - results["esma_fast"]["mean_dice"], 4)
        record = {
            "benchmark": "segment_speed",
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                        "load_average_before": load_before, "load_average_after": os.getloadavg()},
            "model": {"file": args.model.name, "sha256": info.sha256, "folds": folds,
                      "configuration": info.configuration},
            "volumes": {"n": n, "shapes": sorted({str(nib.load(images / f).shape) for f in os.listdir(images)})},
            "methods": results,
            "esma_default_identical_to_nnunet": bool(identical),
            "fast_speedup_vs_nnunet_default": round(speedup, 2),
            "fast_speedup_vs_nnunet_default_marginal": round(speedup_marginal, 2),
            "fast_mean_dice_gap_vs_nnunet_default": round(dice_gap, 4),
            "targets": {"speedup_min": 3.0, "dice_gap_max": 0.01},
            "targets_met": bool(speedup >= 3.0 and dice_gap <= 0.01),
            "note": "each method is one fresh CLI process over all N volumes (start-up included) "
                    "and one over the first volume alone (start-up / marginal split); "
                    "Dice per muscle with sides merged, against the reference masks; identity "
                    "compares nnU-Net's labels with esma's after merging esma's sides",
        }
        atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
        print(json.dumps({k: record[k] for k in ("fast_speedup_vs_nnunet_default",
                                                 "fast_speedup_vs_nnunet_default_marginal",
                                                 "fast_mean_dice_gap_vs_nnunet_default",
                                                 "esma_default_identical_to_nnunet",
                                                 "targets_met")}))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
