"""Resizing detection images together with their boxes, and mapping predicted boxes back to the original image."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import InvertibleTransform, MapTransform, Resize, SpatialPad

__all__ = ["ResizeWithBoxesd", "ResizeWithBoxesD", "ResizeWithBoxesDict", "boxes_to_original"]


def boxes_to_original(boxes: Any, scale: Sequence[float], orig_size: Sequence[int]) -> np.ndarray:
    """Map boxes of a resized image back to its original pixels, clipped to the original image.

    Args:
        boxes: ``(N, 2 * dims)`` corner boxes (``xmin, ymin, xmax, ymax`` in 2D) on the resized grid.
        scale: the per-axis factor the image was resized by (as stored by :py:class:`ResizeWithBoxesd`).
        orig_size: the original spatial size, in the same axis order.

    Returns:
        ``(N, 2 * dims)`` float32 boxes in original pixels.
    """
    scale = np.asarray(scale, dtype=np.float64)
    out = np.asarray(torch.as_tensor(boxes).detach().cpu().double(), dtype=np.float64).reshape(-1, 2 * len(scale))
    out = out / np.concatenate([scale, scale])
    return np.clip(out, 0.0, np.concatenate([orig_size, orig_size]).astype(np.float64)).astype(np.float32)


class ResizeWithBoxesd(MapTransform, InvertibleTransform):
    """Fit an image into ``spatial_size`` keeping its aspect ratio, pad the rest at the end, and scale its boxes.

    The image ``(C, *spatial)`` is resized by ``min(spatial_size / spatial)`` (as YOLO's letterbox does, so cells
    keep their shape) and zero-padded after its last row and column to exactly ``spatial_size``; boxes in corner
    mode (``xmin, ymin, xmax, ymax`` with x along the first spatial axis, MONAI's convention) are scaled by the
    resize's actual per-axis factor. The factor and the original size are stored so predictions can be mapped
    back with :py:func:`boxes_to_original`. The resize and the padding are recorded in a MetaTensor image's applied
    operations, so :py:meth:`inverse` (and MONAI's ``Invertd``) restores the original grid.

    Args:
        keys: the image key.
        box_key: the ``(N, 2 * dims)`` boxes (optional in the data: inference has none).
        spatial_size: the output size.
        scale_key: where to store the per-axis factor.
        orig_size_key: where to store the original spatial size.
        mode: interpolation mode of the image.
        allow_missing_keys: skip a missing image key.
    """

    def __init__(
        self,
        keys: KeysCollection,
        box_key: str = "boxes",
        spatial_size: Sequence[int] = (320, 256),
        scale_key: str = "box_scale",
        orig_size_key: str = "orig_size",
        mode: str = "area",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.box_key = box_key
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.scale_key = scale_key
        self.orig_size_key = orig_size_key
        self.mode = mode
        self.pad = SpatialPad(self.spatial_size, method="end")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Resize and pad the image(s), scale the boxes.

        Raises:
            ValueError: when an image's spatial dimensions differ from ``spatial_size``'s.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            orig = tuple(int(s) for s in d[key].shape[1:])
            if len(orig) != len(self.spatial_size):
                raise ValueError(f"image {key!r} has spatial shape {orig}; spatial_size is {self.spatial_size}.")
            factor = min(t / s for t, s in zip(self.spatial_size, orig))
            size = tuple(min(t, max(1, round(s * factor))) for t, s in zip(self.spatial_size, orig))
            d[key] = self.pad(Resize(size, mode=self.mode)(d[key]))
            scale = np.array([n / s for n, s in zip(size, orig)], dtype=np.float32)
            d[self.scale_key] = scale
            d[self.orig_size_key] = np.asarray(orig)
            if self.box_key in d:
                boxes = np.asarray(d[self.box_key], dtype=np.float32).reshape(-1, 2 * len(orig))
                d[self.box_key] = boxes * np.concatenate([scale, scale])
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Undo the padding and the resize of the image(s) (MetaTensors), and map the boxes back.

        Returns:
            The data on the original grid.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            image = self.pad.inverse(d[key])
            resize = Resize(self.spatial_size)  # the size of each call's resize depended on its image
            d[key] = resize.inverse_transform(image, resize.pop_transform(image, check=False))
            if self.box_key in d:
                d[self.box_key] = boxes_to_original(d[self.box_key], d[self.scale_key], d[self.orig_size_key])
        return d


ResizeWithBoxesD = ResizeWithBoxesDict = ResizeWithBoxesd
