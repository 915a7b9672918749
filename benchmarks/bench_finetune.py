"""Learning from corrections: fine-tune the shipped model on 5 cases of a "new site".

The "new site" is synthetic phantoms (:func:`helpers.synthetic.make_phantom`) with another
contrast and noise than the demo model was trained on: a T1-like image (fat 300, muscle 110
instead of 600 / 35), SNR 10, a strong left-right coil bias (0.5) and R-A-S storage.  Their
masks stand for a reviewer's corrected masks (unsided, like the shipped model's labels).

Steps, all in one run on this machine's CPU:

1. Dice of the shipped model (``data/demo_model``) on ``--held-out`` new-site cases (default 3);
2. ``train_model(..., TrainSettings(init_from=<shipped model>))`` on ``--train`` cases (default 5):
   the parent's plans and weights start the training (nnU-Net's pretrained weights), a
   ``--epochs`` x ``--iterations`` schedule (default 10 x 25) on ``--threads`` threads;
3. Dice of the fine-tuned model on the same held-out cases.

Dice is scored per unsided muscle on each model's raw prediction
(:func:`helpers.training.compare_models`: no scan checks, no left/right split, as the reference
masks are unsided).

It writes ``benchmarks/results/finetune.json``: mean held-out Dice per muscle before and after,
the gain, the wall time of the fine-tuning, when it ran and the machine's load.  On the 2-core
development machine at load 7-10 the default run took about 10 minutes in all (259 s of it
fine-tuning, the rest making phantoms and segmenting the held-out cases twice), ``--epochs 30``
about 16 minutes (645 s fine-tuning).

    nice -n 10 .venv/bin/python benchmarks/bench_finetune.py            # the default (10 x 25)
    nice -n 10 .venv/bin/python benchmarks/bench_finetune.py --epochs 30 --out \
        benchmarks/results/finetune_30epochs.json                       # the longer schedule
    nice -n 10 .venv/bin/python benchmarks/bench_finetune.py --epochs 1 --iterations 2  # a check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import nibabel as nib

from helpers.demo import find_demo_model
from helpers.files import atomic_write_text
from helpers.segment import load_model
from helpers.synthetic import make_phantom
from helpers.training import TrainingCase, TrainSettings, compare_models, train_model
from helpers.trainset import unsided

REPO = Path(__file__).resolve().parents[1]
NEW_SITE = {"i_fat": 300.0, "i_muscle": 110.0, "snr": 10.0, "bias_lr": 0.5, "orientation": "RAS"}


def new_site_cases(folder: Path, n: int, seed: int, prefix: str) -> list[TrainingCase]:
    """``n`` new-site phantoms with unsided masks, written to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for k in range(n):
        case_id = f"{prefix}{k:02d}"
        ph = make_phantom(case_id, seed=seed + k, **NEW_SITE)
        data, _ = unsided(ph.mask.get_fdata().astype("uint8"), ph.labels)
        image, mask = folder / f"{case_id}_T2w.nii.gz", folder / f"{case_id}_dseg.nii.gz"
        nib.save(ph.image, image)
        nib.save(nib.Nifti1Image(data, ph.mask.affine), mask)
        cases.append(TrainingCase(case_id, image, mask))
    return cases


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=5)
    p.add_argument("--held-out", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--iterations", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "finetune.json")
    args = p.parse_args(argv)
    parent = find_demo_model()
    if parent is None:
        p.error("no shipped model in data/demo_model")
    labels = load_model(parent).labels
    load_start = os.getloadavg()[0]
    started = datetime.now(UTC).isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory(prefix="esma-finetune-") as tmp:
        work = Path(tmp)
        train = new_site_cases(work / "train", args.train, 7000, "site-t")
        held = new_site_cases(work / "held", args.held_out, 8000, "site-h")
        t0 = time.perf_counter()
        settings = TrainSettings(
            dataset_id=777, dataset_name="EsmaNewSite", folds=(0,),
            validation_cases=(train[0].case_id,), epochs=args.epochs,
            iterations_per_epoch=args.iterations, val_iterations_per_epoch=2, device="cpu",
            num_threads=args.threads, da_workers=1, preprocess_workers=1,
            init_from=str(parent))
        result = train_model(train, labels, work / "nnunet", work / "tuned.zip", settings)
        seconds = time.perf_counter() - t0
        table = compare_models({"before": parent, "after": result.model_zip}, held, labels,
                               work / "seg", device="cpu")
    mean = table.groupby(["muscle", "model"])["dice"].mean().unstack("model")
    report = {
        "what": "fine-tune the shipped demo model on new-site phantoms (esma train --init-from)",
        "new_site": NEW_SITE,
        "n_train": args.train,
        "n_held_out": args.held_out,
        "schedule": {"epochs": args.epochs, "iterations_per_epoch": args.iterations},
        "threads": args.threads,
        "fine_tune_wall_seconds": round(seconds, 1),
        "held_out_dice": {m: {k: round(float(v), 4) for k, v in row.items()}
                          for m, row in mean.iterrows()},
        "mean_dice_before": round(float(table.loc[table.model == "before", "dice"].mean()), 4),
        "mean_dice_after": round(float(table.loc[table.model == "after", "dice"].mean()), 4),
        "measured_at": started,
        "machine": {"cpus": os.cpu_count(), "load_1min_start": round(load_start, 2),
                    "load_1min": round(os.getloadavg()[0], 2),
                    "platform": platform.platform()},
    }
    report["mean_dice_gain"] = round(report["mean_dice_after"] - report["mean_dice_before"], 4)
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
