"""Resume and save: ``checkpoint.pt`` rewritten at every epoch end, and MONAI's ``CheckpointSaver`` made atomic."""

from __future__ import annotations

import json
import os
import random
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from monai.handlers import CheckpointSaver
from monai.transforms import Randomizable, Transform
from monai.utils import IgniteInfo, min_version, optional_import

from monai_amat.utils import atomic_write, is_rank0, rank_world, root_cause

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
    from ignite.handlers import DiskSaver
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
    DiskSaver, _ = optional_import("ignite.handlers", IgniteInfo.OPT_IMPORT_VERSION, min_version, "DiskSaver")

__all__ = [
    "AtomicCheckpointSaver",
    "TrainingCheckpoint",
    "data_generators",
    "generator_states",
    "key_metric_saver",
    "rng_state",
    "set_generator_states",
    "set_rng_state",
]

# objects whose attributes may hold the random generators of data order and augmentation
_WALK = (torch.utils.data.DataLoader, torch.utils.data.Dataset, torch.utils.data.Sampler, Transform, Randomizable)
_PARALLEL = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)


def rng_state() -> dict[str, torch.Tensor]:
    """The global random states of torch (CPU, and the current CUDA device if any), numpy and Python, as tensors.

    Tensors only, so ``weights_only=True`` loads them.

    Returns:
        ``{"torch", "numpy_keys", "numpy_meta", "numpy_cached", "python"}`` tensors, and ``"cuda"`` with CUDA.
    """
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, _ = random.getstate()
    cuda = {"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}
    return {
        **cuda,
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
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    pos, has_gauss = state["numpy_meta"].tolist()
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, float(state["numpy_cached"]))
    )
    python = state["python"].tolist()
    random.setstate((python[0], tuple(python[1:]), None))


def data_generators(root: Any) -> list[np.random.RandomState | torch.Generator]:
    """The random generators a data pipeline owns, in a fixed order.

    These are the MONAI transforms' ``RandomState`` s (which MONAI's ``DataLoader`` seeds when it is built) and any
    ``torch.Generator`` of the loader or its sampler. The walk follows list, tuple and dict items, and the
    attributes of data loaders, data sets, samplers and MONAI transforms; it visits each object once.

    Args:
        root: a data loader, data set or transform (None: nothing).

    Returns:
        The generators found.
    """
    found: list[np.random.RandomState | torch.Generator] = []
    seen: set[int] = set()

    def walk(obj: Any) -> None:
        if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, torch.Tensor, np.ndarray)):
            return
        seen.add(id(obj))
        if isinstance(obj, (np.random.RandomState, torch.Generator)):
            found.append(obj)
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                walk(item)
        elif isinstance(obj, dict):
            for item in obj.values():
                walk(item)
        elif isinstance(obj, _WALK):
            for key, value in vars(obj).items():
                if not key.startswith("__"):
                    walk(value)

    walk(root)
    return found


def generator_states(generators: list[np.random.RandomState | torch.Generator]) -> dict[str, Any]:
    """The states of :py:func:`data_generators`' generators, as tensors.

    Args:
        generators: numpy ``RandomState`` s and ``torch.Generator`` s.

    Returns:
        ``{"numpy_keys": (n, 624), "numpy_meta": (n, 2), "numpy_cached": (n,), "torch": [state, ...]}``.
    """
    numpy_states = [g.get_state() for g in generators if isinstance(g, np.random.RandomState)]
    return {
        "numpy_keys": torch.tensor(np.array([s[1] for s in numpy_states], dtype=np.int64).reshape(-1, 624)),
        "numpy_meta": torch.tensor([[s[2], s[3]] for s in numpy_states], dtype=torch.int64).reshape(-1, 2),
        "numpy_cached": torch.tensor([s[4] for s in numpy_states], dtype=torch.float64),
        "torch": [g.get_state() for g in generators if isinstance(g, torch.Generator)],
    }


def set_generator_states(generators: list[np.random.RandomState | torch.Generator], state: Mapping[str, Any]) -> bool:
    """Restore what :py:func:`generator_states` saved, if it fits.

    Args:
        generators: the same kinds of generators, in the same order.
        state: the saved states.

    Returns:
        False (restoring nothing) when the numbers of generators differ, True otherwise.
    """
    numpy_gens = [g for g in generators if isinstance(g, np.random.RandomState)]
    torch_gens = [g for g in generators if isinstance(g, torch.Generator)]
    if len(numpy_gens) != len(state["numpy_keys"]) or len(torch_gens) != len(state["torch"]):
        return False
    for g, keys, (pos, has_gauss), cached in zip(
        numpy_gens, state["numpy_keys"], state["numpy_meta"].tolist(), state["numpy_cached"].tolist()
    ):
        g.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    for g, s in zip(torch_gens, state["torch"]):
        g.set_state(s)
    return True


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
        self.generators: list[np.random.RandomState | torch.Generator] = []

    def attach(self, engine: Engine) -> None:
        """Save at every epoch end (after the handlers attached before); load at start when resuming.

        Args:
            engine: the trainer; its ``data_loader`` (when it has one) is searched for random generators.
        """
        self.generators = data_generators(getattr(engine, "data_loader", None))
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def _random_states(self) -> list[dict[str, Any]]:
        """Every rank's random states, gathered on all ranks (one entry per rank)."""
        local = {**rng_state(), "data": generator_states(self.generators)}
        _, world = rank_world()
        if world == 1:
            return [local]
        states: list[Any] = [None] * world
        dist.all_gather_object(states, local)
        return [_to_cpu(s) for s in states]

    def save(self, engine: Engine) -> None:
        """Write the checkpoint; on every rank (it gathers the random states), rank 0 writes.

        Args:
            engine: the trainer.
        """
        states = self._random_states()
        if not is_rank0():
            return
        state = {name: _unwrap(obj).state_dict() for name, obj in self.objects.items()}
        state["meta"] = {**self.meta, "settings": self.settings}
        state["rng"] = states
        with atomic_write(self.path, "wb") as f:
            torch.save(state, f)

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
        changed = [f"{k}: {saved[k]!r} -> {v!r}" for k, v in self.settings.items() if k in saved and saved[k] != v]
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
        self._restore_random(state["rng"])

    def _restore_random(self, saved: Any) -> None:
        """Restore this rank's random states from the per-rank list (or the single dict of older checkpoints)."""
        saved = [saved] if isinstance(saved, Mapping) else list(saved)
        rank, world = rank_world()
        if len(saved) != world:
            warnings.warn(
                f"{self.path} was written by {len(saved)} process(es), this run has {world}: the data order and "
                "random augmentation continue, but not exactly as the interrupted run would have.",
                stacklevel=2,
            )
        if rank >= len(saved):
            return  # a rank the interrupted run did not have keeps its own seed
        mine = saved[rank]
        set_rng_state(mine)
        if "data" in mine and not set_generator_states(self.generators, mine["data"]):
            warnings.warn(
                f"{self.path}: the training data pipeline has another number of random transforms than when the "
                "checkpoint was written; their random states are not restored.",
                stacklevel=2,
            )


def _to_cpu(obj: Any) -> Any:
    """Every tensor of a nested list/tuple/dict moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


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
