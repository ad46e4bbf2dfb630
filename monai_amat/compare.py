"""The paper's comparison protocol on one bundle: STD, calibration, AMAT, SAT at several eps, robust evaluation.

``python -m monai_amat.compare --bundle bundles/NAME --output_dir DIR [--epochs N] [--attack_steps K]
[--data_source ...] [--dataset_dir ...] [--sat_eps "[...]"] [--KEY VALUE ...]`` runs, with the bundle's own configs
(each stage a ``python -m monai.bundle run`` process, or in this process with ``--in_process``):

1. standard training (``train.json`` + ``train_std.json``) into ``DIR/std``;
2. calibration of the criterion from that model (``train.json`` + ``calibrate.json``) into ``DIR/thresholds.json``;
3. AMAT training (``train.json``) into ``DIR/amat``, with those thresholds;
4. SAT training (``train.json`` + ``train_sat.json``) at each eps of the bundle's ``sat_eps_list`` (or
   ``--sat_eps``) into ``DIR/sat_<eps>``;
5. robust evaluation (``evaluate.json`` merged over each model's training configs) of every model at the bundle's
   ``eps_list``: ``robustness.json`` and ``.png`` in each run folder;

then writes ``DIR/comparison.json``, ``DIR/comparison.md`` (one table per metric: rows models, columns clean and
each eps, AUC, training time) and ``DIR/comparison.png`` (one panel per metric, one line per model).

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
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from monai_amat.utils import atomic_write, read_json, write_json

__all__ = [
    "CompareError",
    "StageError",
    "ModelRun",
    "Comparison",
    "bundle_defaults",
    "load_model_result",
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
    "bundle_root": "it is the --bundle folder",
    "config_file": "the stages use the bundle's own configs",
    "args_file": "the runner writes one per stage",
    "sat_eps": "--sat_eps takes the list of SAT levels here",
}
# keys that only change the evaluation: changing them re-evaluates instead of refusing to retrain
EVAL_ONLY_KEYS = ("eps_list", "attack_steps", "eval_alpha")
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
        "dataset_dir"}``; a key the bundle lacks maps to None.
    """
    from monai.bundle import ConfigParser

    bundle_dir = Path(bundle_dir)
    parser = ConfigParser()
    parser.read_config([str(bundle_dir / "configs" / f"{n}.json") for n in ("train", "evaluate")])
    parser.update({"bundle_root": str(bundle_dir), **dict(overrides or {})})
    keys = ("eps_list", "sat_eps_list", "epochs", "attack_steps", "train_attack_steps", "data_source", "dataset_dir")
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
    """One model of the comparison and its run folder.

    Args:
        name: ``"STD"``, ``"AMAT"`` or ``"SAT-<eps>"``.
        run_dir: the run's ``output_dir``.
        configs: the bundle configs of its training, e.g. ``("train", "train_sat")``.
        overrides: overrides of this model only (``{"sat_eps": 5.0}`` for SAT).
    """

    name: str
    run_dir: Path
    configs: tuple[str, ...]
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Stage:
    label: str
    kind: str  # "train", "calibrate" or "evaluate"
    folder: Path  # where its record, args file and log go
    configs: tuple[str, ...]
    args: dict[str, Any]
    settings: dict[str, Any]
    output: Path
    model: ModelRun | None = None

    @property
    def record(self) -> Path:
        return self.folder / f"compare_{self.kind}.json"


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

    Raises:
        CompareError: for an unknown bundle, a key that is neither a config key of the bundle nor a
            ``monai.bundle run`` argument, a key the runner sets itself, a bad resolved setting (e.g. an
            ``eps_list`` that is not ascending), or a training already run in ``output_dir`` with other settings.
    """

    def __init__(
        self,
        bundle: str | os.PathLike,
        output_dir: str | os.PathLike,
        overrides: Mapping[str, Any] | None = None,
        sat_eps: Sequence[float] | None = None,
        in_process: bool = False,
    ) -> None:
        self.bundle_dir = _bundle_dir(bundle)
        self.bundle = self.bundle_dir.name
        self.output_dir = Path(output_dir).resolve()
        self.overrides = _jsonable(dict(overrides or {}))
        self.in_process = in_process
        self._check_keys()
        try:
            defaults = bundle_defaults(self.bundle_dir, self.overrides)
        except Exception as e:  # the config parser wraps anything an expression raises
            raise CompareError(f"cannot read the settings of bundle {self.bundle} with these overrides: {e}") from e
        if sat_eps is None:
            if defaults["sat_eps_list"] is None:
                raise CompareError(f"bundle {self.bundle} has no sat_eps_list: give the SAT levels.", "--sat_eps")
            sat_eps = parse_sat_eps(list(defaults["sat_eps_list"]))
        self.sat_eps = parse_sat_eps(list(sat_eps))
        self.eps = list(defaults["eps_list"] or [])
        if not self.eps:
            raise CompareError(f"bundle {self.bundle} has no eps_list in evaluate.json.")
        self.settings = {k: defaults[k] for k in ("epochs", "attack_steps", "train_attack_steps", "data_source")}
        from monai_amat.bundle import check_config

        try:
            check_config(
                {
                    "eps_list": self.eps,
                    "sat_eps_list": self.sat_eps,
                    **{k: v for k, v in self.settings.items() if v is not None},
                    "dataset_dir": defaults["dataset_dir"],
                }
            )
        except ValueError as e:
            raise CompareError(str(e)) from e
        self.models = [
            ModelRun("STD", self.output_dir / "std", ("train", "train_std")),
            ModelRun("AMAT", self.output_dir / "amat", ("train",)),
        ] + [
            ModelRun(
                f"SAT-{_eps_label(e)}", self.output_dir / f"sat_{_eps_label(e)}", ("train", "train_sat"), {"sat_eps": e}
            )
            for e in self.sat_eps
        ]
        self.stages = self._plan()
        self._check_conflicts()

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
        common = {"bundle_root": str(self.bundle_dir), "thresholds_file": str(self.output_dir / "thresholds.json")}
        train_settings = {k: v for k, v in self.overrides.items() if k not in EVAL_ONLY_KEYS}
        trainings: list[_Stage] = []
        for m in self.models:
            trainings.append(
                _Stage(
                    f"{m.name} training",
                    "train",
                    m.run_dir,
                    m.configs,
                    {**common, **self.overrides, **m.overrides, "output_dir": str(m.run_dir)},
                    _jsonable({**train_settings, **m.overrides}),
                    m.run_dir / "model.pt",
                    m,
                )
            )
        std = self.models[0]
        calibration = _Stage(
            "calibration (criterion from the STD model)",
            "calibrate",
            self.output_dir,
            ("train", "calibrate"),
            {**common, **self.overrides, "output_dir": str(std.run_dir), "ckpt_path": str(std.run_dir / "model.pt")},
            _jsonable(train_settings),
            self.output_dir / "thresholds.json",
        )
        stages = [trainings[0], calibration, *trainings[1:]]
        for m in self.models:
            stages.append(
                _Stage(
                    f"{m.name} evaluation",
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
                    _jsonable({**self.overrides, **m.overrides}),
                    m.run_dir / "robustness.json",
                    m,
                )
            )
        return stages

    def _check_conflicts(self) -> None:
        """Refuse, before anything runs, a training that was (partly) run in the same folder with other settings."""
        for stage in self.stages:
            if stage.kind != "train":
                continue
            record = _read_record(stage.record)
            if record is None or record.get("settings") == stage.settings:
                continue
            if not record.get("finished") and not (stage.folder / "checkpoint.pt").is_file():
                continue  # it failed before its first epoch ended: nothing to keep, it starts afresh
            old, new = record.get("settings", {}), stage.settings
            diff = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
            changes = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in diff.items())
            raise CompareError(
                f"{stage.folder} was trained with other settings ({changes}); "
                "use another --output_dir, or delete that folder to train it again."
            )

    def _status(self, stage: _Stage) -> str:
        """``"done"``, ``"resume"`` or ``"run"``."""
        record = _read_record(stage.record)
        finished = bool(record and record.get("finished") and record.get("settings") == stage.settings)
        if stage.kind == "train":
            if finished and stage.output.is_file():
                return "done"
            if record and not record.get("finished") and (stage.folder / "checkpoint.pt").is_file():
                return "resume"
            return "run"
        source = (
            self.models[0].run_dir / "model.pt" if stage.kind == "calibrate" else stage.folder / "model.pt"
        )  # a retrained model invalidates what was derived from it
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
        _say(
            f"models: {', '.join(m.name for m in self.models)}; eval eps {[_eps_label(e) for e in self.eps]}; "
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
        results = [load_model_result(m.run_dir, m.name) for m in self.models]
        for r in results:
            if [float(e) for e in r["eps"]] != [float(e) for e in self.eps]:
                raise StageError(f"{r['run_dir']}/robustness.json has eps {r['eps']}, expected {self.eps}.")
        comparison = write_comparison(
            self.output_dir,
            self.bundle,
            self.eps,
            results,
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
        if stage.kind == "train":
            args["resume"] = resume
        stage.folder.mkdir(parents=True, exist_ok=True)
        args_file = stage.folder / f"compare_{stage.kind}_args.json"
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
                    f"{stage.label} failed: {_root_cause(e)}. Run the same command again to go on from there."
                ) from e
        else:
            log = stage.folder / f"compare_{stage.kind}.log"
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


def _root_cause(error: BaseException) -> str:
    """The innermost message of an exception chain (MONAI's config parser wraps the error that matters)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    return f"{type(error).__name__}: {error}"


def _stream(cmd: Sequence[str], log: Path, out: TextIO | None = None) -> int:
    """Run ``cmd``, showing its output (progress bars included) as it comes and keeping a copy in ``log``."""
    out = out or sys.stdout
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as f, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) as p:
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
    """One model's entry of ``comparison.json`` from its run folder.

    Args:
        run_dir: the run folder holding ``robustness.json`` and, from the runner, ``compare_train.json``.
        name: the model's name (``"STD"``, ``"AMAT"``, ``"SAT-<eps>"``).

    Returns:
        ``{"name", "run_dir", "task", "attack", "eps", "metrics", "auc", "train_seconds"}``; ``train_seconds`` is
        None without a finished training record.

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
    return {
        "name": name,
        "run_dir": str(run_dir),
        "task": report.get("task"),
        "attack": report.get("attack"),
        "eps": report["eps"],
        "metrics": report["metrics"],
        "auc": auc,
        "train_seconds": record.get("train_seconds") if record.get("finished") else None,
    }


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


def _claims(metric: str, models: Sequence[Mapping[str, Any]], vd: int = 3, ad: int = 3) -> list[str]:
    """The AUC and clean-value lines of one metric: AMAT against every SAT model (``vd``/``ad``: decimals)."""
    amat = next((m for m in models if m["name"] == "AMAT"), None)
    sats = [m for m in models if m["name"].startswith("SAT")]
    if amat is None or not sats:
        return []
    lower = _lower_is_better(metric)
    better, word = (float.__lt__, "lower") if lower else (float.__gt__, "higher")
    a = _number(amat["auc"].get(metric))
    sat_auc = [(m, _number(m["auc"].get(metric))) for m in sats]
    if a is None or any(v is None for _, v in sat_auc):
        return ["- AUC: not comparable (a value is missing or not finite)."]
    lines = []
    losers = [f"{m['name']} {_fmt(v, ad)}" for m, v in sat_auc if not better(a, v)]
    if not losers:
        best = min(sat_auc, key=lambda mv: mv[1]) if lower else max(sat_auc, key=lambda mv: mv[1])
        lines.append(
            f"- AUC: AMAT's {_fmt(a, ad)} is {word} than every SAT's "
            f"(best SAT: {best[0]['name']} {_fmt(best[1], ad)}): yes."
        )
    else:
        lines.append(f"- AUC: AMAT's {_fmt(a, ad)} is not {word} than every SAT's: {', '.join(losers)}.")
    closest, c_auc = min(sat_auc, key=lambda mv: abs(mv[1] - a))
    ca, cs = _number(amat["metrics"][metric][0]), _number(closest["metrics"][metric][0])
    if ca is None or cs is None:
        verdict = "not comparable"
    elif ca == cs:
        verdict = "equal"
    else:
        verdict = f"AMAT {'better' if better(ca, cs) else 'worse'} by {_fmt(abs(ca - cs), vd)}"
    lines.append(
        f"- Clean: AMAT {_fmt(ca, vd)} vs {closest['name']} {_fmt(cs, vd)}, the SAT with the AUC closest to AMAT's "
        f"({_fmt(c_auc, ad)}): {verdict}."
    )
    return lines


def comparison_markdown(comparison: Mapping[str, Any]) -> str:
    """The paper-style tables of a comparison: one per metric, rows models, columns clean, each eps, AUC, time.

    Under each table, a line says whether AMAT's AUC beats every SAT model's (lower is better for metrics named
    like errors: ``mre``, ``error``, ``loss``, ``distance``, ``hausdorff``) and compares AMAT's clean value with
    that of the SAT model whose AUC is closest to AMAT's; a last line compares training times.

    Args:
        comparison: the content of ``comparison.json``.

    Returns:
        Markdown text.
    """
    eps = [float(e) for e in comparison["eps"]]
    models = comparison["models"]
    metrics = list(dict.fromkeys(k for m in models for k in m["metrics"]))
    unit, scale = _time_unit([m.get("train_seconds") for m in models])
    longest = max((m["train_seconds"] / scale for m in models if m.get("train_seconds") is not None), default=0.0)
    time_digits = 0 if longest >= 10 else 1
    columns = [("clean" if i == 0 and e == 0 else f"eps {_eps_label(e)}") for i, e in enumerate(eps)]
    first = models[0] if models else {}
    attack = first.get("attack") or {}
    lines = [f"# Robustness comparison: {comparison['bundle']}", ""]
    described = [f"task: {first.get('task')}"] if first.get("task") else []
    if attack:
        described.append(
            f"evaluation attack: {attack.get('name', 'PGD')} {str(attack.get('norm', '')).upper()}, "
            f"{attack.get('steps')} steps, alpha {attack.get('alpha')}"
        )
    described.append(f"eps {', '.join(_eps_label(e) for e in eps)}")
    lines.append("; ".join(described) + ".")
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
    for metric in metrics:
        direction = "lower is better" if _lower_is_better(metric) else "higher is better"
        lines += [f"## {metric} ({direction})", ""]
        vd = _digits([v for m in models for v in m["metrics"].get(metric, [])])
        ad = _digits([m["auc"].get(metric) for m in models])
        lines.append("| model | " + " | ".join(columns) + f" | AUC | training time ({unit}) |")
        lines.append("|---|" + "---:|" * (len(columns) + 2))
        for m in models:
            values = m["metrics"].get(metric, [None] * len(eps))
            t = m.get("train_seconds")
            time_text = "n/a" if t is None else f"{t / scale:.{time_digits}f}"
            cells = [_fmt(v, vd) for v in values] + [_fmt(m["auc"].get(metric), ad), time_text]
            lines.append(f"| {m['name']} | " + " | ".join(cells) + " |")
        lines.append("")
        claims = _claims(metric, models, vd, ad)
        if claims:
            lines += [*claims, ""]
    amat = next((m for m in models if m["name"] == "AMAT"), None)
    sat_times = [m["train_seconds"] for m in models if m["name"].startswith("SAT") and m.get("train_seconds")]
    if amat and amat.get("train_seconds") and sat_times:
        mean = sum(sat_times) / len(sat_times)
        lines += [
            f"Training time: AMAT {amat['train_seconds']:.0f} s, SAT {mean:.0f} s on average over {len(sat_times)} "
            f"models: AMAT / SAT = {amat['train_seconds'] / mean:.2f}.",
            "",
        ]
    return "\n".join(lines)


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
        models: entries as :py:func:`load_model_result` returns them (at least ``name``, ``metrics``, ``auc``,
            ``train_seconds``), in table order.
        settings: the resolved settings and overrides, stored and shown.

    Returns:
        The content of ``comparison.json``: ``{"bundle", "eps", "models": [{"name", "metrics", "auc",
        "train_seconds", ...}], "settings"}``.

    Raises:
        ValueError: when a model's metric lists do not have one value per eps.
    """
    from monai_amat.handlers.robustness_report import plot_robustness

    eps = list(eps)
    for m in models:
        for metric, values in m["metrics"].items():
            if len(values) != len(eps):
                raise ValueError(f"{m['name']}: {metric} has {len(values)} values for {len(eps)} eps.")
    comparison: dict[str, Any] = {"bundle": bundle, "eps": eps, "models": [dict(m) for m in models]}
    if settings is not None:
        comparison["settings"] = _jsonable(dict(settings))
    output_dir = Path(output_dir)
    write_json(output_dir / "comparison.json", comparison)
    with atomic_write(output_dir / "comparison.md") as f:
        f.write(comparison_markdown(comparison))
    plot_robustness(
        output_dir / "comparison.png", eps, {m["name"]: m["metrics"] for m in models}, title=f"{bundle}: metric vs eps"
    )
    return comparison


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m monai_amat.compare`` (the ``--KEY VALUE`` overrides come on top).

    Returns:
        The parser.
    """
    parser = argparse.ArgumentParser(
        prog="python -m monai_amat.compare",
        usage="%(prog)s --bundle BUNDLE --output_dir DIR [--epochs N] [--attack_steps K] [--data_source SOURCE] "
        '[--dataset_dir DATASET_DIR] [--sat_eps "[...]"] [--in_process] [--KEY VALUE ...]',
        description="STD training, calibration of the criterion from that model, AMAT training, SAT training at each "
        "SAT level, then robust evaluation of every model at the bundle's eps_list; writes comparison.json, "
        "comparison.md and comparison.png in DIR and keeps each run folder there (std/, amat/, sat_<eps>/). "
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
        if key in overrides:
            parser.error(f"argument --{key}: given twice")
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
    for key, value in passthrough.items():
        if key in ("epochs", "attack_steps", "data_source", "dataset_dir"):
            parser.error(f"argument --{key}: given twice")
        overrides[key] = value
    try:
        comparison = Comparison(args.bundle, args.output_dir, overrides, args.sat_eps, in_process=args.in_process)
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
