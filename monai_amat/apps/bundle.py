"""Helpers that the bundle configs call: where the bundle lives, config checks, criterion thresholds."""

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
from monai_amat.attacks import voxel_eps_scale
from monai_amat.criteria import CALIBRATION_STATISTICS, load_thresholds
from monai_amat.engines.evaluator import check_eps_list
from monai_amat.utils import root_cause

__all__ = [
    "as_bool",
    "bundle_root",
    "check_config",
    "check_output_dir",
    "default_eps_scale",
    "select_attacks",
    "EVAL_ATTACKS",
    "load_tau",
    "load_loss_thresholds",
    "load_model",
    "image_files",
    "readable_images",
]

logger = logging.getLogger(__name__)

# the evaluation attacks a bundle may name in ``eval_attacks``
EVAL_ATTACKS = ("pgd", "apgd", "segpgd")
# the files by which a folder holds a training run
RUN_FILES = ("checkpoint.pt", "model.pt", "model_best.pt", "margins.csv")
# the boolean keys of the bundles: each consumer reads them through :py:func:`as_bool`
BOOL_KEYS = (
    "amp",
    "resume",
    "overwrite",
    "skip_non_finite",
    "oversample_foreground",
    "sat_start_on_sphere",
    "margin_refine",
    "eval_random_start",
    "eval_start_on_sphere",
    "breaking_eps",
    "masking_checks",
    "strict_inputs",
    "export_model",
)


def as_bool(value: Any, key: str) -> bool:
    """A boolean config value, also when it comes from the command line as text.

    ``monai.bundle run --resume false`` gives the string ``"false"``, which Python finds true; every boolean key of
    the bundles goes through this function instead.

    Args:
        value: a bool, 0 or 1, or one of ``true/false/yes/no/1/0`` in any case.
        key: the config key, for the error message.

    Returns:
        The boolean.

    Raises:
        ValueError: naming the key and the value when it is none of these.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "false", "no", "0"):
        return value.strip().lower() in ("true", "yes", "1")
    raise ValueError(f"config key {key!r} = {value!r} is invalid: must be true or false (or yes/no, 1/0).")


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


def check_config(values: Mapping[str, Any]) -> bool:
    """Check a bundle's settings before anything runs; errors name the config key.

    Known keys (others are ignored): ``epochs`` (integer >= 1), ``delta`` (> 0), ``max_margin`` (>= delta),
    ``margin_floor`` (in [0, max_margin]), ``beta`` (in [0, 1]), ``sat_eps`` (>= 0), ``sat_eps_list`` and
    ``eps_list`` (ascending, >= 0), ``train_attack_steps`` /
    ``attack_steps`` (integer >= 1), ``train_alpha`` / ``eval_alpha`` (> 0), ``norm`` (``"l2"`` or ``"linf"``),
    ``batch_size`` (integer >= 1), ``learning_rate`` (> 0), ``data_source`` (``"embedded"`` or ``"real"``;
    ``"real"`` needs ``dataset_dir``), ``eps_scale`` (> 0, or a callable giving each input's factor such as
    :py:class:`monai_amat.attacks.PerVoxelEpsScale`; logged, since it multiplies every eps-like key),
    ``calibration_split`` (``"train"`` or ``"val"``), ``calibration_z`` (finite),
    ``calibration_statistic`` (``"huber"`` or ``"max"``), ``seed`` / ``data_seed`` (integer
    >= 0), ``embedded_cases`` (integer >= 1), ``default_tau`` (in [0, 1], or None: no default, a calibration is
    required), ``spatial_size`` (integers >= 1,
    multiples of ``spatial_multiple`` when given: what the network's strides need), ``patch_size`` (integers >= 1,
    per axis a multiple of the product of ``strides``, the network's per-level strides, each a number or one per
    axis), :py:data:`BOOL_KEYS` (booleans, also as text: :py:func:`as_bool`), ``amp_dtype`` (``"float16"`` or
    ``"bfloat16"``: the autocast type with ``amp``), ``eval_attacks`` (distinct names from :py:data:`EVAL_ATTACKS`;
    whether the bundle defines each is checked by :py:func:`select_attacks`).

    Args:
        values: ``{config key: value}``.

    Returns:
        True, so configs can use it in an ``initialize`` expression.

    Raises:
        ValueError: naming the first bad key and its value.
    """

    def bad(key: str, rule: str) -> ValueError:
        return ValueError(f"config key {key!r} = {values[key]!r} is invalid: {rule}.")

    def number(key: str) -> float:
        v = values[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            raise bad(key, "must be a number")
        return float(v)

    for key in ("epochs", "train_attack_steps", "attack_steps", "batch_size", "embedded_cases"):
        if key in values and (number(key) != int(values[key]) or values[key] < 1):
            raise bad(key, "must be an integer >= 1")
    for key in ("seed", "data_seed"):
        if key in values and (number(key) != int(values[key]) or values[key] < 0):
            raise bad(key, "must be an integer >= 0")
    if values.get("default_tau") is not None and not 0 <= number("default_tau") <= 1:
        raise bad("default_tau", "must be a Dice value in [0, 1]")
    if "spatial_size" in values:
        size, multiple = values["spatial_size"], int(values.get("spatial_multiple", 1))
        if (
            isinstance(size, str)
            or not isinstance(size, Sequence)
            or not size
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in size)
        ):
            raise bad("spatial_size", "must be a list of integers >= 1, e.g. [64, 64]")
        if any(v % multiple for v in size):
            nearest = [max(multiple, v // multiple * multiple) for v in size]
            raise bad("spatial_size", f"the network's strides need multiples of {multiple}, e.g. {nearest}")
    if "patch_size" in values:
        size = values["patch_size"]
        if isinstance(size, str) or not isinstance(size, Sequence) or not size:
            raise bad("patch_size", "must be a list of integers >= 1, e.g. [64, 64, 32]")
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in size):
            raise bad("patch_size", "must be a list of integers >= 1, e.g. [64, 64, 32]")
        levels = [s if isinstance(s, Sequence) else [s] * len(size) for s in values.get("strides", [])]
        multiples = [math.prod(level[d] for level in levels) for d in range(len(size))]
        if any(v % m for v, m in zip(size, multiples)):
            nearest = [max(m, v // m * m) for v, m in zip(size, multiples)]
            raise bad("patch_size", f"the network's strides need multiples of {multiples}, e.g. {nearest}")
    for key in ("delta", "train_alpha", "eval_alpha", "learning_rate", "eps_scale"):
        if key == "eps_scale" and callable(values.get(key)):
            continue
        if key in values and not (number(key) > 0 and math.isfinite(values[key])):
            raise bad(key, "must be finite and > 0")
    if "max_margin" in values and not number("max_margin") >= values.get("delta", 0):
        raise bad("max_margin", f"must be >= delta ({values.get('delta')})")
    if "margin_floor" in values and not 0 <= number("margin_floor") <= values.get("max_margin", math.inf):
        raise bad("margin_floor", f"must be in [0, max_margin ({values.get('max_margin', math.inf)})]")
    if "beta" in values and not 0 <= number("beta") <= 1:
        raise bad("beta", "must be in [0, 1]")
    if "sat_eps" in values and not (number("sat_eps") >= 0 and math.isfinite(values["sat_eps"])):
        raise bad("sat_eps", "must be finite and >= 0")
    for key in ("eps_list", "sat_eps_list"):
        if key in values:
            if not isinstance(values[key], Sequence) or isinstance(values[key], str):
                raise bad(key, "must be a list of numbers")
            check_eps_list(values[key], name=f"config key {key!r}")
    if "norm" in values and str(values["norm"]).lower() not in ("l2", "linf"):
        raise bad("norm", "must be 'l2' or 'linf'")
    for key in BOOL_KEYS:
        if key in values:
            as_bool(values[key], key)
    if "eval_attacks" in values:
        names = values["eval_attacks"]
        if isinstance(names, str) or not isinstance(names, Sequence) or not names or len(set(names)) != len(names):
            raise bad("eval_attacks", f"must be a non-empty list of distinct names from {list(EVAL_ATTACKS)}")
        unknown = [n for n in names if n not in EVAL_ATTACKS]
        if unknown:
            raise bad("eval_attacks", f"unknown attack(s) {unknown}; known: {list(EVAL_ATTACKS)}")
    if "amp_dtype" in values and values["amp_dtype"] not in ("float16", "bfloat16"):
        raise bad("amp_dtype", "must be 'float16' or 'bfloat16'")
    if "calibration_split" in values and values["calibration_split"] not in ("train", "val"):
        raise bad("calibration_split", "must be 'train' or 'val'")
    if "calibration_z" in values and not math.isfinite(number("calibration_z")):
        raise bad("calibration_z", "must be a finite number")
    if "calibration_statistic" in values and values["calibration_statistic"] not in CALIBRATION_STATISTICS:
        raise bad("calibration_statistic", f"must be one of {list(CALIBRATION_STATISTICS)}")
    if "eps_scale" in values:
        scale = values["eps_scale"]
        logger.info(
            f"eps_scale = {scale if callable(scale) else format(scale, '.4g')}: delta, max_margin, sat_eps and "
            "eps_list are in the paper's units; the attacks use them times eps_scale."
        )
    if "data_source" in values:
        if values["data_source"] not in ("embedded", "real"):
            raise bad("data_source", "must be 'embedded' or 'real'")
        if values["data_source"] == "real" and not values.get("dataset_dir"):
            raise ValueError("config key 'dataset_dir' must name the data set folder when data_source is 'real'.")
    return True


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
