"""Tests of the ``esma metrics`` command (contract of issue 2)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers.cli import main
from helpers.metrics import ASYMMETRY_COLUMNS, METRICS_COLUMNS, MetricsSettings, measure_files
from helpers.synthetic import make_phantom, write_phantom

REQUIRED_METRICS = ["subject", "level", "slice", "muscle", "side", "n_slices", "csa_mm2",
                    "fat_pct", "fcsa_mm2", "method", "flags"]
REQUIRED_ASYMMETRY = ["subject", "level", "muscle", "cdi", "cdi_abs", "lfiar", "lfiar_log"]


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> dict[str, Path]:
    ph = make_phantom("sub-0042", template="small", seed=7, bias_lr=0.2,
                      fat_pct={("multifidus", "left"): 15, ("multifidus", "right"): 8})
    folder = tmp_path_factory.mktemp("cli_scan")
    paths = write_phantom(ph, folder)
    return paths


def _args(scan: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["metrics", "--image", str(scan["image"]), "--mask", str(scan["mask"]),
            "--labels", str(scan["labels"]), "--out", str(out), *extra]


def test_metrics_command_writes_the_contracted_tables(scan, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(_args(scan, out, "--levels", str(scan["levels"])))
    assert code == 0
    metrics = pd.read_csv(out / "metrics.csv", keep_default_na=False)
    asym = pd.read_csv(out / "asymmetry.csv")
    assert list(metrics.columns[: len(METRICS_COLUMNS)]) == list(METRICS_COLUMNS)
    assert set(REQUIRED_METRICS) <= set(metrics.columns)
    assert set(REQUIRED_ASYMMETRY) <= set(asym.columns)
    assert list(asym.columns) == list(ASYMMETRY_COLUMNS)
    # subject from the image name (sub-0042_T2w.nii.gz), level "all", empty slice on aggregates
    assert set(metrics["subject"]) == {"sub-0042"}
    whole = metrics[metrics["level"] == "all"]
    assert len(whole) == 8
    assert (whole["slice"] == "").all()
    assert {"L3", "L4", "L5"} <= set(metrics["level"])
    assert set(metrics["muscle"]) == {"multifidus", "erector_spinae", "psoas_major",
                                      "quadratus_lumborum"}
    assert set(metrics["side"]) == {"left", "right"}
    ref = json.loads((out / "reference.json").read_text())
    assert ref["bias_correction"]["applied"] is True
    assert ref["method"] == "unmix"
    # the left multifidus was planted fattier: the command keeps the sides
    lr = whole.set_index(["muscle", "side"])["fat_pct"].astype(float)
    assert lr[("multifidus", "left")] > lr[("multifidus", "right")] + 4


def test_metrics_command_options(scan, tmp_path):
    out = tmp_path / "o"
    code = main(_args(scan, out, "--subject", "S7", "--fat-method", "otsu",
                      "--no-bias-correction"))
    assert code == 0
    metrics = pd.read_csv(out / "metrics.csv")
    assert set(metrics["subject"]) == {"S7"}
    assert set(metrics["method"]) == {"otsu"}
    # no levels given: aggregates are "all", per-slice rows have no level
    assert set(metrics.loc[metrics["slice"].isna(), "level"]) == {"all"}
    assert metrics.loc[metrics["slice"].notna(), "level"].isna().all()
    ref = json.loads((out / "reference.json").read_text())
    assert ref["bias_correction"] == {"applied": False}
    assert ref["fits"][0]["threshold"] > 0
    expected = measure_files(scan["image"], scan["mask"], scan["labels"], subject="S7",
                             settings=MetricsSettings(fat_method="otsu", bias_correction=False))
    np.testing.assert_allclose(metrics["csa_mm2"], expected.metrics["csa_mm2"], rtol=1e-9)
    np.testing.assert_allclose(metrics["fat_pct"], expected.metrics["fat_pct"], rtol=1e-9)


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"--image": "missing_T2w.nii.gz"}, r"missing_T2w\.nii\.gz: file not found"),
        ({"--labels": "nolabels.json"}, r"nolabels\.json: label file not found"),
        ({"--levels": "nolevels.csv"}, r"nolevels\.csv: levels file not found"),
        ({"--fat-method": "gmm4"}, r"fat_method: 'gmm4' is not one of .*did you mean 'gmm3'"),
    ],
)
def test_bad_input_exits_nonzero_with_one_line(scan, tmp_path, capsys, change, pattern):
    args = _args(scan, tmp_path / "out", "--no-bias-correction")
    for flag, value in change.items():
        value = str(tmp_path / value) if value.endswith((".gz", ".json", ".csv")) else value
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    code = main(args)
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("esma metrics: error: ")
    assert re.search(pattern, err[0])
    assert not (tmp_path / "out" / "metrics.csv").exists()


def test_mask_on_another_grid_is_refused(scan, tmp_path, capsys):
    import nibabel as nib

    m = nib.load(scan["mask"])
    bad = tmp_path / "other_dseg.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(m.dataobj)[:, :, :-2], m.affine), bad)
    args = _args(scan, tmp_path / "out", "--no-bias-correction")
    args[args.index("--mask") + 1] = str(bad)
    assert main(args) == 2
    assert "other_dseg.nii.gz: grid mismatch: shape" in capsys.readouterr().err


def test_console_script_runs(scan, tmp_path):
    exe = shutil.which("esma", path=str(Path(sys.executable).parent))
    assert exe is not None, "the esma console script is not installed in this environment"
    out = tmp_path / "cli"
    proc = subprocess.run([exe, *_args(scan, out, "--no-bias-correction")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    # the installed entry point gives the numbers of the in-process CLI
    assert main(_args(scan, tmp_path / "inproc", "--no-bias-correction")) == 0
    for name in ("metrics.csv", "asymmetry.csv"):
        pd.testing.assert_frame_equal(
            pd.read_csv(out / name), pd.read_csv(tmp_path / "inproc" / name)
        )
    bad = subprocess.run([exe, *_args({**scan, "image": tmp_path / "nope.nii.gz"}, out)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2
    assert "nope.nii.gz: file not found" in bad.stderr
