"""The one table of the bundles' settings: each config key's rule, the stages that use it, what a checkpoint records.

Every consumer derives its view from :py:data:`SETTINGS`: :py:func:`check_config` (the bundles' one check, which
also parses booleans given as text), :py:func:`checkpoint_settings` (what a training checkpoint records and a resume
must match), :py:data:`BOOL_KEYS`, and the comparison runner's reserved, evaluation-only and per-model unused keys
(:py:func:`runner_keys`, :py:func:`stage_only_keys`, :py:func:`unused_by`).

The stages are the bundles' runs: ``amat`` (``train.json``), ``sat`` (``train_sat.json``), ``std``
(``train_std.json``), ``calibrate``, ``evaluate`` and ``inference``. This module imports no torch, so that
``python -m monai_amat.apps.compare --help`` stays quick.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BOOL_KEYS",
    "EVAL_ATTACKS",
    "SETTINGS",
    "STAGES",
    "Setting",
    "as_bool",
    "check_config",
    "checkpoint_settings",
    "runner_keys",
    "stage_only_keys",
    "unused_by",
]

logger = logging.getLogger(__name__)

STAGES = ("amat", "sat", "std", "calibrate", "evaluate", "inference")
# the evaluation attacks a bundle may name in ``eval_attacks``
EVAL_ATTACKS = ("pgd", "apgd", "segpgd")

_TRAIN = ("amat", "sat", "std")
_ATTACKED = ("amat", "sat")
_MODEL = ("amat", "sat", "std", "calibrate", "evaluate")  # the runs that read the training data
_ALL = STAGES

Rule = Callable[[str, Any, Mapping[str, Any]], Any]


@dataclass(frozen=True)
class Setting:
    """One config key of the bundles.

    Args:
        rule: ``rule(key, value, values) -> parsed value``, raising ValueError that names the key; None takes any
            value as it is.
        stages: the stages whose runs use the key.
        checkpoint: a training checkpoint records the key, and a resume with another value is refused.
        runner: why the comparison runner sets the key itself (then ``--KEY`` is refused there); None otherwise.
    """

    rule: Rule | None
    stages: tuple[str, ...]
    checkpoint: bool = False
    runner: str | None = None


def _bad(key: str, value: Any, rule: str) -> ValueError:
    return ValueError(f"config key {key!r} = {value!r} is invalid: {rule}.")


def as_bool(value: Any, key: str) -> bool:
    """A boolean config value, also when it comes from the command line as text.

    ``monai.bundle run --resume false`` gives the string ``"false"``, which Python finds true; every boolean key of
    the bundles is parsed here once (:py:func:`check_config`), and the configs read the parsed value.

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


def _boolean(key: str, value: Any, values: Mapping[str, Any]) -> bool:
    return as_bool(value, key)


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise _bad(key, value, "must be a number")
    return float(value)


def _integer(least: int) -> Rule:
    def rule(key: str, value: Any, values: Mapping[str, Any]) -> Any:
        if _number(key, value) != int(value) or value < least:
            raise _bad(key, value, f"must be an integer >= {least}")
        return value

    return rule


def _positive(key: str, value: Any, values: Mapping[str, Any]) -> Any:
    if not (_number(key, value) > 0 and math.isfinite(value)):
        raise _bad(key, value, "must be finite and > 0")
    return value


def _scale(key: str, value: Any, values: Mapping[str, Any]) -> Any:
    """A number > 0, or a callable giving each input's factor (:py:class:`monai_amat.attacks.PerVoxelEpsScale`)."""
    if not callable(value):
        _positive(key, value, values)
    logger.info(
        f"{key} = {value if callable(value) else format(value, '.4g')}: delta, max_margin, sat_eps and "
        "eps_list are in the paper's units; the attacks use them times eps_scale."
    )
    return value


def _choice(*options: str) -> Rule:
    def rule(key: str, value: Any, values: Mapping[str, Any]) -> Any:
        if value not in options:
            raise _bad(key, value, "must be " + " or ".join(repr(o) for o in options))
        return value

    return rule


def _norm(key: str, value: Any, values: Mapping[str, Any]) -> Any:
    if str(value).lower() not in ("l2", "linf"):
        raise _bad(key, value, "must be 'l2' or 'linf'")
    return value


def _tau(key: str, value: Any, values: Mapping[str, Any]) -> Any:
    if value is not None and not 0 <= _number(key, value) <= 1:
        raise _bad(key, value, "must be a Dice value in [0, 1]")
    return value


def _max_margin(key: str, value: Any, values: Mapping[str, Any]) -> Any:
    if not _number(key, value) >= values.get("delta", 0):
        raise _bad(key, value, f"must be >= delta ({values.get('delta')})")
    return value


def _margin_floor(key: str, value: Any, values: Mapping[str, Any]) -> Any:
    if not 0 <= _number(key, value) <= values.get("max_margin", math.inf):
        raise _bad(key, value, f"must be in [0, max_margin ({values.get('max_margin', math.inf)})]")
    return value


def _beta(key: str, value: Any, values: Mapping[str, Any]) -> Any:
    if not 0 <= _number(key, value) <= 1:
        raise _bad(key, value, "must be in [0, 1]")
    return value


def _eps(key: str, value: Any, values: Mapping[str, Any]) -> Any:
    if not (_number(key, value) >= 0 and math.isfinite(value)):
        raise _bad(key, value, "must be finite and >= 0")
    return value


def _eps_list(key: str, value: Any, values: Mapping[str, Any]) -> Any:
    from monai_amat.engines.evaluator import check_eps_list  # torch: not at import

    if not isinstance(value, Sequence) or isinstance(value, str):
        raise _bad(key, value, "must be a list of numbers")
    check_eps_list(value, name=f"config key {key!r}")
    return value


def _sizes(key: str, value: Any, example: str) -> None:
    if (
        isinstance(value, str)
        or not isinstance(value, Sequence)
        or not value
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)
    ):
        raise _bad(key, value, f"must be a list of integers >= 1, e.g. {example}")


def _spatial_size(key: str, value: Any, values: Mapping[str, Any]) -> Any:
    """Integers >= 1, multiples of ``spatial_multiple`` (what the network's strides need) when given."""
    _sizes(key, value, "[64, 64]")
    multiple = int(values.get("spatial_multiple", 1))
    if any(v % multiple for v in value):
        nearest = [max(multiple, v // multiple * multiple) for v in value]
        raise _bad(key, value, f"the network's strides need multiples of {multiple}, e.g. {nearest}")
    return value


def _patch_size(key: str, value: Any, values: Mapping[str, Any]) -> Any:
    """Integers >= 1, per axis a multiple of the product of ``strides`` (each a number or one per axis)."""
    _sizes(key, value, "[64, 64, 32]")
    levels = [s if isinstance(s, Sequence) else [s] * len(value) for s in values.get("strides", [])]
    multiples = [math.prod(level[d] for level in levels) for d in range(len(value))]
    if any(v % m for v, m in zip(value, multiples)):
        nearest = [max(m, v // m * m) for v, m in zip(value, multiples)]
        raise _bad(key, value, f"the network's strides need multiples of {multiples}, e.g. {nearest}")
    return value


def _attacks(key: str, value: Any, values: Mapping[str, Any]) -> Any:
    if isinstance(value, str) or not isinstance(value, Sequence) or not value or len(set(value)) != len(value):
        raise _bad(key, value, f"must be a non-empty list of distinct names from {list(EVAL_ATTACKS)}")
    unknown = [n for n in value if n not in EVAL_ATTACKS]
    if unknown:
        raise _bad(key, value, f"unknown attack(s) {unknown}; known: {list(EVAL_ATTACKS)}")
    return value


def _finite(key: str, value: Any, values: Mapping[str, Any]) -> Any:
    if not math.isfinite(_number(key, value)):
        raise _bad(key, value, "must be a finite number")
    return value


def _statistic(key: str, value: Any, values: Mapping[str, Any]) -> Any:
    from monai_amat.criteria import CALIBRATION_STATISTICS  # torch: not at import

    if value not in CALIBRATION_STATISTICS:
        raise _bad(key, value, f"must be one of {list(CALIBRATION_STATISTICS)}")
    return value


def _data_source(key: str, value: Any, values: Mapping[str, Any]) -> Any:
    if value not in ("embedded", "real"):
        raise _bad(key, value, "must be 'embedded' or 'real'")
    if value == "real" and not values.get("dataset_dir"):
        raise ValueError("config key 'dataset_dir' must name the data set folder when data_source is 'real'.")
    return value


# Rules run in this order (a rule may read the values of keys above it: max_margin reads delta).
SETTINGS: dict[str, Setting] = {
    # the run
    "epochs": Setting(_integer(1), _TRAIN),
    "seed": Setting(_integer(0), _ALL),
    "resume": Setting(_boolean, _TRAIN, runner="interrupted trainings are resumed automatically"),
    "overwrite": Setting(
        _boolean, _TRAIN, runner="a training stage that runs afresh replaces its own unfinished attempt"
    ),
    "export_model": Setting(
        _boolean, _TRAIN, runner="the comparison's models stay in their run folders, not in the bundle's models/"
    ),
    "skip_non_finite": Setting(_boolean, _TRAIN),
    "amp": Setting(_boolean, _ALL),
    "amp_dtype": Setting(_choice("float16", "bfloat16"), _ALL),
    "bundle_root": Setting(None, _ALL, runner="it is the --bundle folder"),
    "ckpt_path": Setting(
        None,
        ("calibrate", "evaluate", "inference"),
        runner="it is set per stage (calibration reads DIR/std/model.pt, evaluation each run's model.pt)",
    ),
    "thresholds_file": Setting(
        None, ("amat", "calibrate", "evaluate"), runner="it is DIR/thresholds.json, written by the calibration stage"
    ),
    # the data
    "data_source": Setting(_data_source, _ALL, checkpoint=True),
    "data_seed": Setting(_integer(0), _MODEL),
    "embedded_cases": Setting(_integer(1), _MODEL),
    "batch_size": Setting(_integer(1), _MODEL),
    "learning_rate": Setting(_positive, _TRAIN),
    "oversample_foreground": Setting(_boolean, _TRAIN),
    "strict_inputs": Setting(_boolean, ("inference",)),
    # the network (spatial_multiple and strides: what the strides need of the input sizes; set by the configs)
    "spatial_multiple": Setting(None, _ALL),
    "strides": Setting(None, _ALL, checkpoint=True),
    "spatial_size": Setting(_spatial_size, _ALL, checkpoint=True),
    "patch_size": Setting(_patch_size, _ALL, checkpoint=True),
    "filters": Setting(None, _ALL, checkpoint=True),
    "channels": Setting(None, _ALL, checkpoint=True),
    "backbone_channels": Setting(None, _ALL, checkpoint=True),
    "fpn_channels": Setting(None, _ALL, checkpoint=True),
    "anchor_sizes": Setting(None, _ALL, checkpoint=True),
    "cls_loss": Setting(None, _TRAIN, checkpoint=True),
    # AMAT's margins and criterion
    "delta": Setting(_positive, ("amat",), checkpoint=True),
    "max_margin": Setting(_max_margin, ("amat",), checkpoint=True),
    "margin_refine": Setting(_boolean, ("amat",), checkpoint=True),
    "margin_floor": Setting(_margin_floor, ("amat",), checkpoint=True),
    "beta": Setting(_beta, ("amat",), checkpoint=True),
    "default_tau": Setting(_tau, ("amat", "evaluate")),
    # the training attack
    "norm": Setting(_norm, ("amat", "sat", "evaluate"), checkpoint=True),
    "train_attack_steps": Setting(_integer(1), _ATTACKED, checkpoint=True),
    "train_alpha": Setting(_positive, _ATTACKED, checkpoint=True),
    "eps_scale": Setting(_scale, _ATTACKED, checkpoint=True),
    "sat_eps": Setting(_eps, ("sat",), checkpoint=True, runner="--sat_eps takes the list of SAT levels here"),
    "sat_start_on_sphere": Setting(_boolean, ("sat",)),
    "sat_eps_list": Setting(_eps_list, ()),
    # calibration
    "calibration_split": Setting(_choice("train", "val"), ("calibrate",)),
    "calibration_z": Setting(_finite, ("calibrate",)),
    "calibration_statistic": Setting(_statistic, ("calibrate",)),
    # evaluation
    "eps_list": Setting(_eps_list, ("evaluate",)),
    "attack_steps": Setting(_integer(1), ("evaluate",)),
    "eval_alpha": Setting(_positive, ("evaluate",)),
    "eval_eps_scale": Setting(_scale, ("evaluate",)),
    "eval_random_start": Setting(_boolean, ("evaluate",)),
    "eval_start_on_sphere": Setting(_boolean, ("evaluate",)),
    "eval_attacks": Setting(_attacks, ("evaluate",)),
    "masking_checks": Setting(_boolean, ("evaluate",)),
    "breaking_eps": Setting(_boolean, ("evaluate",)),
    "sample_name_keys": Setting(None, ("evaluate",)),
}

# the boolean keys of the bundles: :py:func:`check_config` parses them, the configs read the parsed values
BOOL_KEYS = tuple(k for k, s in SETTINGS.items() if s.rule is _boolean)


def check_config(values: Mapping[str, Any]) -> dict[str, Any]:
    """Check and parse a bundle's settings before anything runs; errors name the config key.

    The keys of :py:data:`SETTINGS` are checked by their rules, in the table's order, booleans parsed from text
    (:py:func:`as_bool`); other keys pass as they are.

    Args:
        values: ``{config key: value}``.

    Returns:
        ``{config key: parsed value}``: the configs read booleans from here.

    Raises:
        ValueError: naming the first bad key and its value.
    """
    parsed = dict(values)
    for key, setting in SETTINGS.items():
        if key in values and setting.rule is not None:
            parsed[key] = setting.rule(key, values[key], parsed)
    return parsed


def checkpoint_settings(values: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """The settings a training checkpoint of ``stage`` records: those that a resume must not change.

    Args:
        values: the parsed settings (:py:func:`check_config`).
        stage: one of :py:data:`STAGES`.

    Returns:
        ``{config key: value}`` of the recorded keys that ``values`` holds.

    Raises:
        ValueError: when ``stage`` is not a stage.
    """
    if stage not in STAGES:
        raise ValueError(f"config key 'stage' = {stage!r} is invalid: must be one of {list(STAGES)}.")
    return {k: values[k] for k, s in SETTINGS.items() if s.checkpoint and stage in s.stages and k in values}


def runner_keys() -> dict[str, str]:
    """The keys that the comparison runner sets itself, each with the reason.

    Returns:
        ``{config key: why}``.
    """
    return {k: s.runner for k, s in SETTINGS.items() if s.runner is not None}


def stage_only_keys(stage: str) -> tuple[str, ...]:
    """The keys that only ``stage`` uses (``evaluate``: a change re-evaluates instead of retraining).

    Args:
        stage: one of :py:data:`STAGES`.

    Returns:
        The keys, in the table's order.
    """
    return tuple(k for k, s in SETTINGS.items() if s.stages == (stage,))


def unused_by(stage: str) -> tuple[str, ...]:
    """The training keys that ``stage`` does not use: a change of them leaves its earlier result valid.

    Args:
        stage: a training stage (``amat``, ``sat``, ``std``).

    Returns:
        The keys used by another training stage but not by ``stage``, in the table's order.
    """
    return tuple(k for k, s in SETTINGS.items() if set(s.stages) & set(_TRAIN) - {stage} and stage not in s.stages)
