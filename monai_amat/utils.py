"""Small helpers shared by handlers and tools: atomic file writes, JSON files with clear errors, the writing rank."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist

__all__ = [
    "atomic_write",
    "write_json",
    "read_json",
    "is_rank0",
    "rank_world",
    "root_cause",
    "plain_tensor",
    "is_ddp",
]


def rank_world() -> tuple[int, int]:
    """The rank of this process and the number of processes; ``(0, 1)`` without ``torch.distributed``.

    Returns:
        ``(rank, world_size)``.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``torch.distributed.all_gather_object``); ``[obj]`` alone.

    Call it on every rank. For picklable values (rows, CPU tensors).

    Args:
        obj: this rank's value.

    Returns:
        One value per rank.
    """
    _, world = rank_world()
    if world == 1:
        return [obj]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def is_rank0() -> bool:
    """Whether this process writes files and logs: rank 0, or the only process.

    Returns:
        True on rank 0 or without ``torch.distributed``.
    """
    return rank_world()[0] == 0


def _umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside ``path`` and rename it to ``path`` once the block succeeds.

    A reader (or a run killed at any moment) sees either the old file or the new one, never half of it. The file
    gets the permissions a plain ``open(path, "w")`` would give it (``0o666`` less the umask), not the temporary
    file's ``0o600``.

    Args:
        path: the file to write.
        mode: ``"w"`` for text, ``"wb"`` for bytes.

    Yields:
        The open temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically.

    Args:
        path: the JSON file.
        data: anything ``json.dump`` takes.
    """
    with atomic_write(path) as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def read_json(path: str | os.PathLike, required: tuple[str, ...] = ()) -> dict:
    """Read a JSON object, with errors that name the file.

    Args:
        path: the JSON file.
        required: keys the object must have.

    Returns:
        The parsed object.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when it is not a JSON object or lacks a required key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}).") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}.")
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}.")
    return data


def root_cause(error: BaseException) -> str:
    """The innermost message of an exception chain (MONAI's config parser and transforms wrap the error that matters).

    Args:
        error: the exception caught.

    Returns:
        ``"Type: message"`` of the innermost exception.
    """
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    return f"{type(error).__name__}: {error}"


def plain_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a plain ``torch.Tensor`` (a MetaTensor's data without its metadata, no copy); other tensors as they are.

    Args:
        t: a tensor.

    Returns:
        The plain tensor.
    """
    return t.as_tensor() if hasattr(t, "as_tensor") else t


def is_ddp(network: torch.nn.Module) -> bool:
    """Whether ``network`` is a ``DistributedDataParallel`` module, also inside ``torch.compile``'s wrapper.

    Args:
        network: a module (MONAI's ``compile=True`` gives the trainer the compiled wrapper).

    Returns:
        True for DDP, compiled or not.
    """
    return isinstance(getattr(network, "_orig_mod", network), torch.nn.parallel.DistributedDataParallel)


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor of a (nested) list, tuple or dict, as networks and losses return them.

    Ignite's ``apply_to_tensor`` does the same, but the ground floor does not import Ignite.

    Args:
        obj: a tensor, or a list/tuple/dict holding tensors (other values are kept as they are).
        fn: the function applied to each tensor.

    Returns:
        The same structure with ``fn`` applied to its tensors.
    """
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj
