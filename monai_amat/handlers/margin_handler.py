"""Ignite handler that owns AMAT's per-sample margins."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from monai.utils import IgniteInfo, min_version, optional_import
from monai.utils.enums import CommonKeys as Keys

from monai_amat.keys import AttackEvents, AttackKeys
from monai_amat.margins import MarginTable, start_radius
from monai_amat.utils import atomic_write, is_rank0, rank_world

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["MarginHandler", "label_has_foreground"]

CSV_HEADER = "epoch,index,margin\n"


def label_has_foreground(output: dict) -> torch.Tensor:
    """Which samples of a segmentation batch have foreground in their label (a ``group_fn`` of MarginHandler).

    Args:
        output: a trainer's batch-level output holding ``"label"`` ``(B, 1, spatial...)``.

    Returns:
        ``(B,)`` bool.
    """
    return torch.as_tensor(output[Keys.LABEL]).flatten(1).amax(1) > 0


class MarginHandler:
    """Holds AMAT's per-sample margins, gathers each iteration's attack results and applies the rule per epoch.

    Attach it to an :py:class:`monai_amat.engines.AMATTrainer` (the trainer does so itself) and put it in the
    ``CheckpointSaver`` / ``CheckpointLoader`` dicts to save and resume the margins. At each epoch end it:

    - sums the epoch's bookkeeping over all ranks (``torch.distributed`` all-reduce), so every rank holds the
      same table;
    - applies the margin rule (:py:class:`monai_amat.margins.MarginTable`);
    - puts ``margin_mean``, ``margin_min``, ``margin_max``, ``margin_expanded``, ``margin_refined`` and
      ``margin_start_wrong`` (the fractions of seen samples expanded / refined / made wrong already by the attack's
      start iterate) into ``engine.state.metrics``, where ``StatsHandler`` and ``TensorBoardStatsHandler`` print
      them; with a ``group_fn``, the same within the group and the rest (e.g. ``margin_expanded_foreground``,
      ``margin_expanded_no_foreground``);
    - rank 0 writes ``margins.csv`` (``epoch,index,margin``, one row per sample per completed epoch) atomically,
      and a margin histogram to TensorBoard when given a writer.

    Args:
        num_samples: number of training samples; batch ``"index"`` values are ``0..num_samples-1``.
        delta: initial margin and margin step, ``> 0``.
        max_margin: margin upper bound, ``>= delta``; ``math.inf`` (default) for none.
        estimate: ``"final"`` (the authors' code) or ``"first_wrong"``; see :py:class:`monai_amat.margins.MarginTable`.
        refine: move the margins of samples that no attack survived to their boundary estimate (segmentation and
            detection in the authors' code); False keeps them (their landmark script).
        floor: lower bound of the running boundary estimate (the authors' detection code: ``delta``); 0 for none.
        reset_clean_wrong: reset samples never clean-correct to ``delta`` instead of keeping their margin.
        output_dir: folder for ``margins.csv``; None writes no file.
        filename: the CSV file name.
        summary_writer: a TensorBoard ``SummaryWriter`` (anything with ``add_histogram``) for margin histograms.
        tag_name: histogram tag.
        group_fn: ``group_fn(output) -> BoolTensor[B]`` on the trainer's batch-level output, splitting the
            diagnostics into a group and the rest, e.g. :py:func:`label_has_foreground` for segmentation; None
            gives no split.
        group_name: the group's name in the statistics.
        output_transform: maps ``engine.state.output`` to the dict of :py:class:`~monai_amat.keys.AttackKeys` (and,
            for ``group_fn``, the batch) that the adversarial trainers write, as MONAI handlers take it.

    Raises:
        ValueError: for invalid ``num_samples``, ``delta``, ``max_margin``, ``estimate`` or ``floor``.
    """

    def __init__(
        self,
        num_samples: int,
        delta: float,
        max_margin: float = math.inf,
        estimate: str = "final",
        refine: bool = True,
        floor: float = 0.0,
        reset_clean_wrong: bool = False,
        output_dir: str | os.PathLike | None = None,
        filename: str = "margins.csv",
        summary_writer: Any = None,
        tag_name: str = "margin",
        group_fn: Callable[[dict], torch.Tensor] | None = None,
        group_name: str = "foreground",
        output_transform: Callable[[Any], Mapping[str, Any]] = lambda x: x,
    ) -> None:
        self.output_transform = output_transform
        self.table = MarginTable(num_samples, delta, max_margin, estimate, refine, floor, reset_clean_wrong, group_name)
        self.group_fn = group_fn
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.filename = filename
        self.summary_writer = summary_writer
        self.tag_name = tag_name
        self._bookkeeping_epoch = 0  # the epoch whose bookkeeping the table holds (0: none)

    @property
    def margins(self) -> torch.Tensor:
        """The ``(N,)`` margins."""
        return self.table.margins

    @property
    def delta(self) -> float:
        """The margin step."""
        return self.table.delta

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Margins of the given samples.

        Args:
            indices: sample indices.

        Returns:
            ``(B,)`` margins on the CPU.

        Raises:
            ValueError: for an index outside the table.
        """
        return self.table.lookup(indices)

    def start_radius(self, margins: torch.Tensor) -> torch.Tensor:
        """AMAT's random-start radius for these margins, ``clamp(margin - delta, min=delta)``."""
        return start_radius(margins, self.table.delta)

    def attach(self, engine: Engine) -> None:
        """Register the handler's events on ``engine`` (once).

        Args:
            engine: an adversarial trainer that fires ``AttackEvents.ATTACK_COMPLETED``.
        """
        if engine.has_event_handler(self.epoch_completed, Events.EPOCH_COMPLETED):
            return
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(AttackEvents.ATTACK_COMPLETED, self.attack_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def epoch_started(self, engine: Engine) -> None:
        """Start the epoch's bookkeeping, unless it is already live (a run resumed mid-epoch)."""
        if self._bookkeeping_epoch != engine.state.epoch:
            self.table.begin_epoch()
            self._bookkeeping_epoch = engine.state.epoch

    def attack_completed(self, engine: Engine) -> None:
        """Record the batch's attack results from ``engine.state.output``.

        Raises:
            ValueError: when the output has no sample indices.
        """
        out = self.output_transform(engine.state.output)
        if out.get(AttackKeys.INDEX) is None:
            raise ValueError("MarginHandler needs sample indices in the batch ('index' key; see AMATTrainer).")
        self.table.record(
            out[AttackKeys.INDEX],
            out[AttackKeys.CLEAN_CORRECT],
            out[AttackKeys.FOUND],
            out[AttackKeys.NOISE_NORM],
            out[AttackKeys.BOUNDARY_NORM],
            out.get(AttackKeys.START_WRONG),
            None if self.group_fn is None else self.group_fn(out),
        )

    def epoch_completed(self, engine: Engine) -> None:
        """Gather the bookkeeping over ranks, update the margins, report them and write ``margins.csv``."""
        self._all_reduce()
        stats = self.table.end_epoch()
        self._bookkeeping_epoch = 0
        engine.state.metrics.update(stats)
        if not is_rank0():
            return
        if self.summary_writer is not None:
            self.summary_writer.add_histogram(self.tag_name, self.table.margins, engine.state.epoch)
        if self.output_dir is not None:
            self.write_csv(self.output_dir / self.filename, engine.state.epoch)

    def write_csv(self, path: str | os.PathLike, epoch: int) -> None:
        """Append this epoch's margins to ``path``, atomically.

        Rows of epoch ``>= epoch`` already in the file (from a run killed after writing them, then resumed) are
        dropped first, so every epoch appears once.

        Args:
            path: the CSV file.
            epoch: the completed epoch (1-based).
        """
        path = Path(path)
        kept: list[str] = []
        if path.is_file():
            with open(path) as f:
                kept = [line for line in f if line[:1].isdigit() and int(line.split(",", 1)[0]) < epoch]
        with atomic_write(path) as f:
            f.write(CSV_HEADER)
            f.writelines(kept)
            f.writelines(f"{epoch},{i},{m:.8g}\n" for i, m in enumerate(self.table.margins.tolist()))

    def _all_reduce(self) -> None:
        """Combine the ranks' bookkeeping: flags with "any", estimates averaged over the ranks that recorded one."""
        if rank_world()[1] == 1:
            return
        device = (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        )
        t = self.table
        flags = (t.seen, t.survived, t.clean_correct, t.estimated, t.start_wrong, t.group, t.grouped)
        weight = t.estimated.double()
        packed = torch.stack([t.boundary_estimate.double() * weight, *(f.double() for f in flags)]).to(device)
        dist.all_reduce(packed)
        packed = packed.cpu()
        t.seen, t.survived, t.clean_correct, t.estimated, t.start_wrong, t.group, t.grouped = (
            packed[i] > 0 for i in range(1, 8)
        )
        t.boundary_estimate = torch.where(
            t.estimated, packed[0] / packed[4].clamp(min=1), t.boundary_estimate.double()
        ).float()

    def state_dict(self) -> dict[str, Any]:
        """Margins and the live epoch bookkeeping, as tensors (loads with ``weights_only=True``)."""
        return {**self.table.state_dict(), "bookkeeping_epoch": torch.tensor(self._bookkeeping_epoch)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :py:meth:`state_dict` saved.

        Args:
            state_dict: the saved state.

        Raises:
            KeyError: when a tensor is missing.
            ValueError: when the checkpoint was made for another number of samples.
        """
        if "bookkeeping_epoch" not in state_dict:
            raise KeyError("margin state is missing ['bookkeeping_epoch'].")
        self.table.load_state_dict(state_dict)
        self._bookkeeping_epoch = int(state_dict["bookkeeping_epoch"])
