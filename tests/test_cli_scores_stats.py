"""The `esma scores` and `esma stats` command-line contracts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from helpers.cli import main
from helpers.clinical import (
    PlantedRelation,
    load_clinical,
    simulate_asymmetry,
    simulate_clinical,
    write_table,
)
from helpers.scores import SCORE_COLUMNS, score_clinical
from helpers.stats import CORRELATION_COLUMNS, INTERACTION_COLUMNS, correlation_table


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A synthetic cohort: asymmetry.csv for 20 subjects + 1 imaging-only, clinical.csv for
    20 subjects + 1 clinical-only."""
    root = tmp_path_factory.mktemp("study")
    asym = simulate_asymmetry(21, seed=3, muscles=("erector_spinae", "multifidus"))
    clinical = simulate_clinical(asym, seed=3, relation=PlantedRelation(rho_male=0.8))
    clinical.loc[20, "subject"] = "sub-0100"  # no imaging
    asym_path = write_table(asym, root / "asymmetry.csv")
    clinical_path = write_table(clinical, root / "clinical.csv")
    return root, asym_path, clinical_path


def _run(capsys, *argv: str) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


# ------------------------------------------------------------------------------ esma scores
def test_scores_writes_the_contract_columns(study, capsys, tmp_path):
    _, _, clinical_path = study
    out = tmp_path / "scores.csv"
    rc, _ = _run(capsys, "scores", "--clinical", clinical_path, "--out", out)
    assert rc == 0
    got = pd.read_csv(out, dtype={"subject": str})
    assert tuple(got.columns) == SCORE_COLUMNS
    expected, _ = score_clinical(load_clinical(clinical_path))
    assert got["subject"].tolist() == expected["subject"].tolist()
    for col in ("age", "bmi", "cobb_deg", "odi_pct", "srs_subtotal", "srs_total", "vas_back"):
        np.testing.assert_array_equal(got[col].to_numpy(float), expected[col].to_numpy(float))
    assert not (tmp_path / "scores_skipped.csv").exists()


def _clinical_with(tmp_path, change) -> tuple:
    rows = simulate_clinical(["s01", "s02", "s03"], seed=1, relation=None, p_missing=0.0)
    rows = rows.astype(object)
    change(rows)
    path = write_table(rows, tmp_path / "clinical.csv")
    return path, tmp_path / "scores.csv"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d.__setitem__("odi_4", ["1", "7", "2"]),
         "subject 's02', column 'odi_4' (row 2): out of range (allowed: whole numbers 0 to 5)"),
        (lambda d: d.__setitem__("age", [60, "sixty", 70]),
         "subject 's02', column 'age' (row 2): not a number (allowed: numbers 0 to 120)"),
        (lambda d: d.__setitem__("subject", ["s01", "s03", "s03"]),
         "subject 's03', column 'subject' (row 2): duplicated subject (rows [2, 3])"),
        (lambda d: d.__setitem__("srs_5", [3, 2.5, 3]),
         "subject 's02', column 'srs_5' (row 2): not a whole number"),
    ],
)
def test_scores_bad_input_stops_naming_subject_and_column(tmp_path, capsys, change, expected):
    path, out = _clinical_with(tmp_path, change)
    rc, err = _run(capsys, "scores", "--clinical", path, "--out", out)
    assert rc == 2
    assert err.startswith(f"esma scores: error: {path}: ")
    assert expected in err
    assert not out.exists()


def test_scores_skip_invalid_scores_the_rest_and_lists_the_skipped(tmp_path, capsys, caplog):
    path, out = _clinical_with(tmp_path, lambda d: d.__setitem__("odi_4", ["1", "7", "2"]))
    (tmp_path / "scores_skipped.csv").write_text("stale")
    rc, _ = _run(capsys, "scores", "--clinical", path, "--out", out, "--skip-invalid")
    assert rc == 1
    assert "skipped subject 's02' (row 2): column 'odi_4': out of range" in caplog.text
    assert pd.read_csv(out)["subject"].tolist() == ["s01", "s03"]
    skipped = pd.read_csv(tmp_path / "scores_skipped.csv")
    assert skipped[["row", "subject", "column", "value"]].values.tolist() == [
        [2, "s02", "odi_4", 7]]
    # a clean rerun removes the stale list
    path, out = _clinical_with(tmp_path, lambda d: None)
    assert _run(capsys, "scores", "--clinical", path, "--out", out, "--skip-invalid")[0] == 0
    assert not (tmp_path / "scores_skipped.csv").exists()


def test_scores_missing_file_and_missing_column(tmp_path, capsys):
    rc, err = _run(capsys, "scores", "--clinical", tmp_path / "no.csv", "--out", tmp_path / "o.csv")
    assert rc == 2
    assert f"{tmp_path / 'no.csv'}: clinical file not found" in err
    path, out = _clinical_with(tmp_path, lambda d: d.drop(columns="sex", inplace=True))
    rc, err = _run(capsys, "scores", "--clinical", path, "--out", out)
    assert rc == 2
    assert "missing column(s) ['sex']" in err


def test_scores_with_a_site_mapping(tmp_path, capsys):
    site = simulate_clinical(["P1", "P2"], seed=2, relation=None, p_missing=0.0)
    site = site.rename(columns={"subject": "Patient", "sex": "Geschlecht"})
    site["Geschlecht"] = site["Geschlecht"].map({"M": "maennlich", "F": "weiblich"})
    path = tmp_path / "site.xlsx"
    site.to_excel(path, index=False)
    mapping = tmp_path / "mapping.yml"
    mapping.write_text("columns: {Patient: subject, Geschlecht: sex}\n"
                       "values: {sex: {maennlich: M, weiblich: F}}\n")
    out = tmp_path / "scores.csv"
    rc, _ = _run(capsys, "scores", "--clinical", path, "--out", out, "--mapping", mapping)
    assert rc == 0
    got = pd.read_csv(out)
    assert got["subject"].tolist() == ["P1", "P2"]
    assert sorted(got["sex"]) == ["F", "M"]
    bad = tmp_path / "bad.yml"
    bad.write_text("columns: {Patient: patient_id}\n")
    rc, err = _run(capsys, "scores", "--clinical", path, "--out", out, "--mapping", bad)
    assert rc == 2
    assert "mapping.columns.Patient: unknown standard column 'patient_id'" in err


# ------------------------------------------------------------------------------- esma stats
def test_stats_writes_all_tables(study, capsys, tmp_path):
    _, asym_path, clinical_path = study
    scores_path = tmp_path / "scores.csv"
    assert _run(capsys, "scores", "--clinical", clinical_path, "--out", scores_path)[0] == 0
    out = tmp_path / "stats"
    rc, _ = _run(capsys, "stats", "--asymmetry", asym_path, "--scores", scores_path,
                 "--out", out)
    assert rc == 0
    corr = pd.read_csv(out / "correlations.csv", keep_default_na=False, na_values=[""])
    assert tuple(corr.columns) == CORRELATION_COLUMNS
    assert set(corr["group"]) == {"all", "male", "female"}
    assert set(corr["method"]) == {"spearman", "partial_spearman"}
    assert set(corr.loc[corr["method"] == "partial_spearman", "covariates"]) == {"age;bmi"}
    # same numbers as the library call on the same files (full precision through the CSV)
    from helpers.stats import load_asymmetry, load_scores

    ref = correlation_table(load_asymmetry(asym_path), load_scores(scores_path))
    np.testing.assert_allclose(corr["rho"], ref["rho"], rtol=0, atol=1e-15)
    np.testing.assert_allclose(corr["p_fdr"], ref["p_fdr"], rtol=0, atol=1e-15)
    assert (corr["n"] == ref["n"]).all()
    planted = corr[(corr["index"] == "cdi_abs") & (corr["muscle"] == "erector_spinae")
                   & (corr["score"] == "odi_pct") & (corr["method"] == "spearman")]
    assert planted.set_index("group").loc["male", "rho"] > 0.5

    unmatched = pd.read_csv(out / "unmatched.csv")
    assert set(unmatched["subject"]) == {"sub-0021", "sub-0100"}
    inter = pd.read_csv(out / "interactions.csv")
    assert tuple(inter.columns) == INTERACTION_COLUMNS
    t1 = pd.read_csv(out / "table1.csv", keep_default_na=False)
    first = t1.iloc[0]
    assert (first["variable"], first["all_n"]) == ("n", 20)  # matched subjects only


def test_stats_covariates_option_and_bad_covariate(study, capsys, tmp_path):
    _, asym_path, clinical_path = study
    scores_path = tmp_path / "scores.csv"
    _run(capsys, "scores", "--clinical", clinical_path, "--out", scores_path)
    out = tmp_path / "stats"
    rc, _ = _run(capsys, "stats", "--asymmetry", asym_path, "--scores", scores_path,
                 "--out", out, "--covariates", "age")
    assert rc == 0
    corr = pd.read_csv(out / "correlations.csv", keep_default_na=False)
    assert set(corr.loc[corr["method"] == "partial_spearman", "covariates"]) == {"age"}
    rc, err = _run(capsys, "stats", "--asymmetry", asym_path, "--scores", scores_path,
                   "--out", out, "--covariates", "age,smoking")
    assert rc == 2
    assert f"{asym_path}, {scores_path}: scores table lacks covariate column(s) ['smoking']" in err
    rc, err = _run(capsys, "stats", "--asymmetry", asym_path, "--scores", scores_path,
                   "--out", out, "--family", "everything")
    assert rc == 2
    assert "unknown FDR family 'everything'" in err


def test_stats_bad_tables(tmp_path, capsys):
    asym = tmp_path / "asym.csv"
    asym.write_text("subject,level,muscle,cdi\ns1,all,m,0.1\ns2,all,m,n/a\n")
    scores = tmp_path / "scores.csv"
    scores.write_text("subject,sex,age,bmi,odi_pct\ns1,M,50,20,10\ns2,F,60,25,20\n")
    rc, err = _run(capsys, "stats", "--asymmetry", asym, "--scores", scores, "--out", tmp_path)
    assert rc == 2
    assert f"{asym}: subject 's2', column 'cdi': 'n/a' is not a number" in err
    asym.write_text("subject,level,muscle,cdi\nx1,all,m,0.1\nx2,all,m,0.2\n")
    rc, err = _run(capsys, "stats", "--asymmetry", asym, "--scores", scores, "--out", tmp_path)
    assert rc == 2
    assert "no subject is in both the asymmetry table" in err
    assert not (tmp_path / "correlations.csv").exists()
