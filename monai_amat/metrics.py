"""Landmark metrics (radial errors in millimetres, MRE, SDR) and detection mean average precision (COCO)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.apps.detection.metrics.coco import COCOMetric
from monai.apps.detection.metrics.matching import matching_batch
from monai.data.box_utils import box_iou
from monai.metrics import CumulativeIterationMetric
from monai.metrics.metric import Metric

__all__ = ["LandmarkErrorMetric", "DetectionMAP"]


class LandmarkErrorMetric(CumulativeIterationMetric):
    """Radial landmark errors in mm, aggregated as MRE or as SDR at a distance.

    ``y_pred`` and ``y`` are ``(K, 2)`` (or ``(B, K, 2)``) x, y coordinates in original-image pixels; errors are
    ``spacing * ||y_pred - y||``.

    Args:
        spacing: mm per pixel.
        sdr_mm: None aggregates the MRE (mm); a distance aggregates the SDR: the fraction of landmarks whose error
            is at most that distance.
    """

    def __init__(self, spacing: float = 0.1, sdr_mm: float | None = None) -> None:
        super().__init__()
        self.spacing = float(spacing)
        self.sdr_mm = sdr_mm

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if y is None:
            raise ValueError("LandmarkErrorMetric needs the true landmarks as y.")
        y_pred, y = torch.as_tensor(y_pred).float(), torch.as_tensor(y).float().to(y_pred.device)
        if y_pred.shape != y.shape:
            raise ValueError(
                f"predicted landmarks {tuple(y_pred.shape)} and true ones {tuple(y.shape)} differ in shape."
            )
        errors = torch.linalg.vector_norm(y_pred - y, dim=-1) * self.spacing
        return errors if errors.dim() == 2 else errors[None]

    def errors(self) -> torch.Tensor:
        """``(N, K)`` errors in mm of every sample seen since the last reset."""
        return self.get_buffer()

    def aggregate(self) -> Any:  # type: ignore[override]
        """MRE in mm, or the SDR at ``sdr_mm``."""
        errors = self.get_buffer()
        if self.sdr_mm is None:
            return errors.mean()
        return (errors <= self.sdr_mm).float().mean()


def _numpy(value: Any, dtype: Any) -> np.ndarray:
    return np.asarray(torch.as_tensor(value).detach().cpu().numpy(), dtype=dtype)


class DetectionMAP(Metric):
    """COCO mean average precision of detections, with MONAI's ``COCOMetric``, usable in ``IgniteMetricHandler``.

    MONAI's detection metrics work on a whole data set at once and are not cumulative iteration metrics; this
    keeps every image's boxes until ``aggregate()``. Images are given as lists (``decollate=False`` engines):
    predictions as the detector returns them, ground truth as the targets. Not synchronised across processes:
    evaluate on one.

    Args:
        classes: the class names, in label order.
        iou: None gives mAP over IoU 0.5:0.95 (step 0.05, COCO's mAP); a number gives the AP at that IoU.
        max_detections: most detections per image counted.
        box_key: the boxes' key (corner mode) in predictions and ground truth.
        label_key: the labels' key.
        score_key: the scores' key in predictions.
    """

    def __init__(
        self,
        classes: Sequence[str],
        iou: float | None = None,
        max_detections: int = 100,
        box_key: str = "boxes",
        label_key: str = "labels",
        score_key: str = "labels_scores",
    ) -> None:
        super().__init__()
        self.classes = [str(c) for c in classes]
        self.iou = iou
        self.max_detections = int(max_detections)
        self.keys = (box_key, label_key, score_key)
        self.coco = COCOMetric(
            classes=self.classes,
            iou_list=[0.5 if iou is None else float(iou)],
            iou_range=[0.5, 0.95, 0.05],
            max_detection=[self.max_detections],
            per_class=True,
            verbose=False,
        )
        self.reset()

    def reset(self) -> None:
        """Forget the images seen so far."""
        self.pred: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.true: list[tuple[np.ndarray, np.ndarray]] = []

    def __call__(self, y_pred: Sequence[dict], y: Sequence[dict]) -> None:  # type: ignore[override]
        """Add a batch of images.

        Args:
            y_pred: per image ``{box_key: (N, 4), label_key: (N,), score_key: (N,)}``.
            y: per image ``{box_key: (M, 4), label_key: (M,)}``.

        Raises:
            ValueError: when the lists differ in length.
        """
        if len(y_pred) != len(y):
            raise ValueError(f"{len(y_pred)} predictions for {len(y)} ground-truth images.")
        box, label, score = self.keys
        for p, t in zip(y_pred, y):
            self.pred.append(
                (
                    _numpy(p[box], np.float64).reshape(-1, 4),
                    _numpy(p[label], np.int64).reshape(-1),
                    _numpy(p[score], np.float64).reshape(-1),
                )
            )
            self.true.append((_numpy(t[box], np.float64).reshape(-1, 4), _numpy(t[label], np.int64).reshape(-1)))

    def get_buffer(self) -> torch.Tensor:
        """Per image seen, the number of predicted and of ground-truth boxes, ``(N, 2)``.

        MONAI's metric handlers store this as the metric's details; mAP itself has no per-image value.
        """
        return torch.tensor([[len(p[0]), len(t[0])] for p, t in zip(self.pred, self.true)], dtype=torch.int64)

    def aggregate(self) -> torch.Tensor:
        """The mAP (or AP at ``iou``) over the classes with ground truth, of every image seen since the reset.

        Returns:
            A scalar tensor; -1 when no image holds any ground-truth box.

        Raises:
            ValueError: when no image was seen.
        """
        if not self.true:
            raise ValueError("DetectionMAP has seen no image.")
        matches = matching_batch(
            iou_fn=box_iou,
            iou_thresholds=self.coco.iou_thresholds,
            pred_boxes=[p[0] for p in self.pred],
            pred_classes=[p[1] for p in self.pred],
            pred_scores=[p[2] for p in self.pred],
            gt_boxes=[t[0] for t in self.true],
            gt_classes=[t[1] for t in self.true],
            max_detections=self.max_detections,
        )
        results = self.coco(matches)[0]
        prefix = "mAP_IoU_0.50_0.95_0.05" if self.iou is None else f"AP_IoU_{float(self.iou):.2f}"
        # MONAI's class average counts a class without ground truth as -1; average the classes that have some
        per_class = [results[f"{c}_{prefix}_MaxDet_{self.max_detections}"] for c in self.classes]
        present = [v for v in per_class if v >= 0]
        return torch.tensor(float(np.mean(present)) if present else -1.0, dtype=torch.float32)
