"""Figures and tables of the reports (helpers.report), checked against small known data.

Every figure is read back from its matplotlib objects (the points plotted, the median bars,
the numbers printed in heatmap cells), never only checked for being drawn.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import LineCollection, PathCollection

from helpers import report
from helpers.stages.s4_metrics import metrics_summary


def _points(ax) -> np.ndarray:
    """y of every scatter point of an axes."""
    found = [c.get_offsets()[:, 1] for c in ax.collections if isinstance(c, PathCollection)]
    return np.sort(np.concatenate(found)) if found else np.array([])


def _bars(ax) -> list[float]:
    """y of every horizontal median bar of an axes."""
    ys = []
    for c in ax.collections:
        if isinstance(c, LineCollection):
            ys += [float(seg[0][1]) for seg in c.get_segments()]
    return sorted(ys)


def _metrics() -> pd.DataFrame:
    rows = []
    for subject, (csa_l, csa_r) in {"s1": (100.0, 90.0), "s2": (120.0, 80.0), "s3": (110.0, 70.0)}.items():
        for side, csa in (("left", csa_l), ("right", csa_r)):
            rows.append({"subject": subject, "level": "all", "slice": np.nan,
                         "muscle": "multifidus", "side": side, "csa_mm2": csa,
                         "fat_pct": 10.0, "fcsa_mm2": csa * 0.9})
    rows.append({"subject": "s1", "level": "L4", "slice": np.nan, "muscle": "multifidus",
                 "side": "left", "csa_mm2": 999.0, "fat_pct": 10.0, "fcsa_mm2": 899.1})
    rows.append({"subject": "s1", "level": "all", "slice": 3.0, "muscle": "multifidus",
                 "side": "left", "csa_mm2": 555.0, "fat_pct": 10.0, "fcsa_mm2": 499.5})
    return pd.DataFrame(rows)


def test_metrics_figure_plots_each_subject_side_and_the_median_bars():
    fig = report.metrics_figure(_metrics(), level="all")
    csa_ax = fig.axes[0]
    # only the level-"all" aggregate rows: the L4 row and the per-slice row are not plotted
    assert _points(csa_ax).tolist() == [70.0, 80.0, 90.0, 100.0, 110.0, 120.0]
    assert _bars(csa_ax) == [80.0, 110.0]  # right median, left median
    assert _points(fig.axes[2]).tolist() == pytest.approx([63.0, 72.0, 81.0, 90.0, 99.0, 108.0])
    assert "level all" in fig.get_suptitle()


def test_metrics_figure_of_a_level_without_rows_says_so():
    fig = report.metrics_figure(_metrics(), level="L5")
    assert fig.get_suptitle() == "No measurements at level L5"


def test_asymmetry_figure_medians_per_muscle():
    asym = pd.DataFrame({
        "subject": ["a", "b", "c", "a", "b", "c"],
        "level": ["all"] * 6,
        "muscle": ["multifidus"] * 3 + ["psoas"] * 3,
        "cdi": [0.1, 0.2, 0.6, -0.3, -0.1, 0.0],
        "lfiar_log": [0.0, math.log(2), math.log(4), 0.0, 0.0, math.log(0.5)],
    })
    fig = report.asymmetry_figure(asym)
    cdi_ax, lfiar_ax = fig.axes[:2]
    assert _bars(cdi_ax) == pytest.approx([-0.1, 0.2])
    assert _bars(lfiar_ax) == pytest.approx([0.0, math.log(2)])
    assert len(_points(cdi_ax)) == 6


def _correlations() -> pd.DataFrame:
    base = {"level": "all", "method": "spearman", "ci_low": np.nan, "ci_high": np.nan,
            "covariates": "", "family": "group"}
    rows = [
        {"group": "all", "index": "cdi", "muscle": "multifidus", "score": "odi_pct", "n": 30,
         "rho": 0.5, "p": 0.001, "p_fdr": 0.004},
        {"group": "all", "index": "cdi", "muscle": "multifidus", "score": "vas_back", "n": 28,
         "rho": -0.2, "p": 0.3, "p_fdr": 0.4},
        {"group": "all", "index": "lfiar", "muscle": "psoas", "score": "odi_pct", "n": 30,
         "rho": 0.7, "p": 0.001, "p_fdr": 0.004},
        {"group": "male", "index": "cdi", "muscle": "multifidus", "score": "odi_pct", "n": 14,
         "rho": 0.65, "p": 0.01, "p_fdr": 0.06},
    ]
    return pd.DataFrame([{**base, **r} for r in rows])


def test_correlation_heatmap_prints_rho_and_marks_fdr_significant_cells():
    fig = report.correlation_heatmaps(_correlations(), groups=("all", "male", "female"))
    panels = [ax for ax in fig.axes if ax.get_title()]
    # no female rows: two panels, titled with the largest n of the group
    assert [ax.get_title() for ax in panels] == ["all subjects (n = 30)", "men (n = 14)"]
    texts = sorted(t.get_text() for t in panels[0].texts)
    assert texts == ["-0.20", "0.50*", "0.70*"]
    assert sorted(t.get_text() for t in panels[1].texts) == ["0.65"]  # p_fdr 0.06: not marked
    bold = {t.get_text() for t in panels[0].texts if t.get_fontweight() == "bold"}
    assert bold == {"0.50*", "0.70*"}


def test_strongest_pairs_smallest_p_then_largest_rho_once_per_pair():
    pairs = report.strongest_pairs(_correlations(), n=2)
    # two pairs with p = 0.001: the larger |rho| (psoas lfiar 0.7) first; the multifidus cdi
    # odi pair appears once (its best group, all), not again for men
    assert pairs[["muscle", "index", "score", "group"]].values.tolist() == [
        ["psoas", "lfiar", "odi_pct", "all"],
        ["multifidus", "cdi", "odi_pct", "all"],
    ]
    assert report.strongest_pairs(_correlations(), n=0).empty


def test_fdr_table_marks_sorts_and_flags_psoas():
    table = report.fdr_table(_correlations(), alpha=0.05)
    assert table["p_fdr"].tolist() == [0.004, 0.004, 0.06, 0.4]
    assert table["sig"].tolist() == ["*", "*", "", ""]
    psoas = table[table["muscle"] == "psoas"]
    assert psoas["caveat"].tolist() == ["psoas T2 fat unreliable"]
    assert table.columns[:3].tolist() == ["sig", "group", "method"]
    only = report.fdr_table(_correlations(), alpha=0.05, only_significant=True)
    assert len(only) == 2


def test_table1_display_formats_p_and_levels():
    t1 = pd.DataFrame({
        "variable": ["age", "odi_band", "odi_band"],
        "level": ["", "minimal", "severe"],
        "summary": ["mean (SD)", "n (%)", "n (%)"],
        "male_text": ["50.0 (5.0)", "3 (30.0)", "7 (70.0)"],
        "female_text": ["52.0 (4.0)", "6 (60.0)", "4 (40.0)"],
        "all_text": ["51.0 (4.5)", "9 (42.9)", "11 (57.1)"],
        "test": ["Welch t", "Fisher", None],
        "p": [0.0004, 0.0344, np.nan],
    })
    out = report.table1_display(t1)
    assert out["variable"].tolist() == ["age", "odi_band: minimal", "odi_band: severe"]
    assert out["p"].tolist() == ["<0.001", "0.034", ""]
    assert out["test"].tolist() == ["Welch t", "Fisher", ""]


def test_qc_tables_put_the_worst_first():
    summary = pd.DataFrame({"subject": ["a", "b", "c", "d"],
                            "status": ["pass", "fail", "flag", "fail"]})
    decisions = pd.DataFrame({"subject": ["b"], "decision": ["exclude"], "reviewer": ["qc"]})
    table = report.qc_status_table(summary, decisions)
    assert table["subject"].tolist() == ["b", "d", "c", "a"]
    assert table.set_index("subject").loc["b", "decided_by"] == "qc"
    rows = pd.DataFrame({"subject": ["a", "b", "c"], "level": ["all"] * 3,
                         "status": ["flag", "pass", "fail"]})
    assert report.qc_findings(rows)["subject"].tolist() == ["c", "a"]


def test_write_tables_round_trips_csv_and_workbook(tmp_path):
    tables = {"table1": pd.DataFrame({"variable": ["age"], "p": [0.5]}),
              "correlations": _correlations()}
    written = report.write_tables(tables, tmp_path, notes="### Notes\nline one")
    back = pd.read_csv(written["correlations"], keep_default_na=False, na_values=[""])
    back["covariates"] = back["covariates"].fillna("")
    pd.testing.assert_frame_equal(back, _correlations(), check_dtype=False)
    sheets = pd.read_excel(written["xlsx"], sheet_name=None)
    assert list(sheets)[1:] == ["table1", "correlations"]
    assert sheets["table1"]["p"].tolist() == [0.5]


def test_metrics_summary_median_and_quartiles():
    asym = pd.DataFrame({"subject": list("abcde"), "level": ["all"] * 5,
                         "muscle": ["multifidus"] * 5, "cdi": [0.0, 0.1, 0.2, 0.3, 0.4]})
    out = metrics_summary(asym).set_index("index")
    assert out.loc["cdi", "median"] == pytest.approx(0.2)
    assert out.loc["cdi", "q1"] == pytest.approx(0.1)
    assert out.loc["cdi", "q3"] == pytest.approx(0.3)
    assert out.loc["cdi", "count"] == 5
    assert metrics_summary(asym, level="L4").empty
