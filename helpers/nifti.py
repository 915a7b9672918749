"""NIfTI input and output, geometry checks.  I/O only: no science here.

Images are read with nibabel, which gives the voxel-to-world affine in RAS+ (+x is the patient's
right, +y anterior, +z superior) whatever the storage order on disk.  Everything that needs
left/right or up/down uses that affine, never array order.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from numpy.typing import NDArray

from helpers.errors import GeometryMismatchError, InputFileError
from helpers.files import atomic_path

__all__ = [
    "AFFINE_TOLERANCE_MM",
    "MAX_AXIAL_TILT_DEG",
    "STACK_THICKNESS_RATIO",
    "Volume",
    "check_axial_stack",
    "check_same_grid",
    "load_image",
    "load_mask",
    "save_like",
    "slice_axis",
    "stack_orientation",
    "subject_from_filename",
    "verify_gzip",
    "voxel_area_mm2",
]

#: Largest difference between two affines (mm, any entry) still taken as the same grid.
AFFINE_TOLERANCE_MM = 1e-3


@dataclass(frozen=True)
class Volume:
    """A 3-D array with its geometry.

    Attributes
    ----------
    data : ndarray
        Voxel values, float32 for images, an integer type for label masks.
    affine : ndarray, shape (4, 4)
        Voxel index to RAS+ world coordinates (mm).
    path : Path or None
        File it was read from, for messages.
    """

    data: NDArray
    affine: NDArray[np.float64]
    path: Path | None = None

    @property
    def zooms_mm(self) -> tuple[float, float, float]:
        """Voxel edge lengths (mm) along the three array axes."""
        return tuple(float(z) for z in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]

    @property
    def axcodes(self) -> tuple[str, str, str]:
        """Orientation codes of the array axes, e.g. ``('L', 'P', 'S')``."""
        return tuple(nib.aff2axcodes(self.affine))  # type: ignore[return-value]


def subject_from_filename(path: str | Path) -> str:
    """Subject ID from an image file name: drops ``.nii(.gz)``, ``_0000`` and the suffix
    ``_T2w``, ``_T1w``, ``_water`` or ``_fat``.

    Examples
    --------
    >>> subject_from_filename("/data/sub-0001_T2w.nii.gz")
    'sub-0001'
    >>> subject_from_filename("case7_0000.nii.gz")
    'case7'
    """
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    for tag in ("_0000", "_T2w"):
        name = name.removesuffix(tag)
    for tag in ("_T1w", "_water", "_fat"):  # the other contrasts (issue 18)
        name = name.removesuffix(tag)
    return name


def _read(path: str | Path) -> tuple[nib.Nifti1Image, NDArray]:
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "file not found")
    if path.name.endswith(".gz"):
        verify_gzip(path)
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError) as exc:
        msg = f"unreadable or truncated NIfTI ({type(exc).__name__}: {exc})"
        raise InputFileError(path, msg) from exc
    except Exception as exc:  # nibabel raises a zoo of types on corrupt headers
        msg = f"not a readable NIfTI file ({type(exc).__name__}: {exc})"
        raise InputFileError(path, msg) from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        msg = f"expected a 3-D volume, got {data.ndim}-D data of shape {data.shape}"
        raise InputFileError(path, msg)
    if not np.all(np.isfinite(img.affine)):
        raise InputFileError(path, "affine contains NaN or infinity")
    if abs(float(np.linalg.det(img.affine[:3, :3]))) < 1e-9:
        raise InputFileError(path, "affine is singular (a zero voxel size or collapsed axes)")
    return img, data


def verify_gzip(path: str | Path) -> None:
    """Read a gzip file to its end so that its CRC-32 and length are checked.

    nibabel stops reading once it has the voxels it needs, so the checksum in the gzip trailer
    is never compared: a file with flipped bits in its voxel data would be measured.

    Raises
    ------
    InputFileError
        The stream is damaged (CRC or length mismatch, truncated, not gzip).
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 22):
                pass
    except (OSError, EOFError, zlib.error) as exc:
        msg = (
            f"unreadable or truncated NIfTI: corrupt gzip stream ({type(exc).__name__}: {exc}); "
            "the voxel data cannot be trusted: copy or export the file again"
        )
        raise InputFileError(path, msg) from exc


def load_image(path: str | Path) -> Volume:
    """Read a 3-D intensity image as float32 with its RAS+ affine.

    Raises
    ------
    InputFileError
        Missing, unreadable or truncated file; not 3-D; NaN/inf intensities; constant image.
    """
    img, data = _read(path)
    # ``_read`` went through the array proxy, which already applied scl_slope/scl_inter.
    values = np.asarray(data).astype(np.float32, copy=False)
    n_bad = int(np.count_nonzero(~np.isfinite(values)))
    if n_bad:
        raise InputFileError(path, f"{n_bad} voxels are NaN or infinite")
    if values.size == 0 or float(values.max()) == float(values.min()):
        raise InputFileError(path, "image is constant (no contrast to measure)")
    return Volume(values, img.affine.astype(np.float64), Path(path))


def load_mask(path: str | Path) -> Volume:
    """Read a 3-D label mask as an integer array (no float scaling) with its RAS+ affine.

    Raises
    ------
    InputFileError
        Missing, unreadable, not 3-D, or holding non-integer / negative values or labels above
        32767.
    """
    img, data = _read(path)
    arr = np.asarray(data)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)):
            raise InputFileError(path, "mask contains NaN or infinite values")
        rounded = np.rint(arr)
        if np.any(np.abs(arr - rounded) > 1e-3):
            raise InputFileError(path, "mask holds non-integer values; expected integer labels")
        arr = rounded
    if arr.size and arr.min() < 0:
        raise InputFileError(path, f"mask holds negative label {int(arr.min())}")
    if arr.size and arr.max() > np.iinfo(np.int16).max:
        raise InputFileError(path, f"mask holds label {int(arr.max())}; labels above 32767 "
                                   "are not supported")
    return Volume(arr.astype(np.int16, copy=False), img.affine.astype(np.float64), Path(path))


def check_same_grid(
    reference: Volume, other: Volume, tolerance_mm: float = AFFINE_TOLERANCE_MM
) -> None:
    """Raise unless two volumes share shape and affine (within ``tolerance_mm``).

    Raises
    ------
    GeometryMismatchError
        Naming ``other``'s file, the two shapes or the largest affine difference.
    """
    where = other.path or Path("<array>")
    ref_name = reference.path.name if reference.path else "the image"
    if reference.data.shape != other.data.shape:
        msg = f"grid mismatch: shape {other.data.shape} differs from {ref_name} {reference.data.shape}"
        raise GeometryMismatchError(where, msg)
    diff = float(np.max(np.abs(reference.affine - other.affine)))
    if diff > tolerance_mm:
        msg = (
            f"grid mismatch: affine differs from {ref_name} by up to {diff:.4g} mm "
            f"(tolerance {tolerance_mm} mm)"
        )
        raise GeometryMismatchError(where, msg)


def slice_axis(affine: NDArray[np.float64]) -> int:
    """Array axis that runs closest to the world superior-inferior (z) direction.

    Axial slices are cut across this axis, whatever order the file stores its axes in.

    Examples
    --------
    >>> slice_axis(np.diag([0.9, 0.9, 4.4, 1.0]))
    2
    >>> slice_axis(np.array([[0, 0, 1, 0], [0, 4.4, 0, 0], [0.9, 0, 0, 0], [0, 0, 0, 1.0]]))
    0
    """
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return int(np.argmax(np.abs(directions[2])))


def voxel_area_mm2(affine: NDArray[np.float64], slice_axis: int) -> float:
    """In-plane voxel area (mm2) of slices taken across ``slice_axis``.

    Uses the two in-plane column vectors of the affine, so sheared or oblique grids are handled.

    Examples
    --------
    >>> voxel_area_mm2(np.diag([0.5, 2.0, 4.0, 1.0]), slice_axis=2)
    1.0
    """
    cols = [affine[:3, i] for i in range(3) if i != slice_axis]
    return float(np.linalg.norm(np.cross(cols[0], cols[1])))


def save_like(data: NDArray, reference: Volume | nib.Nifti1Image, target: str | Path) -> Path:
    """Write ``data`` atomically on the grid of ``reference`` (same affine, qform and sform).

    Integer data is stored in the smallest of uint8, int16, uint16, int32 (int64) that holds its
    range (labels: uint8), floats as float32.
    """
    if isinstance(reference, Volume):
        affine = reference.affine
    else:
        affine = reference.affine
    arr = np.asarray(data)
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool:
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        for dtype in (np.uint8, np.int16, np.uint16, np.int32):
            if np.iinfo(dtype).min <= lo and hi <= np.iinfo(dtype).max:
                break
        else:
            dtype = np.int64
        arr = arr.astype(dtype)
    else:
        arr = arr.astype(np.float32)
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(target) as tmp:
        nib.save(img, tmp)
    return Path(target)


# ------------------------------------------------------------- stack orientation (issue 16)
#: Largest angle (degrees) between the slice normal and the head-foot axis of an axial stack
#: (the DICOM ingest's ``max_axial_angle_deg`` default).
MAX_AXIAL_TILT_DEG = 30.0
#: An array axis at least this many times thicker than both others is the stack's slice axis
#: (a 2-D multi-slice acquisition); otherwise the axis closest to head-foot is.
STACK_THICKNESS_RATIO = 2.0
#: A stack tilted at least this much (degrees) is named sagittal or coronal, not oblique.
_NAMED_PLANE_DEG = 60.0


def stack_orientation(affine: NDArray[np.float64]) -> tuple[int, float, str]:
    """Slice axis, tilt and plane of a stack of slices, from its affine.

    The slice axis is the array axis at least :data:`STACK_THICKNESS_RATIO` times thicker than
    both others (the acquired slices of a 2-D multi-slice scan, whatever their orientation);
    on a near-isotropic grid it is the axis closest to the head-foot direction
    (:func:`slice_axis`), since such a grid can be cut axially.  The tilt is the angle between
    the normal of the slice planes (cross product of the two in-plane axes, so a sheared grid is
    handled) and the head-foot axis.

    Parameters
    ----------
    affine : ndarray, shape (4, 4)
        Voxel index to RAS+ world (mm).

    Returns
    -------
    axis : int
        The slice axis.
    tilt_deg : float
        Angle (degrees, 0 to 90) between the slice normal and world z.
    plane : str
        ``"axial"`` (tilt at most 45 degrees), else ``"sagittal"`` or ``"coronal"`` by the
        normal's larger component (x or y).

    Examples
    --------
    >>> stack_orientation(np.diag([0.7, 0.7, 4.0, 1.0]))
    (2, 0.0, 'axial')
    >>> sagittal = np.array([[0, 0, 4.0, 0], [0.7, 0, 0, 0], [0, 0.7, 0, 0], [0, 0, 0, 1]])
    >>> stack_orientation(sagittal)
    (2, 90.0, 'sagittal')
    """
    cols = np.asarray(affine, dtype=np.float64)[:3, :3]
    zooms = np.linalg.norm(cols, axis=0)
    thick = int(np.argmax(zooms))
    others = [a for a in range(3) if a != thick]
    if zooms[thick] >= STACK_THICKNESS_RATIO * max(zooms[others]):
        axis = thick
    else:
        axis = slice_axis(affine)
    in_plane = [a for a in range(3) if a != axis]
    normal = np.cross(cols[:, in_plane[0]], cols[:, in_plane[1]])
    normal /= np.linalg.norm(normal)
    tilt = float(np.degrees(np.arccos(min(1.0, abs(float(normal[2]))))))
    if tilt <= 45.0:
        plane = "axial"
    else:
        plane = "sagittal" if abs(normal[0]) >= abs(normal[1]) else "coronal"
    return axis, round(tilt, 6), plane


def check_axial_stack(
    affine: NDArray[np.float64],
    path: str | Path | None = None,
    *,
    max_tilt_deg: float = MAX_AXIAL_TILT_DEG,
) -> float:
    """Refuse a sagittal, coronal or too oblique stack; return its tilt (degrees).

    Per-slice areas and levels assume axial slices: a sagittal stack would be cut into
    "slices" along its in-plane rows and measured into meaningless numbers.

    Parameters
    ----------
    affine : ndarray, shape (4, 4)
        Voxel index to RAS+ world (mm).
    path : str or Path, optional
        The file, for the message.
    max_tilt_deg : float
        Largest accepted angle between the slice normal and the head-foot axis.

    Returns
    -------
    float
        The tilt of the slices from axial (degrees).

    Raises
    ------
    InputFileError
        The stack is not axial, or tilted more than ``max_tilt_deg``; the message names the
        file, the plane and the angle.

    Examples
    --------
    >>> check_axial_stack(np.diag([0.7, 0.7, 4.0, 1.0]))
    0.0
    """
    _, tilt, plane = stack_orientation(affine)
    if tilt > max_tilt_deg:
        what = f"a {plane} stack" if tilt >= _NAMED_PLANE_DEG else "an oblique stack"
        msg = (
            f"not an axial stack: {what} (slice normal {tilt:.0f} deg from the head-foot axis, "
            f"more than {max_tilt_deg:g}); CSA and fat infiltration need axial slices: use the "
            "axial T2 series or reformat"
        )
        raise InputFileError(Path(path) if path is not None else Path("<image>"), msg)
    return tilt
