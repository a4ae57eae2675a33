"""The paper's own numbers (Zeiler & Fergus 2014), in one place: the studies put them beside
ours in their tables (correspondence, transfer) and the report shows them.

Values are as printed: Table 1 as Δ mean ± std, Tables 4/5/7 as accuracy in percent (± std over
splits), Table 6 as mean average precision in percent. `None` std means the paper gives none.
"""

from __future__ import annotations

import math

# Table 1: correspondence Δ at layer 5 and layer 7, per occluded part (and random control).
TABLE1 = {
    "right_eye": {5: (0.067, 0.007), 7: (0.069, 0.015)},
    "left_eye": {5: (0.069, 0.007), 7: (0.068, 0.013)},
    "nose": {5: (0.079, 0.017), 7: (0.069, 0.011)},
    "random": {5: (0.107, 0.017), 7: (0.073, 0.014)},
}

# Table 4 (Caltech-101) and Table 5 (Caltech-256): mean per-class accuracy by training images
# per class, ImageNet-pretrained features vs the same net trained from scratch.
TABLE4 = {
    "pretrained": {15: (83.8, 0.5), 30: (86.5, 0.5)},
    "scratch": {15: (22.8, 1.5), 30: (46.5, 1.7)},
}
TABLE5 = {
    "pretrained": {15: (65.7, 0.2), 30: (70.6, 0.2), 45: (72.7, 0.4), 60: (74.2, 0.3)},
    "scratch": {15: (9.0, 1.4), 30: (22.5, 0.7), 45: (31.2, 0.5), 60: (38.8, 1.4)},
}

# Table 6: PASCAL VOC 2012, mean average precision over the 20 classes.
TABLE6_MEAN_AP = 79.0

# Table 7: classifiers on the features of one layer; Caltech-101 at 30 and Caltech-256 at 60
# images per class. Softmax on layers 5 and 7, linear SVM on layers 1-5 and 7 (SVM means only).
TABLE7 = {
    "caltech101": {
        "shots": 30,
        "softmax": {5: (82.9, 0.4), 7: (85.4, 0.4)},
        "svm": {1: (44.8, None), 2: (66.2, None), 3: (72.3, None), 4: (76.6, None), 5: (86.2, None), 7: (85.5, None)},
    },
    "caltech256": {
        "shots": 60,
        "softmax": {5: (65.7, 0.5), 7: (72.6, 0.1)},
        "svm": {1: (24.6, None), 2: (39.6, None), 3: (46.0, None), 4: (51.3, None), 5: (65.6, None), 7: (71.7, None)},
    },
}

# The paper's tables per transfer target (for "paper" columns); other targets have none.
TRANSFER_TABLES = {"caltech101": ("Table 4", TABLE4), "caltech256": ("Table 5", TABLE5)}


def fmt(value, digits: int = 1) -> str:
    """A (mean, std) pair as the paper prints it: 'mean ± std', the mean alone where std is None
    or NaN, and an em dash where there is no number (None or a NaN mean)."""
    if value is None:
        return "—"
    mean, std = value
    if mean is None or math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f}" if std is None or math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"
