"""DICOM ingest: axial T2 series to pseudonymized NIfTI, with no patient identity in the output.

``esma ingest DICOM_DIR --out DIR`` (and :func:`ingest`) walks ``DICOM_DIR`` recursively, groups
the DICOM images by patient, study and series, picks the axial T2-weighted series, and writes each
one as ``DIR/<pseudonym>_T2w.nii.gz`` with its geometry rebuilt from the DICOM position tags.

Finding the axial T2 series (all thresholds in :class:`IngestRules`, configurable)
----------------------------------------------------------------------------------
*Axial*: the slice normal (row direction x column direction of ImageOrientationPatient) lies
within ``max_axial_angle_deg`` (default 30 degrees, room for disc-parallel angulation) of the
patient's head-foot axis.  Anything else (sagittal, coronal, steeply oblique) is skipped with
the reason ``non_axial``.

*T2-weighted*: the upper-cased text of SeriesDescription, ProtocolName and SequenceName is
searched.

1. If it names another contrast (``not_t2_pattern``: T1, PD, FLAIR, DWI/DTI/ADC/TRACE, Dixon,
   scouts/localizers/surveys, T2* and T2 maps) the series is not T2.
2. Else if it names T2 (``t2_pattern``: ``T2``, ``T2W``, ``sT2W``, ``T2_TSE``..., not ``T2*``)
   the series is T2, unless an EchoTime outside ``echo_time_ms`` contradicts the name.
3. Else (the text is silent) the timing decides: EchoTime within ``echo_time_ms`` (default
   60-250 ms) and RepetitionTime at least ``min_repetition_time_ms`` (default 1500 ms).

Series that are not axial T2 are listed in ``ingest.csv`` with status ``skipped`` and the reason.

What is detected, refused or accepted
-------------------------------------
Each finding is a code in the ``issues`` column of ``ingest.csv`` and a log line.  A *refused*
axial T2 series is not written (status ``refused``); an *accepted* finding is written and noted.

==================  ====================================================  ======================
code                detected from                                         policy
==================  ====================================================  ======================
non_axial           slice normal > ``max_axial_angle_deg`` from z         skipped
not_t2              the T2 rule above                                     skipped
fat_suppressed      FS / FATSAT / FAT SAT / SPAIR / SPIR / STIR / CHESS   refused; accepted
                    in the description texts, ``FS`` in ScanOptions, or   with ``allow_fat_
                    an inversion-recovery sequence with TI < 300 ms       suppressed``
windowed            8-bit data (BitsStored <= 8), Secondary Capture SOP   refused; accepted
                    class or ImageType SECONDARY (a rendered export),     with ``allow_
                    MONOCHROME1 (inverted grey scale), or saturation:     windowed``
                    more than ``saturation_fraction`` (0.5 %, and at
                    least 20) of the non-background voxels at the series
                    maximum (values clipped at the top of a display
                    window)
missing_slices      a gap between neighbouring slice positions >          refused
                    ``gap_factor`` (1.5) x the median spacing
mixed_spacing       any spacing differing from the median by more than    refused
                    ``spacing_tolerance`` (5 %) without being a gap
duplicate_slices    two slices at the same position (repeats, echoes)     refused
mixed_geometry      slices of one series with different orientation,      refused
                    pixel spacing or matrix (e.g. per-disc angled blocks)
unreadable          pixel data that cannot be decoded (compressed         refused
                    transfer syntax without a decoder, truncated file)
rescaled            RescaleSlope != 1 or RescaleIntercept != 0 (applied,  accepted
                    per slice, through pydicom's modality LUT)
burned_in           BurnedInAnnotation YES (text burned into the pixels,  refused; accepted
                    which can show the patient's name)                    with ``allow_burned_
                                                                          in``
header              a header that cannot be parsed (a value of the        refused (the other
                    wrong type); the value itself is never repeated       series go on)
oblique             axial but tilted more than 1 degree                  accepted
single_slice        one slice: slice spacing from SpacingBetweenSlices    accepted
                    or SliceThickness (no positions to measure it from)
==================  ====================================================  ======================

A regular NIfTI grid cannot hold missing slices or uneven spacing without inventing data, so
those are refused rather than resampled: re-export the complete series.  WindowCenter/WindowWidth
alone is not a finding: every MR image carries a display window, which does not change the
stored values.

Geometry
--------
DICOM patient coordinates are LPS (+x the patient's left, +y posterior).  Slices are sorted by
their position along the slice normal (ImagePositionPatient . normal), never by InstanceNumber;
the slice step is measured from the positions (first to last, divided by n - 1), never taken
from SliceThickness; the in-plane axes come from ImageOrientationPatient and PixelSpacing.  The
NIfTI array axis 0 runs along the DICOM row direction (column index), axis 1 along the column
direction (row index), axis 2 along increasing position on the normal.  The LPS affine is turned
into nibabel's RAS+ by negating its x and y rows; the image is written with qform = sform = that
affine (code 1, scanner).  Stored values go through RescaleSlope/RescaleIntercept; the output is
int16 when the rescaled values are integers in range, float32 otherwise.

Pseudonyms and the key
----------------------
The subject ID is ``"sub-"`` + the first 10 hex digits of HMAC-SHA256(PatientID, secret).  The
same patient gets the same pseudonym in every run and every later export that uses the same
secret, without the tool having to remember anything; a keyed hash (unlike a plain hash of a
short PatientID) cannot be reversed by trying IDs without the secret.  The secret is 32 random
bytes (hex) in a secret file created on first use next to the key (``<key>.secret``, mode 600),
or taken from the environment variable ``ESMA_PSEUDONYM_SECRET``.  Two patients mapping to the
same pseudonym (40 bits: about 5e-7 for 1000 patients) stop the run with an error.

The key (CSV: pseudonym, image, patient_id, study_instance_uid, series_instance_uid, study_date,
series_number) is written, mode 600, to ``--key`` or by default to
``OUT/../esma_pseudonym_key.csv``; a key or secret path inside the output folder is refused.
Rows of earlier runs are kept (a series ingested again replaces its own row).

Several T2 series of one patient (several studies, or repeats) are ordered by study date and
time, then series number, then series UID; the first *written* one is
``<pseudonym>_T2w.nii.gz`` and the next ones ``<pseudonym>_run-2_T2w.nii.gz``, ``_run-3_`` ...
(BIDS style; downstream a run is its own subject ID, ``sub-xxx_run-2``).

Ingesting again
---------------
:func:`ingest_once` (what ``esma run`` does for a study with an ``ingest:`` section, and
``esma ingest --study``) skips the work when the last ingest into the same folder is complete
and was made from the same DICOM files with the same rules, key and secret: ``ingest.csv`` and
every image it lists carry completion markers (:func:`helpers.files.mark_done`) whose settings
hold a digest of the DICOM folder's file list (relative path, size and modification time of
every file; the digest only, no name), the rules and digests of the key and secret paths; the
key must still map every written pseudonym back through the secret.  ``ingest.json`` keeps the
counts of that ingest.

What never leaves the key
-------------------------
PatientName, PatientID, PatientBirthDate, AccessionNumber, InstitutionName, StudyDate (dates are
identifying), UIDs and the free-text series description appear in no NIfTI header (descrip,
aux_file, intent_name, db_name stay empty; no extensions), no CSV but the key, and no log line.
``ingest.csv`` holds the pseudonym, the image name, counts, spacings, orientation codes, echo
and repetition times and the issue codes with their measured values.  The log names series by
pseudonym and index; input paths of skipped non-DICOM files are logged at debug level only
(relative to DICOM_DIR), since folder names of an export may carry names.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import logging
import math
import os
import re
import secrets
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
from numpy.typing import NDArray
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut

from helpers.errors import ConfigError, InputFileError, OutputError
from helpers.files import atomic_path, atomic_write_text, is_done, mark_done

__all__ = [
    "DEFAULT_KEY_NAME",
    "INGEST_COLUMNS",
    "KEY_COLUMNS",
    "SECRET_ENV",
    "IngestResult",
    "IngestRules",
    "SeriesGeometry",
    "classify_t2",
    "detect_fat_suppression",
    "detect_windowing",
    "dicom_fingerprint",
    "ingest",
    "ingest_once",
    "pseudonym",
    "rules_summary",
    "series_geometry",
]

log = logging.getLogger(__name__)

#: Default key file name, written next to (never inside) the output folder.
DEFAULT_KEY_NAME = "esma_pseudonym_key.csv"
#: Environment variable that, when set, holds the pseudonym secret instead of a secret file.
SECRET_ENV = "ESMA_PSEUDONYM_SECRET"
#: Columns of ``ingest.csv`` (no identity in any of them).
INGEST_COLUMNS = (
    "subject",
    "image",
    "series",
    "run",
    "status",
    "n_slices",
    "shape",
    "spacing_mm",
    "orientation",
    "echo_time_ms",
    "repetition_time_ms",
    "issues",
    "contrast",  # what the header says the series is (issue 18): T2w for every series written
)
#: Counts of the last ingest into a folder (no identity), read back by :func:`ingest_once`.
SUMMARY_NAME = "ingest.json"
#: Which key and secret made an output folder (a keyed check value and a path digest only).
ORIGIN_NAME = "ingest_origin.json"
#: How long an ingest waits for another one holding the same key (s).
KEY_LOCK_WAIT_S = 300.0
#: Columns of the pseudonym key file (identity: keep it private).
KEY_COLUMNS = (
    "pseudonym",
    "image",
    "patient_id",
    "study_instance_uid",
    "series_instance_uid",
    "study_date",
    "series_number",
)

_SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: Two slices closer than this along the normal count as one position (mm).
_SAME_POSITION_MM = 1e-2
#: Fewer voxels than this at the maximum never count as saturation (tiny volumes, chance ties).
_MIN_SATURATED_VOXELS = 20
#: Tilt from the exact axial plane above which a series is noted ``oblique`` (degrees).
_OBLIQUE_NOTE_DEG = 1.0


# ------------------------------------------------------------------------------------ rules
@dataclass(frozen=True)
class IngestRules:
    """Configurable rules of :func:`ingest` (see the module docstring for the policy table).

    Attributes
    ----------
    t2_pattern : str
        Regular expression (on upper-cased SeriesDescription, ProtocolName, SequenceName) that
        names a T2-weighted series.
    not_t2_pattern : str
        Regular expression naming another contrast; wins over ``t2_pattern``.
    fat_suppression_pattern : str
        Regular expression naming fat suppression in the texts or in ScanOptions.
    echo_time_ms : tuple of float
        EchoTime range (ms) of T2 weighting.
    min_repetition_time_ms : float
        Shortest RepetitionTime (ms) of T2 weighting, used when the texts are silent.
    max_stir_inversion_ms : float
        An inversion-recovery sequence with InversionTime below this (ms) is STIR (fat
        suppressed).
    max_axial_angle_deg : float
        Largest angle (degrees) between the slice normal and the head-foot axis of an axial
        series.
    gap_factor : float
        A spacing larger than this times the median spacing is a missing slice.
    spacing_tolerance : float
        Largest relative deviation of a spacing from the median (fraction) still regular.
    saturation_fraction : float
        Largest fraction of non-background voxels at the series maximum before the data count as
        clipped (windowed).
    allow_fat_suppressed : bool
        Write fat-suppressed series (noted) instead of refusing them.
    allow_windowed : bool
        Write windowed / 8-bit / saturated series (noted) instead of refusing them.
    allow_burned_in : bool
        Write series flagged ``BurnedInAnnotation = YES`` (noted) instead of refusing them.
    """

    t2_pattern: str = r"(?<![0-9])T2(?![0-9*]|\s*_?STAR|\s*_?MAP)"
    not_t2_pattern: str = (
        r"(?<![A-Z0-9])(T1|PD|PROTON|FLAIR|DWI|DTI|ADC|TRACE|DIFFUSION|DIXON|SCOUT|"
        r"LOCALI[SZ]ER|SURVEY|MYELO)(W|WI)?(?![A-Z0-9])|T2\s*\*|T2\s*_?STAR|T2\s*_?MAP"
    )
    fat_suppression_pattern: str = (
        r"(?<![A-Z])(FS|FATSAT|FAT[ _-]SAT|FAT[ _-]?SUP\w*|SPAIR|SPIR|STIR|CHESS)(?![A-Z])"
    )
    echo_time_ms: tuple[float, float] = (60.0, 250.0)
    min_repetition_time_ms: float = 1500.0
    max_stir_inversion_ms: float = 300.0
    max_axial_angle_deg: float = 30.0
    gap_factor: float = 1.5
    spacing_tolerance: float = 0.05
    saturation_fraction: float = 0.005
    allow_fat_suppressed: bool = False
    allow_windowed: bool = False
    allow_burned_in: bool = False

    def __post_init__(self) -> None:
        for name in ("t2_pattern", "not_t2_pattern", "fat_suppression_pattern"):
            try:
                re.compile(getattr(self, name))
            except re.error as exc:
                msg = f"ingest.{name}: not a valid regular expression ({exc})"
                raise ConfigError(msg) from exc
        low, high = self.echo_time_ms
        if not 0 <= low < high:
            msg = f"ingest.echo_time_ms: need 0 <= low < high, got {self.echo_time_ms}"
            raise ConfigError(msg)
        if not 0 < self.max_axial_angle_deg <= 90:
            msg = f"ingest.max_axial_angle_deg: must be in (0, 90], got {self.max_axial_angle_deg}"
            raise ConfigError(msg)
        if self.gap_factor <= 1:
            msg = f"ingest.gap_factor: must be > 1, got {self.gap_factor}"
            raise ConfigError(msg)
        if not 0 <= self.spacing_tolerance < self.gap_factor - 1:
            msg = (
                f"ingest.spacing_tolerance: must be in [0, gap_factor - 1), "
                f"got {self.spacing_tolerance}"
            )
            raise ConfigError(msg)
        if not 0 < self.saturation_fraction < 1:
            msg = f"ingest.saturation_fraction: must be in (0, 1), got {self.saturation_fraction}"
            raise ConfigError(msg)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> IngestRules:
        """Rules from a mapping (the ``ingest:`` block of a study YAML); unknown keys are errors.

        Raises
        ------
        ConfigError
            Naming the unknown key or the invalid value.
        """
        known = {f.name for f in fields(cls)}
        values = dict(mapping or {})
        unknown = sorted(set(values) - known)
        if unknown:
            msg = f"ingest: unknown key(s) {unknown}; allowed: {sorted(known)}"
            raise ConfigError(msg)
        if "echo_time_ms" in values:
            te = values["echo_time_ms"]
            if not (isinstance(te, Sequence) and len(te) == 2):
                msg = f"ingest.echo_time_ms: expected [low, high] in ms, got {te!r}"
                raise ConfigError(msg)
            values["echo_time_ms"] = (float(te[0]), float(te[1]))
        return replace(cls(), **values)


# -------------------------------------------------------------------------- per-file headers
@dataclass(frozen=True)
class _SliceHeader:
    """What ingest needs from one DICOM image file (read without pixel data)."""

    path: Path
    patient_id: str
    study_uid: str
    series_uid: str
    study_date: str
    study_time: str
    series_number: int | None
    text: str
    scan_options: str
    echo_time_ms: float | None
    repetition_time_ms: float | None
    inversion_time_ms: float | None
    scanning_sequence: str
    echo_number: str
    orientation: tuple[float, ...] | None
    position: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    rows: int
    columns: int
    slice_thickness: float | None
    spacing_between_slices: float | None
    number_of_frames: int
    windowed_reasons: tuple[str, ...]
    #: (tag, upper-cased text) of SeriesDescription, ProtocolName, SequenceName: findings name
    #: the tag, never the text (free text can carry a name).
    texts: tuple[tuple[str, str], ...] = ()
    burned_in: bool = False


#: Free-text tags searched for contrast and fat-suppression keywords.
_TEXT_TAGS = ("SeriesDescription", "ProtocolName", "SequenceName")
#: PhotometricInterpretation values that may be repeated in a finding (defined terms only).
_PHOTOMETRIC_TERMS = frozenset(
    {
        "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "HSV", "ARGB", "CMYK",
        "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT",
    }
)  # fmt: skip


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


def _float(ds: pydicom.Dataset, keyword: str) -> float | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        if not value:
            return None
        value = value[0]
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _floats(ds: pydicom.Dataset, keyword: str, n: int) -> tuple[float, ...] | None:
    value = ds.get(keyword)
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        return None
    return out


def _header_windowing(ds: pydicom.Dataset) -> tuple[str, ...]:
    """Windowing findings visible in the header (the saturation check needs the pixels)."""
    reasons = []
    bits = _float(ds, "BitsStored")
    if bits is not None and bits <= 8:
        reasons.append(f"{int(bits)}-bit data")
    sop_class = str(ds.get("SOPClassUID", ""))
    image_type = _text(ds, "ImageType").upper()
    if sop_class.startswith(_SECONDARY_CAPTURE_PREFIX) or "SECONDARY" in image_type.split("\\"):
        reasons.append("secondary capture (rendered export)")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "MONOCHROME1":
        reasons.append("MONOCHROME1 (inverted grey scale)")
    elif photometric in _PHOTOMETRIC_TERMS and photometric != "MONOCHROME2":
        reasons.append(f"{photometric} colour data")
    elif photometric != "MONOCHROME2":
        reasons.append("PhotometricInterpretation not a defined grey-scale term")
    return tuple(reasons)


def _read_header(path: Path) -> _SliceHeader | str:
    """Header of one file, or a string saying why it is not a usable DICOM image.

    Never raises on a damaged or malformed file, and the string never repeats a header value
    (a malformed value can hold the patient's name): only the exception type.
    """
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        return "not DICOM"
    except Exception as exc:  # noqa: BLE001  (pydicom raises many types on damaged files)
        return f"unreadable DICOM ({type(exc).__name__})"
    try:
        return _parse_header(path, ds)
    except Exception as exc:  # noqa: BLE001  (a malformed value raises anything on access)
        return f"malformed DICOM header ({type(exc).__name__})"


def _parse_header(path: Path, ds: pydicom.Dataset) -> _SliceHeader | str:
    sop_class = str(ds.get("SOPClassUID", ds.file_meta.get("MediaStorageSOPClassUID", "")))
    if sop_class == _DICOMDIR_SOP_CLASS:
        return "DICOMDIR index"
    if "Rows" not in ds or "SeriesInstanceUID" not in ds:
        return "DICOM without an image (report, presentation state, ...)"
    number = ds.get("SeriesNumber")
    try:
        series_number = int(number) if number not in (None, "") else None
    except (TypeError, ValueError):
        series_number = None
    texts = tuple((k, _text(ds, k).upper()) for k in _TEXT_TAGS)
    text = " ".join(t for _, t in texts)
    spacing = _floats(ds, "PixelSpacing", 2)
    return _SliceHeader(
        path=path,
        patient_id=_text(ds, "PatientID").strip(),
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        study_date=_text(ds, "StudyDate"),
        study_time=_text(ds, "StudyTime"),
        series_number=series_number,
        text=text.upper(),
        scan_options=_text(ds, "ScanOptions").upper(),
        echo_time_ms=_float(ds, "EchoTime"),
        repetition_time_ms=_float(ds, "RepetitionTime"),
        inversion_time_ms=_float(ds, "InversionTime"),
        scanning_sequence=_text(ds, "ScanningSequence").upper(),
        echo_number=_text(ds, "EchoNumbers"),
        orientation=_floats(ds, "ImageOrientationPatient", 6),
        position=_floats(ds, "ImagePositionPatient", 3),
        pixel_spacing=(spacing[0], spacing[1]) if spacing else None,
        rows=int(_float(ds, "Rows") or 0),
        columns=int(_float(ds, "Columns") or 0),
        slice_thickness=_float(ds, "SliceThickness"),
        spacing_between_slices=_float(ds, "SpacingBetweenSlices"),
        number_of_frames=int(_float(ds, "NumberOfFrames") or 1),
        windowed_reasons=_header_windowing(ds),
        texts=texts,
        burned_in=_text(ds, "BurnedInAnnotation").strip().upper() == "YES",
    )


# ------------------------------------------------------------------------ pure classification
def classify_t2(
    text: str | Sequence[tuple[str, str]],
    echo_time_ms: float | None,
    repetition_time_ms: float | None,
    rules: IngestRules | None = None,
) -> tuple[bool, str]:
    """Decide whether a series is T2-weighted (the rule in the module docstring).

    Parameters
    ----------
    text : str or sequence of (str, str)
        SeriesDescription, ProtocolName and SequenceName joined (any case), or ``(tag, text)``
        pairs so that a finding can name the tag.
    echo_time_ms, repetition_time_ms : float or None
        EchoTime and RepetitionTime (ms), None when absent.
    rules : IngestRules, optional

    Returns
    -------
    is_t2 : bool
    reason : str
        Why, in words (no DICOM free text is repeated).

    Examples
    --------
    >>> classify_t2("t2_tse_tra", 96.0, 3500.0)
    (True, 'named T2')
    >>> classify_t2([("SeriesDescription", "T1_DOE_JANE")], 12.0, 600.0)
    (False, 'named another contrast in SeriesDescription (rule not_t2_pattern)')
    >>> classify_t2("t1_tse_tra", 12.0, 600.0)[0]
    False
    >>> classify_t2("AX 5 MM", 100.0, 4000.0)
    (True, 'T2 timing (TE 100 ms, TR 4000 ms)')
    """
    rules = rules or IngestRules()
    pairs = _text_pairs(text)
    low, high = rules.echo_time_ms
    other = _search_tags(rules.not_t2_pattern, pairs)
    if other:
        return False, f"named another contrast in {other} (rule not_t2_pattern)"
    if _search_tags(rules.t2_pattern, pairs):
        if echo_time_ms is not None and not low <= echo_time_ms <= high:
            return False, f"named T2 but echo time {echo_time_ms:g} ms is outside {low:g}-{high:g}"
        return True, "named T2"
    if echo_time_ms is None or repetition_time_ms is None:
        return False, "no T2 in the series name and no echo/repetition time"
    if low <= echo_time_ms <= high and repetition_time_ms >= rules.min_repetition_time_ms:
        return True, f"T2 timing (TE {echo_time_ms:g} ms, TR {repetition_time_ms:g} ms)"
    return False, f"timing not T2 (TE {echo_time_ms:g} ms, TR {repetition_time_ms:g} ms)"


def _text_pairs(text: str | Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    if isinstance(text, str):
        return [("the series name", text.upper())]
    return [(tag, value.upper()) for tag, value in text]


def _search_tags(pattern: str, pairs: Sequence[tuple[str, str]]) -> str | None:
    """The first tag whose text matches ``pattern`` (its name, never its text), or None."""
    for tag, value in pairs:
        if re.search(pattern, value):
            return tag
    return None


def detect_fat_suppression(
    text: str | Sequence[tuple[str, str]],
    scan_options: str = "",
    scanning_sequence: str = "",
    inversion_time_ms: float | None = None,
    rules: IngestRules | None = None,
) -> str | None:
    """Say why a series is fat-suppressed, or None.

    The reason names the tag and the rule, never the text that matched: a keyword glued to a
    name (``T2_FATSUP_DOE_JANE``) must not reach any output.

    Parameters
    ----------
    text : str or sequence of (str, str)
        The description texts joined, or ``(tag, text)`` pairs (the reason then names the tag).
    scan_options, scanning_sequence : str
        ScanOptions and ScanningSequence (backslash-separated values).
    inversion_time_ms : float or None
    rules : IngestRules, optional

    Examples
    --------
    >>> detect_fat_suppression("T2_TSE_TRA_FS")
    'fat-suppression keyword in the series name (rule fat_suppression_pattern)'
    >>> detect_fat_suppression([("SeriesDescription", "T2_FATSUP_DOE_JANE")])
    'fat-suppression keyword in SeriesDescription (rule fat_suppression_pattern)'
    >>> detect_fat_suppression("AX T2 FRFSE", scan_options="FS\\\\PFP")
    'fat-suppression option in ScanOptions (rule fat_suppression_pattern)'
    >>> detect_fat_suppression("T2 TSE") is None
    True
    """
    rules = rules or IngestRules()
    tag = _search_tags(rules.fat_suppression_pattern, _text_pairs(text))
    if tag:
        return f"fat-suppression keyword in {tag} (rule fat_suppression_pattern)"
    options = [o.strip() for o in re.split(r"[\\/,\s]+", scan_options.upper()) if o.strip()]
    for option in options:
        if option == "FS" or re.search(rules.fat_suppression_pattern, option):
            return "fat-suppression option in ScanOptions (rule fat_suppression_pattern)"
    if (
        "IR" in re.split(r"[\\/,\s]+", scanning_sequence.upper())
        and inversion_time_ms is not None
        and inversion_time_ms < rules.max_stir_inversion_ms
    ):
        return f"inversion recovery with TI {inversion_time_ms:g} ms (STIR)"
    return None


def detect_windowing(
    values: NDArray, header_reasons: Iterable[str] = (), rules: IngestRules | None = None
) -> list[str]:
    """Reasons to think a series' intensities were windowed, clipped or rendered.

    Parameters
    ----------
    values : ndarray
        The rescaled voxel values of the whole series.
    header_reasons : iterable of str
        Findings from the headers (8-bit, secondary capture, MONOCHROME1).
    rules : IngestRules, optional

    Returns
    -------
    list of str
        Empty when nothing suggests windowing.  Saturation: more than
        ``rules.saturation_fraction`` of the voxels above the minimum (background), and at least
        20 voxels, equal the maximum, which an unclipped MR magnitude image never shows.

    Examples
    --------
    >>> detect_windowing(np.arange(1000.0))
    []
    >>> detect_windowing(np.minimum(np.arange(1000.0), 900.0))
    ['saturated: 10.0 % of voxels at the maximum 900']
    """
    rules = rules or IngestRules()
    reasons = list(dict.fromkeys(header_reasons))
    arr = np.asarray(values)
    if arr.size:
        top, bottom = float(arr.max()), float(arr.min())
        foreground = int(np.count_nonzero(arr > bottom))
        at_top = int(np.count_nonzero(arr == top))
        if (
            top > bottom
            and at_top >= _MIN_SATURATED_VOXELS
            and at_top / foreground > rules.saturation_fraction
        ):
            reasons.append(
                f"saturated: {100 * at_top / foreground:.1f} % of voxels at the maximum {top:g}"
            )
    return reasons


def pseudonym(patient_id: str, secret: bytes) -> str:
    """Pseudonymous subject ID: ``sub-`` + 10 hex digits of HMAC-SHA256(patient_id, secret).

    Examples
    --------
    >>> pseudonym("PID-1", b"k")
    'sub-2512e9ec37'
    """
    digest = hmac.new(secret, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()
    return f"sub-{digest[:10]}"


# -------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class SeriesGeometry:
    """Geometry of one series rebuilt from its slice headers.

    Attributes
    ----------
    order : list of int
        Indices of the input slices, sorted by position along the slice normal.
    affine_ras : ndarray, shape (4, 4)
        Voxel index (column, row, slice) to RAS+ world (mm).
    spacing_mm : tuple of float
        Voxel size (mm): column step, row step, slice step.
    tilt_deg : float
        Angle between the slice normal and the head-foot axis (degrees).
    issues : list of (str, str)
        ``(code, detail)`` findings: missing_slices, mixed_spacing, duplicate_slices,
        single_slice.
    """

    order: list[int]
    affine_ras: NDArray[np.float64]
    spacing_mm: tuple[float, float, float]
    tilt_deg: float
    issues: list[tuple[str, str]] = field(default_factory=list)


def series_geometry(
    orientation: Sequence[float],
    positions: Sequence[Sequence[float]],
    pixel_spacing: Sequence[float],
    slice_thickness_mm: float | None = None,
    rules: IngestRules | None = None,
) -> SeriesGeometry:
    """Sort slices and build the RAS+ affine from DICOM orientation, positions and spacing.

    Parameters
    ----------
    orientation : 6 floats
        ImageOrientationPatient (LPS): row direction, then column direction.
    positions : sequence of 3 floats per slice
        ImagePositionPatient (LPS, mm) of each slice, in any order.
    pixel_spacing : 2 floats
        PixelSpacing (mm): distance between rows, then between columns.
    slice_thickness_mm : float, optional
        Used as the slice step only for a single slice.
    rules : IngestRules, optional

    Returns
    -------
    SeriesGeometry

    Examples
    --------
    >>> g = series_geometry([1, 0, 0, 0, 1, 0], [[0, 0, 8], [0, 0, 0], [0, 0, 4]], [0.5, 0.5])
    >>> g.order, g.spacing_mm
    ([1, 2, 0], (0.5, 0.5, 4.0))
    >>> g.affine_ras[:3, 0].tolist()  # columns run to the patient's left: -x in RAS
    [-0.5, 0.0, 0.0]
    """
    rules = rules or IngestRules()
    iop = np.asarray(orientation, dtype=np.float64)
    row_dir = iop[:3] / np.linalg.norm(iop[:3])
    col_dir = iop[3:] / np.linalg.norm(iop[3:])
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    along = pos @ normal
    order = [int(i) for i in np.argsort(along, kind="stable")]
    pos, along = pos[order], along[order]
    issues: list[tuple[str, str]] = []
    if len(pos) > 1:
        gaps = np.diff(along)
        median = float(np.median(gaps))
        n_dup = int(np.count_nonzero(gaps < _SAME_POSITION_MM))
        if n_dup:
            issues.append(("duplicate_slices", f"{n_dup} slice(s) repeat a position"))
            median = float(np.median(gaps[gaps >= _SAME_POSITION_MM])) if n_dup < len(gaps) else 0
        if median > 0:
            big = np.flatnonzero(gaps > rules.gap_factor * median)
            if big.size:
                where = ", ".join(f"{gaps[i]:.2f} mm after slice {i + 1}" for i in big[:3])
                issues.append(("missing_slices", f"gap {where} (median spacing {median:.2f} mm)"))
            regular = gaps[(gaps >= _SAME_POSITION_MM) & (gaps <= rules.gap_factor * median)]
            deviation = float(np.max(np.abs(regular - median))) if regular.size else 0.0
            if deviation > rules.spacing_tolerance * median:
                detail = (
                    f"slice spacing {regular.min():.2f}-{regular.max():.2f} mm "
                    f"(median {median:.2f} mm)"
                )
                issues.append(("mixed_spacing", detail))
        step = (pos[-1] - pos[0]) / (len(pos) - 1)
    else:
        thickness = slice_thickness_mm if slice_thickness_mm and slice_thickness_mm > 0 else 1.0
        issues.append(("single_slice", f"slice spacing {thickness:g} mm from the header"))
        step = normal * thickness
    row_spacing, col_spacing = float(pixel_spacing[0]), float(pixel_spacing[1])
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing
    lps[:3, 1] = col_dir * row_spacing
    lps[:3, 2] = step
    lps[:3, 3] = pos[0]
    tilt = float(np.degrees(np.arccos(min(1.0, abs(float(normal[2]))))))
    return SeriesGeometry(
        order=order,
        affine_ras=_LPS_TO_RAS @ lps,
        spacing_mm=(col_spacing, row_spacing, float(np.linalg.norm(step))),
        tilt_deg=tilt,
        issues=issues,
    )


# --------------------------------------------------------------------------------- results
@dataclass
class IngestResult:
    """What :func:`ingest` did.

    Attributes
    ----------
    table : DataFrame
        The content of ``ingest.csv`` (columns :data:`INGEST_COLUMNS`), one row a series.
    images : list of Path
        NIfTI files written.
    key_path : Path
        The pseudonym key (private).
    n_files : int
        Files looked at under DICOM_DIR.
    skipped_files : int
        Files that were not DICOM images (notes in the log).
    patients_without_image : int
        Patients for whom no series was written.
    reused : bool
        True when :func:`ingest_once` found the same ingest already done and wrote nothing.
    seconds : float
        Wall time (s) of :func:`ingest_once` (0 from :func:`ingest`).
    """

    table: pd.DataFrame
    images: list[Path]
    key_path: Path
    n_files: int
    skipped_files: int
    patients_without_image: int
    reused: bool = False
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        """True when a series was refused or a patient got no image."""
        refused = bool((self.table["status"] == "refused").any()) if len(self.table) else False
        return refused or self.patients_without_image > 0


# ---------------------------------------------------------------------------------- ingest
def ingest(
    dicom_dir: str | Path,
    out_dir: str | Path,
    *,
    key_path: str | Path | None = None,
    secret_path: str | Path | None = None,
    rules: IngestRules | None = None,
) -> IngestResult:
    """Convert the axial T2 series under ``dicom_dir`` to pseudonymized NIfTI in ``out_dir``.

    Parameters
    ----------
    dicom_dir : path
        Folder searched recursively for DICOM files (other files are skipped with a note).
    out_dir : path
        Output folder: ``<pseudonym>[_run-N]_T2w.nii.gz`` files and ``ingest.csv``.
    key_path : path, optional
        Pseudonym key CSV (default ``out_dir/../esma_pseudonym_key.csv``); never inside
        ``out_dir``.
    secret_path : path, optional
        Secret of the keyed hash (default: the key path with suffix ``.secret``), created on
        first use; ignored when the environment variable ``ESMA_PSEUDONYM_SECRET`` is set.
    rules : IngestRules, optional
        Detection thresholds and policies.

    Returns
    -------
    IngestResult

    Raises
    ------
    InputFileError
        ``dicom_dir`` is missing or holds no DICOM image.
    ConfigError
        The key or secret path lies inside ``out_dir``; two patients share a pseudonym.
    OutputError
        An output cannot be written.
    """
    rules = rules or IngestRules()
    dicom_dir, out_dir = Path(dicom_dir), Path(out_dir)
    if not dicom_dir.is_dir():
        raise InputFileError(dicom_dir, "DICOM folder not found")
    key_path = Path(key_path) if key_path else out_dir.parent / DEFAULT_KEY_NAME
    secret_path = Path(secret_path) if secret_path else key_path.with_suffix(".secret")
    for what, path in (("key", key_path), ("secret", secret_path)):
        if _is_inside(path, out_dir):
            msg = (
                f"{path}: the pseudonym {what} file must not be inside the output folder "
                f"{out_dir} (outputs feed reports); choose another path with --key"
            )
            raise ConfigError(msg)

    headers, n_files, skipped = _scan(dicom_dir)
    if not headers:
        msg = f"no DICOM image files found ({n_files} files looked at, {skipped} skipped)"
        raise InputFileError(dicom_dir, msg)
    with _key_lock(key_path):
        secret = _load_secret(secret_path, key_path)
    _check_origin(out_dir, key_path, secret)

    by_patient: dict[str, dict[tuple[str, str], list[_SliceHeader]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for h in headers:
        identity = h.patient_id or f"no-patient-id:{h.study_uid}"
        by_patient[identity][(h.study_uid, h.series_uid)].append(h)

    rows: list[dict[str, Any]] = []
    key_rows: list[dict[str, Any]] = []
    images: list[Path] = []
    seen: dict[str, str] = {}
    without_image = 0
    for identity in sorted(by_patient):
        subject = pseudonym(identity, secret)
        if subject in seen and seen[subject] != identity:
            msg = f"two patients map to pseudonym {subject}; use another secret"
            raise ConfigError(msg)
        seen[subject] = identity
        series_list = sorted(by_patient[identity].values(), key=_series_sort_key)
        log.info("%s: %d series", subject, len(series_list))
        run = 0
        for index, series in enumerate(series_list, start=1):
            row = _ingest_series_safely(series, subject, index, run + 1, out_dir, rules)
            rows.append(row)
            if row["status"] == "written":
                run += 1
                images.append(out_dir / row["image"])
                first = series[0]
                key_rows.append(
                    {
                        "pseudonym": subject,
                        "image": row["image"],
                        "patient_id": first.patient_id,
                        "study_instance_uid": first.study_uid,
                        "series_instance_uid": first.series_uid,
                        "study_date": first.study_date,
                        "series_number": "" if first.series_number is None else first.series_number,
                    }
                )
        if run == 0:
            without_image += 1
            log.warning("%s: no axial T2 series written", subject)

    table = pd.DataFrame(rows, columns=list(INGEST_COLUMNS))
    atomic_write_text(out_dir / "ingest.csv", table.to_csv(index=False))
    _write_origin(out_dir, key_path, secret)
    with _key_lock(key_path):  # read, merge and write the key as one step
        _write_key(key_path, key_rows)
    log.info(
        "ingest: %d series from %d patients, %d written, %d refused, %d skipped; key in %s",
        len(table),
        len(by_patient),
        int((table["status"] == "written").sum()),
        int((table["status"] == "refused").sum()),
        int((table["status"] == "skipped").sum()),
        key_path,
    )
    return IngestResult(table, images, key_path, n_files, skipped, without_image)


def dicom_fingerprint(dicom_dir: str | Path) -> tuple[str, int]:
    """Digest of a folder's file list: relative path, size and mtime of every file (cheap).

    Returns
    -------
    digest : str
        Hex sha256 (the names themselves are never stored: export folders can carry names).
    n_files : int
        Files under the folder.
    """
    dicom_dir = Path(dicom_dir)
    digest = hashlib.sha256()
    n = 0
    for root, dirs, files in os.walk(dicom_dir):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            try:
                st = path.stat()
            except OSError:
                continue
            digest.update(
                f"{path.relative_to(dicom_dir)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode()
            )
            n += 1
    return digest.hexdigest(), n


def ingest_once(
    dicom_dir: str | Path,
    out_dir: str | Path,
    *,
    key_path: str | Path,
    secret_path: str | Path | None = None,
    rules: IngestRules | None = None,
) -> IngestResult:
    """:func:`ingest`, unless the same ingest into ``out_dir`` is already complete.

    "The same" means: the DICOM folder's file list (paths, sizes, modification times), the
    rules, the key and secret paths are unchanged; ``ingest.csv`` and every image it lists
    still match their completion markers; and the key still maps every written pseudonym back
    through the secret.  Otherwise everything is ingested again (written atomically; the
    markers are written last, so an interrupted ingest is never taken as done).

    Parameters
    ----------
    dicom_dir, out_dir, key_path, secret_path, rules
        As for :func:`ingest` (``key_path`` required).

    Returns
    -------
    IngestResult
        With ``reused=True`` when nothing had to be done.
    """
    t0 = time.perf_counter()
    rules = rules or IngestRules()
    dicom_dir, out_dir, key_path = Path(dicom_dir), Path(out_dir), Path(key_path)
    secret_path = Path(secret_path) if secret_path else key_path.with_suffix(".secret")
    if not dicom_dir.is_dir():
        raise InputFileError(dicom_dir, "DICOM folder not found")
    fingerprint, n_files = dicom_fingerprint(dicom_dir)
    settings = {
        "dicom_files": fingerprint,
        "n_files": n_files,
        "rules": rules_summary(rules),
        "key_path": _path_digest(key_path),
        "secret": "environment" if os.environ.get(SECRET_ENV) else _path_digest(secret_path),
    }
    reused = _reuse(out_dir, settings, key_path, secret_path)
    if reused is not None:
        log.info(
            "ingest: DICOM unchanged since the last ingest; %d images reused", len(reused.images)
        )
        reused.seconds = time.perf_counter() - t0
        return reused
    result = ingest(dicom_dir, out_dir, key_path=key_path, secret_path=secret_path, rules=rules)
    summary = {
        "n_files": result.n_files,
        "skipped_files": result.skipped_files,
        "patients_without_image": result.patients_without_image,
        "series": {k: int(v) for k, v in result.table["status"].value_counts().items()},
        "rules": rules_summary(rules),
    }
    atomic_write_text(out_dir / SUMMARY_NAME, json.dumps(summary, indent=2))
    for image in result.images:
        mark_done(image, settings)
    mark_done(out_dir / "ingest.csv", settings)  # last: the ingest is complete
    result.seconds = time.perf_counter() - t0
    return result


def _path_digest(path: Path) -> str:
    return hashlib.sha256(str(path.resolve()).encode("utf-8")).hexdigest()[:16]


def _reuse(
    out_dir: Path, settings: dict[str, Any], key_path: Path, secret_path: Path
) -> IngestResult | None:
    """The earlier result when it is complete, unchanged and its key still maps it; else None."""
    table_path = out_dir / "ingest.csv"
    if not is_done(table_path, settings):
        return None
    try:
        table = pd.read_csv(table_path, dtype=str, keep_default_na=False)
        summary = json.loads((out_dir / SUMMARY_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, pd.errors.ParserError):
        return None
    if list(table.columns) != list(INGEST_COLUMNS):
        return None
    written = table[table["status"] == "written"]
    images = [out_dir / name for name in written["image"]]
    if not all(is_done(p, settings) for p in images):
        return None
    if not key_path.is_file() or (not secret_path.is_file() and not os.environ.get(SECRET_ENV)):
        return None
    secret = _load_secret(secret_path, key_path)
    key = {(r.get("pseudonym"), r.get("image")): r for r in _read_key(key_path)}
    for subject, name in zip(written["subject"], written["image"], strict=True):
        row = key.get((subject, name))
        if row is None:
            return None
        identity = row.get("patient_id") or f"no-patient-id:{row.get('study_instance_uid', '')}"
        if pseudonym(identity, secret) != subject:
            return None
    return IngestResult(
        table,
        images,
        key_path,
        int(summary.get("n_files", settings["n_files"])),
        int(summary.get("skipped_files", 0)),
        int(summary.get("patients_without_image", 0)),
        reused=True,
    )


def _is_inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _scan(dicom_dir: Path) -> tuple[list[_SliceHeader], int, int]:
    headers: list[_SliceHeader] = []
    n_files = skipped = 0
    for root, dirs, files in os.walk(dicom_dir):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            n_files += 1
            result = _read_header(path)
            if isinstance(result, str):
                skipped += 1
                log.debug("skipped %s: %s", path.relative_to(dicom_dir), result)
            else:
                headers.append(result)
    if skipped:
        log.info(
            "skipped %d of %d files that are not DICOM images (-v lists them)", skipped, n_files
        )
    return headers, n_files, skipped


def _series_sort_key(series: list[_SliceHeader]) -> tuple:
    h = series[0]
    number = h.series_number if h.series_number is not None else 10**9
    return (h.study_date, h.study_time, h.study_uid, number, h.series_uid)


def _ingest_series_safely(
    series: list[_SliceHeader],
    subject: str,
    index: int,
    run: int,
    out_dir: Path,
    rules: IngestRules,
) -> dict[str, Any]:
    """:func:`_ingest_series`, but an unexpected error refuses this series only.

    The row names the exception type, never its message (which can repeat a header value);
    an output that cannot be written still stops the ingest (:class:`OutputError`).
    """
    try:
        return _ingest_series(series, subject, index, run, out_dir, rules)
    except OutputError:
        raise
    except Exception as exc:  # noqa: BLE001  (one bad series must not stop the others)
        row: dict[str, Any] = dict.fromkeys(INGEST_COLUMNS, "")
        row.update(
            subject=subject,
            series=index,
            n_slices=len(series),
            status="refused",
            issues=f"header: series cannot be processed ({type(exc).__name__})",
        )
        log.warning("%s series %d: refused %s", subject, index, row["issues"])
        return row


def _ingest_series(
    series: list[_SliceHeader],
    subject: str,
    index: int,
    run: int,
    out_dir: Path,
    rules: IngestRules,
) -> dict[str, Any]:
    first = series[0]
    row: dict[str, Any] = dict.fromkeys(INGEST_COLUMNS, "")
    row.update(
        subject=subject,
        series=index,
        n_slices=len(series),
        echo_time_ms="" if first.echo_time_ms is None else first.echo_time_ms,
        repetition_time_ms="" if first.repetition_time_ms is None else first.repetition_time_ms,
    )
    issues: list[tuple[str, str]] = []

    def finish(status: str) -> dict[str, Any]:
        row["status"] = status
        row["issues"] = "; ".join(f"{code}: {detail}" for code, detail in issues)
        level = logging.WARNING if status == "refused" else logging.INFO
        log.log(level, "%s series %d: %s %s", subject, index, status, row["issues"] or "")
        return row

    if any(h.number_of_frames > 1 for h in series):
        issues.append(("mixed_geometry", "multi-frame (enhanced) DICOM is not supported"))
        return finish("refused")
    if any(h.orientation is None or h.position is None or h.pixel_spacing is None for h in series):
        issues.append(("mixed_geometry", "slices without orientation, position or pixel spacing"))
        return finish("refused")
    geometry_keys = {
        (tuple(np.round(h.orientation, 4)), h.pixel_spacing, h.rows, h.columns) for h in series
    }
    if len(geometry_keys) > 1:
        issues.append(
            (
                "mixed_geometry",
                f"{len(geometry_keys)} different orientations/matrices in one series",
            )
        )
        return finish("refused")

    iop = np.asarray(first.orientation, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    normal /= np.linalg.norm(normal)
    tilt = float(np.degrees(np.arccos(min(1.0, abs(float(normal[2]))))))
    if tilt > rules.max_axial_angle_deg:
        issues.append(("non_axial", f"slice normal {tilt:.0f} deg from the head-foot axis"))
        return finish("skipped")
    texts = first.texts or first.text
    is_t2, why = classify_t2(texts, first.echo_time_ms, first.repetition_time_ms, rules)
    if not is_t2:
        issues.append(("not_t2", why))
        return finish("skipped")
    row["contrast"] = "T2w"  # from the header: the T2 rule above (name or TE/TR)

    refusing: set[str] = set()
    fat = detect_fat_suppression(
        texts, first.scan_options, first.scanning_sequence, first.inversion_time_ms, rules
    )
    if fat:
        issues.append(("fat_suppressed", fat))
        if not rules.allow_fat_suppressed:
            refusing.add("fat_suppressed")
    if any(h.burned_in for h in series):
        issues.append(("burned_in", "BurnedInAnnotation YES (text in the pixels)"))
        if not rules.allow_burned_in:
            refusing.add("burned_in")
    if len({h.echo_number for h in series}) > 1:
        issues.append(("duplicate_slices", "several echoes in one series"))
        refusing.add("duplicate_slices")

    geometry = series_geometry(
        first.orientation,
        [h.position for h in series],
        first.pixel_spacing,
        first.spacing_between_slices or first.slice_thickness,
        rules,
    )
    if geometry.tilt_deg > _OBLIQUE_NOTE_DEG:
        issues.append(("oblique", f"{geometry.tilt_deg:.1f} deg from axial"))
    for code, detail in geometry.issues:
        if code not in {c for c, _ in issues}:
            issues.append((code, detail))
        if code != "single_slice":
            refusing.add(code)
    ordered = [series[i] for i in geometry.order]
    row["spacing_mm"] = "x".join(f"{s:.3f}" for s in geometry.spacing_mm)
    row["orientation"] = "".join(nib.aff2axcodes(geometry.affine_ras))
    row["shape"] = f"{first.columns}x{first.rows}x{len(series)}"

    try:
        data, rescaled = _read_pixels(ordered)
    except Exception as exc:  # noqa: BLE001  (decoders raise many types)
        issues.append(("unreadable", f"pixel data cannot be decoded ({type(exc).__name__})"))
        return finish("refused")
    if rescaled:
        issues.append(("rescaled", rescaled))
    windowed = detect_windowing(data, first.windowed_reasons, rules)
    if windowed:
        issues.append(("windowed", ", ".join(windowed)))
        if not rules.allow_windowed:
            refusing.add("windowed")
    if refusing:
        return finish("refused")

    name = f"{subject}_T2w.nii.gz" if run == 1 else f"{subject}_run-{run}_T2w.nii.gz"
    row.update(image=name, run=run)
    _write_nifti(data, geometry.affine_ras, out_dir / name)
    return finish("written")


def _read_pixels(ordered: list[_SliceHeader]) -> tuple[NDArray, str]:
    """Stack the rescaled slices as (column, row, slice); say how they were rescaled."""
    planes = []
    scalings = set()
    for h in ordered:
        ds = pydicom.dcmread(h.path)
        stored = ds.pixel_array
        if stored.ndim != 2:
            msg = f"expected one 2-D frame, got shape {stored.shape}"
            raise ValueError(msg)
        slope = _float(ds, "RescaleSlope")
        intercept = _float(ds, "RescaleIntercept")
        scalings.add((1.0 if slope is None else slope, 0.0 if intercept is None else intercept))
        planes.append(np.asarray(apply_modality_lut(stored, ds), dtype=np.float64).T)
    data = np.stack(planes, axis=-1)
    note = ""
    if scalings != {(1.0, 0.0)}:
        if len(scalings) == 1:
            slope, intercept = next(iter(scalings))
            note = f"slope {slope:g}, intercept {intercept:g} applied"
        else:
            note = f"{len(scalings)} different slope/intercept pairs, applied per slice"
    return data, note


def _write_nifti(data: NDArray, affine: NDArray[np.float64], target: Path) -> None:
    """Write int16 when the values are integers in range, else float32; qform = sform."""
    info = np.iinfo(np.int16)
    integral = bool(np.all(data == np.round(data)))
    if integral and data.min() >= info.min and data.max() <= info.max:
        arr = data.astype(np.int16)
    else:
        arr = data.astype(np.float32)
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header["descrip"] = b""
    img.header.set_xyzt_units("mm", "sec")
    with atomic_path(target) as tmp:
        nib.save(img, tmp)


# ------------------------------------------------------------------------- key and secret
def _load_secret(secret_path: Path, key_path: Path) -> bytes:
    from_env = os.environ.get(SECRET_ENV)
    if from_env:
        return from_env.encode("utf-8")
    if secret_path.is_file():
        text = secret_path.read_text(encoding="utf-8").strip()
        if not text:
            raise InputFileError(secret_path, "pseudonym secret file is empty")
        return text.encode("utf-8")
    if key_path.is_file() and _read_key(key_path):
        msg = (
            f"{secret_path}: secret file missing but the key {key_path} already holds "
            f"pseudonyms; restore the secret (or set {SECRET_ENV}) so the pseudonyms stay the same"
        )
        raise ConfigError(msg)
    text = secrets.token_hex(32)
    try:  # never overwrite a secret: create it only if no one else has (O_EXCL)
        secret_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _load_secret(secret_path, key_path)
    except OSError as exc:
        msg = f"{secret_path}: cannot create the pseudonym secret ({exc.strerror})"
        raise OutputError(msg) from exc
    try:
        os.write(fd, (text + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    log.info("created pseudonym secret %s (keep it with the key, private)", secret_path)
    return text.encode("utf-8")


def _key_lock(key_path: Path) -> Any:
    """Exclusive lock shared by every ingest that uses this key (and its secret)."""
    from helpers.locks import file_lock

    lock = key_path.with_name(key_path.name + ".lock")
    return file_lock(lock, "the pseudonym key (another ingest)", wait_s=KEY_LOCK_WAIT_S,
                     command="esma ingest")  # fmt: skip


def _origin(key_path: Path, secret: bytes) -> dict[str, str]:
    # A keyed check value (no identity, not the secret) and a digest of the key's path.
    return {"secret_check": pseudonym("esma-secret-check", secret), "key": _path_digest(key_path)}


def _check_origin(out_dir: Path, key_path: Path, secret: bytes) -> None:
    """Refuse to ingest into a folder made with another secret or key (issue 16)."""
    try:
        recorded = json.loads((out_dir / ORIGIN_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:
        raise InputFileError(out_dir / ORIGIN_NAME, f"unreadable ({exc})") from exc
    now = _origin(key_path, secret)
    if recorded.get("secret_check") != now["secret_check"]:
        msg = (
            f"{out_dir}: this folder was ingested with another pseudonym secret; the same "
            "patients would get other pseudonyms. Use the key and secret it was made with, or "
            "another output folder"
        )
        raise ConfigError(msg)
    if recorded.get("key") != now["key"]:
        msg = (
            f"{out_dir}: this folder was ingested with another pseudonym key file than "
            f"{key_path}; its pseudonyms would be split over two keys. Use the same --key, or "
            "another output folder"
        )
        raise ConfigError(msg)


def _write_origin(out_dir: Path, key_path: Path, secret: bytes) -> None:
    atomic_write_text(out_dir / ORIGIN_NAME, json.dumps(_origin(key_path, secret)) + "\n")


def _read_key(key_path: Path) -> list[dict[str, str]]:
    try:
        with key_path.open(newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    except OSError as exc:
        raise InputFileError(key_path, f"cannot read the pseudonym key ({exc.strerror})") from exc


def _write_key(key_path: Path, new_rows: list[dict[str, Any]]) -> None:
    old = _read_key(key_path) if key_path.is_file() else []
    replaced = {r["series_instance_uid"] for r in new_rows}
    kept = [r for r in old if r.get("series_instance_uid") not in replaced]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(KEY_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    for r in kept + new_rows:
        writer.writerow({k: r.get(k, "") for k in KEY_COLUMNS})
    _write_private(key_path, buffer.getvalue())


def _write_private(target: Path, text: str) -> None:
    """Write ``text`` atomically with mode 600 (owner read/write only)."""
    with atomic_path(target) as tmp:
        tmp.chmod(0o600)
        tmp.write_text(text, encoding="utf-8")


def rules_summary(rules: IngestRules) -> dict[str, Any]:
    """The rules as a plain dict (for provenance records)."""
    return asdict(rules)
