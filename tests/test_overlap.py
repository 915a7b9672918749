"""The one Dice of esma (helpers.overlap), checked against hand-computed overlaps."""

import math

import numpy as np
import pytest

from helpers import qc
from helpers.labels import parse_labels
from helpers.overlap import dice, dice_per_label


def test_dice_per_label_on_tiny_arrays():
    a = np.array([[1, 1, 0, 0], [2, 2, 2, 0], [0, 0, 0, 0]])
    b = np.array([[1, 0, 0, 0], [2, 2, 0, 0], [0, 0, 2, 0]])
    # label 1: |A| = 2, |B| = 1, overlap 1; label 2: |A| = 3, |B| = 3, overlap 2; 3 in neither
    d = dice_per_label(a, b, [1, 2, 3])
    assert d[1] == pytest.approx(2 / 3)
    assert d[2] == pytest.approx(2 * 2 / 6)
    assert math.isnan(d[3])
    assert dice_per_label(a, a, [1, 2]) == {1: 1.0, 2: 1.0}
    assert dice_per_label(np.array([1, 0]), np.array([0, 1]), [1]) == {1: 0.0}
    with pytest.raises(ValueError, match="shapes differ"):
        dice_per_label(a, b[:2], [1])


def test_binary_dice_and_qc_table_agree_with_hand_counts():
    a = np.array([[1, 1, 0], [0, 1, 0]], dtype=bool)  # |A| = 3
    b = np.array([[0, 1, 1], [0, 1, 1]], dtype=bool)  # |B| = 4, |A n B| = 2
    assert dice(a, b) == pytest.approx(4 / 7)
    table = parse_labels({"labels": [{"value": 1, "muscle": "erector_spinae", "side": "left"}]})
    rows = qc.dice_table(a.astype(int), b.astype(int), table).to_dict("records")
    assert rows[0]["n_auto"] == 3
    assert rows[0]["n_manual"] == 4
    assert rows[0]["n_overlap"] == 2
    assert rows[0]["dice"] == pytest.approx(4 / 7)
