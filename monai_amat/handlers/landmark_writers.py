"""Ignite handlers that write landmark results: per-landmark errors under attack, and inference outputs."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.utils import IgniteInfo, min_version, optional_import

from monai_amat.keys import AttackEvents
from monai_amat.metrics import LandmarkErrorMetric
from monai_amat.utils import atomic_write, gather_objects, is_rank0

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["LandmarkErrorsCSV", "LandmarkWriter"]


class LandmarkErrorsCSV:
    """Per-landmark errors of a ``RobustEvaluator`` at every eps, written as ``landmark_errors.csv``.

    Rows ``eps,landmark,mean_mm,median_mm,max_mm`` (landmarks 1-based), written atomically by rank 0 once every eps
    has run. With several attacks, the rows are the worst case's (the passes with ``engine.state.reported``).

    Args:
        metric: the :py:class:`monai_amat.metrics.LandmarkErrorMetric` the evaluator fills (its buffer is read at
            each eps's end).
        output_dir: the folder of the CSV.
        filename: the CSV name.
    """

    def __init__(
        self, metric: LandmarkErrorMetric, output_dir: str | os.PathLike, filename: str = "landmark_errors.csv"
    ):
        self.metric = metric
        self.path = Path(output_dir) / filename
        self.rows: list[str] = []

    def attach(self, engine: Engine) -> None:
        """Collect at each epoch (eps) end; write when all eps are done.

        Args:
            engine: a ``RobustEvaluator``.
        """
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        engine.add_event_handler(AttackEvents.ROBUSTNESS_COMPLETED, self.write)

    def epoch_completed(self, engine: Engine) -> None:
        """Summarise this eps's errors per landmark (only the reported pass: the worst case over several attacks)."""
        if not getattr(engine.state, "reported", True):
            return
        eps = float(getattr(engine.state, "eps", 0.0))
        errors = self.metric.errors().cpu()
        for k in range(errors.shape[1]):
            e = errors[:, k]
            self.rows.append(f"{eps:g},{k + 1},{float(e.mean()):.4f},{float(e.median()):.4f},{float(e.max()):.4f}\n")

    def write(self, engine: Engine) -> None:
        """Write the CSV (rank 0) and start over for the next evaluation."""
        rows, self.rows = self.rows, []
        if not is_rank0():
            return
        with atomic_write(self.path) as f:
            f.write("eps,landmark,mean_mm,median_mm,max_mm\n")
            f.writelines(rows)


class LandmarkWriter:
    """Inference output: every image's landmarks as CSV rows (pixels and mm) and an overlay PNG.

    Reads ``pred_landmarks`` (``(K, 2)`` original pixels, from ``DecodeLandmarksd``) and the image file name from the
    decollated engine output. Writes ``landmarks.csv`` (``image,landmark,x_px,y_px,x_mm,y_mm``) and
    ``<image stem>_landmarks.png`` in ``output_dir``, atomically. Under ``torch.distributed`` each rank draws the
    overlays of its images and the CSV rows are gathered to rank 0, which writes the CSV (an image that a
    ``DistributedSampler`` repeats is listed once).

    Args:
        output_dir: where to write.
        spacing: mm per pixel.
        key: the decoded landmarks key.
        output_transform: maps ``engine.state.output`` to the list of per-image outputs, as MONAI handlers take it.
        batch_transform: maps ``engine.state.batch`` to the list of per-image inputs (with the image's metadata).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        spacing: float = 0.1,
        key: str = "pred_landmarks",
        output_transform: Callable[[Any], Any] = lambda x: x,
        batch_transform: Callable[[Any], Any] = lambda x: x,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.spacing = float(spacing)
        self.key = key
        self.output_transform = output_transform
        self.batch_transform = batch_transform
        self.rows: list[str] = []

    def attach(self, engine: Engine) -> None:
        """Collect per iteration, write the CSV at the end.

        Args:
            engine: an evaluator with decollated outputs.
        """
        engine.add_event_handler(Events.STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def iteration_completed(self, engine: Engine) -> None:
        """Record each image's landmarks and draw its overlay."""
        for out, batch in zip(self.output_transform(engine.state.output), self.batch_transform(engine.state.batch)):
            path = str(batch["image"].meta["filename_or_obj"]) if hasattr(batch["image"], "meta") else str(batch["id"])
            points = torch.as_tensor(out[self.key]).cpu().numpy()
            name = Path(path).name
            for k, (x, y) in enumerate(points, start=1):
                self.rows.append(f"{name},{k},{x:.2f},{y:.2f},{x * self.spacing:.3f},{y * self.spacing:.3f}\n")
            self._overlay(path, points)

    def _overlay(self, path: str, points: np.ndarray) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from PIL import Image

        image = np.asarray(Image.open(path).convert("L"))
        fig, ax = plt.subplots(figsize=(4, 4 * image.shape[0] / image.shape[1]))
        ax.imshow(image, cmap="gray")
        ax.scatter(points[:, 0], points[:, 1], s=12, c="red")
        for k, (x, y) in enumerate(points, start=1):
            ax.annotate(str(k), (x, y), color="yellow", fontsize=6)
        ax.axis("off")
        with atomic_write(self.output_dir / f"{Path(path).name.split('.')[0]}_landmarks.png", "wb") as f:
            fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)

    def completed(self, engine: Engine) -> Any:
        """Gather the ranks' rows and write ``landmarks.csv`` (rank 0)."""
        rows = dict.fromkeys(row for rank_rows in gather_objects(self.rows) for row in rank_rows)
        if not is_rank0():
            return
        with atomic_write(self.output_dir / "landmarks.csv") as f:
            f.write("image,landmark,x_px,y_px,x_mm,y_mm\n")
            f.writelines(rows)
