"""A mask that does not lie on muscle is refused as such, not as a fat-suppressed image
(issue 18, item 3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers.errors import InputFileError
from helpers.metrics import measure
from helpers.nifti import Volume
from helpers.synthetic import make_phantom


@pytest.fixture(scope="module")
def phantom():
    ph = make_phantom("sub-place", template="small", seed=3)
    img = np.asarray(ph.image.dataobj, dtype=np.float32)
    mask = np.asarray(ph.mask.dataobj).astype(np.int16)
    return ph, img, mask


def _measure(ph, img, mask):
    where = Path("sub-place_T2w.nii.gz")
    return measure(Volume(img, ph.image.affine, where), Volume(mask, ph.mask.affine), ph.labels,
                   subject="sub-place")


def test_correct_mask_is_measured(phantom):
    ph, img, mask = phantom
    res = _measure(ph, img, mask)
    assert res.metrics["fat_pct"].notna().any()


def test_mask_on_fat_is_named(phantom):
    ph, img, mask = phantom
    values = mask[mask > 0]
    on_fat = np.zeros_like(mask)
    idx = np.flatnonzero((ph.fat_fraction.ravel() == 1) & (mask.ravel() == 0))
    on_fat.ravel()[idx[: values.size]] = values[: idx.size]
    with pytest.raises(InputFileError) as err:
        _measure(ph, img, on_fat)
    text = str(err.value)
    assert text.startswith("sub-place_T2w.nii.gz: the mask does not lie on muscle: its voxels "
                           "are as bright as fat")
    assert "fat-suppressed" not in text


@pytest.mark.parametrize("shift", [25, 30])
def test_mask_in_the_air_is_named(phantom, shift):
    ph, img, mask = phantom
    assert "".join(Volume(img, ph.image.affine).axcodes) == "LPS"
    moved = np.zeros_like(mask)
    moved[:, shift:, :] = mask[:, :-shift, :]  # 62-75 mm posterior: behind the back
    with pytest.raises(InputFileError) as err:
        _measure(ph, img, moved)
    text = str(err.value)
    assert "the mask does not lie on muscle: its voxels are at the noise level of the air" in text
    assert "fat-suppressed" not in text


def test_fat_suppressed_image_still_named_as_such(phantom):
    ph, img, mask = phantom
    suppressed = np.where(ph.fat_fraction >= 0.99, img * 0.1, img).astype(np.float32)
    with pytest.raises(InputFileError, match="fat-suppressed image"):
        _measure(ph, suppressed, mask)
