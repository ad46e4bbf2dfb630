"""Landmark targets for a heatmap + offset network, and the decoding of its output back to coordinates.

The network predicts, per landmark ``k``, a heatmap channel (a disk of radius ``r`` around the landmark) and two
offset channels holding, inside the disk, ``(landmark - pixel) / r`` for x and y. MONAI's ``GenerateHeatmapd``
draws Gaussian heatmaps only; the disk plus offset maps of the paper's multi-task U-Net need their own transform.
Coordinates are ``(x, y)`` = (column, row) pixels of an image array laid out ``(C, H, W)``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import InvertibleTransform, MapTransform, Resize, Transform

from monai_amat.losses import split_landmark_output

__all__ = [
    "LandmarkTarget",
    "DecodeLandmarks",
    "ResizeWithLandmarksd",
    "ResizeWithLandmarksD",
    "ResizeWithLandmarksDict",
    "LandmarkTargetd",
    "LandmarkTargetD",
    "LandmarkTargetDict",
    "DecodeLandmarksd",
    "DecodeLandmarksD",
    "DecodeLandmarksDict",
    "landmark_target",
    "decode_landmarks",
    "split_landmark_output",
]


def landmark_target(landmarks: torch.Tensor, size: Sequence[int], radius: float) -> torch.Tensor:
    """Disk heatmaps and offset maps for one image.

    Args:
        landmarks: ``(K, 2)`` x, y in pixels of the target grid.
        size: ``(H, W)`` of the target grid.
        radius: disk radius in pixels.

    Returns:
        ``(3K, H, W)`` float32: K heatmaps, then K x-offsets, then K y-offsets (zero outside the disks).
    """
    landmarks = torch.as_tensor(landmarks, dtype=torch.float32)
    ys, xs = torch.meshgrid(
        torch.arange(size[0], dtype=torch.float32), torch.arange(size[1], dtype=torch.float32), indexing="ij"
    )
    dx = landmarks[:, 0, None, None] - xs  # (K, H, W)
    dy = landmarks[:, 1, None, None] - ys
    disk = ((dx**2 + dy**2) <= radius**2).float()
    return torch.cat([disk, disk * dx / radius, disk * dy / radius], dim=0)


def decode_landmarks(pred: torch.Tensor, radius: float, threshold: float = 0.5) -> torch.Tensor:
    """Landmark coordinates from a heatmap + offset output: the heatmap peak, refined by an offset vote.

    Every pixel within ``radius`` of the peak whose heatmap probability is at least ``threshold`` (the peak always
    counts) votes for ``pixel + offset * radius``; votes are weighted by the probability.

    Args:
        pred: ``(B, 3K, H, W)`` logits and offsets.
        radius: the disk radius used for training, in pixels of this grid.
        threshold: minimum heatmap probability of a voting pixel.

    Returns:
        ``(B, K, 2)`` x, y in pixels of this grid.
    """
    heat, off_x, off_y = split_landmark_output(pred.detach().float())
    prob = torch.sigmoid(heat)
    b, k, h, w = prob.shape
    peak = prob.flatten(2).argmax(2)
    py, px = (peak // w).float(), (peak % w).float()
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=prob.dtype, device=prob.device),
        torch.arange(w, dtype=prob.dtype, device=prob.device),
        indexing="ij",
    )
    near = ((xs - px[..., None, None]) ** 2 + (ys - py[..., None, None]) ** 2) <= radius**2
    is_peak = (xs == px[..., None, None]) & (ys == py[..., None, None])
    weight = prob * (near & ((prob >= threshold) | is_peak))
    vote_x = xs + off_x * radius
    vote_y = ys + off_y * radius
    total = weight.flatten(2).sum(2).clamp_min(1e-12)
    x = (weight * vote_x).flatten(2).sum(2) / total
    y = (weight * vote_y).flatten(2).sum(2) / total
    return torch.stack([x, y], dim=-1)


class LandmarkTarget(Transform):
    """The disk-heatmap + offset target of landmarks on an image grid (array version of :py:class:`LandmarkTargetd`).

    Args:
        radius_ratio: disk radius as a fraction of the larger image side (the paper: 5%).
    """

    def __init__(self, radius_ratio: float = 0.05) -> None:
        self.radius_ratio = radius_ratio

    def __call__(self, landmarks: Any, size: Sequence[int]) -> torch.Tensor:
        """``(3K, H, W)`` target of ``(K, 2)`` x, y landmarks on an ``(H, W)`` grid (see :py:func:`landmark_target`)."""
        size = tuple(int(s) for s in size)
        return landmark_target(torch.as_tensor(np.asarray(landmarks)), size, self.radius_ratio * max(size))


class DecodeLandmarks(Transform):
    """A ``(3K, H, W)`` prediction decoded to ``(K, 2)`` x, y (array version of :py:class:`DecodeLandmarksd`).

    Args:
        radius_ratio: the disk radius used in training, as a fraction of the larger side of the network grid.
    """

    def __init__(self, radius_ratio: float = 0.05) -> None:
        self.radius_ratio = radius_ratio

    def __call__(self, pred: Any, orig_size: Sequence[int] | None = None) -> torch.Tensor:
        """Decode (see :py:func:`decode_landmarks`); with ``orig_size`` ``(H, W)``, in that image's pixels."""
        pred = torch.as_tensor(pred)
        size = pred.shape[1:]
        grid = decode_landmarks(pred[None], self.radius_ratio * max(size))[0]
        if orig_size is None:
            return grid
        orig = torch.as_tensor(np.asarray(orig_size), dtype=torch.float32).reshape(-1)
        return grid * torch.stack([orig[1] / size[1], orig[0] / size[0]]).to(grid.device)


class ResizeWithLandmarksd(MapTransform, InvertibleTransform):
    """Resize a ``(C, H, W)`` image to ``spatial_size`` and scale its landmarks alike.

    The original size is stored under ``orig_size_key`` (``(H, W)``) so predictions can be mapped back; the resize is
    recorded in a MetaTensor image's applied operations, so :py:meth:`inverse` (and MONAI's ``Invertd``) restores the
    original grid.

    Args:
        keys: the image key.
        landmarks_key: the key of the ``(K, 2)`` x, y landmarks (optional in the data: inference has none).
        spatial_size: ``(H, W)`` of the output.
        orig_size_key: where to store the original ``(H, W)``.
        mode: interpolation mode of the image.
        allow_missing_keys: skip a missing image key.
    """

    def __init__(
        self,
        keys: KeysCollection,
        landmarks_key: str = "landmarks",
        spatial_size: Sequence[int] = (200, 160),
        orig_size_key: str = "orig_size",
        mode: str = "area",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.landmarks_key = landmarks_key
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.orig_size_key = orig_size_key
        self.resize = Resize(self.spatial_size, mode=mode)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Resize the image(s) and scale the landmarks."""
        d = dict(data)
        for key in self.key_iterator(d):
            orig = tuple(int(s) for s in d[key].shape[1:])
            d[key] = self.resize(d[key])
            d[self.orig_size_key] = np.asarray(orig)
            if self.landmarks_key in d:
                scale = np.array([self.spatial_size[1] / orig[1], self.spatial_size[0] / orig[0]], dtype=np.float32)
                d[self.landmarks_key] = np.asarray(d[self.landmarks_key], dtype=np.float32) * scale
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Undo the resize of the image(s) (MetaTensors) and scale the landmarks back.

        Returns:
            The data on the original grid.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resize.inverse(d[key])
            if self.landmarks_key in d:
                orig = np.asarray(d[self.orig_size_key], dtype=np.float32).reshape(-1)
                scale = np.array([orig[1] / self.spatial_size[1], orig[0] / self.spatial_size[0]], dtype=np.float32)
                d[self.landmarks_key] = np.asarray(d[self.landmarks_key], dtype=np.float32) * scale
        return d


class LandmarkTargetd(MapTransform):
    """Add the disk-heatmap + offset target of a ``(C, H, W)`` image's landmarks.

    Args:
        keys: the landmarks key (``(K, 2)`` x, y pixels of the image grid).
        image_key: the image whose ``(H, W)`` the target takes.
        target_key: where to store the ``(3K, H, W)`` target.
        radius_ratio: disk radius as a fraction of the larger image side (the paper: 5%).
        allow_missing_keys: skip missing landmarks (e.g. inference data).
    """

    def __init__(
        self,
        keys: KeysCollection = "landmarks",
        image_key: str = "image",
        target_key: str = "target",
        radius_ratio: float = 0.05,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.target_key = target_key
        self.target = LandmarkTarget(radius_ratio)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Build the target."""
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.target_key] = self.target(d[key], d[self.image_key].shape[1:])
        return d


class DecodeLandmarksd(MapTransform):
    """Post-transform: decode a ``(3K, H, W)`` prediction to ``(K, 2)`` x, y in original-image pixels.

    Args:
        keys: the prediction key.
        output_key: where to store the decoded landmarks.
        radius_ratio: the disk radius used in training, as a fraction of the larger side of the network grid.
        orig_size_key: the original ``(H, W)`` stored by :py:class:`ResizeWithLandmarksd`.
        truth_key: the true landmarks in original pixels, copied to ``truth_output_key`` when present (so metrics
            can read both from the engine output).
        truth_output_key: see ``truth_key``.
        allow_missing_keys: skip a missing prediction key (e.g. ``adv_pred`` of a standard trainer).
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        output_key: str = "pred_landmarks",
        radius_ratio: float = 0.05,
        orig_size_key: str = "orig_size",
        truth_key: str = "landmarks_orig",
        truth_output_key: str = "true_landmarks",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_key = output_key
        self.decode = DecodeLandmarks(radius_ratio)
        self.orig_size_key = orig_size_key
        self.truth_key = truth_key
        self.truth_output_key = truth_output_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Decode and rescale."""
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.output_key] = self.decode(d[key], d[self.orig_size_key])
        if self.truth_key in d:
            d[self.truth_output_key] = torch.as_tensor(np.asarray(d[self.truth_key]), dtype=torch.float32)
        return d


ResizeWithLandmarksD = ResizeWithLandmarksDict = ResizeWithLandmarksd
LandmarkTargetD = LandmarkTargetDict = LandmarkTargetd
DecodeLandmarksD = DecodeLandmarksDict = DecodeLandmarksd
