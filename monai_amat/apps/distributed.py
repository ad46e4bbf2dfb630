"""What the bundles' ``multi_gpu_train.json`` needs besides ``torch.distributed``: devices, handlers, writers.

Every rank runs the handlers that change the training (learning-rate schedule, validation, whose metrics are
gathered over the ranks, early stopping); only rank 0 runs those that write or print (statistics, TensorBoard,
checkpoints, progress bar), so no file is written twice.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from monai.handlers import EarlyStopHandler, LrScheduleHandler, ValidationHandler

from monai_amat.handlers import MarginHandler
from monai_amat.utils import is_rank0

__all__ = ["EVERY_RANK", "NullSummaryWriter", "main_rank_handlers", "rank0_summary_writer", "rank_device"]

# the handlers every rank needs (subclasses too); a handler with an attribute ``every_rank = True`` counts as well
EVERY_RANK: tuple[type, ...] = (LrScheduleHandler, ValidationHandler, EarlyStopHandler, MarginHandler)


def rank_device() -> torch.device:
    """The device of a ``torchrun`` process: ``cuda:LOCAL_RANK`` where CUDA is visible, else the CPU (gloo).

    Returns:
        The device; its type also picks the process group's backend (NCCL for CUDA, gloo for the CPU).

    Raises:
        KeyError: when ``LOCAL_RANK`` is not set (the config was not started by ``torchrun``).
        RuntimeError: when this node starts more processes than it has visible GPUs, naming both and the two ways out.
    """
    if "LOCAL_RANK" not in os.environ:
        raise KeyError("LOCAL_RANK is not set: start multi_gpu_train.json with torchrun (see the README).")
    local_rank = int(os.environ["LOCAL_RANK"])
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RuntimeError(
            f"process with LOCAL_RANK {local_rank} but {count} GPU(s) visible on this node: start at most {count} "
            "process(es) per node (torchrun --nproc_per_node), or CPU processes with the GPUs hidden "
            "(CUDA_VISIBLE_DEVICES= torchrun ...)."
        )
    return torch.device("cuda", local_rank)


def main_rank_handlers(handlers: Iterable[Any] | None, every_rank: Sequence[type] = EVERY_RANK) -> list[Any]:
    """The handlers this rank attaches.

    All of them on rank 0 (or without ``torch.distributed``); on the other ranks only those that change the training:
    instances of ``every_rank`` (subclasses included) and handlers whose ``every_rank`` attribute is True.

    Args:
        handlers: the config's handler list (None: no handlers).
        every_rank: the handler classes every rank needs.

    Returns:
        A new list of handlers.
    """
    handlers = list(handlers or [])
    if is_rank0():
        return handlers
    return [h for h in handlers if isinstance(h, tuple(every_rank)) or getattr(h, "every_rank", False) is True]


class NullSummaryWriter:
    """A stand-in for ``torch.utils.tensorboard.SummaryWriter`` that writes nothing, for ranks other than 0.

    Every method (``add_scalar``, ``add_histogram``, ``flush``, ``close``, any other) does nothing and creates no file.
    """

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _nothing


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def rank0_summary_writer(log_dir: str | os.PathLike, **kwargs: Any) -> Any:
    """A TensorBoard ``SummaryWriter`` on rank 0, a :py:class:`NullSummaryWriter` on the other ranks.

    Args:
        log_dir: the TensorBoard folder.
        kwargs: other ``SummaryWriter`` arguments.

    Returns:
        The writer.
    """
    if not is_rank0():
        return NullSummaryWriter()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir), **kwargs)
