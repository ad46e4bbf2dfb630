"""The paper's comparison protocol on one bundle: STD, calibration, AMAT, SAT at several eps, robust evaluation.

``python -m monai_amat.compare --bundle bundles/NAME --output_dir DIR [--epochs N] [--attack_steps K]
[--data_source ...] [--dataset_dir ...] [--sat_eps "[...]"] [--seeds "[...]"] [--KEY VALUE ...]`` runs, with the
bundle's own configs (each stage a ``python -m monai.bundle run`` process, or in this process with ``--in_process``):

1. standard training (``train.json`` + ``train_std.json``) into ``DIR/std``;
2. calibration of the criterion from that model (``train.json`` + ``calibrate.json``) into ``DIR/thresholds.json``;
3. AMAT training (``train.json``) into ``DIR/amat``, with those thresholds;
4. SAT training (``train.json`` + ``train_sat.json``) at each eps of the bundle's ``sat_eps_list`` (or
   ``--sat_eps``) into ``DIR/sat_<eps>``;
5. robust evaluation (``evaluate.json`` merged over each model's training configs) of every model at the bundle's
   ``eps_list``: ``robustness.json`` and ``.png`` in each run folder;

then writes ``DIR/comparison.json``, ``DIR/comparison.md`` (one table per metric: rows models, columns clean and
each eps, AUC, training time; then the verdict on the paper's claims) and ``DIR/comparison.png`` (one panel per
metric, one line per model, and a clean-metric-vs-AUC panel).

Without ``--seeds`` every model is trained once, with the bundle's ``seed``. ``--seeds "[0, 1, 2]"`` repeats the
whole protocol once per seed (the bundle key ``seed`` given as an override), into ``DIR/std_s<seed>``,
``DIR/thresholds_s<seed>.json``, ``DIR/amat_s<seed>``, ``DIR/sat_<eps>_s<seed>``; the comparison then shows the
means over the seeds with their sample standard deviations.

Every other ``--KEY VALUE`` (a Python literal, else a string) is passed to every run as a config override.
``--attack_steps K`` sets both the evaluation's ``attack_steps`` and the training attack's ``train_attack_steps``
(an explicit ``--train_attack_steps`` wins for training). A stage is skipped when its output exists and its record
(``compare_*.json``) says it finished with the same settings; an interrupted training resumes from its
``checkpoint.pt``; a changed evaluation setting (e.g. ``--eps_list``) re-evaluates; a changed training setting is
refused (use another ``--output_dir``, or delete that run folder).
"""

from __future__ import annotations

import argparse
import ast
import ctypes
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from monai_amat.utils import atomic_write, read_json, root_cause, write_json

__all__ = [
    "CompareError",
    "StageError",
    "ModelRun",
    "Comparison",
    "bundle_defaults",
    "parse_sat_eps",
    "parse_seeds",
    "load_model_result",
    "combine_seeds",
    "claims_verdict",
    "comparison_markdown",
    "write_comparison",
    "build_parser",
    "main",
]

CONFIGS = ("train", "train_std", "train_sat", "calibrate", "evaluate")
# keys the runner sets itself, per stage
RESERVED = {
    "ckpt_path": "it is set per stage (calibration reads DIR/std/model.pt, evaluation each run's model.pt)",
    "thresholds_file": "it is DIR/thresholds.json, written by the calibration stage",
    "resume": "interrupted trainings are resumed automatically",
    "overwrite": "a training stage that runs afresh replaces its own unfinished attempt",
    "bundle_root": "it is the --bundle folder",
    "config_file": "the stages use the bundle's own configs",
    "args_file": "the runner writes one per stage",
    "sat_eps": "--sat_eps takes the list of SAT levels here",
}
# keys that only change the evaluation: changing them re-evaluates instead of refusing to retrain
EVAL_ONLY_KEYS = (
    "eps_list",
    "attack_steps",
    "eval_alpha",
    "eval_random_start",
    "eval_attacks",
    "masking_checks",
    "breaking_eps",
)
# training keys that a model's trainer (and its calibration, for STD) does not use: a change of them leaves its
# earlier result valid
UNUSED_BY = {
    "train_std": (
        "delta",
        "max_margin",
        "beta",
        "default_tau",
        "train_attack_steps",
        "train_alpha",
        "sat_start_on_sphere",
    ),
    "train_sat": ("delta", "max_margin", "beta", "default_tau"),
}
# evaluation keys whose bundle defaults go into the evaluation records: a changed default re-evaluates
EVAL_DEFAULT_KEYS = ("eval_attacks", "masking_checks", "breaking_eps")
LOWER_IS_BETTER = ("mre", "error", "loss", "distance", "hausdorff")


class CompareError(ValueError):
    """A bad argument or a conflict with an earlier comparison in the same output folder.

    Args:
        message: what is wrong.
        argument: the command-line argument at fault (e.g. ``"--sat_eps"``), if any.
    """

    def __init__(self, message: str, argument: str | None = None) -> None:
        super().__init__(f"argument {argument}: {message}" if argument else message)
        self.argument = argument


class StageError(RuntimeError):
    """A stage (a training, the calibration or an evaluation run) failed."""


def _say(message: str) -> None:
    print(f"[compare] {message}", flush=True)


def _eps_label(eps: float) -> str:
    return f"{float(eps):g}"


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), so recorded settings compare equal."""
    return json.loads(json.dumps(value))


def _literal(text: str) -> Any:
    """A command-line value: a Python literal when it parses as one, else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def parse_sat_eps(text: str | float | Sequence[float]) -> list[float]:
    """The SAT noise levels of ``--sat_eps``: a number or a list of numbers, each finite and >= 0, no repeats.

    Args:
        text: e.g. ``"[1, 5, 10]"``, ``"5"``, or already a number or list.

    Returns:
        The levels, ascending.

    Raises:
        argparse.ArgumentTypeError: when the value is not such a list.
    """
    value = _literal(text) if isinstance(text, str) else text
    values = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    example = 'expected a number or a list of numbers >= 0, e.g. "[1, 5, 10]"'
    if not isinstance(values, (list, tuple)) or not values:
        raise argparse.ArgumentTypeError(f"{example}; got {text!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise argparse.ArgumentTypeError(f"{example}; got {text!r} (bad value {v!r})")
    labels = [_eps_label(v) for v in values]
    if len(set(labels)) != len(labels):
        raise argparse.ArgumentTypeError(f"repeated level in {text!r}")
    return sorted(float(v) for v in values)


def parse_seeds(text: str | Sequence[int]) -> list[int]:
    """The seeds of ``--seeds``: a list of distinct integers >= 0.

    Args:
        text: e.g. ``"[0, 1, 2]"``, or already a list.

    Returns:
        The seeds, in the given order.

    Raises:
        argparse.ArgumentTypeError: when the value is not such a list.
    """
    value = _literal(text) if isinstance(text, str) else text
    example = 'expected a list of distinct integers >= 0, e.g. "[0, 1, 2]"'
    if not isinstance(value, (list, tuple)) or not value:
        raise argparse.ArgumentTypeError(f"{example}; got {text!r}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise argparse.ArgumentTypeError(f"{example}; got {text!r} (bad value {v!r})")
    if len(set(value)) != len(value):
        raise argparse.ArgumentTypeError(f"{example}; got {text!r} (repeated seed)")
    return list(value)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _bundle_dir(path: str | os.PathLike) -> Path:
    """The bundle folder of ``--bundle``: a path, or a bundle name under ``./bundles`` or the repository's bundles."""
    p = Path(path)
    candidates = [p]
    if len(p.parts) == 1:
        candidates += [Path("bundles") / p, Path(__file__).resolve().parents[1] / "bundles" / p]
    for c in candidates:
        if (c / "configs").is_dir():
            missing = [f"configs/{n}.json" for n in CONFIGS if not (c / "configs" / f"{n}.json").is_file()]
            if missing:
                raise CompareError(f"{c} is not a complete AMAT bundle: it lacks {', '.join(missing)}.", "--bundle")
            return c.resolve()
    raise CompareError(f"{path}: no such bundle folder (expected a folder holding configs/train.json).", "--bundle")


def bundle_defaults(bundle_dir: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The bundle's comparison settings, resolved from ``train.json`` + ``evaluate.json`` with ``overrides`` applied.

    Args:
        bundle_dir: the bundle folder.
        overrides: config overrides, as given to every run.

    Returns:
        ``{"eps_list", "sat_eps_list", "epochs", "attack_steps", "train_attack_steps", "data_source",
        "dataset_dir", "seed", "eval_attacks", "masking_checks", "breaking_eps"}``; a key the bundle lacks maps to
        None.
    """
    from monai.bundle import ConfigParser

    bundle_dir = Path(bundle_dir)
    parser = ConfigParser()
    parser.read_config([str(bundle_dir / "configs" / f"{n}.json") for n in ("train", "evaluate")])
    parser.update({"bundle_root": str(bundle_dir), **dict(overrides or {})})
    keys = (
        "eps_list",
        "sat_eps_list",
        "epochs",
        "attack_steps",
        "train_attack_steps",
        "data_source",
        "dataset_dir",
        "seed",
        *EVAL_DEFAULT_KEYS,
    )
    return {k: parser.get_parsed_content(k) if k in parser else None for k in keys}


def _known_keys(bundle_dir: Path) -> Any:
    """A parser of all the bundle's configs merged, to tell config keys from typos."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(bundle_dir / "configs" / f"{n}.json") for n in CONFIGS])
    return parser


def _run_arguments() -> set[str]:
    """Arguments of ``monai.bundle run`` (and of its MLflow tracking) that are not config keys."""
    import inspect

    from monai.bundle import run

    names = set(inspect.signature(run).parameters) - {"override"}
    try:
        from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS

        names |= set(DEFAULT_EXP_MGMT_SETTINGS["mlflow"]["configs"])
    except (ImportError, KeyError):
        pass
    return names


@dataclass
class ModelRun:
    """One model of the comparison, trained with one seed, and its run folder.

    Args:
        name: ``"STD"``, ``"AMAT"`` or ``"SAT-<eps>"``.
        run_dir: the run's ``output_dir``.
        configs: the bundle configs of its training, e.g. ``("train", "train_sat")``.
        overrides: overrides of this model only (``{"sat_eps": 5.0}`` for SAT; ``{"seed": s}`` with ``--seeds``).
        seed: the seed of this run (the bundle's own ``seed`` without ``--seeds``).
    """

    name: str
    run_dir: Path
    configs: tuple[str, ...]
    overrides: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None


@dataclass
class _Stage:
    label: str
    kind: str  # "train", "calibrate" or "evaluate"
    folder: Path  # where its record, args file and log go
    configs: tuple[str, ...]
    args: dict[str, Any]
    settings: dict[str, Any]
    output: Path
    model: ModelRun  # the model it trains or evaluates; the STD model a calibration reads
    tag: str = ""  # added to its record, args file and log names (per-seed calibrations share one folder)
    unused: tuple[str, ...] = ()  # keys left out of its settings (and of an earlier record's, when comparing)

    def same_settings(self, record: Mapping[str, Any] | None) -> bool:
        """Whether an earlier record was written with this stage's settings (keys the stage does not use aside)."""
        old = (record or {}).get("settings")
        return isinstance(old, dict) and _used(old, self.unused) == self.settings

    @property
    def record(self) -> Path:
        return self.folder / f"compare_{self.kind}{self.tag}.json"


def _unused(model: ModelRun) -> tuple[str, ...]:
    """The training keys the model's configs do not use (see :py:data:`UNUSED_BY`)."""
    return tuple(k for c in model.configs for k in UNUSED_BY.get(c, ()))


def _used(settings: Mapping[str, Any], unused: Sequence[str]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in unused}


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Comparison:
    """Plans and runs the comparison protocol of one bundle into one output folder.

    Args:
        bundle: the bundle folder (or a bundle name under ``bundles/``).
        output_dir: the comparison folder ``DIR``.
        overrides: config overrides given to every run (``--KEY VALUE``, plus ``epochs``, ``attack_steps``,
            ``train_attack_steps``, ``data_source``, ``dataset_dir`` from their options).
        sat_eps: the SAT levels; None takes the bundle's ``sat_eps_list``.
        in_process: run the stages with ``monai.bundle.run`` in this process instead of one
            ``python -m monai.bundle run`` process each (faster to start, no isolation).
        seeds: run the whole protocol once per seed (the bundle key ``seed`` as an override), into run folders
            suffixed ``_s<seed>``; None runs it once with the bundle's ``seed``, into unsuffixed folders.

    Raises:
        CompareError: for an unknown bundle, a key that is neither a config key of the bundle nor a
            ``monai.bundle run`` argument, a key the runner sets itself, a bad resolved setting (e.g. an
            ``eps_list`` that is not ascending), bad ``seeds`` or ``seeds`` together with a ``seed`` override, or a
            training already run in ``output_dir`` with other settings.
    """

    def __init__(
        self,
        bundle: str | os.PathLike,
        output_dir: str | os.PathLike,
        overrides: Mapping[str, Any] | None = None,
        sat_eps: Sequence[float] | None = None,
        in_process: bool = False,
        seeds: Sequence[int] | None = None,
    ) -> None:
        self.bundle_dir = _bundle_dir(bundle)
        self.bundle = self.bundle_dir.name
        self.output_dir = Path(output_dir).resolve()
        self.overrides = _jsonable(dict(overrides or {}))
        self.in_process = in_process
        self._check_keys()
        self.per_seed = seeds is not None
        if seeds is not None:
            if "seed" in self.overrides:
                raise CompareError("give the seeds with --seeds only, not also with --seed.", "--seeds")
            try:
                seeds = parse_seeds(list(seeds))
            except argparse.ArgumentTypeError as e:
                raise CompareError(str(e), "--seeds") from e
        try:
            defaults = bundle_defaults(self.bundle_dir, self.overrides)
        except Exception as e:  # the config parser wraps anything an expression raises
            raise CompareError(f"cannot read the settings of bundle {self.bundle} with these overrides: {e}") from e
        self.seeds = list(seeds) if seeds is not None else [defaults["seed"]]
        if sat_eps is None:
            if defaults["sat_eps_list"] is None:
                raise CompareError(f"bundle {self.bundle} has no sat_eps_list: give the SAT levels.", "--sat_eps")
            sat_eps = parse_sat_eps(list(defaults["sat_eps_list"]))
        self.sat_eps = parse_sat_eps(list(sat_eps))
        self.eps = list(defaults["eps_list"] or [])
        if not self.eps:
            raise CompareError(f"bundle {self.bundle} has no eps_list in evaluate.json.")
        self.settings = {k: defaults[k] for k in ("epochs", "attack_steps", "train_attack_steps", "data_source")}
        self.eval_settings = {k: defaults[k] for k in EVAL_DEFAULT_KEYS if defaults[k] is not None}
        from monai_amat.bundle import check_config

        try:
            check_config(
                {
                    **self.overrides,  # every stage's settings, before the first stage runs
                    "eps_list": self.eps,
                    "sat_eps_list": self.sat_eps,
                    **{k: v for k, v in self.settings.items() if v is not None},
                    "dataset_dir": defaults["dataset_dir"],
                }
            )
        except ValueError as e:
            raise CompareError(str(e)) from e
        self.models = [m for seed in self.seeds for m in self._models(seed)]
        self.stages = self._plan()
        self._check_conflicts()

    def _suffix(self, seed: int | None) -> str:
        """``_s<seed>`` with ``--seeds``, else nothing (the folder names of a single run)."""
        return f"_s{seed}" if self.per_seed else ""

    def _seed_overrides(self, seed: int | None) -> dict[str, Any]:
        return {"seed": seed} if self.per_seed else {}

    def _models(self, seed: int | None) -> list[ModelRun]:
        """The models trained with one seed: STD, AMAT, then SAT at each level."""
        suffix, extra = self._suffix(seed), self._seed_overrides(seed)
        return [
            ModelRun("STD", self.output_dir / f"std{suffix}", ("train", "train_std"), dict(extra), seed),
            ModelRun("AMAT", self.output_dir / f"amat{suffix}", ("train",), dict(extra), seed),
        ] + [
            ModelRun(
                f"SAT-{_eps_label(e)}",
                self.output_dir / f"sat_{_eps_label(e)}{suffix}",
                ("train", "train_sat"),
                {**extra, "sat_eps": e},
                seed,
            )
            for e in self.sat_eps
        ]

    def _check_keys(self) -> None:
        parser = _known_keys(self.bundle_dir)
        run_args = _run_arguments()
        for key in self.overrides:
            if key in RESERVED:
                raise CompareError(f"the comparison runner sets it itself: {RESERVED[key]}.", f"--{key}")
            if key == "output_dir":
                raise CompareError("given twice.", "--output_dir")
            if key not in parser and key not in run_args:
                raise CompareError(
                    f"not a config key of bundle {self.bundle} (nor a `monai.bundle run` argument).", f"--{key}"
                )

    def _plan(self) -> list[_Stage]:
        """The stages, seed after seed: STD training, calibration, the other trainings, every evaluation."""
        train_settings = {k: v for k, v in self.overrides.items() if k not in EVAL_ONLY_KEYS}
        stages: list[_Stage] = []
        for seed in self.seeds:
            suffix, extra = self._suffix(seed), self._seed_overrides(seed)
            of_seed = f" (seed {seed})" if self.per_seed else ""
            thresholds = self.output_dir / f"thresholds{suffix}.json"
            common = {"bundle_root": str(self.bundle_dir), "thresholds_file": str(thresholds)}
            models = [m for m in self.models if m.seed == seed]
            trainings = [
                _Stage(
                    f"{m.name} training{of_seed}",
                    "train",
                    m.run_dir,
                    m.configs,
                    {**common, **self.overrides, **m.overrides, "output_dir": str(m.run_dir)},
                    _jsonable(_used({**train_settings, **m.overrides}, _unused(m))),
                    m.run_dir / "model.pt",
                    m,
                    unused=_unused(m),
                )
                for m in models
            ]
            std = models[0]
            calibration = _Stage(
                f"calibration (criterion from the STD model){of_seed}",
                "calibrate",
                self.output_dir,
                ("train", "calibrate"),
                {
                    **common,
                    **self.overrides,
                    **extra,
                    "output_dir": str(std.run_dir),
                    "ckpt_path": str(std.run_dir / "model.pt"),
                },
                _jsonable(_used({**train_settings, **extra}, _unused(std))),
                thresholds,
                std,
                suffix,
                unused=_unused(std),
            )
            evaluations = [
                _Stage(
                    f"{m.name} evaluation{of_seed}",
                    "evaluate",
                    m.run_dir,
                    (*m.configs, "evaluate"),
                    {
                        **common,
                        **self.overrides,
                        **m.overrides,
                        "output_dir": str(m.run_dir),
                        "ckpt_path": str(m.run_dir / "model.pt"),
                    },
                    _jsonable({**self.eval_settings, **self.overrides, **m.overrides}),
                    m.run_dir / "robustness.json",
                    m,
                )
                for m in models
            ]
            stages += [trainings[0], calibration, *trainings[1:], *evaluations]
        return stages

    def _check_conflicts(self) -> None:
        """Refuse, before anything runs, a training that was (partly) run in the same folder with other settings."""
        for stage in self.stages:
            if stage.kind != "train":
                continue
            record = _read_record(stage.record)
            if record is None or stage.same_settings(record):
                continue
            if not record.get("finished") and not (stage.folder / "checkpoint.pt").is_file():
                continue  # it failed before its first epoch ended: nothing to keep, it starts afresh
            old = _used(record.get("settings", {}), stage.unused)
            new = stage.settings
            diff = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
            changes = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in diff.items())
            raise CompareError(
                f"{stage.folder} was trained with other settings ({changes}); "
                "use another --output_dir, or delete that folder to train it again."
            )

    def _status(self, stage: _Stage) -> str:
        """``"done"``, ``"resume"`` or ``"run"``."""
        record = _read_record(stage.record)
        finished = bool(record and record.get("finished") and stage.same_settings(record))
        if stage.kind == "train":
            if finished and stage.output.is_file():
                return "done"
            if record and not record.get("finished") and (stage.folder / "checkpoint.pt").is_file():
                return "resume"
            return "run"
        source = stage.model.run_dir / "model.pt"  # a retrained model invalidates what was derived from it
        if finished and stage.output.is_file() and stage.output.stat().st_mtime >= source.stat().st_mtime:
            return "done"
        return "run"

    def run(self) -> dict[str, Any]:
        """Run the stages that have not finished, then write ``comparison.json``, ``.md`` and ``.png``.

        Returns:
            The content of ``comparison.json``.

        Raises:
            StageError: when a stage fails (its output is in the stage's ``compare_<stage>.log`` unless
                ``in_process``); run the command again to go on from there.
        """
        self.output_dir.mkdir(parents=True, exist_ok=True)
        _say(f"bundle {self.bundle} -> {self.output_dir}")
        names = dict.fromkeys(m.name for m in self.models)
        _say(
            f"models: {', '.join(names)}; seeds {self.seeds}; eval eps {[_eps_label(e) for e in self.eps]}; "
            f"settings {self.settings}; overrides {self.overrides or 'none'}"
        )
        n = len(self.stages)
        for i, stage in enumerate(self.stages, 1):
            status = self._status(stage)
            where = stage.output.relative_to(self.output_dir)
            if status == "done":
                _say(f"stage {i}/{n}: {stage.label} -> {where}: finished earlier, skipped")
                continue
            note = " (resuming from checkpoint.pt)" if status == "resume" else ""
            _say(f"stage {i}/{n}: {stage.label} -> {where}{note}")
            seconds = self._execute(stage, resume=status == "resume")
            _say(f"stage {i}/{n}: {stage.label} done in {seconds:.1f} s")
        results: dict[str, list[dict[str, Any]]] = {}
        for m in self.models:
            r = load_model_result(m.run_dir, m.name)
            if [float(e) for e in r["eps"]] != [float(e) for e in self.eps]:
                raise StageError(f"{r['run_dir']}/robustness.json has eps {r['eps']}, expected {self.eps}.")
            results.setdefault(m.name, []).append(r)
        comparison = write_comparison(
            self.output_dir,
            self.bundle,
            self.eps,
            [combine_seeds(runs, self.seeds) for runs in results.values()],
            settings={**self.settings, "sat_eps": self.sat_eps, "overrides": self.overrides},
        )
        _say(f"wrote {self.output_dir / 'comparison.json'}, comparison.md, comparison.png")
        return comparison

    def _execute(self, stage: _Stage, resume: bool) -> float:
        record = _read_record(stage.record) or {}
        before = 0.0
        if resume:
            ckpt = stage.folder / "checkpoint.pt"
            partial = max(0.0, ckpt.stat().st_mtime - record.get("started", 0))  # up to its last epoch end
            before = float(record.get("seconds_before", 0.0)) + partial
        args = {"config_file": [str(self.bundle_dir / "configs" / f"{c}.json") for c in stage.configs], **stage.args}
        if stage.kind == "train":  # a stage that runs afresh replaces its own unfinished attempt
            args["resume"], args["overwrite"] = resume, not resume
        stage.folder.mkdir(parents=True, exist_ok=True)
        args_file = stage.folder / f"compare_{stage.kind}{stage.tag}_args.json"
        write_json(args_file, args)
        started = time.time()
        write_json(
            stage.record,
            {
                "stage": stage.label,
                "finished": False,
                "settings": stage.settings,
                "started": started,
                "seconds_before": before,
                "resumed": resume or bool(record.get("resumed")),
            },
        )
        t0 = time.perf_counter()
        if self.in_process:
            from monai.bundle import run

            try:
                run(args_file=str(args_file))
            except Exception as e:
                raise StageError(
                    f"{stage.label} failed: {root_cause(e)}. Run the same command again to go on from there."
                ) from e
        else:
            log = stage.folder / f"compare_{stage.kind}{stage.tag}.log"
            cmd = [sys.executable, "-m", "monai.bundle", "run", "--args_file", str(args_file)]
            rc = _stream(cmd, log)
            if rc != 0:
                raise StageError(
                    f"{stage.label} failed (exit code {rc}; its output is in {log}). Command: {' '.join(cmd)}. "
                    "Run the same comparison command again to go on from there."
                )
        seconds = time.perf_counter() - t0
        if not stage.output.is_file():
            raise StageError(f"{stage.label} finished without writing {stage.output}.")
        done = {**_read_record(stage.record), "finished": True, "seconds": seconds}
        if stage.kind == "train":
            done["train_seconds"] = before + seconds
        write_json(stage.record, done)
        return seconds


def _die_with_parent() -> None:
    """In the child, before it runs: SIGTERM when the runner dies, even by SIGKILL (Linux ``PR_SET_PDEATHSIG``)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def _stream(cmd: Sequence[str], log: Path, out: TextIO | None = None) -> int:
    """Run ``cmd``, showing its output (progress bars included) as it comes and appending a copy to ``log``."""
    out = out or sys.stdout
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    kwargs = {"preexec_fn": _die_with_parent} if sys.platform.startswith("linux") else {}
    with open(log, "ab") as f:
        # an earlier attempt's output stays above this line
        f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd)}\n".encode())
        f.flush()
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, **kwargs) as p:
            assert p.stdout is not None
            while chunk := p.stdout.read1(65536):
                f.write(chunk)
                buffer = getattr(out, "buffer", None)
                if buffer is not None:
                    buffer.write(chunk)
                    buffer.flush()
                else:
                    out.write(chunk.decode(errors="replace"))
                    out.flush()
            return p.wait()


def load_model_result(run_dir: str | os.PathLike, name: str) -> dict[str, Any]:
    """One model's result, from one run folder.

    Args:
        run_dir: the run folder holding ``robustness.json`` and, from the runner, ``compare_train.json``.
        name: the model's name (``"STD"``, ``"AMAT"``, ``"SAT-<eps>"``).

    Returns:
        ``{"name", "run_dir", "task", "attack", "eps", "metrics", "auc", "train_seconds"}``, plus ``"eps_scale"``
        when ``robustness.json`` has it, and from a worst-case evaluation ``"per_attack_auc"`` (``{attack:
        {metric: AUC}}``), ``"checks_fired"`` (the gradient-masking checks that fired) and ``"breaking_eps"`` (its
        summary); ``train_seconds`` is None without a finished training record.

    Raises:
        FileNotFoundError: when ``robustness.json`` is missing.
        ValueError: when it lacks ``eps`` or ``metrics``.
    """
    from monai_amat.handlers.robustness_report import area_under_curve

    run_dir = Path(run_dir)
    report = read_json(run_dir / "robustness.json", required=("eps", "metrics"))
    record = _read_record(run_dir / "compare_train.json") or {}
    auc = dict(report.get("auc") or {})
    for metric, values in report["metrics"].items():
        auc.setdefault(metric, area_under_curve(report["eps"], values))
    result = {
        "name": name,
        "run_dir": str(run_dir),
        "task": report.get("task"),
        "attack": report.get("attack"),
        "eps": report["eps"],
        "metrics": report["metrics"],
        "auc": auc,
        "train_seconds": record.get("train_seconds") if record.get("finished") else None,
    }
    if report.get("eps_scale") is not None:
        result["eps_scale"] = report["eps_scale"]
    if report.get("per_attack"):
        result["per_attack_auc"] = {
            attack: {metric: area_under_curve(report["eps"], values) for metric, values in curves.items()}
            for attack, curves in report["per_attack"].items()
        }
    if report.get("checks") is not None:
        result["checks_fired"] = [c["check"] for c in report["checks"] if c.get("fired")]
    if report.get("breaking_eps") is not None:
        result["breaking_eps"] = report["breaking_eps"]
    return result


def _mean_sd(values: Sequence[Any]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1; 0.0 for one value); ``(None, None)`` when a value is missing."""
    if any(v is None for v in values):
        return None, None
    numbers = [float(v) for v in values]
    mean = sum(numbers) / len(numbers)
    if len(numbers) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in numbers) / (len(numbers) - 1))


def _common_eps_scale(entries: Sequence[Mapping[str, Any]], what: str) -> Any:
    """The first ``eps_scale`` among ``entries`` (None when none has one); they must agree."""
    scales = [e["eps_scale"] for e in entries if e.get("eps_scale") is not None]
    if any(not math.isclose(float(s), float(scales[0])) for s in scales):
        raise ValueError(f"{what} have different eps_scale values: {scales}.")
    return scales[0] if scales else None


def combine_seeds(results: Sequence[Mapping[str, Any]], seeds: Sequence[int | None]) -> dict[str, Any]:
    """One model's entry of ``comparison.json`` from its runs with each seed: means and sample sds over the seeds.

    Args:
        results: the model's results as :py:func:`load_model_result` returns them, one per seed.
        seeds: the seed of each result.

    Returns:
        ``{"name", "task", "attack", "eps", "metrics", "auc", "train_seconds"}`` holding the means over the seeds
        (None where a run lacks the value), plus ``"metrics_sd"``, ``"auc_sd"``, ``"train_seconds_sd"`` (sample
        standard deviations, ddof 1; 0.0 for one seed), ``"seeds"`` and ``"per_seed"`` (``[{"seed", "run_dir",
        "metrics", "auc", "train_seconds"}]``); ``"run_dir"`` too for one seed, ``"eps_scale"`` when the runs have
        one; from worst-case evaluations ``"per_attack_auc"`` / ``"per_attack_auc_sd"``, ``"checks_fired"``
        (``{check: number of seeds where it fired}``) and ``"breaking_eps"`` (mean and sd of the medians, unbroken
        samples per seed; a median of None, every sample unbroken, makes the mean None).

    Raises:
        ValueError: when there is not one result per seed, or the results differ in name, eps, metrics or
            ``eps_scale``.
    """
    if not results or len(results) != len(seeds):
        raise ValueError(f"expected one result per seed, got {len(results)} for seeds {list(seeds)}.")
    first = results[0]

    def shape(result: Mapping[str, Any]) -> tuple[Any, ...]:
        lengths = {metric: len(values) for metric, values in result["metrics"].items()}
        return result["name"], [float(e) for e in result["eps"]], lengths

    if any(shape(r) != shape(first) for r in results[1:]):
        raise ValueError(f"{first['name']}: the runs of seeds {list(seeds)} differ in model, eps or metrics.")
    metrics = {
        metric: [_mean_sd(column) for column in zip(*(r["metrics"][metric] for r in results))]
        for metric in first["metrics"]
    }
    auc = {metric: _mean_sd([r["auc"].get(metric) for r in results]) for metric in first["auc"]}
    seconds, seconds_sd = _mean_sd([r.get("train_seconds") for r in results])
    entry: dict[str, Any] = {"name": first["name"]}
    if len(results) == 1 and "run_dir" in first:
        entry["run_dir"] = first["run_dir"]
    entry.update(
        {
            "task": first.get("task"),
            "attack": first.get("attack"),
            "eps": list(first["eps"]),
            "metrics": {metric: [mean for mean, _ in pairs] for metric, pairs in metrics.items()},
            "auc": {metric: mean for metric, (mean, _) in auc.items()},
            "train_seconds": seconds,
            "metrics_sd": {metric: [sd for _, sd in pairs] for metric, pairs in metrics.items()},
            "auc_sd": {metric: sd for metric, (_, sd) in auc.items()},
            "train_seconds_sd": seconds_sd,
            "seeds": list(seeds),
            "per_seed": [
                {
                    "seed": seed,
                    "run_dir": r.get("run_dir"),
                    "metrics": r["metrics"],
                    "auc": r["auc"],
                    "train_seconds": r.get("train_seconds"),
                }
                for seed, r in zip(seeds, results)
            ],
        }
    )
    eps_scale = _common_eps_scale(results, f"the runs of {first['name']}")
    if eps_scale is not None:
        entry["eps_scale"] = eps_scale
    if all("per_attack_auc" in r for r in results):
        attacks = first["per_attack_auc"]
        pairs = {
            a: {m: _mean_sd([r["per_attack_auc"].get(a, {}).get(m) for r in results]) for m in attacks[a]}
            for a in attacks
        }
        entry["per_attack_auc"] = {a: {m: mean for m, (mean, _) in p.items()} for a, p in pairs.items()}
        entry["per_attack_auc_sd"] = {a: {m: sd for m, (_, sd) in p.items()} for a, p in pairs.items()}
    if all("checks_fired" in r for r in results):
        names = dict.fromkeys(c for r in results for c in r["checks_fired"])
        entry["checks_fired"] = {c: sum(c in r["checks_fired"] for r in results) for c in names}
    if all("breaking_eps" in r for r in results):
        median, median_sd = _mean_sd([r["breaking_eps"].get("median") for r in results])
        entry["breaking_eps"] = {
            "median": median,
            "median_sd": median_sd,
            "unbroken": [r["breaking_eps"].get("unbroken") for r in results],
            "samples": first["breaking_eps"].get("samples"),
            "max_eps": first["breaking_eps"].get("max_eps"),
        }
    return entry


def _lower_is_better(metric: str) -> bool:
    return any(word in metric.lower() for word in LOWER_IS_BETTER)


def _number(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _fmt(value: Any, digits: int = 3) -> str:
    v = _number(value)
    return "n/a" if v is None else f"{v:.{digits}f}"


def _cell(mean: Any, sd: Any, digits: int, spread: bool) -> str:
    """A table value: the mean, followed by ``± sd`` when the comparison has several seeds."""
    text = _fmt(mean, digits)
    return f"{text} ± {_fmt(sd, digits)}" if spread and _number(mean) is not None else text


def _digits(values: Sequence[Any]) -> int:
    """Decimals for one column family: 3, or 1 when a value reaches 100 (errors in mm, large areas)."""
    finite = [abs(v) for v in map(_number, values) if v is not None]
    return 1 if finite and max(finite) >= 100 else 3


def _show(value: Any) -> str:
    """A setting as text; numbers in lists without trailing ``.0``."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, float):
        return _eps_label(value)
    return str(value)


def _time_unit(seconds: Sequence[float | None]) -> tuple[str, float]:
    longest = max((s for s in seconds if s is not None), default=0.0)
    if longest >= 7200:
        return "h", 3600.0
    if longest >= 120:
        return "min", 60.0
    return "s", 1.0


def _main_metric(models: Sequence[Mapping[str, Any]]) -> str | None:
    """The bundle's main metric: the first metric of the first model (the first of its ``robustness.json``)."""
    return next((metric for m in models for metric in m["metrics"]), None)


@dataclass
class _Scores:
    """One model on one metric: clean value and AUC (means over seeds, with their sds) and its training time."""

    name: str
    clean: float
    clean_sd: float
    auc: float
    auc_sd: float
    seconds: float | None


def _scores(model: Mapping[str, Any], metric: str) -> _Scores | None:
    """``model``'s scores on ``metric``; None when its clean value or AUC is missing or not finite."""
    clean = _number((model["metrics"].get(metric) or [None])[0])
    auc = _number(model["auc"].get(metric))
    if clean is None or auc is None:
        return None
    clean_sd = _number(((model.get("metrics_sd") or {}).get(metric) or [0.0])[0]) or 0.0
    auc_sd = _number((model.get("auc_sd") or {}).get(metric, 0.0)) or 0.0
    return _Scores(model["name"], clean, clean_sd, auc, auc_sd, _number(model.get("train_seconds")))


def _gain(value: float, reference: float, lower_is_better: bool) -> float:
    """How much better ``value`` is than ``reference`` in the metric's direction (negative: worse)."""
    return reference - value if lower_is_better else value - reference


def _amat_versus_sat(
    amat: _Scores, sat: _Scores, quantity: str, matched_on: str, lower_is_better: bool
) -> dict[str, Any]:
    """AMAT against one SAT model on ``quantity`` (``"clean"`` or ``"auc"``): difference, combined sd, outcome."""
    amat_value, amat_sd = getattr(amat, quantity), getattr(amat, f"{quantity}_sd")
    sat_value, sat_sd = getattr(sat, quantity), getattr(sat, f"{quantity}_sd")
    combined_sd = math.hypot(amat_sd, sat_sd)
    gain = _gain(amat_value, sat_value, lower_is_better)
    outcome = "better" if gain > combined_sd else "worse" if -gain > combined_sd else "within sd"
    return {
        "quantity": quantity,
        "sat": sat.name,
        "matched_on": matched_on,
        "amat": amat_value,
        "amat_sd": amat_sd,
        "sat_value": sat_value,
        "sat_sd": sat_sd,
        "difference": amat_value - sat_value,
        "combined_sd": combined_sd,
        "outcome": outcome,
    }


def claims_verdict(models: Sequence[Mapping[str, Any]], metric: str | None = None) -> dict[str, Any] | None:
    """The paper's claims checked on one metric: AMAT against the SAT models, on the means with their sds.

    The combined sd of two models is ``sqrt(sd_1 ** 2 + sd_2 ** 2)``; lower is better for metrics named like errors
    (``mre``, ``error``, ``loss``, ``distance``, ``hausdorff``), for their AUC too.

    - ``"a"``: no SAT beats AMAT on both the clean metric and the AUC by more than their combined sd
      (``{"claim", "holds", "sats_beating_amat"}``);
    - ``"b"``: AMAT's AUC against the SAT whose clean metric is nearest AMAT's;
    - ``"c"``: AMAT's clean metric against the SAT whose AUC is nearest AMAT's (both ``{"quantity", "sat",
      "matched_on", "amat", "amat_sd", "sat_value", "sat_sd", "difference" (AMAT - SAT), "combined_sd",
      "outcome"}``, the outcome ``"better"``, ``"worse"`` or ``"within sd"`` for AMAT);
    - ``"d"``: training time, ``{"amat_seconds", "sat_seconds_mean", "ratio" (AMAT / mean SAT), "per_sat": {name:
      AMAT / SAT}}`` (None where a time is missing).

    Args:
        models: entries of ``comparison.json`` (``name``, ``metrics``, ``auc``, ``train_seconds``; ``metrics_sd``
            and ``auc_sd`` when there are several seeds, else the sds are 0), with ``"AMAT"`` and ``"SAT-<eps>"``.
        metric: the metric; default the main metric (the first of the first model's ``metrics``).

    Returns:
        ``{"metric", "lower_is_better", "a", "b", "c", "d"}``, or None without an AMAT model, without a SAT model, or
        when one of their clean values or AUCs is missing or not finite.
    """
    metric = metric or _main_metric(models)
    if metric is None:
        return None
    amat = next((_scores(m, metric) for m in models if m["name"] == "AMAT"), None)
    sats = [_scores(m, metric) for m in models if m["name"].startswith("SAT")]
    if amat is None or not sats or None in sats:
        return None
    lower = _lower_is_better(metric)
    beating = [
        s.name
        for s in sats
        if _gain(s.clean, amat.clean, lower) > math.hypot(s.clean_sd, amat.clean_sd)
        and _gain(s.auc, amat.auc, lower) > math.hypot(s.auc_sd, amat.auc_sd)
    ]
    nearest_clean = min(sats, key=lambda s: abs(s.clean - amat.clean))
    nearest_auc = min(sats, key=lambda s: abs(s.auc - amat.auc))
    timed = [s for s in sats if s.seconds]
    sat_seconds = sum(s.seconds for s in timed) / len(timed) if timed else None
    return {
        "metric": metric,
        "lower_is_better": lower,
        "a": {
            "claim": "no SAT beats AMAT on both the clean metric and the AUC by more than their combined sd",
            "holds": not beating,
            "sats_beating_amat": beating,
        },
        "b": _amat_versus_sat(amat, nearest_clean, "auc", "clean", lower),
        "c": _amat_versus_sat(amat, nearest_auc, "clean", "auc", lower),
        "d": {
            "amat_seconds": amat.seconds,
            "sat_seconds_mean": sat_seconds,
            "ratio": amat.seconds / sat_seconds if amat.seconds and sat_seconds else None,
            "per_sat": {s.name: amat.seconds / s.seconds for s in timed} if amat.seconds else {},
        },
    }


def _verdict_lines(
    verdict: Mapping[str, Any] | None, seeds: Sequence[Any], clean_digits: int, auc_digits: int
) -> list[str]:
    """The "Claims verdict" section of ``comparison.md`` for :py:func:`claims_verdict`'s result."""
    lines = ["## Claims verdict", ""]
    if verdict is None:
        return [*lines, "Not available: it needs AMAT, a SAT model and finite clean values and AUCs.", ""]
    metric, spread = verdict["metric"], len(seeds) > 1
    over = f"means over seeds {', '.join(map(str, seeds))} with their sample sds" if spread else "one seed"
    direction = "lower" if verdict["lower_is_better"] else "higher"
    lines += [
        f"Main metric {metric} ({direction} is better; its AUC too), {over}; the combined sd of two models is "
        "sqrt(sd_AMAT^2 + sd_SAT^2).",
        "",
    ]
    a = verdict["a"]
    outcome = "holds" if a["holds"] else f"fails: {', '.join(a['sats_beating_amat'])}"
    lines.append(f"- (a) No SAT beats AMAT on both clean {metric} and AUC by more than their combined sd: {outcome}.")
    words = {"better": "AMAT better", "worse": "AMAT worse", "within sd": "within the combined sd"}
    for key, digits, what, nearest in (
        ("b", auc_digits, "AUC", f"the SAT with the clean {metric} nearest AMAT's"),
        ("c", clean_digits, f"Clean {metric}", "the SAT with the AUC nearest AMAT's"),
    ):
        v = verdict[key]
        difference = f"{v['difference']:+.{digits}f}" + (f" ± {v['combined_sd']:.{digits}f}" if spread else "")
        lines.append(
            f"- ({key}) {what}: AMAT {_cell(v['amat'], v['amat_sd'], digits, spread)} vs {v['sat']} "
            f"{_cell(v['sat_value'], v['sat_sd'], digits, spread)}, {nearest}: difference {difference}: "
            f"{words[v['outcome']]}."
        )
    d = verdict["d"]
    if d["ratio"] is None:
        lines.append("- (d) Training time: not available (a training time is missing).")
    else:
        per_sat = ", ".join(f"{name} {ratio:.2f}" for name, ratio in d["per_sat"].items())
        amat_time, sat_time, n = d["amat_seconds"], d["sat_seconds_mean"], len(d["per_sat"])
        digits = 0 if min(amat_time, sat_time) >= 10 else 1
        lines.append(
            f"- (d) Training time: AMAT {amat_time:.{digits}f} s, SAT {sat_time:.{digits}f} s on average over {n} "
            f"model{'s' if n > 1 else ''}: AMAT / SAT = {d['ratio']:.2f} ({per_sat})."
        )
    return [*lines, ""]


def comparison_markdown(comparison: Mapping[str, Any]) -> str:
    """The paper-style tables of a comparison, then the "Claims verdict" section on the main metric.

    One table per metric: rows models, columns clean, each eps, AUC, training time; with several seeds every cell
    is ``mean ± sd`` over the seeds. The verdict is :py:func:`claims_verdict`'s (``comparison["verdict"]``).

    Args:
        comparison: the content of ``comparison.json``.

    Returns:
        Markdown text.
    """
    eps = [float(e) for e in comparison["eps"]]
    models = comparison["models"]
    seeds = list(comparison.get("seeds") or [])
    spread = len(seeds) > 1
    metrics = list(dict.fromkeys(k for m in models for k in m["metrics"]))
    unit, scale = _time_unit([m.get("train_seconds") for m in models])
    longest = max((m["train_seconds"] / scale for m in models if m.get("train_seconds") is not None), default=0.0)
    time_digits = 0 if longest >= 10 else 1
    columns = [("clean" if i == 0 and e == 0 else f"eps {_eps_label(e)}") for i, e in enumerate(eps)]
    first = models[0] if models else {}
    attack = first.get("attack") or {}
    lines = [f"# Robustness comparison: {comparison['bundle']}", ""]
    described = [f"task: {first.get('task')}"] if first.get("task") else []
    if attack.get("of"):
        described.append(
            f"evaluation: the per-sample worst case of {', '.join(attack['of'])} "
            f"({str(attack.get('norm', '')).upper()}, {attack.get('steps')} steps each)"
        )
    elif attack:
        described.append(
            f"evaluation attack: {attack.get('name', 'PGD')} {str(attack.get('norm', '')).upper()}, "
            f"{attack.get('steps')} steps, alpha {attack.get('alpha')}"
        )
    scaled = f" (paper units; x{_show(comparison['eps_scale'])} applied)" if "eps_scale" in comparison else ""
    described.append(f"eps {', '.join(_eps_label(e) for e in eps)}{scaled}")
    lines.append("; ".join(described) + ".")
    if spread:
        lines.append(f"Seeds: {', '.join(map(str, seeds))}; every cell is the mean ± the sample sd over the seeds.")
    elif seeds:
        lines.append(f"Seed: {seeds[0]}.")
    settings = comparison.get("settings")
    if settings:
        shown = {k: v for k, v in settings.items() if k != "overrides" and v is not None}
        lines.append("Settings: " + ", ".join(f"{k} {_show(v)}" for k, v in shown.items()) + ".")
        if settings.get("overrides"):
            overrides = ", ".join(f"`--{k} {_show(v)}`" for k, v in settings["overrides"].items())
            lines.append(f"Overrides: {overrides}.")
    lines += [
        "AUC: area under the metric-vs-eps curve (trapezoidal rule). Training time: wall time of each training run "
        "(data loading and per-epoch validation included).",
        "",
    ]
    digits = {}
    for metric in metrics:
        direction = "lower is better" if _lower_is_better(metric) else "higher is better"
        lines += [f"## {metric} ({direction})", ""]
        value_digits = _digits([v for m in models for v in m["metrics"].get(metric, [])])
        auc_digits = _digits([m["auc"].get(metric) for m in models])
        digits[metric] = value_digits, auc_digits
        lines.append("| model | " + " | ".join(columns) + f" | AUC | training time ({unit}) |")
        lines.append("|---|" + "---:|" * (len(columns) + 2))
        for m in models:
            values = m["metrics"].get(metric, [None] * len(eps))
            sds = (m.get("metrics_sd") or {}).get(metric, [None] * len(eps))
            t, t_sd = m.get("train_seconds"), m.get("train_seconds_sd")
            time_text = "n/a" if t is None else _cell(t / scale, (t_sd or 0.0) / scale, time_digits, spread)
            cells = [_cell(v, sd, value_digits, spread) for v, sd in zip(values, sds)]
            cells += [_cell(m["auc"].get(metric), (m.get("auc_sd") or {}).get(metric), auc_digits, spread), time_text]
            lines.append(f"| {m['name']} | " + " | ".join(cells) + " |")
        lines.append("")
    verdict = comparison["verdict"] if "verdict" in comparison else claims_verdict(models)
    clean_digits, auc_digits = digits.get(verdict["metric"], (3, 3)) if verdict else (3, 3)
    lines += _attack_lines(models, verdict["metric"] if verdict else _main_metric(models), spread)
    lines += _verdict_lines(verdict, seeds, clean_digits, auc_digits)
    return "\n".join(lines)


def _attack_lines(models: Sequence[Mapping[str, Any]], metric: str | None, spread: bool) -> list[str]:
    """The per-attack AUCs of the main metric, the gradient-masking checks and the breaking eps, per model."""
    keys = ("per_attack_auc", "checks_fired", "breaking_eps")
    if metric is None or not any(m.get(k) is not None for m in models for k in keys):
        return []
    attacks = list(dict.fromkeys(a for m in models for a in m.get("per_attack_auc") or {}))
    digits = _digits([m["auc"].get(metric) for m in models])
    first = attacks[0] if attacks else "the attack"
    lines = [
        f"## Attacks, gradient-masking checks and breaking eps ({metric})",
        "",
        f"AUC of {metric} under each attack alone and under the per-sample worst case (reported above); "
        f"'worst - {first}': how much the worst case changes {first}'s AUC. Checks: the gradient-masking checks that "
        "fired (in how many seeds). Breaking eps: the median over the test samples of the smallest eps at which "
        "the sample's criterion fails (mean over seeds).",
        "",
        "| model | worst case | " + " | ".join(attacks) + f" | worst - {first} | checks fired | median breaking eps |",
        "|---|" + "---:|" * (len(attacks) + 2) + "---|---:|",
    ]
    for m in models:
        per = m.get("per_attack_auc") or {}
        sds = m.get("per_attack_auc_sd") or {}
        cells = [_cell(m["auc"].get(metric), (m.get("auc_sd") or {}).get(metric), digits, spread)]
        cells += [_cell(per.get(a, {}).get(metric), sds.get(a, {}).get(metric), digits, spread) for a in attacks]
        base, worst = _number(per.get(first, {}).get(metric)), _number(m["auc"].get(metric))
        cells.append("n/a" if base is None or worst is None else f"{worst - base:+.{digits}f}")
        fired = m.get("checks_fired")
        seeds = len(m.get("seeds") or [None])
        if isinstance(fired, list):  # one run's result, before combine_seeds
            fired = dict.fromkeys(fired, 1)
        cells.append("n/a" if fired is None else (", ".join(f"{c} ({n}/{seeds})" for c, n in fired.items()) or "none"))
        broken = m.get("breaking_eps") or {}
        cells.append(
            "n/a"
            if not broken
            else (
                "> max" if broken.get("median") is None else _cell(broken["median"], broken.get("median_sd"), 2, spread)
            )
        )
        lines.append(f"| {m['name']} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _plot_comparison(
    path: str | os.PathLike, eps: Sequence[float], models: Sequence[Mapping[str, Any]], eps_scale: Any, title: str
) -> None:
    """Write ``comparison.png``: per metric the means vs eps with sd error bars, then the main metric's trade-off."""
    from monai_amat.handlers.robustness_report import plot_robustness  # imported here: it loads torch and MONAI

    main = _main_metric(models)
    scores = [] if main is None else list(filter(None, (_scores(m, main) for m in models)))
    plot_robustness(
        path,
        eps,
        {m["name"]: m["metrics"] for m in models},
        title=title,
        eps_label="eps" if eps_scale is None else f"eps (paper units; x{_show(eps_scale)} applied)",
        errors={m["name"]: m.get("metrics_sd") or {} for m in models},
        tradeoff=None if main is None else {s.name: (s.clean, s.clean_sd, s.auc, s.auc_sd) for s in scores},
        tradeoff_metric=main or "",
    )


def write_comparison(
    output_dir: str | os.PathLike,
    bundle: str,
    eps: Sequence[float],
    models: Sequence[Mapping[str, Any]],
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``comparison.json``, ``comparison.md`` and ``comparison.png`` (atomically) into ``output_dir``.

    Args:
        output_dir: the comparison folder.
        bundle: the bundle name.
        eps: the evaluation noise levels.
        models: entries as :py:func:`combine_seeds` returns them (or, for one run, as :py:func:`load_model_result`
            does: sds count as 0), at least ``name``, ``metrics``, ``auc``, ``train_seconds``, in table order.
        settings: the resolved settings and overrides, stored and shown.

    Returns:
        The content of ``comparison.json``: ``{"bundle", "eps", "seeds", "models": [{"name", "metrics", "auc",
        "train_seconds", ...}], "verdict", "settings"}``; ``"seeds"`` gathers the models' seeds, ``"eps_scale"`` is
        added when the models have one, ``"verdict"`` is :py:func:`claims_verdict`'s result.

    Raises:
        ValueError: when a model's metric lists do not have one value per eps, or models have different
            ``eps_scale`` values.
    """
    eps = list(eps)
    for m in models:
        for metric, values in m["metrics"].items():
            if len(values) != len(eps):
                raise ValueError(f"{m['name']}: {metric} has {len(values)} values for {len(eps)} eps.")
    eps_scale = _common_eps_scale(models, "the models")
    comparison: dict[str, Any] = {"bundle": bundle, "eps": eps}
    if eps_scale is not None:
        comparison["eps_scale"] = eps_scale
    comparison["seeds"] = list(dict.fromkeys(s for m in models for s in m.get("seeds", [])))
    comparison["models"] = [dict(m) for m in models]
    comparison["verdict"] = claims_verdict(models)
    if settings is not None:
        comparison["settings"] = _jsonable(dict(settings))
    output_dir = Path(output_dir)
    write_json(output_dir / "comparison.json", comparison)
    with atomic_write(output_dir / "comparison.md") as f:
        f.write(comparison_markdown(comparison))
    _plot_comparison(output_dir / "comparison.png", eps, models, eps_scale, f"{bundle}: metric vs eps")
    return comparison


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m monai_amat.compare`` (the ``--KEY VALUE`` overrides come on top).

    Returns:
        The parser.
    """
    parser = argparse.ArgumentParser(
        prog="python -m monai_amat.compare",
        usage="%(prog)s --bundle BUNDLE --output_dir DIR [--epochs N] [--attack_steps K] [--data_source SOURCE] "
        '[--dataset_dir DATASET_DIR] [--sat_eps "[...]"] [--seeds "[...]"] [--in_process] [--KEY VALUE ...]',
        description="STD training, calibration of the criterion from that model, AMAT training, SAT training at each "
        "SAT level, then robust evaluation of every model at the bundle's eps_list; writes comparison.json, "
        "comparison.md and comparison.png in DIR and keeps each run folder there (std/, amat/, sat_<eps>/; with "
        "--seeds, std_s<seed>/, amat_s<seed>/, sat_<eps>_s<seed>/). "
        "Repeating the command skips the stages that finished and resumes an interrupted training.",
        epilog="Any other --KEY VALUE (a Python literal, else a string) is a config override given to every run, e.g. "
        '--spatial_size "[64, 64]" --embedded_cases 8. Example: python -m monai_amat.compare --bundle '
        "bundles/msd_hippocampus_seg_amat --output_dir runs/compare --epochs 1 --attack_steps 3",
        allow_abbrev=False,
    )
    parser.add_argument("--bundle", required=True, help="the bundle folder, e.g. bundles/msd_hippocampus_seg_amat")
    parser.add_argument(
        "--output_dir", required=True, metavar="DIR", help="the comparison folder DIR (created; reused on repeat)"
    )
    parser.add_argument(
        "--epochs", type=_positive_int, metavar="N", help="epochs of every training (default: the bundle's)"
    )
    parser.add_argument(
        "--attack_steps",
        type=_positive_int,
        metavar="K",
        help="PGD steps of the evaluation (attack_steps) and of the training attacks (train_attack_steps, unless "
        "--train_attack_steps is given); default: the bundle's",
    )
    parser.add_argument("--data_source", choices=("embedded", "real"), help="default: the bundle's (embedded)")
    parser.add_argument(
        "--dataset_dir", metavar="DATASET_DIR", help="the real data set folder (with --data_source real)"
    )
    parser.add_argument(
        "--sat_eps",
        type=parse_sat_eps,
        metavar='"[EPS, ...]"',
        help='SAT levels, e.g. "[1, 5, 10]" (default: the bundle\'s sat_eps_list)',
    )
    parser.add_argument(
        "--seeds",
        type=parse_seeds,
        metavar='"[SEED, ...]"',
        help='train and evaluate every model once per seed (the bundle key seed), e.g. "[0, 1, 2]"; the comparison '
        "shows means and sample sds over the seeds (default: one run with the bundle's seed)",
    )
    parser.add_argument(
        "--in_process",
        action="store_true",
        help="run the stages in this process (faster start) instead of one `python -m monai.bundle run` each",
    )
    return parser


def _parse_overrides(tokens: Sequence[str], parser: argparse.ArgumentParser) -> dict[str, Any]:
    """``--KEY VALUE`` / ``--KEY=VALUE`` pairs; errors through ``parser.error``."""
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) == 2:
            parser.error(f"unrecognized argument {token!r} (overrides are --KEY VALUE pairs)")
        key, sep, value = token[2:].partition("=")
        if not sep:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                parser.error(f"argument --{key}: expected one value (a config override is --{key} VALUE)")
            value = tokens[i + 1]
            i += 1
        overrides[key] = _literal(value)
        i += 1
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        0 on success, 1 when a stage failed (argument errors exit with status 2, argparse style).
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    names = [token[2:].partition("=")[0] for token in argv if token.startswith("--") and len(token) > 2]
    repeated = [name for name in dict.fromkeys(names) if names.count(name) > 1]
    if repeated:  # argparse would keep the last one silently
        parser.error(f"argument --{repeated[0]}: given twice")
    args, extra = parser.parse_known_args(argv)
    passthrough = _parse_overrides(extra, parser)
    overrides: dict[str, Any] = {}
    if args.data_source is not None:
        overrides["data_source"] = args.data_source
    if args.dataset_dir is not None:
        overrides["dataset_dir"] = str(Path(args.dataset_dir).resolve())
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.attack_steps is not None:
        overrides["attack_steps"] = overrides["train_attack_steps"] = args.attack_steps
    overrides.update(passthrough)  # a repeated option was refused above
    try:
        comparison = Comparison(
            args.bundle, args.output_dir, overrides, args.sat_eps, in_process=args.in_process, seeds=args.seeds
        )
    except CompareError as e:
        parser.error(str(e))
    try:
        comparison.run()
    except StageError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    print((comparison.output_dir / "comparison.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
