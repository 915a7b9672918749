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
