"""Detection data plumbing: BCCD's train / validation / test sets, batches of varying box counts, prepare_batch.

``prepare_batch`` turns a batch into images plus one target dict per image, as MONAI's detector takes them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.data import MetaTensor, list_data_collate
from monai.engines.utils import PrepareBatch

from monai_amat.data.bccd import bccd_datalist
from monai_amat.data.synthetic import make_embedded_bccd
from monai_amat.data.utils import add_sample_index, data_root

__all__ = ["bccd_sets", "detection_collate", "PrepareDetectionBatch"]


def bccd_sets(
    data_source: str,
    dataset_dir: str | os.PathLike | None = None,
    embedded_dir: str | os.PathLike | None = None,
    embedded_cases: int = 40,
    embedded_size: Sequence[int] = (320, 240),
    seed: int = 0,
    class_map: Mapping[str, int] | None = None,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """The BCCD splits (``ImageSets/Main/{train,val,test}.txt``) of the real data or of the embedded set.

    Args:
        data_source: ``"embedded"`` (generate once into ``embedded_dir``) or ``"real"`` (read ``dataset_dir``).
        dataset_dir: the BCCD folder, or the folder holding it (``"real"``).
        embedded_dir: where the embedded set is generated.
        embedded_cases: number of embedded images.
        embedded_size: ``(width, height)`` of the embedded images.
        seed: seeds the embedded set.
        class_map: class name to label (default RBC 0, WBC 1, Platelets 2).
        num_classes: the network's number of classes; every label of ``class_map`` must be below it.

    Returns:
        ``{"train", "val", "test"}`` datalists (see :py:func:`monai_amat.data.bccd_datalist`); training items carry
        an ``"index"``.

    Raises:
        ValueError: for an unknown ``data_source`` or a missing folder argument, a ``class_map`` label outside
            ``0 .. num_classes - 1``, or a training split without any box; :py:func:`monai_amat.data.bccd_datalist`'s
            errors for bad files.
    """
    if num_classes is not None and class_map is not None:
        outside = {name: label for name, label in class_map.items() if not 0 <= int(label) < num_classes}
        if outside:
            raise ValueError(
                f"class_map labels {outside} are outside 0..{num_classes - 1}: the network has {num_classes} classes "
                "(`class_names`); give one name per label in `class_names`."
            )
    root = data_root(
        data_source,
        dataset_dir,
        embedded_dir,
        lambda folder: make_embedded_bccd(folder, num_images=embedded_cases, seed=seed, size=tuple(embedded_size)),
        "the BCCD folder holding JPEGImages/",
    )
    sets = {split: bccd_datalist(root, split, class_map) for split in ("train", "val", "test")}
    if not any(len(item["boxes"]) for item in sets["train"]):
        raise ValueError(
            f"BCCD data set {root}: the {len(sets['train'])} training image(s) of ImageSets/Main/train.txt hold no box "
            "at all; a detector cannot learn from them."
        )
    sets["train"] = add_sample_index(sets["train"])
    return sets


def detection_collate(batch: Sequence[Mapping[str, Any]], list_keys: Sequence[str] = ("boxes", "labels")) -> dict:
    """Collate detection items, keeping the per-object keys as lists.

    ``list_keys`` (one entry per object, so of varying length) stay lists of per-item values; the rest is collated
    by MONAI's ``list_data_collate``.

    Args:
        batch: the items.
        list_keys: the keys kept as lists of per-item values.

    Returns:
        The batch dict.
    """
    lists = {k: [item[k] for item in batch] for k in list_keys if all(k in item for item in batch)}
    rest = list_data_collate([{k: v for k, v in item.items() if k not in lists} for item in batch])
    return {**rest, **lists}


class PrepareDetectionBatch(PrepareBatch):
    """``prepare_batch`` for detection engines: images, and one ``{box_key, label_key, image_size_key}`` dict per image.

    Args:
        image_key: the images' key.
        box_key: the ``(N, 2 * dims)`` boxes' key (in the batch and in the targets).
        label_key: the ``(N,)`` labels' key (likewise).
        image_size_key: the targets' key of the images' spatial size (a tuple of ints), on which
            :py:class:`~monai_amat.losses.PerImageDetectionLoss` lays out its anchors.
    """

    def __init__(
        self,
        image_key: str = "image",
        box_key: str = "boxes",
        label_key: str = "labels",
        image_size_key: str = "image_size",
    ) -> None:
        self.image_key = image_key
        self.box_key = box_key
        self.label_key = label_key
        self.image_size_key = image_size_key

    def __call__(
        self,
        batchdata: dict[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """``(images, targets)`` on ``device``: images as a plain tensor, float boxes, int64 labels, the image size.

        Raises:
            KeyError: when the batch lacks the image, box or label key.
        """
        missing = [k for k in (self.image_key, self.box_key, self.label_key) if k not in batchdata]
        if missing:
            raise KeyError(f"detection batch lacks {missing}; it has {sorted(batchdata)}.")
        images = batchdata[self.image_key]
        # plain tensors: image metadata is not needed by the detector, and MetaTensor ops cost more per call
        images = images.as_tensor() if isinstance(images, MetaTensor) else torch.as_tensor(images)
        images = images.to(device=device, non_blocking=non_blocking, **kwargs)
        targets = [
            {
                self.box_key: torch.as_tensor(boxes).float().reshape(-1, 2 * (images.dim() - 2)).to(device),
                self.label_key: torch.as_tensor(labels).long().reshape(-1).to(device),
                self.image_size_key: tuple(images.shape[2:]),
            }
            for boxes, labels in zip(batchdata[self.box_key], batchdata[self.label_key])
        ]
        return images, targets
