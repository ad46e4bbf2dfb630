"""Helpers that the bundle configs call: where the bundle lives, its output folder, criterion thresholds, models.

The config checks live in :py:mod:`monai_amat.apps.settings`.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.transforms import LoadImage

from monai_amat.apps import REPOSITORY_BUNDLES
from monai_amat.apps.settings import as_bool, check_config
from monai_amat.attacks import voxel_eps_scale
from monai_amat.criteria import load_thresholds
from monai_amat.utils import root_cause

__all__ = [
    "bundle_root",
    "check_output_dir",
    "default_eps_scale",
    "for_data_source",
    "select_attacks",
    "load_tau",
    "load_loss_thresholds",
    "load_model",
    "image_files",
    "readable_images",
]

logger = logging.getLogger(__name__)

# the files by which a folder holds a training run
RUN_FILES = ("checkpoint.pt", "model.pt", "model_best.pt", "margins.csv")


def check_output_dir(output_dir: str | os.PathLike, resume: Any, overwrite: Any) -> bool:
    """Refuse to start a fresh training run in a folder that holds another one.

    A folder holds a run when it has one of :py:data:`RUN_FILES`. Resuming continues it (and
    :py:class:`monai_amat.handlers.TrainingCheckpoint` checks its settings); ``overwrite`` deletes those files first,
    so the folder never mixes the old run's files with the new one's.

    Args:
        output_dir: the run's output folder.
        resume: the ``resume`` config value.
        overwrite: the ``overwrite`` config value.

    Returns:
        True, so configs can use it in an ``initialize`` expression.

    Raises:
        FileExistsError: naming the folder, its run files and the keys that decide, when neither key is set.
        ValueError: when ``resume`` or ``overwrite`` is not a boolean.
    """
    resume, overwrite = as_bool(resume, "resume"), as_bool(overwrite, "overwrite")
    folder = Path(output_dir)
    found = [name for name in RUN_FILES if (folder / name).exists()]
    if not found or resume:
        return True
    if not overwrite:
        raise FileExistsError(
            f"{folder} holds a training run ({', '.join(found)}): add --resume True to continue it, "
            "--overwrite True to replace it, or choose another --output_dir."
        )
    for name in found:
        (folder / name).unlink(missing_ok=True)  # every rank may get here; the first one deletes
    logger.warning(f"--overwrite True: deleted the previous run's {found} in {folder}.")
    return True


def bundle_root(name: str) -> str:
    """The folder of bundle ``name``, whatever the working directory.

    Looked up, in order: the folder of a ``--config_file`` given on the command line (``.../NAME/configs/x.json``);
    ``./bundles/NAME``; the working directory itself when it is the bundle; ``bundles/NAME`` beside the installed
    package (an editable install from the repository).

    Args:
        name: the bundle's folder name, e.g. ``"msd_hippocampus_seg_amat"``.

    Returns:
        The absolute path of the bundle folder.

    Raises:
        FileNotFoundError: when none of the places holds the bundle.
    """
    candidates = []
    for arg in sys.argv:
        for part in (
            arg.replace("'", " ").replace('"', " ").replace(",", " ").replace("[", " ").replace("]", " ").split()
        ):
            p = Path(part)
            if p.suffix in (".json", ".yaml", ".yml") and p.parent.name == "configs" and p.parent.parent.name == name:
                candidates.append(p.parent.parent)
    cwd = Path.cwd()
    candidates += [cwd / "bundles" / name, cwd, REPOSITORY_BUNDLES / name]
    for c in candidates:
        if c.name == name and (c / "configs").is_dir():
            return str(c.resolve())
    raise FileNotFoundError(
        f"cannot find bundle {name!r}: looked in {[str(c) for c in candidates]}; run from the repository root "
        "or pass --bundle_root."
    )


def for_data_source(defaults: Mapping[str, Mapping[str, Any]], data_source: str) -> Mapping[str, Any]:
    """The defaults of one data source, from a bundle's ``data_defaults`` (``{"embedded": {...}, "real": {...}}``).

    Args:
        defaults: the defaults per data source.
        data_source: the ``data_source`` config value.

    Returns:
        ``defaults[data_source]``.

    Raises:
        ValueError: naming ``data_source`` when the table has no such data source.
    """
    if data_source not in defaults:
        choices = " or ".join(repr(k) for k in defaults)
        raise ValueError(f"config key 'data_source' = {data_source!r} is invalid: must be {choices}.")
    return defaults[data_source]


def default_eps_scale(
    embedded: bool,
    spatial_size: Sequence[int],
    paper_spatial_size: Sequence[int],
    channels: int = 1,
    paper_channels: int = 1,
) -> float:
    """The factor that turns the paper's L2 noise levels into the same per-value noise on another input.

    An L2 budget spread over ``n`` input values gives each value about ``eps / sqrt(n)``; inputs with fewer values
    than the paper's get proportionally stronger noise at the same eps. The factor is
    ``sqrt(channels / paper_channels)``, times ``sqrt(prod(spatial_size) / prod(paper_spatial_size))`` on embedded
    data (real data are resized to the paper's size). ``paper_channels`` counts what the paper's network received:
    the authors feed the grey cephalometric X-ray as three equal RGB channels, so a one-channel network gets
    ``sqrt(1 / 3)`` of the paper's eps for the same per-value noise.

    Args:
        embedded: the run uses the embedded data.
        spatial_size: the network input size of the run.
        paper_spatial_size: the paper's network input size.
        channels: the input channels of the run's network.
        paper_channels: the input channels of the paper's network.

    Returns:
        The factor.

    Raises:
        ValueError: when a channel count is not an integer >= 1.
    """
    for name, value in (("channels", channels), ("paper_channels", paper_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    spatial = voxel_eps_scale(spatial_size, paper_spatial_size) if embedded else 1.0
    return spatial * math.sqrt(channels / paper_channels)


def load_tau(path: str | os.PathLike, default: float | None) -> float:
    """The Dice threshold ``tau`` from ``thresholds.json``, or ``default`` (with a warning) when there is none.

    Args:
        path: the thresholds file written by ``calibrate.json``.
        default: the value to use without a calibration (the paper's reference value); None where the paper has
            none (the 3D variant), so a calibration is required.

    Returns:
        ``tau``.

    Raises:
        FileNotFoundError: when the file is missing and there is no default.
        ValueError: when the file exists but is not a Dice calibration.
    """
    if not Path(path).is_file():
        if default is None:
            raise FileNotFoundError(
                f"{path} not found, and this configuration has no default Dice threshold (default_tau is null): "
                "run calibrate.json with the same configs first, or set --default_tau."
            )
        warnings.warn(
            f"{path} not found: using the default Dice threshold tau={default} (run calibrate.json).", stacklevel=2
        )
        return float(default)
    data = load_thresholds(path)
    if data["criterion"] != "dice" or "tau" not in data["thresholds"]:
        raise ValueError(f"{path}: expected a Dice calibration with thresholds.tau, got {data['criterion']!r}.")
    return float(data["thresholds"]["tau"])


def load_loss_thresholds(path: str | os.PathLike, default: Mapping[str, float] | None) -> dict[str, float]:
    """Loss-component thresholds from ``thresholds.json``, or ``default`` (with a warning) when there is none.

    Args:
        path: the thresholds file written by ``calibrate.json``.
        default: ``{component: threshold}`` to use without a calibration; None where no default fits (real data:
            thresholds that do not match the model's losses make every sample "wrong", or "correct", from the
            start, and the margins never adapt), so a calibration is required.

    Returns:
        ``{component: threshold}``.

    Raises:
        FileNotFoundError: when the file is missing and there is no default.
        ValueError: when the file lacks a component of ``default``.
    """
    if not Path(path).is_file():
        if default is None:
            raise FileNotFoundError(
                f"{path} not found, and this configuration has no default loss thresholds (default_thresholds is "
                "null, as for real data): run train_std.json and calibrate.json with the same configs first, or "
                "set --default_thresholds."
            )
        warnings.warn(
            f"{path} not found: using default loss thresholds {dict(default)} (run calibrate.json).", stacklevel=2
        )
        return {k: float(v) for k, v in default.items()}
    thresholds = load_thresholds(path)["thresholds"]
    missing = [k for k in (default or {}) if k not in thresholds]
    if missing:
        raise ValueError(f"{path}: thresholds lack {missing}.")
    return {k: float(v) for k, v in thresholds.items() if default is None or k in default}


def load_model(network: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Load a ``model.pt`` state dict (``weights_only=True``) into ``network``.

    Args:
        network: the network of the config's ``network_def``.
        path: the model file.

    Returns:
        ``network``.

    Raises:
        FileNotFoundError: when the file is missing (train first, or set ``ckpt_path``).
        RuntimeError: when the file cannot be read (truncated, corrupted) or its state dict does not fit the
            network (names the file).
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no model to load; train first (train.json) or set --ckpt_path.")
    device = next(network.parameters()).device
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated or not a state dict: torch's message does not name the file
        raise RuntimeError(f"{path} cannot be read as a model state dict ({root_cause(e)}).") from e
    try:
        network.load_state_dict(state)
    except RuntimeError as e:
        raise RuntimeError(f"{path} does not fit the configured network: {e}") from e
    return network


def image_files(folder: str | os.PathLike, patterns: Sequence[str] = ("*.nii.gz", "*.nii")) -> list[str]:
    """The image files of a folder, sorted.

    Args:
        folder: the input folder.
        patterns: glob patterns of the files to take.

    Returns:
        Absolute paths.

    Raises:
        FileNotFoundError: when the folder is missing or holds no matching file.
    """
    folder = Path(folder)
    files = sorted(str(f.resolve()) for p in patterns for f in folder.glob(p)) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{folder}: no input images matching {list(patterns)}; set --input_dir.")
    return files


def readable_images(files: Sequence[str], strict: bool = False) -> list[str]:
    """The input images that load and hold only finite values; the others are named and skipped (or refused).

    Each file is loaded once with MONAI's ``LoadImage`` before inference starts, so one truncated or corrupted file
    does not abort the whole run half-way with an error that names no file.

    Args:
        files: the input images.
        strict: refuse the run instead of skipping (the ``strict_inputs`` config value).

    Returns:
        The readable files, in order.

    Raises:
        ValueError: naming the file, with ``strict``; naming the folder's files when none is readable.
    """
    load, good = LoadImage(image_only=True), []
    for f in files:
        try:
            bad = int((~torch.isfinite(torch.as_tensor(load(f)))).sum())
            problem = f"{bad} NaN or inf value(s)" if bad else ""
        except Exception as e:  # whatever the reader raises for a truncated or corrupted file
            problem = f"cannot be read ({root_cause(e)})"
        if not problem:
            good.append(f)
        elif strict:
            raise ValueError(f"{f}: {problem} (strict_inputs is true).")
        else:
            logger.error(f"{f}: {problem}; skipped (strict_inputs true would stop the run).")
    if not good:
        raise ValueError(f"none of the {len(files)} input image(s) is readable, e.g. {files[:3]}.")
    return good


def select_attacks(names: Sequence[str], available: Mapping[str, Any]) -> dict[str, Any]:
    """The evaluation attacks a bundle's ``eval_attacks`` names, in that order.

    Args:
        names: the ``eval_attacks`` config value.
        available: ``{name: attack}`` the bundle defines (``evaluate#attacks``).

    Returns:
        ``{name: attack}`` for :py:class:`monai_amat.engines.RobustEvaluator`.

    Raises:
        ValueError: naming ``eval_attacks`` and the names this bundle does not define.
    """
    check_config({"eval_attacks": list(names)})
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(
            f"config key 'eval_attacks' = {list(names)!r} is invalid: this bundle defines no {missing} attack "
            f"(it has {list(available)})."
        )
    return {n: available[n] for n in names}
