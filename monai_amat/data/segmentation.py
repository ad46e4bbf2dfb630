"""2D slice data sets from MSD volumes, as the paper's nnU-Net 2D trained on them."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, NormalizeIntensityd, Resized

from monai_amat.data.msd import check_case, read_msd, split_cases
from monai_amat.data.synthetic import make_embedded_msd
from monai_amat.data.utils import add_sample_index, data_root
from monai_amat.utils import root_cause

__all__ = ["volume_transforms", "volume_slices", "volume_cases", "check_volume", "msd_slices", "msd_volumes"]


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
    return Compose([*_loading(keys), *_resampling(spatial_size, keys)])


def _loading(keys: Sequence[str]) -> list:
    return [LoadImaged(keys, image_only=True), EnsureChannelFirstd(keys)]


def _resampling(spatial_size: Sequence[int], keys: Sequence[str]) -> list:
    modes = ["bilinear" if k == "image" else "nearest" for k in keys]
    return [
        NormalizeIntensityd("image", channel_wise=True),
        Resized(keys, spatial_size=(*spatial_size, -1), mode=modes, anti_aliasing=False),
    ]


def check_volume(path: str, array: Any, label: bool = False, num_classes: int | None = None) -> None:
    """Refuse an image or label map with NaN/inf voxels, or a label map whose values are not class indices.

    One NaN voxel would turn the whole volume into NaN after the per-volume z-score, and every score computed on it
    into 0, without an error; a label value outside the classes fails much later in a one-hot without naming the file,
    and a value 0.5 would be truncated to background.

    Args:
        path: the file, for the message.
        array: its voxels.
        label: the file is a label map: its values must be integers >= 0.
        num_classes: for a label map, the number of labels ``dataset.json`` declares (background included), which
            its values must stay below; None: no upper bound.

    Raises:
        ValueError: naming the file, the number of bad voxels and example values.
    """
    values = np.asarray(array)
    bad = ~np.isfinite(values)
    if bad.any():
        raise ValueError(f"{path}: {int(bad.sum())} voxel(s) are NaN or inf; fix or remove this file.")
    if not label:
        return
    bad = (values != np.round(values)) | (values < 0) | (values >= (num_classes or np.inf))
    if bad.any():
        classes = f"integers 0..{num_classes - 1}" if num_classes else "integers >= 0"
        examples = np.unique(values[bad])[:5].tolist()
        raise ValueError(
            f"{path}: {int(bad.sum())} voxel(s) are not a label of dataset.json ({classes}), e.g. {examples}."
        )


def _read_volumes(
    cases: Sequence[dict[str, str]], spatial_size: Sequence[int], num_classes: int | None
) -> Iterator[tuple[dict[str, str], np.ndarray, np.ndarray]]:
    """Each case's preprocessed ``(image (C, H, W, D), label (1, H, W, D))``, every file checked as it is read."""
    loaders = {key: Compose(_loading([key])) for key in ("image", "label")}
    resample = Compose(_resampling(spatial_size, ("image", "label")))
    for case in cases:
        volume = {}
        for key, load in loaders.items():
            try:
                volume.update(load({key: case[key]}))
            except Exception as e:  # MONAI's error does not name the file (e.g. EOFError of a truncated .nii.gz)
                raise ValueError(f"{case[key]} cannot be read ({root_cause(e)}).") from e
        check_volume(case["image"], volume["image"])
        check_volume(case["label"], volume["label"], label=True, num_classes=num_classes)
        volume = resample(volume)
        yield case, np.asarray(volume["image"], dtype=np.float32), np.asarray(volume["label"], dtype=np.float32)


def volume_slices(
    cases: Sequence[dict[str, str]], spatial_size: Sequence[int], num_classes: int | None = None
) -> list[dict[str, Any]]:
    """Every axial slice of every case as a 2D sample; every file is checked as it is read.

    Args:
        cases: ``{"image", "label", "case"}`` dicts (paths).
        spatial_size: the in-plane size ``(H, W)``.
        num_classes: the labels ``dataset.json`` declares, background included (checked in every label map; None
            checks only that labels are non-negative integers).

    Returns:
        ``{"image": (C, H, W) float32, "label": (1, H, W) float32, "case": name, "slice": k}`` dicts, cases in order.

    Raises:
        ValueError: naming the file that cannot be read (e.g. a truncated ``.nii.gz``), has NaN/inf voxels, or has
            label values that are not class indices.
    """
    return [
        {
            "image": np.ascontiguousarray(image[..., k]),
            "label": np.ascontiguousarray(label[..., k]),
            "case": case["case"],
            "slice": k,
        }
        for case, image, label in _read_volumes(cases, spatial_size, num_classes)
        for k in range(image.shape[-1])
    ]


def volume_cases(
    cases: Sequence[dict[str, str]], spatial_size: Sequence[int], num_classes: int | None = None
) -> list[dict[str, Any]]:
    """Every case as one 3D sample, preprocessed as the slices of :py:func:`volume_slices` (for 3D training).

    Args:
        cases: ``{"image", "label", "case"}`` dicts (paths).
        spatial_size: the in-plane size ``(H, W)``; the number of slices is kept.
        num_classes: as in :py:func:`volume_slices`.

    Returns:
        ``{"image": (C, H, W, D) float32, "label": (1, H, W, D) float32, "case": name}`` dicts, cases in order.

    Raises:
        ValueError: as :py:func:`volume_slices`.
    """
    return [
        {"image": image, "label": label, "case": case["case"]}
        for case, image, label in _read_volumes(cases, spatial_size, num_classes)
    ]


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
    *,
    volumes: bool = False,
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
        volumes: whole cases as samples instead of their slices (:py:func:`msd_volumes`).

    Returns:
        ``{"train": [...], "val": [...], "test": [...], "in_channels": number of modalities,
        "out_channels": number of labels (background included), "labels": dataset.json labels}``; training slices
        carry an ``"index"``.

    Raises:
        ValueError: for an unknown ``data_source`` or a missing folder argument; the MSD reader's errors for bad
            data; a file that cannot be read, or with NaN/inf voxels or labels outside ``dataset.json``'s
            (:py:func:`volume_slices`).
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
    num_classes = len(dataset.labels)
    samples = volume_cases if volumes else volume_slices
    return {
        "train": add_sample_index(samples(train, spatial_size, num_classes)),
        "val": samples(val, spatial_size, num_classes),
        "test": samples(test, spatial_size, num_classes),
        "in_channels": len(dataset.modalities),
        "out_channels": num_classes,
        "labels": dataset.labels,
    }


def msd_volumes(data_source: str, task: str, spatial_size: Sequence[int], **kwargs: Any) -> dict[str, Any]:
    """The train / validation / test volume sets of an MSD task: :py:func:`msd_slices` with whole cases as samples.

    Each training case carries an ``"index"``: in 3D, AMAT keeps one margin per case (its patches change from epoch
    to epoch, as augmentation changes a slice).

    Args:
        data_source: as in :py:func:`msd_slices`.
        task: as in :py:func:`msd_slices`.
        spatial_size: in-plane size ``(H, W)``; the number of slices is kept.
        kwargs: ``dataset_dir``, ``embedded_dir``, ``embedded_cases``, ``seed``, ``num_folds``, ``fold`` as in
            :py:func:`msd_slices`.

    Returns:
        As :py:func:`msd_slices`, with :py:func:`volume_cases` items.

    Raises:
        ValueError: as :py:func:`msd_slices`.
    """
    return msd_slices(data_source, task, spatial_size, volumes=True, **kwargs)
