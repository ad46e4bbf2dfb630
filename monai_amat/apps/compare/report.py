"""The comparison's report: results per model, means over seeds, the verdict on the paper's claims, tables, plot."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monai_amat.apps.compare.common import eps_label, jsonable, read_record
from monai_amat.handlers.robustness_report import eps_scale_note
from monai_amat.utils import atomic_write, read_json, write_json

LOWER_IS_BETTER = ("mre", "error", "loss", "distance", "hausdorff")


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
    record = read_record(run_dir / "compare_train.json") or {}
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


def _same_scale(a: float | str, b: float | str) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return math.isclose(float(a), float(b))


def _common_eps_scale(entries: Sequence[Mapping[str, Any]], what: str) -> Any:
    """The first ``eps_scale`` among ``entries`` (None when none has one); they must agree (number or rule)."""
    scales = [e["eps_scale"] for e in entries if e.get("eps_scale") is not None]
    if any(not _same_scale(s, scales[0]) for s in scales):
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
        return eps_label(value)
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
      AMAT / SAT}, "sat_seconds_total", "ratio_to_all_sats"}`` (None where a time is missing): the last is the cost
      view, one AMAT training against the several SAT trainings needed to find the best eps;
    - ``"e"``: AMAT's AUC against the frontier of STD and the SAT levels at AMAT's clean metric (linear between
      neighbouring points sorted by the clean metric), ``{"between", "inside", "frontier_auc", "frontier_auc_sd",
      "gain" (in the metric's direction: positive, AMAT above the frontier), "combined_sd", "gain_in_sd"}``.

    Args:
        models: entries of ``comparison.json`` (``name``, ``metrics``, ``auc``, ``train_seconds``; ``metrics_sd``
            and ``auc_sd`` when there are several seeds, else the sds are 0), with ``"AMAT"`` and ``"SAT-<eps>"``.
        metric: the metric; default the main metric (the first of the first model's ``metrics``).

    Returns:
        ``{"metric", "lower_is_better", "a", "b", "c", "d", "e"}``, or None without an AMAT model, without a SAT
        model, or when one of their clean values or AUCs is missing or not finite.
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
    std = next((_scores(m, metric) for m in models if m["name"] == "STD"), None)
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
            "sat_seconds_total": sum(s.seconds for s in timed) if timed else None,
            "ratio_to_all_sats": amat.seconds / sum(s.seconds for s in timed) if amat.seconds and timed else None,
        },
        "e": _frontier_distance(amat, ([std] if std is not None else []) + sats, lower),
    }


def _frontier_distance(amat: _Scores, points: Sequence[_Scores], lower_is_better: bool) -> dict[str, Any]:
    """AMAT's AUC against the frontier of the other models at AMAT's clean metric, in units of the combined sd.

    The frontier runs linearly between neighbouring (clean, AUC) points sorted by the clean metric; its AUC and sd at
    AMAT's clean value are interpolated between the two points around it, or taken from the end point when AMAT's
    clean value lies outside their range (``"inside": False``).
    """
    below = sorted((p for p in points if p.clean <= amat.clean), key=lambda p: p.clean)
    above = sorted((p for p in points if p.clean >= amat.clean), key=lambda p: p.clean)
    lo = below[-1] if below else above[0]
    hi = above[0] if above else below[-1]
    inside = bool(below and above)
    w = (amat.clean - lo.clean) / (hi.clean - lo.clean) if hi.clean > lo.clean else 0.0
    auc, auc_sd = lo.auc + w * (hi.auc - lo.auc), lo.auc_sd + w * (hi.auc_sd - lo.auc_sd)
    combined_sd = math.hypot(amat.auc_sd, auc_sd)
    gain = _gain(amat.auc, auc, lower_is_better)
    return {
        "between": [lo.name, hi.name] if lo is not hi else [lo.name],
        "inside": inside,
        "frontier_auc": auc,
        "frontier_auc_sd": auc_sd,
        "gain": gain,
        "combined_sd": combined_sd,
        "gain_in_sd": gain / combined_sd if combined_sd > 0 else None,
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
            f"model{'s' if n > 1 else ''}: AMAT / SAT = {d['ratio']:.2f} ({per_sat}); one AMAT training against "
            f"the {n} SAT trainings that find the best eps: {d['ratio_to_all_sats']:.2f}."
        )
    e = verdict["e"]
    where = " and ".join(e["between"]) if e["inside"] else f"{e['between'][0]} (AMAT's clean {metric} lies outside)"
    in_sd = f" = {e['gain_in_sd']:+.2f} combined sd" if e["gain_in_sd"] is not None else ""
    side = "above" if e["gain"] > 0 else "below"
    lines.append(
        f"- (e) Frontier of STD and the SAT levels at AMAT's clean {metric} (linear between {where}): AUC "
        f"{_cell(e['frontier_auc'], e['frontier_auc_sd'], auc_digits, spread)}; AMAT {side} it by "
        f"{abs(e['gain']):.{auc_digits}f}{in_sd}."
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
    columns = [("clean" if i == 0 and e == 0 else f"eps {eps_label(e)}") for i, e in enumerate(eps)]
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
    scaled = eps_scale_note(comparison["eps_scale"]) if "eps_scale" in comparison else ""
    described.append(f"eps {', '.join(eps_label(e) for e in eps)}{scaled}")
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
        eps_label="eps" if eps_scale is None else f"eps{eps_scale_note(eps_scale)}",
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
        comparison["settings"] = jsonable(dict(settings))
    output_dir = Path(output_dir)
    write_json(output_dir / "comparison.json", comparison)
    with atomic_write(output_dir / "comparison.md") as f:
        f.write(comparison_markdown(comparison))
    _plot_comparison(output_dir / "comparison.png", eps, models, eps_scale, f"{bundle}: metric vs eps")
    return comparison
