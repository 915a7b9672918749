"""Disability and quality-of-life scores from item-level answers: ODI, SRS-22r, VAS, JOA.

Every score is computed from the raw items exactly as below, without rounding (science
reference §4).  Missing answers (NaN) follow each instrument's rule; a score that its rule
cannot give is NaN, never 0.

ODI v2.1a (Oswestry Disability Index, Fairbank & Pynsent 2000)
    ``odi_pct`` = sum of the answered sections / (5 x number answered) x 100 (%).  At most one of
    the ten sections may be unanswered; with two or more the score is missing.
    ``odi_band``: ``minimal`` (0-20), ``moderate`` (21-40), ``severe`` (41-60), ``crippled``
    (61-80), ``bed-bound`` (81-100).  Boundary rule for scores that are not whole numbers: each
    band's upper limit is inclusive and a score belongs to the first band whose upper limit it
    does not exceed (20 -> minimal, 20.5 -> moderate, 40 -> moderate).  With all ten sections the
    score moves in steps of 2 and with nine in steps of 2.2, so no reachable score lies strictly
    between 20 and 21 (or 40 and 41, ...): the rule agrees with the published integer bands.
SRS-22r (Scoliosis Research Society, 22 items, 1 = worst, 5 = best)
    Domains (mean of the answered items): function 5, 9, 12, 15, 18; pain 1, 2, 8, 11, 17;
    self-image 4, 6, 10, 14, 19; mental health 3, 7, 13, 16, 20; satisfaction 21, 22.  A five-item
    domain needs at least 3 answered items, satisfaction at least 1 (our documented choice: with
    two items, one answer is half the domain).  ``srs_subtotal`` = mean of the answered items
    1-20 and ``srs_total`` = mean of the answered items 1-22; both are missing when any of the
    five domains is missing (satisfaction included, as the study's rule says).
VAS
    ``vas_back``, ``vas_leg``: mm from the "no pain" end of the 100 mm line, passed through.
JOA low-back score (maximum 29; items in :data:`helpers.clinical.JOA_ITEMS`)
    ``joa_total`` = sum of the 14 items (-6 to 29), missing when any item is missing (the
    instrument has no rule for unanswered items, so none is invented).  ``joa_recovery_pct``
    (Hirabayashi) = (joa_total - joa_pre_total) / (29 - joa_pre_total) x 100 (%), when the
    clinical table gives ``joa_pre_total``; missing when either is missing or joa_pre_total is 29
    (no room to recover).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from helpers.clinical import (
    DEMOGRAPHIC_COLUMNS,
    JOA_ITEMS,
    JOA_PRE_TOTAL,
    ODI_ITEMS,
    SRS_ITEMS,
    VAS_COLUMNS,
    ClinicalDataError,
    validate_clinical,
)

__all__ = [
    "JOA_MAX",
    "NUMERIC_SCORES",
    "ODI_BANDS",
    "SCORE_COLUMNS",
    "SRS_DOMAINS",
    "SRS_MIN_ANSWERED",
    "joa_recovery_pct",
    "joa_total",
    "odi_band",
    "odi_percent",
    "score_clinical",
    "score_table",
    "srs_scores",
]

log = logging.getLogger(__name__)

#: Most ODI sections that may be unanswered.
ODI_MAX_MISSING = 1
#: ODI bands: (inclusive upper limit in %, name).
ODI_BANDS: tuple[tuple[float, str], ...] = (
    (20.0, "minimal"),
    (40.0, "moderate"),
    (60.0, "severe"),
    (80.0, "crippled"),
    (100.0, "bed-bound"),
)
#: SRS-22r domains: output column -> item numbers (1-based).
SRS_DOMAINS: dict[str, tuple[int, ...]] = {
    "srs_function": (5, 9, 12, 15, 18),
    "srs_pain": (1, 2, 8, 11, 17),
    "srs_self_image": (4, 6, 10, 14, 19),
    "srs_mental_health": (3, 7, 13, 16, 20),
    "srs_satisfaction": (21, 22),
}
#: Fewest answered items for a domain score.
SRS_MIN_ANSWERED: dict[str, int] = {
    "srs_function": 3,
    "srs_pain": 3,
    "srs_self_image": 3,
    "srs_mental_health": 3,
    "srs_satisfaction": 1,
}
JOA_MAX = 29.0
#: Numeric scores (the ones statistics correlate), in output order.
NUMERIC_SCORES: tuple[str, ...] = (
    "odi_pct",
    *SRS_DOMAINS,
    "srs_subtotal",
    "srs_total",
    *VAS_COLUMNS,
    "joa_total",
    "joa_recovery_pct",
)
#: Columns of a scores table, in order.
SCORE_COLUMNS: tuple[str, ...] = (*DEMOGRAPHIC_COLUMNS, "odi_pct", "odi_band", *NUMERIC_SCORES[1:])


def _as_2d(items: ArrayLike, n_items: int, name: str) -> np.ndarray:
    arr = np.asarray(items, dtype=float)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != n_items:
        msg = f"{name} items must have shape (n_subjects, {n_items}), got {arr.shape}"
        raise ValueError(msg)
    return arr


def odi_percent(items: ArrayLike) -> np.ndarray:
    """ODI score (%) from the ten section answers.

    Parameters
    ----------
    items : array_like, shape (n_subjects, 10) or (10,)
        Section answers 0-5, NaN = unanswered.

    Returns
    -------
    numpy.ndarray, shape (n_subjects,)
        sum / (5 x answered) x 100 (%), NaN when more than one section is unanswered.

    Examples
    --------
    >>> float(odi_percent([2, 2, 2, 2, 2, 2, 2, 2, 2, np.nan])[0])
    40.0
    """
    arr = _as_2d(items, len(ODI_ITEMS), "ODI")
    answered = np.isfinite(arr).sum(axis=1)
    total = np.nansum(arr, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        pct = total / (5.0 * answered) * 100.0
    pct[answered < len(ODI_ITEMS) - ODI_MAX_MISSING] = np.nan
    return pct


def odi_band(pct: ArrayLike) -> np.ndarray:
    """ODI band name for each score (%); None where the score is missing.

    Upper limits are inclusive: 20 -> ``minimal``, 20.5 -> ``moderate`` (see module notes).

    Examples
    --------
    >>> odi_band([0, 20, 20.5, 40, 60.1, 80, 100, np.nan]).tolist()
    ['minimal', 'minimal', 'moderate', 'moderate', 'crippled', 'crippled', 'bed-bound', None]
    """
    arr = np.atleast_1d(np.asarray(pct, dtype=float))
    out = np.full(arr.shape, None, dtype=object)
    finite = np.isfinite(arr)
    if np.any(finite & ((arr < 0) | (arr > 100))):
        msg = "ODI scores must lie in 0-100 %"
        raise ValueError(msg)
    done = ~finite
    for upper, name in ODI_BANDS:
        hit = ~done & (arr <= upper)
        out[hit] = name
        done |= hit
    return out


def srs_scores(items: ArrayLike) -> pd.DataFrame:
    """SRS-22r domain scores, subtotal and total from the 22 item answers.

    Parameters
    ----------
    items : array_like, shape (n_subjects, 22) or (22,)
        Item answers 1-5 in item order (column j is item j + 1), NaN = unanswered.

    Returns
    -------
    pandas.DataFrame
        srs_function, srs_pain, srs_self_image, srs_mental_health, srs_satisfaction,
        srs_subtotal, srs_total (points, 1-5); NaN where the rules (module docstring) leave the
        score missing.
    """
    arr = _as_2d(items, len(SRS_ITEMS), "SRS-22r")
    out: dict[str, np.ndarray] = {}
    for domain, numbers in SRS_DOMAINS.items():
        sub = arr[:, [k - 1 for k in numbers]]
        out[domain] = _mean_if_enough(sub, SRS_MIN_ANSWERED[domain])
    domains = pd.DataFrame(out)
    total_ok = domains.notna().all(axis=1).to_numpy()
    domains["srs_subtotal"] = np.where(total_ok, _mean_if_enough(arr[:, :20], 1), np.nan)
    domains["srs_total"] = np.where(total_ok, _mean_if_enough(arr, 1), np.nan)
    return domains


def _mean_if_enough(sub: np.ndarray, min_answered: int) -> np.ndarray:
    answered = np.isfinite(sub).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(sub, axis=1) / answered
    mean[answered < min_answered] = np.nan
    return mean


def joa_total(items: ArrayLike) -> np.ndarray:
    """JOA low-back score (points, -6 to 29) from its 14 items; NaN when any item is missing.

    Parameters
    ----------
    items : array_like, shape (n_subjects, 14) or (14,)
        Items in the order of :data:`helpers.clinical.JOA_ITEMS`.
    """
    arr = _as_2d(items, len(JOA_ITEMS), "JOA")
    return np.where(np.isfinite(arr).all(axis=1), arr.sum(axis=1), np.nan)


def joa_recovery_pct(post: ArrayLike, pre: ArrayLike) -> np.ndarray:
    """JOA recovery rate (%) = (post - pre) / (29 - pre) x 100 (Hirabayashi).

    NaN where either total is missing or ``pre`` is 29 (no room to recover).

    Examples
    --------
    >>> joa_recovery_pct([20.0, 29.0], [11.0, 29.0]).tolist()
    [50.0, nan]
    """
    post_arr = np.asarray(post, dtype=float)
    pre_arr = np.asarray(pre, dtype=float)
    room = JOA_MAX - pre_arr
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = (post_arr - pre_arr) / room * 100.0
    return np.where(room != 0, rate, np.nan)


def score_table(clean: pd.DataFrame) -> pd.DataFrame:
    """Score a validated clinical table (pure; see :func:`score_clinical`).

    Parameters
    ----------
    clean : pandas.DataFrame
        From :func:`helpers.clinical.validate_clinical`: numbers as float, NaN = unanswered.
        Instruments whose item columns are absent get missing scores.

    Returns
    -------
    pandas.DataFrame
        The columns of :data:`SCORE_COLUMNS`: subject, sex, age (years), bmi (kg/m2), cobb_deg,
        convex_side, odi_pct (%), odi_band, srs_function, srs_pain, srs_self_image,
        srs_mental_health, srs_satisfaction, srs_subtotal, srs_total (points 1-5), vas_back,
        vas_leg (mm), joa_total (points), joa_recovery_pct (%).
    """
    n = len(clean)
    nan = np.full(n, np.nan)
    out = pd.DataFrame(index=clean.index)
    for col in DEMOGRAPHIC_COLUMNS:
        if col in clean.columns:
            out[col] = clean[col]
        else:  # optional descriptors (cobb_deg, convex_side) absent from the file
            out[col] = pd.Series([None] * n, index=clean.index, dtype=object)
    if all(c in clean.columns for c in ODI_ITEMS):
        out["odi_pct"] = odi_percent(clean[list(ODI_ITEMS)].to_numpy(dtype=float))
    else:
        out["odi_pct"] = nan
    out["odi_band"] = odi_band(out["odi_pct"].to_numpy(dtype=float)) if n else []
    if all(c in clean.columns for c in SRS_ITEMS):
        srs = srs_scores(clean[list(SRS_ITEMS)].to_numpy(dtype=float))
        for col in srs.columns:
            out[col] = srs[col].to_numpy()
    else:
        for col in (*SRS_DOMAINS, "srs_subtotal", "srs_total"):
            out[col] = nan
    for col in VAS_COLUMNS:
        out[col] = clean[col].to_numpy(dtype=float) if col in clean.columns else nan
    if all(c in clean.columns for c in JOA_ITEMS):
        out["joa_total"] = joa_total(clean[list(JOA_ITEMS)].to_numpy(dtype=float))
    else:
        out["joa_total"] = nan
    if JOA_PRE_TOTAL in clean.columns:
        pre = clean[JOA_PRE_TOTAL].to_numpy(dtype=float)
        out["joa_recovery_pct"] = joa_recovery_pct(out["joa_total"].to_numpy(dtype=float), pre)
    else:
        out["joa_recovery_pct"] = nan
    out = out[list(SCORE_COLUMNS)].reset_index(drop=True)
    out.attrs = {}
    return out


def score_clinical(
    df: pd.DataFrame, skip_invalid: bool = False
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Validate a standard-layout clinical table and score every subject.

    Parameters
    ----------
    df : pandas.DataFrame
        From :func:`helpers.clinical.load_clinical` (or any table in the standard layout).
    skip_invalid : bool
        False (default): any invalid value stops with :class:`ClinicalDataError`.  True: rows
        with a problem are left out and listed in ``skipped``.

    Returns
    -------
    scores : pandas.DataFrame
        One row per valid subject, columns :data:`SCORE_COLUMNS` (see :func:`score_table`).
    skipped : pandas.DataFrame
        One row per problem of a skipped row: row, subject, column, value, problem (empty when
        nothing was skipped).

    Raises
    ------
    ClinicalDataError
        ``skip_invalid`` is False and a value is out of range, not a number, not a whole number
        where one is required, or a subject is blank or duplicated.  The message names the file,
        subject, column and row of each problem.
    """
    clean, problems = validate_clinical(df)
    source = df.attrs.get("source", "clinical table")
    if len(problems) and not skip_invalid:
        raise ClinicalDataError(source, problems)
    for p in problems.itertuples():
        log.warning(
            "%s: skipped subject %r (row %s): column %r: %s",
            source,
            p.subject,
            p.row,
            p.column,
            p.problem,
        )
    return score_table(clean), problems
