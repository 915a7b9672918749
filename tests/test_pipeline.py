"""The papermill pipeline (helpers.runner and helpers.stages, helpers.demo, esma run / demo).

Fast unit tests of the runner's pieces, then one end-to-end run of a small demo study through
the same code path as ``esma run`` / ``esma demo`` (marked ``e2e``): four notebooks, HTML
reports, the planted relation in ``correlations.csv``, a failing subject in ``failures.csv``,
and a re-run that reuses the finished work and leaves the first run untouched.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import nbformat
import pandas as pd
import psutil
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from helpers import provenance, runner, runs
from helpers.cli import _report_run, main
from helpers.demo import CI_SPEC, build_demo, find_demo_model
from helpers.errors import ConfigError, OutputError
from helpers.stages import s3_qc

NOTEBOOKS = [runner.NOTEBOOK_DIR / f"{name}.ipynb" for name in runner.NOTEBOOKS]
#: The e2e study's synthetic subjects.
SUBJECTS = [f"syn-{i:03d}" for i in range(1, CI_SPEC.n_synthetic + 1)]
#: Notebooks of the e2e re-run (the ones with per-subject work to reuse).
RERUN_NOTEBOOKS = ("01_segment", "02_qc", "03_metrics")
#: Fake identity planted in the e2e study's clinical file; no output may contain it.
FAKE_IDENTITY = ("Jane Q. Testperson", "John X. Fakename", "1961-02-03", "MRN-7734-0042")


# ------------------------------------------------------------------------------ notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_are_thin_parameterised_and_stripped(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        assert cell.outputs == [], "committed without outputs (nbstripout)"
        assert cell.execution_count is None
        assert not re.search(r"^\s*(def|class|async def) ", cell.source, re.MULTILINE), (
            "no function or class definitions in notebooks"
        )
    # every parameter: a literal default with a type hint and a help comment
    for line in tagged[0].source.splitlines():
        assert re.match(r"^\w+: (str|bool|int|float) = .+  # \S", line), line
    import papermill as pm

    declared = pm.inspect_notebook(str(path))
    assert {"study", "run_dir"} <= set(declared)
    assert all(info["help"] for info in declared.values())
    assert declared["study"]["default"] == '"../data/sample/study.yml"'


def test_unknown_parameters_are_refused():
    nb = NOTEBOOKS[2]
    declared = runner.check_parameters(nb, {"study": "x.yml", "run_dir": ""})
    assert set(declared) == {"study", "run_dir"}
    with pytest.raises(ConfigError) as info:
        runner.check_parameters(nb, {"study": "x.yml", "run_dri": "/tmp"})
    assert str(info.value) == (
        "03_metrics.ipynb: unknown parameter(s) run_dri; the notebook declares run_dir, study"
    )


# ------------------------------------------------------------------------------ run folders
def test_run_ids_are_new_and_folders_never_reused(tmp_path, monkeypatch):
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", runs.new_run_id())
    ids = iter(["20250101T000000Z-aaaaaa", "20250101T000000Z-aaaaaa", "20250101T000000Z-bbbbbb"])
    monkeypatch.setattr(runs, "new_run_id", lambda: next(ids))
    first_id, first = runs._create_run_dir(tmp_path)
    (first / "keep.txt").write_text("first run")
    second_id, second = runs._create_run_dir(tmp_path)
    assert (first_id, second_id) == ("20250101T000000Z-aaaaaa", "20250101T000000Z-bbbbbb")
    assert (first / "keep.txt").read_text() == "first run"
    assert runs.list_runs(tmp_path) == [first, second]


def test_collect_failures_aggregates_the_stages(tmp_path):
    paths = runs.RunPaths(
        tmp_path, tmp_path / "w", tmp_path / "s", tmp_path / "m", tmp_path / "d.csv"
    )
    runs.write_failures(paths, "metrics", pd.DataFrame({"subject": ["b"], "error": ["x"]}))
    runs.write_failures(paths, "segment", pd.DataFrame({"subject": ["a"], "error": ["y"]}))
    runs.write_failures(paths, "qc", pd.DataFrame(columns=["subject", "error"]))
    table = runs.collect_failures(tmp_path)
    assert table.to_dict("records") == [
        {"subject": "a", "stage": "segment", "error": "y"},
        {"subject": "b", "stage": "metrics", "error": "x"},
    ]
    assert pd.read_csv(tmp_path / "failures.csv").shape == (2, 3)


# ----------------------------------------------------------------------------- HTML export
def _widget_notebook() -> nbformat.NotebookNode:
    """A notebook as papermill saves it after a tqdm widget bar and a text bar ran."""
    hbox, left, bar, right = "m0", "m1", "m2", "m3"
    state = {
        hbox: {
            "model_name": "HBoxModel",
            "state": {"children": [f"IPY_MODEL_{left}", f"IPY_MODEL_{bar}", f"IPY_MODEL_{right}"]},
        },
        left: {"model_name": "HTMLModel", "state": {"value": "measure:\u2007100%"}},
        bar: {"model_name": "FloatProgressModel", "state": {"value": 6.0, "max": 6.0}},
        right: {"model_name": "HTMLModel", "state": {"value": "\u20076/6\u2007[00:03&lt;00:00]"}},
    }
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"0" * 20).decode()
    nb = new_notebook(
        cells=[
            new_markdown_cell("# Report"),
            new_code_cell(
                "secret_code_marker = 1",
                outputs=[
                    new_output(
                        "display_data",
                        data={
                            "application/vnd.jupyter.widget-view+json": {"model_id": hbox},
                            "text/plain": "measure:   0%|          | 0/6",
                        },
                    ),
                    new_output(
                        "stream", name="stderr", text="QC:  50%|#####\rQC: 100%|##########|\n"
                    ),
                    new_output(
                        "display_data",
                        data={"image/png": png},
                        metadata={"image/png": {"alt": "cohort figure"}},
                    ),
                ],
            ),
        ]
    )
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": state}}
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    return nb


def test_export_html_is_offline_codeless_and_shows_final_progress(tmp_path):
    path = tmp_path / "report.ipynb"
    nbformat.write(_widget_notebook(), path)
    html = runner.export_html(path).read_text(encoding="utf-8")
    assert "secret_code_marker" not in html  # code cells excluded
    assert not re.search(r"<script[^>]+src=", html), "nothing loaded from the network"
    assert "measure: 100%|██████████| 6/6 [00:03<00:00]" in html.replace("&lt;", "<")
    assert "QC:  50%" not in html
    assert "QC: 100%|##########|" in html
    assert 'alt="cohort figure"' in html
    assert "data:image/png;base64," in html
    # one exporter serves every notebook of the process (issue 19): a second notebook's page
    # holds its own content only, and the first exports again to the same page
    other = tmp_path / "other.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell("x", outputs=[
        new_output("stream", name="stdout", text="only_in_other\n")])]), other)
    second = runner.export_html(other).read_text(encoding="utf-8")
    assert "only_in_other" in second
    assert "cohort figure" not in second
    assert runner.export_html(path, tmp_path / "again.html").read_text(encoding="utf-8") == html


def test_index_escapes_what_it_shows(tmp_path):
    manifest = {
        "study": "s",
        "run_id": "r",
        "exit_code": 1,
        "started_utc": "t",
        "seconds": 1.0,
        "n_subjects": 1,
        "esma_version": "0",
        "git_commit": None,
        "description": "",
        "notebooks": [],
        "stages": [],
        "versions": {},
        "settings": {},
        "checksums": [],
    }
    failures = pd.DataFrame(
        {"subject": ["<script>x</script>"], "stage": ["qc"], "error": ["a & b"]}
    )
    excluded = pd.DataFrame(columns=["subject", "reason", "source"])
    text = provenance.write_index(tmp_path, manifest, failures, excluded).read_text()
    assert "<script>x</script>" not in text
    assert "&lt;script&gt;x&lt;/script&gt;" in text
    assert "a &amp; b" in text


# ------------------------------------------------------------------------------- the runner
def test_invalid_study_stops_before_writing(tmp_path, capsys):
    study = tmp_path / "study.yml"
    study.write_text("study: x\nimages: none/*.nii.gz\nlabels: labels.json\n")
    with pytest.raises(ConfigError, match=r"^study.yml: labels: "):
        runner.run_study(study)
    assert main(["run", str(study)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("esma run: error: study.yml: labels: ")
    assert len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yml"]


def _tiny_study(tmp_path: Path, example_dir: Path) -> Path:
    shutil.copyfile(example_dir / "labels.json", tmp_path / "labels.json")
    shutil.copyfile(example_dir / "sub-0001_T1w.nii.gz", tmp_path / "sub-0001_T1w.nii.gz")
    shutil.copyfile(example_dir / "sub-0001_T1w_dseg.nii.gz", tmp_path / "sub-0001_dseg.nii.gz")
    study = tmp_path / "study.yml"
    study.write_text(
        "study: tiny\nimages: '*_T1w.nii.gz'\nlabels: labels.json\n"
        "masks: '{subject}_dseg.nii.gz'\noutput: out\n"
    )
    return study


def _notebook(folder: Path, name: str, body: str) -> None:
    params = new_code_cell('study: str = ""  # study file\nrun_dir: str = ""  # run folder')
    params.metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=[params, new_code_cell(body)])
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, folder / f"{name}.ipynb")


def test_run_study_exit_codes_and_failed_notebooks(tmp_path, example_dir, capsys):
    study = _tiny_study(tmp_path, example_dir)
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _notebook(nbs, "a_ok", "print('hello from', run_dir.split('/')[-1])")
    _notebook(
        nbs,
        "b_bad_input",
        "from helpers.errors import ConfigError\nraise ConfigError('study.yml: metrics: bad')",
    )
    _notebook(nbs, "c_bug", "1 / 0")

    with pytest.raises(ConfigError, match="unknown parameter"):
        runner.run_study(
            study,
            notebooks=["a_ok"],
            notebook_dir=nbs,
            extra_parameters={"a_ok": {"colour": "red"}},
        )
    assert not (tmp_path / "out").exists()  # refused before any run folder exists

    ok = runner.run_study(study, notebooks=["a_ok"], notebook_dir=nbs, progress=False)
    assert ok.exit_code == 0
    assert [nb.ok for nb in ok.notebooks] == [True]
    assert "hello from" in (ok.run_dir / "a_ok.html").read_text()

    bad = runner.run_study(
        study, notebooks=["a_ok", "b_bad_input", "a_ok"], notebook_dir=nbs, progress=False
    )
    assert bad.exit_code == 2  # an esma input error inside a notebook
    assert [nb.ok for nb in bad.notebooks] == [True, False, False]
    assert bad.notebooks[1].error == "ConfigError: study.yml: metrics: bad"
    assert bad.notebooks[2].error.startswith("not run")
    assert "ConfigError" in (bad.run_dir / "b_bad_input.html").read_text()
    index = (bad.run_dir / "index.html").read_text()
    assert "stopped: invalid input" in index

    bug = runner.run_study(study, notebooks=["c_bug"], notebook_dir=nbs, progress=False)
    assert bug.exit_code == 1
    assert bug.notebooks[0].error_name == "ZeroDivisionError"
    assert len(runs.list_runs(tmp_path / "out")) == 3
    manifest = json.loads((bug.run_dir / "manifest.json").read_text())
    assert manifest["exit_code"] == 1
    assert [c["role"] for c in manifest["checksums"]] == ["study file", "labels", "image", "mask"]

    # what esma run prints: the run, its exit code and where the report is
    assert _report_run(bad) == 2
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"esma: run {bad.run_id} of study tiny: ")
    assert out[1] == "esma: notebook(s) stopped: b_bad_input, a_ok (see their HTML reports)"
    assert out[-1] == f"esma: report: {bad.index}"


def test_notebooks_share_one_kernel_but_never_each_others_variables(tmp_path, example_dir):
    """``shared_kernel``: one kernel for the run's notebooks (issue 19), the notebooks' names
    deleted between them, shut down when the run ends; by default each notebook has its own."""
    study = _tiny_study(tmp_path, example_dir)
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    body = (
        "import os, pathlib, sys\n"
        "seen = 'secret' in globals()\n"
        "secret = 42\n"
        # what multiprocessing's spawn start method reads of the kernel's __main__
        "spec = hasattr(sys.modules['__main__'], '__spec__')\n"
        "pathlib.Path('{name}.txt').write_text(f'{{os.getpid()}} {{seen}} {{spec}} {{os.getcwd()}}')"
    )
    for name in ("first", "second", "third"):
        _notebook(nbs, name, body.format(name=name))
    # a spawn pool in a later notebook of the shared kernel (the measure stage uses one)
    _notebook(nbs, "pool", (
        "import multiprocessing, concurrent.futures, pathlib\n"
        "ctx = multiprocessing.get_context('spawn')\n"
        "with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:\n"
        "    pathlib.Path('pool.txt').write_text(str(pool.submit(abs, -7).result()))"
    ))

    def kernels(result):
        rows = [(result.run_dir / f"{n}.txt").read_text().split() for n in ("first", "second",
                                                                              "third")]
        assert all(r[1] == "False" for r in rows)  # no notebook saw another's variable
        assert all(r[2] == "True" for r in rows)  # the kernel's __main__ is intact
        assert all(Path(r[3]) == result.run_dir for r in rows)  # each ran in the run folder
        return {int(r[0]) for r in rows}

    shared = runner.run_study(study, notebooks=["first", "second", "third", "pool"],
                              notebook_dir=nbs, progress=False, shared_kernel=True)
    assert shared.exit_code == 0, [nb.error for nb in shared.notebooks]
    assert (shared.run_dir / "pool.txt").read_text() == "7"
    (pid,) = kernels(shared)
    assert pid != os.getpid()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE

    fresh = runner.run_study(study, notebooks=["first", "second", "third"], notebook_dir=nbs,
                             progress=False)
    assert fresh.exit_code == 0
    assert len(kernels(fresh)) == 3


# ==========================================================================================
# End to end: a small demo study through esma run's code path
# ==========================================================================================
def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _add_bad_subject(folder: Path) -> str:
    """A truncated scan: it must fail alone and be listed in failures.csv."""
    inputs = folder / "inputs"
    manifest = pd.read_csv(inputs / "manifest.csv", dtype=str, keep_default_na=False)
    first = manifest.iloc[0]
    data = (inputs / first["image"]).read_bytes()
    bad = inputs / "bad" / "bad-001_T2w.nii.gz"
    bad.parent.mkdir(exist_ok=True)
    bad.write_bytes(data[: len(data) // 2])
    row = {c: "" for c in manifest.columns}
    row.update(subject="bad-001", image="bad/bad-001_T2w.nii.gz")
    if "mask" in manifest.columns:
        row["mask"] = first["mask"]
    pd.concat([manifest, pd.DataFrame([row])]).to_csv(inputs / "manifest.csv", index=False)
    return "bad-001"


def _add_identity(folder: Path) -> None:
    """Identifying columns a site might leave in its clinical file (must never be shown)."""
    path = folder / "inputs" / "clinical.csv"
    clinical = pd.read_csv(path, dtype=str, keep_default_na=False)
    n = len(clinical)
    clinical.insert(1, "patient_name", [FAKE_IDENTITY[i % 2] for i in range(n)])
    clinical["birth_date"] = FAKE_IDENTITY[2]
    clinical["mrn"] = FAKE_IDENTITY[3]
    clinical.to_csv(path, index=False)


def ci_runs(base: Path) -> dict:
    """Build the CI study under ``base`` and run it twice (once per session; shared on disk).

    Returns the JSON record: study path, both run folders and exit codes, the first run's
    file digests right after it finished, the bad subject and whether the model was used.
    """
    folder = base / "e2e_study"
    record_path = base / "e2e_runs.json"
    if record_path.is_file():
        return json.loads(record_path.read_text())
    study = build_demo(folder, CI_SPEC)
    bad = _add_bad_subject(folder)
    _add_identity(folder)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ESMA_CACHE", str(base / "esma_cache"))  # model unpacked here, not in ~
        first = runner.run_study(study, progress=False)
        digest = _tree_digest(first.run_dir)
        # the re-run: the per-subject stages (segmentation, measurement, QC) must reuse
        second = runner.run_study(study, progress=False, notebooks=RERUN_NOTEBOOKS)
    record = {
        "study": str(study),
        "bad": bad,
        "model": find_demo_model() is not None,
        "runs": [str(first.run_dir), str(second.run_dir)],
        "exit_codes": [first.exit_code, second.exit_code],
        "seconds": [first.seconds, second.seconds],
        "first_digest": digest,
    }
    record_path.write_text(json.dumps(record))
    return record


@pytest.fixture(scope="module")
def e2e(tmp_path_factory) -> dict:
    return ci_runs(tmp_path_factory.getbasetemp())


@pytest.mark.e2e
def test_e2e_every_notebook_ran_and_reported(e2e):
    run = Path(e2e["runs"][0])
    for name in runner.NOTEBOOKS:
        nb = nbformat.read(run / f"{name}.ipynb", as_version=4)
        errors = [
            o
            for c in nb.cells
            if c.cell_type == "code"
            for o in c.outputs
            if o.output_type == "error"
        ]
        assert errors == [], f"{name}: error cells"
        assert nb.metadata["papermill"]["exception"] is not True
        html = (run / f"{name}.html").read_text(encoding="utf-8")
        assert "open_study(" not in html, "code cells are not in the report"
        assert not re.search(r"<script[^>]+src=", html)
    figures = {
        "02_qc": "data:image/jpeg;base64,",
        "03_metrics": "data:image/png;base64,",
        "04_statistics": "data:image/png;base64,",
    }
    for name, marker in figures.items():
        html = (run / f"{name}.html").read_text(encoding="utf-8")
        assert html.count(marker) >= 2, f"{name}: figures embedded"
    # progress bars of the per-subject loops end at 100 % in the reports
    assert re.search(r"QC: 100%\|█+\|", (run / "02_qc.html").read_text(encoding="utf-8"))
    index = (run / "index.html").read_text(encoding="utf-8")
    for name in runner.NOTEBOOKS:
        assert f'href="{name}.html"' in index


@pytest.mark.e2e
def test_e2e_bad_subject_fails_alone(e2e):
    run = Path(e2e["runs"][0])
    assert e2e["exit_codes"] == [1, 1]  # finished, one subject failed
    failures = pd.read_csv(run / "failures.csv")
    assert set(failures["subject"]) == {e2e["bad"]}
    assert "truncated" in failures["error"].iloc[0] or "unreadable" in failures["error"].iloc[0]
    metrics = pd.read_csv(run / "metrics.csv", dtype={"subject": str})
    excluded = pd.read_csv(run / "excluded.csv")
    assert e2e["bad"] in set(excluded["subject"])
    qc_excluded = set(excluded.loc[excluded["source"] == "qc decision", "subject"])
    assert sorted(metrics["subject"].unique()) == sorted(set(SUBJECTS) - qc_excluded)
    assert len(qc_excluded - {e2e["bad"]}) <= 1, "QC may exclude at most one good subject"
    manifest = json.loads((run / "manifest.json").read_text())
    assert [f["subject"] for f in manifest["failures"]] == [e2e["bad"]]


@pytest.mark.e2e
def test_e2e_planted_relation_in_correlations(e2e):
    """ODI was planted to rise with erector spinae |cdi| in men only (exact ranks, rho 1).

    Measured |cdi| (segmentation by the demo model, then N4, fat and FCSA) keeps most of the
    planted order; with n = 6 men rho >= 0.6 leaves room for a few neighbouring swaps and would
    be reached by chance (a pipeline that joins the wrong subjects or sexes) only ~ 1 time in 8.
    """
    corr = pd.read_csv(Path(e2e["runs"][0]) / "correlations.csv")
    planted = (
        (corr["index"] == "cdi_abs")
        & (corr["muscle"] == "erector_spinae")
        & (corr["level"] == "all")
        & (corr["score"] == "odi_pct")
        & (corr["method"] == "spearman")
    )
    men = corr[planted & (corr["group"] == "male")].iloc[0]
    women = corr[planted & (corr["group"] == "female")].iloc[0]
    assert men["n"] >= 5
    assert men["rho"] >= 0.6
    assert men["ci_low"] < men["rho"] < men["ci_high"]
    assert men["rho"] > women["rho"], "planted in men, not in women"
    # the same men show no such relation with scores that were not planted on the imaging
    others = corr[
        (corr["index"] == "cdi_abs")
        & (corr["muscle"] == "erector_spinae")
        & (corr["level"] == "all")
        & (corr["method"] == "spearman")
        & (corr["group"] == "male")
        & (corr["score"] != "odi_pct")
    ]
    assert (others["rho"] < men["rho"]).mean() >= 0.75


@pytest.mark.e2e
def test_e2e_rerun_reuses_work_and_keeps_the_first_run(e2e):
    first, second = (Path(p) for p in e2e["runs"])
    assert first != second
    assert first.parent == second.parent
    assert _tree_digest(first) == e2e["first_digest"], "the first run folder was touched"
    manifest = json.loads((second / "manifest.json").read_text())
    assert [nb["name"] for nb in manifest["notebooks"]] == list(RERUN_NOTEBOOKS)
    assert all(nb["ok"] for nb in manifest["notebooks"])
    stages = {s["stage"]: s for s in manifest["stages"]}
    n_ok = len(SUBJECTS)
    seg = stages["segment"]
    if e2e["model"]:
        assert (seg.get("n_reused"), seg.get("n_failed")) == (n_ok, 1)
    else:  # without the demo model the phantoms' own masks are given
        assert seg.get("n_given") == n_ok + 1
    assert stages["measure"].get("n_reused") == n_ok
    assert stages["qc"].get("n_reused") == n_ok
    assert stages["metrics"].get("n_computed", 0) == 0
    before = {s["stage"]: s for s in json.loads((first / "manifest.json").read_text())["stages"]}
    assert before["measure"].get("n_computed") == n_ok
    assert stages["measure"]["seconds"] < before["measure"]["seconds"]
    if e2e["model"]:
        assert before["segment"].get("n_computed") == n_ok
        assert stages["segment"]["seconds"] < before["segment"]["seconds"]


@pytest.mark.e2e
def test_e2e_outputs_carry_no_identity(e2e):
    for run in (Path(p) for p in e2e["runs"]):
        for path in run.rglob("*"):
            if path.suffix not in (".html", ".csv", ".json", ".ipynb", ".yml", ".xlsx"):
                continue
            data = path.read_bytes()
            if path.suffix == ".xlsx":
                import zipfile

                with zipfile.ZipFile(path) as z:
                    data = b"".join(z.read(n) for n in z.namelist())
            for secret in FAKE_IDENTITY:
                assert secret.encode() not in data, f"{secret!r} leaked into {path.name}"


@pytest.mark.e2e
def test_e2e_provenance(e2e):
    run = Path(e2e["runs"][0])
    manifest = json.loads((run / "manifest.json").read_text())
    for package in ("esma", "nnunetv2", "torch", "papermill", "pingouin", "nibabel"):
        assert manifest["versions"][package] != "not installed"
    images = {c["subject"] for c in manifest["checksums"] if c["role"] == "image"}
    assert images == {*SUBJECTS, e2e["bad"]}
    roles = {c["role"] for c in manifest["checksums"] if c["subject"] == "-"}
    assert {"study file", "labels", "clinical"} <= roles
    if e2e["model"]:
        assert "model" in roles
    params = {nb["name"]: nb["parameters"] for nb in manifest["notebooks"]}
    assert params["02_qc"]["interactive"] is False
    assert all(p["run_dir"] == str(run) for p in params.values())
    assert all(nb["seconds"] > 0 for nb in manifest["notebooks"])
    tables = run / "tables"
    sheets = pd.ExcelFile(tables / "esma_tables.xlsx").sheet_names
    assert {"table1", "correlations_fdr", "interactions", "unmatched"} <= set(sheets)
    fdr = pd.read_csv(tables / "correlations_fdr.csv")
    correlations = pd.read_csv(run / "correlations.csv")
    assert len(fdr) == len(correlations) > 0  # every correlation, marked and sorted by p
    assert set(fdr["sig"].fillna("")) <= {"*", ""}
    assert fdr["p_fdr"].dropna().is_monotonic_increasing
    frozen = (run / "study.yml").read_text()
    assert "cohort.csv" in frozen


def test_interactive_paths_fall_back_to_the_latest_run(tmp_path):
    out = tmp_path / "out"
    old, new = out / "20250101T000000Z-aaaaaa", out / "20250102T000000Z-bbbbbb"
    for run in (old, new):
        run.mkdir(parents=True)
    (old / "asymmetry.csv").write_text("old")
    (new / "asymmetry.csv").write_text("new")
    paths = runs.RunPaths(
        out / "interactive",
        out / "work",
        out / "work/seg",
        out / "work/metrics",
        out / "d.csv",
        interactive=True,
    )
    (out / "interactive").mkdir()
    assert paths.upstream("asymmetry.csv").read_text() == "new"
    with pytest.raises(OutputError, match="run the earlier notebooks first"):
        paths.upstream("qc.csv")
    batch = runs.RunPaths(new, out / "work", out / "s", out / "m", out / "d.csv")
    with pytest.raises(OutputError, match="has not run"):
        batch.upstream("qc.csv")


def test_mosaic_gallery_orders_by_status_and_caps(tmp_path):
    from PIL import Image

    mosaics = {}
    for i, subject in enumerate(("s-pass", "s-fail", "s-flag")):
        path = tmp_path / f"{subject}.png"
        Image.new("RGB", (1000, 500), (40 * i, 80, 120)).save(path)
        mosaics[subject] = path
    summary = pd.DataFrame(
        {"subject": ["s-pass", "s-fail", "s-flag"], "status": ["pass", "fail", "flag"]}
    )
    html = s3_qc.mosaic_gallery(mosaics, summary, width_px=200, max_images=2).data
    assert html.count("data:image/jpeg;base64,") == 2
    assert html.index("s-fail (QC fail)") < html.index("s-flag (QC flag)")
    assert "1 more mosaics in the run folder" in html
    assert 'width="200" height="100"' in html


def test_redact_paths_keeps_file_names_only():
    text = (
        "InputFileError: /data/DOE_JOHN/visit 1/sub-7_T2w.nii.gz: unreadable; "
        "see /srv/x/y/labels.json"
    )
    assert runs.redact_paths(text) == (
        "InputFileError: sub-7_T2w.nii.gz: unreadable; see labels.json"
    )
    assert runs.redact_paths("/data/DOE_JOHN/sub-7_T2w.nii.gz: bad") == "sub-7_T2w.nii.gz: bad"
    assert runs.redact_paths("ratio 1/2, p < 0.05") == "ratio 1/2, p < 0.05"


@pytest.mark.e2e
def test_e2e_qc_flags_are_rare_and_no_usable_mask_fails(e2e):
    """Issue 15: a flag means "look at this" (under a third of the cohort), and the demo
    model's masks of the synthetic subjects (usable masks) never fail the anatomical checks."""
    summary = pd.read_csv(
        Path(e2e["runs"][0]) / "qc_summary.csv", dtype=str, keep_default_na=False
    ).set_index("subject")
    good = summary.drop(index=e2e["bad"], errors="ignore")
    assert len(good) == CI_SPEC.n_synthetic
    assert (good["status"] == "fail").sum() == 0, good.loc[good["status"] == "fail", "reasons"]
    assert (good["status"] == "flag").sum() < len(good) / 3, good["reasons"].tolist()
    # every subject's mask source and checksum is recorded and shown in index.html
    run = Path(e2e["runs"][0])
    sources = pd.read_csv(run / "mask_sources.csv", dtype=str, keep_default_na=False)
    sources = sources.set_index("subject")
    expected = "model" if e2e["model"] else "given"
    assert set(sources.loc[list(good.index), "source"]) == {expected}
    assert (sources.loc[list(good.index), "sha256"].str.len() == 64).all()
    index = (run / "index.html").read_text()
    assert "<h2>Masks</h2>" in index
    assert f"{expected} {len(good)}" in index
