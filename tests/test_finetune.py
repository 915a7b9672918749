"""Fine-tuning a parent model on corrected cases (esma train --init-from): its plans and weights
start the training, its labels must match, the exported card names it and the cases."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from helpers.errors import ConfigError, ModelError
from helpers.labels import parse_labels
from helpers.segment import load_model
from helpers.training import (
    SmallNetwork,
    TrainingCase,
    TrainSettings,
    _parent_plans,
    make_untrained_model,
    parent_card,
    parent_checkpoint,
)

SIDED = parse_labels(
    {
        "labels": [
            {"value": 1, "muscle": "multifidus", "side": "right"},
            {"value": 2, "muscle": "multifidus", "side": "left"},
        ]
    }
)


@pytest.fixture
def parent(tmp_path) -> Path:
    return make_untrained_model(tmp_path / "parent", SIDED, folds=(0, 1))


def test_parent_card_names_the_parent_and_the_cases(parent, tmp_path):
    cases = [TrainingCase("b-2", tmp_path / "b.nii.gz", tmp_path / "bm.nii.gz"),
             TrainingCase("a-1", tmp_path / "a.nii.gz", tmp_path / "am.nii.gz")]
    card = parent_card(parent, SIDED, cases)
    info = load_model(parent)
    assert card["parent_model"]["sha256"] == info.sha256
    assert card["parent_model"]["file"] == parent.name
    assert card["parent_model"]["configuration"] == "2d"
    assert card["fine_tuned_on"] == ["a-1", "b-2"]


def test_parent_with_other_labels_is_refused_naming_it(parent):
    other = parse_labels({"labels": [{"value": 1, "muscle": "psoas_major", "side": "right"},
                                     {"value": 2, "muscle": "psoas_major", "side": "left"}]})
    with pytest.raises(ModelError, match="differ from the training labels") as info:
        parent_card(parent, other, [])
    assert info.value.path.name == parent.name


def test_parent_checkpoint_same_fold_else_first(parent):
    assert parent_checkpoint(parent, 1) == parent / "fold_1" / "checkpoint_final.pth"
    assert parent_checkpoint(parent, 3) == parent / "fold_0" / "checkpoint_final.pth"


def test_parent_plans_keep_the_network_and_rename_the_dataset(parent, tmp_path):
    settings = TrainSettings(dataset_id=600, dataset_name="Tuned", folds=(0,),
                             init_from=str(parent))
    pre = tmp_path / "pre"
    pre.mkdir()
    name = _parent_plans(settings, pre)
    assert name == "esmaUntrainedPlans"
    written = json.loads((pre / f"{name}.json").read_text())
    original = json.loads((parent / "plans.json").read_text())
    assert written["dataset_name"] == "Dataset600_Tuned"
    assert written["configurations"] == original["configurations"]
    with pytest.raises(ConfigError, match="configuration='2d'"):
        _parent_plans(TrainSettings(configuration="3d_fullres", init_from=str(parent)), pre)
    with pytest.raises(ConfigError, match="drop small_network"):
        TrainSettings(init_from=str(parent), small_network=SmallNetwork())


@pytest.mark.slow
def test_fine_tune_chain_exports_a_card_and_compares_on_held_out(tmp_path, monkeypatch):
    """Tiny real fine-tuning (1 epoch x 2 iterations on CPU) from a random-weight parent."""
    from helpers.training import compare_models, train_model
    from helpers.trainset import make_training_set

    monkeypatch.setenv("ESMA_CACHE", str(tmp_path / "cache"))
    cases, labels, _ = make_training_set(tmp_path / "cases", 2, 1, seed=21, merge_sides=False)
    parent = make_untrained_model(tmp_path / "parent", labels, folds=(0,))
    settings = TrainSettings(
        dataset_id=988, dataset_name="EsmaTune", folds=(0,),
        validation_cases=(cases[0].case_id,), epochs=1, iterations_per_epoch=2,
        val_iterations_per_epoch=1, device="cpu", num_threads=1, da_workers=1,
        preprocess_workers=1, init_from=str(parent))
    result = train_model(cases[:2], labels, tmp_path / "work", tmp_path / "tuned.zip", settings)
    with zipfile.ZipFile(result.model_zip) as zf:
        card_name = next(n for n in zf.namelist() if n.endswith("esma_model.json"))
        card = json.loads(zf.read(card_name))
    assert card["parent_model"]["sha256"] == load_model(parent).sha256
    assert card["fine_tuned_on"] == sorted(c.case_id for c in cases[:2])
    assert card["training"]["settings"]["init_from"] == str(parent)
    table = compare_models({"before": parent, "after": result.model_zip}, cases[2:], labels,
                           tmp_path / "held", device="cpu")
    assert set(table["model"]) == {"before", "after"}
    assert len(table) == 2 * len(labels.values)
    assert table["dice"].between(0, 1).all()


def test_compare_models_scores_raw_predictions_without_the_scan_checks(tmp_path, monkeypatch):
    """A model that misses a label scores Dice 0 for it (the scan checks would withhold its
    mask), and predictions are in the label space of the reference: sides split only for sided
    labels (unsided references against sided predictions compared different muscles)."""
    import nibabel as nib
    import numpy as np
    import pandas as pd

    from helpers import segment
    from helpers.training import compare_models

    ref = np.zeros((6, 6, 3), np.uint8)
    ref[1:3, 1:3] = 1
    ref[4:6, 4:6] = 2
    nib.save(nib.Nifti1Image(ref, np.eye(4)), tmp_path / "ref.nii.gz")
    seen = []

    def fake_cohort(images, model, out_dir, settings, progress):
        seen.append(settings)
        out_dir.mkdir(parents=True)
        pred = ref.copy()
        pred[pred == 2] = 0  # this model misses label 2
        nib.save(nib.Nifti1Image(pred, np.eye(4)), out_dir / "p.nii.gz")
        return pd.DataFrame({"image": [str(images[0])], "mask": [str(out_dir / "p.nii.gz")]})

    monkeypatch.setattr(segment, "segment_cohort", fake_cohort)
    case = TrainingCase("c1", tmp_path / "img.nii.gz", tmp_path / "ref.nii.gz")
    table = compare_models({"m": "model.zip"}, [case], SIDED, tmp_path / "seg")
    assert [(s.check_scan, s.split_sides) for s in seen] == [(False, True)]
    dice = table.set_index("value")["dice"]
    assert dice[1] == pytest.approx(1.0)
    assert dice[2] == pytest.approx(0.0)
    unsided = parse_labels(
        {"labels": [{"value": 1, "muscle": "multifidus"}, {"value": 2, "muscle": "psoas_major"}]}
    )
    table = compare_models({"m": "model.zip"}, [case], unsided, tmp_path / "seg2")
    assert [(s.check_scan, s.split_sides) for s in seen[1:]] == [(False, False)]
    assert table.set_index("muscle")["dice"].to_dict() == pytest.approx(
        {"multifidus": 1.0, "psoas_major": 0.0}
    )
