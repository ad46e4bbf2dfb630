"""2D slice data sets from MSD volumes, as the paper's nnU-Net 2D trained on them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, NormalizeIntensityd, Resized

from monai_amat.data.msd import check_case, make_embedded_msd, read_msd, split_cases
from monai_amat.data.utils import add_sample_index, data_root

__all__ = ["volume_transforms", "volume_slices", "msd_slices"]


def volume_transforms(spatial_size: Sequence[int], keys: Sequence[str] = ("image", "label")) -> Compose:
    """Per-volume preprocessing shared by training, evaluation and inference.

    Loads the NIfTI files (modalities as channels), z-scores each channel of each volume, and resizes the axial
    plane to ``spatial_size`` keeping the number of slices. Inference inverts these with ``Invertd``.

    Args:
        spatial_size: the in-plane size ``(H, W)`` of the network input.
        keys: ``("image",)`` for inference, ``("image", "label")`` otherwise.

    Returns:
        The composed transform.
    """
    modes = ["bilinear" if k == "image" else "nearest" for k in keys]
    return Compose(
        [
            LoadImaged(keys, image_only=True),
            EnsureChannelFirstd(keys),
            NormalizeIntensityd("image", channel_wise=True),
            Resized(keys, spatial_size=(*spatial_size, -1), mode=modes, anti_aliasing=False),
        ]
    )


def volume_slices(cases: Sequence[dict[str, str]], spatial_size: Sequence[int]) -> list[dict[str, Any]]:
    """Every axial slice of every case as a 2D sample.

    Args:
        cases: ``{"image", "label", "case"}`` dicts (paths).
        spatial_size: the in-plane size ``(H, W)``.

    Returns:
        ``{"image": (C, H, W) float32, "label": (1, H, W) float32, "case": name, "slice": k}`` dicts, cases in order.
    """
    transform = volume_transforms(spatial_size)
    out = []
    for case in cases:
        volume = transform({"image": case["image"], "label": case["label"]})
        image = np.asarray(volume["image"], dtype=np.float32)
        label = np.asarray(volume["label"], dtype=np.float32)
        for k in range(image.shape[-1]):
            out.append(
                {
                    "image": np.ascontiguousarray(image[..., k]),
                    "label": np.ascontiguousarray(label[..., k]),
                    "case": case["case"],
                    "slice": k,
                }
            )
    return out


def msd_slices(
    data_source: str,
    task: str,
    spatial_size: Sequence[int],
    dataset_dir: str | os.PathLike | None = None,
    embedded_dir: str | os.PathLike | None = None,
    embedded_cases: int = 8,
    seed: int = 0,
    num_folds: int = 5,
    fold: int = 1,
) -> dict[str, Any]:
    """The train / validation / test slice sets of an MSD task, from the real data or the embedded set.

    Args:
        data_source: ``"embedded"`` (generate a small set in the MSD layout into ``embedded_dir`` once) or
            ``"real"`` (read ``dataset_dir``).
        task: the MSD task folder name, e.g. ``"Task04_Hippocampus"``.
        spatial_size: in-plane network input size ``(H, W)``.
        dataset_dir: the task folder holding ``dataset.json`` (``"real"``).
        embedded_dir: where the embedded set is generated (``"embedded"``).
        embedded_cases: number of embedded cases.
        seed: seeds the embedded data and the split.
        num_folds: folds of the split.
        fold: the held-out fold.

    Returns:
        ``{"train": [...], "val": [...], "test": [...], "in_channels": number of modalities,
        "out_channels": number of labels (background included), "labels": dataset.json labels}``; training slices
        carry an ``"index"``.

    Raises:
        ValueError: for an unknown ``data_source`` or a missing folder argument; the MSD reader's errors for bad
            data.
    """
    root = data_root(
        data_source,
        dataset_dir,
        embedded_dir,
        lambda folder: make_embedded_msd(folder, task, num_cases=embedded_cases, seed=seed),
        "the MSD task folder holding dataset.json",
    )
    dataset = read_msd(root, task)
    for case in dataset.cases:
        check_case(case)
    train, val, test = split_cases(dataset.cases, num_folds=num_folds, fold=fold, seed=seed)
    return {
        "train": add_sample_index(volume_slices(train, spatial_size)),
        "val": volume_slices(val, spatial_size),
        "test": volume_slices(test, spatial_size),
        "in_channels": len(dataset.modalities),
        "out_channels": len(dataset.labels),
        "labels": dataset.labels,
    }
