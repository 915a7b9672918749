"""Does the starter model segment scans it has never seen?  Evidence for its model card.

Scores the starter model (``data/starter_model/esma_starter_model.zip``) and, in the same run,
the plain alternative, the demo model (``data/demo_model``), with ``esma segment``'s default
settings on:

``heldout_ood``
    Synthetic cases rendered (``helpers.synthseg.HELDOUT_SPEC``) with settings outside every
    training range: a water + fat (Dixon sum) contrast, a 450-480 mm field of view, 0.4-0.5 mm
    in-plane voxels and 7.5-9 mm slices; new label maps (seeds never used in training) of the
    three kinds.  Dice per sided label against the rendered masks.
``musclemap_sample``
    The real example scan (``data/example``) against its model-made mask: in the training
    data of the shipped model, *not* in that of the leave-one-source-out model
    (``esma_starter_model_loso.zip``, when present), which is scored too.
``totalseg_mr``
    A real abdominal MR from another site with TotalSegmentator's labels (``../shared``; skipped
    when absent): our erector spinae + multifidus merged against its autochthon per side, our
    psoas against its iliopsoas.  Never in any training data.
``speed``
    ``esma segment --fast`` on one 400 x 400 x 30 volume (2 CPU threads), model loading excluded
    (the second of two volumes in one process; target 5 s).

Writes ``benchmarks/results/starter_model.json`` and prints the tables of the model card.

    .venv/bin/python benchmarks/bench_starter_model.py [--n-heldout 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from helpers.files import atomic_write_text
from helpers.labels import load_labels
from helpers.nifti import save_like, subject_from_filename
from helpers.segment import SegmentSettings, load_model, segment_cohort
from helpers.synthseg import HELDOUT_SPEC, CaseJob, make_case
from helpers.training import dice_per_label, evaluate_masks

REPO = Path(__file__).resolve().parents[1]
STARTER = REPO / "data" / "starter_model" / "esma_starter_model.zip"
LOSO = REPO / "data" / "starter_model" / "esma_starter_model_loso.zip"
DEMO = REPO / "data" / "demo_model" / "esma_demo_model.zip"
EXAMPLE = REPO / "data" / "example"
TOTALSEG = REPO.parent / "shared" / "data" / "totalseg_mr_example"
RESULT = REPO / "benchmarks" / "results" / "starter_model.json"
#: TotalSegmentator total_mr classes (totalsegmentator/map_to_binary.py)
TS_AUTOCHTHON = {"left": 46, "right": 47}
TS_ILIOPSOAS = {"left": 48, "right": 49}
HELDOUT_SEED = 9_000_000  # training seeds are seed * 100000 + < 10000: never these


def heldout_cases(folder: Path, n_each: int) -> dict[str, tuple[Path, Path]]:
    """Render the out-of-range held-out cases; {case: (image, sided reference mask)}."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, kind in enumerate(("phantom", "template", "example")):
        for k in range(n_each):
            job = CaseJob(f"ood-{kind[:2]}{k:02d}", kind, HELDOUT_SEED + 1000 * i + k, str(folder),
                          HELDOUT_SPEC)
            img, msk, _ = make_case(job.kind, job.seed, job.spec)
            ip, mp = folder / f"{job.case_id}_T1w.nii.gz", folder / f"{job.case_id}_dseg.nii.gz"
            save_like(np.asarray(img.dataobj, dtype=np.float32), img, ip)
            save_like(np.asarray(msk.dataobj).astype(np.uint8), img, mp)
            out[job.case_id] = (ip, mp)
    return out


def segment(model: Path, images: list[Path], out: Path, fast: bool = False) -> pd.DataFrame:
    settings = SegmentSettings(device="cpu", fast=fast)
    return segment_cohort(images, model, out, settings, progress=False)


def score(model: Path, cases: dict[str, tuple[Path, Path]], work: Path) -> pd.DataFrame:
    """Dice per case and sided label with esma's default settings."""
    rows = segment(model, [v[0] for v in cases.values()], work)
    if (rows["status"] == "failed").any():
        raise SystemExit(f"segmentation failed: {rows.loc[rows['status'] == 'failed', 'error'].tolist()}")
    labels = load_labels(EXAMPLE / "labels.json")
    pairs = {}
    for case, (img, ref) in cases.items():
        pairs[case] = (work / f"{subject_from_filename(img)}.nii.gz", ref)
    return evaluate_masks(pairs, labels)


def totalseg_agreement(model: Path, work: Path) -> list[dict]:
    """Our ES + MF vs TotalSegmentator's autochthon, psoas vs iliopsoas, per side."""
    image = TOTALSEG / "mr.nii.gz"
    rows = segment(model, [image], work)
    if (rows["status"] == "failed").any():
        return [{"error": str(rows["error"].iloc[0])}]
    pred = np.asarray(nib.load(work / "mr.nii.gz").dataobj)
    ref = np.asarray(nib.load(TOTALSEG / "mr_seg_total_mr.nii.gz").dataobj)
    labels = load_labels(EXAMPLE / "labels.json")
    out = []
    for side in ("right", "left"):
        v = {lab.muscle: lab.value for lab in labels.labels if lab.side == side}
        back = np.isin(pred, [v["erector_spinae"], v["multifidus"]]).astype(np.uint8)
        d = dice_per_label(back, (ref == TS_AUTOCHTHON[side]).astype(np.uint8), [1])[1]
        out.append({"what": "erector_spinae+multifidus vs autochthon", "side": side, "dice": d,
                    "voxels_ours": int(back.sum()),
                    "voxels_totalseg": int((ref == TS_AUTOCHTHON[side]).sum())})
        ps = (pred == v["psoas_major"]).astype(np.uint8)
        ref_ps = (ref == TS_ILIOPSOAS[side]).astype(np.uint8)
        out.append({"what": "psoas_major vs iliopsoas", "side": side,
                    "dice": dice_per_label(ps, ref_ps, [1])[1], "voxels_ours": int(ps.sum()),
                    "voxels_totalseg": int(ref_ps.sum())})
    return out


def speed(model: Path, work: Path) -> dict:
    """--fast seconds for a 400 x 400 x 30 volume, model loaded (2 threads)."""
    from helpers.segment import Segmenter

    rng = np.random.default_rng(0)
    img, _, p = make_case("phantom", 77)
    data = np.asarray(nib.as_closest_canonical(img).dataobj, dtype=np.float32)
    z = data.shape[2]
    vol = np.concatenate([data] * (30 // z + 1), axis=2)[:400, :400, :30]
    pad = np.zeros((400, 400, 30), np.float32)
    pad[: vol.shape[0], : vol.shape[1]] = vol
    pad += rng.normal(0, 1, pad.shape).astype(np.float32)
    aff = np.diag([1.0, 1.0, 4.0, 1.0])
    paths = []
    for k in range(2):
        path = work / f"spd-{k}_T1w.nii.gz"
        nib.save(nib.Nifti1Image(pad, aff), path)
        paths.append(path)
    seg = Segmenter(load_model(model), SegmentSettings(device="cpu", fast=True, num_threads=2))
    times = []
    for path in paths:
        t = time.perf_counter()
        seg.predict(path)
        times.append(time.perf_counter() - t)
    return {"shape": [400, 400, 30], "spacing_mm": [1.0, 1.0, 4.0], "threads": 2,
            "seconds_first": round(times[0], 2), "seconds": round(times[1], 2),
            "source_case": p["source"]}


def _summary(df: pd.DataFrame) -> dict:
    g = df.groupby(["muscle", "side"])["dice"]
    return {f"{m}:{s}": {"mean": round(float(v.mean()), 3), "min": round(float(v.min()), 3),
                         "n": int(v.size)} for (m, s), v in g}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-heldout", type=int, default=4, help="held-out cases of each kind")
    p.add_argument("--out", type=Path, default=RESULT)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="esma-bench-starter-"))
    os.environ.setdefault("ESMA_CACHE", str(work / "cache"))
    t0 = time.perf_counter()
    cases = heldout_cases(work / "heldout", args.n_heldout)
    example = {"sub-0001": (EXAMPLE / "sub-0001_T2w.nii.gz", EXAMPLE / "sub-0001_T2w_dseg.nii.gz")}
    models = {"starter": STARTER, "demo": DEMO}
    if LOSO.is_file():
        models["starter_loso"] = LOSO
    result: dict = {"machine": {"platform": platform.platform(), "cores": os.cpu_count()},
                    "heldout_spec": json.loads(json.dumps(HELDOUT_SPEC.__dict__, default=list)),
                    "n_heldout": len(cases), "models": {}}
    for name, model in models.items():
        if not model.is_file():
            print(f"{name}: {model} not found, skipped")
            continue
        r: dict = {"model": model.name}
        ood = score(model, cases, work / f"{name}-ood")
        r["heldout_ood"] = _summary(ood)
        r["heldout_ood_by_kind"] = {
            kind: round(float(ood.loc[ood["subject"].str.startswith(f"ood-{kind[:2]}"),
                                      "dice"].mean()), 3)
            for kind in ("phantom", "template", "example")}
        r["musclemap_sample"] = _summary(score(model, example, work / f"{name}-ex"))
        if TOTALSEG.is_dir():
            r["totalseg_mr"] = totalseg_agreement(model, work / f"{name}-ts")
        if name != "starter_loso":
            r["speed_fast"] = speed(model, work / f"{name}-speed")
        result["models"][name] = r
        print(json.dumps({name: r}, indent=1))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["date"] = time.strftime("%Y-%m-%d")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
