"""Medical Segmentation Decathlon (MSD) data.

Download, reading through ``dataset.json``, checks, splits and a small synthetic stand-in in the real MSD layout.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import nibabel as nib
import numpy as np
from monai.apps import DecathlonDataset, download_url, extractall
from monai.utils import optional_import

from monai_amat.utils import read_json

__all__ = ["MSD_TASKS", "MSDDataset", "prepare_msd", "read_msd", "check_case", "split_cases"]

MSD_HOME = "http://medicaldecathlon.com"

MSD_TASKS: dict[str, dict[str, str]] = {
    task: {"url": DecathlonDataset.resource[task], "md5": DecathlonDataset.md5[task]}
    for task in ("Task02_Heart", "Task04_Hippocampus", "Task05_Prostate")
}
"""The tasks of the paper, with the archive URL and md5 that MONAI's ``DecathlonDataset`` uses."""

_, _HAS_TQDM = optional_import("tqdm")

_REQUIRED_KEYS = ("training", "labels", "modality")


def _how_to_get(task: str | None) -> str:
    """The hint appended to "data not found" errors."""
    if task in MSD_TASKS:
        source = f"download {MSD_TASKS[task]['url']} (md5 {MSD_TASKS[task]['md5']}) and extract it there"
        call = f"monai_amat.data.prepare_msd({task!r}, root_dir)"
    else:
        source = f"get the task's archive from {MSD_HOME} and extract it there"
        call = f"monai_amat.data.prepare_msd(task, root_dir) with task one of {sorted(MSD_TASKS)}"
    return f"To get the data, {source}, or run {call}, which downloads it with MONAI's download_url and extractall."


def prepare_msd(task: str, root_dir: str | os.PathLike, url: str | None = None, md5: str | None = None) -> Path:
    """Download an MSD task archive and extract it into ``root_dir``, unless it is already there.

    Does what :py:func:`monai.apps.download_and_extract` does, with its two steps: the archive is downloaded with
    :py:func:`monai.apps.download_url` (md5-checked) to ``root_dir/<archive name>`` and kept there, as MONAI's
    ``DecathlonDataset`` does, so a later call does not download it again; :py:func:`monai.apps.extractall` extracts
    it into a temporary folder beside the task folder, which is then renamed, so an interrupted extraction never
    leaves a half-written task folder. (``download_and_extract`` itself would need the optional ``requests`` package
    to guess the archive name.)

    Args:
        task: the task folder name, e.g. ``"Task04_Hippocampus"``; one of :py:data:`MSD_TASKS` unless ``url`` is given.
        root_dir: the folder to extract into.
        url: the archive URL; defaults to the task's URL in :py:data:`MSD_TASKS`.
        md5: the archive's md5; defaults to the task's md5 when ``url`` is not given; ``None`` with ``url`` skips
            the check.

    Returns:
        The task folder ``root_dir/<task>`` (the folder holding ``dataset.json``).

    Raises:
        ValueError: when ``task`` is unknown and no ``url`` is given, or the archive holds no ``<task>/dataset.json``.
        FileExistsError: when ``root_dir/<task>`` exists without a ``dataset.json``.
        monai.apps.utils.HashCheckError: when the downloaded archive's md5 differs from ``md5``.
    """
    if url is None:
        if task not in MSD_TASKS:
            raise ValueError(f"unknown MSD task {task!r}; known tasks: {sorted(MSD_TASKS)} (or pass url=...).")
        url, md5 = MSD_TASKS[task]["url"], md5 or MSD_TASKS[task]["md5"]
    root_dir = Path(root_dir)
    task_dir = root_dir / task
    if (task_dir / "dataset.json").is_file():
        return task_dir
    if task_dir.exists():
        raise FileExistsError(
            f"{task_dir} exists but holds no dataset.json; remove it (or move it away) and run prepare_msd again."
        )
    root_dir.mkdir(parents=True, exist_ok=True)
    archive = root_dir / Path(urlparse(url).path).name
    tmp = Path(tempfile.mkdtemp(prefix=f".{task}.", suffix=".partial", dir=root_dir))
    try:
        download_url(url, filepath=archive, hash_val=md5, hash_type="md5", progress=_HAS_TQDM)
        extractall(archive, output_dir=tmp)
        if not (tmp / task / "dataset.json").is_file():
            found = sorted(p.name for p in tmp.iterdir())
            raise ValueError(f"{archive} (from {url}) holds no {task}/dataset.json; its top level holds {found}.")
        os.rename(tmp / task, task_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return task_dir


@dataclass
class MSDDataset:
    """An MSD-format data set as read from its ``dataset.json``.

    Args:
        root: the task folder (holding ``dataset.json``).
        name: ``dataset.json``'s ``"name"`` (the folder name when absent).
        modalities: ``dataset.json``'s ``"modality"``, e.g. ``{"0": "T2", "1": "ADC"}``.
        labels: ``dataset.json``'s ``"labels"``, e.g. ``{"0": "background", "1": "PZ", "2": "TZ"}``.
        cases: one dict per ``"training"`` entry: ``{"image": abs path, "label": abs path, "case": case name}``.
    """

    root: Path
    name: str
    modalities: dict[str, str]
    labels: dict[str, str]
    cases: list[dict[str, str]]


def _case_name(path: str) -> str:
    """``".../prostate_00.nii.gz"`` -> ``"prostate_00"``."""
    return Path(Path(path).name.removesuffix(".gz")).stem


def read_msd(dataset_dir: str | os.PathLike, task: str | None = None) -> MSDDataset:
    """Read an MSD-format folder through its ``dataset.json``; works for any MSD task.

    File names, modalities and labels all come from ``dataset.json``.

    Args:
        dataset_dir: the task folder, holding ``dataset.json``, ``imagesTr/`` and ``labelsTr/``.
        task: the MSD task name, used only to say where to get missing data; defaults to the folder's name when that
            is one of :py:data:`MSD_TASKS`.

    Returns:
        The data set, with absolute image and label paths.

    Raises:
        FileNotFoundError: when ``dataset_dir`` or its ``dataset.json`` is missing (the message says how to get the
            data), or when training images/labels are missing (the message lists all of them).
        ValueError: when ``dataset.json`` is not valid JSON or lacks ``"training"``, ``"labels"`` or ``"modality"``,
            or a training entry lacks ``"image"``/``"label"``.
    """
    root = Path(dataset_dir).absolute()
    if task is None and root.name in MSD_TASKS:
        task = root.name
    json_path = root / "dataset.json"
    if not root.is_dir():
        raise FileNotFoundError(f"MSD data set folder {root} does not exist. {_how_to_get(task)}")
    if not json_path.is_file():
        raise FileNotFoundError(
            f"{json_path} is missing (the MSD folder {root} has no dataset.json). {_how_to_get(task)}"
        )
    try:
        meta = read_json(json_path, required=_REQUIRED_KEYS)
    except UnicodeDecodeError as e:
        raise ValueError(f"{json_path}: not valid JSON ({e}).") from e
    for key, kind in (("training", list), ("labels", dict), ("modality", dict)):
        if not isinstance(meta[key], kind):
            raise ValueError(f"{json_path}: {key!r} must be a JSON {kind.__name__}, got {type(meta[key]).__name__}.")
    cases, missing = [], []
    for i, entry in enumerate(meta["training"]):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("image", "label")):
            raise ValueError(f"{json_path}: 'training' entry {i} must have string 'image' and 'label', got {entry!r}.")
        case = {k: os.path.normpath(root / entry[k]) for k in ("image", "label")}
        missing += [case[k] for k in ("image", "label") if not os.path.isfile(case[k])]
        cases.append({**case, "case": _case_name(entry["image"])})
    if missing:
        listed = "\n  ".join(missing)
        raise FileNotFoundError(f"{json_path} lists {len(missing)} missing file(s):\n  {listed}")
    labels = {str(k): str(v) for k, v in meta["labels"].items()}
    modalities = {str(k): str(v) for k, v in meta["modality"].items()}
    return MSDDataset(root, str(meta.get("name", root.name)), modalities, labels, cases)


def _header_shape(path: str) -> tuple[int, ...]:
    """The shape in a NIfTI header, read without loading the voxels."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file.")
    try:
        return tuple(int(s) for s in nib.load(path).shape)
    except Exception as e:
        raise ValueError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e}).") from e


def check_case(case: dict[str, str]) -> tuple[int, ...]:
    """Check that a case's image and label headers are readable and agree in spatial shape.

    Only the NIfTI headers are read (cheap). The image may have modalities last (``(X, Y, Z, M)``, as MSD Prostate);
    its first three dimensions must equal the label's.

    Args:
        case: a dict with ``"image"`` and ``"label"`` paths, as in :py:attr:`MSDDataset.cases`.

    Returns:
        The image's spatial shape.

    Raises:
        FileNotFoundError: when a file is missing.
        ValueError: when a file is not a readable NIfTI, or the spatial shapes differ.
    """
    image_shape = _header_shape(case["image"])
    label_shape = _header_shape(case["label"])
    if image_shape[:3] != label_shape[:3]:
        raise ValueError(
            f"spatial shapes differ: image {case['image']} has shape {image_shape}, "
            f"label {case['label']} has shape {label_shape}."
        )
    return image_shape[:3]


def split_cases(cases: list, num_folds: int = 5, fold: int = 1, seed: int = 0) -> tuple[list, list, list]:
    """The paper's split: hold out one of ``num_folds`` shuffled folds, 1/3 of it for validation, 2/3 for test.

    The cases are shuffled with ``numpy.random.default_rng(seed)`` and cut into ``num_folds`` folds
    (``numpy.array_split``). Fold ``fold`` is held out: its first ``round(len / 3)`` cases (at least 1 when it holds
    2 or more) are the validation set, the rest the test set; the other folds are the training set.

    With few cases (the held-out fold has fewer than 2 cases, e.g. fewer cases than folds) a warning is issued and:
    with 3 or more cases, the held-out set is topped up to 2 from the training cases, so validation and test get one
    case each (3 cases -> 1/1/1); with 2 cases, train 1, validation 0, test 1; with 1 case, train 1, validation 0,
    test 0. Training always keeps at least one case.

    Args:
        cases: the items to split (any objects).
        num_folds: the number of folds.
        fold: the held-out fold's 0-based index.
        seed: the shuffling seed.

    Returns:
        ``(train, val, test)``: disjoint lists covering ``cases``, deterministic for a seed.

    Raises:
        ValueError: when ``cases`` is empty, ``num_folds < 2`` or ``fold`` is not in ``[0, num_folds)``.
    """
    if not cases:
        raise ValueError("split_cases: no cases to split.")
    if num_folds < 2 or not 0 <= fold < num_folds:
        raise ValueError(f"split_cases: need num_folds >= 2 and 0 <= fold < num_folds, got {num_folds=}, {fold=}.")
    n = len(cases)
    order = np.random.default_rng(seed).permutation(n)
    folds = [[cases[i] for i in part] for part in np.array_split(order, num_folds)]
    held = folds[fold]
    train = [c for k, part in enumerate(folds) if k != fold for c in part]
    if len(held) < 2:
        warnings.warn(
            f"split_cases: {n} case(s) in {num_folds} folds leave {len(held)} held-out case(s) in fold {fold}; "
            "using a reduced split (see the docstring).",
            stacklevel=2,
        )
        if n >= 3:
            need = 2 - len(held)
            held, train = held + train[-need:], train[:-need]
        elif not train:
            held, train = [], held
    num_val = max(round(len(held) / 3), 1) if len(held) >= 2 else 0
    return train, held[:num_val], held[num_val:]
