"""What a labelled dataset needs before it can be split: checked at export and at prepare.

Every class gets at least one image in each of train, val and test (see `splits.py`), so a
class needs 3 images, or, when the source has an official test set, 2 outside it and 1 in
it. A single class is refused: class-conditional generation and the judges need several.
"""

from __future__ import annotations

import numpy as np

from genpipe.data.raw import DataError

MIN_CLASSES = 2
MIN_PER_CLASS = 3  # one image per split


def check_classes(
    labels: np.ndarray, classes: list[str], test_indices: list[int] | None, where: str
) -> None:
    """Raise a DataError naming `where` and the first class that cannot fill every split."""
    if len(classes) < MIN_CLASSES:
        raise DataError(
            f"{where}: {len(classes)} class ({', '.join(map(repr, classes))}); a class-"
            f"conditional model needs at least {MIN_CLASSES}: add a sub-folder per class"
        )
    in_test = np.zeros(len(labels), bool)
    if test_indices is not None:
        in_test[test_indices] = True
    train = np.bincount(labels[~in_test], minlength=len(classes))
    test = np.bincount(labels[in_test], minlength=len(classes))
    for name, n_train, n_test in zip(classes, train, test):
        if test_indices is None and n_train < MIN_PER_CLASS:
            raise DataError(
                f"{where}: class '{name}' has {n_train} image(s); every class needs at least "
                f"{MIN_PER_CLASS} (one per split): add images or remove the class"
            )
        if test_indices is not None and (n_train < 2 or n_test < 1):
            raise DataError(
                f"{where}: class '{name}' has {n_train} image(s) outside the official test set "
                f"and {n_test} in it; every class needs at least 2 outside (train and val) "
                "and 1 in it: add images or remove the class"
            )
