"""Scores against hand-worked examples, including every missing-data rule and boundary."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from helpers.clinical import JOA_ITEMS, ODI_ITEMS, SRS_ITEMS, ClinicalDataError
from helpers.scores import (
    SCORE_COLUMNS,
    joa_recovery_pct,
    joa_total,
    odi_band,
    odi_percent,
    score_clinical,
    srs_scores,
)

nan = np.nan


# ------------------------------------------------------------------------------------ ODI
def test_odi_all_sections_answered():
    # 0+1+2+3+4+5+0+1+2+3 = 21 of 50 -> 42 %
    assert odi_percent([0, 1, 2, 3, 4, 5, 0, 1, 2, 3])[0] == 42.0


def test_odi_exactly_one_section_missing_uses_nine_sections():
    # 5+4+3+2+1+0+1+2+3 = 21 of 45 -> 46.666... % (not 42 %: the blank is not a 0)
    got = odi_percent([5, 4, 3, 2, 1, 0, 1, 2, 3, nan])[0]
    assert got == 21 / 45 * 100
    assert odi_percent([nan, 2, 2, 2, 2, 2, 2, 2, 2, 2])[0] == 40.0


def test_odi_two_or_more_sections_missing_is_missing():
    assert np.isnan(odi_percent([5, 4, 3, 2, 1, 0, 1, 2, nan, nan])[0])
    assert np.isnan(odi_percent([nan] * 10)[0])


def test_odi_extremes_and_many_rows():
    got = odi_percent([[0] * 10, [5] * 10, [5] * 9 + [nan]])
    np.testing.assert_array_equal(got, [0.0, 100.0, 100.0])


def test_odi_rejects_wrong_item_count():
    with pytest.raises(ValueError, match="shape"):
        odi_percent([1, 2, 3])


@pytest.mark.parametrize(
    ("pct", "band"),
    [
        (0.0, "minimal"),
        (20.0, "minimal"),  # upper limit inclusive
        (20.000001, "moderate"),  # a non-integer above 20 belongs to the next band
        (22.22222222222222, "moderate"),  # 10 of 45 with one section missing
        (40.0, "moderate"),
        (40.5, "severe"),
        (60.0, "severe"),
        (61.0, "crippled"),
        (80.0, "crippled"),
        (80.01, "bed-bound"),
        (100.0, "bed-bound"),
    ],
)
def test_odi_band_boundaries(pct, band):
    assert odi_band([pct])[0] == band


def test_odi_band_missing_and_out_of_range():
    assert odi_band([nan])[0] is None
    with pytest.raises(ValueError, match="0-100"):
        odi_band([100.5])


# -------------------------------------------------------------------------------- SRS-22r
def _srs(values: dict[int, float]) -> np.ndarray:
    """22 items, all 3 unless given (1-based item number -> answer)."""
    arr = np.full(22, 3.0)
    for k, v in values.items():
        arr[k - 1] = v
    return arr


def test_srs_all_answered_hand_example():
    # function 5,9,12,15,18 = 5,4,4,3,4 -> 4.0; pain 1,2,8,11,17 = 1,2,2,3,2 -> 2.0
    items = _srs({5: 5, 9: 4, 12: 4, 15: 3, 18: 4, 1: 1, 2: 2, 8: 2, 11: 3, 17: 2, 21: 5, 22: 4})
    got = srs_scores(items).iloc[0]
    assert got["srs_function"] == 4.0
    assert got["srs_pain"] == 2.0
    assert got["srs_self_image"] == 3.0
    assert got["srs_mental_health"] == 3.0
    assert got["srs_satisfaction"] == 4.5
    # items 1-20 sum: function 20 + pain 10 + self-image 15 + mental 15 = 60 -> 60/20 = 3.0
    assert got["srs_subtotal"] == 3.0
    # plus 5 + 4 -> 69 / 22
    assert got["srs_total"] == 69 / 22


def test_srs_five_item_domain_with_three_answered_is_the_mean_of_three():
    items = _srs({5: 5, 9: 4, 12: 2, 15: nan, 18: nan})
    got = srs_scores(items).iloc[0]
    assert got["srs_function"] == 11 / 3
    # subtotal = mean of the 18 answered items 1-20 (not the mean of the domain means)
    assert got["srs_subtotal"] == (11 + 15 * 3) / 18
    assert got["srs_total"] == (11 + 17 * 3) / 20


def test_srs_domain_with_two_of_five_items_is_missing_and_so_are_subtotal_and_total():
    items = _srs({1: 2, 2: 2, 8: nan, 11: nan, 17: nan})
    got = srs_scores(items).iloc[0]
    assert np.isnan(got["srs_pain"])
    assert got["srs_function"] == 3.0
    assert np.isnan(got["srs_subtotal"])
    assert np.isnan(got["srs_total"])


def test_srs_satisfaction_with_one_item_answered():
    items = _srs({21: 5, 22: nan})
    got = srs_scores(items).iloc[0]
    assert got["srs_satisfaction"] == 5.0
    assert got["srs_total"] == (60 + 5) / 21


def test_srs_satisfaction_unanswered_makes_subtotal_and_total_missing():
    items = _srs({21: nan, 22: nan})
    got = srs_scores(items).iloc[0]
    assert np.isnan(got["srs_satisfaction"])
    assert np.isnan(got["srs_subtotal"])
    assert np.isnan(got["srs_total"])
    one = srs_scores(_srs({21: nan})).iloc[0]  # one satisfaction answer is enough
    assert one["srs_satisfaction"] == 3.0
    assert one["srs_subtotal"] == 3.0


# ------------------------------------------------------------------------------------ JOA
def test_joa_total_and_recovery_rate():
    # back pain 2, leg pain 1, gait 3, SLR 2, sensory 1, motor 2, ADL 2,1,2,0,1,2,2, bladder -3
    items = [2, 1, 3, 2, 1, 2, 2, 1, 2, 0, 1, 2, 2, -3]
    assert len(items) == len(JOA_ITEMS)
    assert joa_total(items)[0] == 18.0
    # (18 - 7) / (29 - 7) x 100 = 50 %
    assert joa_recovery_pct([18.0], [7.0])[0] == 50.0
    assert joa_recovery_pct([5.0], [7.0])[0] == -2 / 22 * 100


def test_joa_missing_item_or_no_room_to_recover():
    items = [2, 1, 3, 2, 1, 2, 2, 1, 2, 0, 1, 2, nan, 0]
    assert np.isnan(joa_total(items)[0])
    assert np.isnan(joa_recovery_pct([29.0], [29.0])[0])
    assert np.isnan(joa_recovery_pct([20.0], [nan])[0])


# ------------------------------------------------------------------------ score_clinical
def _row(subject: str, **cells) -> dict[str, str]:
    row = {"subject": subject, "sex": "M", "age": "60", "bmi": "25.5"}
    row.update({c: "2" for c in ODI_ITEMS})
    row.update({c: "3" for c in SRS_ITEMS})
    row.update({"vas_back": "35.5", "vas_leg": "0"})
    row.update(cells)
    return row


def test_score_clinical_hand_example_and_output_columns():
    df = pd.DataFrame(
        [
            _row("sub-01"),
            _row("sub-02", sex="F", odi_3="", odi_4="5", srs_21="", cobb_deg="32.5"),
            _row("sub-03", odi_1="", odi_2=""),
        ]
    )
    scores, skipped = score_clinical(df)
    assert skipped.empty
    assert tuple(scores.columns) == SCORE_COLUMNS
    s = scores.set_index("subject")
    assert s.loc["sub-01", "odi_pct"] == 40.0
    assert s.loc["sub-01", "odi_band"] == "moderate"
    # sub-02: 8 x 2 + 5 = 21 over 9 sections
    assert s.loc["sub-02", "odi_pct"] == 21 / 45 * 100
    assert s.loc["sub-02", "odi_band"] == "severe"
    assert s.loc["sub-02", "srs_satisfaction"] == 3.0
    assert s.loc["sub-02", "cobb_deg"] == 32.5
    assert np.isnan(s.loc["sub-03", "odi_pct"])
    assert pd.isna(s.loc["sub-03", "odi_band"])
    assert s.loc["sub-01", "vas_back"] == 35.5
    assert s.loc["sub-01", "sex"] == "M"
    assert s.loc["sub-02", "sex"] == "F"
    # instruments not given: missing, never 0
    assert scores["joa_total"].isna().all()
    assert scores["joa_recovery_pct"].isna().all()


def test_score_clinical_stops_on_invalid_value_naming_subject_and_column():
    df = pd.DataFrame([_row("sub-01"), _row("sub-02", odi_4="7")])
    df.attrs["source"] = "site.csv"
    with pytest.raises(ClinicalDataError, match=r"site\.csv: 1 invalid value: subject 'sub-02', "
                       r"column 'odi_4' \(row 2\): out of range \(allowed: whole numbers 0 to 5\)"):
        score_clinical(df)


def test_score_clinical_skip_invalid_scores_the_rest():
    df = pd.DataFrame([_row("sub-01"), _row("sub-02", odi_4="7"), _row("sub-03", age="abc")])
    scores, skipped = score_clinical(df, skip_invalid=True)
    assert scores["subject"].tolist() == ["sub-01"]
    assert skipped[["subject", "column"]].values.tolist() == [["sub-02", "odi_4"],
                                                              ["sub-03", "age"]]


def test_score_clinical_with_joa_items():
    joa = dict(zip(JOA_ITEMS, ["2", "1", "3", "2", "1", "2", "2", "1", "2", "0", "1", "2", "2",
                               "-3"], strict=True))
    df = pd.DataFrame([_row("sub-01", **joa, joa_pre_total="7")])
    scores, _ = score_clinical(df)
    assert scores.loc[0, "joa_total"] == 18.0
    assert scores.loc[0, "joa_recovery_pct"] == 50.0
