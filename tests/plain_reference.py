"""Plain reference computations that the fast paths of helpers.fat are checked against."""

import numpy as np
from scipy import ndimage as ndi


def plain_border_connected(mask: np.ndarray, ax: int) -> np.ndarray:
    """``ndi.label`` with an in-plane cross, then the labels touching a slice border."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1, 1, 1] = True
    for a in range(3):
        if a != ax:
            for end in (0, 2):
                idx = [1, 1, 1]
                idx[a] = end
                structure[tuple(idx)] = True
    lab, n = ndi.label(mask, structure=structure)
    moved = np.moveaxis(lab, ax, -1)
    touch = np.zeros(n + 1, dtype=bool)
    touch[np.concatenate([moved[0].ravel(), moved[-1].ravel(), moved[:, 0].ravel(),
                          moved[:, -1].ravel()])] = True
    touch[0] = False
    return touch[lab]
