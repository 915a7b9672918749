"""Tests of helpers.executor: same results whichever executor runs them, failures captured.

The functions run by the executors are defined at module level here so that spawned worker
processes (``processes``, dask ``LocalCluster``) can import them: pytest puts ``tests/`` on
``sys.path``, and the spawn start method hands ``sys.path`` to its children.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import types
from pathlib import Path
from typing import Self

import nibabel as nib
import numpy as np
import pandas as pd
import psutil
import pytest

from helpers.errors import ConfigError, InputFileError
from helpers.executor import (
    LOCAL_DASK_CONFIG,
    ExecutorConfig,
    TaskOutcome,
    dask_environment,
    run_tasks,
    successful_values,
)
from helpers.metrics import MetricsSettings, measure_files
from helpers.synthetic import make_cohort


# ------------------------------------------------------------------------------------------
# functions run in the workers
# ------------------------------------------------------------------------------------------
def toy_task(spec: tuple[int, str, float]) -> pd.DataFrame:
    """A small numeric table from a seeded generator; ``action`` plants a failure."""
    seed, action, delay = spec
    time.sleep(delay)
    if action == "raise":
        raise InputFileError(f"/data/sub-{seed}.nii.gz", "planted failure")
    if action == "crash":
        os._exit(3)  # a segfault / out-of-memory kill, as seen from the parent
    if action == "interrupt":
        raise KeyboardInterrupt
    if action == "exit":
        raise SystemExit(5)
    if action == "env":  # the native-thread environment the task runs with
        return pd.DataFrame(
            {v: [os.environ.get(v)] for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
        )
    if action == "allocator":  # what the worker's environment and allocator are
        import dask

        import helpers.executor as ex

        return pd.DataFrame({"trim_env": [os.environ.get("MALLOC_TRIM_THRESHOLD_")],
                             "tuned": [ex._ALLOCATOR_TUNED],
                             **{k: [dask.config.get(k, None)] for k in ex.LOCAL_DASK_CONFIG}})
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(16, 16, 4))
    return pd.DataFrame({"seed": [seed], "mean": [x.mean()], "p90": [np.percentile(x, 90)]})


def read_volume_mean(path: str) -> float:
    """Read a NIfTI fully (like a metrics step) and return one number."""
    return float(np.asarray(nib.load(path).get_fdata()).mean())


def measure_item(item: dict[str, str | bool]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The real per-subject metrics step (default settings, or without bias correction)."""
    result = measure_files(
        item["image"],
        item["mask"],
        item["labels"],
        subject=item["subject"],
        settings=MetricsSettings(bias_correction=bool(item["bias_correction"])),
        levels_path=item["levels"],
    )
    return result.metrics, result.asymmetry


_LEAK: list[np.ndarray] = []


def read_volume_and_leak(path: str) -> float:
    """Like :func:`read_volume_mean` but keeps every volume: the control for the memory test."""
    data = np.asarray(nib.load(path).get_fdata())
    _LEAK.append(data)
    return float(data.mean())


# ------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------
def test_config_defaults_and_from_mapping() -> None:
    assert ExecutorConfig.from_mapping(None) == ExecutorConfig()
    assert ExecutorConfig.from_mapping({}) == ExecutorConfig(kind="sequential", workers=1)
    cfg = ExecutorConfig.from_mapping(
        {"kind": "dask", "scheduler": "tcp://10.0.0.1:8786", "threads_per_worker": 2}
    )
    assert (cfg.kind, cfg.scheduler, cfg.workers, cfg.threads_per_worker) == (
        "dask",
        "tcp://10.0.0.1:8786",
        1,
        2,
    )
    assert ExecutorConfig.from_mapping({"kind": "processes", "workers": 4}).max_parallel == 4


@pytest.mark.parametrize(
    ("block", "key"),
    [
        ({"kind": "threads"}, "executor.kind"),
        ({"kind": "processes", "workers": 0}, "executor.workers"),
        ({"kind": "processes", "workers": "2"}, "executor.workers"),
        ({"kind": "processes", "workers": True}, "executor.workers"),
        ({"kind": "dask", "threads_per_worker": 1.5}, "executor.threads_per_worker"),
        ({"kind": "processes", "scheduler": "tcp://h:8786"}, "executor.scheduler"),
        ({"kind": "dask", "scheduler": "h:8786"}, "executor.scheduler"),
        ({"kind": "dask", "worker": 2}, "executor.worker"),
        ("dask", "executor"),
    ],
)
def test_config_errors_name_the_key(block: object, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}[:]"):
        ExecutorConfig.from_mapping(block)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# sequential behaviour (cheap)
# ------------------------------------------------------------------------------------------
def test_sequential_captures_failures_and_keeps_order() -> None:
    items = {"sub-c": (3, "ok", 0.0), "sub-a": (1, "raise", 0.0), "sub-b": (2, "ok", 0.0)}
    out = run_tasks(toy_task, items, ExecutorConfig(), progress=False)
    assert list(out) == ["sub-c", "sub-a", "sub-b"]
    assert [o.ok for o in out.values()] == [True, False, True]
    bad = out["sub-a"]
    assert bad.value is None
    assert bad.error == "InputFileError: /data/sub-1.nii.gz: planted failure"
    assert "planted failure" in (bad.traceback or "")
    pd.testing.assert_frame_equal(out["sub-c"].value, toy_task((3, "ok", 0.0)))
    assert all(o.seconds >= 0 for o in out.values())
    assert list(successful_values(out)) == ["sub-c", "sub-b"]


@pytest.mark.parametrize(
    ("action", "exc"), [("interrupt", KeyboardInterrupt), ("exit", SystemExit)]
)
def test_interrupt_and_exit_propagate(action: str, exc: type[BaseException]) -> None:
    items = {"s1": (1, "ok", 0.0), "s2": (2, action, 0.0), "s3": (3, "ok", 0.0)}
    with pytest.raises(exc):
        run_tasks(toy_task, items, ExecutorConfig(), progress=False)


def test_progress_bar_on_and_off(capsys: pytest.CaptureFixture[str]) -> None:
    items = {f"s{i}": (i, "ok", 0.0) for i in range(3)}
    run_tasks(toy_task, items, ExecutorConfig(), desc="metrics", progress=False)
    assert capsys.readouterr().err == ""
    run_tasks(toy_task, items, ExecutorConfig(), desc="metrics", progress=True)
    err = capsys.readouterr().err
    assert "metrics" in err
    assert "3/3" in err


def test_empty_items_and_bad_arguments() -> None:
    assert run_tasks(toy_task, {}, ExecutorConfig(kind="dask", workers=2)) == {}
    with pytest.raises(TypeError, match="subject IDs"):
        run_tasks(toy_task, {1: (1, "ok", 0.0)}, ExecutorConfig())  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="module-level function"):
        run_tasks(lambda x: x, {"s": 1}, ExecutorConfig(kind="processes", workers=2))


# ------------------------------------------------------------------------------------------
# parallel executors
# ------------------------------------------------------------------------------------------
def _toy_items() -> dict[str, tuple[int, str, float]]:
    # early items sleep longest so that they complete out of order in parallel executors
    items = {f"sub-{i:02d}": (i, "ok", 0.3 if i < 2 else 0.0) for i in range(8)}
    items["sub-03"] = (3, "raise", 0.0)
    return items


def _assert_same(a: dict[str, TaskOutcome], b: dict[str, TaskOutcome]) -> None:
    assert list(a) == list(b)
    for key, outcome in a.items():
        assert outcome.ok == b[key].ok, key
        assert outcome.error == b[key].error, key
        if outcome.ok:
            pd.testing.assert_frame_equal(outcome.value, b[key].value, check_exact=True)


def test_processes_match_sequential_and_survive_a_worker_crash() -> None:
    items = _toy_items()
    reference = run_tasks(toy_task, items, ExecutorConfig(), progress=False)
    crashing = {**items, "sub-05": (5, "crash", 0.0), "env": (0, "env", 0.0)}
    out = run_tasks(toy_task, crashing, ExecutorConfig(kind="processes", workers=2), progress=False)
    assert list(out) == [*items, "env"]
    # native thread pools limited to threads_per_worker (1) in the workers
    assert out.pop("env").value.iloc[0].tolist() == ["1", "1"]
    crashed = out.pop("sub-05")
    assert not crashed.ok
    assert crashed.error.startswith("BrokenProcessPool: the worker process died")
    reference.pop("sub-05")
    _assert_same(reference, out)  # every other subject finished, same values, same order


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_memory_stops_page_faulting_each_subject(example_dir: Path) -> None:
    """The metrics stage without bias correction, 3 subjects after a warm-up, each in a fresh
    process: with glibc's default allocator every subject page-faults its temporary volumes in
    anew (thousands of faults, counted by the kernel); after keep_freed_memory() almost none,
    and the tables are identical."""
    import subprocess

    code = (
        "import resource, sys\n"
        "from helpers.executor import keep_freed_memory\n"
        "from helpers.metrics import MetricsSettings, measure_files\n"
        "ok = keep_freed_memory() if sys.argv[1] == '1' else True\n"
        "d = sys.argv[2]\n"
        "args = (d + '/sub-0001_T1w.nii.gz', d + '/sub-0001_T1w_dseg.nii.gz', d + '/labels.json')\n"
        "s = MetricsSettings(bias_correction=False)\n"
        "first = measure_files(*args, subject='x', settings=s).metrics\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(3):\n"
        "    again = measure_files(*args, subject='x', settings=s).metrics\n"
        "faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
        "print(ok, faults, again.equals(first), again.to_json())\n"
    )
    runs = {}
    for tuned in ("0", "1"):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        out = subprocess.run([sys.executable, "-c", code, tuned, str(example_dir)],
                             capture_output=True, text=True, check=True, env=env,
                             cwd=Path(__file__).resolve().parents[1])
        ok, faults, same, table = out.stdout.split(maxsplit=3)
        assert (ok, same) == ("True", "True")
        runs[tuned] = (int(faults), table)
    assert runs["0"][0] > 3000, runs["0"][0]  # thousands of 4 kB pages per subject
    assert runs["1"][0] < 0.05 * runs["0"][0], (runs["0"][0], runs["1"][0])
    assert runs["1"][1] == runs["0"][1]  # same numbers


def test_dask_local_cluster_leaves_this_process_environment_as_it_was() -> None:
    """distributed's nannies set MALLOC_TRIM_THRESHOLD_ and thread variables in the calling
    process; run_tasks puts the environment back, while its workers still tune their allocator."""
    import dask
    import distributed  # noqa: F401 - loads distributed's defaults into dask.config

    before = dict(os.environ)
    config_before = {k: dask.config.get(k, None) for k in LOCAL_DASK_CONFIG}
    assert config_before["distributed.admin.tick.interval"] != "1s"  # the test changes something
    out = run_tasks(toy_task, {"a": (0, "allocator", 0.0), "b": (1, "", 0.0)},
                    ExecutorConfig(kind="dask", workers=1), progress=False)
    assert dict(os.environ) == before
    worker = out["a"].value.iloc[0]
    assert worker["trim_env"] == "65536"  # what dask gives its workers (and leaked to us)
    assert bool(worker["tuned"]) is sys.platform.startswith("linux")
    # The workers run with the cluster's settings (profiler off, slower bookkeeping ticks) ...
    assert {k: worker[k] for k in LOCAL_DASK_CONFIG} == LOCAL_DASK_CONFIG
    assert not worker["distributed.worker.profile.enabled"]  # dask's default: on
    # ... and this process's dask configuration is as it was.
    assert {k: dask.config.get(k, None) for k in LOCAL_DASK_CONFIG} == config_before
    proc = run_tasks(toy_task, {"a": (0, "allocator", 0.0)},
                     ExecutorConfig(kind="processes", workers=1), progress=False)
    assert proc["a"].value.iloc[0]["trim_env"] == before.get("MALLOC_TRIM_THRESHOLD_")


def test_processes_give_up_when_workers_keep_dying(monkeypatch: pytest.MonkeyPatch) -> None:
    import helpers.executor as ex

    monkeypatch.setattr(ex, "MAX_DEATHS_IN_A_ROW", 1)
    items = {f"s{i}": (i, "crash", 0.0) for i in range(3)}
    out = run_tasks(toy_task, items, ExecutorConfig(kind="processes", workers=1), progress=False)
    assert list(out) == ["s0", "s1", "s2"]
    errors = [o.error or "" for o in out.values()]
    assert not any(o.ok for o in out.values())
    # One subject (whichever the retry ran first, alone) is blamed for the death; with at most
    # one death in a row allowed, the others are given up without running.
    died = [e for e in errors if e.startswith("BrokenProcessPool: the worker process died")]
    assert len(died) == 1, errors
    assert sum("giving up" in e for e in errors) == 2, errors


def test_processes_refuse_functions_defined_interactively(monkeypatch: pytest.MonkeyPatch) -> None:
    def in_notebook(x: int) -> int:
        return x

    in_notebook.__module__ = "__main__"
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))  # no __file__
    with pytest.raises(TypeError, match="notebook"):
        run_tasks(in_notebook, {"s": 1}, ExecutorConfig(kind="processes", workers=2))
    assert run_tasks(in_notebook, {"s": 1}, ExecutorConfig(), progress=False)["s"].value == 1


def test_dask_environment_gives_a_fresh_process_the_local_cluster_settings() -> None:
    """The variables the SLURM recipe exports make dask read LOCAL_DASK_CONFIG."""
    import json
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    env.update(dask_environment())
    code = (
        "import json, sys, dask, distributed\n"
        "print(json.dumps({k: dask.config.get(k) for k in json.loads(sys.argv[1])}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, json.dumps(list(LOCAL_DASK_CONFIG))],
                         capture_output=True, text=True, check=True, env=env)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == LOCAL_DASK_CONFIG
    assert len(dask_environment()) == len(LOCAL_DASK_CONFIG)


def test_dask_external_scheduler_matches_sequential() -> None:
    """``scheduler: tcp://...`` path, including a subject that kills its dask worker."""
    import dask
    from distributed import LocalCluster

    items = _toy_items()
    reference = run_tasks(toy_task, items, ExecutorConfig(), progress=False)
    crashing = {**items, "sub-05": (5, "crash", 0.0)}
    with (
        dask.config.set(  # only executing tasks are blamed; the crasher fails on its 2nd death
            {
                "distributed.scheduler.allowed-failures": 1,
                "distributed.scheduler.worker-saturation": 1.0,
            }
        ),
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
    ):
        cfg = ExecutorConfig(kind="dask", scheduler=cluster.scheduler_address)
        out = run_tasks(toy_task, crashing, cfg, progress=False)
    assert list(out) == list(items)
    crashed = out.pop("sub-05")
    assert not crashed.ok
    assert crashed.error.startswith("KilledWorker")
    reference.pop("sub-05")
    _assert_same(reference, out)


@pytest.fixture(scope="module")
def phantom_runs(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[dict[str, dict[str, object]], dict[str, dict[str, TaskOutcome]]]:
    """measure_files over three small phantoms (default settings and without bias correction)
    and one subject whose mask file is truncated, run by every executor (2 workers each)."""
    out = tmp_path_factory.mktemp("cohort")
    manifest = make_cohort(3, out, seed=3, template="small")
    base = {
        str(r["subject"]): {k: str(r[k]) for k in ("subject", "image", "mask", "labels", "levels")}
        for r in manifest.to_dict("records")
    }
    broken = dict(base["syn-002"], subject="syn-bad", mask=str(out / "syn-bad_dseg.nii.gz"))
    Path(broken["mask"]).write_bytes(Path(base["syn-002"]["mask"]).read_bytes()[:200])
    items: dict[str, dict[str, object]] = {}
    for key, item in base.items():
        items[f"{key}/default"] = {**item, "bias_correction": True}
        items[f"{key}/no-bias"] = {**item, "bias_correction": False}
        if key == "syn-001":  # the broken subject early: order must survive it
            items["syn-bad/default"] = {**broken, "bias_correction": True}
    runs = {
        config.kind: run_tasks(measure_item, items, config, progress=False)
        for config in (
            ExecutorConfig(),
            ExecutorConfig(kind="processes", workers=2),
            ExecutorConfig(kind="dask", workers=2),
        )
    }
    return items, runs


def _compare_real(
    runs: dict[str, dict[str, TaskOutcome]], items: dict[str, dict[str, object]], suffix: str
) -> None:
    reference = runs["sequential"]
    for kind in ("processes", "dask"):
        out = runs[kind]
        assert list(out) == list(items), kind
        for key, ref in reference.items():
            if not key.endswith(suffix):
                continue
            got = out[key]
            assert (got.ok, got.error) == (ref.ok, ref.error), (kind, key)
            if ref.ok:
                pd.testing.assert_frame_equal(got.value[0], ref.value[0], check_exact=True)
                pd.testing.assert_frame_equal(got.value[1], ref.value[1], check_exact=True)


def test_real_metrics_outcomes_and_failures(
    phantom_runs: tuple[dict[str, dict[str, object]], dict[str, dict[str, TaskOutcome]]],
) -> None:
    items, runs = phantom_runs
    for kind, out in runs.items():
        assert list(out) == list(items), kind
        assert [k for k, o in out.items() if not o.ok] == ["syn-bad/default"], kind
        error = out["syn-bad/default"].error or ""
        assert error.startswith("InputFileError: "), kind
        assert "syn-bad_dseg.nii.gz" in error, kind
        metrics, asymmetry = out["syn-001/default"].value
        assert len(metrics) > 0
        assert {"multifidus", "erector_spinae"} <= set(asymmetry["muscle"])


def test_real_metrics_identical_with_every_executor_without_bias_correction(
    phantom_runs: tuple[dict[str, dict[str, object]], dict[str, dict[str, TaskOutcome]]],
) -> None:
    """measure_files without N4: sequential == 2 processes == 2-worker dask LocalCluster."""
    items, runs = phantom_runs
    _compare_real(runs, items, "/no-bias")


def test_real_metrics_identical_with_every_executor_default_settings(
    phantom_runs: tuple[dict[str, dict[str, object]], dict[str, dict[str, TaskOutcome]]],
) -> None:
    """measure_files with default settings (N4 included): identical with every executor.

    This caught N4 depending on ITK's thread count (all cores in the main process, one in the
    workers); helpers.fat.n4_correct now runs on a fixed thread count.
    """
    items, runs = phantom_runs
    _compare_real(runs, items, "/default")


# ------------------------------------------------------------------------------------------
# memory stays flat with the number of items
# ------------------------------------------------------------------------------------------
class _PeakRSS:
    """Peak resident memory (bytes) of this process, sampled every 2 ms in a thread."""

    def __init__(self) -> None:
        self._proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.002)

    def __enter__(self) -> Self:
        self.peak = self._proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so that memory earlier
    tests in this process freed but kept resident cannot absorb the growth measured here."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def test_memory_does_not_grow_with_the_number_of_subjects(tmp_path: Path) -> None:
    """Peak RSS for 40 subjects stays within 12 MB of 10 subjects; a leaky task grows ~60 MB.

    Each subject reads a 2 MB (float64 in memory) volume.  The leaky control keeps every
    volume, proving the measurement would see an executor that held them.
    """
    path = tmp_path / "vol.nii"
    data = np.random.default_rng(0).normal(size=(64, 64, 64)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    cfg = ExecutorConfig()

    def peak_growth(func: object, n: int) -> int:
        items = {f"s{i:03d}": str(path) for i in range(n)}
        _trim_heap()
        with _PeakRSS() as m:
            base = m.peak
            run_tasks(func, items, cfg, progress=False)  # type: ignore[arg-type]
        return m.peak - base

    run_tasks(read_volume_mean, {"warm": str(path)}, cfg, progress=False)
    small = peak_growth(read_volume_mean, 10)
    large = peak_growth(read_volume_mean, 40)
    assert large - small < 12e6, (small, large)

    leak_small = peak_growth(read_volume_and_leak, 10)
    leak_large = peak_growth(read_volume_and_leak, 40)
    _LEAK.clear()
    assert leak_large - leak_small > 40e6, (leak_small, leak_large)
