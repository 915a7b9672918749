"""Scale benchmark: metrics throughput and peak memory vs the read-only floor, by cohort size.

Measured in one run, on one synthetic cohort (``helpers.synthetic.make_cohort``; smaller
cohorts are the first n subjects of the largest one).  By default the subjects are the size of
a real lumbar T2 (``--template example``: the example scan's grid, 256 x 208 x 20 voxels at
0.94 x 0.94 x 4.4 mm, about 1.5 MB per subject on disk, so 1000 subjects take about 1.5 GB);
``--template small`` (96 x 96 x 8 voxels at 2.5 x 2.5 x 11 mm, 0.12 MB) is the quick path, and
``--shape`` overrides the grid (the field of view stays, so the spacing changes):

* read-only floor: nibabel reads image (``get_fdata``) + mask (``np.asarray(dataobj)``);
* the metrics stage (``helpers.metrics.measure_files``), default settings and without bias
  correction, sequential vs 2 workers (``processes`` and ``dask`` LocalCluster), all through
  ``helpers.executor.run_tasks``;
* peak memory: RSS of this process and all its children, sampled every 20 ms;
* the whole demo pipeline's wall time and papermill's own overhead (an empty parameterized
  notebook through papermill, per notebook).

Writes ``benchmarks/results/scale.json`` and prints a markdown table.  See benchmarks/README.md.

Usage::

    nice -n 10 .venv/bin/python benchmarks/bench_scale.py [--sizes 50,200,1000] [--quick]
        [--template example|small] [--shape 256x208x20] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Self

import nibabel as nib
import numpy as np
import pandas as pd
import psutil

from helpers.executor import ExecutorConfig, TaskOutcome, run_tasks

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "scale.json"
log = logging.getLogger("bench_scale")


# ------------------------------------------------------------------------------------------
# per-subject tasks (module level: picklable for the worker processes)
# ------------------------------------------------------------------------------------------
def read_only(item: dict[str, Any]) -> int:
    """The I/O floor: read image and mask fully with nibabel, return the voxel count."""
    image = nib.load(item["image"]).get_fdata()
    mask = np.asarray(nib.load(item["mask"]).dataobj)
    return int(image.size + mask.size)


def measure_one(item: dict[str, Any]) -> pd.DataFrame:
    """The metrics stage for one subject: the per-level metrics table (small)."""
    from helpers.metrics import measure_files

    result = measure_files(
        item["image"],
        item["mask"],
        item["labels"],
        subject=item["subject"],
        settings=item["settings"],
        levels_path=item.get("levels"),
    )
    return result.metrics


# ------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------
def tree_rss(children: list[psutil.Process] | None = None) -> int:
    """RSS (bytes) of this process plus its descendants (``children``: a list found earlier)."""
    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True) if children is None else children:
        try:
            total += child.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


class PeakTreeRSS:
    """Peak RSS of the process tree, sampled every ``interval`` s in a background thread.

    Finding the descendants walks every process of the machine (about 1 ms of CPU), so the
    list is refreshed only every ``refresh`` s; reading the RSS of known processes is cheap.
    With two worker processes the sampler then costs about 3 % of a core instead of 8 %
    (measured), which matters when the workers already keep every core busy (it runs in the
    parent, beside them).
    """

    def __init__(self, interval: float = 0.02, refresh: float = 0.5) -> None:
        self.interval = interval
        self.refresh = refresh
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        children: list[psutil.Process] = []
        found = -float("inf")
        while not self._stop.wait(self.interval):
            now = time.perf_counter()
            if now - found >= self.refresh:
                children, found = me.children(recursive=True), now
            self.peak = max(self.peak, tree_rss(children))

    def __enter__(self) -> Self:
        self.baseline = self.peak = tree_rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def cpu_seconds() -> float:
    """User + system CPU time (s) of this process and its finished (reaped) children."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed_run(
    func: Any, items: dict[str, Any], config: ExecutorConfig
) -> tuple[dict[str, TaskOutcome], dict[str, Any]]:
    """Run ``func`` over ``items`` with ``config``; wall time, throughput and peak memory."""
    gc.collect()
    load_before = os.getloadavg()[0]
    cpu_before = cpu_seconds()
    with PeakTreeRSS() as mem:
        start = time.perf_counter()
        outcomes = run_tasks(func, items, config, progress=False)
        wall = time.perf_counter() - start
    cpu = cpu_seconds() - cpu_before
    failed = [k for k, o in outcomes.items() if not o.ok]
    if failed:
        log.warning("%d failed, e.g. %s: %s", len(failed), failed[0], outcomes[failed[0]].error)
    n = len(items)
    return outcomes, {
        "n": n,
        "executor": config.kind,
        "workers": 1 if config.kind == "sequential" else config.workers,
        "wall_s": round(wall, 3),
        "subjects_per_s": round(n / wall, 3),
        "s_per_subject": round(wall / n, 4),
        "task_s_mean": round(statistics.fmean(o.seconds for o in outcomes.values()), 4),
        "cpu_s": round(cpu, 2),
        "cpu_s_per_subject": round(cpu / n, 4),
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "peak_rss_mb": round(mem.peak / 2**20, 1),
        "peak_above_baseline_mb": round((mem.peak - mem.baseline) / 2**20, 1),
        "failed": len(failed),
    }


def same_values(a: dict[str, TaskOutcome], b: dict[str, TaskOutcome]) -> bool:
    """True when two runs gave identical values (tables compared exactly) for every subject."""
    if list(a) != list(b):
        return False
    for key, oa in a.items():
        ob = b[key]
        if oa.ok != ob.ok:
            return False
        if isinstance(oa.value, pd.DataFrame):
            if not oa.value.equals(ob.value):
                return False
        elif oa.value != ob.value:
            return False
    return True


# ------------------------------------------------------------------------------------------
# cohort
# ------------------------------------------------------------------------------------------
def make_chunk(spec: tuple[int, list[str], str, str, tuple[int, int, int] | None]) -> pd.DataFrame:
    """One chunk of the cohort (its own cohort seed, so chunks draw different subjects)."""
    from helpers.synthetic import make_cohort

    chunk_seed, subjects, out_dir, template, shape = spec
    plan = pd.DataFrame({"subject": subjects})
    extra = {"shape": shape} if shape is not None else {}
    return make_cohort(
        len(subjects), out_dir, seed=chunk_seed, template=template, plan=plan, **extra
    )


def build_cohort(
    n: int,
    out_dir: Path,
    workers: int,
    template: str = "example",
    shape: tuple[int, int, int] | None = None,
    reuse: bool = False,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The synthetic cohort (n subjects on ``template``'s grid, or ``shape``) and facts about it.

    Generated in chunks of 50 subjects on ``workers`` processes (through the executor).  With
    ``reuse``, a cohort an earlier ``--keep`` / ``--workdir`` run left in ``out_dir`` (every
    chunk's ``manifest.csv`` present, n subjects in all) is read instead of generated.
    """
    start = time.perf_counter()
    width = max(3, len(str(n)))
    names = [f"syn-{i + 1:0{width}d}" for i in range(n)]
    chunks = {
        f"chunk-{k:03d}": (k, names[i : i + 50], str(out_dir / f"chunk-{k:03d}"), template, shape)
        for k, i in enumerate(range(0, n, 50))
    }
    existing = [out_dir / name / "manifest.csv" for name in chunks]
    if reuse and all(p.is_file() for p in existing):
        manifest = pd.concat([pd.read_csv(p) for p in existing], ignore_index=True)
        if manifest["subject"].astype(str).tolist() != names:
            msg = f"--reuse-cohort: {out_dir} holds another cohort; drop the option"
            raise RuntimeError(msg)
        generated = False
    else:
        config = (
            ExecutorConfig(kind="processes", workers=workers)
            if len(chunks) > 1
            else ExecutorConfig()
        )
        outcomes = run_tasks(make_chunk, chunks, config, desc="cohort")
        bad = [o.error for o in outcomes.values() if not o.ok]
        if bad:
            msg = f"cohort generation failed: {bad[0]}"
            raise RuntimeError(msg)
        manifest = pd.concat([o.value for o in outcomes.values()], ignore_index=True)
        generated = True
    seconds = time.perf_counter() - start
    first = manifest.iloc[0]
    img = nib.load(first["image"])
    sizes = [Path(p).stat().st_size for p in (*manifest["image"], *manifest["mask"])]
    disk = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    facts = {
        "n_generated": n,
        "generate_s": round(seconds, 1) if generated else None,
        "reused": not generated,
        "template": template,
        "shape_override": list(shape) if shape is not None else None,
        "shape": list(img.shape),
        "zooms_mm": [round(float(z), 3) for z in img.header.get_zooms()[:3]],
        "image_dtype": str(img.get_data_dtype()),
        "mean_file_kb": round(statistics.fmean(sizes) / 1024, 1),
        "disk_mb": round(disk / 2**20, 1),
        "disk_mb_per_subject": round(disk / 2**20 / n, 3),
    }
    return manifest, facts


def labels_path_of(manifest: pd.DataFrame, cohort_dir: Path) -> str:
    """The label file of the cohort (a manifest column, or labels.json in the cohort folder)."""
    if "labels" in manifest.columns:
        return str(manifest["labels"].iloc[0])
    for candidate in (cohort_dir / "labels.json", *cohort_dir.rglob("labels.json")):
        if candidate.exists():
            return str(candidate)
    from helpers.synthetic import LABELS_DOC

    path = cohort_dir / "labels.json"
    path.write_text(json.dumps(LABELS_DOC))
    return str(path)


def metrics_settings(bias_correction: bool) -> Any:
    """Default MetricsSettings, optionally with bias correction switched off."""
    from helpers.metrics import MetricsSettings

    settings = MetricsSettings()
    if bias_correction:
        return settings
    names = {f.name for f in dataclasses.fields(settings)}
    if "bias_correction" not in names:
        msg = f"MetricsSettings has no 'bias_correction' field (fields: {sorted(names)})"
        raise RuntimeError(msg)
    value = settings.bias_correction
    off: Any = False if isinstance(value, bool) else None
    if isinstance(value, str):
        off = "none"
    return dataclasses.replace(settings, bias_correction=off)


# ------------------------------------------------------------------------------------------
# papermill and the demo pipeline
# ------------------------------------------------------------------------------------------
def papermill_overhead(work: Path, repeats: int = 3) -> dict[str, Any]:
    """Wall time of an empty parameterized notebook through papermill (kernel start included)."""
    import nbformat
    import papermill as pm

    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("x = 1  # int: a parameter")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("y = x + 1")]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    src = work / "empty.ipynb"
    nbformat.write(nb, src)
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        pm.execute_notebook(
            str(src), str(work / f"empty_out{i}.ipynb"), parameters={"x": 2}, progress_bar=False
        )
        times.append(time.perf_counter() - start)
    return {
        "empty_notebook_s": round(statistics.median(times), 2),
        "runs_s": [round(t, 2) for t in times],
    }


def demo_pipeline(
    work: Path, per_notebook_overhead_s: float, subjects: int | None = None
) -> dict[str, Any]:
    """Wall time of ``esma demo`` (build + whole pipeline) in a subprocess, with the run's own
    per-notebook and per-stage timings (its ``manifest.json``) against papermill's overhead."""
    try:
        from helpers import demo  # noqa: F401 - only checks that the pipeline exists
    except ImportError as exc:
        return {"status": f"skipped: helpers.demo not available ({exc})"}
    esma = Path(sys.executable).with_name("esma")
    # A fresh folder each time: in a kept work folder, esma would resume the earlier demo
    # (finished stages are not recomputed) and this would time a resume.
    out = Path(tempfile.mkdtemp(prefix="demo-", dir=work))
    command = [str(esma), "demo", "--out", str(out), "--quiet"]
    if subjects is not None:
        command += ["--subjects", str(subjects)]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO)
    wall = time.perf_counter() - start
    result: dict[str, Any] = {"command": " ".join(["esma", *command[1:]]), "wall_s": round(wall, 1)}
    if proc.returncode != 0:
        result["status"] = f"failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}"
        return result
    manifests = sorted(out.rglob("manifest.json"), key=lambda p: p.stat().st_mtime)
    if not manifests:
        result["status"] = "ok, but no manifest.json found (no per-notebook timings)"
        return result
    manifest = json.loads(manifests[-1].read_text())
    notebooks = {nb["name"]: nb["seconds"] for nb in manifest.get("notebooks", [])}
    overhead = len(notebooks) * per_notebook_overhead_s
    run_s = float(manifest.get("seconds", sum(notebooks.values())))
    result.update(
        status="ok",
        n_subjects=manifest.get("n_subjects"),
        run_s=round(run_s, 1),
        build_s=round(wall - run_s, 1),
        notebooks_s=notebooks,
        stages_s={st.get("stage", "?"): st.get("seconds") for st in manifest.get("stages", [])},
        papermill_overhead_s=round(overhead, 1),
        papermill_overhead_pct_of_run=round(100 * overhead / run_s, 1) if run_s else None,
        notebook_work_s=round(run_s - overhead, 1),
    )
    return result


def measure_pipeline(work: Path, subjects: int | None) -> dict[str, Any]:
    """Papermill's overhead and the demo pipeline (a failure is reported, not raised)."""
    try:
        pm = papermill_overhead(work)
        return {"papermill": pm, "demo": demo_pipeline(work, pm["empty_notebook_s"], subjects)}
    except Exception as exc:  # noqa: BLE001 - report, keep the metrics results
        return {"status": f"failed: {type(exc).__name__}: {exc}"}


def remeasure_pipeline(
    work: Path, args: argparse.Namespace, started: str, load_at_start: float
) -> int:
    """``--pipeline-only``: replace the pipeline entry of an earlier run's results file."""
    result = json.loads(args.out.read_text())
    pipeline = measure_pipeline(work, args.demo_subjects)
    pipeline["remeasured"] = {
        "started": started,
        "load_avg_1m_at_start": round(load_at_start, 2),
        "warning": busy_warning(load_at_start),
        "why": "measured on its own, after the run that gave the rows (--pipeline-only)",
    }
    result["pipeline"] = pipeline
    write_json(args.out, result)
    print(f"- pipeline: {json.dumps(pipeline)}\n\nupdated {args.out}")
    return 0


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------
def write_json(path: Path, result: dict[str, Any]) -> None:
    """Write ``result`` to ``path`` atomically (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)


def checks(rows: list[dict[str, Any]], sizes: list[int], workers: int) -> dict[str, Any]:
    """The issue's targets, evaluated on the measured rows."""

    def row(n: int, stage: str, executor: str) -> dict[str, Any] | None:
        for r in rows:
            if (r["n"], r["stage"], r["executor"]) == (n, stage, executor):
                return r
        return None

    def largest(stage: str) -> int:
        """The largest cohort the stage ran on (the default stage may stop short)."""
        ran = [n for n in sizes if row(n, stage, "sequential")]
        return max(ran) if ran else max(sizes)

    out: dict[str, Any] = {}
    small = min(sizes)
    big = largest("metrics_default")
    seq, par = row(big, "metrics_default", "sequential"), row(big, "metrics_default", "processes")
    if seq and par:
        speedup = par["subjects_per_s"] / seq["subjects_per_s"]
        out["speedup_2_processes"] = {
            "value": round(speedup, 2),
            "target": ">= 1.8",
            "met": speedup >= 1.8,
            "n": big,
            "workers": workers,
        }
    dpar = row(big, "metrics_default", "dask")
    if seq and dpar:
        speedup = dpar["subjects_per_s"] / seq["subjects_per_s"]
        out["speedup_2_dask"] = {
            "value": round(speedup, 2),
            "target": ">= 1.8",
            "met": speedup >= 1.8,
            "n": big,
        }
    n_all = largest("metrics_no_bias")
    nobias = row(n_all, "metrics_no_bias", "sequential")
    floor = row(n_all, "read_floor", "sequential")
    if nobias and floor:
        ratio = nobias["wall_s"] / floor["wall_s"]
        out["no_bias_vs_read_floor"] = {
            "value": round(ratio, 2),
            "target": "<= 2",
            "met": ratio <= 2.0,
            "n": n_all,
        }
    for stage in ("metrics_default", "metrics_no_bias"):
        big = largest(stage)
        if big != small:
            a, b = row(small, stage, "sequential"), row(big, stage, "sequential")
            if a and b:
                r = b["s_per_subject"] / a["s_per_subject"]
                out[f"linear_time_{stage}"] = {
                    "value": round(r, 2),
                    "meaning": f"s/subject at n={big} over n={small}",
                    "target": "<= 1.25",
                    "met": r <= 1.25,
                }
            for executor in ("sequential", "processes", "dask"):
                a, b = row(small, stage, executor), row(big, stage, executor)
                if a and b:
                    grow = b["peak_rss_mb"] - a["peak_rss_mb"]
                    limit = 0.25 * a["peak_rss_mb"] + 50
                    out[f"flat_memory_{stage}_{executor}"] = {
                        "value_mb": round(grow, 1),
                        "meaning": f"peak RSS (process tree) at n={big} minus n={small}",
                        "target_mb": f"<= {limit:.0f}",
                        "met": grow <= limit,
                    }
    return out


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The measured rows as a markdown table."""
    seq = {(r["n"], r["stage"]): r for r in rows if r["executor"] == "sequential"}
    floor = {
        r["n"]: r for r in rows if r["stage"] == "read_floor" and r["executor"] == "sequential"
    }
    lines = [
        (
            "| n | stage | executor | wall s | subjects/s | speed-up vs sequential "
            "| x read floor | CPU s/subject | peak RSS MB (tree) | load |"
        ),
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = seq.get((r["n"], r["stage"]))
        speed = f"{r['subjects_per_s'] / base['subjects_per_s']:.2f}" if base else ""
        fl = floor.get(r["n"])
        xfloor = (
            f"{r['wall_s'] / fl['wall_s']:.2f}"
            if fl and r["executor"] == "sequential" and r["stage"] != "read_floor"
            else ""
        )
        lines.append(
            f"| {r['n']} | {r['stage']} | {r['executor']} | {r['wall_s']:.1f} "
            f"| {r['subjects_per_s']:.2f} | {speed} | {xfloor} | {r['cpu_s_per_subject']:.3f} "
            f"| {r['peak_rss_mb']:.0f} | {max(r['load_avg_1m']):.1f} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------
def autogroup() -> bool | None:
    """Whether the Linux scheduler groups CPU time per session (None when unknown)."""
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return None


def busy_warning(load: float) -> str | None:
    """A warning when other work loads the machine (parallel speed-ups are then not measurable:
    with session autogroups the benchmark's processes share one fair share of the CPU)."""
    cpus = os.cpu_count() or 1
    if load < 0.5 * cpus:
        return None
    return (
        f"load average {load:.1f} on {cpus} CPUs before the benchmark started: other work "
        "competes for the CPU, so wall times, and parallel speed-ups in particular, are not "
        "representative; re-run on a quiet machine"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="50,200,1000", help="cohort sizes, comma-separated")
    p.add_argument(
        "--quick",
        action="store_true",
        help="sizes 20,50, small template, no dask, no pipeline (a smoke test of the benchmark)",
    )
    p.add_argument(
        "--template",
        choices=("example", "small"),
        help="subject grid: 'example' (default; the real example's 256x208x20 at 0.94x0.94x4.4 "
        "mm) or 'small' (96x96x8 at 2.5x2.5x11 mm; the default with --quick)",
    )
    p.add_argument(
        "--shape",
        help="override the grid, e.g. 256x208x20 (L-P-S voxels; the field of view stays, so "
        "the spacing changes)",
    )
    p.add_argument(
        "--default-max-size",
        type=int,
        help="run the default stage (with N4, about 1.5 s of CPU per realistic subject) only "
        "for cohorts up to this size; the read floor and the stage without bias correction run "
        "for every size (default: every size)",
    )
    p.add_argument("--workers", type=int, default=2, help="parallel workers (default 2)")
    p.add_argument("--no-dask", action="store_true", help="skip the dask LocalCluster runs")
    p.add_argument("--no-pipeline", action="store_true", help="skip papermill and esma demo")
    p.add_argument(
        "--pipeline-only",
        action="store_true",
        help="measure only papermill and esma demo, and replace the 'pipeline' entry of an "
        "earlier run's --out file (which records when and on what load it was re-measured)",
    )
    p.add_argument(
        "--demo-subjects", type=int, help="synthetic subjects of the demo (default: esma's 24)"
    )
    p.add_argument("--workdir", type=Path, help="where the cohort is written (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument(
        "--reuse-cohort",
        action="store_true",
        help="read the cohort an earlier run left in --workdir instead of generating it",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    args = p.parse_args(argv)
    if args.pipeline_only and (args.no_pipeline or not args.out.exists()):
        p.error(f"--pipeline-only: needs an earlier run's {args.out} and no --no-pipeline")
    if args.quick:
        args.sizes = "20,50" if args.sizes == "50,200,1000" else args.sizes
        args.no_dask = True
        args.no_pipeline = True
    if args.template is None:
        args.template = "small" if args.quick else "example"
    if args.shape is not None:
        try:
            shape = tuple(int(v) for v in args.shape.lower().replace(",", "x").split("x"))
        except ValueError:
            shape = ()
        if len(shape) != 3 or min(shape) < 2:
            p.error(f"--shape: give three voxel counts like 256x208x20, got {args.shape!r}")
        args.shape = shape
    args.sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    if not args.sizes or min(args.sizes) < 1:
        p.error("--sizes: give positive cohort sizes, e.g. 50,200,1000")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="esma-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    load_at_start = os.getloadavg()[0]
    if busy_warning(load_at_start):
        print(f"WARNING: {busy_warning(load_at_start)}", flush=True)
    t0 = time.perf_counter()
    try:
        if args.pipeline_only:  # the work folder is cleaned up below, as after a full run
            return remeasure_pipeline(work, args, started, load_at_start)
        print(
            f"building a cohort of {max(args.sizes)} subjects ({args.template} template"
            f"{', shape ' + 'x'.join(map(str, args.shape)) if args.shape else ''}) in {work} ...",
            flush=True,
        )
        cohort_dir = work / "cohort"
        manifest, cohort = build_cohort(
            max(args.sizes), cohort_dir, args.workers, args.template, args.shape,
            reuse=args.reuse_cohort,
        )
        labels = labels_path_of(manifest, cohort_dir)
        settings = {
            "metrics_default": metrics_settings(bias_correction=True),
            "metrics_no_bias": metrics_settings(bias_correction=False),
        }
        parallel = [ExecutorConfig(kind="processes", workers=args.workers)]
        if not args.no_dask:
            parallel.append(ExecutorConfig(kind="dask", workers=args.workers))

        rows: list[dict[str, Any]] = []
        identical: dict[str, bool] = {}
        for n in args.sizes:
            sub = manifest.iloc[:n]
            base_items = {
                str(r.subject): {
                    "subject": str(r.subject),
                    "image": str(r.image),
                    "mask": str(r.mask),
                    "labels": labels,
                    "levels": str(r.levels)
                    if "levels" in sub.columns and pd.notna(r.levels)
                    else None,
                }
                for r in sub.itertuples()
            }
            runs: list[tuple[str, Any, dict[str, Any], list[ExecutorConfig]]] = [
                ("read_floor", read_only, base_items, [parallel[0]]),
            ]
            for stage, stage_settings in settings.items():
                if stage == "metrics_default" and n > (args.default_max_size or n):
                    continue
                items = {k: {**v, "settings": stage_settings} for k, v in base_items.items()}
                runs.append((stage, measure_one, items, parallel))
            for stage, func, items, configs in runs:
                ref, stats = timed_run(func, items, ExecutorConfig())
                rows.append({"stage": stage, **stats})
                print(f"n={n} {stage} sequential: {stats['wall_s']:.1f} s", flush=True)
                for cfg in configs:
                    out, stats = timed_run(func, items, cfg)
                    rows.append({"stage": stage, **stats})
                    identical[f"n={n} {stage} {cfg.kind}"] = same_values(ref, out)
                    print(f"n={n} {stage} {cfg.kind}: {stats['wall_s']:.1f} s", flush=True)
                del ref, out

        pipeline: dict[str, Any] = {"status": "skipped (--no-pipeline)"}
        if not args.no_pipeline:
            pipeline = measure_pipeline(work, args.demo_subjects)

        result = {
            "benchmark": "bench_scale",
            "started": started,
            "total_s": round(time.perf_counter() - t0, 1),
            "machine": {
                "cpus": os.cpu_count(),
                "load_avg_1m_at_start": round(load_at_start, 2),
                "load_avg_1m": round(os.getloadavg()[0], 2),
                "sched_autogroup": autogroup(),
                "warning": busy_warning(load_at_start),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "sizes": args.sizes,
            "workers": args.workers,
            "cohort": cohort,
            "rows": rows,
            "identical_to_sequential": identical,
            "checks": checks(rows, args.sizes, args.workers),
            "pipeline": pipeline,
        }
        write_json(args.out, result)

        print()
        print(
            f"Cohort ({cohort['template']} template): {cohort['shape']} voxels at "
            f"{cohort['zooms_mm']} mm ({cohort['mean_file_kb']} kB per file, "
            f"{cohort['disk_mb']} MB in all, generated in {cohort['generate_s']} s); "
            f"{os.cpu_count()} CPUs, load {result['machine']['load_avg_1m']}"
        )
        print()
        print(markdown_table(rows))
        print()
        for name, check in result["checks"].items():
            print(f"- {name}: {check}")
        print(f"- identical to sequential: {all(identical.values())}")
        print(f"- pipeline: {json.dumps(pipeline)}")
        print(f"\nwrote {args.out}")
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
