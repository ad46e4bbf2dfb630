"""Train / validation / test sets of the ISBI 2015 cephalometric data, real or embedded."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from monai.data import PILReader

from monai_amat.data.isbi2015 import isbi2015_datalist, isbi2015_split
from monai_amat.data.synthetic import make_embedded_isbi2015
from monai_amat.data.utils import add_sample_index, data_root

__all__ = ["isbi2015_sets", "ceph_reader"]


def ceph_reader() -> PILReader:
    """MONAI's PIL reader set up for cephalograms.

    Returns:
        A reader giving ``(H, W)`` arrays (row-major, as the landmarks' x, y expect), grayscale whatever the BMP's
        colour mode.
    """
    return PILReader(reverse_indexing=False, converter=lambda image: image.convert("L"))


def isbi2015_sets(
    data_source: str,
    dataset_dir: str | os.PathLike | None = None,
    embedded_dir: str | os.PathLike | None = None,
    embedded_cases: int = 20,
    embedded_size: Sequence[int] = (160, 200),
    seed: int = 0,
    use_doctors: str = "both",
) -> dict[str, Any]:
    """The paper's split (train 1-150, validation 151-200, test 201-300) of the real data or the embedded set.

    Args:
        data_source: ``"embedded"`` (generate once into ``embedded_dir``) or ``"real"`` (read ``dataset_dir``).
        dataset_dir: the ISBI 2015 folder (``"real"``).
        embedded_dir: where the embedded set is generated.
        embedded_cases: number of embedded images.
        embedded_size: ``(width, height)`` of the embedded images.
        seed: seeds the embedded set.
        use_doctors: ``"both"``, ``"senior"`` or ``"junior"``.

    Returns:
        ``{"train", "val", "test"}`` datalists (training items carry an ``"index"``).

    Raises:
        ValueError: for an unknown ``data_source`` or a missing folder argument.
    """
    root = data_root(
        data_source,
        dataset_dir,
        embedded_dir,
        lambda folder: make_embedded_isbi2015(folder, num_images=embedded_cases, seed=seed, size=tuple(embedded_size)),
        "the ISBI 2015 folder holding RawImage/",
    )
    ids = None if data_source == "embedded" else range(1, 301)  # the embedded ids are not the paper's
    split = isbi2015_split(isbi2015_datalist(root, ids=ids, use_doctors=use_doctors))
    return {"train": add_sample_index(split["train"]), "val": split["val"], "test": split["test"]}
