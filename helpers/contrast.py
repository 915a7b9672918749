"""Which contrast each subject's fat was measured on, in the tables and the statistics.

esma measures fat infiltration on three contrasts (:data:`helpers.config.CONTRASTS`):

- ``T2w`` and ``T1w``: one fat-bright image without fat suppression (T2- or T1-weighted), fat
  classified by :mod:`helpers.fat`; a fat-suppressed image is refused;
- ``dixon``: a water/fat pair, fat fraction ``F / (W + F)`` (:mod:`helpers.dixon`).

A subject's contrast comes from the DICOM header at ingest, the manifest's ``contrast`` column,
the file name's BIDS suffix (``_T1w``, ``_T2w``; ``_water``/``_fat`` pairs are ``dixon``), or
the study's ``contrast:`` key, in that order.  The cohort tables carry it as a last
``contrast`` column (:func:`add_contrast`), and :func:`correlations_by_contrast` repeats the
correlations within each contrast, because fat fractions from different contrasts are not
interchangeable (a study mixes them only with ``mixed_contrast: true``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = [
    "UNSPECIFIED",
    "add_contrast",
    "contrast_counts",
    "contrast_from_name",
    "correlations_by_contrast",
]

#: The contrast of a subject nothing says anything about.
UNSPECIFIED = "unspecified"


def contrast_from_name(path: str | Path) -> str:
    """The contrast a file's BIDS suffix gives: ``T1w``, ``T2w``, ``dixon`` (``_water`` or
    ``_fat``), else :data:`UNSPECIFIED`.

    Examples
    --------
    >>> contrast_from_name("sub-0001_T1w.nii.gz")
    'T1w'
    >>> contrast_from_name("case7.nii")
    'unspecified'
    """
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        name = name.removesuffix(ext)
    for suffix, contrast in (("_T1w", "T1w"), ("_T2w", "T2w"), ("_water", "dixon"),
                             ("_fat", "dixon")):
        if name.endswith(suffix):
            return contrast
    return UNSPECIFIED


def add_contrast(table: pd.DataFrame, contrasts: Mapping[str, str]) -> pd.DataFrame:
    """``table`` with a last column ``contrast`` looked up by its ``subject`` column.

    Parameters
    ----------
    table : pandas.DataFrame
        A per-subject table (``metrics.csv``, ``asymmetry.csv``) with a ``subject`` column.
    contrasts : mapping
        Subject -> contrast (``""`` = unspecified).

    Returns
    -------
    pandas.DataFrame
        A copy; subjects without a contrast read :data:`UNSPECIFIED`.
    """
    out = table.drop(columns=["contrast"], errors="ignore").copy()
    out["contrast"] = [
        contrasts.get(str(s), "") or UNSPECIFIED for s in out["subject"].astype(str)
    ] if len(out) else pd.Series(dtype=str)
    return out


def contrast_counts(contrasts: Mapping[str, str]) -> dict[str, int]:
    """Number of subjects per contrast (sorted by name), for the run's index page."""
    counts: dict[str, int] = {}
    for c in contrasts.values():
        key = c or UNSPECIFIED
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def correlations_by_contrast(
    asymmetry: pd.DataFrame, scores: pd.DataFrame, **kwargs: Any
) -> pd.DataFrame:
    """:func:`helpers.stats.correlation_table` within each contrast.

    Parameters
    ----------
    asymmetry : pandas.DataFrame
        Asymmetry table with a ``contrast`` column (:func:`add_contrast`).
    scores : pandas.DataFrame
        Scores table.
    **kwargs
        Passed to :func:`~helpers.stats.correlation_table` (indices, covariates, family, ...).

    Returns
    -------
    pandas.DataFrame
        ``contrast`` then the correlation columns, one block per contrast (in name order); the
        FDR adjustment runs within each contrast.  Empty when the table has no ``contrast``
        column.
    """
    from helpers import stats

    columns = ["contrast", *stats.CORRELATION_COLUMNS]
    if "contrast" not in asymmetry.columns or asymmetry.empty:
        return pd.DataFrame(columns=columns)
    blocks = []
    for contrast, block in asymmetry.groupby("contrast", sort=True):
        table = stats.correlation_table(block.drop(columns=["contrast"]).reset_index(drop=True),
                                        scores, **kwargs)
        table.insert(0, "contrast", str(contrast))
        blocks.append(table)
    if not blocks:
        return pd.DataFrame(columns=columns)
    return pd.concat(blocks, ignore_index=True)[columns]
