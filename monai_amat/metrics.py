"""Landmark metrics: radial errors in millimetres, mean radial error (MRE) and success detection rate (SDR)."""

from __future__ import annotations

from typing import Any

import torch
from monai.metrics import CumulativeIterationMetric

__all__ = ["LandmarkErrorMetric"]


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
        errors = (y_pred - y).norm(dim=-1) * self.spacing
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
