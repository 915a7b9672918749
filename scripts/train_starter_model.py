#!/usr/bin/env python
"""Train the starter segmentation model (domain-randomised, for scans never seen) into data/.

One command, CPU only, resumable (run it again with the same ``--work`` after an interruption)::

    .venv/bin/python scripts/train_starter_model.py --work /scratch/esma-starter

Steps: training cases (``helpers.synthseg``: phantom, MuscleMap-template, real-example and
TotalSegmentator-example label maps rendered with random contrast, field of view, resolution,
bias, noise and artefacts; plus
deformed copies of the real example image, ``helpers.trainset``) -> nnU-Net raw dataset, plan and
preprocess (small 2d network, nnU-Net's ``NibabelIOWithReorient`` reader so that the storage
orientation never matters) -> train one fold (checkpoints every few epochs) -> export zip ->
``<out>/esma_starter_model.zip``, ``.sha256``, ``training.json``.  Evaluation and the model card's
Dice come from ``benchmarks/bench_starter_model.py``.

``--leave-out musclemap_sample`` trains without anything derived from the MuscleMap sample scan
(its image, its mask, and the phantoms, which are built from that mask): only the MuscleMap
template's and the TotalSegmentator label maps remain.  That model, scored on the sample, is the leave-one-source-out
check.  ``--leave-out totalseg`` trains without the label map derived from TotalSegmentator's
MR example (the recipe of the starter model before that map existed), the matching check for
that scan.

TotalSegmentator does not split erector spinae from multifidus and labels no quadratus
lumborum: its map splits the autochthon by position (``helpers.synthseg.split_autochthon``), and
the band at that border and the unlabelled muscle beside the back muscles carry nnU-Net's
``ignore`` label (``TrainSettings.ignore_label``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from helpers.files import atomic_write_text, sha256_file
from helpers.synthseg import TRAIN_SPEC, CaseJob, write_case
from helpers.training import SmallNetwork, TrainingCase, TrainSettings, train_model
from helpers.trainset import write_example_case

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("train_starter_model")

MODEL_NAME = "esma_starter_model.zip"
LABELS_DOC = {"labels": [{"value": i + 1, "muscle": m, "side": None} for i, m in enumerate(
    ("multifidus", "erector_spinae", "psoas_major", "quadratus_lumborum"))]}


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _real_case(job: tuple[str, int, str]) -> dict:
    """A deformed copy of the real example, unsided (module level: runs in workers)."""
    case_id, seed, out_dir = job
    out = Path(out_dir)
    meta = out / f"{case_id}.json"
    if not meta.is_file():
        _, params = write_example_case(case_id, seed, out, "T1w")
        params.update({"case": case_id, "kind": "real"})
        atomic_write_text(meta, json.dumps(params, default=float) + "\n")
    return json.loads(meta.read_text(encoding="utf-8"))


def _run(fn, jobs: list, workers: int) -> list:
    if workers > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            return list(pool.map(fn, jobs))
    return [fn(j) for j in jobs]


def make_cases(folder: Path, counts: dict[str, int], seed: int, workers: int,
               organs: bool = False) -> tuple[list[TrainingCase], list[dict]]:
    """Write (or reuse) the training cases; return them and their parameter rows."""
    folder.mkdir(parents=True, exist_ok=True)
    synth = [CaseJob(f"trn-{kind[:2]}{k:03d}", kind, seed * 100000 + 1000 * i + k, str(folder),
                     TRAIN_SPEC, organs)
             for i, kind in enumerate(("phantom", "template", "example", "totalseg"))
             for k in range(counts.get(kind, 0))]
    real = [(f"trn-re{k:03d}", seed * 100000 + 5000 + k, str(folder))
            for k in range(counts.get("real", 0))]
    rows = _run(write_case, synth, workers) + _run(_real_case, real, workers)
    cases = [TrainingCase(r["case"], folder / f"{r['case']}_T1w.nii.gz",
                          folder / f"{r['case']}_dseg.nii.gz") for r in rows]
    return cases, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "data" / "starter_model")
    p.add_argument("--work", type=Path, default=REPO / "build" / "starter-train",
                   help="scratch folder; an interrupted run resumes from it")
    p.add_argument("--leave-out", choices=("none", "musclemap_sample", "totalseg"),
                   default="none")
    p.add_argument("--n-phantom", type=int, default=60)
    p.add_argument("--n-template", type=int, default=60)
    p.add_argument("--n-example", type=int, default=30, help="cases from the example's label map")
    p.add_argument("--n-real", type=int, default=30, help="deformed copies of the real image")
    p.add_argument("--n-totalseg", type=int, default=30,
                   help="cases from the TotalSegmentator MR example's label map")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--features", default="8,16,32,64,128")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--patch", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--fresh", action="store_true", help="delete --work first (no resume)")
    p.add_argument("--cases-only", action="store_true", help="make the training cases and stop")
    p.add_argument("--organs", action="store_true",
                   help="procedural bodies with kidneys, liver and spleen on the upper slices")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.fresh and args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("ESMA_CACHE", str(args.work / "cache"))
    t0, c0 = time.perf_counter(), _cpu()
    # Every invocation on this work folder is recorded, so that a resumed training reports the
    # wall time of all its parts (an interrupted part ends where the next one starts).
    ledger_path = args.work / "runs.json"
    ledger = json.loads(ledger_path.read_text(encoding="utf-8")) if ledger_path.is_file() else []
    ledger.append({"start": time.time(), "argv": sys.argv[1:] if argv is None else list(argv)})
    atomic_write_text(ledger_path, json.dumps(ledger, indent=2) + "\n")
    stages: dict[str, float] = {}
    counts = {"phantom": args.n_phantom, "template": args.n_template,
              "example": args.n_example, "real": args.n_real, "totalseg": args.n_totalseg}
    if args.leave_out == "musclemap_sample":
        counts.update({"phantom": 0, "example": 0, "real": 0})
        counts["template"] = args.n_template + args.n_phantom + args.n_example + args.n_real
    elif args.leave_out == "totalseg":
        counts["totalseg"] = 0
    t = time.perf_counter()
    cases, _rows = make_cases(args.work / "cases", counts, args.seed, min(2, os.cpu_count() or 1),
                              args.organs)
    stages["make_cases"] = time.perf_counter() - t
    log.info("%d training cases ready in %.0f s (%s)", len(cases), stages["make_cases"], counts)
    if args.cases_only:
        return 0
    labels_path = args.work / "labels.json"
    atomic_write_text(labels_path, json.dumps(LABELS_DOC, indent=2) + "\n")
    val = tuple(c.case_id for c in cases[:: max(1, len(cases) // 4)][:4])
    ids = {"none": (502, "EsmaStarter"), "musclemap_sample": (503, "EsmaStarterLOSO"),
           "totalseg": (504, "EsmaStarterNoTS")}
    settings = TrainSettings(
        dataset_id=ids[args.leave_out][0], dataset_name=ids[args.leave_out][1],
        configuration="2d", folds=(0,), validation_cases=val,
        small_network=SmallNetwork(spacing_mm=1.875,
                                   features=tuple(int(f) for f in args.features.split(",")),
                                   batch_size=args.batch_size,
                                   patch_size=(args.patch, args.patch),
                                   plans_name="esmaStarterPlans"),
        epochs=args.epochs, iterations_per_epoch=args.iterations, val_iterations_per_epoch=3,
        rotation_deg=30.0, device="cpu", num_threads=args.threads, da_workers=1,
        preprocess_workers=2, reader="NibabelIOWithReorient", resume=True, save_every=2,
        seed=args.seed, ignore_label=counts["totalseg"] > 0,
    )
    note = (f"helpers.synthseg cases: {counts['phantom']} phantom, {counts['template']} MuscleMap "
            f"template, {counts['example']} real-example, {counts['totalseg']} "
            f"TotalSegmentator-example label maps; {counts['real']} deformed "
            f"copies of the real example image (leave out: {args.leave_out}; organs: "
            f"{args.organs})")
    out_zip = args.work / MODEL_NAME
    t = time.perf_counter()
    result = train_model(cases, labels_path, args.work / "nnunet", out_zip, settings,
                         metadata={"training_data": note})
    stages["train_model"] = time.perf_counter() - t
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    ledger[-1].update({"end": time.time(), "cpu_seconds": round(cpu, 1)})
    atomic_write_text(ledger_path, json.dumps(ledger, indent=2) + "\n")
    ends = [r.get("end", nxt["start"]) for r, nxt in zip(ledger, [*ledger[1:], ledger[-1]],
                                                          strict=True)]
    wall_all = sum(e - r["start"] for r, e in zip(ledger, ends, strict=True))
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = {"none": "", "musclemap_sample": "_loso", "totalseg": "_no_totalseg"}[args.leave_out]
    name = MODEL_NAME.replace(".zip", f"{suffix}.zip")
    final = args.out / name
    shutil.copyfile(out_zip, final.with_name(final.name + ".part"))
    final.with_name(final.name + ".part").replace(final)
    digest = sha256_file(final)
    atomic_write_text(final.with_name(final.name + ".sha256"), f"{digest}  {final.name}\n")
    record = {
        "model": final.name, "sha256": digest, "leave_out": args.leave_out, "counts": counts,
        "organs": args.organs,
        "settings": json.loads(json.dumps(dataclasses.asdict(settings), default=str)),
        "wall_seconds": round(wall_all, 1), "cpu_seconds": round(cpu, 1),
        "wall_seconds_last_run": round(wall, 1), "runs": ledger,
        "stages_seconds": {k: round(v, 1) for k, v in {**stages, **result.stage_seconds}.items()},
        "load_average": list(os.getloadavg()), "cores": os.cpu_count(),
        "nnunet_validation": result.validation.groupby("muscle")["dice"].mean().round(4).to_dict(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    stem = f"training{suffix}"
    atomic_write_text(args.out / f"{stem}.json", json.dumps(record, indent=2) + "\n")
    log.info("wrote %s (%.1f MB) in %.0f s wall, %.0f s CPU", final,
             final.stat().st_size / 1e6, wall, cpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
