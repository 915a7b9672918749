"""Each subject's contrast (issue 18): from the DICOM header at ingest, the file suffix, the
study, or a manifest; mixing only when the study allows it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from dicom_factory import Series, write_series

from helpers import dicom
from helpers.config import load_study
from helpers.errors import ConfigError

LABELS = Path(__file__).parents[1] / "data" / "example" / "labels.json"


def ramp(shape: tuple[int, int, int]) -> np.ndarray:
    return (np.arange(np.prod(shape)).reshape(shape) + 100).astype(np.float64)


def axial_affine() -> np.ndarray:
    """RAS+ affine of an LPS-stored axial volume."""
    aff = np.diag([-0.9, -0.8, 4.4, 1.0])
    aff[:3, 3] = (60.0, 40.0, -30.0)
    return aff


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dicom.SECRET_ENV, "test-secret")


def test_ingest_records_the_contrast_the_header_gives(tmp_path, secret):
    write_series(tmp_path / "export" / "a", Series(ramp((6, 5, 3)), axial_affine()))
    write_series(tmp_path / "export" / "b",
                 Series(ramp((6, 5, 3)), axial_affine(), description="T1_TSE_TRA",
                        echo_time=12.0, repetition_time=600.0, series_number=4))
    root = tmp_path / "study"
    root.mkdir()
    shutil.copyfile(LABELS, root / "labels.json")
    (root / "model.zip").write_bytes(b"stand-in")
    doc = {"study": "s", "labels": "labels.json", "model": "model.zip", "output": "out",
           "ingest": {"dicom": "../export", "key": "../private/key.csv"}}
    (root / "study.yml").write_text(yaml.safe_dump(doc))
    result = dicom.ingest(tmp_path / "export", root / "out" / "ingested",
                          key_path=tmp_path / "private" / "key.csv")
    table = pd.read_csv(root / "out" / "ingested" / "ingest.csv", keep_default_na=False)
    by_status = dict(zip(table["status"], table["contrast"], strict=True))
    assert by_status == {"written": "T2w", "skipped": ""}  # the T1 series is not ingested
    assert len(result.images) == 1
    study = load_study(root / "study.yml")
    assert [s.contrast for s in study.subjects] == ["T2w"]


def _nifti(path: Path) -> None:
    import nibabel as nib

    data = np.zeros((8, 8, 3), dtype=np.int16)
    data[2:6, 2:6, :] = 100
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)


def _study(root: Path, images: object, **extra: object) -> Path:
    shutil.copyfile(LABELS, root / "labels.json")
    doc = {"study": "c", "images": images, "labels": "labels.json", "masks": "masks/",
           "output": "out", **extra}
    path = root / "study.yml"
    path.write_text(json.dumps(doc))
    return path


def test_contrast_from_suffix_then_study_default(tmp_path):
    for name in ("sub-a_T1w", "sub-b_T1w", "sub-c"):
        _nifti(tmp_path / "img" / f"{name}.nii.gz")
        _nifti(tmp_path / "masks" / f"{name.split('_')[0]}_dseg.nii.gz")
    with pytest.raises(ConfigError, match=r"mixes contrasts \(2 T1w, 1 unspecified\)"):
        load_study(_study(tmp_path, "img/*.nii.gz"))
    study = load_study(_study(tmp_path, "img/*.nii.gz", contrast="t1w"))
    assert [(s.subject, s.contrast) for s in study.subjects] == [
        ("sub-a", "T1w"), ("sub-b", "T1w"), ("sub-c", "T1w")]
    with pytest.raises(ConfigError, match="contrast: 'STIR' is not one of T1w, T2w, dixon"):
        load_study(_study(tmp_path, "img/*.nii.gz", contrast="STIR"))
    study = load_study(_study(tmp_path, "img/*.nii.gz", contrast="T2w", mixed_contrast=True))
    assert [s.contrast for s in study.subjects] == ["T1w", "T1w", "T2w"]
    with pytest.raises(ConfigError, match="mixed_contrast: must be true or false"):
        load_study(_study(tmp_path, "img/*.nii.gz", mixed_contrast="yes"))


def test_manifest_contrast_column_wins_over_the_suffix(tmp_path):
    for name in ("sub-a_T2w", "sub-b_T2w"):
        _nifti(tmp_path / "img" / f"{name}.nii.gz")
        _nifti(tmp_path / "masks" / f"{name.split('_')[0]}_dseg.nii.gz")
    pd.DataFrame({"image": ["img/sub-a_T2w.nii.gz", "img/sub-b_T2w.nii.gz"],
                  "contrast": ["T1w", "t1w"]}).to_csv(tmp_path / "m.csv", index=False)
    study = load_study(_study(tmp_path, "m.csv"))
    assert [s.contrast for s in study.subjects] == ["T1w", "T1w"]
    # the frozen cohort of a run keeps it
    table = study.cohort_table()
    assert list(table["contrast"]) == ["T1w", "T1w"]


def test_add_contrast_and_counts():
    from helpers.contrast import add_contrast, contrast_counts

    table = pd.DataFrame({"subject": ["a", "b", "c"], "x": [1, 2, 3]})
    out = add_contrast(table, {"a": "T1w", "b": "dixon"})
    assert list(out.columns) == ["subject", "x", "contrast"]
    assert list(out["contrast"]) == ["T1w", "dixon", "unspecified"]
    assert "contrast" not in table.columns  # a copy
    assert contrast_counts({"a": "T2w", "b": "T2w", "c": "", "d": "dixon"}) == {
        "T2w": 2, "dixon": 1, "unspecified": 1}


def test_correlations_by_contrast_equal_the_per_contrast_tables():
    from helpers import stats
    from helpers.contrast import correlations_by_contrast

    rng = np.random.default_rng(3)
    n = 24
    subjects = [f"s{i:02d}" for i in range(n)]
    asym = pd.DataFrame({"subject": subjects, "level": "all", "muscle": "erector_spinae",
                         "cdi": rng.normal(size=n), "cdi_abs": rng.random(n),
                         "lfiar": rng.random(n) + 0.5, "lfiar_log": rng.normal(size=n),
                         "contrast": ["T2w"] * 12 + ["dixon"] * 12})
    scores = pd.DataFrame({"subject": subjects, "sex": ["M", "F"] * 12,
                           "age": rng.normal(50, 10, n), "bmi": rng.normal(25, 3, n),
                           "odi_pct": rng.random(n) * 100})
    table = correlations_by_contrast(asym, scores, covariates=("age", "bmi"))
    assert list(table.columns[:2]) == ["contrast", "group"]
    assert set(table["contrast"]) == {"T2w", "dixon"}
    for contrast in ("T2w", "dixon"):
        sub = asym[asym["contrast"] == contrast].drop(columns=["contrast"]).reset_index(drop=True)
        expect = stats.correlation_table(sub, scores, covariates=("age", "bmi"))
        got = table[table["contrast"] == contrast].drop(columns=["contrast"]).reset_index(
            drop=True)
        pd.testing.assert_frame_equal(got, expect)
    # the pooled table differs from either stratum (the point of stratifying)
    pooled = stats.correlation_table(asym.drop(columns=["contrast"]), scores,
                                     covariates=("age", "bmi"))
    assert int(pooled["n"].max()) == n
    assert int(table["n"].max()) == 12


def test_statistics_write_the_stratified_table_only_for_mixed_cohorts(tmp_path):
    from helpers import runs
    from helpers.contrast import correlations_by_contrast
    from helpers.stages import s5_statistics

    paths = runs.RunPaths(run_dir=tmp_path, work_dir=tmp_path / "work",
                              seg_dir=tmp_path / "seg", metrics_dir=tmp_path / "m",
                              decisions=tmp_path / "d.csv", interactive=False)
    rng = np.random.default_rng(4)
    n = 16
    subjects = [f"s{i:02d}" for i in range(n)]
    asym = pd.DataFrame({"subject": subjects, "level": "all", "muscle": "multifidus",
                         "cdi": rng.normal(size=n), "contrast": ["T2w"] * n})
    scores = pd.DataFrame({"subject": subjects, "sex": ["M", "F"] * 8,
                           "odi_pct": rng.random(n) * 100})
    kwargs = {"indices": ["cdi"], "scores_cols": None, "covariates": []}
    assert s5_statistics.write_correlations_by_contrast(paths, asym, scores, "group", kwargs) == {}
    assert not (tmp_path / "correlations_by_contrast.csv").exists()
    asym["contrast"] = ["T2w"] * 8 + ["T1w"] * 8
    files = s5_statistics.write_correlations_by_contrast(paths, asym, scores, "group", kwargs)
    written = pd.read_csv(files["correlations_by_contrast"])
    expect = correlations_by_contrast(asym, scores, family="group", **kwargs)
    assert len(written) == len(expect) == 2 * 3  # 2 contrasts x 3 groups x 1 index x 1 score
    assert np.allclose(written["rho"], expect["rho"], equal_nan=True)


def test_cli_records_the_contrast_from_the_suffix(tmp_path):
    from helpers.cli import main
    from helpers.synthetic import make_phantom, write_phantom

    paths = write_phantom(make_phantom("sub-c1", template="small", seed=2), tmp_path)
    t1 = tmp_path / "sub-c1_T1w.nii.gz"
    shutil.copyfile(paths["image"], t1)
    for image, expect in ((paths["image"], "T2w"), (t1, "T1w")):
        out = tmp_path / f"out-{expect}"
        assert main(["metrics", "--image", str(image), "--mask", str(paths["mask"]), "--labels",
                     str(paths["labels"]), "--out", str(out), "--no-bias-correction"]) == 0
        ref = json.loads((out / "reference.json").read_text())
        assert ref["contrast"] == expect
        assert set(pd.read_csv(out / "metrics.csv")["subject"]) == {"sub-c1"}
