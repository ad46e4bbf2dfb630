"""Ignite handler that calibrates the criterion from a trained model and writes ``thresholds.json``."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from monai.handlers import from_engine
from monai.utils import IgniteInfo, min_version, optional_import
from monai.utils.enums import CommonKeys as Keys

from monai_amat.attacks import to_float32
from monai_amat.criteria import (
    CALIBRATION_STATISTICS,
    calibrate_dice_tau,
    calibrate_thresholds,
    hard_dice,
    holds_every_class,
    save_thresholds,
)
from monai_amat.utils import gather_objects, is_rank0

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["CalibrationHandler"]


class CalibrationHandler:
    """Collects per-sample clean results of an evaluator and writes ``thresholds.json``.

    Two modes:

    - ``"dice"`` (segmentation): ``tau`` as the authors' ``getOnlineDiceMean``: the unsmoothed hard Dice, mean
      over the foreground classes, averaged over the samples whose label contains **every** foreground class;
    - ``"loss"`` (landmarks, detection): per component, a statistic of the per-sample clean losses
      ``components_fn(pred, label) -> {name: Tensor[B]}``: Huber robust mean ``+ z ×`` robust scale (the authors'
      landmarks) or the maximum (their detection); see :py:func:`monai_amat.criteria.calibrate_thresholds`.

    Attach it to a ``SupervisedEvaluator`` created with ``decollate=False`` (batch-level outputs) over the split
    named by ``split`` (recorded in the file with the number of samples). Under ``torch.distributed`` every rank
    collects its share, the values are gathered to all ranks, and rank 0 writes, atomically.

    Args:
        output_file: the ``thresholds.json`` to write.
        mode: ``"dice"`` or ``"loss"``.
        model: the model file the thresholds come from (recorded in the file).
        components_fn: the per-sample loss components (``"loss"`` mode).
        z: robust scales above the robust mean (``"loss"`` mode with ``statistic="huber"``).
        statistic: ``"huber"`` or ``"max"`` (``"loss"`` mode).
        split: the name of the data split the evaluator runs on (``"val"``, ``"train"``), recorded in the file.
        output_transform: maps ``engine.state.output`` to ``(prediction, label)``, as MONAI handlers take it; default
            the ``pred`` and ``label`` keys.

    Raises:
        ValueError: for an unknown mode or statistic, or ``"loss"`` mode without ``components_fn``.
    """

    def __init__(
        self,
        output_file: str | os.PathLike,
        mode: str = "dice",
        model: str = "",
        components_fn: Callable[[Any, Any], Mapping[str, torch.Tensor]] | None = None,
        z: float = 2.0,
        statistic: str = "huber",
        split: str | None = None,
        output_transform: Callable[[Any], tuple[Any, Any]] | None = None,
    ) -> None:
        if mode not in ("dice", "loss"):
            raise ValueError(f"calibration mode must be 'dice' or 'loss', got {mode!r}.")
        if mode == "loss" and components_fn is None:
            raise ValueError("calibration mode 'loss' needs components_fn.")
        if statistic not in CALIBRATION_STATISTICS:
            raise ValueError(f"calibration statistic must be one of {CALIBRATION_STATISTICS}, got {statistic!r}.")
        self.output_file = output_file
        self.mode = mode
        self.model = str(model)
        self.components_fn = components_fn
        self.z = float(z)
        self.statistic = statistic
        self.split = split
        self.output_transform = output_transform or from_engine([Keys.PRED, Keys.LABEL])
        self.values: dict[str, list[torch.Tensor]] = {}
        self.thresholds: dict[str, float] = {}

    def attach(self, engine: Engine) -> None:
        """Collect at every iteration, write when the run completes.

        Args:
            engine: an evaluator with batch-level outputs (``decollate=False``).
        """
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def started(self, engine: Engine) -> None:
        """Forget values of an earlier run."""
        self.values = {}

    def iteration_completed(self, engine: Engine) -> None:
        """Record the batch's per-sample values."""
        pred, label = self.output_transform(engine.state.output)
        pred = to_float32(pred)
        if self.mode == "dice":
            dice = hard_dice(pred, label)  # (B, foreground classes), unsmoothed
            batch = {"dice": dice.mean(1), "complete": holds_every_class(label, dice.shape[1] + 1)}
        else:
            batch = dict(self.components_fn(pred, label))
        for name, value in batch.items():
            self.values.setdefault(name, []).append(value.detach().cpu())

    def completed(self, engine: Engine) -> None:
        """Gather the ranks' values, compute the thresholds and write them (rank 0)."""
        ranks = gather_objects({k: torch.cat(v) for k, v in self.values.items()})
        values = {k: torch.cat([r[k] for r in ranks if k in r]) for k in ranks[0]}
        if self.mode == "dice":
            self.thresholds = {"tau": calibrate_dice_tau(values["dice"], values["complete"])}
            z, statistic = None, None
        else:
            self.thresholds = calibrate_thresholds(values, self.z, self.statistic)
            z, statistic = (self.z if self.statistic == "huber" else None), self.statistic
        if not is_rank0():
            return
        samples = int(next(iter(values.values())).numel()) if values else 0
        criterion = self.mode if self.mode == "dice" else "loss_threshold"
        save_thresholds(self.output_file, criterion, self.thresholds, z, self.model, self.split, samples, statistic)
