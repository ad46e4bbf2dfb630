"""Resume and save: ``checkpoint.pt`` rewritten at every epoch end, and MONAI's ``CheckpointSaver`` made atomic."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.handlers import CheckpointSaver
from monai.utils import IgniteInfo, min_version, optional_import

# the random-state helpers lived here first: importable from this module too
from monai_amat.random_state import (
    RandomStates,
    data_generators,
    generator_states,
    rng_state,
    set_generator_states,
    set_rng_state,
)
from monai_amat.utils import atomic_write, root_cause

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
    from ignite.handlers import Checkpoint, DiskSaver
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
    Checkpoint, _ = optional_import("ignite.handlers", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Checkpoint")
    DiskSaver, _ = optional_import("ignite.handlers", IgniteInfo.OPT_IMPORT_VERSION, min_version, "DiskSaver")

__all__ = [
    "AtomicCheckpointSaver",
    "TrainingCheckpoint",
    "RandomStates",
    "data_generators",
    "generator_states",
    "key_metric_saver",
    "rng_state",
    "set_generator_states",
    "set_rng_state",
]

_PARALLEL = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)


def _unwrap(obj: Any) -> Any:
    """The module inside ``DataParallel`` / ``DistributedDataParallel``, so state dicts carry no ``module.``."""
    return obj.module if isinstance(obj, _PARALLEL) else obj


class TrainingCheckpoint:
    """Rewrites ``checkpoint.pt`` (atomically, rank 0) at every epoch end; with ``resume=True`` loads it at start.

    The checkpoint holds each object's ``state_dict`` (network, optimizer, LR scheduler, the trainer's Ignite
    state, margins...), a ``meta`` entry (bundle name, number of training samples) that is checked on loading so a
    checkpoint of another bundle or data set is refused instead of half-loaded, and every rank's random states: the
    global torch / numpy / Python generators and those of the trainer's data pipeline (MONAI transforms'
    ``RandomState`` s, any loader or sampler ``torch.Generator``; see :py:func:`data_generators`). A run killed at
    any moment, even mid-epoch, and resumed with the same settings therefore repeats the interrupted epoch exactly
    as the uninterrupted run does it (same data order, augmentation and attack random starts). Networks wrapped in
    ``DistributedDataParallel`` are saved unwrapped, so single-process runs resume multi-GPU checkpoints and back.

    On resume the trainer keeps its configured ``max_epochs`` (the total), so a larger value extends a finished
    run. When there is no checkpoint yet (a run killed during its first epoch) the run starts from scratch, with a
    warning, which is what the uninterrupted run did too.

    Attach it in the config's ``initialize`` step: it references the trainer, which cannot sit in its own
    handler list. Every rank attaches it (saving gathers the ranks' random states).

    Args:
        output_dir: folder of the checkpoint.
        objects: ``{name: object with state_dict/load_state_dict}``; the trainer among them. None values are left
            out (e.g. :py:func:`key_metric_saver` of a run without validation).
        resume: load the checkpoint when the run starts.
        filename: the checkpoint file name.
        bundle: the bundle name recorded in (and checked against) the checkpoint.
        num_samples: the number of training samples, recorded and checked likewise.
        settings: ``{config key: value}`` of the training settings a resumed run must share with the checkpoint
            (input size, network widths, delta, ...): recorded, and on resume every difference is listed in the
            error. Keys the checkpoint does not record are not compared.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        objects: Mapping[str, Any],
        resume: bool = False,
        filename: str = "checkpoint.pt",
        bundle: str = "",
        num_samples: int = 0,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = Path(output_dir) / filename
        self.objects = {name: obj for name, obj in objects.items() if obj is not None}
        self.resume = bool(resume)
        self.meta = {"bundle": str(bundle), "num_samples": int(num_samples)}
        # JSON-like values (tuples as lists), as the checkpoint gives them back
        self.settings = json.loads(json.dumps(dict(settings or {}), default=str))
        self.random = RandomStates()
        self._checkpoint: Checkpoint | None = None

    def attach(self, engine: Engine) -> None:
        """Save at every epoch end (after the handlers attached before); load at start when resuming.

        Args:
            engine: the trainer; its ``data_loader`` (when it has one) is searched for random generators.
        """
        self.random.track(getattr(engine, "data_loader", None))
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def save(self, engine: Engine) -> None:
        """Write the checkpoint; on every rank (it gathers the random states), rank 0 writes.

        Args:
            engine: the trainer.
        """
        if self._checkpoint is None:
            # Ignite's Checkpoint writes the objects' state dicts (networks unwrapped from DDP) on rank 0, through a
            # saver that keeps one file under a fixed name and replaces it in one rename
            to_save = {**self.objects, "meta": _Meta({**self.meta, "settings": self.settings}), "rng": self.random}
            self._checkpoint = Checkpoint(
                to_save, _AtomicDiskSaver(self.path.parent, self.path.name), n_saved=1, greater_or_equal=True
            )
        self._checkpoint(engine)

    def load(self, engine: Engine) -> None:
        """Restore every object and this rank's random states.

        Args:
            engine: the trainer.

        Raises:
            ValueError: when the checkpoint belongs to another bundle or data set size, was written with other
                training settings, lacks an object, or cannot be read (each names the file).
        """
        if not self.path.is_file():
            warnings.warn(f"--resume True but {self.path} does not exist (yet): starting from scratch.", stacklevel=2)
            return
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, corrupted, or not a checkpoint: torch's message does not name the file
            raise ValueError(f"{self.path} cannot be read as a checkpoint ({root_cause(e)}).") from e
        meta = state.get("meta", {})
        for key, mine in self.meta.items():
            if mine and meta.get(key) != mine:
                raise ValueError(
                    f"{self.path} was written for {key} {meta.get(key)!r}, this run has {mine!r}: "
                    "it comes from another bundle or data set; use another output_dir."
                )
        saved = meta.get("settings", {})
        changed = [
            f"{k}: {saved[k]!r} -> {v!r}" if k in saved else f"{k}: (not recorded) -> {v!r}"
            for k, v in self.settings.items()
            if k not in saved or saved[k] != v
        ]
        if changed:
            raise ValueError(
                f"{self.path} was written with other training settings ({'; '.join(changed)}): resume with the "
                "checkpoint's settings, or start a fresh run (--overwrite True, or another output_dir)."
            )
        missing = [name for name in self.objects if name not in state]
        if missing:
            raise ValueError(f"{self.path} lacks {missing}.")
        max_epochs, epoch_length = engine.state.max_epochs, engine.state.epoch_length
        for name, obj in self.objects.items():
            try:
                _unwrap(obj).load_state_dict(state[name])
            except (RuntimeError, KeyError, ValueError) as e:
                raise ValueError(f"{self.path}: its {name!r} does not fit this run: {e}") from e
        engine.state.max_epochs = max(max_epochs, engine.state.epoch)
        if epoch_length and engine.state.epoch_length != epoch_length:
            # another number of processes or batch size: the saved epochs are complete, count them in this run's
            # iterations so the next epoch runs over the whole data loader
            engine.state.epoch_length = epoch_length
            engine.state.iteration = engine.state.epoch * epoch_length
        self.random.load_state_dict(state["rng"])


class _Meta:
    """A fixed record (bundle, number of samples, settings) as a checkpoint object."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record

    def state_dict(self) -> dict[str, Any]:
        return self.record


class _AtomicDiskSaver(DiskSaver):
    """Ignite's ``DiskSaver`` writing through :py:func:`monai_amat.utils.atomic_write`, with an optional fixed name.

    With a fixed name, ``remove`` keeps the old file: the next save replaces it in one rename, so there is never a
    moment without it.
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, require_empty=False, atomic=True)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        super().__call__(checkpoint, self.filename or filename, metadata)

    def _save_func(self, checkpoint: Mapping, path: Path, func: Callable) -> None:
        with atomic_write(path, "wb") as f:
            func(checkpoint, f, **self.kwargs)

    def remove(self, filename: str) -> None:
        if self.filename is None:
            super().remove(filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments) that writes its files to a temporary name and renames them.

    A run killed at any moment leaves the old ``model.pt`` / ``model_best.pt`` or the new one, never half of one
    (MONAI's own saver writes in place, and removes the previous best model before writing the next). Like MONAI's,
    it saves on rank 0 only and unwraps ``DataParallel`` / ``DistributedDataParallel`` networks. Its
    ``state_dict`` (the key metric of the best model kept) goes into :py:class:`TrainingCheckpoint`, so a resumed run
    replaces ``model_best.pt`` only with a better model, as the uninterrupted run does.

    Args:
        args: positional arguments of ``monai.handlers.CheckpointSaver``.
        kwargs: keyword arguments of ``monai.handlers.CheckpointSaver``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler = _AtomicDiskSaver(
                    self.save_dir, getattr(checkpoint.save_handler, "filename", None)
                )

    def state_dict(self) -> dict[str, Any]:
        """The key metric values and file names of the best models kept (empty without ``save_key_metric``).

        Returns:
            Ignite ``Checkpoint.state_dict()`` of the key-metric saver: floats and strings only.
        """
        return dict(self._key_metric_checkpoint.state_dict()) if self._key_metric_checkpoint is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore what :py:meth:`state_dict` returned (an empty dict restores nothing).

        Args:
            state_dict: the saved state.
        """
        if state_dict:
            super().load_state_dict(state_dict)


def key_metric_saver(handlers: list[Any] | None) -> CheckpointSaver | None:
    """The handler of a list that saves the best model (a ``CheckpointSaver`` with ``save_key_metric``), if any.

    Configs put it among :py:class:`TrainingCheckpoint`'s objects (``{"_target_": "...key_metric_saver", "handlers":
    "@validate#handlers"}``), found by type rather than position since tools (``--tracking mlflow``) add handlers.

    Args:
        handlers: the validation handlers.

    Returns:
        The saver, or None when no handler saves a best model.
    """
    for handler in handlers or []:
        if isinstance(handler, CheckpointSaver) and handler._key_metric_checkpoint is not None:
            return handler
    return None
