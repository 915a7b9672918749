"""Reading, mapping and validating clinical tables; the synthetic clinical generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from helpers.clinical import (
    JOA_ITEMS,
    LAYOUT,
    ODI_ITEMS,
    SRS_ITEMS,
    ClinicalMapping,
    PlantedRelation,
    apply_mapping,
    layout_table,
    load_clinical,
    load_mapping,
    simulate_asymmetry,
    simulate_clinical,
    validate_clinical,
    write_table,
)
from helpers.errors import ConfigError, InputFileError
from helpers.scores import score_clinical


def _row(subject: str, **cells) -> dict[str, str]:
    row = {"subject": subject, "sex": "F", "age": "58", "bmi": "24.1", "cobb_deg": "25",
           "convex_side": "left"}
    row.update({c: "1" for c in ODI_ITEMS})
    row.update({c: "4" for c in SRS_ITEMS})
    row.update({"vas_back": "40", "vas_leg": "12.5"})
    row.update(cells)
    return row


def _write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


# ---------------------------------------------------------------------------------- reading
def test_load_standard_csv_keeps_text_and_leading_zeros(tmp_path):
    path = _write_csv(tmp_path / "c.csv", [_row("0007"), _row("0012", odi_3="")])
    df = load_clinical(path)
    assert df["subject"].tolist() == ["0007", "0012"]
    assert df.loc[1, "odi_3"] == ""
    assert df.attrs["source"] == str(path)
    clean, problems = validate_clinical(df)
    assert problems.empty
    assert clean.loc[0, "vas_leg"] == 12.5
    assert np.isnan(clean.loc[1, "odi_3"])


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(InputFileError, match=r"nope\.csv: clinical file not found"):
        load_clinical(tmp_path / "nope.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("subject,sex,age,bmi\n")
    with pytest.raises(InputFileError, match=r"empty\.csv: clinical table has no data rows"):
        load_clinical(empty)
    blank = tmp_path / "blank.csv"
    blank.write_text("")
    with pytest.raises(InputFileError, match=r"blank\.csv: cannot read clinical table"):
        load_clinical(blank)


def test_not_a_workbook(tmp_path):
    fake = tmp_path / "fake.xlsx"
    fake.write_text("not a workbook")
    with pytest.raises(InputFileError, match=r"fake\.xlsx: cannot read clinical table"):
        load_clinical(fake)


def test_missing_required_column(tmp_path):
    rows = [{k: v for k, v in _row("s1").items() if k != "bmi"}]
    with pytest.raises(InputFileError, match=r"c\.csv: missing column\(s\) \['bmi'\]"):
        load_clinical(_write_csv(tmp_path / "c.csv", rows))


def test_instrument_given_in_part_is_an_error(tmp_path):
    rows = [{k: v for k, v in _row("s1").items() if k != "odi_10"}]
    with pytest.raises(InputFileError, match=r"has ODI item column\(s\).*but lacks \['odi_10'\]"):
        load_clinical(_write_csv(tmp_path / "c.csv", rows))


def test_instrument_absent_gives_missing_scores(tmp_path):
    rows = [{k: v for k, v in _row("s1").items() if not k.startswith("srs_")}]
    scores, _ = score_clinical(load_clinical(_write_csv(tmp_path / "c.csv", rows)))
    assert scores.loc[0, "odi_pct"] == 20.0
    assert scores[["srs_pain", "srs_subtotal", "srs_total"]].isna().all(axis=None)


# ------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("cells", "column", "problem"),
    [
        ({"odi_4": "7"}, "odi_4", "out of range (allowed: whole numbers 0 to 5)"),
        ({"odi_4": "-1"}, "odi_4", "out of range (allowed: whole numbers 0 to 5)"),
        ({"srs_2": "0"}, "srs_2", "out of range (allowed: whole numbers 1 to 5)"),
        ({"srs_3": "2.5"}, "srs_3", "not a whole number (allowed: whole numbers 1 to 5)"),
        ({"vas_back": "101"}, "vas_back", "out of range (allowed: numbers 0 to 100)"),
        ({"age": "abc"}, "age", "not a number (allowed: numbers 0 to 120)"),
        ({"bmi": "nan"}, "bmi", "not a number (allowed: numbers 10 to 80)"),
        ({"odi_1": "two"}, "odi_1", "not a number (allowed: whole numbers 0 to 5)"),
        ({"sex": "X"}, "sex", "not one of M / F"),
        ({"convex_side": "middle"}, "convex_side", "not one of left / right"),
        ({"cobb_deg": "200"}, "cobb_deg", "out of range (allowed: numbers 0 to 180)"),
        ({"joa_bladder": "-2"}, "joa_bladder", "not allowed (allowed: one of 0, -3, -6)"),
        ({"joa_gait": "4"}, "joa_gait", "out of range (allowed: whole numbers 0 to 3)"),
    ],
)
def test_each_invalid_value_is_reported_with_subject_and_column(cells, column, problem):
    joa = dict.fromkeys(JOA_ITEMS, "1") | {"joa_bladder": "0"}
    df = pd.DataFrame([_row("sub-01", **joa), _row("sub-02", **(joa | cells))])
    clean, problems = validate_clinical(df)
    assert clean["subject"].tolist() == ["sub-01"]
    assert problems.to_dict("records") == [
        {"row": 2, "subject": "sub-02", "column": column, "value": cells[column],
         "problem": problem}
    ]


def test_duplicated_and_blank_subjects():
    df = pd.DataFrame([_row("a"), _row("b"), _row("a"), _row("  ")])
    clean, problems = validate_clinical(df)
    assert clean["subject"].tolist() == ["b"]
    assert problems[["row", "subject", "problem"]].values.tolist() == [
        [1, "a", "duplicated subject (rows [1, 3])"],
        [3, "a", "duplicated subject (rows [1, 3])"],
        [4, "", "blank subject ID"],
    ]


def test_case_and_whitespace_of_codes_and_whole_number_floats():
    df = pd.DataFrame([_row("a", sex=" m ", convex_side="Right", odi_1="3.0")])
    clean, problems = validate_clinical(df)
    assert problems.empty
    assert (clean.loc[0, "sex"], clean.loc[0, "convex_side"], clean.loc[0, "odi_1"]) == (
        "M", "right", 3.0)


def test_error_message_lists_several_problems(tmp_path):
    path = _write_csv(tmp_path / "c.csv", [_row("s1", odi_1="9", age="x"), _row("s2")])
    with pytest.raises(InputFileError) as info:
        score_clinical(load_clinical(path))
    msg = str(info.value)
    assert msg.startswith(f"{path}: 2 invalid values:")
    assert "subject 's1', column 'age' (row 1): not a number" in msg
    assert "subject 's1', column 'odi_1' (row 1): out of range" in msg


# ---------------------------------------------------------------------------------- mapping
def _site_table() -> pd.DataFrame:
    """A site's layout: other names, codes, reversed SRS options, 'NA' for blanks."""
    rows = []
    for i, (sex, side) in enumerate([("male", "L"), ("female", "R"), ("w", "R")]):
        row = {"Patient": f"P{i + 1:03d}", "Geschlecht": sex, "Alter": 50 + i, "BMI": 22.5 + i,
               "Seite": side}
        row.update({f"ODI Q{k}": (k + i) % 6 for k in range(1, 11)})
        row.update({f"SRS{k}": "abcde"[(k + i) % 5] for k in range(1, 23)})
        row.update({"VAS Ruecken": 33.5, "VAS Bein": "NA"})
        rows.append(row)
    return pd.DataFrame(rows)


SITE_MAPPING = {
    "columns": {"Patient": "subject", "Geschlecht": "sex", "Alter": "age", "BMI": "bmi",
                "Seite": "convex_side", "VAS Ruecken": "vas_back", "VAS Bein": "vas_leg",
                **{f"ODI Q{k}": f"odi_{k}" for k in range(1, 11)},
                **{f"SRS{k}": f"srs_{k}" for k in range(1, 23)}},
    "values": {"sex": {"male": "M", "female": "F", "w": "F"},
               "convex_side": {"L": "left", "R": "right"},
               "srs_*": {"a": 5, "b": 4, "c": 3, "d": 2, "e": 1}},
    "missing_values": ["NA"],
}


def _expected_standard() -> pd.DataFrame:
    site = _site_table()
    out = pd.DataFrame({"subject": site["Patient"], "sex": ["M", "F", "F"],
                        "age": site["Alter"].astype(float), "bmi": site["BMI"],
                        "convex_side": ["left", "right", "right"]})
    for k in range(1, 11):
        out[f"odi_{k}"] = site[f"ODI Q{k}"].astype(float)
    for k in range(1, 23):
        out[f"srs_{k}"] = site[f"SRS{k}"].map(dict(zip("abcde", [5, 4, 3, 2, 1], strict=True)))
    out["vas_back"] = 33.5
    out["vas_leg"] = np.nan
    return out


def test_excel_with_site_mapping_gives_the_standard_layout(tmp_path):
    path = tmp_path / "site.xlsx"
    _site_table().to_excel(path, sheet_name="Baseline", index=False)
    df = load_clinical(path, {**SITE_MAPPING, "sheet": "Baseline"})
    clean, problems = validate_clinical(df)
    assert problems.empty
    expected = _expected_standard()
    for col in expected.columns:
        got = clean[col].tolist()
        want = expected[col].tolist()
        if col in ("subject", "sex", "convex_side"):
            assert got == want, col
        else:
            np.testing.assert_array_equal(np.asarray(got, float), np.asarray(want, float), col)


def test_semicolon_csv_with_decimal_comma(tmp_path):
    path = tmp_path / "site.csv"
    site = _site_table()
    site["BMI"] = ["22,5", "23,5", "24,5"]
    site.to_csv(path, sep=";", index=False)
    df = load_clinical(path, {**SITE_MAPPING, "decimal": ","})
    clean, problems = validate_clinical(df)
    assert problems.empty
    assert clean["bmi"].tolist() == [22.5, 23.5, 24.5]


def test_unmapped_site_codes_are_reported_not_guessed():
    mapping = {**SITE_MAPPING, "values": {**SITE_MAPPING["values"], "sex": {"male": "M"}}}
    clean, problems = validate_clinical(apply_mapping(_site_table(), mapping, source="site.xlsx"))
    assert clean["subject"].tolist() == ["P001"]
    assert problems[["subject", "column", "value"]].values.tolist() == [
        ["P002", "sex", "female"], ["P003", "sex", "w"]]


def test_mapping_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"clinical\.columns\.Q1: unknown standard column "
                                          r"'odi_01'"):
        ClinicalMapping.from_dict({"columns": {"Q1": "odi_01"}}, where="clinical")
    with pytest.raises(ConfigError, match=r"mapping\.columns: 'A' and 'B' both map onto 'age'"):
        ClinicalMapping.from_dict({"columns": {"A": "age", "B": "age"}})
    with pytest.raises(ConfigError, match=r"mapping\.values\.foo_\*: matches no standard column"):
        ClinicalMapping.from_dict({"values": {"foo_*": {"a": 1}}})
    with pytest.raises(ConfigError, match=r"mapping\.decimal: must be '\.' or ','"):
        ClinicalMapping.from_dict({"decimal": ";"})
    with pytest.raises(ConfigError, match=r"mapping\.values\.sex: expected a mapping"):
        ClinicalMapping.from_dict({"values": {"sex": "M"}})


def test_mapping_naming_a_column_the_file_lacks(tmp_path):
    path = _write_csv(tmp_path / "c.csv", [_row("s1")])
    with pytest.raises(InputFileError, match=r"c\.csv: the mapping names column\(s\) \['Alter'\] "
                                             r"that the file lacks"):
        load_clinical(path, {"columns": {"Alter": "age"}})


def test_mapping_target_clashing_with_an_existing_column(tmp_path):
    rows = [_row("s1") | {"Years": "60"}]
    with pytest.raises(InputFileError, match=r"column\(s\) \['age'\] exist in the file and are "
                                             r"also mapping targets"):
        load_clinical(_write_csv(tmp_path / "c.csv", rows), {"columns": {"Years": "age"}})


def test_load_mapping_from_study_yaml(tmp_path):
    yml = tmp_path / "study.yml"
    yml.write_text("clinical:\n  path: x.csv\n  columns: {Alter: age}\n"
                   "  values: {sex: {male: M}}\n  missing_values: NA\n")
    mapping = load_mapping(yml)
    assert mapping.columns == {"Alter": "age"}
    assert mapping.values == {"sex": {"male": "M"}}
    assert mapping.missing_values == ("NA",)
    bad = tmp_path / "bad.yml"
    bad.write_text("columns: {Alter: agee}\n")
    with pytest.raises(ConfigError, match=r"bad\.yml: mapping\.columns\.Alter: unknown standard"):
        load_mapping(bad)


def test_layout_table_documents_every_column():
    table = layout_table()
    assert table["column"].tolist() == list(LAYOUT)
    assert table.set_index("column").loc["odi_1", "accepted"] == "whole numbers 0 to 5"


# ---------------------------------------------------------------------------------- writing
def test_write_table_round_trip_with_blanks(tmp_path):
    df = pd.DataFrame({"subject": ["a", "b"], "x": [1 / 3, np.nan]})
    path = write_table(df, tmp_path / "sub" / "t.csv")
    assert path.read_text().splitlines() == ["subject,x", "a,0.3333333333333333", "b,"]
    assert not list(path.parent.glob(".*tmp*"))


# ------------------------------------------------------------------------------- simulation
def test_simulated_clinical_is_valid_deterministic_and_balanced(tmp_path):
    asym = simulate_asymmetry(30, seed=5, levels=("all", "L4"))
    a = simulate_clinical(asym, seed=5, joa=True)
    b = simulate_clinical(asym, seed=5, joa=True)
    pd.testing.assert_frame_equal(a, b)
    assert a["subject"].tolist() == [f"sub-{i:04d}" for i in range(1, 31)]
    assert (a["sex"] == "M").sum() == 15
    # Through a CSV file as a site would send it: valid, every score present for most subjects.
    path = write_table(a, tmp_path / "clinical.csv")
    scores, skipped = score_clinical(load_clinical(path))
    assert skipped.empty
    assert len(scores) == 30
    assert scores["odi_pct"].notna().sum() >= 27
    assert scores["joa_total"].notna().sum() >= 15
    assert scores["joa_recovery_pct"].notna().sum() >= 15
    # answers are missing at about the asked rate (2 % of 34 answers x 30 subjects ~ 20)
    answers = a[[*ODI_ITEMS, *SRS_ITEMS, "vas_back", "vas_leg"]]
    assert 5 <= int(answers.isna().sum().sum()) <= 45


def test_planted_relation_has_the_asked_spearman_rho_in_each_sex():
    asym = simulate_asymmetry(3000, seed=11)
    rel = PlantedRelation(rho_male=0.5, rho_female=-0.3)
    clin = simulate_clinical(asym, seed=11, relation=rel, p_missing=0.0)
    scores, _ = score_clinical(clin)
    x = asym[asym["muscle"] == "erector_spinae"].set_index("subject")["cdi_abs"]
    s = scores.set_index("subject")
    for sex, target in (("M", 0.5), ("F", -0.3)):
        sub = s[s["sex"] == sex]
        rho = sps.spearmanr(sub["odi_pct"], x.reindex(sub.index)).statistic
        assert abs(rho - target) < 0.05, (sex, rho)
    # the other scores do not follow the index
    men = s[s["sex"] == "M"]
    for score in ("srs_pain", "vas_back"):
        rho = sps.spearmanr(men[score], x.reindex(men.index), nan_policy="omit").statistic
        assert abs(rho) < 0.08, (score, rho)


def test_planted_relation_on_vas_back():
    asym = simulate_asymmetry(2000, seed=2)
    rel = PlantedRelation(index="lfiar_log", muscle="multifidus", score="vas_back",
                          rho_male=0.6, rho_female=0.6)
    clin = simulate_clinical(asym, seed=2, relation=rel, p_missing=0.0)
    x = asym[asym["muscle"] == "multifidus"].set_index("subject")["lfiar_log"]
    rho = sps.spearmanr(clin["vas_back"], x.reindex(clin["subject"]).to_numpy()).statistic
    assert abs(rho - 0.6) < 0.05


def test_simulate_clinical_argument_errors():
    asym = simulate_asymmetry(4, seed=0)
    with pytest.raises(ValueError, match="needs an asymmetry table"):
        simulate_clinical(["a", "b"], seed=0)
    assert len(simulate_clinical(["a", "b"], seed=0, relation=None)) == 2
    with pytest.raises(ValueError, match="no rows for muscle 'psoas', level 'all'"):
        simulate_clinical(asym, seed=0, relation=PlantedRelation(muscle="psoas"))
    with pytest.raises(ValueError, match="lacks column 'cdi_cc'"):
        simulate_clinical(asym, seed=0, relation=PlantedRelation(index="cdi_cc"))
    with pytest.raises(ValueError, match="rho_male must lie in"):
        PlantedRelation(rho_male=1.5)
    with pytest.raises(ValueError, match="score must be"):
        PlantedRelation(score="srs_total")


def test_validate_a_table_without_required_columns():
    df = pd.DataFrame([{"subject": "s1", "age": "50", "bmi": "20"}])
    df.attrs["source"] = "direct.csv"
    with pytest.raises(InputFileError, match=r"direct\.csv: missing column\(s\) \['sex'\]"):
        validate_clinical(df)


def test_misspelt_mapping_key_is_warned_about(caplog):
    mapping = ClinicalMapping.from_dict({"colums": {"Alter": "age"}, "path": "x.csv"},
                                        where="clinical")
    assert mapping.columns == {}
    assert "clinical: keys ['colums'] are not mapping keys" in caplog.text
