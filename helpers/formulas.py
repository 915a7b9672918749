"""Asymmetry formulas: one registry that computes the indices and that the reports quote.

Each index (``cdi``, ``lfiar``) has its formulas in a registry (name -> :class:`Formula`): the
function :mod:`helpers.metrics` computes the index with, and the text the metrics and
statistics reports state.  The reports read the formula the study's settings select
(:func:`describe`), so a study with ``cdi_formula: log_ratio`` is reported with
``ln(FCSA_left / FCSA_right)``, never with the default's text.

The study this toolkit follows (ISMRM 2024 #5045) did not publish its formulas; these are
documented choices (see :mod:`helpers.metrics`).  Pure functions over arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "CDI",
    "DEFAULT_CDI_FORMULA",
    "DEFAULT_LFIAR_FLOOR_PCT",
    "DEFAULT_LFIAR_FORMULA",
    "LFIAR",
    "Formula",
    "cdi",
    "cdi_text",
    "describe",
    "lfiar",
    "lfiar_log_text",
]


@dataclass(frozen=True)
class Formula:
    """One formula of an asymmetry index.

    Attributes
    ----------
    index : str
        The index it computes (``"cdi"`` or ``"lfiar"``).
    name : str
        The setting value that selects it (``cdi_formula`` / ``lfiar_formula``).
    expression : str
        The formula as the reports state it; ``{floor}`` stands for the LFIAR floor (%).
    compute : callable
        ``compute(left, right, floor) -> ndarray`` (NaN where undefined).
    """

    index: str
    name: str
    expression: str
    compute: Callable[[NDArray, NDArray, float], NDArray]

    def text(self, floor_pct: float | None = None) -> str:
        """The expression with the floor filled in (``"the floor"`` when not given)."""
        floor = f"{floor_pct:g} %" if floor_pct is not None else "the floor"
        return self.expression.replace("{floor}", floor)


def _normalized_difference(a: NDArray, b: NDArray, floor: float) -> NDArray:
    mean = (a + b) / 2
    return np.where(mean > 0, (a - b) / mean, np.nan)


def _log_ratio(a: NDArray, b: NDArray, floor: float) -> NDArray:
    return np.where((a > 0) & (b > 0), np.log(a / b), np.nan)


def _floored_ratio(a: NDArray, b: NDArray, floor: float) -> NDArray:
    return a / np.maximum(b, floor)


#: CDI formulas (name -> :class:`Formula`), on the functional areas FCSA (mm2).
CDI: Mapping[str, Formula] = MappingProxyType({
    "normalized_difference": Formula(
        "cdi", "normalized_difference",
        "(FCSA_left - FCSA_right) / ((FCSA_left + FCSA_right) / 2)", _normalized_difference),
    "log_ratio": Formula("cdi", "log_ratio", "ln(FCSA_left / FCSA_right)", _log_ratio),
})
#: LFIAR formulas (name -> :class:`Formula`), on the fat infiltrations FI (%).
LFIAR: Mapping[str, Formula] = MappingProxyType({
    "ratio": Formula("lfiar", "ratio", "FI_left / max(FI_right, {floor})", _floored_ratio),
    "normalized_difference": Formula(
        "lfiar", "normalized_difference", "(FI_left - FI_right) / ((FI_left + FI_right) / 2)",
        _normalized_difference),
})
#: ``lfiar_log``, whatever the LFIAR formula: the log of the floored ratio, finite when the
#: left side is lean and exactly negated when the sides are swapped.
LFIAR_LOG_EXPRESSION = "ln(max(FI_left, {floor}) / max(FI_right, {floor}))"
DEFAULT_CDI_FORMULA = "normalized_difference"
DEFAULT_LFIAR_FORMULA = "ratio"
DEFAULT_LFIAR_FLOOR_PCT = 0.5


def cdi(left: NDArray | float, right: NDArray | float, formula: str) -> NDArray:
    """CDI of left and right FCSA (mm2) by the named formula of :data:`CDI`.

    Examples
    --------
    >>> float(cdi(110.0, 90.0, "normalized_difference"))
    0.2
    >>> round(float(cdi(110.0, 90.0, "log_ratio")), 4)
    0.2007
    """
    a, b = np.asarray(left, dtype=float), np.asarray(right, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return CDI[formula].compute(a, b, 0.0)


def lfiar(
    left: NDArray | float, right: NDArray | float, floor: float, formula: str
) -> tuple[NDArray, NDArray]:
    """LFIAR (by the named formula of :data:`LFIAR`) and ``lfiar_log`` of left and right fat
    infiltration (%), with the denominator floor ``floor`` (%).

    Examples
    --------
    >>> main, log = lfiar(10.0, 0.1, 0.5, "ratio")
    >>> float(main), round(float(log), 4)
    (20.0, 2.9957)
    """
    a, b = np.asarray(left, dtype=float), np.asarray(right, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        main = LFIAR[formula].compute(a, b, floor)
        log_ratio = np.log(np.maximum(a, floor) / np.maximum(b, floor))
    return main, log_ratio


def cdi_text(settings: Mapping[str, Any] | None = None) -> str:
    """The CDI formula the settings select (``cdi_formula``, default
    :data:`DEFAULT_CDI_FORMULA`), as the reports state it."""
    return CDI[str(dict(settings or {}).get("cdi_formula", DEFAULT_CDI_FORMULA))].text()


def lfiar_log_text(settings: Mapping[str, Any] | None = None) -> str:
    """``lfiar_log``'s formula with the settings' floor (``lfiar_floor_pct``)."""
    floor = float(dict(settings or {}).get("lfiar_floor_pct", DEFAULT_LFIAR_FLOOR_PCT))
    return LFIAR_LOG_EXPRESSION.replace("{floor}", f"{floor:g} %")


def describe(settings: Mapping[str, Any] | None = None) -> list[str]:
    """Markdown bullets stating the asymmetry formulas the settings select.

    Parameters
    ----------
    settings : mapping, optional
        Measurement settings (``cdi_formula``, ``lfiar_formula``, ``lfiar_floor_pct``; the
        ``metrics`` section of a study or a run's ``reference.json`` settings); missing keys
        take the defaults.

    Returns
    -------
    list of str
        One bullet for CDI, one for LFIAR, each naming the formula's setting value.

    Examples
    --------
    >>> describe({"cdi_formula": "log_ratio"})[0]
    '- **cdi** = ln(FCSA_left / FCSA_right) (`cdi_formula: log_ratio`), > 0 when the left is larger; **cdi_abs** = |cdi|.'
    """
    s = dict(settings or {})
    c = CDI[str(s.get("cdi_formula", DEFAULT_CDI_FORMULA))]
    f = LFIAR[str(s.get("lfiar_formula", DEFAULT_LFIAR_FORMULA))]
    floor = float(s.get("lfiar_floor_pct", DEFAULT_LFIAR_FLOOR_PCT))
    return [
        (f"- **cdi** = {c.text()} (`cdi_formula: {c.name}`), > 0 when the left is larger; "
        "**cdi_abs** = |cdi|."),
        (f"- **lfiar** = {f.text(floor)} (`lfiar_formula: {f.name}`, "
        f"`lfiar_floor_pct: {floor:g}`); **lfiar_log** = "
        f"{lfiar_log_text(s)}."),
    ]
