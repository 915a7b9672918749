"""Statistics against independent computations (scipy, numpy, statsmodels) and planted truth."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pingouin as pg
import pytest
import statsmodels.formula.api as smf
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from helpers.clinical import PlantedRelation, simulate_asymmetry, simulate_clinical
from helpers.errors import InputFileError
from helpers.scores import score_clinical
from helpers.stats import (
    CORRELATION_COLUMNS,
    INTERACTION_COLUMNS,
    StatsInputError,
    analyse,
    bland_altman,
    correlation_table,
    fisher_exact_2col,
    icc_2_1,
    index_columns,
    interaction_table,
    load_asymmetry,
    load_scores,
    match_subjects,
    partial_spearman,
    spearman,
    spearman_ci,
    table1,
)


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cohort() -> tuple[pd.DataFrame, pd.DataFrame]:
    """60 subjects, two muscles x two levels, with holes: missing index values, missing
    covariates, a subject without sex, a subject only in each table."""
    asym = simulate_asymmetry(61, seed=7, muscles=("erector_spinae", "multifidus"),
                              levels=("all", "L4"))
    asym["cdi_cc"] = -asym["cdi"] * 1.5  # a convex-vs-concave column, picked up by default
    clin = simulate_clinical(asym, seed=7, relation=PlantedRelation(rho_male=0.6))
    scores, _ = score_clinical(clin)
    rng = np.random.default_rng(0)
    asym.loc[rng.choice(len(asym), 25, replace=False), "cdi_abs"] = np.nan
    scores.loc[rng.choice(len(scores), 5, replace=False), "age"] = np.nan
    scores.loc[3, "sex"] = None
    asym = asym[asym["subject"] != "sub-0061"]  # scores only
    extra = asym[asym["subject"] == "sub-0001"].assign(subject="sub-9999")  # imaging only
    return pd.concat([asym, extra], ignore_index=True), scores


@pytest.fixture(scope="module")
def table(cohort) -> pd.DataFrame:
    asym, scores = cohort
    return correlation_table(asym, scores, scores_cols=("odi_pct", "srs_pain", "vas_back"))


def _pairs(asym, scores, index, muscle, level, score, group, extra=()):
    """Independent assembly: look the values up subject by subject."""
    sex = {"all": None, "male": "M", "female": "F"}[group]
    by_subject = scores.set_index("subject")
    rows = asym[(asym["muscle"] == muscle) & (asym["level"] == level)]
    out = []
    for subject, value in zip(rows["subject"], rows[index], strict=True):
        if subject not in by_subject.index:
            continue
        rec = by_subject.loc[subject]
        if sex is not None and rec["sex"] != sex:
            continue
        vals = [value, rec[score], *(rec[c] for c in extra)]
        if all(np.isfinite(float(v)) for v in vals):
            out.append([float(v) for v in vals])
    return np.array(out)


# ------------------------------------------------------------------------------ correlations
def test_correlation_table_columns_and_size(table, cohort):
    assert tuple(table.columns) == CORRELATION_COLUMNS
    # 5 indices (cdi, cdi_abs, lfiar, lfiar_log, cdi_cc) x 2 muscles x 2 levels x 3 scores
    # x 3 groups x 2 methods
    assert len(table) == 5 * 2 * 2 * 3 * 3 * 2
    assert set(table["index"]) == {"cdi", "cdi_abs", "lfiar", "lfiar_log", "cdi_cc"}
    assert set(table.loc[table["method"] == "partial_spearman", "covariates"]) == {"age;bmi"}
    assert set(table.loc[table["method"] == "spearman", "covariates"]) == {""}


def test_spearman_rows_equal_independent_scipy(table, cohort):
    asym, scores = cohort
    rows = table[table["method"] == "spearman"]
    assert len(rows) == 180
    for r in rows.itertuples():
        data = _pairs(asym, scores, r.index, r.muscle, r.level, r.score, r.group)
        assert r.n == len(data)
        ref = sps.spearmanr(data[:, 0], data[:, 1])
        assert abs(r.rho - ref.statistic) < 1e-9
        assert abs(r.p - ref.pvalue) < 1e-9


def test_pairwise_complete_n(table, cohort):
    asym, scores = cohort
    matched = scores[scores["subject"].isin(set(asym["subject"]))]
    assert len(matched) == 60  # sub-9999 has no scores, sub-0061 no imaging
    rows = table[(table["method"] == "spearman") & (table["group"] == "all")].set_index(
        ["index", "muscle", "level", "score"])
    for score in ("odi_pct", "srs_pain", "vas_back"):
        # cdi has no holes: n = subjects with that score
        assert rows.loc[("cdi", "multifidus", "L4", score), "n"] == matched[score].notna().sum()
    sub = asym[(asym["muscle"] == "multifidus") & (asym["level"] == "all")]
    has_x = set(sub.loc[sub["cdi_abs"].notna(), "subject"])
    has_y = set(matched.loc[matched["vas_back"].notna(), "subject"])
    assert rows.loc[("cdi_abs", "multifidus", "all", "vas_back"), "n"] == len(has_x & has_y)
    assert len(has_x & has_y) < 60


def test_partial_rows_equal_independent_residual_computation(table, cohort):
    asym, scores = cohort
    rows = table[table["method"] == "partial_spearman"]
    for r in rows.itertuples():
        data = _pairs(asym, scores, r.index, r.muscle, r.level, r.score, r.group,
                      extra=("age", "bmi"))
        n, k = len(data), 2
        assert r.n == n
        ranks = np.column_stack([sps.rankdata(data[:, j]) for j in range(4)])
        design = np.column_stack([np.ones(n), ranks[:, 2:]])
        res_x = ranks[:, 0] - design @ np.linalg.lstsq(design, ranks[:, 0], rcond=None)[0]
        res_y = ranks[:, 1] - design @ np.linalg.lstsq(design, ranks[:, 1], rcond=None)[0]
        rho = float(np.corrcoef(res_x, res_y)[0, 1])
        dof = n - 2 - k
        p = 2 * sps.t.sf(abs(rho) * math.sqrt(dof / (1 - rho**2)), dof)
        assert abs(r.rho - rho) < 1e-9
        assert abs(r.p - p) < 1e-9


def test_ci_is_fisher_z_with_bonett_wright_se(table):
    for r in table.sample(20, random_state=1).itertuples():
        k = 2 if r.method == "partial_spearman" else 0
        se = math.sqrt((1 + r.rho**2 / 2) / (r.n - 3 - k))
        assert r.ci_low == pytest.approx(math.tanh(math.atanh(r.rho) - 1.959963984540054 * se),
                                         abs=1e-12)
        assert r.ci_high == pytest.approx(math.tanh(math.atanh(r.rho) + 1.959963984540054 * se),
                                          abs=1e-12)
        assert r.ci_low < r.rho < r.ci_high


def test_ci_covers_the_true_rho_about_95_percent():
    rng = np.random.default_rng(3)
    r_pearson = 0.6
    true_rho = 6 / math.pi * math.asin(r_pearson / 2)  # Spearman rho of a bivariate normal
    cov = [[1, r_pearson], [r_pearson, 1]]
    hits = 0
    for _ in range(400):
        xy = rng.multivariate_normal([0, 0], cov, size=30)
        res = spearman(xy[:, 0], xy[:, 1])
        hits += res["ci_low"] <= true_rho <= res["ci_high"]
    assert 0.92 <= hits / 400 <= 0.98


def test_fdr_equals_statsmodels_bh_within_each_family(table):
    assert set(table["family"]) == {f"{m}|{g}" for m in ("spearman", "partial_spearman")
                                    for g in ("all", "male", "female")}
    for _, fam in table.groupby("family"):
        assert len(fam) == 5 * 2 * 2 * 3
        ok = fam["p"].notna()
        expected = multipletests(fam.loc[ok, "p"], method="fdr_bh")[1]
        np.testing.assert_allclose(fam.loc[ok, "p_fdr"], expected, rtol=0, atol=1e-15)
        assert fam.loc[~ok, "p_fdr"].isna().all()


def test_other_family_presets(cohort):
    asym, scores = cohort
    t = correlation_table(asym, scores, indices=("cdi", "lfiar"), scores_cols=("odi_pct", "vas_back"),
                          family="group_score", methods=("spearman",))
    assert t["family"].nunique() == 3 * 2
    for _, fam in t.groupby(["group", "score"]):
        np.testing.assert_allclose(fam["p_fdr"], multipletests(fam["p"], method="fdr_bh")[1])
    t_all = correlation_table(asym, scores, indices=("cdi",), scores_cols=("odi_pct",),
                              family="all", methods=("spearman",))
    np.testing.assert_allclose(t_all["p_fdr"], multipletests(t_all["p"], method="fdr_bh")[1])
    with pytest.raises(StatsInputError, match="unknown FDR family 'sex'"):
        correlation_table(asym, scores, family="sex")
    with pytest.raises(StatsInputError, match=r"FDR family columns must be among"):
        correlation_table(asym, scores, family=("group", "subject"))


def test_too_few_subjects_or_constant_values_give_nan_rows_outside_fdr():
    asym = pd.DataFrame({"subject": list("abcdefg"), "level": "all", "muscle": "m",
                         "cdi": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]})
    scores = pd.DataFrame({"subject": list("abcdefg"), "sex": list("MMMFFFF"),
                           "age": [50, 60, 70, 55, 65, 75, 62], "bmi": [20, 25, 30, 22, 24, 28, 27],
                           "odi_pct": [10, 30, 20, 40, 60, 50, 70], "vas_back": [5.0] * 7})
    t = correlation_table(asym, scores)
    by = t.set_index(["method", "group", "score"])
    ref = sps.spearmanr(asym["cdi"], scores["odi_pct"])
    assert by.loc[("spearman", "all", "odi_pct"), "rho"] == pytest.approx(ref.statistic)
    assert by.loc[("spearman", "male", "odi_pct"), "n"] == 3
    assert np.isnan(by.loc[("spearman", "male", "odi_pct"), "rho"])  # n 3 < min_n 4
    assert np.isnan(by.loc[("spearman", "all", "vas_back"), "rho"])  # constant score
    assert by.loc[("partial_spearman", "all", "odi_pct"), "n"] == 7  # 7 >= 4 + 2 covariates
    assert np.isfinite(by.loc[("partial_spearman", "all", "odi_pct"), "rho"])
    assert np.isnan(by.loc[("partial_spearman", "female", "odi_pct"), "rho"])  # 4 < 4 + 2
    assert t.loc[t["rho"].isna(), "p_fdr"].isna().all()
    assert t.loc[t["rho"].notna(), "p_fdr"].notna().all()
    assert t["n"].dtype.kind == "i"


def test_partial_spearman_with_linearly_dependent_ranks():
    """Where pingouin's matrix inverse does not exist: identically ordered x and y give +-1
    (as plain Spearman), a covariate identical to x gives NaN, and collinear covariates give
    what the same test with one of them gives (pingouin, independent)."""
    x = np.arange(10.0)
    c1, c2 = np.r_[3, 1, 4, 1, 5, 9, 2, 6, 5, 3], np.r_[2, 7, 1, 8, 2, 8, 1, 8, 2, 8]
    cov = np.column_stack([c1, c2])
    res = partial_spearman(x, x**3, cov)
    assert res["n"] == 10
    assert (res["rho"], res["p"], res["ci_low"], res["ci_high"]) == (1.0, 0.0, 1.0, 1.0)
    assert partial_spearman(x, -x, cov)["rho"] == -1.0
    assert np.isnan(partial_spearman(x, c2, np.column_stack([x, c1]))["rho"])
    y = np.r_[1, 0, 3, 2, 5, 4, 9, 6, 8, 7] + 0.5 * c2
    one = pg.partial_corr(data=pd.DataFrame({"x": x, "y": y, "c": c1}), x="x", y="y",
                          covar=["c"], method="spearman")
    twice = partial_spearman(x, y, np.column_stack([c1, 2 * c1 + 1]))
    assert twice["rho"] == pytest.approx(float(one["r"].iloc[0]), abs=1e-12)
    assert twice["n"] == 10


def test_index_columns_defaults_and_errors():
    df = pd.DataFrame(columns=["subject", "level", "muscle", "cdi", "lfiar_log", "lfiar_cc_log",
                               "cdi_cc", "fat_pct"])
    assert index_columns(df) == ["cdi", "lfiar_log", "lfiar_cc_log", "cdi_cc"]
    with pytest.raises(StatsInputError, match=r"lacks index column\(s\) \['cdi_abs'\]"):
        index_columns(df, ["cdi_abs"])
    with pytest.raises(StatsInputError, match="none of the index columns"):
        index_columns(df[["subject", "level", "muscle", "fat_pct"]])


def test_missing_covariate_column_is_an_error(cohort):
    asym, scores = cohort
    with pytest.raises(StatsInputError, match=r"lacks covariate column\(s\) \['smoking'\]"):
        correlation_table(asym, scores, covariates=("age", "smoking"))


def test_the_one_statistics_entry_names_a_misspelled_covariate(cohort):
    """esma stats and a run's statistics stage both call analyse: a misspelled covariate is
    an error naming it (with the close match), never silently dropped."""
    asym, scores = cohort
    with pytest.raises(StatsInputError, match=r"\['bmii'\] \(did you mean 'bmi'\?\)"):
        analyse(asym, scores, covariates=("age", "bmii"))
    result = analyse(asym, scores, covariates=("age",), indices=["cdi"])
    expected = correlation_table(asym, scores, covariates=("age",), indices=["cdi"])
    pd.testing.assert_frame_equal(result.correlations, expected)
    assert set(result.analysed["subject"]) == set(asym["subject"]) & set(scores["subject"])


# ------------------------------------------------------------------------ unmatched subjects
def test_match_subjects_reports_every_subject_left_out(cohort):
    asym, scores = cohort
    merged, report = match_subjects(asym, scores)
    assert report.to_dict("records") == [
        {"subject": "sub-9999", "in_asymmetry": True, "in_scores": False,
         "note": "no clinical scores: left out of every analysis"},
        {"subject": "sub-0061", "in_asymmetry": False, "in_scores": True,
         "note": "no asymmetry rows: left out of every analysis"},
        {"subject": "sub-0004", "in_asymmetry": True, "in_scores": True,
         "note": "sex missing: counted in group 'all' only"},
    ]
    assert set(merged["subject"]) == {f"sub-{i:04d}" for i in range(1, 61)}
    assert len(merged) == 60 * 4


def test_match_subjects_without_any_common_subject():
    asym = pd.DataFrame({"subject": ["sub-1"], "level": ["all"], "muscle": ["m"], "cdi": [0.1]})
    scores = pd.DataFrame({"subject": ["1"], "sex": ["M"]})
    with pytest.raises(StatsInputError, match="no subject is in both"):
        match_subjects(asym, scores)


# ----------------------------------------------------------------------------- power test
def _power_run(seed: int) -> tuple[float, float]:
    """One synthetic cohort of 200: planted rho 0.5 in men, 0 in women.  A family of 8 tests
    per group (2 indices x 2 muscles x 2 scores); returns (men's, women's) p_fdr of the planted
    index x score."""
    asym = simulate_asymmetry(200, seed=seed, muscles=("erector_spinae", "multifidus"))
    clin = simulate_clinical(asym, seed=seed,
                             relation=PlantedRelation(rho_male=0.5, rho_female=0.0))
    scores, _ = score_clinical(clin)
    t = correlation_table(asym, scores, indices=("cdi_abs", "cdi"),
                          scores_cols=("odi_pct", "srs_pain"), groups=("male", "female"),
                          methods=("spearman",))
    hit = t[(t["index"] == "cdi_abs") & (t["muscle"] == "erector_spinae")
            & (t["score"] == "odi_pct")].set_index("group")
    return float(hit.loc["male", "p_fdr"]), float(hit.loc["female", "p_fdr"])


def test_power_planted_relation_found_in_men_not_in_women():
    """100 fixed seeds: men's planted rho 0.5 found (p_fdr < 0.05) in >= 95, women's in <= 10."""
    results = np.array([_power_run(seed) for seed in range(100)])
    men_found = int((results[:, 0] < 0.05).sum())
    women_found = int((results[:, 1] < 0.05).sum())
    assert men_found >= 95, men_found
    assert women_found <= 10, women_found


# ------------------------------------------------------------------------------ interaction
def test_interaction_equals_independent_formula_ols(cohort):
    asym, scores = cohort
    t = interaction_table(asym, scores, indices=("cdi_abs",), scores_cols=("odi_pct",))
    assert tuple(t.columns) == INTERACTION_COLUMNS
    r = t[(t["muscle"] == "erector_spinae") & (t["level"] == "all")].iloc[0]
    rows = asym[(asym["muscle"] == "erector_spinae") & (asym["level"] == "all")]
    d = rows[["subject", "cdi_abs"]].merge(scores, on="subject")
    d = d[d["sex"].isin(["M", "F"])].dropna(subset=["cdi_abs", "odi_pct", "age", "bmi"])

    def z(v):
        rk = sps.rankdata(v)
        return (rk - rk.mean()) / rk.std(ddof=1)

    frame = pd.DataFrame({"y": z(d["odi_pct"]), "x": z(d["cdi_abs"]), "age": z(d["age"]),
                          "bmi": z(d["bmi"]), "male": (d["sex"] == "M").astype(float)})
    fit = smf.ols("y ~ x * male + age + bmi", data=frame).fit()
    assert r["n"] == len(frame)
    assert r["n_male"] == int(frame["male"].sum())
    assert r["beta_interaction"] == pytest.approx(fit.params["x:male"], abs=1e-9)
    assert r["p"] == pytest.approx(fit.pvalues["x:male"], abs=1e-9)
    assert r["slope_female"] == pytest.approx(fit.params["x"], abs=1e-9)
    assert r["slope_male"] == pytest.approx(fit.params["x"] + fit.params["x:male"], abs=1e-9)
    assert r["ci_low"] < r["beta_interaction"] < r["ci_high"]
    np.testing.assert_allclose(t["p_fdr"], multipletests(t["p"], method="fdr_bh")[1])


def test_interaction_finds_a_planted_sex_difference_and_not_an_absent_one():
    asym = simulate_asymmetry(400, seed=21, muscles=("erector_spinae",))
    kw = {"indices": ("cdi_abs",), "scores_cols": ("odi_pct",)}
    differ = simulate_clinical(asym, seed=21, relation=PlantedRelation(rho_male=0.5,
                                                                       rho_female=0.0))
    same = simulate_clinical(asym, seed=21, relation=PlantedRelation(rho_male=0.4,
                                                                     rho_female=0.4))
    r1 = interaction_table(asym, score_clinical(differ)[0], **kw).iloc[0]
    r2 = interaction_table(asym, score_clinical(same)[0], **kw).iloc[0]
    assert r1["p"] < 0.001
    assert 0.3 < r1["beta_interaction"] < 0.7
    assert 0.3 < r1["slope_male"] < 0.7
    assert abs(r1["slope_female"]) < 0.15
    assert r2["p"] > 0.05
    assert abs(r2["slope_male"] - 0.4) < 0.15
    assert abs(r2["slope_female"] - 0.4) < 0.15


# ---------------------------------------------------------------------------------- Table 1
def test_table1_summaries_and_tests():
    rng = np.random.default_rng(4)
    n_m, n_f = 40, 35
    df = pd.DataFrame({
        "subject": [f"s{i}" for i in range(n_m + n_f + 1)],
        "sex": ["M"] * n_m + ["F"] * n_f + [None],
        "age": np.r_[rng.normal(60, 8, n_m), rng.normal(64, 8, n_f), 70.0],
        "vas_leg": np.r_[rng.exponential(10, n_m), rng.exponential(20, n_f), 5.0],
        "convex_side": ["left"] * 25 + ["right"] * 15 + ["left"] * 10 + ["right"] * 25 + [None],
        "odi_band": ["minimal"] * 38 + ["bed-bound"] * 2 + ["minimal"] * 30 + ["moderate"] * 5
        + ["minimal"],
    })
    df.loc[0, "age"] = np.nan
    t = table1(df).set_index(["variable", "level"])
    n = t.loc[("n", "")]
    assert (n["male_n"], n["female_n"], n["all_n"]) == (40, 35, 76)

    age = t.loc[("age", "")]
    m = df.loc[df["sex"] == "M", "age"].dropna().to_numpy()
    f = df.loc[df["sex"] == "F", "age"].to_numpy()
    assert age["summary"] == "mean_sd"
    assert age["male_n"] == 39
    assert age["male_mean"] == pytest.approx(m.mean(), abs=1e-12)
    assert age["male_sd"] == pytest.approx(m.std(ddof=1), abs=1e-12)
    assert age["normality_p_male"] == pytest.approx(sps.shapiro(m).pvalue)
    assert age["test"] == "welch_t"
    assert age["p"] == pytest.approx(sps.ttest_ind(m, f, equal_var=False).pvalue, abs=1e-12)
    assert age["male_text"] == f"{m.mean():.1f} ± {m.std(ddof=1):.1f}"
    assert age["all_n"] == 75

    leg = t.loc[("vas_leg", "")]
    m = df.loc[df["sex"] == "M", "vas_leg"].to_numpy()
    f = df.loc[df["sex"] == "F", "vas_leg"].to_numpy()
    assert leg["summary"] == "median_iqr"  # exponential: Shapiro-Wilk rejects
    assert leg["test"] == "mann_whitney_u"
    assert leg["p"] == pytest.approx(sps.mannwhitneyu(m, f).pvalue, abs=1e-12)
    assert leg["female_median"] == pytest.approx(np.median(f))
    assert leg["female_q1"] == pytest.approx(np.percentile(f, 25))
    assert leg["female_q3"] == pytest.approx(np.percentile(f, 75))

    side = t.loc["convex_side"]
    assert list(side.index) == ["left", "right"]
    assert side.loc["left", "male_count"] == 25
    assert side.loc["left", "male_pct"] == pytest.approx(62.5)
    assert side.loc["left", "test"] == "chi_square"
    chi = sps.chi2_contingency([[25, 10], [15, 25]], correction=False)
    assert side.loc["left", "p"] == pytest.approx(chi.pvalue, abs=1e-12)

    band = t.loc["odi_band"]
    assert list(band.index) == ["minimal", "moderate", "bed-bound"]  # severity order
    assert band.loc["minimal", "test"] == "fisher_exact"  # expected counts < 5
    assert band.loc["minimal", "p"] == pytest.approx(_fisher_by_hand([[38, 30], [0, 5], [2, 0]]),
                                                     abs=1e-12)
    assert band.loc["bed-bound", "male_text"] == "2 (5.0 %)"


def _fisher_by_hand(table):
    """Fisher-Freeman-Halton p of an r x 2 table by brute-force enumeration."""
    table = np.asarray(table)
    rows, first = table.sum(axis=1), int(table[:, 0].sum())

    def prob(a):
        return math.prod(math.comb(int(r), int(x)) for r, x in zip(rows, a, strict=True))

    observed = prob(table[:, 0])
    total = hit = 0
    for a in itertools.product(*(range(int(r) + 1) for r in rows)):
        if sum(a) == first:
            total += prob(a)
            hit += prob(a) if prob(a) <= observed * (1 + 1e-7) else 0
    return hit / total


@pytest.mark.parametrize(
    "table",
    [[[3, 0], [0, 3], [1, 1]], [[5, 2], [1, 4], [0, 3], [2, 2]], [[12, 3], [4, 9]],
     [[1, 0], [0, 1], [7, 7]]],
)
def test_fisher_exact_r_by_2_equals_enumeration(table):
    assert fisher_exact_2col(table) == pytest.approx(_fisher_by_hand(table), abs=1e-12)


def test_fisher_exact_2x2_equals_scipy_and_large_tables_are_reproducible():
    assert fisher_exact_2col([[12, 3], [4, 9]]) == sps.fisher_exact([[12, 3], [4, 9]]).pvalue
    big = [[100, 40], [60, 35], [20, 30], [3, 1], [1, 0]]  # too many tables: seeded Monte Carlo
    p1, p2 = fisher_exact_2col(big), fisher_exact_2col(big)
    assert p1 == p2
    assert 0.0005 < p1 < 0.002
    with pytest.raises(StatsInputError, match="r x 2 table"):
        fisher_exact_2col([[1, 2, 3], [4, 5, 6]])


# --------------------------------------------------------------------------------- agreement
SHROUT_FLEISS = [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9],
                 [6, 2, 4, 7]]


def test_icc_2_1_against_published_shrout_fleiss_values():
    # Shrout & Fleiss 1979 / R psych::ICC: ICC2 = 0.29, F = 11.03 (5, 15), p = 0.00013,
    # 95 % CI 0.019 to 0.76.
    r = icc_2_1(SHROUT_FLEISS)
    assert r["icc"] == pytest.approx(0.29, abs=0.005)
    assert r["f"] == pytest.approx(11.03, abs=0.005)
    assert (r["df1"], r["df2"]) == (5, 15)
    assert r["p"] == pytest.approx(0.00013, abs=0.000005)
    assert r["ci_low"] == pytest.approx(0.019, abs=0.0005)
    assert r["ci_high"] == pytest.approx(0.76, abs=0.005)
    assert r["rating"] == "poor"


def test_icc_2_1_hand_computed_from_mean_squares():
    x = np.array(SHROUT_FLEISS, dtype=float)
    n, k = x.shape
    grand = x.mean()
    msr = k * ((x.mean(axis=1) - grand) ** 2).sum() / (n - 1)
    msc = n * ((x.mean(axis=0) - grand) ** 2).sum() / (k - 1)
    sse = ((x - x.mean(axis=1, keepdims=True) - x.mean(axis=0) + grand) ** 2).sum()
    mse = sse / ((n - 1) * (k - 1))
    icc = (msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n)
    assert icc_2_1(x)["icc"] == pytest.approx(icc, abs=1e-12)


def test_icc_2_1_two_raters_missing_targets_and_pingouin():
    rng = np.random.default_rng(8)
    truth = rng.normal(100, 15, 30)
    auto = truth + rng.normal(2, 3, 30)
    manual = truth + rng.normal(0, 3, 30)
    auto[4] = np.nan
    r = icc_2_1(auto, manual)
    assert r["n"] == 29
    assert r["k"] == 2
    ok = np.isfinite(auto)
    long = pd.DataFrame({"t": np.tile(np.arange(29), 2), "r": np.repeat([0, 1], 29),
                         "s": np.r_[auto[ok], manual[ok]]})
    ref = pg.intraclass_corr(long, targets="t", raters="r", ratings="s").set_index("Type")
    assert r["icc"] == pytest.approx(ref.loc["ICC(A,1)", "ICC"], abs=1e-12)
    assert r["ci_low"] == pytest.approx(ref.loc["ICC(A,1)", "CI95"][0], abs=0.005)
    assert r["rating"] == "excellent"
    with pytest.raises(StatsInputError, match="at least 3 targets"):
        icc_2_1([1, 2], [1, 2])
    with pytest.raises(StatsInputError, match="k >= 2 raters"):
        icc_2_1([1, 2, 3])


def test_bland_altman_hand_computed():
    r = bland_altman([10, 12, 14, 16, np.nan], [9, 12, 13, 17, 3])
    # differences 1, 0, 1, -1: mean 0.25, SD sqrt(2.75 / 3)
    sd = math.sqrt(2.75 / 3)
    assert r["n"] == 4
    assert r["bias"] == 0.25
    assert r["sd_diff"] == pytest.approx(sd, abs=1e-12)
    assert r["loa_low"] == pytest.approx(0.25 - 1.959963984540054 * sd, abs=1e-12)
    assert r["loa_high"] == pytest.approx(0.25 + 1.959963984540054 * sd, abs=1e-12)
    t3 = 3.182446305284263  # t(0.975, 3 df)
    assert r["bias_ci_low"] == pytest.approx(0.25 - t3 * sd / 2, abs=1e-9)
    se_loa = sd * math.sqrt(1 / 4 + 1.959963984540054**2 / 6)
    assert r["loa_high_ci_high"] == pytest.approx(r["loa_high"] + t3 * se_loa, abs=1e-9)
    with pytest.raises(StatsInputError, match="one shape"):
        bland_altman([1, 2], [1, 2, 3])


# ---------------------------------------------------------------------------------- loading
def test_load_asymmetry_and_scores_errors(tmp_path):
    good = tmp_path / "a.csv"
    good.write_text("subject,level,muscle,cdi,cdi_abs,lfiar,lfiar_log\n"
                    "0001,all,multifidus,0.1,0.1,1.2,0.18\n0001,L4,multifidus,,,,\n")
    a = load_asymmetry(good)
    assert a["subject"].tolist() == ["0001", "0001"]
    assert np.isnan(a.loc[1, "cdi"])
    dup = tmp_path / "dup.csv"
    dup.write_text("subject,level,muscle,cdi\ns1,all,m,0.1\ns1,all,m,0.2\n")
    with pytest.raises(InputFileError, match=r"dup\.csv: subject 's1', level 'all', muscle 'm': "
                                             r"duplicated row"):
        load_asymmetry(dup)
    bad = tmp_path / "bad.csv"
    bad.write_text("subject,level,muscle,cdi\ns1,all,m,0.1\ns2,all,m,high\n")
    with pytest.raises(InputFileError, match=r"bad\.csv: subject 's2', column 'cdi': 'high' is "
                                             r"not a number"):
        load_asymmetry(bad)
    nokey = tmp_path / "nokey.csv"
    nokey.write_text("subject,muscle,cdi\ns1,m,0.1\n")
    with pytest.raises(InputFileError, match=r"nokey\.csv: missing column\(s\) \['level'\]"):
        load_asymmetry(nokey)
    s = tmp_path / "s.csv"
    s.write_text("subject,sex,age,odi_pct,odi_band\ns1,M,60,40,moderate\ns2,,,,\n")
    scores = load_scores(s)
    assert scores["sex"].tolist()[0] == "M"
    assert pd.isna(scores["sex"].tolist()[1])
    assert scores["odi_pct"].tolist()[0] == 40.0
    s.write_text("subject,sex,odi_pct\ns1,M,40\ns1,F,30\n")
    with pytest.raises(InputFileError, match=r"subject 's1', column 'subject': duplicated"):
        load_scores(s)
    s.write_text("subject,sex,odi_pct\ns1,X,40\n")
    with pytest.raises(InputFileError, match=r"subject 's1', column 'sex': 'X' is not M or F"):
        load_scores(s)
    s.write_text("subject,sex,odi_pct\ns1,M,forty\n")
    with pytest.raises(InputFileError, match=r"subject 's1', column 'odi_pct': 'forty' is not"):
        load_scores(s)
    with pytest.raises(InputFileError, match=r"missing\.csv: scores table not found"):
        load_scores(tmp_path / "missing.csv")


def test_spearman_ci_edges():
    assert spearman_ci(1.0, 10) == (1.0, 1.0)
    assert all(math.isnan(v) for v in spearman_ci(0.3, 3))
    assert all(math.isnan(v) for v in spearman_ci(0.3, 6, n_covariates=3))


def test_extra_columns_of_a_scores_file_and_non_numeric_covariates(tmp_path):
    s = tmp_path / "s.csv"
    s.write_text("subject,sex,age,bmi,odi_pct,height_cm,smoker\n"
                 "a,M,50,20,10,170,yes\nb,M,60,25,30,,no\nc,F,70,30,20,165,\n"
                 "d,F,55,22,40,180,yes\ne,M,65,27,60,175,no\n")
    scores = load_scores(s)
    assert scores["height_cm"].dtype.kind == "f"
    assert scores["smoker"].tolist()[:2] == ["yes", "no"]
    asym = pd.DataFrame({"subject": list("abcde"), "level": "all", "muscle": "m",
                         "cdi": [0.1, 0.3, 0.2, 0.5, 0.4]})
    t = correlation_table(asym, scores, covariates=("height_cm",), groups=("all",))
    assert t.loc[t["method"] == "partial_spearman", "n"].tolist() == [4]
    with pytest.raises(StatsInputError, match="covariate 'smoker' is not numeric"):
        correlation_table(asym, scores, covariates=("smoker",))


def test_fdr_table_marks_sorts_and_flags_psoas_fat() -> None:
    """The report's FDR table: ``*`` exactly where p_fdr < alpha, sorted by p_fdr then p (NaN
    last), psoas rows flagged, the correlation columns kept with sig/group/method first."""
    from helpers.report import fdr_table

    corr = pd.DataFrame({
        "group": ["all", "male", "female", "all"],
        "index": ["cdi", "lfiar", "cdi", "lfiar"],
        "muscle": ["multifidus", "psoas", "erector_spinae", "multifidus"],
        "level": ["L4", "L4", "L5", "L3"],
        "score": ["odi"] * 4,
        "n": [40, 20, 20, 40],
        "rho": [0.5, -0.4, 0.1, np.nan],
        "ci_low": [0.2, -0.7, -0.3, np.nan],
        "ci_high": [0.7, 0.0, 0.5, np.nan],
        "p": [0.001, 0.04, 0.6, np.nan],
        "p_fdr": [0.004, 0.05, 0.8, np.nan],
        "method": ["spearman"] * 4,
        "covariates": [""] * 4,
        "family": ["f"] * 4,
    })
    corr = corr.iloc[[3, 2, 0, 1]]  # unsorted input
    out = fdr_table(corr, alpha=0.05)
    assert list(out.columns[:3]) == ["sig", "group", "method"]
    assert set(out.columns) == set(CORRELATION_COLUMNS) | {"sig", "caveat"}
    assert out["p_fdr"].tolist()[:3] == [0.004, 0.05, 0.8]
    assert np.isnan(out["p_fdr"].iloc[3])
    assert out["sig"].tolist() == ["*", "", "", ""]  # 0.05 is not below alpha
    assert out["caveat"].tolist() == ["", "psoas T2 fat unreliable", "", ""]
    only = fdr_table(corr, alpha=0.06, only_significant=True)
    assert only["muscle"].tolist() == ["multifidus", "psoas"]
