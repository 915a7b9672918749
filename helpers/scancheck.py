"""Can this scan be segmented?  Image-only checks that run before the network does.

A 2d segmentation model trained on axial, fat-bright lumbar scans turns anything else into
noise that looks like a mask: a sagittal stack, a fat-suppressed series, a scan of the chest or
the head.  :func:`check_scan` refuses those before segmentation, naming the file and the reason,
from the image and its affine alone (no mask is needed):

``plane``
    The stack's slice normal (:func:`helpers.nifti.stack_orientation`: the clearly thickest
    axis, or for near-isotropic voxels the axis closest to the body's long axis) must lie within
    ``max_tilt_deg`` of the world superior-inferior axis.
    A sagittal or coronal stack is named as such; an axial one tilted further is "too oblique".
``body_size``
    A lumbar cross-section is at least ``min_body_width_mm`` wide (left-right) where the body is
    not cut by the field of view; a head, neck or limb is narrower.

Two more reasons need the muscles, so they are checked right after the network ran and before
any mask is written (:meth:`helpers.segment.Segmenter.predict`): a fat-suppressed image (the fat
around the predicted muscles no brighter than they are, or not among the body's bright
tissues: :func:`helpers.fat.tissue_intensities` with the lower bars of
:data:`helpers.segment.SEGMENT_MIN_FAT_TO_BRIGHT`, so that a Dixon water + fat sum passes), and
a scan of another region (no psoas and no quadratus lumborum on any slice: they exist only in
the lumbar region).

The thresholds are in :class:`ScanCheckSettings`; each check can be switched off.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from helpers.errors import ConfigError, InputFileError
from helpers.nifti import Volume, load_image, stack_orientation

__all__ = ["ScanCheckSettings", "ScanFindings", "check_scan", "scan_findings", "stack_plane"]

_PLANES = ("sagittal", "coronal", "axial")  # the plane whose normal is that world axis


@dataclass(frozen=True)
class ScanCheckSettings:
    """Thresholds of :func:`check_scan` (see the module docstring).

    Attributes
    ----------
    max_tilt_deg : float
        Largest angle (degrees) between the slice direction and the superior-inferior axis.
    body_fraction : float
        Body threshold as a fraction of the image's 99th percentile.
    min_body_width_mm : float
        Smallest left-right body width (mm) where the body lies inside the field of view.
    checks : tuple of str
        Which checks run.
    """

    max_tilt_deg: float = 30.0
    body_fraction: float = 0.03
    min_body_width_mm: float = 200.0
    checks: tuple[str, ...] = ("plane", "body_size")

    def __post_init__(self) -> None:
        known = {"plane", "body_size"}
        bad = set(self.checks) - known
        if bad:
            msg = f"unknown scan checks {sorted(bad)}; known: {sorted(known)}"
            raise ConfigError(msg)
        if not 0 < self.max_tilt_deg < 90:
            msg = f"max_tilt_deg must lie in (0, 90), got {self.max_tilt_deg}"
            raise ConfigError(msg)


@dataclass(frozen=True)
class ScanFindings:
    """What :func:`scan_findings` measured (NaN where not measurable)."""

    plane: str
    tilt_deg: float
    body_width_mm: float
    body_cut_by_fov: bool

    def problems(self, settings: ScanCheckSettings) -> list[str]:
        """Reasons to refuse the scan under ``settings`` (empty: segment it)."""
        out = []
        checks = settings.checks
        if "plane" in checks:
            if self.plane != "axial":
                out.append(f"{self.plane} stack (slices {self.tilt_deg:.0f} degrees from axial): "
                           "esma segments axial stacks")
            elif self.tilt_deg > settings.max_tilt_deg:
                out.append(f"axial stack too oblique ({self.tilt_deg:.0f} degrees, limit "
                           f"{settings.max_tilt_deg:.0f})")
        if ("body_size" in checks and not self.body_cut_by_fov
                and self.body_width_mm < settings.min_body_width_mm):
            out.append(f"body only {self.body_width_mm:.0f} mm wide (a lumbar cross-section is "
                       f">= {settings.min_body_width_mm:.0f} mm): not the lumbar region?")
        return out


def stack_plane(affine: NDArray) -> tuple[str, float]:
    """The stack's plane and its slice normal's tilt (degrees) from the S-I axis.

    :func:`helpers.nifti.stack_orientation` without the slice axis.

    Examples
    --------
    >>> stack_plane(np.diag([0.9, 0.9, 4.0, 1.0]))
    ('axial', 0.0)
    >>> stack_plane(np.diag([4.0, 0.9, 0.9, 1.0]))
    ('sagittal', 90.0)
    """
    _axis, tilt, plane = stack_orientation(affine)
    return plane, round(tilt, 3)


def scan_findings(volume: Volume, settings: ScanCheckSettings | None = None) -> ScanFindings:
    """Measure what :func:`check_scan` judges (see the module docstring)."""
    settings = settings or ScanCheckSettings()
    k_ax, tilt, plane = stack_orientation(volume.affine)
    tilt = round(tilt, 3)
    data = np.moveaxis(np.asarray(volume.data, dtype=np.float32), k_ax, 2)
    zooms = list(volume.zooms_mm)
    sp = [z for i, z in enumerate(zooms) if i != k_ax]
    finite = data[np.isfinite(data)]
    nan = float("nan")
    if finite.size == 0 or float(np.percentile(finite, 99)) <= 0:
        return ScanFindings(plane, tilt, nan, False)
    p99 = float(np.percentile(finite, 99))
    smooth = ndi.median_filter(data, size=(3, 3, 1))
    # air level: the image's outer frame, when it is air (dark); tissue lies well above it
    frame = np.concatenate([smooth[:3].ravel(), smooth[-3:].ravel(), smooth[:, :3].ravel(),
                            smooth[:, -3:].ravel()])
    air = float(np.median(frame))
    threshold = settings.body_fraction * p99
    if air < 0.15 * p99:
        threshold = max(threshold, 2.5 * air)
    body = smooth > threshold
    body = ndi.binary_opening(body, structure=np.ones((3, 3, 1), bool))
    lab, n = ndi.label(body)
    if n == 0:
        return ScanFindings(plane, tilt, 0.0, False)
    sizes = ndi.sum_labels(body, lab, index=np.arange(1, n + 1))
    body = lab == int(np.argmax(sizes)) + 1
    filled = np.empty_like(body)
    for k in range(body.shape[2]):
        filled[:, :, k] = ndi.binary_fill_holes(body[:, :, k])
    # width and cut: middle slices
    mid = slice(max(0, data.shape[2] // 2 - 1), data.shape[2] // 2 + 2)
    f_mid = filled[:, :, mid]
    mi, mj = (int(np.ceil(5.0 / sp[0])), int(np.ceil(5.0 / sp[1])))  # a dark rim is no air gap
    cut = bool(f_mid[:mi].any() or f_mid[-mi:].any() or f_mid[:, :mj].any()
               or f_mid[:, -mj:].any())
    lr_axis = int(np.argmax(np.abs(np.delete(volume.affine[:3, :3], k_ax, axis=1)[0])))
    extent = f_mid.any(axis=2).any(axis=1 - lr_axis)
    width = float(extent.sum() * sp[lr_axis])
    return ScanFindings(plane, tilt, round(width, 1), cut)


def check_scan(path: str | Path | Volume, settings: ScanCheckSettings | None = None
               ) -> ScanFindings:
    """Refuse a scan that cannot be segmented; return the findings otherwise.

    Raises
    ------
    InputFileError
        Naming the file and every reason (the stack's plane or tilt, a body too narrow for
        the lumbar region).
    """
    settings = settings or ScanCheckSettings()
    volume = path if isinstance(path, Volume) else load_image(path)
    findings = scan_findings(volume, settings)
    problems = findings.problems(settings)
    if problems:
        where = Path(path) if not isinstance(path, Volume) else (volume.path or Path("<image>"))
        raise InputFileError(where, "; ".join(problems))
    return findings
