"""Issue 19: what `esma run` gives its kernels, and the throughput benchmark's own measurement."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import runner
from helpers.cli import main
from helpers.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_throughput", REPO / "benchmarks" / "bench_throughput.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("given", [None, "ACTIVE"])
def test_esma_run_lets_the_kernels_openmp_threads_sleep(monkeypatch, given):
    seen = {}

    def fake_run_study(study, **kwargs):
        seen["omp"] = os.environ.get("OMP_WAIT_POLICY")
        raise ConfigError("stop here")

    monkeypatch.setattr(runner, "run_study", fake_run_study)
    if given is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", given)
    assert main(["run", "study.yml", "--quiet"]) == 2
    assert seen == {"omp": given or "PASSIVE"}  # the user's own setting is kept


def test_tree_sampler_sees_the_cpu_of_a_child_and_its_grandchild():
    bench = _bench()
    burn = "import time\nt=time.process_time()\nwhile time.process_time()-t<0.6: pass\n"
    code = (
        "import subprocess, sys, time\n"
        f"subprocess.run([sys.executable, '-c', {burn!r}], check=True)\n"
        f"exec({burn!r})\ntime.sleep(0.5)\n"
    )
    before = bench.children_cpu()
    proc = subprocess.Popen([sys.executable, "-c", code])
    with bench.TreeSampler(psutil.Process(proc.pid), 0.05) as sampler:
        proc.wait()
    exact = bench.children_cpu() - before
    assert exact >= 1.2
    start, end = sampler.series[0][0] - 1.0, time.time()
    # the series holds the reaped grandchild's CPU and the child's own (its last 0.5 s idle)
    assert 0.8 * exact <= sampler.cpu_between(start, end) <= exact + 0.05
    assert sampler.peak_rss > 0
    assert sampler.kernels == {}


def test_throughput_checks_judge_ratio_speedup_and_memory():
    bench = _bench()
    cohorts = {
        "25": {"ratio": {"default": 1.9}, "scaling": {"speedup_whole_run": 1.5},
               "runs": {"default": {"peak_rss_tree_mb": 1000.0}}},
        "200": {"ratio": {"default": 2.1}, "runs": {"default": {"peak_rss_tree_mb": 1400.0}}},
    }
    got = bench.checks(cohorts)
    assert got["ratio_le_2.0_n25"]["ok"] is True
    assert got["ratio_le_2.0_n200"]["ok"] is False
    assert got["speedup_ge_1.8_n25"]["ok"] is False
    assert got["memory_flat"]["ok"] is False  # 1400 > 1.25 x 1000 + 50
    cohorts["200"]["runs"]["default"]["peak_rss_tree_mb"] = 1290.0
    assert bench.checks(cohorts)["memory_flat"]["ok"] is True


def test_breakdown_charges_each_notebook_with_its_own_stages(tmp_path):
    """Notebook overhead = its wall minus the stages it calls, with one shared kernel (one
    kernel for four notebooks) and with one kernel per notebook."""
    import json

    bench = _bench()
    run_dir = tmp_path / "run"
    (run_dir / "stages").mkdir(parents=True)
    t0 = 1_000_000.0
    walls = {"segment": 10.0, "measure": 6.0, "qc": 3.0, "metrics": 2.0, "statistics": 1.0}
    end = t0
    for stage, wall in walls.items():  # one after the other
        end += wall + 1.0
        path = run_dir / "stages" / f"{stage}.json"
        path.write_text(json.dumps({"stage": stage, "seconds": wall}))
        os.utime(path, (end, end))
    nb_wall = {"01_segment": 12.5, "02_qc": 11.0, "03_metrics": 3.5, "04_statistics": 2.0}
    manifest = {"notebooks": [{"name": n, "seconds": s, "ipynb": f"{n}.ipynb"}
                              for n, s in nb_wall.items()], "seconds": 32.0, "exit_code": 0}
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    sampler = bench.TreeSampler(psutil.Process())
    sampler.series = [(t0 - 1, 0.0, 0), (end + 1, 50.0, 0)]
    expected = {"01_segment": 2.5, "02_qc": 2.0, "03_metrics": 1.5, "04_statistics": 1.0}
    for kernels in (1, 4):
        sampler.kernels = {i: bench.KernelSeen(i, t0 + i, t0 + i + 1, cpu=2.0, peak_rss=2**20)
                           for i in range(kernels)}
        out = bench.breakdown(run_dir, sampler, {"wall_s": 35.0})
        assert {nb["name"]: nb["overhead_s"] for nb in out["notebooks"]} == expected
        assert out["kernels"] == kernels
        assert out["outside_notebooks_wall_s"] == 35.0 - 29.0
        if kernels == 1:
            assert out["kernel_cpu_s"] == 2.0
            assert all(nb["kernel_cpu_s"] is None for nb in out["notebooks"])
        else:
            assert [nb["kernel_cpu_s"] for nb in out["notebooks"]] == [2.0] * 4
