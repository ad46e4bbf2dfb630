"""Samplers of training batches."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data.distributed import DistributedSampler

from monai_amat.utils import rank_world

__all__ = ["ForegroundOversampler", "foreground_flags"]


def foreground_flags(datalist: Sequence[dict[str, Any]], key: str = "label") -> list[bool]:
    """Which items of a segmentation datalist have foreground (a label value other than 0).

    Args:
        datalist: items holding their label array under ``key`` (in memory, as the MSD slice sets do).
        key: the label key.

    Returns:
        One flag per item.

    Raises:
        KeyError: naming the first item without ``key``.
    """
    flags = []
    for i, item in enumerate(datalist):
        if key not in item:
            raise KeyError(f"datalist item {i} has no {key!r} key (keys: {sorted(item)}).")
        flags.append(bool(torch.as_tensor(item[key]).ne(0).any()))
    return flags


class ForegroundOversampler(DistributedSampler):
    """Shuffles the training set and puts foreground into at least a fraction of every batch, as nnU-Net does.

    nnU-Net (which the authors trained) forces foreground into the last third of each batch
    (``oversample_foreground_percent = 0.33``); on 2D slices, most of which show no foreground, a plain shuffle gives
    batches without any. Each epoch this sampler takes a seeded permutation of the data set (``seed + epoch``, as
    PyTorch's ``DistributedSampler``, so a resumed run sees the same order), cuts its share into batches of
    ``batch_size`` and, in every batch holding fewer than ``ceil(fraction * len(batch))`` foreground items, replaces
    background items by foreground items drawn at random (with replacement). The epoch length is unchanged; some
    background items are left out of an epoch and some foreground items appear twice (AMAT's margin handler reduces
    repeats). Give the loader the same ``batch_size`` and ``shuffle=False``.

    It is a ``DistributedSampler``, so MONAI's workflows call ``set_epoch`` at every epoch start, and under
    ``torch.distributed`` each rank takes its share of the permutation (the ranks' batches are filled
    independently).

    Args:
        dataset: the training data set.
        foreground: one flag per item, True where the item has foreground (see :py:func:`foreground_flags`).
        batch_size: the loader's batch size (per process).
        fraction: the least fraction of each batch that holds foreground, in ``(0, 1]``.
        num_replicas: number of processes; default: the ``torch.distributed`` world size, or 1.
        rank: this process's rank; default: the ``torch.distributed`` rank, or 0.
        seed: seeds the permutation and the draws.

    Raises:
        ValueError: for a ``foreground`` list of another length than the data set, no foreground item at all,
            ``batch_size < 1`` or ``fraction`` outside ``(0, 1]``.
    """

    def __init__(
        self,
        dataset: Any,
        foreground: Sequence[bool],
        batch_size: int,
        fraction: float = 1 / 3,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
    ) -> None:
        this_rank, world = rank_world()
        num_replicas = world if num_replicas is None else num_replicas
        rank = this_rank if rank is None else rank
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.foreground = torch.as_tensor([bool(f) for f in foreground])
        if len(self.foreground) != len(dataset):
            raise ValueError(f"foreground holds {len(self.foreground)} flags for a data set of {len(dataset)} items.")
        if not self.foreground.any():
            raise ValueError("cannot oversample foreground: no training item has foreground in its label.")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
        if not 0 < fraction <= 1:
            raise ValueError(f"foreground fraction must be in (0, 1], got {fraction!r}.")
        self.batch_size = int(batch_size)
        self.fraction = float(fraction)
        self.foreground_items = self.foreground.nonzero().flatten()

    def __iter__(self) -> Iterator[int]:
        indices = torch.tensor(list(super().__iter__()), dtype=torch.long)
        g = torch.Generator().manual_seed(self.seed + self.epoch + 1_000_003 * (self.rank + 1))
        for start in range(0, len(indices), self.batch_size):
            batch = indices[start : start + self.batch_size]
            missing = math.ceil(self.fraction * len(batch)) - int(self.foreground[batch].sum())
            if missing > 0:
                background = (~self.foreground[batch]).nonzero().flatten()[-missing:]
                draws = torch.randint(len(self.foreground_items), (missing,), generator=g)
                batch[background] = self.foreground_items[draws]
        return iter(indices.tolist())
