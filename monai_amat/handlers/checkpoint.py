"""Ignite handler that rewrites ``checkpoint.pt`` at every epoch end and resumes a run from it."""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from monai.utils import IgniteInfo, min_version, optional_import

from monai_amat.utils import atomic_write

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["TrainingCheckpoint", "rng_state", "set_rng_state"]


def rng_state() -> dict[str, torch.Tensor]:
    """The random states of torch, numpy and Python, as tensors (so ``weights_only=True`` loads them)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, _ = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_meta": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy_cached": torch.tensor(cached, dtype=torch.float64),
        "python": torch.tensor([version, *internal], dtype=torch.int64),
    }


def set_rng_state(state: Mapping[str, torch.Tensor]) -> None:
    """Restore what :py:func:`rng_state` returned.

    Args:
        state: the saved random states.
    """
    torch.set_rng_state(state["torch"])
    pos, has_gauss = state["numpy_meta"].tolist()
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, float(state["numpy_cached"]))
    )
    python = state["python"].tolist()
    random.setstate((python[0], tuple(python[1:]), None))


class TrainingCheckpoint:
    """Rewrites ``checkpoint.pt`` (atomically, rank 0) at every epoch end; with ``resume=True`` loads it at start.

    The checkpoint holds each object's ``state_dict`` (network, optimizer, LR scheduler, the trainer's Ignite
    state, margins...), the random states, and a ``meta`` entry (bundle name, number of training samples) that is
    checked on loading so a checkpoint of another bundle or data set is refused instead of half-loaded. On resume
    the trainer keeps its configured ``max_epochs`` (the total), so a larger value extends a finished run.

    Attach it in the config's ``initialize`` step: it references the trainer, which cannot sit in its own
    handler list.

    Args:
        output_dir: folder of the checkpoint.
        objects: ``{name: object with state_dict/load_state_dict}``; the trainer among them.
        resume: load the checkpoint when the run starts.
        filename: the checkpoint file name.
        bundle: the bundle name recorded in (and checked against) the checkpoint.
        num_samples: the number of training samples, recorded and checked likewise.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        objects: Mapping[str, Any],
        resume: bool = False,
        filename: str = "checkpoint.pt",
        bundle: str = "",
        num_samples: int = 0,
    ) -> None:
        self.path = Path(output_dir) / filename
        self.objects = dict(objects)
        self.resume = bool(resume)
        self.meta = {"bundle": str(bundle), "num_samples": int(num_samples)}

    def attach(self, engine: Engine) -> None:
        """Save at every epoch end; load at start when resuming.

        Args:
            engine: the trainer.
        """
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def save(self, engine: Engine) -> None:
        """Write the checkpoint (rank 0 only)."""
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        state = {name: obj.state_dict() for name, obj in self.objects.items()}
        state["meta"] = dict(self.meta)
        state["rng"] = rng_state()
        with atomic_write(self.path, "wb") as f:
            torch.save(state, f)

    def load(self, engine: Engine) -> None:
        """Restore every object and the random states.

        Raises:
            FileNotFoundError: when there is no checkpoint to resume.
            ValueError: when the checkpoint belongs to another bundle or data set size, or lacks an object.
        """
        if not self.path.is_file():
            raise FileNotFoundError(f"--resume True but {self.path} does not exist: nothing to resume.")
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        meta = state.get("meta", {})
        for key, mine in self.meta.items():
            if mine and meta.get(key) != mine:
                raise ValueError(
                    f"{self.path} was written for {key} {meta.get(key)!r}, this run has {mine!r}: "
                    "it comes from another bundle or data set; use another output_dir."
                )
        missing = [name for name in self.objects if name not in state]
        if missing:
            raise ValueError(f"{self.path} lacks {missing}.")
        max_epochs = engine.state.max_epochs
        for name, obj in self.objects.items():
            obj.load_state_dict(state[name])
        engine.state.max_epochs = max(max_epochs, engine.state.epoch)
        set_rng_state(state["rng"])
