"""Tests of helpers.training (nnU-Net dataset conversion, plans, export) and helpers.trainset."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from helpers.errors import (
    ConfigError,
    GeometryMismatchError,
    InputFileError,
    LabelError,
    ModelError,
)
from helpers.labels import load_labels, parse_labels
from helpers.nnunet_runtime import find_trainer_class
from helpers.overlap import dice_per_label
from helpers.segment import load_model
from helpers.training import (
    NnunetDirs,
    SmallNetwork,
    TrainingCase,
    TrainSettings,
    _small_plans,
    _trainer_name,
    _validation_table,
    check_training_cases,
    dataset_json_labels,
    export_model,
    make_untrained_model,
    pair_cases,
    write_raw_dataset,
)
from helpers.trainset import (
    deformed_example,
    make_heldout_set,
    make_training_set,
    phantom,
    unsided,
)

LABELS = parse_labels({"labels": [
    {"value": 1, "muscle": "multifidus", "side": "right"},
    {"value": 2, "muscle": "multifidus", "side": "left"},
]})
UNSIDED = parse_labels({"labels": [{"value": 1, "muscle": "multifidus", "side": None}]})


def _pair(folder: Path, case: str, affine_mask=None, shape_mask=None, values=(1, 2)):
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([0.9, 0.9, 4.0, 1.0])
    data = np.random.default_rng(0).normal(100, 10, (12, 10, 3)).astype(np.float32)
    mask = np.zeros(shape_mask or data.shape, np.uint8)
    mask[2:5, 2:5, :] = values[0]
    mask[7:10, 2:5, :] = values[1]
    img, msk = folder / f"{case}_T2w.nii.gz", folder / f"{case}_dseg.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), img)
    nib.save(nib.Nifti1Image(mask, affine if affine_mask is None else affine_mask), msk)
    return TrainingCase(case, img, msk)


# ------------------------------------------------------------------------------ settings
def test_settings_validation():
    assert TrainSettings(dataset_id=501).dataset_folder_name == "Dataset501_EsmaMuscles"
    with pytest.raises(ConfigError, match="Decathlon"):
        TrainSettings(dataset_id=4)
    with pytest.raises(ConfigError, match="dataset_name"):
        TrainSettings(dataset_name="my data")
    with pytest.raises(ConfigError, match="folds"):
        TrainSettings(folds=(7,))
    with pytest.raises(ConfigError, match="validation_cases"):
        TrainSettings(folds=(0, 1), validation_cases=("a",))
    with pytest.raises(ConfigError, match="2d"):
        TrainSettings(configuration="3d_fullres", small_network=SmallNetwork())


def test_trainer_choice_follows_the_sides():
    """Sided labels must not be mirrored; both choices are built-in classes nnU-Net finds."""
    assert _trainer_name(TrainSettings(), LABELS) == "nnUNetTrainerNoMirroring"
    assert _trainer_name(TrainSettings(), UNSIDED) == "nnUNetTrainer"
    for name in ("nnUNetTrainer", "nnUNetTrainerNoMirroring"):
        cls = find_trainer_class(name)
        assert cls.__name__ == name
        assert cls.__module__.startswith("nnunetv2.training.nnUNetTrainer")
    with pytest.raises(ModelError, match="not known"):
        find_trainer_class("NoSuchTrainer")


def test_plan_network_trainers_build_the_network_as_nnunet_does():
    """The trainers whose network esma builds without importing them use nnUNetTrainer's own
    ``build_network_architecture`` (not overridden), and esma trains with no other."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from helpers.segment import PLAN_NETWORK_TRAINERS

    for name in PLAN_NETWORK_TRAINERS:
        cls = find_trainer_class(name)
        assert cls.build_network_architecture is nnUNetTrainer.build_network_architecture, name
    assert {_trainer_name(TrainSettings(), LABELS),
            _trainer_name(TrainSettings(), UNSIDED)} <= PLAN_NETWORK_TRAINERS
    # a variant that builds another network is not among them
    assert (find_trainer_class("nnUNetTrainerBN").build_network_architecture
            is not nnUNetTrainer.build_network_architecture)
    assert "nnUNetTrainerBN" not in PLAN_NETWORK_TRAINERS


def test_dataset_json_labels_need_consecutive_values():
    assert dataset_json_labels(LABELS) == {"background": 0, "multifidus_right": 1,
                                           "multifidus_left": 2}
    gap = parse_labels({"labels": [{"value": 1, "muscle": "a", "side": None},
                                   {"value": 3, "muscle": "b", "side": None}]})
    with pytest.raises(LabelError, match=r"1\.\.N"):
        dataset_json_labels(gap)


# --------------------------------------------------------------------------- raw dataset
def test_check_reports_every_mismatched_pair(tmp_path):
    shifted = np.diag([0.9, 0.9, 4.0, 1.0])
    shifted[0, 3] = 5.0
    cases = [
        _pair(tmp_path, "ok"),
        _pair(tmp_path, "moved", affine_mask=shifted),
        _pair(tmp_path, "cropped", shape_mask=(12, 10, 2)),
    ]
    with pytest.raises(GeometryMismatchError) as err:
        check_training_cases(cases, LABELS)
    text = str(err.value)
    assert "2 of 3 image/mask pairs" in text
    assert "moved" in text
    assert "affine differs" in text
    assert "cropped" in text
    assert "shape" in text
    assert "  ok:" not in text


def test_ignore_label_is_the_next_value_and_only_allowed_when_asked(tmp_path):
    assert dataset_json_labels(LABELS, ignore=True) == {
        "background": 0, "multifidus_right": 1, "multifidus_left": 2, "ignore": 3}
    assert "ignore" not in dataset_json_labels(LABELS)
    partly = _pair(tmp_path, "partly", values=(1, 3))  # 3 = N + 1: unknown voxels
    check_training_cases([partly], LABELS, ignore=True)
    with pytest.raises(LabelError, match=r"\[3\]"):
        check_training_cases([partly], LABELS)
    with pytest.raises(LabelError, match=r"\[4\]"):  # N + 2 is never the ignore label
        check_training_cases([_pair(tmp_path, "over", values=(1, 4))], LABELS, ignore=True)


def test_check_reports_undeclared_labels_and_bad_ids(tmp_path):
    with pytest.raises(LabelError, match=r"\[5\]"):
        check_training_cases([_pair(tmp_path, "a", values=(1, 5))], LABELS)
    good = _pair(tmp_path, "b")
    with pytest.raises(ConfigError, match="not unique"):
        check_training_cases([good, good], LABELS)
    with pytest.raises(ConfigError, match="letters"):
        check_training_cases([TrainingCase("a b", good.image, good.mask)], LABELS)
    with pytest.raises(InputFileError, match="file not found"):
        check_training_cases([TrainingCase("c", tmp_path / "none.nii.gz", good.mask)], LABELS)


def test_write_raw_dataset_layout(tmp_path):
    cases = [_pair(tmp_path / "src", f"c{i}") for i in range(2)]
    dirs = NnunetDirs(tmp_path / "work")
    folder = write_raw_dataset(cases, LABELS, dirs, TrainSettings(dataset_id=512,
                                                                  dataset_name="T"))
    assert folder == dirs.raw / "Dataset512_T"
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [
        "c0_0000.nii.gz", "c1_0000.nii.gz"]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == ["c0.nii.gz", "c1.nii.gz"]
    ds = json.loads((folder / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "T2"}
    assert ds["numTraining"] == 2
    assert ds["labels"]["multifidus_left"] == 2
    assert load_labels(folder / "labels.json").labels == LABELS.labels
    img, msk = nib.load(folder / "imagesTr" / "c0_0000.nii.gz"), nib.load(folder / "labelsTr" / "c0.nii.gz")
    np.testing.assert_array_equal(img.affine, msk.affine)
    assert int(msk.header["qform_code"]) == int(msk.header["sform_code"]) == 1
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(nib.load(cases[0].image).dataobj))
    # nnU-Net's own integrity check accepts it
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(folder), num_processes=1)


def test_pair_cases(tmp_path):
    for case in ("s1", "s2"):
        _pair(tmp_path / "mixed", case)
    cases = pair_cases(tmp_path / "mixed", tmp_path / "mixed")
    assert [(c.case_id, c.image.name, c.mask.name) for c in cases] == [
        ("s1", "s1_T2w.nii.gz", "s1_dseg.nii.gz"), ("s2", "s2_T2w.nii.gz", "s2_dseg.nii.gz")]
    (tmp_path / "mixed" / "s2_dseg.nii.gz").unlink()
    with pytest.raises(InputFileError, match="no mask found for 1 image"):
        pair_cases(tmp_path / "mixed", tmp_path / "mixed")


# ------------------------------------------------------------------------------------ plans
def test_small_plans_rewrite():
    plans = {
        "transpose_forward": [0, 1, 2],
        "configurations": {"2d": {
            "data_identifier": "nnUNetPlans_2d", "batch_size": 12, "patch_size": [224, 256],
            "spacing": [0.94, 0.94], "median_image_size_in_voxels": [208, 256],
            "architecture": {"arch_kwargs": {"n_stages": 7, "features_per_stage": [32] * 7}},
        }, "3d_fullres": {}},
    }
    fingerprint = {"shapes_after_crop": [[20, 208, 256], [18, 200, 250]],
                   "spacings": [[4.4, 0.9375, 0.9375], [4.4, 0.9375, 0.9375]]}
    out = _small_plans(plans, fingerprint, SmallNetwork(spacing_mm=1.875, features=(8, 16, 32)))
    cfg = out["configurations"]["2d"]
    assert list(out["configurations"]) == ["2d"]
    assert out["plans_name"] == "esmaSmallPlans"
    assert cfg["spacing"] == [1.875, 1.875]
    assert cfg["patch_size"] == [104, 128]  # median 102 x 126.5 at 1.875 mm, up to multiples of 4
    arch = cfg["architecture"]["arch_kwargs"]
    assert arch["n_stages"] == 3
    assert arch["features_per_stage"] == [8, 16, 32]
    assert arch["strides"] == [[1, 1], [2, 2], [2, 2]]
    assert cfg["data_identifier"] == "esmaSmallPlans_2d"
    assert plans["configurations"]["2d"]["batch_size"] == 12  # input untouched
    with pytest.raises(ConfigError, match="multiples of 4"):
        _small_plans(plans, fingerprint, SmallNetwork(features=(8, 16, 32), patch_size=(30, 32)))


# ----------------------------------------------------------------------------------- export
def test_export_zip_has_everything_and_loads(tmp_path):
    folder = make_untrained_model(tmp_path / "res", LABELS)
    ckpt = folder / "fold_0" / "checkpoint_final.pth"
    data = torch.load(ckpt, weights_only=False)
    data["optimizer_state"] = {"state": {0: torch.zeros(1000)}}
    torch.save(data, ckpt)
    out = export_model(folder, (0,), tmp_path / "m.zip", LABELS, {"note": "x"})
    prefix = f"{folder.parent.name}/{folder.name}/"
    with zipfile.ZipFile(out) as zf:
        names = set(zf.namelist())
        meta = json.loads(zf.read(prefix + "esma_model.json"))
        with zf.open(prefix + "fold_0/checkpoint_final.pth") as fh:
            stripped = torch.load(fh, weights_only=False)
    for need in ("plans.json", "dataset.json", "dataset_fingerprint.json", "labels.json",
                 "esma_model.json", "fold_0/checkpoint_final.pth", "fold_0/progress.png",
                 "fold_0/validation/summary.json"):
        assert prefix + need in names
    assert stripped["optimizer_state"] is None
    assert stripped["trainer_name"] == "nnUNetTrainerNoMirroring"
    assert meta["configuration"] == "2d"
    assert meta["sided"] is True
    assert meta["note"] == "x"
    info = load_model(out)
    assert info.labels.labels == LABELS.labels
    assert info.sided


def test_export_needs_progress_and_summary(tmp_path):
    folder = make_untrained_model(tmp_path / "res", UNSIDED)
    (folder / "fold_0" / "progress.png").unlink()
    with pytest.raises(ModelError, match=r"progress\.png"):
        export_model(folder, (0,), tmp_path / "m.zip", UNSIDED)
    assert not (tmp_path / "m.zip").exists()


def test_validation_table(tmp_path):
    fold = tmp_path / "fold_0" / "validation"
    fold.mkdir(parents=True)
    summary = {"metric_per_case": [{"prediction_file": "/x/case1.nii.gz", "metrics": {
        "1": {"Dice": 0.9}, "2": {"Dice": 0.8}}}]}
    (fold / "summary.json").write_text(json.dumps(summary))
    table = _validation_table(tmp_path, (0,), LABELS)
    assert table[["case", "side", "dice"]].values.tolist() == [
        ["case1", "right", 0.9], ["case1", "left", 0.8]]


# ------------------------------------------------------------------------------------- dice
def test_dice_against_nnunet_implementation():
    """Cross-check with nnU-Net's own tp/fp/fn counting (an independent implementation)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn

    rng = np.random.default_rng(3)
    ref = rng.integers(0, 4, (20, 20, 5))
    pred = np.where(rng.random(ref.shape) < 0.8, ref, rng.integers(0, 4, ref.shape))
    ours = dice_per_label(pred, ref, [1, 2, 3, 7])
    for v in (1, 2, 3):
        tp, fp, fn, _ = compute_tp_fp_fn_tn(ref == v, pred == v)
        assert ours[v] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert np.isnan(ours[7])  # absent from both: undefined, not 0 or 1
    assert dice_per_label(ref, ref, [1])[1] == 1.0
    with pytest.raises(ValueError, match="shape"):
        dice_per_label(ref, ref[:, :, :2], [1])


# --------------------------------------------------------------------------------- trainset
def test_unsided_merge_keeps_muscles(example_dir):
    labels = load_labels(example_dir / "labels.json")
    mask = np.arange(9)
    merged, table = unsided(mask, labels)
    assert merged.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [lab.muscle for lab in table.labels] == list(labels.muscles)
    assert not any(lab.side for lab in table.labels)


def test_deformed_example_keeps_world_geometry_and_labels(example_dir):
    img, msk, params = deformed_example("d1", seed=5)
    src = nib.load(example_dir / "sub-0001_T1w.nii.gz")
    assert img.shape == msk.shape
    np.testing.assert_allclose(img.affine, msk.affine)
    assert nib.aff2axcodes(img.affine) == tuple(params["orientation"])
    # the stored grid covers the same world slab as the source slices it kept
    z0, z1 = params["slices"]
    canon = nib.as_closest_canonical(img)
    src_canon = nib.as_closest_canonical(src.slicer[:, :, z0:z1])
    np.testing.assert_allclose(canon.affine, src_canon.affine, atol=1e-3)
    values = set(np.unique(np.asarray(msk.dataobj)).tolist())
    assert values == set(range(9))
    # muscle areas changed by the per-muscle factors (roughly), not wholesale
    src_mask = nib.load(example_dir / "sub-0001_T1w_dseg.nii.gz").slicer[:, :, z0:z1]
    ref = np.asarray(nib.as_closest_canonical(src_mask).dataobj)
    got = np.asarray(nib.as_closest_canonical(msk).dataobj)
    assert got.shape == ref.shape
    for lab in (1, 3, 5):
        ratio = (got == lab).sum() / (ref == lab).sum()
        assert 0.4 < ratio < 2.0
    assert not np.array_equal(got, ref)


def test_heldout_set_is_sided_and_never_shares_a_case_with_training(tmp_path):
    _, _, train_table = make_training_set(tmp_path / "trn", 1, 1, seed=4)
    held, labels, held_table = make_heldout_set(tmp_path / "tst", 1, training_seed=4)
    assert [c.case_id for c in held] == ["tst-ex000", "tst-ph000"]
    assert all(lab.side in ("left", "right") for lab in labels.labels)
    assert set(held_table["seed"]).isdisjoint(train_table["seed"])
    assert list(held_table["seed"]) == [1004 * 10000, 1004 * 10000 + 5000]


def test_make_training_set_is_reproducible_and_varied(tmp_path):
    cases, labels, table = make_training_set(tmp_path / "a", 1, 1, seed=4)
    again, _, _ = make_training_set(tmp_path / "b", 1, 1, seed=4)
    assert [c.case_id for c in cases] == ["syn-ex000", "syn-ph000"]
    assert [lab.side for lab in labels.labels] == [None] * 4
    for c, d in zip(cases, again, strict=True):
        np.testing.assert_array_equal(np.asarray(nib.load(c.image).dataobj),
                                      np.asarray(nib.load(d.image).dataobj))
    check_training_cases(cases, labels)  # pairs on one grid, values declared
    assert set(table["kind"]) == {"example", "phantom"}
    other, _, _ = make_training_set(tmp_path / "c", 1, 0, seed=5)
    a = np.asarray(nib.load(cases[0].image).dataobj)
    b = np.asarray(nib.load(other[0].image).dataobj)
    assert a.shape != b.shape or not np.array_equal(a, b)  # another seed, another case
    with pytest.raises(ConfigError):
        make_training_set(tmp_path / "d", 0, 0)


def test_phantom_cases_vary_orientation():
    codes = {nib.aff2axcodes(phantom(f"p{k}", seed=k)[0].affine) for k in range(4)}
    assert len(codes) >= 2


# -------------------------------------------------------------------- the whole chain (slow)
@pytest.mark.slow
def test_train_export_predict_chain(tmp_path, monkeypatch):
    """Tiny real training: convert -> plan -> preprocess -> train -> validate -> export -> the
    zip segments identically in esma and nnU-Net (a few minutes on 2 cores)."""
    import shutil
    import subprocess
    import sys

    from helpers.segment import SegmentSettings, segment_cohort
    from helpers.training import train_model

    monkeypatch.setenv("ESMA_CACHE", str(tmp_path / "cache"))
    cases, labels, _ = make_training_set(tmp_path / "cases", 2, 2, seed=8)
    settings = TrainSettings(
        dataset_id=987, dataset_name="EsmaChain", folds=(0,),
        validation_cases=(cases[0].case_id, cases[2].case_id),
        small_network=SmallNetwork(features=(4, 8, 16), batch_size=2), epochs=1,
        iterations_per_epoch=2, val_iterations_per_epoch=1, device="cpu", num_threads=1,
        da_workers=1, preprocess_workers=1)
    result = train_model(cases, labels, tmp_path / "work", tmp_path / "m.zip", settings)
    assert result.model_zip.is_file()
    assert set(result.validation["case"]) == {cases[0].case_id, cases[2].case_id}
    info = load_model(result.model_zip)
    assert info.trainer == "nnUNetTrainer"
    image = cases[1].image
    out = segment_cohort([image], info, tmp_path / "esma",
                         SegmentSettings(device="cpu", split_sides=False), progress=False)
    assert out.loc[0, "status"] == "done", out.loc[0, "error"]
    inp = tmp_path / "nn_in"
    inp.mkdir()
    shutil.copy(image, inp / "x_0000.nii.gz")
    cmd = [str(Path(sys.executable).parent / "nnUNetv2_predict_from_modelfolder"), "-i",
           str(inp), "-o", str(tmp_path / "nn_out"), "-m", str(info.folder), "-f", "0",
           "-device", "cpu", "--disable_progress_bar"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    theirs = np.asarray(nib.load(tmp_path / "nn_out" / "x.nii.gz").dataobj)
    ours = np.asarray(nib.load(Path(out.loc[0, "mask"])).dataobj)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.slow
def test_training_with_unknown_voxels_uses_the_ignore_label(tmp_path, monkeypatch):
    """Partly labelled cases (value N + 1 = unknown, as the TotalSegmentator label map gives
    for the unsplit back muscles) train with nnU-Net's ignore label; the model never predicts
    it and esma reads its labels without it."""
    from helpers.segment import SegmentSettings, segment_cohort
    from helpers.training import train_model

    monkeypatch.setenv("ESMA_CACHE", str(tmp_path / "cache"))
    cases, labels, _ = make_training_set(tmp_path / "cases", 2, 2, seed=9)
    unknown = len(labels.values) + 1
    img = nib.load(cases[1].mask)
    data = np.asarray(img.dataobj).copy()
    data[np.isin(data, (1, 2))] = unknown  # multifidus and erector spinae unsplit: unknown
    nib.save(nib.Nifti1Image(data.astype(np.uint8), img.affine, img.header), cases[1].mask)
    settings = TrainSettings(
        dataset_id=986, dataset_name="EsmaIgnore", folds=(0,),
        validation_cases=(cases[0].case_id,),
        small_network=SmallNetwork(features=(4, 8, 16), batch_size=2), epochs=1,
        iterations_per_epoch=2, val_iterations_per_epoch=1, device="cpu", num_threads=1,
        da_workers=1, preprocess_workers=1, ignore_label=True)
    with pytest.raises(LabelError, match=rf"\[{unknown}\]"):
        train_model(cases, labels, tmp_path / "w0", tmp_path / "m0.zip",
                    dataclasses.replace(settings, ignore_label=False))
    result = train_model(cases, labels, tmp_path / "work", tmp_path / "m.zip", settings)
    info = load_model(result.model_zip)
    dataset = json.loads((info.folder / "dataset.json").read_text())
    assert dataset["labels"]["ignore"] == unknown
    assert [lab.value for lab in info.labels.labels] == list(labels.values)
    out = segment_cohort([cases[2].image], info, tmp_path / "esma",
                         SegmentSettings(device="cpu", split_sides=False, check_scan=False),
                         progress=False)
    assert out.loc[0, "status"] == "done", out.loc[0, "error"]
    assert unknown not in np.unique(np.asarray(nib.load(out.loc[0, "mask"]).dataobj))


def test_cli_train_reports_bad_pairs_before_training(tmp_path, capsys):
    from helpers.cli import main

    shifted = np.diag([0.9, 0.9, 4.0, 1.0])
    shifted[1, 3] = 3.0
    _pair(tmp_path / "d", "s1")
    _pair(tmp_path / "d", "s2", affine_mask=shifted)
    (tmp_path / "labels.json").write_text(json.dumps({"labels": [
        {"value": 1, "muscle": "multifidus", "side": "right"},
        {"value": 2, "muscle": "multifidus", "side": "left"}]}))
    rc = main(["train", "--images", str(tmp_path / "d"), "--masks", str(tmp_path / "d"),
               "--labels", str(tmp_path / "labels.json"), "--out", str(tmp_path / "m.zip"),
               "--work", str(tmp_path / "work"), "--folds", "0", "--small"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "s2_dseg.nii.gz" in err
    assert "1 of 2 image/mask pairs" in err
    assert not (tmp_path / "m.zip").exists()


def test_splits_single_split_and_stale_removal(tmp_path):
    from helpers.training import _write_splits

    dirs = NnunetDirs(tmp_path).make()
    settings = TrainSettings(dataset_id=600, dataset_name="S", folds=(0,), validation_cases=("b",))
    target = dirs.preprocessed / "Dataset600_S" / "splits_final.json"
    _write_splits(dirs, settings, ["a", "b", "c"])
    assert json.loads(target.read_text()) == [{"train": ["a", "c"], "val": ["b"]}]
    with pytest.raises(ConfigError, match=r"\['z'\]"):
        _write_splits(dirs, TrainSettings(dataset_id=600, dataset_name="S", folds=(0,),
                                          validation_cases=("z",)), ["a"])
    _write_splits(dirs, TrainSettings(dataset_id=600, dataset_name="S"), ["a", "b", "c"])
    assert not target.exists()  # nnU-Net makes its own 5-fold split of the current cases


def test_reader_and_resume_settings(tmp_path):
    with pytest.raises(ConfigError, match="reader"):
        TrainSettings(reader="ITKReader")
    with pytest.raises(ConfigError, match="save_every"):
        TrainSettings(save_every=0)
    cases = [_pair(tmp_path / "src", f"c{i}") for i in range(2)]
    dirs = NnunetDirs(tmp_path / "work")
    settings = TrainSettings(dataset_id=513, dataset_name="R", reader="NibabelIOWithReorient")
    folder = write_raw_dataset(cases, LABELS, dirs, settings)
    ds = json.loads((folder / "dataset.json").read_text())
    assert ds["overwrite_image_reader_writer"] == "NibabelIOWithReorient"
    plain = write_raw_dataset(cases, LABELS, dirs, TrainSettings(dataset_id=514, dataset_name="R"))
    assert "overwrite_image_reader_writer" not in json.loads((plain / "dataset.json").read_text())


def test_prepared_stamp_follows_cases_and_settings(tmp_path):
    from helpers.training import _prepared_stamp

    cases = [_pair(tmp_path / "src", f"c{i}") for i in range(2)]
    s = TrainSettings(dataset_id=515, dataset_name="R")
    a = _prepared_stamp(cases, LABELS, s)
    assert _prepared_stamp(cases, LABELS, s) == a
    # training length does not touch the prepared data; the reader and the cases do
    assert _prepared_stamp(cases, LABELS, TrainSettings(dataset_id=515, dataset_name="R",
                                                        epochs=3)) == a
    assert _prepared_stamp(cases, LABELS, TrainSettings(
        dataset_id=515, dataset_name="R", reader="NibabelIO")) != a
    assert _prepared_stamp(cases[:1], LABELS, s) != a
    img = nib.load(cases[0].image)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) + 1, img.affine), cases[0].image)
    assert _prepared_stamp(cases, LABELS, s) != a


@pytest.mark.slow
def test_interrupted_training_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """Train 2 epochs, keep only the latest checkpoint (as if killed after epoch 2), resume to 3:
    the raw and preprocessed data are reused and training restarts at epoch 2, not 0."""
    from helpers.training import train_model

    monkeypatch.setenv("ESMA_CACHE", str(tmp_path / "cache"))
    cases, labels, _ = make_training_set(tmp_path / "cases", 2, 2, seed=9)
    kw = {"dataset_id": 988, "dataset_name": "EsmaResume", "folds": (0,),
          "validation_cases": (cases[0].case_id,),
          "small_network": SmallNetwork(features=(4, 8, 16), batch_size=2),
          "iterations_per_epoch": 2, "val_iterations_per_epoch": 1, "device": "cpu",
          "num_threads": 1, "da_workers": 1, "preprocess_workers": 1,
          "reader": "NibabelIOWithReorient", "resume": True, "save_every": 1}
    first = train_model(cases, labels, tmp_path / "work", tmp_path / "m.zip",
                        TrainSettings(epochs=2, **kw))
    fold = first.model_folder / "fold_0"
    # killed after epoch 2's checkpoint: nnU-Net removes checkpoint_latest at a normal end, so
    # the final checkpoint (the state after epoch 2) stands in for it
    (fold / "checkpoint_final.pth").rename(fold / "checkpoint_latest.pth")
    second = train_model(cases, labels, tmp_path / "work", tmp_path / "m.zip",
                         TrainSettings(epochs=3, **kw))
    assert second.stage_seconds["convert"] == 0.0
    logs = sorted((tmp_path / "work" / "logs").glob("train_fold_0_resumed_*.log"))
    assert len(logs) == 1
    text = logs[0].read_text()
    assert "resuming from" in text
    assert "at epoch 2" in text
    assert "Epoch 2" in text
    assert "Epoch 0" not in text
    assert (fold / "checkpoint_final.pth").is_file()
    assert load_model(second.model_zip).reader == "NibabelIOWithReorient"
