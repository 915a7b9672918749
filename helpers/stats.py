"""Statistics for the paper: Table 1, correlations with FDR, the sex interaction, and agreement.

The computations are scipy's, pingouin's and statsmodels'; this module assembles them: joins
of the asymmetry and scores tables, sex groups, test families, missing data and the subjects
that one table has and the other lacks.  Pingouin's column names are touched only here.

Choices (science reference §5; each is a parameter where it can be)
--------------------------------------------------------------------
Correlation
    Spearman's rho (:func:`scipy.stats.spearmanr`, p from the t distribution with n - 2 df),
    pairwise complete: each test uses the subjects that have both values, and reports that n.
    Groups ``all`` (every subject, including any whose sex is missing), ``male`` (sex ``M``) and
    ``female`` (sex ``F``).
Partial correlation
    Partial Spearman adjusted for covariates (default age and BMI):
    :func:`pingouin.partial_corr` with ``method="spearman"`` (ranks, then the partial Pearson
    correlation; p from the t distribution with n - 2 - k df, k covariates), over the subjects
    complete on index, score and every covariate.
95 % confidence interval of rho
    Fisher z with the Bonett & Wright (2000) standard error for Spearman's rho,
    SE = sqrt((1 + rho^2 / 2) / (n - 3 - k)) (k = number of covariates, 0 for plain Spearman):
    [tanh(atanh(rho) - 1.96 SE), tanh(atanh(rho) + 1.96 SE)].  (The plain Fisher SE
    1 / sqrt(n - 3) is meant for Pearson's r and is too narrow for Spearman's rho.)
Smallest n
    A test with fewer than ``min_n`` (default 4, the smallest n with a CI) complete subjects
    (plus one per covariate for the partial test), with a constant variable, or (partial test)
    with index or score entirely explained by the covariates, keeps its row with its n and NaN
    statistics, and stays out of the FDR family.  Index and score in identical (reversed) order
    give rho = 1 (-1) and p = 0, in the partial test too (computed from the residuals, where
    pingouin's matrix inverse does not exist).
FDR
    Benjamini-Hochberg (:func:`statsmodels.stats.multitest.multipletests`, ``fdr_bh``) within a
    declared family.  A family is always within one method (plain and partial correlations are
    separate analyses) and by default within one group: ``family="group"`` = every index x
    muscle x level x score test of one group.  Other presets: ``"group_score"``,
    ``"group_index"``, ``"group_muscle"``, ``"group_level"``, ``"all"`` (every group of a
    method together), or a sequence of the columns that define a family.  Note that ``lfiar``
    and ``lfiar_log`` are a monotone transform of each other and give identical Spearman tests;
    leave one out of ``indices`` if the duplicate should not count twice in a family.
Index x sex interaction
    Ordinary least squares (statsmodels) on z-scored ranks over the subjects of known sex complete
    on index, score and covariates: z(rank score) ~ 1 + z(rank index) + male
    + z(rank index) x male [+ z(rank covariate) ...].  The interaction coefficient is the
    difference between the men's and the women's rank slopes (comparable to a difference of
    Spearman correlations); ``slope_female`` and ``slope_male`` are the two slopes.  BH FDR over
    all interaction tests.
Table 1
    By sex: n per group; a continuous variable is summarised as mean +- SD (compared by Welch's
    t-test) when the Shapiro-Wilk test does not reject normality (p > 0.05) in either sex and
    each sex has at least 3 values, else as median [Q1, Q3] (linear-interpolation quartiles;
    compared by the two-sided Mann-Whitney U test); a categorical variable as n (% of those with
    a value), compared by Pearson's chi-square test without continuity correction, or Fisher's
    exact test when any expected count is below 5 (:func:`fisher_exact_2col`: exact for r x 2
    tables; ``statistic`` is then NaN).
Agreement
    ICC(2,1) (two-way random effects, absolute agreement, single rater; Shrout & Fleiss ICC2,
    McGraw & Wong ICC(A,1)) with its 95 % CI from :func:`pingouin.intraclass_corr`, unrounded;
    Koo & Li labels (< 0.5 poor, 0.5-0.75 moderate, 0.75-0.9 good, >= 0.9 excellent).
    Bland-Altman: bias = mean(a - b), limits bias +- 1.96 SD of the differences, with 95 % CIs
    (bias: t; limits: Bland & Altman 1999, SE = SD sqrt(1/n + 1.96^2 / (2 (n - 1)))).
    Dice per label = 2 |A n B| / (|A| + |B|); NaN when the label is absent from both.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pingouin as pg
import statsmodels.api as sm
from numpy.typing import ArrayLike
from scipy import stats as sps
from scipy.special import gammaln, logsumexp
from statsmodels.stats.multitest import multipletests

from helpers.errors import EsmaError, InputFileError
from helpers.scores import NUMERIC_SCORES, ODI_BANDS

__all__ = [
    "CORRELATION_COLUMNS",
    "DEFAULT_INDICES",
    "GROUPS",
    "INTERACTION_COLUMNS",
    "StatsInputError",
    "StatsResult",
    "analyse",
    "bland_altman",
    "correlation_table",
    "fdr_bh",
    "fisher_exact_2col",
    "icc_2_1",
    "index_columns",
    "interaction_table",
    "koo_li",
    "load_asymmetry",
    "load_scores",
    "match_subjects",
    "partial_spearman",
    "score_columns",
    "sex_interaction",
    "spearman",
    "spearman_ci",
    "table1",
]

log = logging.getLogger(__name__)

#: Asymmetry indices correlated by default (plus any convex-vs-concave ``*_cc`` columns).
DEFAULT_INDICES: tuple[str, ...] = ("cdi", "cdi_abs", "lfiar", "lfiar_log")
#: Group name -> sex code (None: everyone).
GROUPS: dict[str, str | None] = {"all": None, "male": "M", "female": "F"}
METHODS = ("spearman", "partial_spearman")
FAMILY_PRESETS: dict[str, tuple[str, ...]] = {
    "group": ("group",),
    "group_score": ("group", "score"),
    "group_index": ("group", "index"),
    "group_muscle": ("group", "muscle"),
    "group_level": ("group", "level"),
    "all": (),
}
FAMILY_KEYS = ("group", "index", "muscle", "level", "score")
#: Columns of :func:`correlation_table`.
CORRELATION_COLUMNS: tuple[str, ...] = (
    "group",
    "index",
    "muscle",
    "level",
    "score",
    "n",
    "rho",
    "ci_low",
    "ci_high",
    "p",
    "p_fdr",
    "method",
    "covariates",
    "family",
)
#: Columns of :func:`interaction_table`.
INTERACTION_COLUMNS: tuple[str, ...] = (
    "index",
    "muscle",
    "level",
    "score",
    "n",
    "n_male",
    "n_female",
    "slope_female",
    "slope_male",
    "beta_interaction",
    "se",
    "ci_low",
    "ci_high",
    "t",
    "p",
    "p_fdr",
    "model",
    "covariates",
)
MIN_N = 4
CI_LEVEL = 0.95
NORMALITY_ALPHA = 0.05
MIN_EXPECTED = 5.0
#: Largest number of candidate tables that Fisher's r x 2 test enumerates exactly.
FISHER_MAX_TABLES = 500_000
FISHER_RESAMPLES = 200_000
FISHER_SEED = 20240505
KOO_LI = ((0.5, "poor"), (0.75, "moderate"), (0.9, "good"), (math.inf, "excellent"))
INDEX_KEYS = ("subject", "level", "muscle")


class StatsInputError(EsmaError, ValueError):
    """Tables or options that the statistics cannot use; the message says which and why."""


# ------------------------------------------------------------------------------------ I/O
def load_asymmetry(path: str | Path) -> pd.DataFrame:
    """Read an ``asymmetry.csv`` (one subject or a cohort, concatenated).

    Returns
    -------
    pandas.DataFrame
        subject, level, muscle as text and every other column as read; the index columns (see
        :func:`index_columns`) as float.

    Raises
    ------
    InputFileError
        Missing or unreadable file, a missing key column, a duplicated (subject, level, muscle)
        row, or a non-number in an index column (the message names the subject and column).
    """
    path = Path(path)
    df = _read_csv(path, "asymmetry table")
    lacking = [c for c in INDEX_KEYS if c not in df.columns]
    if lacking:
        raise InputFileError(path, f"missing column(s) {lacking} (columns: {list(df.columns)})")
    dup = df.duplicated(list(INDEX_KEYS), keep=False)
    if dup.any():
        first = df[dup].iloc[0]
        problem = (
            f"subject {first['subject']!r}, level {first['level']!r}, muscle "
            f"{first['muscle']!r}: duplicated row ({int(dup.sum())} duplicated rows)"
        )
        raise InputFileError(path, problem)
    try:
        indices = index_columns(df)
    except StatsInputError as exc:
        raise InputFileError(path, str(exc)) from exc
    for col in indices:
        df[col] = _numeric_column(df, col, path)
    return df


def load_scores(path: str | Path) -> pd.DataFrame:
    """Read a scores CSV written by ``esma scores``.

    Returns
    -------
    pandas.DataFrame
        subject, sex (``M``/``F``/missing), convex_side and odi_band as text; age, bmi,
        cobb_deg and the scores as float; any other column as float when all its values are
        numbers, else as text.

    Raises
    ------
    InputFileError
        Missing or unreadable file, no subject column, a duplicated subject, a sex other than
        M/F, or a non-number in a numeric column (the message names the subject and column).
    """
    path = Path(path)
    df = _read_csv(path, "scores table")
    if "subject" not in df.columns:
        raise InputFileError(path, f"missing column 'subject' (columns: {list(df.columns)})")
    items = sorted(c for c in df.columns if re.fullmatch(r"(odi|srs)_\d+|joa_(?!total|recov)\w+", c))
    derived = set(NUMERIC_SCORES) - {c for c in NUMERIC_SCORES if c.startswith("vas_")}
    if not set(NUMERIC_SCORES) & set(df.columns) or (items and not derived & set(df.columns)):
        # issue 16: a raw clinical table (questionnaire items, VAS at most) is not scores
        hint = (
            f" It holds questionnaire items ({', '.join(items[:3])}, ...): score them first "
            "with esma scores" if items else ""
        )
        msg = (
            f"not a scores table: no score column (odi_pct, srs_total, joa_total, ...) is "
            f"present.{hint}"
        )
        raise InputFileError(path, msg)
    dup = df["subject"].duplicated(keep=False)
    if dup.any():
        subject = df.loc[dup, "subject"].iloc[0]
        raise InputFileError(path, f"subject {subject!r}, column 'subject': duplicated subject")
    if "sex" in df.columns:
        sex = df["sex"].str.strip().str.upper()
        bad = ~sex.isin(["M", "F", ""])
        if bad.any():
            subject = df.loc[bad, "subject"].iloc[0]
            value = df.loc[bad, "sex"].iloc[0]
            raise InputFileError(
                path, f"subject {subject!r}, column 'sex': {value!r} is not M or F"
            )
        df["sex"] = sex.where(sex != "").astype(object)
    text_columns = {"subject", "sex", "convex_side", "odi_band"}
    strict = {"age", "bmi", "cobb_deg", *NUMERIC_SCORES}
    for col in df.columns:
        if col in text_columns:
            df[col] = df[col].where(df[col] != "").astype(object)
        elif col in strict:
            df[col] = _numeric_column(df, col, path)
        else:  # a site's extra column: numeric when every value is a number, else text
            try:
                df[col] = _numeric_column(df, col, path)
            except InputFileError:
                df[col] = df[col].where(df[col] != "").astype(object)
    return df


def _read_csv(path: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise InputFileError(path, f"{what} not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise InputFileError(path, f"cannot read {what} ({exc})") from exc
    if df.empty:
        raise InputFileError(path, f"{what} has no data rows")
    df.columns = [str(c).strip() for c in df.columns]
    for col in df.columns:
        df[col] = df[col].astype(object).map(lambda v: str(v).strip())
    return df


def _numeric_column(df: pd.DataFrame, col: str, path: Path) -> pd.Series:
    text = df[col].astype(object).map(lambda v: "" if pd.isna(v) else str(v).strip())
    blank = text.isin(["", "nan", "NaN", "NA"])
    num = pd.to_numeric(text.where(~blank), errors="coerce").astype(float)
    bad = ~blank & ~np.isfinite(num)
    if bad.any():
        subject = df.loc[bad, "subject"].iloc[0] if "subject" in df.columns else "?"
        value = text[bad].iloc[0]
        raise InputFileError(path, f"subject {subject!r}, column {col!r}: {value!r} is not a number")
    return num


# --------------------------------------------------------------------------------- joining
def index_columns(asymmetry: pd.DataFrame, indices: Sequence[str] | None = None) -> list[str]:
    """The asymmetry index columns to analyse.

    Default: those of :data:`DEFAULT_INDICES` present, plus every convex-vs-concave column
    (name with a ``_cc`` part, e.g. ``cdi_cc``, ``lfiar_cc_log``).

    Raises
    ------
    StatsInputError
        An index asked for is not a column, or (default) no index column is present.
    """
    if indices is not None:
        lacking = [c for c in indices if c not in asymmetry.columns]
        if lacking:
            msg = f"asymmetry table lacks index column(s) {lacking}"
            raise StatsInputError(msg)
        return list(indices)
    found = [c for c in DEFAULT_INDICES if c in asymmetry.columns]
    found += [
        c
        for c in asymmetry.columns
        if c not in found and ("_cc_" in c or c.endswith("_cc")) and c not in INDEX_KEYS
    ]
    if not found:
        msg = f"asymmetry table has none of the index columns {list(DEFAULT_INDICES)}"
        raise StatsInputError(msg)
    return found


def score_columns(scores: pd.DataFrame, scores_cols: Sequence[str] | None = None) -> list[str]:
    """The score columns to analyse: default the numeric scores that hold at least one value.

    Raises
    ------
    StatsInputError
        A score asked for is not a column, or (default) no score has any value.
    """
    if scores_cols is not None:
        lacking = [c for c in scores_cols if c not in scores.columns]
        if lacking:
            msg = f"scores table lacks score column(s) {lacking}"
            raise StatsInputError(msg)
        return list(scores_cols)
    found = [c for c in NUMERIC_SCORES if c in scores.columns and scores[c].notna().any()]
    if not found:
        msg = f"scores table has no values in any of the score columns {list(NUMERIC_SCORES)}"
        raise StatsInputError(msg)
    skipped = [c for c in NUMERIC_SCORES if c in scores.columns and c not in found]
    if skipped:
        log.info("scores without any value, not analysed: %s", skipped)
    return found


def match_subjects(
    asymmetry: pd.DataFrame, scores: pd.DataFrame, *, log_report: bool = True
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Join asymmetry rows with their subject's scores and report every subject left out.

    Parameters
    ----------
    asymmetry : pandas.DataFrame
        subject, level, muscle, index columns (many rows per subject).
    scores : pandas.DataFrame
        One row per subject: subject, sex, covariates, scores.
    log_report : bool
        Log a warning naming the subjects of the report (the table functions, which call this
        for their join, pass False; call this yourself to get and show the report).

    Returns
    -------
    merged : pandas.DataFrame
        One row per asymmetry row whose subject has scores, with that subject's score columns.
    report : pandas.DataFrame
        subject, in_asymmetry, in_scores, note: every subject present in one table but not the
        other (left out of every analysis), and every matched subject whose sex is missing
        (counted in group ``all`` only).  Empty when everything matched.

    Raises
    ------
    StatsInputError
        A key column is missing, scores repeat a subject, or no subject is in both tables.
    """
    for name, df, keys in (
        ("asymmetry", asymmetry, INDEX_KEYS),
        ("scores", scores, ("subject",)),
    ):
        lacking = [c for c in keys if c not in df.columns]
        if lacking:
            msg = f"{name} table lacks column(s) {lacking}"
            raise StatsInputError(msg)
    asym = asymmetry.copy()
    sc = scores.copy()
    asym["subject"] = asym["subject"].astype(str).str.strip()
    sc["subject"] = sc["subject"].astype(str).str.strip()
    if sc["subject"].duplicated().any():
        subject = sc.loc[sc["subject"].duplicated(), "subject"].iloc[0]
        msg = f"scores table: subject {subject!r} appears more than once"
        raise StatsInputError(msg)
    a_subj = list(dict.fromkeys(asym["subject"]))
    s_subj = list(dict.fromkeys(sc["subject"]))
    a_set, s_set = set(a_subj), set(s_subj)
    rows = [
        {"subject": s, "in_asymmetry": True, "in_scores": False,
         "note": "no clinical scores: left out of every analysis"}
        for s in a_subj if s not in s_set
    ]
    rows += [
        {"subject": s, "in_asymmetry": False, "in_scores": True,
         "note": "no asymmetry rows: left out of every analysis"}
        for s in s_subj if s not in a_set
    ]
    common = a_set & s_set
    if not common:
        msg = (
            f"no subject is in both the asymmetry table ({len(a_set)} subjects, e.g. "
            f"{a_subj[:3]}) and the scores table ({len(s_set)} subjects, e.g. {s_subj[:3]}); "
            "check the subject IDs"
        )
        raise StatsInputError(msg)
    if "sex" in sc.columns:
        no_sex = sc["subject"][sc["sex"].isna() & sc["subject"].isin(common)]
        rows += [
            {"subject": s, "in_asymmetry": True, "in_scores": True,
             "note": "sex missing: counted in group 'all' only"}
            for s in no_sex
        ]
    report = pd.DataFrame(rows, columns=["subject", "in_asymmetry", "in_scores", "note"])
    clash = [c for c in asym.columns if c in sc.columns and c != "subject"]
    if clash:
        log.info("columns in both tables, taken from the scores table: %s", clash)
        asym = asym.drop(columns=clash)
    merged = asym.merge(sc, on="subject", how="inner", validate="many_to_one")
    if len(report) and log_report:
        log.warning(
            "%d subject(s) not matched or without sex (see the unmatched report): %s",
            len(report),
            report["subject"].tolist()[:10],
        )
    return merged, report


# ----------------------------------------------------------------------- correlation core
def spearman_ci(
    rho: float, n: int, n_covariates: int = 0, level: float = CI_LEVEL
) -> tuple[float, float]:
    """Confidence interval of a (partial) Spearman rho: Fisher z, Bonett-Wright SE.

    SE = sqrt((1 + rho^2 / 2) / (n - 3 - n_covariates)).

    Returns
    -------
    (low, high) : tuple of float
        NaN when rho is NaN or n - 3 - n_covariates < 1; (rho, rho) when |rho| = 1.

    Examples
    --------
    >>> low, high = spearman_ci(0.5, 28)
    >>> round(low, 4), round(high, 4)
    (0.1327, 0.7465)
    """
    dof = n - 3 - n_covariates
    if not np.isfinite(rho) or dof < 1:
        return math.nan, math.nan
    if abs(rho) >= 1.0:
        return float(rho), float(rho)
    se = math.sqrt((1.0 + rho * rho / 2.0) / dof)
    z = sps.norm.ppf(0.5 + level / 2.0)
    centre = math.atanh(rho)
    return math.tanh(centre - z * se), math.tanh(centre + z * se)


def _empty_result(n: int) -> dict[str, float]:
    return {"n": n, "rho": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p": math.nan}


def spearman(x: ArrayLike, y: ArrayLike, *, min_n: int = MIN_N) -> dict[str, float]:
    """Spearman's rho of the pairwise-complete values of x and y, with 95 % CI and p.

    Returns
    -------
    dict
        n (pairs used), rho, ci_low, ci_high, p (two-sided).  NaN statistics when n < min_n or
        either variable is constant.
    """
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(xa) & np.isfinite(ya)
    n = int(ok.sum())
    if n < max(min_n, 3) or np.ptp(xa[ok]) == 0 or np.ptp(ya[ok]) == 0:
        return _empty_result(n)
    res = sps.spearmanr(xa[ok], ya[ok])
    rho, p = float(res.statistic), float(res.pvalue)
    low, high = spearman_ci(rho, n)
    return {"n": n, "rho": rho, "ci_low": low, "ci_high": high, "p": p}


def _partial_from_residuals(ranks: np.ndarray, n: int, k: int) -> dict[str, float]:
    """Partial rho from its definition, for linearly dependent ranks (see :func:`partial_spearman`).

    The correlation of the residuals of rank(x) and rank(y) after least squares on an intercept
    and the covariates' ranks (minimum-norm solution: exact with collinear covariates too).  x
    and y in identical (reversed) order give +1 (-1), p = 0, as plain Spearman does.  Not
    estimable (NaN) when the covariates explain x or y entirely.
    """
    design = np.column_stack([np.ones(n), ranks[:, 2:]])
    fit = np.linalg.lstsq(design, ranks[:, :2], rcond=None)[0]
    res = ranks[:, :2] - design @ fit
    scale = np.sqrt((res**2).sum(axis=0))
    if (scale <= 1e-9 * np.sqrt((ranks[:, :2] ** 2).sum(axis=0))).any():
        return _empty_result(n)
    rho = float(np.clip(res[:, 0] @ res[:, 1] / (scale[0] * scale[1]), -1.0, 1.0))
    dof = n - 2 - k
    if abs(rho) > 1.0 - 1e-12:
        rho, p = math.copysign(1.0, rho), 0.0
    else:
        p = float(2.0 * sps.t.sf(abs(rho) * math.sqrt(dof / (1.0 - rho * rho)), dof))
    low, high = spearman_ci(rho, n, k)
    return {"n": n, "rho": rho, "ci_low": low, "ci_high": high, "p": p}


def partial_spearman(
    x: ArrayLike, y: ArrayLike, covariates: ArrayLike, *, min_n: int = MIN_N
) -> dict[str, float]:
    """Partial Spearman rho of x and y adjusted for covariates (pingouin), with 95 % CI and p.

    Parameters
    ----------
    x, y : array_like, shape (n,)
    covariates : array_like, shape (n, k)
        k >= 1 covariates.
    min_n : int
        Fewest complete subjects, plus one per covariate.

    Returns
    -------
    dict
        n (subjects complete on x, y and every covariate), rho, ci_low, ci_high, p.
    """
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ca = np.asarray(covariates, dtype=float)
    if ca.ndim == 1:
        ca = ca[:, None]
    k = ca.shape[1]
    ok = np.isfinite(xa) & np.isfinite(ya) & np.isfinite(ca).all(axis=1)
    n = int(ok.sum())
    if n < max(min_n, 3) + k:
        return _empty_result(n)
    data = pd.DataFrame(ca[ok], columns=[f"c{i}" for i in range(k)])
    data.insert(0, "y", ya[ok])
    data.insert(0, "x", xa[ok])
    if (data.nunique() < 2).any():
        return _empty_result(n)
    ranks = data.rank().to_numpy()
    if np.linalg.matrix_rank(np.cov(ranks, rowvar=False)) < ranks.shape[1]:
        # Linearly dependent ranks (x and y in identical order, or collinear covariates):
        # pingouin's pseudo-inverse of the correlation matrix would return an arbitrary value.
        return _partial_from_residuals(ranks, n, k)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = pg.partial_corr(
                data=data, x="x", y="y", covar=list(data.columns[2:]), method="spearman"
            )
    except ValueError:  # a covariate identical to x or y: undefined
        return _empty_result(n)
    rho, p = float(res["r"].iloc[0]), float(res["p_val"].iloc[0])
    if not np.isfinite(rho):
        return _empty_result(n)
    low, high = spearman_ci(rho, n, k)
    return {"n": n, "rho": rho, "ci_low": low, "ci_high": high, "p": p}


def fdr_bh(p: ArrayLike) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (statsmodels); NaN p-values stay NaN, uncounted."""
    arr = np.asarray(p, dtype=float)
    out = np.full(arr.shape, np.nan)
    ok = np.isfinite(arr)
    if ok.any():
        out[ok] = multipletests(arr[ok], method="fdr_bh")[1]
    return out


def _family_keys(family: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(family, str):
        if family not in FAMILY_PRESETS:
            msg = f"unknown FDR family {family!r} (presets: {sorted(FAMILY_PRESETS)})"
            raise StatsInputError(msg)
        return FAMILY_PRESETS[family]
    keys = tuple(family)
    bad = [k for k in keys if k not in FAMILY_KEYS]
    if bad:
        msg = f"FDR family columns must be among {list(FAMILY_KEYS)}, got {bad}"
        raise StatsInputError(msg)
    return keys


def _apply_fdr(table: pd.DataFrame, keys: tuple[str, ...]) -> pd.DataFrame:
    by = ["method", *keys]
    table["family"] = table[by].astype(str).agg("|".join, axis=1)
    table["p_fdr"] = np.nan
    for idx in table.groupby(by, sort=False).groups.values():
        table.loc[idx, "p_fdr"] = fdr_bh(table.loc[idx, "p"].to_numpy(dtype=float))
    return table


def _check_covariates(scores: pd.DataFrame, covariates: Sequence[str]) -> None:
    from helpers.validate import did_you_mean

    lacking = [c for c in covariates if c not in scores.columns]
    if lacking:
        numeric = [str(c) for c in scores.columns if c != "subject"]
        hints = "".join(did_you_mean(c, numeric) for c in lacking)
        msg = f"scores table lacks covariate column(s) {lacking}{hints}"
        raise StatsInputError(msg)
    for c in covariates:
        if pd.to_numeric(scores[c], errors="coerce").isna().gt(scores[c].isna()).any():
            msg = f"covariate {c!r} is not numeric"
            raise StatsInputError(msg)


def _group_mask(df: pd.DataFrame, group: str) -> np.ndarray:
    if group not in GROUPS:
        msg = f"unknown group {group!r} (known: {list(GROUPS)})"
        raise StatsInputError(msg)
    code = GROUPS[group]
    if code is None:
        return np.ones(len(df), dtype=bool)
    if "sex" not in df.columns:
        msg = "scores table has no 'sex' column: only group 'all' can be analysed"
        raise StatsInputError(msg)
    return (df["sex"] == code).to_numpy(dtype=bool)


def correlation_table(
    asymmetry: pd.DataFrame,
    scores: pd.DataFrame,
    *,
    indices: Sequence[str] | None = None,
    scores_cols: Sequence[str] | None = None,
    covariates: Sequence[str] = ("age", "bmi"),
    family: str | Sequence[str] = "group",
    groups: Sequence[str] = ("all", "male", "female"),
    methods: Sequence[str] = METHODS,
    min_n: int = MIN_N,
) -> pd.DataFrame:
    """Every asymmetry index x clinical score correlation, by group, with CI, p and FDR.

    Parameters
    ----------
    asymmetry : pandas.DataFrame
        subject, level, muscle and index columns (e.g. :func:`load_asymmetry`).
    scores : pandas.DataFrame
        One row per subject: subject, sex, covariates and scores (e.g. :func:`load_scores`).
    indices : sequence of str, optional
        Index columns (default: :func:`index_columns`).
    scores_cols : sequence of str, optional
        Score columns (default: :func:`score_columns`).
    covariates : sequence of str
        Covariates of the partial correlation (columns of ``scores``).  Empty: no partial rows.
    family : str or sequence of str
        The FDR family (module docstring); always within one method.
    groups : sequence of {"all", "male", "female"}
    methods : sequence of {"spearman", "partial_spearman"}
    min_n : int
        Fewest complete subjects for a test (see module docstring).

    Returns
    -------
    pandas.DataFrame
        Columns :data:`CORRELATION_COLUMNS`: group, index, muscle, level, score, n (subjects
        used), rho, ci_low, ci_high (95 % CI), p, p_fdr (BH within the family), method
        (``spearman`` / ``partial_spearman``), covariates (``;``-joined, empty for plain
        Spearman), family (the family's label).  Subjects without a match are reported by
        :func:`match_subjects`, never dropped silently.
    """
    merged, _ = match_subjects(asymmetry, scores, log_report=False)
    idx_cols = index_columns(asymmetry, indices)
    sc_cols = score_columns(scores, scores_cols)
    covariates = list(covariates)
    _check_covariates(scores, covariates)
    bad_methods = [m for m in methods if m not in METHODS]
    if bad_methods:
        msg = f"unknown method(s) {bad_methods} (known: {list(METHODS)})"
        raise StatsInputError(msg)
    methods = [m for m in methods if m != "partial_spearman" or covariates]
    keys = _family_keys(family)
    masks = {g: _group_mask(merged, g) for g in groups}
    rows: list[dict[str, Any]] = []
    for (muscle, level), block in merged.groupby(["muscle", "level"], sort=True, dropna=False):
        pos = merged.index.get_indexer(block.index)
        cov = block[covariates].to_numpy(dtype=float) if covariates else None
        for group in groups:
            gmask = masks[group][pos]
            for index in idx_cols:
                x = block[index].to_numpy(dtype=float)[gmask]
                for score in sc_cols:
                    y = block[score].to_numpy(dtype=float)[gmask]
                    key = {"group": group, "index": index, "muscle": muscle, "level": level,
                           "score": score}
                    for method in methods:
                        if method == "spearman":
                            res = spearman(x, y, min_n=min_n)
                            cov_label = ""
                        else:
                            res = partial_spearman(x, y, cov[gmask], min_n=min_n)
                            cov_label = ";".join(covariates)
                        rows.append({**key, **res, "method": method, "covariates": cov_label})
    table = pd.DataFrame(rows, columns=[c for c in CORRELATION_COLUMNS if c not in
                                        ("p_fdr", "family")])
    table["n"] = table["n"].astype(int)
    table = _apply_fdr(table, keys)
    return _sorted(table, methods=methods, groups=groups)[list(CORRELATION_COLUMNS)]


def _sorted(
    table: pd.DataFrame, *, methods: Sequence[str] = (), groups: Sequence[str] = ()
) -> pd.DataFrame:
    """Rows in reading order: methods and groups as asked, level "all" first, then by name."""
    order = {
        "method": {m: i for i, m in enumerate(methods)},
        "group": {g: i for i, g in enumerate(groups)},
    }

    def key(col: pd.Series) -> pd.Series:
        if col.name in order:
            return col.map(order[col.name])
        if col.name == "level":
            return col.map(lambda v: (v != "all", str(v)))
        return col.astype(str)

    by = [c for c in ("method", "group", "index", "muscle", "level", "score") if c in table]
    return table.sort_values(by, key=key, kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------------------ interaction
def _zrank(v: np.ndarray) -> np.ndarray:
    r = sps.rankdata(v)
    sd = r.std(ddof=1)
    return (r - r.mean()) / sd if sd > 0 else np.full_like(r, np.nan)


def sex_interaction(
    x: ArrayLike, y: ArrayLike, sex: ArrayLike, covariates: ArrayLike | None = None
) -> dict[str, float]:
    """Index x sex interaction on z-scored ranks (OLS, statsmodels) for one index and score.

    Parameters
    ----------
    x, y : array_like, shape (n,)
        Index and score.
    sex : array_like of {"M", "F", None}
    covariates : array_like, shape (n, k), optional

    Returns
    -------
    dict
        n, n_male, n_female, slope_female, slope_male, beta_interaction (men's minus women's
        slope of z(rank score) on z(rank index)), se, ci_low, ci_high (95 %), t, p.  NaN when
        either sex has fewer than 3 complete subjects or the model has no residual df.
    """
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    sx = np.asarray(sex, dtype=object)
    male = (sx == "M").astype(float)
    known = (sx == "M") | (sx == "F")
    ca = np.empty((len(xa), 0)) if covariates is None else np.asarray(covariates, dtype=float)
    if ca.ndim == 1:
        ca = ca[:, None]
    ok = known & np.isfinite(xa) & np.isfinite(ya) & np.isfinite(ca).all(axis=1)
    n = int(ok.sum())
    n_male = int((ok & (male == 1)).sum())
    out: dict[str, float] = {"n": n, "n_male": n_male, "n_female": n - n_male}
    nan_stats = dict.fromkeys(
        ("slope_female", "slope_male", "beta_interaction", "se", "ci_low", "ci_high", "t", "p"),
        math.nan,
    )
    k = ca.shape[1]
    if min(n_male, n - n_male) < 3 or n - (4 + k) < 1:
        return {**out, **nan_stats}
    zx, zy = _zrank(xa[ok]), _zrank(ya[ok])
    zc = np.column_stack([_zrank(ca[ok, j]) for j in range(k)]) if k else np.empty((n, 0))
    m = male[ok]
    design = np.column_stack([np.ones(n), zx, m, zx * m, zc])
    if not np.isfinite(design).all() or not np.isfinite(zy).all():
        return {**out, **nan_stats}
    fit = sm.OLS(zy, design).fit()
    low, high = fit.conf_int(alpha=1 - CI_LEVEL)[3]
    return {
        **out,
        "slope_female": float(fit.params[1]),
        "slope_male": float(fit.params[1] + fit.params[3]),
        "beta_interaction": float(fit.params[3]),
        "se": float(fit.bse[3]),
        "ci_low": float(low),
        "ci_high": float(high),
        "t": float(fit.tvalues[3]),
        "p": float(fit.pvalues[3]),
    }


def interaction_table(
    asymmetry: pd.DataFrame,
    scores: pd.DataFrame,
    *,
    indices: Sequence[str] | None = None,
    scores_cols: Sequence[str] | None = None,
    covariates: Sequence[str] = ("age", "bmi"),
) -> pd.DataFrame:
    """Index x sex interaction for every index x muscle x level x score (see module docstring).

    Returns
    -------
    pandas.DataFrame
        Columns :data:`INTERACTION_COLUMNS`: index, muscle, level, score, n, n_male, n_female,
        slope_female, slope_male, beta_interaction, se, ci_low, ci_high, t, p, p_fdr (BH over
        all rows), model (``ols_zrank``), covariates (``;``-joined).
    """
    merged, _ = match_subjects(asymmetry, scores, log_report=False)
    if "sex" not in merged.columns:
        msg = "scores table has no 'sex' column: no sex interaction can be estimated"
        raise StatsInputError(msg)
    idx_cols = index_columns(asymmetry, indices)
    sc_cols = score_columns(scores, scores_cols)
    covariates = list(covariates)
    _check_covariates(scores, covariates)
    rows = []
    for (muscle, level), block in merged.groupby(["muscle", "level"], sort=True, dropna=False):
        sex = block["sex"].to_numpy(dtype=object)
        cov = block[covariates].to_numpy(dtype=float) if covariates else None
        for index in idx_cols:
            for score in sc_cols:
                res = sex_interaction(block[index], block[score], sex, cov)
                rows.append(
                    {"index": index, "muscle": muscle, "level": level, "score": score, **res,
                     "model": "ols_zrank", "covariates": ";".join(covariates)}
                )
    table = pd.DataFrame(rows)
    table["p_fdr"] = fdr_bh(table["p"].to_numpy(dtype=float))
    return _sorted(table)[list(INTERACTION_COLUMNS)]


# ------------------------------------------------------------------ the one statistics entry
@dataclass(frozen=True)
class StatsResult:
    """What :func:`analyse` computed (one table per attribute).

    Attributes
    ----------
    correlations : pandas.DataFrame
        :func:`correlation_table`.
    interactions : pandas.DataFrame
        :func:`interaction_table`.
    table1 : pandas.DataFrame
        :func:`table1` of the analysed subjects.
    unmatched : pandas.DataFrame
        :func:`match_subjects`' subjects in only one table.
    analysed : pandas.DataFrame
        The scores rows of the subjects that have asymmetry rows.
    """

    correlations: pd.DataFrame
    interactions: pd.DataFrame
    table1: pd.DataFrame
    unmatched: pd.DataFrame
    analysed: pd.DataFrame


def analyse(
    asymmetry: pd.DataFrame,
    scores: pd.DataFrame,
    *,
    indices: Sequence[str] | None = None,
    scores_cols: Sequence[str] | None = None,
    covariates: Sequence[str] = ("age", "bmi"),
    family: str | Sequence[str] = "group",
) -> StatsResult:
    """Correlations, sex interactions, Table 1 and unmatched subjects of one cohort.

    The one statistics entry: ``esma stats`` and the statistics stage of a run both call it, so
    the two apply the same rules (an unknown covariate is an error naming it in both).

    Parameters
    ----------
    asymmetry : pandas.DataFrame
        :func:`load_asymmetry` rows (subject, level, muscle, indices).
    scores : pandas.DataFrame
        One row per subject (:func:`load_scores`).
    indices, scores_cols : sequence of str, optional
        Restrict to these indices / score columns (default: every one present).
    covariates : sequence of str
        Covariates of the partial correlations and the interaction models.
    family : str or sequence of str
        FDR family (:func:`correlation_table`).

    Returns
    -------
    StatsResult

    Raises
    ------
    StatsInputError
        A covariate that is not a column of ``scores`` (named, with a close match if any), or a
        covariate that is not numeric.
    """
    covariates = list(covariates)
    _check_covariates(scores, covariates)
    kwargs: dict[str, Any] = {
        "indices": indices,
        "scores_cols": scores_cols,
        "covariates": covariates,
    }
    _, unmatched = match_subjects(asymmetry, scores)
    correlations = correlation_table(asymmetry, scores, family=family, **kwargs)
    interactions = interaction_table(asymmetry, scores, **kwargs)
    subjects = set(asymmetry["subject"].astype(str))
    analysed = scores[scores["subject"].astype(str).isin(subjects)].reset_index(drop=True)
    return StatsResult(correlations, interactions, table1(analysed), unmatched, analysed)


# ----------------------------------------------------------------------------------- Table 1
def table1(
    scores: pd.DataFrame,
    *,
    continuous: Sequence[str] | None = None,
    categorical: Sequence[str] | None = None,
    digits: int = 1,
) -> pd.DataFrame:
    """Table 1 by sex: descriptors and scores of men, women and everyone, with a test per row.

    Parameters
    ----------
    scores : pandas.DataFrame
        One row per subject with ``sex`` (``M``/``F``/missing).
    continuous : sequence of str, optional
        Default: age, bmi, cobb_deg and the numeric scores that hold any value.
    categorical : sequence of str, optional
        Default: convex_side, odi_band (those holding any value).
    digits : int
        Decimals of the ``*_text`` display columns only; the numbers are not rounded.

    Returns
    -------
    pandas.DataFrame
        One row for the subject count (variable ``n``), one per continuous variable, one per
        level of each categorical variable.  Columns: variable, level, kind (``count`` /
        ``continuous`` / ``categorical``), summary (``mean_sd`` / ``median_iqr`` / ``n_pct``);
        for each group g in male, female, all: ``g_n`` (subjects with a value), ``g_mean``,
        ``g_sd``, ``g_median``, ``g_q1``, ``g_q3`` (continuous), ``g_count``, ``g_pct`` (% of
        ``g_n``; categorical), ``g_text`` (display); then ``test`` (``welch_t`` /
        ``mann_whitney_u`` / ``chi_square`` / ``fisher_exact``), ``statistic``, ``p`` (men vs
        women), ``normality_p_male``, ``normality_p_female`` (Shapiro-Wilk).
    """
    if "sex" not in scores.columns:
        msg = "Table 1 needs a 'sex' column"
        raise StatsInputError(msg)
    sex = scores["sex"]
    groups = {"male": (sex == "M").to_numpy(), "female": (sex == "F").to_numpy(),
              "all": np.ones(len(scores), dtype=bool)}
    if continuous is None:
        wanted = ("age", "bmi", "cobb_deg", *NUMERIC_SCORES)
        continuous = [c for c in wanted if c in scores.columns and scores[c].notna().any()]
    if categorical is None:
        categorical = [
            c for c in ("convex_side", "odi_band") if c in scores.columns and scores[c].notna().any()
        ]
    lacking = [c for c in (*continuous, *categorical) if c not in scores.columns]
    if lacking:
        msg = f"Table 1: scores table lacks column(s) {lacking}"
        raise StatsInputError(msg)
    rows = [{"variable": "n", "level": "", "kind": "count", "summary": "n",
             **{f"{g}_n": int(m.sum()) for g, m in groups.items()},
             **{f"{g}_text": str(int(m.sum())) for g, m in groups.items()}}]
    for var in continuous:
        rows.append(_continuous_row(var, scores[var].to_numpy(dtype=float), groups, digits))
    for var in categorical:
        rows.extend(_categorical_rows(var, scores[var], groups, digits))
    columns = ["variable", "level", "kind", "summary"]
    for g in groups:
        columns += [f"{g}_{s}" for s in
                    ("n", "mean", "sd", "median", "q1", "q3", "count", "pct", "text")]
    columns += ["test", "statistic", "p", "normality_p_male", "normality_p_female"]
    return pd.DataFrame(rows).reindex(columns=columns)


def _shapiro_p(v: np.ndarray) -> float:
    if v.size < 3 or np.ptp(v) == 0:
        return math.nan
    return float(sps.shapiro(v).pvalue)


def _continuous_row(
    var: str, values: np.ndarray, groups: Mapping[str, np.ndarray], digits: int
) -> dict[str, Any]:
    per = {g: values[m & np.isfinite(values)] for g, m in groups.items()}
    norm_p = {g: _shapiro_p(per[g]) for g in ("male", "female")}
    normal = all(np.isfinite(p) and p > NORMALITY_ALPHA for p in norm_p.values())
    row: dict[str, Any] = {"variable": var, "level": "", "kind": "continuous",
                           "summary": "mean_sd" if normal else "median_iqr",
                           "normality_p_male": norm_p["male"],
                           "normality_p_female": norm_p["female"]}
    for g, v in per.items():
        row[f"{g}_n"] = int(v.size)
        if v.size:
            q1, med, q3 = np.percentile(v, [25, 50, 75])
            row.update({f"{g}_mean": float(v.mean()),
                        f"{g}_sd": float(v.std(ddof=1)) if v.size > 1 else math.nan,
                        f"{g}_median": float(med), f"{g}_q1": float(q1), f"{g}_q3": float(q3)})
            if normal:
                row[f"{g}_text"] = f"{row[f'{g}_mean']:.{digits}f} ± {row[f'{g}_sd']:.{digits}f}"
            else:
                row[f"{g}_text"] = f"{med:.{digits}f} [{q1:.{digits}f}, {q3:.{digits}f}]"
        else:
            row[f"{g}_text"] = "-"
    a, b = per["male"], per["female"]
    if a.size >= 2 and b.size >= 2:
        if normal:
            res = sps.ttest_ind(a, b, equal_var=False)
            row["test"] = "welch_t"
        else:
            res = sps.mannwhitneyu(a, b, alternative="two-sided")
            row["test"] = "mann_whitney_u"
        row["statistic"], row["p"] = float(res.statistic), float(res.pvalue)
    else:
        row["test"] = "none (fewer than 2 values in a group)"
    return row


def _categorical_rows(
    var: str, values: pd.Series, groups: Mapping[str, np.ndarray], digits: int
) -> list[dict[str, Any]]:
    given = values.notna().to_numpy()
    present = set(values[given].astype(str))
    known_order = [name for _, name in ODI_BANDS] if var == "odi_band" else []
    levels = [lev for lev in known_order if lev in present]
    levels += sorted(present - set(levels))
    text = values.astype(str).to_numpy()
    counts = np.array(
        [[int(((text == lev) & given & groups[g]).sum()) for g in ("male", "female")]
         for lev in levels]
    )
    test, stat, p = _contingency_test(counts)
    rows = []
    for lev in levels:
        row: dict[str, Any] = {"variable": var, "level": lev, "kind": "categorical",
                               "summary": "n_pct", "test": test, "statistic": stat, "p": p}
        for g, m in groups.items():
            n = int((given & m).sum())
            c = int(((text == lev) & given & m).sum())
            pct = 100.0 * c / n if n else math.nan
            row.update({f"{g}_n": n, f"{g}_count": c, f"{g}_pct": pct,
                        f"{g}_text": f"{c} ({pct:.{digits}f} %)" if n else "-"})
        rows.append(row)
    return rows


def _contingency_test(counts: np.ndarray) -> tuple[str, float, float]:
    table = counts[counts.sum(axis=1) > 0]
    if table.shape[0] < 2 or (table.sum(axis=0) == 0).any():
        return "none (one level or one group)", math.nan, math.nan
    expected = sps.contingency.expected_freq(table)
    if (expected < MIN_EXPECTED).any():
        return "fisher_exact", math.nan, fisher_exact_2col(table)
    res = sps.chi2_contingency(table, correction=False)
    return "chi_square", float(res.statistic), float(res.pvalue)


def fisher_exact_2col(table: ArrayLike) -> float:
    """Two-sided Fisher(-Freeman-Halton) exact p of an r x 2 contingency table.

    The p-value is the total probability, with all margins fixed, of the tables no more probable
    than the observed one (relative tolerance 1e-7, as scipy's 2 x 2 test).  2 x 2 tables go to
    :func:`scipy.stats.fisher_exact`; larger ones are enumerated exactly (scipy's r x c version is
    a Monte Carlo estimate that changes from run to run) when there are at most
    :data:`FISHER_MAX_TABLES` candidate tables, else estimated by scipy's Monte Carlo method with
    :data:`FISHER_RESAMPLES` tables from a fixed seed (reproducible).

    Examples
    --------
    >>> round(fisher_exact_2col([[3, 0], [0, 3], [1, 1]]), 4)
    0.0571
    """
    tab = np.asarray(table, dtype=np.int64)
    if tab.ndim != 2 or tab.shape[1] != 2 or tab.shape[0] < 2 or (tab < 0).any():
        msg = f"Fisher's test needs an r x 2 table of counts (r >= 2), got shape {tab.shape}"
        raise StatsInputError(msg)
    if tab.shape[0] == 2:
        return float(sps.fisher_exact(tab).pvalue)
    rows = tab.sum(axis=1)
    first = int(tab[:, 0].sum())
    ranges = [np.arange(min(int(r), first) + 1) for r in rows[:-1]]
    if math.prod(len(r) for r in ranges) > FISHER_MAX_TABLES:
        method = sps.MonteCarloMethod(
            n_resamples=FISHER_RESAMPLES, rng=np.random.default_rng(FISHER_SEED)
        )
        return float(sps.fisher_exact(tab, method=method).pvalue)
    grid = np.stack(np.meshgrid(*ranges, indexing="ij"), axis=-1).reshape(-1, len(ranges))
    last = first - grid.sum(axis=1)
    ok = (last >= 0) & (last <= rows[-1])
    cells = np.column_stack([grid[ok], last[ok]])

    def log_prob(a: np.ndarray) -> np.ndarray:
        # multivariate hypergeometric: prod C(r_i, a_i) / C(N, first); the denominator cancels
        return (gammaln(rows + 1) - gammaln(a + 1) - gammaln(rows - a + 1)).sum(axis=-1)

    logp = log_prob(cells)
    observed = log_prob(tab[:, 0])
    keep = logp <= observed + math.log1p(1e-7)
    return float(min(1.0, np.exp(logp[keep] - logsumexp(logp)).sum()))


# --------------------------------------------------------------------------------- agreement
@contextlib.contextmanager
def _pingouin_unrounded() -> Iterator[None]:
    """Pingouin rounds its CI95 column to 2 decimals by default; lift that for one call."""
    saved = pg.options.get("round.column.CI95")
    pg.options["round.column.CI95"] = None
    try:
        yield
    finally:
        pg.options["round.column.CI95"] = saved


def koo_li(icc: float) -> str:
    """Koo & Li (2016) label of an ICC: poor, moderate, good or excellent."""
    if not np.isfinite(icc):
        return ""
    return next(name for upper, name in KOO_LI if icc < upper)


def icc_2_1(ratings: ArrayLike, *more: ArrayLike) -> pd.Series:
    """ICC(2,1): two-way random effects, absolute agreement, single rater, with 95 % CI.

    Parameters
    ----------
    ratings : array_like
        Either a 2-D array (n_targets, k_raters), or the first rater's values (n_targets,)
        with the other raters in ``*more`` (e.g. ``icc_2_1(automated, manual)``).

    Returns
    -------
    pandas.Series
        n (targets rated by every rater; targets with a missing rating are dropped), k, icc,
        ci_low, ci_high, f, df1, df2, p, rating (Koo & Li).

    Examples
    --------
    Shrout & Fleiss (1979), 6 targets x 4 judges: ICC(2,1) = 0.29.

    >>> sf = [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]]
    >>> round(float(icc_2_1(sf)["icc"]), 2)
    0.29
    """
    arr = np.asarray(ratings, dtype=float)
    if more:
        arr = np.column_stack([arr, *[np.asarray(m, dtype=float) for m in more]])
    if arr.ndim != 2 or arr.shape[1] < 2:
        msg = f"ICC needs ratings of shape (n_targets, k >= 2 raters), got {arr.shape}"
        raise StatsInputError(msg)
    arr = arr[np.isfinite(arr).all(axis=1)]
    n, k = arr.shape
    if n < 3:
        msg = f"ICC needs at least 3 targets rated by every rater, got {n}"
        raise StatsInputError(msg)
    long = pd.DataFrame(arr).reset_index().melt(id_vars="index", var_name="rater",
                                                 value_name="rating")
    with _pingouin_unrounded(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = pg.intraclass_corr(data=long, targets="index", raters="rater", ratings="rating")
    row = res.set_index("Type").loc["ICC(A,1)"]
    low, high = (float(v) for v in row["CI95"])
    icc = float(row["ICC"])
    return pd.Series(
        {"n": n, "k": k, "icc": icc, "ci_low": low, "ci_high": high, "f": float(row["F"]),
         "df1": float(row["df1"]), "df2": float(row["df2"]), "p": float(row["pval"]),
         "rating": koo_li(icc)}
    )


def bland_altman(a: ArrayLike, b: ArrayLike) -> pd.Series:
    """Bland-Altman agreement of two measurements of the same subjects (a - b).

    Returns
    -------
    pandas.Series
        n (pairs with both values), bias (mean of a - b, units of a), sd_diff, loa_low, loa_high
        (bias -+ 1.96 sd_diff), bias_ci_low, bias_ci_high, loa_low_ci_low, loa_low_ci_high,
        loa_high_ci_low, loa_high_ci_high (95 %).

    Examples
    --------
    >>> r = bland_altman([10, 12, 14, 16], [9, 12, 13, 17])
    >>> float(r["bias"]), round(float(r["sd_diff"]), 4)
    (0.25, 0.9574)
    """
    aa, bb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if aa.shape != bb.shape:
        msg = f"Bland-Altman needs paired values of one shape, got {aa.shape} and {bb.shape}"
        raise StatsInputError(msg)
    ok = np.isfinite(aa) & np.isfinite(bb)
    d = (aa - bb)[ok]
    n = int(d.size)
    if n < 2:
        msg = f"Bland-Altman needs at least 2 complete pairs, got {n}"
        raise StatsInputError(msg)
    bias, sd = float(d.mean()), float(d.std(ddof=1))
    z = sps.norm.ppf(0.5 + CI_LEVEL / 2)
    t = sps.t.ppf(0.5 + CI_LEVEL / 2, n - 1)
    se_bias = sd / math.sqrt(n)
    se_loa = sd * math.sqrt(1.0 / n + z * z / (2.0 * (n - 1)))
    lo, hi = bias - z * sd, bias + z * sd
    return pd.Series(
        {"n": n, "bias": bias, "sd_diff": sd, "loa_low": lo, "loa_high": hi,
         "bias_ci_low": bias - t * se_bias, "bias_ci_high": bias + t * se_bias,
         "loa_low_ci_low": lo - t * se_loa, "loa_low_ci_high": lo + t * se_loa,
         "loa_high_ci_low": hi - t * se_loa, "loa_high_ci_high": hi + t * se_loa}
    )
