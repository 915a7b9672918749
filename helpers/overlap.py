"""Overlap of two masks: the one Dice coefficient of esma.

QC (:func:`helpers.qc.dice_table`), training evaluation (:func:`helpers.training.evaluate_masks`)
and the segmentation benchmarks all compute Dice here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["dice", "dice_per_label"]


def dice(a: ArrayLike, b: ArrayLike) -> float:
    """Dice overlap ``2|A n B| / (|A| + |B|)`` of two boolean masks (dimensionless, 0 to 1).

    Returns NaN when both are empty (overlap undefined; reported as such, never as 0 or 1).

    Raises
    ------
    ValueError
        Shapes differ.

    Examples
    --------
    >>> dice(np.array([1, 1, 0, 0], bool), np.array([0, 1, 1, 0], bool))
    0.5
    >>> dice(np.zeros(3, bool), np.zeros(3, bool))
    nan
    """
    aa = np.asarray(a, dtype=bool)
    bb = np.asarray(b, dtype=bool)
    if aa.shape != bb.shape:
        msg = f"dice: shapes differ {aa.shape} vs {bb.shape}"
        raise ValueError(msg)
    total = int(aa.sum()) + int(bb.sum())
    if total == 0:
        return math.nan
    return 2.0 * int(np.logical_and(aa, bb).sum()) / total


def dice_per_label(a: ArrayLike, b: ArrayLike, values: Iterable[int]) -> dict[int, float]:
    """:func:`dice` of each label value between two label arrays of one shape.

    Returns
    -------
    dict
        Label value -> Dice (NaN where the label is absent from both).

    Raises
    ------
    ValueError
        Shapes differ.

    Examples
    --------
    >>> a = np.array([0, 1, 1, 2]); b = np.array([0, 1, 2, 2])
    >>> {k: round(v, 3) for k, v in dice_per_label(a, b, [1, 2]).items()}
    {1: 0.667, 2: 0.667}
    """
    aa, bb = np.asarray(a), np.asarray(b)
    if aa.shape != bb.shape:
        msg = f"dice: shapes differ {aa.shape} vs {bb.shape}"
        raise ValueError(msg)
    return {int(v): dice(aa == v, bb == v) for v in values}
