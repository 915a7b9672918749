"""Throughput end to end (issue 19): a fresh ``esma run`` against ``esma segment`` alone.

In one invocation and one process tree, on one cohort with the same settings, this runs

* ``esma segment`` alone on the cohort's images (the network's own time), and
* a fresh ``esma run`` of the study (empty output and work folders: nothing reused), once per
  *variant* (``--variants``): ``default`` (the study as built), ``mosaic-plain`` (QC mosaics
  as before issue 19: a matplotlib figure with one axes per tile, every subject with all its
  slices), ``mosaic-direct-full`` (composed directly, every subject in full), ``sequential``
  (``executor: sequential``, for the scaling of item 3), ``shared-kernel`` (all notebooks in
  one kernel, ``esma run --shared-kernel``),

and reports the ratio run / segment, the per-stage breakdown (wall and CPU), the per-notebook
overhead (kernel start, imports, display), the HTML export cost, peak memory of the whole
process tree, the lever settings in force, the load average and the machine.  Both commands go
through the public CLI (``python -m helpers.cli``) with ``PYTHONPATH`` set to this repository,
so the notebooks' kernels import this tree's ``helpers`` too.

The cohort is the demo study (:func:`helpers.demo.build_demo`, the demo's settings: the demo
model on the CPU with ``fast``, N4 bias correction on, ``processes`` with 2 workers):
``--subjects N`` gives ``N - 1`` synthetic subjects on the real scan's grid (256 x 208 x 20,
``helpers.synthetic``) plus the real example scan; 25 is the demo cohort.

How the breakdown is measured
-----------------------------
* **Wall and CPU of the whole command**: ``time.perf_counter`` around it and
  ``getrusage(RUSAGE_CHILDREN)`` of this process (every process of the tree is reaped by its
  parent: exact).
* **Per stage**: the run's stage records (``stages/<stage>.json``: wall seconds; the file is
  written when the stage ends, so its modification time is the stage's end).  The CPU of the
  whole process tree is sampled every ``--sample-interval`` s (psutil: user + system of every
  live process plus what each has reaped), and a stage's CPU is the increase of that series
  over the stage's interval.  ``measure`` is a stage of its own before ``qc`` (in older runs
  it ran inside ``qc``); ``qc_own`` is qc without any measurement inside it.
* **Per notebook**: the manifest's execution seconds (papermill, kernel start included, HTML
  export excluded) and, with one kernel per notebook, the kernel process's own CPU (its
  lifetime as seen by the sampler; a shared kernel's CPU is reported for the run);
  ``overhead`` is the notebook's wall minus the stages it calls (``NOTEBOOK_STAGES``).
* **Outside the notebooks**: the run's wall minus the notebooks' (study checks, input
  checksums, HTML export, manifest and index) and the ``esma`` process's own CPU.
* **HTML export**: each executed notebook of the ``default`` run exported again with
  :func:`helpers.runner.export_html` in a fresh process (import of nbconvert timed apart).
* **Mosaic lever** (when this tree has ``mosaic_png_bytes(renderer=...)``): CPU seconds of one
  mosaic per subject in this process, on up to ``--mosaic-subjects`` subjects of the cohort:
  matplotlib with all slices (before), composed directly with all slices, and composed directly
  with the thumbnail's slices (``mosaic_pass_max_slices``, what a passing subject gets).

Results go to ``benchmarks/results/throughput.json`` under the cohort size (an earlier entry
for another size is kept), with ``checks`` over every size present: ratio <= 2.0, the whole run
with 2 workers >= 1.8x sequential, and peak memory flat with cohort size.

Usage::

    nice -n 10 .venv/bin/python benchmarks/bench_throughput.py                  # 25 subjects
    nice -n 10 .venv/bin/python benchmarks/bench_throughput.py --subjects 200 --variants default
    .venv/bin/python benchmarks/bench_throughput.py --subjects 25 --variants default --quick

See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: import this tree's helpers
    sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "throughput.json"
log = logging.getLogger("bench_throughput")

#: Study patches of the variants (deep-merged into the study YAML as built).
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    # every lever of this branch off: matplotlib mosaics of every subject in full, kernels
    # with libgomp's default OpenMP wait policy (the HTML exporter cache cannot be switched off)
    "plain": {"qc": {"mosaic_renderer": "matplotlib", "mosaic_pass_max_slices": 12}},
    # the QC mosaics as before issue 19: a matplotlib figure, every subject in full
    "mosaic-plain": {"qc": {"mosaic_renderer": "matplotlib", "mosaic_pass_max_slices": 12}},
    # composed directly, every subject in full (the renderer lever alone)
    "mosaic-direct-full": {"qc": {"mosaic_pass_max_slices": 12}},
    # the kernels' OpenMP threads spin as libgomp does by default / sleep when idle
    "omp-default": {},
    "omp-passive": {},
    "sequential": {"executor": {"kind": "sequential"}},
    # all notebooks in one kernel (esma run --shared-kernel)
    "shared-kernel": {},
}
#: Command-line options of the variants' ``esma run``.
VARIANT_ARGS: dict[str, tuple[str, ...]] = {"shared-kernel": ("--shared-kernel",)}
#: Environment of the variants' ``esma run`` (added to this process's; ``""`` is unset for
#: libgomp, and ``esma run`` keeps a value that is set).
VARIANT_ENV: dict[str, dict[str, str]] = {
    "plain": {"OMP_WAIT_POLICY": ""},
    "omp-default": {"OMP_WAIT_POLICY": ""},
    "omp-passive": {"OMP_WAIT_POLICY": "PASSIVE"},
}
#: The stages each pipeline notebook calls (its overhead is its wall minus theirs).
NOTEBOOK_STAGES: dict[str, tuple[str, ...]] = {
    "01_segment": ("segment",),
    "02_qc": ("measure", "qc", "qc_own"),
    "03_metrics": ("metrics",),
    "04_statistics": ("statistics",),
}
#: Targets of issue 19.
MAX_RATIO = 2.0
MIN_SPEEDUP = 1.8
#: Memory is flat when the largest cohort's peak is within this factor (+ slack) of the smallest.
MEMORY_FACTOR, MEMORY_SLACK_MB = 1.25, 50.0


# ------------------------------------------------------------------------------------------
# measurement of a command's process tree
# ------------------------------------------------------------------------------------------
def _proc_cpu(proc: psutil.Process) -> float:
    """User + system CPU (s) of ``proc`` and of the children it has reaped."""
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass
class KernelSeen:
    """A notebook kernel process as the sampler saw it."""

    pid: int
    first: float
    last: float
    cpu: float = 0.0
    peak_rss: int = 0


@dataclass
class TreeSampler:
    """CPU and RSS of a process and all its descendants, sampled in a background thread.

    ``series`` holds ``(unix time, cumulative CPU s, RSS bytes)``; kernels (``ipykernel`` in
    the command line) are tracked apart.  A process's CPU after its last sample is missed
    until its parent reaps it, so the series runs up to one interval behind.
    """

    root: psutil.Process
    interval: float = 0.1
    series: list[tuple[float, float, int]] = field(default_factory=list)
    kernels: dict[int, KernelSeen] = field(default_factory=dict)
    root_own_cpu: float = 0.0
    peak_rss: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _sample(self) -> None:
        now = time.time()
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        cpu, rss = 0.0, 0
        for p in procs:
            try:
                with p.oneshot():
                    c = _proc_cpu(p)
                    r = p.memory_info().rss
                    if p.pid == self.root.pid:
                        t = p.cpu_times()
                        self.root_own_cpu = t.user + t.system
                    elif p.pid in self.kernels or (
                        p.ppid() == self.root.pid and any("ipykernel" in a for a in p.cmdline())
                    ):  # a kernel is a child of esma (a worker shows ipykernel until exec)
                        k = self.kernels.setdefault(p.pid, KernelSeen(p.pid, now, now))
                        k.last, k.cpu, k.peak_rss = now, c, max(k.peak_rss, r)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            cpu += c
            rss += r
        self.series.append((now, cpu, rss))
        self.peak_rss = max(self.peak_rss, rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def cpu_between(self, start: float, end: float) -> float:
        """CPU seconds of the tree between two unix times (linear between samples)."""
        import numpy as np

        if len(self.series) < 2:
            return float("nan")
        t = np.array([s[0] for s in self.series])
        c = np.maximum.accumulate(np.array([s[1] for s in self.series]))
        return float(np.interp(end, t, c) - np.interp(start, t, c))


def children_cpu() -> float:
    """User + system CPU (s) of this process's reaped children."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def child_env() -> dict[str, str]:
    """This environment with this repository first on ``PYTHONPATH`` (kernels inherit it)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    )
    return env


def esma(*args: str) -> list[str]:
    """The ``esma`` command line of this interpreter and tree."""
    return [sys.executable, "-m", "helpers.cli", *args]


def timed_command(
    cmd: Sequence[str],
    *,
    cwd: Path,
    interval: float,
    log_file: Path,
    env: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], TreeSampler]:
    """Run ``cmd`` (waiting for it) and measure its wall, CPU, peak memory and load."""
    load_before = os.getloadavg()
    cpu_before = children_cpu()
    start_unix, t0 = time.time(), time.perf_counter()
    with log_file.open("w") as out:
        proc = subprocess.Popen(
            list(cmd), cwd=cwd, env={**child_env(), **(env or {})}, stdout=out,
            stderr=subprocess.STDOUT,
        )
        with TreeSampler(psutil.Process(proc.pid), interval) as sampler:
            code = proc.wait()
    wall = time.perf_counter() - t0
    cpu = children_cpu() - cpu_before
    record = {
        "command": " ".join(Path(c).name if i == 0 else str(c) for i, c in enumerate(cmd)),
        "exit_code": code,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "cpu_per_wall": round(cpu / wall, 3) if wall else None,
        "peak_rss_tree_mb": round(sampler.peak_rss / 2**20, 1),
        "started_unix": round(start_unix, 3),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }
    if code not in (0,):
        record["log_tail"] = log_file.read_text(errors="replace")[-2000:]
    return record, sampler


# ------------------------------------------------------------------------------------------
# the cohort and the study variants
# ------------------------------------------------------------------------------------------
def build_cohort(folder: Path, subjects: int, workers: int) -> Path:
    """The demo study with ``subjects - 1`` synthetic subjects + the real example scan."""
    from helpers.demo import DemoSpec, build_demo

    if subjects < 2:
        msg = "--subjects must be at least 2 (the example scan + one synthetic subject)"
        raise SystemExit(msg)
    spec = DemoSpec(n_synthetic=subjects - 1, workers=workers)
    return build_demo(folder, spec)


def _merge(base: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in patch.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def variant_study(study: Path, name: str) -> Path:
    """A copy of the study for a variant, with its own empty output (and so work) folder."""
    doc = yaml.safe_load(study.read_text(encoding="utf-8"))
    doc = _merge(doc, VARIANTS[name])
    doc["output"] = f"out-{name}"
    out = study.parent / doc["output"]
    if out.exists():
        shutil.rmtree(out)
    target = study.parent / f"study-{name}.yml"
    target.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return target


def segment_arguments(study: Path) -> list[str]:
    """``esma segment`` options giving the study's segmentation settings."""
    from helpers.config import load_study

    s = load_study(study).segment_settings()
    args = ["--device", s.device]
    if s.fast:
        args.append("--fast")
    if s.folds:
        args += ["--folds", ",".join(str(f) for f in s.folds)]
    if s.num_threads:
        args += ["--threads", str(s.num_threads)]
    if not s.split_sides:
        args.append("--no-split-sides")
    if not s.check_scan:
        args.append("--no-scan-check")
    return args


def segment_inputs(study: Path, folder: Path) -> Path:
    """A folder of links ``<subject>.nii.gz`` to the study's images (as ``esma run`` stages)."""
    from helpers.config import load_study

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for s in load_study(study).subjects:
        (folder / f"{s.subject}.nii.gz").symlink_to(Path(s.image).resolve())
    return folder


# ------------------------------------------------------------------------------------------
# the run's records
# ------------------------------------------------------------------------------------------
def _stage_records(run_dir: Path) -> list[dict[str, Any]]:
    records = []
    for path in sorted((run_dir / "stages").glob("*.json")):
        rec = json.loads(path.read_text(encoding="utf-8"))
        rec["end_unix"] = path.stat().st_mtime
        records.append(rec)
    return sorted(records, key=lambda r: r["end_unix"] - r["seconds"])


def breakdown(run_dir: Path, sampler: TreeSampler, run: Mapping[str, Any]) -> dict[str, Any]:
    """Per-stage and per-notebook wall and CPU of one run (see the module docstring)."""
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    stages = {}
    for rec in _stage_records(run_dir):
        end = rec["end_unix"]
        start = end - rec["seconds"]
        stages[rec["stage"]] = {
            "wall_s": round(rec["seconds"], 3),
            "cpu_s": round(sampler.cpu_between(start, end), 3),
            "subjects": rec.get("subjects"),
            "subject_seconds_total": rec.get("subject_seconds_total"),
            "start_unix": start,
            "end_unix": end,
        }
    nested = False
    if "qc" in stages and "measure" in stages:
        q, m = stages["qc"], stages["measure"]
        # older runs measured inside the qc stage; since the measure stage of its own, the two
        # records follow each other
        nested = q["start_unix"] - 0.5 <= m["start_unix"] and m["end_unix"] <= q["end_unix"] + 0.5
        stages["qc_own"] = {
            "wall_s": round(q["wall_s"] - (m["wall_s"] if nested else 0.0), 3),
            "cpu_s": round(q["cpu_s"] - (m["cpu_s"] if nested else 0.0), 3),
            "note": ("qc stage without the measurement inside it" if nested
                     else "qc stage (the measure stage runs before it)"),
        }
    kernels = sorted(sampler.kernels.values(), key=lambda k: k.first)
    ran = [nb for nb in manifest.get("notebooks", []) if nb.get("ipynb")]
    own_kernels = len(kernels) == len(ran)  # one kernel per notebook (the default; esma run --shared-kernel shares one)
    notebooks = []
    for i, nb in enumerate(ran):
        kernel = kernels[i] if own_kernels else None
        # the stages each notebook calls (a shared kernel has no per-notebook lifetime)
        inside = [name for name in NOTEBOOK_STAGES.get(nb["name"], ()) if name in stages]
        # when measure ran inside qc, count the outermost stages only
        top = [n for n in inside if n != "qc_own" and not (nested and n == "measure")]
        stage_wall = sum(stages[n]["wall_s"] for n in top)
        notebooks.append(
            {
                "name": nb["name"],
                "wall_s": nb["seconds"],
                "kernel_cpu_s": round(kernel.cpu, 3) if kernel else None,
                "kernel_peak_rss_mb": round(kernel.peak_rss / 2**20, 1) if kernel else None,
                "stages": inside,
                "stage_wall_s": round(stage_wall, 3),
                "overhead_s": round(nb["seconds"] - stage_wall, 3),
            }
        )
    if kernels and not own_kernels:
        out_kernels = {"kernels": len(kernels),
                       "kernel_cpu_s": round(sum(k.cpu for k in kernels), 3),
                       "kernel_peak_rss_mb": round(max(k.peak_rss for k in kernels) / 2**20, 1)}
    else:
        out_kernels = {"kernels": len(kernels)}
    nb_wall = sum(nb["wall_s"] for nb in notebooks)
    for st in stages.values():
        st.pop("start_unix", None)
        st.pop("end_unix", None)
    return {
        "run_seconds_manifest": manifest.get("seconds"),
        "exit_code": manifest.get("exit_code"),
        "stages": stages,
        "notebooks": notebooks,
        **out_kernels,
        "notebooks_wall_s": round(nb_wall, 3),
        "outside_notebooks_wall_s": round(run["wall_s"] - nb_wall, 3),
        "esma_process_own_cpu_s": round(sampler.root_own_cpu, 3),
        "settings": manifest.get("settings", {}),
    }


_EXPORT_SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter(); c0 = time.process_time()
from helpers.runner import export_html
t1 = time.perf_counter(); c1 = time.process_time()
import nbconvert  # noqa: F401
out = {"import_helpers_s": t1 - t0, "import_helpers_cpu_s": c1 - c0,
       "import_nbconvert_s": time.perf_counter() - t1,
       "import_nbconvert_cpu_s": time.process_time() - c1, "notebooks": {}}
for path, target in zip(sys.argv[1::2], sys.argv[2::2]):
    t = time.perf_counter(); c = time.process_time()
    export_html(path, target)
    out["notebooks"][path.rsplit("/", 1)[-1]] = {
        "wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - c}
print(json.dumps(out))
"""


def html_export_cost(run_dir: Path, scratch: Path) -> dict[str, Any]:
    """Export every executed notebook of a run again, in a fresh process; seconds each."""
    notebooks = sorted(run_dir.glob("*.ipynb"))
    args = []
    for nb in notebooks:
        args += [str(nb), str(scratch / f"{nb.stem}.html")]
    done = subprocess.run(
        [sys.executable, "-c", _EXPORT_SCRIPT, *args],
        env=child_env(), capture_output=True, text=True, check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["total_wall_s"] = sum(v["wall_s"] for v in result["notebooks"].values())
    result["total_cpu_s"] = sum(v["cpu_s"] for v in result["notebooks"].values())
    result["ipynb_mb"] = round(sum(nb.stat().st_size for nb in notebooks) / 2**20, 2)
    return _rounded(result)


def _rounded(obj: Any) -> Any:
    if isinstance(obj, float):
        return round(obj, 3)
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    return obj


def mosaic_lever(study: Path, masks: Path, n: int) -> dict[str, Any] | None:
    """CPU s per subject of one mosaic with each renderer (None: this tree has one only)."""
    import inspect

    from helpers import qc
    from helpers.config import load_study
    from helpers.labels import load_labels
    from helpers.nifti import load_image, load_mask

    if "renderer" not in inspect.signature(qc.mosaic_png_bytes).parameters:
        return None
    st = load_study(study)
    labels = load_labels(st.labels)
    cases = []
    for s in st.subjects[:n]:
        mask = masks / f"{s.subject}.nii.gz"
        if mask.is_file():
            cases.append((s.subject, load_image(s.image), load_mask(mask)))
    settings = qc.QCSettings.from_mapping(st.qc)
    full = settings.mosaic_max_slices
    thumb = min(getattr(settings, "mosaic_pass_max_slices", full), full)
    out: dict[str, Any] = {"subjects": len(cases), "load_before": os.getloadavg()[0]}
    ways = {
        f"matplotlib_{full}_slices": ("matplotlib", full),
        f"direct_{full}_slices": ("direct", full),
        f"direct_{thumb}_slices": ("direct", thumb),
    }
    for name, (renderer, slices) in ways.items():
        qc.mosaic_png_bytes(cases[0][1], cases[0][2], labels, renderer=renderer)  # warm up
        c0, t0, size = time.process_time(), time.perf_counter(), 0
        for subject, image, mask in cases:
            size += len(qc.mosaic_png_bytes(image, mask, labels, subject=subject,
                                            renderer=renderer, max_slices=slices))
        out[name] = {
            "cpu_s_per_subject": (time.process_time() - c0) / len(cases),
            "wall_s_per_subject": (time.perf_counter() - t0) / len(cases),
            "png_kb_per_subject": size / len(cases) / 1024,
        }
    before = out[f"matplotlib_{full}_slices"]["cpu_s_per_subject"]
    out["cpu_ratio_before_over_direct_full"] = before / out[f"direct_{full}_slices"][
        "cpu_s_per_subject"]
    out["cpu_ratio_before_over_direct_thumbnail"] = before / out[f"direct_{thumb}_slices"][
        "cpu_s_per_subject"]
    out["load_after"] = os.getloadavg()[0]
    return _rounded(out)


# ------------------------------------------------------------------------------------------
# machine and provenance
# ------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """Facts that decide timings: CPUs, memory, Python, scheduler autogroups."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    autogroup = Path("/proc/sys/kernel/sched_autogroup_enabled")
    return {
        "platform": platform.platform(),
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "sched_autogroup": autogroup.read_text().strip() if autogroup.exists() else None,
        "nice": os.nice(0),
    }


def git_state() -> dict[str, Any]:
    """Commit, branch and whether the tree has uncommitted changes."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {
        "commit": git("rev-parse", "HEAD"),
        "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def lever_settings(study: Path) -> dict[str, Any]:
    """The settings of each lever of issue 19 in force for a study (as this tree reads them)."""
    from helpers import qc
    from helpers.config import load_study

    st = load_study(study)
    qcs = qc.QCSettings.from_mapping(st.qc).to_dict()
    return {
        "n4_bias_correction": (st.metrics or {}).get("bias_correction", True),
        "metrics": dict(st.metrics or {}),
        "segmentation": dict(st.segmentation or {}),
        "executor": dict(st.executor or {}),
        "qc_mosaic": {k: v for k, v in qcs.items() if k.startswith("mosaic") or k == "convention"},
    }


# ------------------------------------------------------------------------------------------
# checks over every cohort size in the results file
# ------------------------------------------------------------------------------------------
def checks(cohorts: Mapping[str, Any]) -> dict[str, Any]:
    """Issue 19's targets, judged on the entries present."""
    out: dict[str, Any] = {}
    for size, entry in cohorts.items():
        ratio = entry.get("ratio", {}).get("default")
        if ratio is not None:
            out[f"ratio_le_{MAX_RATIO}_n{size}"] = {"value": ratio, "ok": ratio <= MAX_RATIO}
        speed = entry.get("scaling", {}).get("speedup_whole_run")
        if speed is not None:
            out[f"speedup_ge_{MIN_SPEEDUP}_n{size}"] = {"value": speed, "ok": speed >= MIN_SPEEDUP}
    peaks = {
        int(size): entry["runs"]["default"]["peak_rss_tree_mb"]
        for size, entry in cohorts.items()
        if "default" in entry.get("runs", {})
    }
    if len(peaks) >= 2:
        small, large = peaks[min(peaks)], peaks[max(peaks)]
        out["memory_flat"] = {
            "peak_mb_by_subjects": {str(k): v for k, v in sorted(peaks.items())},
            "ok": large <= MEMORY_FACTOR * small + MEMORY_SLACK_MB,
        }
    return out


def markdown(entry: Mapping[str, Any]) -> str:
    """A short table of one cohort size's results."""
    seg = entry.get("segment_alone", {})
    lines = [
        f"n = {entry['subjects']}: segment alone {seg.get('wall_s', float('nan')):.1f} s wall, "
        + f"{seg.get('cpu_s', float('nan')):.1f} s CPU",
        "",
        "| variant | run wall s | run CPU s | ratio | peak RSS MB | load before |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, run in entry["runs"].items():
        lines.append(
            f"| {name} | {run['wall_s']:.1f} | {run['cpu_s']:.1f} | "
            f"{entry.get('ratio', {}).get(name, float('nan')):.2f} | {run['peak_rss_tree_mb']:.0f} | "
            f"{run['load_before'][0]:.2f} |"
        )
    for name, run in entry["runs"].items():
        bd = run.get("breakdown", {})
        lines += ["", f"{name}: stages", "", "| stage | wall s | CPU s |", "|---|---:|---:|"]
        for stage, st in bd.get("stages", {}).items():
            lines.append(f"| {stage} | {st['wall_s']:.2f} | {st['cpu_s']:.2f} |")
        lines += ["", "| notebook | wall s | kernel CPU s | overhead s |", "|---|---:|---:|---:|"]
        for nb in bd.get("notebooks", []):
            lines.append(
                f"| {nb['name']} | {nb['wall_s']:.2f} | {nb['kernel_cpu_s']} | "
                f"{nb['overhead_s']:.2f} |"
            )
        lines.append(
            f"| outside notebooks | {bd.get('outside_notebooks_wall_s', float('nan')):.2f} | "
            f"{bd.get('esma_process_own_cpu_s')} (esma process) | |"
        )
    return "\n".join(lines)


def save(out: Path, entry: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``entry`` under its cohort size into ``out`` (other sizes kept) with the checks."""
    results: dict[str, Any] = {}
    if out.is_file():
        results = json.loads(out.read_text(encoding="utf-8"))
    results.setdefault("cohorts", {})[str(entry["subjects"])] = entry
    results["about"] = (
        "issue 19: a fresh `esma run` against `esma segment` alone on the same cohort and "
        "settings, measured in one invocation; see benchmarks/README.md"
    )
    results["checks"] = checks(results["cohorts"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns 0 (1 when a command failed)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=25, help="cohort size (default 25)")
    parser.add_argument(
        "--variants",
        default="default,mosaic-plain,sequential",
        help=f"comma-separated runs among {', '.join(VARIANTS)}",
    )
    parser.add_argument("--workers", type=int, default=2, help="the study's workers (default 2)")
    parser.add_argument("--workdir", type=Path, help="cohort folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the cohort folder")
    parser.add_argument("--no-segment-alone", action="store_true",
                        help="skip esma segment alone (no ratio)")
    parser.add_argument("--mosaic-subjects", type=int, default=10,
                        help="subjects of the in-process mosaic lever measure (0: skip)")
    parser.add_argument("--sample-interval", type=float, default=0.1, help="seconds")
    parser.add_argument("--quick", action="store_true",
                        help="no HTML export or mosaic measure (a check of the benchmark)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {sorted(VARIANTS)}")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="esma-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    entry: dict[str, Any] = {
        "subjects": args.subjects,
        "measured_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "load_at_start": [round(x, 2) for x in os.getloadavg()],
        "machine": machine(),
        "git": git_state(),
    }
    failed = False
    try:
        c0, t0 = time.process_time() + children_cpu(), time.perf_counter()
        log.info("building the cohort (%d subjects) in %s", args.subjects, work)
        study = build_cohort(work / "study", args.subjects, args.workers)
        entry["cohort_build"] = {
            "wall_s": round(time.perf_counter() - t0, 1),
            "cpu_s": round(time.process_time() + children_cpu() - c0, 1),
            "note": "not part of any timing below (reused when the folder is kept)",
        }
        entry["levers"] = lever_settings(study)
        seg_masks = work / "segment-alone"
        if not args.no_segment_alone:
            from helpers.config import load_study

            model = load_study(study).model
            if model is None:
                msg = "the demo model is missing (data/demo_model/*.zip): no segmentation"
                raise SystemExit(msg)
            images = segment_inputs(study, work / "segment-inputs")
            if seg_masks.exists():
                shutil.rmtree(seg_masks)
            log.info("esma segment alone")
            rec, _ = timed_command(
                esma("segment", "--images", str(images), "--model", str(model),
                     "--out", str(seg_masks), *segment_arguments(study)),
                cwd=work, interval=args.sample_interval, log_file=logs / "segment.log",
            )
            entry["segment_alone"] = rec
            failed |= rec["exit_code"] != 0
        runs: dict[str, Any] = {}
        for name in variants:
            vstudy = variant_study(study, name)
            log.info("fresh esma run, variant %s", name)
            rec, sampler = timed_command(
                esma("run", str(vstudy), "--quiet", *VARIANT_ARGS.get(name, ())),
                cwd=work, interval=args.sample_interval, log_file=logs / f"run-{name}.log",
                env=VARIANT_ENV.get(name),
            )
            rec["levers"] = lever_settings(vstudy)
            rec["levers"]["shared_kernel"] = "--shared-kernel" in VARIANT_ARGS.get(name, ())
            rec["levers"]["env"] = {
                k: os.environ.get(k, "") for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")
            } | VARIANT_ENV.get(name, {})
            out_dir = vstudy.parent / f"out-{name}"
            run_dirs = sorted(p for p in out_dir.iterdir() if (p / "manifest.json").is_file())
            if run_dirs:
                rec["breakdown"] = breakdown(run_dirs[-1], sampler, rec)
                if name == "default" and not args.quick:
                    scratch = work / "html-export"
                    scratch.mkdir(exist_ok=True)
                    rec["html_export"] = html_export_cost(run_dirs[-1], scratch)
            runs[name] = rec
            failed |= rec["exit_code"] not in (0,)
            entry["runs"] = runs
            entry["partial"] = True
            if "segment_alone" in entry:
                seg_wall = entry["segment_alone"]["wall_s"]
                entry["ratio"] = {n: round(r["wall_s"] / seg_wall, 3) for n, r in runs.items()}
            save(args.out, entry)  # a cut-short benchmark keeps what it measured
        entry["runs"] = runs
        entry.pop("partial", None)
        if "segment_alone" in entry:
            seg = entry["segment_alone"]["wall_s"]
            entry["ratio"] = {name: round(r["wall_s"] / seg, 3) for name, r in runs.items()}
        if "default" in runs and "sequential" in runs:
            seq, par = runs["sequential"], runs["default"]
            scaling: dict[str, Any] = {
                "speedup_whole_run": round(seq["wall_s"] / par["wall_s"], 3),
                "workers": args.workers,
            }
            for stage in ("measure", "qc_own", "metrics"):
                a = seq.get("breakdown", {}).get("stages", {}).get(stage)
                b = par.get("breakdown", {}).get("stages", {}).get(stage)
                if a and b and b["wall_s"] > 0:
                    scaling[f"speedup_{stage}"] = round(a["wall_s"] / b["wall_s"], 3)
            entry["scaling"] = scaling
        if args.mosaic_subjects > 0 and not args.quick and seg_masks.is_dir():
            log.info("mosaic lever, in this process")
            entry["mosaic_lever"] = mosaic_lever(study, seg_masks, args.mosaic_subjects)
    finally:
        entry["load_at_end"] = [round(x, 2) for x in os.getloadavg()]
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print(markdown(entry))
    print(json.dumps(save(args.out, entry)["checks"], indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
