"""The comparison's stages: which runs a protocol needs, which are done, and running the rest."""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from monai_amat.apps import REPOSITORY_BUNDLES
from monai_amat.apps.compare.common import (
    CompareError,
    eps_label,
    jsonable,
    parse_sat_eps,
    parse_seeds,
    read_record,
    say,
)
from monai_amat.apps.compare.report import combine_seeds, load_model_result, write_comparison
from monai_amat.apps.settings import check_config, runner_keys, stage_only_keys, unused_by
from monai_amat.utils import root_cause, write_json

CONFIGS = ("train", "train_std", "train_sat", "calibrate", "evaluate")


# keys the runner sets itself (the config keys of the settings table, and the arguments of ``monai.bundle run``)
RESERVED = {
    **runner_keys(),
    "config_file": "the stages use the bundle's own configs",
    "args_file": "the runner writes one per stage",
}
# keys that only change the evaluation: changing them re-evaluates instead of refusing to retrain
EVAL_ONLY_KEYS = stage_only_keys("evaluate")
# the training stage of each training config over train.json
TRAINING_STAGE = {"train_std": "std", "train_sat": "sat"}


# evaluation keys whose bundle defaults go into the evaluation records: a changed default re-evaluates
EVAL_DEFAULT_KEYS = ("eval_attacks", "masking_checks", "breaking_eps")


class StageError(RuntimeError):
    """A stage (a training, the calibration or an evaluation run) failed."""


def _bundle_dir(path: str | os.PathLike) -> Path:
    """The bundle folder of ``--bundle``: a path, or a bundle name under ``./bundles`` or the repository's bundles."""
    p = Path(path)
    candidates = [p]
    if len(p.parts) == 1:
        candidates += [Path("bundles") / p, REPOSITORY_BUNDLES / p]
    for c in candidates:
        if (c / "configs").is_dir():
            missing = [f"configs/{n}.json" for n in CONFIGS if not (c / "configs" / f"{n}.json").is_file()]
            if missing:
                raise CompareError(f"{c} is not a complete AMAT bundle: it lacks {', '.join(missing)}.", "--bundle")
            return c.resolve()
    raise CompareError(f"{path}: no such bundle folder (expected a folder holding configs/train.json).", "--bundle")


def bundle_defaults(
    bundle_dir: str | os.PathLike, overrides: Mapping[str, Any] | None = None, overlays: Sequence[str] = ()
) -> dict[str, Any]:
    """The bundle's comparison settings, resolved from ``train.json`` + ``evaluate.json`` with ``overrides`` applied.

    Args:
        bundle_dir: the bundle folder.
        overrides: config overrides, as given to every run.
        overlays: names of configs merged after the others (e.g. ``["volumetric"]``).

    Returns:
        ``{"eps_list", "sat_eps_list", "epochs", "attack_steps", "train_attack_steps", "data_source",
        "dataset_dir", "seed", "eval_attacks", "masking_checks", "breaking_eps"}``; a key the bundle lacks maps to
        None.
    """
    from monai.bundle import ConfigParser

    bundle_dir = Path(bundle_dir)
    parser = ConfigParser()
    parser.read_config([str(bundle_dir / "configs" / f"{n}.json") for n in ("train", "evaluate", *overlays)])
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


def _known_keys(bundle_dir: Path, overlays: Sequence[str] = ()) -> Any:
    """A parser of all the bundle's configs merged, to tell config keys from typos."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(bundle_dir / "configs" / f"{n}.json") for n in (*CONFIGS, *overlays)])
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


@dataclass(kw_only=True)
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
    """The training keys the model's training stage does not use (:py:func:`monai_amat.apps.settings.unused_by`)."""
    return unused_by(next((TRAINING_STAGE[c] for c in model.configs if c in TRAINING_STAGE), "amat"))


def _used(settings: Mapping[str, Any], unused: Sequence[str]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in unused}


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
        overlays: names of bundle configs merged last into every stage (e.g. ``["volumetric"]`` for the MSD
            bundles' 3D variant); recorded in every stage's settings.

    Raises:
        CompareError: for an unknown bundle or overlay, a key that is neither a config key of the bundle nor a
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
        overlays: Sequence[str] = (),
    ) -> None:
        self.bundle_dir = _bundle_dir(bundle)
        self.overlays = tuple(overlays)
        for name in self.overlays:
            if not (self.bundle_dir / "configs" / f"{name}.json").is_file():
                raise CompareError(f"bundle {self.bundle_dir.name} has no configs/{name}.json.", "--overlay")
        self.bundle = self.bundle_dir.name
        self.output_dir = Path(output_dir).resolve()
        self.overrides = jsonable(dict(overrides or {}))
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
            defaults = bundle_defaults(self.bundle_dir, self.overrides, self.overlays)
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
                f"SAT-{eps_label(e)}",
                self.output_dir / f"sat_{eps_label(e)}{suffix}",
                ("train", "train_sat"),
                {**extra, "sat_eps": e},
                seed,
            )
            for e in self.sat_eps
        ]

    def _check_keys(self) -> None:
        parser = _known_keys(self.bundle_dir, self.overlays)
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
        if self.overlays:  # a run with other configs is another run
            train_settings["overlays"] = list(self.overlays)
        stages: list[_Stage] = []
        for seed in self.seeds:
            suffix, extra = self._suffix(seed), self._seed_overrides(seed)
            of_seed = f" (seed {seed})" if self.per_seed else ""
            thresholds = self.output_dir / f"thresholds{suffix}.json"
            common = {"bundle_root": str(self.bundle_dir), "thresholds_file": str(thresholds)}
            models = [m for m in self.models if m.seed == seed]
            trainings = [
                _Stage(
                    label=f"{m.name} training{of_seed}",
                    kind="train",
                    folder=m.run_dir,
                    configs=m.configs,
                    args={**common, **self.overrides, **m.overrides, "output_dir": str(m.run_dir)},
                    settings=jsonable(_used({**train_settings, **m.overrides}, _unused(m))),
                    output=m.run_dir / "model.pt",
                    model=m,
                    unused=_unused(m),
                )
                for m in models
            ]
            std = models[0]
            calibration = _Stage(
                label=f"calibration (criterion from the STD model){of_seed}",
                kind="calibrate",
                folder=self.output_dir,
                configs=("train", "calibrate"),
                args={
                    **common,
                    **self.overrides,
                    **extra,
                    "output_dir": str(std.run_dir),
                    "ckpt_path": str(std.run_dir / "model.pt"),
                },
                settings=jsonable(_used({**train_settings, **extra}, _unused(std))),
                output=thresholds,
                model=std,
                tag=suffix,
                unused=_unused(std),
            )
            evaluations = [
                _Stage(
                    label=f"{m.name} evaluation{of_seed}",
                    kind="evaluate",
                    folder=m.run_dir,
                    configs=(*m.configs, "evaluate"),
                    args={
                        **common,
                        **self.overrides,
                        **m.overrides,
                        "output_dir": str(m.run_dir),
                        "ckpt_path": str(m.run_dir / "model.pt"),
                    },
                    settings=jsonable({**self.eval_settings, **train_settings, **self.overrides, **m.overrides}),
                    output=m.run_dir / "robustness.json",
                    model=m,
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
            record = read_record(stage.record)
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
        record = read_record(stage.record)
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
        say(f"bundle {self.bundle} -> {self.output_dir}")
        names = dict.fromkeys(m.name for m in self.models)
        say(
            f"models: {', '.join(names)}; seeds {self.seeds}; eval eps {[eps_label(e) for e in self.eps]}; "
            f"settings {self.settings}; overrides {self.overrides or 'none'}"
        )
        n = len(self.stages)
        for i, stage in enumerate(self.stages, 1):
            status = self._status(stage)
            where = stage.output.relative_to(self.output_dir)
            if status == "done":
                say(f"stage {i}/{n}: {stage.label} -> {where}: finished earlier, skipped")
                continue
            note = " (resuming from checkpoint.pt)" if status == "resume" else ""
            say(f"stage {i}/{n}: {stage.label} -> {where}{note}")
            seconds = self._execute(stage, resume=status == "resume")
            say(f"stage {i}/{n}: {stage.label} done in {seconds:.1f} s")
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
        say(f"wrote {self.output_dir / 'comparison.json'}, comparison.md, comparison.png")
        return comparison

    def _execute(self, stage: _Stage, resume: bool) -> float:
        record = read_record(stage.record) or {}
        before = 0.0
        if resume:
            ckpt = stage.folder / "checkpoint.pt"
            partial = max(0.0, ckpt.stat().st_mtime - record.get("started", 0))  # up to its last epoch end
            before = float(record.get("seconds_before", 0.0)) + partial
        names = (*stage.configs, *self.overlays)
        args = {"config_file": [str(self.bundle_dir / "configs" / f"{c}.json") for c in names], **stage.args}
        if stage.kind == "train":  # a stage that runs afresh replaces its own unfinished attempt
            args["resume"], args["overwrite"], args["export_model"] = resume, not resume, False
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
        done = {**read_record(stage.record), "finished": True, "seconds": seconds}
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
