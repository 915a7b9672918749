"""Property tests (hypothesis) of the metrics.

- Random images and masks, in random storage orders and voxel sizes, through the public file path
  (:func:`helpers.metrics.measure_files`), never crash: each either gives tables that obey the
  metric contract (checked against numbers computed here independently) or stops with an esma
  error that names one of the input files.
- Mirroring the anatomy left/right negates cdi and lfiar_log (sided labels: the arrays are
  flipped and the side labels swapped; unsided labels: only the affine is mirrored, so the sides
  must come from the world coordinates).
- Scaling the intensities by any positive factor leaves fat_pct unchanged.

Bias correction is off (speed); examples are bounded so the file runs in about 20 s.
"""

from __future__ import annotations

import collections
import json
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from helpers import fat, synthetic
from helpers.errors import EsmaError, InputFileError
from helpers.labels import LabelTable, parse_labels
from helpers.metrics import METRICS_COLUMNS, MetricsSettings, measure, measure_files
from helpers.nifti import Volume

pytestmark = pytest.mark.filterwarnings(
    # skimage's warning about 3-channel-like shapes, raised inside helpers.fat on tiny volumes
    "ignore:threshold_otsu is expected to work correctly only for grayscale:UserWarning"
)
NO_BIAS = MetricsSettings(bias_correction=False)
PROPERTY_SETTINGS = settings(
    deadline=None,
    database=None,
    # Fixed example sequence, so CI cannot turn red by chance; set False locally to explore.
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def bounded(n: int) -> settings:
    """Property settings with at most ``n`` examples (keeps the file at about 20 s)."""
    return settings(PROPERTY_SETTINGS, max_examples=n)


LABEL_VALUES = [lab["value"] for lab in synthetic.LABELS_DOC["labels"]]


# --------------------------------------------------------------------------- random scans
@st.composite
def random_scans(draw: st.DrawFn) -> dict:
    """A random image + mask + storage order; mostly plausible, sometimes hostile."""
    perm = draw(st.permutations([0, 1, 2]))  # array axis a runs along world axis perm[a]
    signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3))
    zooms = draw(st.lists(st.floats(0.4, 6.0), min_size=3, max_size=3))
    world_shape = (
        draw(st.integers(16, 32)),
        draw(st.integers(16, 32)),
        draw(st.integers(1, 4)),
    )
    shape = tuple(world_shape[perm[a]] for a in range(3))
    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    for a in range(3):
        affine[perm[a], a] = signs[a] * zooms[a]
    affine[:3, 3] = draw(st.lists(st.floats(-200, 200), min_size=3, max_size=3))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)

    layout = draw(st.sampled_from(["boxes", "boxes", "speckle", "empty", "one_side", "unknown"]))
    mask = np.zeros(shape, np.int16)
    if layout in ("boxes", "one_side", "unknown"):
        values = LABEL_VALUES if layout != "one_side" else LABEL_VALUES[::2]
        for value in values:
            if rng.random() < 0.2:
                continue  # this muscle absent
            lo = [int(rng.integers(0, s)) for s in shape]
            hi = [
                int(min(s, lo_ + rng.integers(1, max(2, s // 3) + 1)))
                for lo_, s in zip(lo, shape, strict=True)
            ]
            mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = value
        if layout == "unknown":
            mask[tuple(rng.integers(0, s) for s in shape)] = 9
    elif layout == "speckle":
        mask = rng.choice([0, *LABEL_VALUES], size=shape, p=[0.84] + [0.02] * 8).astype(np.int16)
    intensity = draw(
        st.sampled_from(
            [
                "body",
                "body",
                "uniform",
                "bimodal",
                "integers",
                "huge",
                "negative",
                "constant",
                "nan",
            ]
        )
    )
    if intensity == "body":  # dark background, fatty body, muscles of random fat content
        image = rng.normal(8, 3, shape).clip(0)
        inner = tuple(slice(max(1, s // 8), s - max(1, s // 8)) for s in shape)
        image[inner] = rng.normal(600, 30, image[inner].shape)
        lean = mask > 0
        fatty = rng.random(shape) < rng.uniform(0, 0.4)
        image[lean] = np.where(fatty, 600.0, 50.0)[lean] + rng.normal(0, 15, shape)[lean]
    elif intensity == "uniform":
        image = rng.uniform(0, draw(st.floats(1.0, 5000.0)), shape)
    elif intensity == "bimodal":  # muscle-like and fat-like voxels
        image = np.where(rng.random(shape) < 0.3, 600.0, 50.0) + rng.normal(0, 20, shape)
    elif intensity == "integers":
        image = rng.integers(0, 4096, shape).astype(np.float64)
    elif intensity == "huge":
        image = rng.uniform(0, 1e9, shape)
    elif intensity == "negative":
        image = rng.uniform(-1000, 1000, shape)
    elif intensity == "constant":
        image = np.full(shape, draw(st.floats(-100, 100)))
    else:
        image = rng.uniform(0, 1000, shape)
        image[tuple(rng.integers(0, s) for s in shape)] = np.nan

    method = draw(st.sampled_from(fat.FAT_METHODS))
    return {
        "image": image.astype(np.float32),
        "mask": mask,
        "affine": affine,
        "method": method,
        "kind": f"{intensity}/{layout}",
    }


def check_contract(result, scan: dict) -> None:
    """Tables obey the metric contract; numbers re-derived here from the arrays."""
    metrics, asym = result.metrics, result.asymmetry
    assert list(metrics.columns) == list(METRICS_COLUMNS)
    affine, mask = scan["affine"], scan["mask"]
    slice_ax = int(np.argmax(np.abs(affine[2, :3])))  # world z = superior
    in_plane = [a for a in range(3) if a != slice_ax]
    area = float(np.prod(np.abs([affine[:3, a] for a in in_plane]).max(axis=1)))
    by_value = {lab["value"]: lab for lab in synthetic.LABELS_DOC["labels"]}
    per_slice = metrics[metrics["slice"].notna()]
    for row in per_slice.itertuples():
        value = next(
            v
            for v, lab in by_value.items()
            if (lab["muscle"], lab["side"]) == (row.muscle, row.side)
        )
        plane = np.take(mask, int(row.slice), axis=slice_ax)
        assert row.n_voxels == int(np.count_nonzero(plane == value))
        if np.isfinite(row.csa_mm2):
            assert row.csa_mm2 == pytest.approx(row.n_voxels * area, rel=1e-9)
    finite = metrics[np.isfinite(metrics["csa_mm2"])]
    assert (finite["csa_mm2"] > 0).all()
    assert finite["fat_pct"].between(0, 100).all()
    assert np.allclose(finite["fcsa_mm2"], finite["csa_mm2"] * (1 - finite["fat_pct"] / 100))
    nan_rows = metrics[~np.isfinite(metrics["csa_mm2"])]
    assert nan_rows["flags"].str.contains("absent|truncated").all()  # NaN always explained
    whole = metrics[metrics["slice"].isna() & (metrics["level"] == "all")]
    for row in whole[np.isfinite(whole["csa_mm2"])].itertuples():
        slices = per_slice[
            (per_slice["muscle"] == row.muscle)
            & (per_slice["side"] == row.side)
            & np.isfinite(per_slice["csa_mm2"])
        ]
        assert row.csa_mm2 == pytest.approx(slices["csa_mm2"].mean(), rel=1e-9)
        assert row.n_slices == len(slices)
    for row in asym[np.isfinite(asym["cdi"])].itertuples():
        mean = (row.fcsa_left_mm2 + row.fcsa_right_mm2) / 2
        assert row.cdi == pytest.approx((row.fcsa_left_mm2 - row.fcsa_right_mm2) / mean, abs=1e-9)
        assert -2 <= row.cdi <= 2
        assert row.cdi_abs == pytest.approx(abs(row.cdi))


def test_random_masks_and_intensities_never_crash():
    outcomes: collections.Counter[str] = collections.Counter()
    labels_text = json.dumps(synthetic.LABELS_DOC)

    @bounded(120)
    @given(scan=random_scans())
    def check(scan: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            tmp_path = Path(tmp)
            image_path = tmp_path / "sub-r_T2w.nii.gz"
            mask_path = tmp_path / "sub-r_dseg.nii.gz"
            labels_path = tmp_path / "labels.json"
            nib.save(nib.Nifti1Image(scan["image"], scan["affine"]), image_path)
            nib.save(nib.Nifti1Image(scan["mask"], scan["affine"]), mask_path)
            labels_path.write_text(labels_text)
            scan = dict(scan, affine=nib.load(image_path).affine)  # as stored (float32)
            # random boxes are no anatomy: the side check (tested in test_attack2) is off
            settings_ = MetricsSettings(
                bias_correction=False, fat_method=scan["method"], side_check=False
            )
            refusal: EsmaError | None = None
            try:
                result = measure_files(image_path, mask_path, labels_path, settings=settings_)
            except EsmaError as exc:  # a refusal, not a crash
                refusal = exc
            if refusal is not None:  # it must say what and, for a file, name it
                assert str(refusal)
                if isinstance(refusal, InputFileError):
                    assert refusal.path in (image_path, mask_path, labels_path), str(refusal)
                outcomes["refused: " + type(refusal).__name__] += 1
                event("refused: " + str(refusal).split(": ", 1)[-1][:60])
                return
            check_contract(result, scan)
            outcomes["measured"] += 1
            event("measured")

    check()
    print("outcomes of the random scans:", dict(outcomes))  # shown with pytest -s
    # not vacuous: most plausible scans are measured, hostile ones refused cleanly
    assert outcomes["measured"] >= 10, outcomes


# ------------------------------------------------------------------------------ phantoms
def phantom_volumes(ph: synthetic.Phantom) -> tuple[Volume, Volume]:
    image = Volume(np.asarray(ph.image.dataobj, dtype=np.float32), ph.image.affine)
    mask = Volume(np.asarray(ph.mask.dataobj).astype(np.int16), ph.mask.affine)
    return image, mask


@st.composite
def phantoms(draw: st.DrawFn) -> synthetic.Phantom:
    cdi = {m: draw(st.floats(-0.3, 0.3)) for m in ("multifidus", "erector_spinae")}
    return synthetic.make_phantom(
        seed=draw(st.integers(0, 10_000)),
        template="small",
        shape=(48, 48, 4),
        orientation=draw(st.sampled_from(["LPS", "RAS", "LAS", "PIR"])),
        cdi=cdi,
        bias_lr=draw(st.floats(0.0, 0.3)),
        rotation_deg=draw(st.floats(-15, 15)),
        shift_mm=(draw(st.floats(-20, 20)), draw(st.floats(-20, 20))),
    )


def asymmetry_by_key(result) -> pd.DataFrame:
    return result.asymmetry.set_index(["level", "muscle"]).sort_index()


@bounded(15)
@given(ph=phantoms(), method=st.sampled_from(fat.FAT_METHODS))
def test_mirroring_left_right_negates_cdi(ph, method):
    s = MetricsSettings(bias_correction=False, fat_method=method)
    image, mask = phantom_volumes(ph)
    before = asymmetry_by_key(measure(image, mask, ph.labels, subject="s", settings=s))
    mirrored = synthetic.mirror_left_right(ph)
    m_image, m_mask = phantom_volumes(mirrored)
    after = asymmetry_by_key(measure(m_image, m_mask, mirrored.labels, subject="s", settings=s))
    assert np.isfinite(before["cdi"]).all()
    np.testing.assert_allclose(after["cdi"], -before["cdi"], atol=1e-6)
    np.testing.assert_allclose(after["lfiar_log"], -before["lfiar_log"], atol=1e-6)
    np.testing.assert_allclose(after["fat_pct_left"], before["fat_pct_right"], atol=1e-5)


def unsided(labels: LabelTable, mask: np.ndarray) -> tuple[LabelTable, np.ndarray]:
    """Merge each muscle's two sides into one unsided label."""
    muscles = list(dict.fromkeys(lab.muscle for lab in labels.labels))
    doc = {"labels": [{"value": i + 1, "muscle": m, "side": None} for i, m in enumerate(muscles)]}
    lut = np.zeros(int(mask.max()) + 1, np.int16)
    for lab in labels.labels:
        lut[lab.value] = muscles.index(lab.muscle) + 1
    return parse_labels(doc), lut[mask]


@bounded(8)
@given(ph=phantoms())
def test_mirroring_the_world_swaps_unsided_labels(ph):
    """Same arrays, affine mirrored in x: sides split by anatomy must swap, cdi negate."""
    image, mask = phantom_volumes(ph)
    table, merged = unsided(ph.labels, np.asarray(mask.data))
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    results = []
    for affine in (image.affine, flip @ image.affine):
        results.append(
            asymmetry_by_key(
                measure(
                    Volume(image.data, affine),
                    Volume(merged, affine),
                    table,
                    subject="s",
                    settings=NO_BIAS,
                )
            )
        )
    before, after = results
    assert np.isfinite(before["cdi"]).all()
    np.testing.assert_allclose(after["cdi"], -before["cdi"], atol=1e-6)


@bounded(15)
@given(
    ph=phantoms(),
    method=st.sampled_from(fat.FAT_METHODS),
    factor=st.floats(1e-3, 1e3),
)
def test_intensity_scaling_keeps_fat_pct(ph, method, factor):
    s = MetricsSettings(bias_correction=False, fat_method=method)
    image, mask = phantom_volumes(ph)
    before = measure(image, mask, ph.labels, subject="s", settings=s).metrics
    scaled = Volume(image.data * np.float32(factor), image.affine)
    after = measure(scaled, mask, ph.labels, subject="s", settings=s).metrics
    assert np.isfinite(before["fat_pct"]).any()
    np.testing.assert_allclose(after["fat_pct"], before["fat_pct"], atol=1e-3)
    np.testing.assert_array_equal(after["csa_mm2"], before["csa_mm2"])
