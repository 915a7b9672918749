"""Write volumes as DICOM series carrying a fake patient identity (test data for ingest).

Shared by tests/test_dicom.py and tests/test_interrupt.py.  A volume given in nibabel's RAS+
convention is written one file per slice, in shuffled file and instance order, with the
ImageOrientationPatient / ImagePositionPatient / PixelSpacing that describe it in DICOM's LPS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import DSfloat

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Fake identity carried by the test DICOM files; none of it may appear in any output.
IDENTITY = {
    "PatientName": "DOE^JANE",
    "PatientID": "PID-123456",
    "PatientBirthDate": "19450203",
    "AccessionNumber": "ACC998877",
    "InstitutionName": "Fake General Hospital",
    "ReferringPhysicianName": "HOUSE^GREGORY",
    "StudyDate": "20230115",
}
OTHER_IDENTITY = {
    "PatientName": "ROE^RICHARD",
    "PatientID": "PID-654321",
    "PatientBirthDate": "19510817",
    "AccessionNumber": "ACC112233",
    "InstitutionName": "Fake General Hospital",
    "ReferringPhysicianName": "HOUSE^GREGORY",
    "StudyDate": "20220704",
}


# ------------------------------------------------------------------------ DICOM test writer
@dataclass
class Series:
    """A volume in RAS+ (as nibabel sees it) to be written as one DICOM series."""

    data: np.ndarray
    affine: np.ndarray
    identity: dict[str, str] = field(default_factory=lambda: dict(IDENTITY))
    description: str = "T2_TSE_TRA"
    echo_time: float | None = 100.0
    repetition_time: float | None = 4000.0
    study_uid: str = field(default_factory=generate_uid)
    series_uid: str = field(default_factory=generate_uid)
    series_number: int = 3
    extra: dict[str, Any] = field(default_factory=dict)
    slope: Any = None  # None, a number, or one number per slice
    intercept: float = 0.0
    bits: int = 16
    sop_class: str = MRImageStorage
    transfer_syntax: str = ExplicitVRLittleEndian
    positions: list[np.ndarray] | None = None  # override slice positions (LPS)


def ds_number(value: float) -> DSfloat:
    return DSfloat(float(value), auto_format=True)


def write_series(folder: Path, s: Series, shuffle_seed: int = 0) -> list[Path]:
    """Write ``s`` as one DICOM file per slice, in shuffled file and instance order."""
    folder.mkdir(parents=True, exist_ok=True)
    lps = LPS @ s.affine
    col_step, row_step = lps[:3, 0], lps[:3, 1]
    row_dir = col_step / np.linalg.norm(col_step)
    col_dir = row_step / np.linalg.norm(row_step)
    n = s.data.shape[2]
    slopes = s.slope if isinstance(s.slope, list | tuple) else [s.slope] * n
    rng = np.random.default_rng(shuffle_seed)
    instance_order = rng.permutation(n)
    paths = []
    for k in range(n):
        position = s.positions[k] if s.positions is not None else (lps @ [0, 0, k, 1])[:3]
        plane = s.data[:, :, k].T  # DICOM rows run along the array's second axis
        if slopes[k] is not None:
            plane = (plane - s.intercept) / slopes[k]
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = s.sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = s.transfer_syntax
        path = folder / f"IM{instance_order[k]:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = s.sop_class
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        for key, value in s.identity.items():
            setattr(ds, key, value)
        ds.Modality = "MR"
        ds.StudyTime = "101500"
        ds.StudyInstanceUID = s.study_uid
        ds.SeriesInstanceUID = s.series_uid
        ds.SeriesNumber = s.series_number
        ds.InstanceNumber = int(instance_order[k]) + 1
        ds.SeriesDescription = s.description
        ds.ProtocolName = s.description
        if s.echo_time is not None:
            ds.EchoTime = ds_number(s.echo_time)
        if s.repetition_time is not None:
            ds.RepetitionTime = ds_number(s.repetition_time)
        ds.ImageOrientationPatient = [ds_number(v) for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [ds_number(v) for v in position]
        ds.PixelSpacing = [
            ds_number(np.linalg.norm(row_step)),
            ds_number(np.linalg.norm(col_step)),
        ]
        ds.SliceThickness = ds_number(np.linalg.norm(lps[:3, 2]))
        ds.WindowCenter = ds_number(500)
        ds.WindowWidth = ds_number(1000)
        if slopes[k] is not None:
            ds.RescaleSlope = ds_number(slopes[k])
            ds.RescaleIntercept = ds_number(s.intercept)
        for key, value in s.extra.items():
            setattr(ds, key, value)
        if s.bits == 8:
            ds.set_pixel_data(np.rint(plane).astype(np.uint8), "MONOCHROME2", 8)
        else:
            ds.set_pixel_data(np.rint(plane).astype(np.int16), "MONOCHROME2", 16)
        if s.sop_class != ds.SOPClassUID:
            ds.SOPClassUID = s.sop_class
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
