"""Shared validators of settings: choices with "did you mean", numeric ranges, known keys.

Each raises :class:`SettingError`, a :class:`helpers.errors.ConfigError` that carries the
setting's key and the problem apart, so that the study loader (:mod:`helpers.config`) puts the
study file and the section in front of the key without parsing the message.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping, Sequence

from helpers.errors import ConfigError

__all__ = [
    "SettingError",
    "check_choice",
    "check_known_keys",
    "check_range",
    "check_settings_mapping",
    "did_you_mean",
]


class SettingError(ConfigError):
    """An invalid setting.

    Attributes
    ----------
    key : str
        The setting's key within its section (``fat_method``, ``workers``).
    problem : str
        What is wrong with it.
    """

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}" if key else problem)


def did_you_mean(value: object, options: Iterable[object]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``options``, or ``""`` when none is close.

    Examples
    --------
    >>> did_you_mean("gmm4", ["unmix", "gmm3", "otsu"])
    " (did you mean 'gmm3'?)"
    >>> did_you_mean("zzz", ["unmix", "gmm3"])
    ''
    """
    words = [str(o) for o in options]
    close = difflib.get_close_matches(str(value), words, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_choice(key: str, value: object, options: Sequence[object]) -> object:
    """``value`` when it is one of ``options``; else :class:`SettingError` naming them.

    Examples
    --------
    >>> check_choice("kind", "dask", ["serial", "process", "dask"])
    'dask'
    """
    if value not in options:
        shown = ", ".join(str(o) for o in options)
        msg = f"{value!r} is not one of {shown}{did_you_mean(value, options)}"
        raise SettingError(key, msg)
    return value


def check_range(
    key: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    *,
    integer: bool = False,
) -> float | int:
    """``value`` when it is a number (an integer if ``integer``) in ``[low, high]``.

    Raises
    ------
    SettingError
        Not a number (booleans are not numbers here), NaN, or outside the range.

    Examples
    --------
    >>> check_range("workers", 4, 1, integer=True)
    4
    """
    kind = "an integer" if integer else "a number"
    bounds = (
        f" from {low} to {high}" if low is not None and high is not None
        else f" >= {low}" if low is not None
        else f" <= {high}" if high is not None
        else ""
    )
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type or math.isnan(float(value)):  # type: ignore[arg-type]
        raise SettingError(key, f"expected {kind}{bounds}, got {value!r}")
    number = float(value)  # type: ignore[arg-type]
    if (low is not None and number < low) or (high is not None and number > high):
        raise SettingError(key, f"expected {kind}{bounds}, got {value!r}")
    return value  # type: ignore[return-value]


def check_known_keys(section: str, keys: Iterable[object], known: Sequence[str]) -> None:
    """:class:`SettingError` for the first key of ``keys`` not in ``known`` (with a close match).

    Examples
    --------
    >>> check_known_keys("executor", ["kind"], ["kind", "workers"])
    """
    for k in keys:
        if k not in known:
            where = f"{section}.{k}" if section else str(k)
            problem = f"unknown key{did_you_mean(k, known)}; allowed: " + ", ".join(known)
            raise SettingError(where, problem)


def check_settings_mapping(
    mapping: object, known: Sequence[str], *, section: str, prefix: str = ""
) -> None:
    """Refuse a settings section that is not a mapping or holds an unknown key.

    Raises
    ------
    SettingError
        Key ``section`` (``expected a mapping ...``), or key ``<prefix>.<key>`` (or ``<key>``
        without a prefix) with ``unknown key (did you mean ...?); allowed: ...``.

    Examples
    --------
    >>> check_settings_mapping({"erode": 1}, ["erode_mm"], section="dixon", prefix="dixon")
    Traceback (most recent call last):
    ...
    helpers.validate.SettingError: dixon.erode: unknown key (did you mean 'erode_mm'?); allowed: erode_mm
    """
    if not isinstance(mapping, Mapping):
        problem = f"expected a mapping of settings, got {type(mapping).__name__}"
        raise SettingError(section, problem)
    check_known_keys(prefix, mapping, known)
