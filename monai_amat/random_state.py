"""The random states a resumed run restores: the global generators and those of a data pipeline, per rank.

Tensors only, so that ``torch.load(weights_only=True)`` (as MONAI loads checkpoints) reads them back.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from monai.transforms import Randomizable, Transform

from monai_amat.utils import map_tensors, rank_world

__all__ = [
    "RandomStates",
    "data_generators",
    "generator_states",
    "rng_state",
    "set_generator_states",
    "set_rng_state",
]

# objects whose attributes may hold the random generators of data order and augmentation
_WALK = (torch.utils.data.DataLoader, torch.utils.data.Dataset, torch.utils.data.Sampler, Transform, Randomizable)


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


class RandomStates:
    """Every rank's random states as one checkpointable object.

    The global torch / numpy / Python generators and those of a data pipeline (:py:func:`data_generators`).
    ``state_dict`` gathers the ranks' states on every rank (call it on all of them, as a checkpoint handler on every
    rank does); ``load_state_dict`` restores this rank's.

    Args:
        root: the data pipeline whose generators are included (a data loader, data set or transform); None for the
            global generators only. :py:meth:`track` changes it.
    """

    def __init__(self, root: Any = None) -> None:
        self.generators: list[np.random.RandomState | torch.Generator] = []
        self.track(root)

    def track(self, root: Any) -> None:
        """Include the generators of this data pipeline (instead of the earlier one's).

        Args:
            root: a data loader, data set or transform; None for none.
        """
        self.generators = data_generators(root)

    def state_dict(self) -> list[dict[str, Any]]:
        """Every rank's states, one entry per rank, gathered on all ranks.

        Returns:
            ``[{**rng_state(), "data": generator_states(...)}, ...]``, CPU tensors.
        """
        local = {**rng_state(), "data": generator_states(self.generators)}
        _, world = rank_world()
        if world == 1:
            return [local]
        states: list[Any] = [None] * world
        dist.all_gather_object(states, local)
        return [map_tensors(s, torch.Tensor.cpu) for s in states]

    def load_state_dict(self, state_dict: list[Mapping[str, Any]] | Mapping[str, Any]) -> None:
        """Restore this rank's states from what :py:meth:`state_dict` returned (or the single dict of one process).

        A run with another number of processes restores the ranks it shares with the saved run, with a warning; a
        data pipeline with another number of generators keeps its own, with a warning.

        Args:
            state_dict: the saved states.
        """
        saved = [state_dict] if isinstance(state_dict, Mapping) else list(state_dict)
        rank, world = rank_world()
        if len(saved) != world:
            warnings.warn(
                f"the random states were saved by {len(saved)} process(es), this run has {world}: the data order and "
                "random augmentation continue, but not exactly as the interrupted run would have.",
                stacklevel=2,
            )
        if rank >= len(saved):
            return  # a rank the interrupted run did not have keeps its own seed
        mine = saved[rank]
        set_rng_state(mine)
        if "data" in mine and not set_generator_states(self.generators, mine["data"]):
            warnings.warn(
                "the training data pipeline has another number of random transforms than when the random states were "
                "saved; their random states are not restored.",
                stacklevel=2,
            )
