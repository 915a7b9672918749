"""Killing a run and starting it again: nothing finished is recomputed, nothing half-written is
taken as done, the cohort finishes, bad subjects fail alone, and no identity reaches a report.

The study is built the way a clinical user would: synthetic phantoms are written as DICOM with a
fake patient identity, ingested (``helpers.dicom.ingest``: pseudonymized NIfTI + a key kept
outside the study), then two bad subjects are added (a truncated image; a mask holding a label
the label file does not declare).

CI scenario (``e2e``): the runner of ``esma run`` (:func:`helpers.pipeline.run_study`) with the
segmentation and metrics notebooks, started as a subprocess in its own session,

1. killed with SIGTERM (to its process group, as a scheduler or Ctrl-C would) once the first
   subject's measurement is finished,
2. started again and killed with SIGKILL once it has finished a further subject; before the
   restart one finished result is torn (truncated, marker left in place),
3. started again and left to finish.

The slow scenario runs the full ``esma run STUDY.yml`` command line (all four notebooks),
killed with SIGKILL while it segments (demo model present) or measures, then resumed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import psutil
import pytest
import yaml
from dicom_factory import Series, write_series

from helpers import dicom, synthetic
from helpers.clinical import PlantedRelation, simulate_clinical, write_table
from helpers.demo import find_demo_model
from helpers.files import MARKER_SUFFIX, sha256_file

N_GOOD = 5
BAD = {"bad-trunc": "unreadable or truncated NIfTI", "bad-labels": "label values [11]"}
#: Results of one subject's measurement in the study's work folder.
RESULT_FILES = ("metrics.csv", "asymmetry.csv")
#: Stage notebooks the CI scenario runs (segmentation: masks given; metrics: N4 + fat).
CI_NOTEBOOKS = "01_segment,03_metrics"
RUNNER = (
    "import sys; from helpers.pipeline import run_study; "
    "r = run_study(sys.argv[1], notebooks=sys.argv[2].split(','), progress=False); "
    "sys.exit(r.exit_code)"
)


def identity(i: int) -> dict[str, str]:
    return {
        "PatientName": f"TESTPERSON^ALICE{i}",
        "PatientID": f"PID-77{i:04d}",
        "PatientBirthDate": f"194{i}0203",
        "AccessionNumber": f"ACC55{i:04d}",
        "InstitutionName": "Fake General Hospital",
        "StudyDate": f"2023011{i}",
    }


def identity_needles() -> list[str]:
    out = {"Fake General Hospital", "TESTPERSON"}
    for i in range(N_GOOD):
        ident = identity(i)
        out |= {ident["PatientID"], ident["PatientBirthDate"], ident["AccessionNumber"]}
        out |= {f"ALICE{i}", ident["StudyDate"]}
    return sorted(out)


# --------------------------------------------------------------------------------- the study
def build_study(root: Path, use_model: bool = False) -> dict:
    """Phantoms -> DICOM with identity -> ingest -> study folder (+ two bad subjects)."""
    phantoms = synthetic.make_cohort(
        N_GOOD, root / "phantoms", seed=5, template="small", orientations=("LPS",)
    )
    export = root / "export"
    for i, row in enumerate(phantoms.itertuples(index=False)):
        img = nib.load(row.image)
        write_series(
            export / f"patient{i}",
            Series(np.asarray(img.dataobj, dtype=np.float64), img.affine, identity=identity(i)),
        )
    study = root / "study"
    inputs = study / "inputs"
    key = root / "private" / "key.csv"
    result = dicom.ingest(export, inputs / "images", key_path=key)
    assert len(result.images) == N_GOOD
    key_table = pd.read_csv(key, dtype=str)
    by_patient = dict(zip(key_table["patient_id"], key_table["pseudonym"], strict=True))

    rows, names = [], {}
    for i, ph in enumerate(phantoms.itertuples(index=False)):
        subject = by_patient[identity(i)["PatientID"]]
        names[ph.subject] = subject
        image = inputs / "images" / f"{subject}_T2w.nii.gz"
        img, msk = nib.load(image), nib.load(ph.mask)
        assert np.max(np.abs(img.affine - msk.affine)) < 1e-3  # the ingest kept the grid
        mask = inputs / "masks" / f"{subject}_dseg.nii.gz"
        mask.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.asarray(msk.dataobj), img.affine), mask)
        levels = inputs / "levels" / f"{subject}.csv"
        levels.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ph.levels, levels)
        rows.append({"subject": subject, "image": image, "mask": mask, "levels": levels})

    first, second = rows[0], rows[1]
    trunc = inputs / "bad" / "bad-trunc_T2w.nii.gz"
    trunc.parent.mkdir(parents=True, exist_ok=True)
    raw = first["image"].read_bytes()
    trunc.write_bytes(raw[: len(raw) // 2])
    rows.append({"subject": "bad-trunc", "image": trunc, "mask": first["mask"], "levels": ""})
    labels_img = inputs / "bad" / "bad-labels_T2w.nii.gz"
    shutil.copyfile(second["image"], labels_img)
    m = nib.load(second["mask"])
    data = np.asarray(m.dataobj).copy()
    data[data == 3] = 11
    bad_mask = inputs / "bad" / "bad-labels_dseg.nii.gz"
    nib.save(nib.Nifti1Image(data, m.affine), bad_mask)
    rows.append({"subject": "bad-labels", "image": labels_img, "mask": bad_mask, "levels": ""})
    manifest = pd.DataFrame(rows)
    for col in ("image", "mask", "levels"):
        manifest[col] = [str(Path(p).relative_to(inputs)) if str(p) else "" for p in manifest[col]]
    manifest.to_csv(inputs / "manifest.csv", index=False)
    shutil.copyfile(root / "phantoms" / "labels.json", inputs / "labels.json")

    truth = pd.read_csv(root / "phantoms" / "asymmetry_truth.csv", dtype={"level": str})
    truth["subject"] = truth["subject"].map(names)
    relation = PlantedRelation(
        index="cdi_abs",
        muscle="erector_spinae",
        level="all",
        score="odi_pct",
        rho_male=1.0,
        rho_female=0.0,
    )
    clinical = simulate_clinical(truth, seed=5, relation=relation, p_missing=0.0)
    write_table(clinical, inputs / "clinical.csv")

    doc = {
        "study": "interrupt",
        "images": "inputs/manifest.csv",
        "labels": "inputs/labels.json",
        "clinical": {"path": "inputs/clinical.csv"},
        "metrics": {"bias_correction": True},
        "qc": {"z_edge_status": "pass"},
        "statistics": {"covariates": ["age", "bmi"], "levels": ["all"]},
        "executor": {"kind": "sequential"},
        "output": ".",
    }
    model = find_demo_model() if use_model else None
    if model is not None:
        manifest.drop(columns="mask").to_csv(inputs / "manifest.csv", index=False)
        doc["model"] = str(model)
        doc["segmentation"] = {"device": "cpu", "fast": True}
    (study / "study.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    good = [r["subject"] for r in rows[:N_GOOD]]
    return {"root": root, "study": study / "study.yml", "good": good, "model": model is not None}


# ------------------------------------------------------------------------- run and kill
def start(command: list[str], cwd: Path, log_path: Path) -> subprocess.Popen:
    log = log_path.open("ab")
    return subprocess.Popen(
        command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def ci_command(study: Path) -> list[str]:
    return [sys.executable, "-c", RUNNER, str(study), CI_NOTEBOOKS]


def esma_command(study: Path) -> list[str]:
    return [str(Path(sys.executable).with_name("esma")), "run", str(study)]


def finished(work: Path, stage_dir: str = "metrics") -> dict[str, Path]:
    """Subjects whose results sit in the work folder with matching completion markers."""
    out = {}
    for folder in sorted((work / stage_dir).glob("*")):
        ok = True
        for name in RESULT_FILES:
            target, marker = folder / name, folder / (name + MARKER_SUFFIX)
            if not (target.is_file() and marker.is_file()):
                ok = False
                break
            record = json.loads(marker.read_text())
            ok &= record.get("sha256") == sha256_file(target)
        if ok:
            out[folder.name] = folder
    return out


def segmented(work: Path) -> set[str]:
    return {p.name.split(".")[0] for p in work.rglob(f"*_dseg.nii.gz{MARKER_SUFFIX}")}


def kill_when(
    proc: subprocess.Popen, ready, sig: int, timeout_s: float = 240.0
) -> dict[str, float | int]:
    """Send ``sig`` to the run's process group as soon as ``ready()``; wait until every process
    of the run (the kernel too, which lives in its own session) is gone."""
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before it could be killed")
        if time.monotonic() - t0 > timeout_s:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the run did not reach the kill point in time")
        time.sleep(0.02)
    family = [psutil.Process(proc.pid)]
    try:
        family += family[0].children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    killed_at = time.monotonic()
    os.killpg(proc.pid, sig)
    proc.wait(timeout=60)
    _gone, alive = psutil.wait_procs(family, timeout=20)
    for p in alive:  # leave nothing running whatever happens
        p.kill()
    return {
        "after_s": round(killed_at - t0, 2),
        "exit": proc.returncode,
        "processes": len(family),
        "survivors": len(alive),
        "all_gone_s": round(time.monotonic() - killed_at, 2),
    }


def snapshot(folders: dict[str, Path]) -> dict[str, dict[str, tuple[str, int]]]:
    return {
        subject: {p.name: (sha256_file(p), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}
        for subject, folder in folders.items()
    }


def stray_temporaries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name)


def gunzip(raw: bytes) -> bytes:
    """Decompress as much of a gzip stream as there is (the truncated test image too)."""
    return zlib.decompressobj(wbits=31).decompress(raw)


def latest_run(study_dir: Path) -> Path:
    """The run folder written last (it holds the run's failures.csv)."""
    runs = [p.parent for p in study_dir.rglob("failures.csv")]
    return max(runs, key=lambda r: (r / "failures.csv").stat().st_mtime_ns)


# ------------------------------------------------------------------------------ scenarios
def scenario(root: Path, built: dict, command, name: str) -> dict:
    """SIGTERM after the first finished subject, restart, SIGKILL after one more, tear one
    finished result, restart and let it finish.  ``command(i)`` is the i-th start's argv."""
    study_dir, work = built["study"].parent, built["study"].parent / "work"
    log_path = root / f"{name}.log"
    record: dict = {**built, "work": work, "log": log_path}

    proc = start(command(1), study_dir, log_path)
    record["term"] = kill_when(proc, lambda: len(finished(work)) >= 1, signal.SIGTERM)
    done_1 = finished(work)
    record["done_after_term"] = sorted(done_1)
    record["snap_after_term"] = snapshot(done_1)
    record["tmp_after_term"] = stray_temporaries(work)

    proc = start(command(2), study_dir, log_path)
    target = len(done_1) + 1
    record["kill"] = kill_when(proc, lambda: len(finished(work)) >= target, signal.SIGKILL)
    done_2 = finished(work)
    record["done_after_kill"] = sorted(done_2)
    record["snap_after_kill"] = snapshot(done_2)
    record["tmp_after_kill"] = stray_temporaries(work)

    # a finished result torn outside the atomic writer: its marker no longer matches
    torn = min(done_2)
    metrics_csv = done_2[torn] / "metrics.csv"
    metrics_csv.write_bytes(metrics_csv.read_bytes()[:40])
    record["torn"] = torn

    t0 = time.monotonic()
    proc = start(command(3), study_dir, log_path)
    record["final_exit"] = proc.wait(timeout=900)
    record["final_s"] = round(time.monotonic() - t0, 1)
    record["final_run"] = latest_run(study_dir)
    record["tmp_final"] = stray_temporaries(work)
    summary = {k: v for k, v in record.items() if not k.startswith("snap")}
    (root / f"{name}.json").write_text(json.dumps(summary, indent=2, default=str))
    return record


#: The per-subject stages ``esma run`` drives, called in a plain process (no notebook kernel):
#: segmentation (masks given) then measurement, into a fresh run folder, as the notebooks do.
STAGES = (
    "import sys; from helpers import pipeline as p; "
    "s, paths = p.open_study(sys.argv[1], sys.argv[2]); "
    "p.segment_stage(s, paths, progress=False); p.metrics_stage(s, paths, progress=False); "
    "f = p.collect_failures(paths.run_dir); "
    "p.atomic_write_text(paths.run_dir / 'manifest.json', '{}'); "
    "sys.exit(1 if len(f) else 0)"
)


@pytest.fixture(scope="module")
def stage_record(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("interrupt_stages")
    built = build_study(root)
    study = built["study"]
    runs = study.parent / "runs"

    def command(i: int) -> list[str]:
        return [sys.executable, "-c", STAGES, str(study), str(runs / f"run-{i}")]

    return scenario(root, built, command, "stages")


@pytest.fixture(scope="module")
def esma_record(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("interrupt_esma")
    built = build_study(root, use_model=True)
    exe = str(Path(sys.executable).with_name("esma"))
    return scenario(root, built, lambda i: [exe, "run", str(built["study"])], "esma")


SCENARIOS = [
    pytest.param("stage_record", marks=pytest.mark.e2e, id="stages"),
    pytest.param("esma_record", marks=pytest.mark.slow, id="esma-run"),
]


# ---------------------------------------------------------------------------------- checks
@pytest.mark.parametrize("name", SCENARIOS)
def test_sigterm_and_sigkill_leave_no_process_behind(request, name):
    record = request.getfixturevalue(name)
    for case in ("term", "kill"):
        info = record[case]
        assert info["survivors"] == 0, info  # the notebook kernel (own session) went too
    assert record["term"]["exit"] == -signal.SIGTERM
    assert record["kill"]["exit"] == -signal.SIGKILL
    # the kills hit mid-cohort: some subjects finished, not all
    assert 1 <= len(record["done_after_term"]) < N_GOOD
    assert len(record["done_after_term"]) < len(record["done_after_kill"]) <= N_GOOD


@pytest.mark.parametrize("name", SCENARIOS)
def test_resumed_run_finishes_the_cohort_and_fails_only_the_bad_subjects(request, name):
    record = request.getfixturevalue(name)
    assert record["final_exit"] == 1, record["log"].read_text()[-3000:]
    run = record["final_run"]
    failures = pd.read_csv(run / "failures.csv", dtype=str, keep_default_na=False)
    assert set(failures["subject"]) == set(BAD)
    for subject, reason in BAD.items():
        errors = " ".join(failures.loc[failures["subject"] == subject, "error"])
        assert reason in errors, (subject, errors)
    metrics = pd.read_csv(run / "metrics.csv")
    assert sorted(metrics["subject"].unique()) == sorted(record["good"])
    assert set(finished(record["work"])) == set(record["good"])
    if (run / "index.html").is_file():  # esma run: shown in the report
        index = (run / "index.html").read_text(encoding="utf-8")
        for subject in BAD:
            assert subject in index


@pytest.mark.parametrize("name", SCENARIOS)
def test_finished_subjects_are_reused_not_recomputed(request, name):
    record = request.getfixturevalue(name)
    work, torn = record["work"], record["torn"]
    # what the first run finished survived the second run untouched (content and mtime) ...
    for subject, files in record["snap_after_term"].items():
        if subject != torn:
            assert snapshot({subject: work / "metrics" / subject})[subject] == files, subject
    # ... and what was finished before the final run survived it
    before_final = {s: v for s, v in record["snap_after_kill"].items() if s != torn}
    assert snapshot({s: work / "metrics" / s for s in before_final}) == before_final
    stage = "measure" if (record["final_run"] / "stages" / "measure.json").is_file() else "metrics"
    counts = json.loads((record["final_run"] / "stages" / f"{stage}.json").read_text())
    assert counts.get("n_reused", 0) == len(before_final), counts
    assert counts.get("n_computed", 0) == N_GOOD - len(before_final), counts
    assert counts.get("n_failed", 0) == len(BAD), counts


@pytest.mark.parametrize("name", SCENARIOS)
def test_torn_result_is_recomputed_not_taken_as_done(request, name):
    record = request.getfixturevalue(name)
    folder = record["work"] / "metrics" / record["torn"]
    table = pd.read_csv(folder / "metrics.csv")
    assert len(table) > 8
    assert table["subject"].eq(record["torn"]).all()
    marker = json.loads((folder / ("metrics.csv" + MARKER_SUFFIX)).read_text())
    assert marker["sha256"] == sha256_file(folder / "metrics.csv")


@pytest.mark.parametrize("name", SCENARIOS)
def test_no_identity_in_anything_the_study_holds(request, name):
    """Every file of the study (images, work folder, reports) and the run logs."""
    record = request.getfixturevalue(name)
    study_dir = record["study"].parent
    needles = [n.lower().encode() for n in identity_needles()]
    n_files = 0
    for path in (p for p in study_dir.rglob("*") if p.is_file()):
        raw = path.read_bytes()
        contents = [raw, gunzip(raw)] if path.name.endswith(".gz") else [raw]
        n_files += 1
        for content in contents:
            low = content.lower()
            for needle in needles:
                assert needle not in low, f"{needle!r} in {path}"
    assert n_files > 40
    log = record["log"].read_text(errors="replace").lower()
    for needle in needles:
        assert needle.decode() not in log
