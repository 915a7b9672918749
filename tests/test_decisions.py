"""QC decisions follow their inputs: automatic ones are re-derived, a reviewer's are kept and
marked stale when the mask, image or settings they were taken on change."""

from __future__ import annotations

import pandas as pd

from helpers import qc


def _summary(status: str, reasons: str = "") -> pd.DataFrame:
    return pd.DataFrame(
        [{"subject": "sub-01", "status": status, "n_fail": 0, "n_flag": 0, "reasons": reasons}]
    )


def _fp(mask: str, image: str = "i" * 64, settings: str = "s" * 64) -> str:
    return qc.inputs_fingerprint({"mask": mask, "image": image, "settings": settings})


def test_fingerprint_is_compact_and_names_each_input():
    fp = _fp("a" * 64)
    assert fp == "image=iiiiiiiiiiii;mask=aaaaaaaaaaaa;settings=ssssssssssss"
    # a mapping value (settings) is hashed, so a changed threshold changes the fingerprint
    a = qc.inputs_fingerprint({"settings": {"min_dice": 0.8}})
    b = qc.inputs_fingerprint({"settings": {"min_dice": 0.7}})
    assert a != b
    assert a.startswith("settings=")


def test_automatic_decision_is_rederived_when_the_mask_is_fixed(tmp_path):
    path = tmp_path / "qc_decisions.csv"
    bad = qc.init_decisions(
        _summary("fail", "fail arrangement: swapped"), path, inputs={"sub-01": _fp("a" * 64)}
    ).set_index("subject")
    assert bad.loc["sub-01", "decision"] == "exclude"
    assert bad.loc["sub-01", "inputs"] == _fp("a" * 64)
    assert list(qc.excluded_subjects(path)["subject"]) == ["sub-01"]
    # the corrected mask passes: the automatic row follows (today's bug: it stayed excluded)
    fixed = qc.init_decisions(
        _summary("pass"), path, inputs={"sub-01": _fp("b" * 64)}
    ).set_index("subject")
    assert fixed.loc["sub-01", "decision"] == "include"
    assert fixed.loc["sub-01", "reviewer"] == qc.AUTO_REVIEWER
    assert fixed.loc["sub-01", "reason"] == "QC pass"
    assert fixed.loc["sub-01", "inputs"] == _fp("b" * 64)
    assert fixed.loc["sub-01", "stale"] == ""
    assert qc.excluded_subjects(path).empty


def test_reviewer_decision_is_kept_and_marked_stale_when_its_inputs_change(tmp_path):
    path = tmp_path / "qc_decisions.csv"
    qc.init_decisions(_summary("flag", "flag x"), path, inputs={"sub-01": _fp("a" * 64)})
    qc.set_decision(path, "sub-01", "exclude", "Dr. A", "psoas cut off")
    d = qc.read_decisions(path).set_index("subject")
    assert d.loc["sub-01", "inputs"] == _fp("a" * 64)
    # same inputs again: nothing changes, the file is not even rewritten
    before = path.read_bytes()
    qc.init_decisions(_summary("flag", "flag x"), path, inputs={"sub-01": _fp("a" * 64)})
    assert path.read_bytes() == before
    # the image was replaced and the settings changed: decision kept, marked stale
    new = _fp("a" * 64, image="j" * 64, settings="t" * 64)
    d = qc.init_decisions(_summary("pass"), path, inputs={"sub-01": new}).set_index("subject")
    assert d.loc["sub-01", "decision"] == "exclude"
    assert d.loc["sub-01", "reviewer"] == "Dr. A"
    assert d.loc["sub-01", "reason"] == "psoas cut off"
    assert d.loc["sub-01", "inputs"] == _fp("a" * 64)
    assert d.loc["sub-01", "qc_inputs"] == new
    assert d.loc["sub-01", "stale"] == "inputs changed since this decision: image, settings"
    assert list(qc.excluded_subjects(path)["subject"]) == ["sub-01"]  # still honoured
    # the reviewer looks again and decides: no longer stale, taken on the new inputs
    qc.set_decision(path, "sub-01", "include", "Dr. A", "re-checked")
    d = qc.read_decisions(path).set_index("subject")
    assert d.loc["sub-01", "stale"] == ""
    assert d.loc["sub-01", "inputs"] == new
    # and a later QC with those inputs keeps it fresh
    d = qc.init_decisions(_summary("pass"), path, inputs={"sub-01": new}).set_index("subject")
    assert d.loc["sub-01", "stale"] == ""
    assert d.loc["sub-01", "decision"] == "include"


def test_legacy_file_without_input_columns_gets_them(tmp_path):
    path = tmp_path / "qc_decisions.csv"
    qc.init_decisions(_summary("fail", "fail y"), path)  # no inputs: legacy columns only
    assert tuple(qc.read_decisions(path).columns) == qc.DECISION_COLUMNS
    qc.set_decision(path, "sub-01", "include", "Dr. B", "fine")
    d = qc.init_decisions(
        _summary("fail", "fail y"), path, inputs={"sub-01": _fp("a" * 64)}
    ).set_index("subject")
    # no record of what Dr. B saw: today's inputs become the baseline, not stale
    assert d.loc["sub-01", "decision"] == "include"
    assert d.loc["sub-01", "inputs"] == _fp("a" * 64)
    assert d.loc["sub-01", "stale"] == ""


def test_pipeline_rederives_the_decision_when_a_fixed_mask_replaces_a_bad_one(
    tmp_path, example_dir
):
    import shutil

    import nibabel as nib
    import numpy as np

    from helpers import runs
    from helpers.stages import s1_segment, s3_qc

    shutil.copyfile(example_dir / "labels.json", tmp_path / "labels.json")
    shutil.copyfile(example_dir / "sub-0001_T1w.nii.gz", tmp_path / "sub-0001_T2w.nii.gz")
    good = nib.load(example_dir / "sub-0001_T1w_dseg.nii.gz")
    data = np.asarray(good.dataobj)
    swapped = data.copy()
    for a, b in ((1, 3), (2, 4)):  # multifidus <-> erector spinae
        swapped[data == a] = b
        swapped[data == b] = a
    mask_path = tmp_path / "sub-0001_dseg.nii.gz"
    nib.save(nib.Nifti1Image(swapped, good.affine, good.header), mask_path)
    study_file = tmp_path / "study.yml"
    study_file.write_text(
        "study: tiny\nimages: '*_T2w.nii.gz'\nlabels: labels.json\n"
        "masks: '{subject}_dseg.nii.gz'\noutput: out\n"
    )

    def run_qc_stage() -> pd.DataFrame:
        study, paths = runs.open_study(study_file)
        paths.run_dir.mkdir(parents=True, exist_ok=True)
        seg = s1_segment.segment_stage(study, paths, progress=False)
        out = s3_qc.qc_stage(study, paths, seg, progress=False)
        return out.decisions.set_index("subject")

    first = run_qc_stage()
    assert first.loc["sub-0001", "decision"] == "exclude"
    assert "multifidus and erector spinae swapped" in first.loc["sub-0001", "reason"]
    # the reviewer's fix: the correct mask replaces the bad one
    shutil.copyfile(example_dir / "sub-0001_T1w_dseg.nii.gz", mask_path)
    second = run_qc_stage()
    assert second.loc["sub-0001", "decision"] == "include"
    assert second.loc["sub-0001", "inputs"] != first.loc["sub-0001", "inputs"]
    assert second.loc["sub-0001", "reviewer"] == qc.AUTO_REVIEWER
