"""Ignite handler that writes a robust evaluation's ``robustness.json`` and ``robustness.png``."""

from __future__ import annotations

import csv
import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from monai_amat.keys import AttackEvents
from monai_amat.utils import atomic_write, is_rank0, write_json

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["RobustnessReport", "area_under_curve", "plot_robustness", "eps_scale_note"]

# what the evaluator's probes add to ``engine.state.robustness`` and the report copies as it is
EXTRA_KEYS = ("checks", "breaking_eps")


def area_under_curve(eps: Sequence[float], values: Sequence[float]) -> float:
    """Area under a metric-vs-eps curve (trapezoidal rule).

    Args:
        eps: ascending noise levels.
        values: the metric at each level.

    Returns:
        The area; 0 for a single level.
    """
    return float(np.trapezoid(np.asarray(values, dtype=float), np.asarray(eps, dtype=float)))


def plot_robustness(
    path: str | os.PathLike,
    eps: Sequence[float],
    curves: Mapping[str, Mapping[str, Sequence[float]]],
    title: str = "",
    eps_label: str = "eps",
    errors: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
    tradeoff: Mapping[str, tuple[float, float, float, float]] | None = None,
    tradeoff_metric: str = "",
) -> None:
    """Plot metric-vs-eps curves, one panel per metric, one line per model; written atomically as PNG.

    Args:
        path: the PNG file.
        eps: noise levels.
        curves: ``{model: {metric: [value per eps]}}``; None values are left out of a line.
        title: figure title.
        eps_label: the x-axis label.
        errors: ``{model: {metric: [sd per eps]}}``, drawn as error bars; None draws none.
        tradeoff: ``{model: (clean, clean sd, AUC, AUC sd)}`` of ``tradeoff_metric``: adds a panel with one point
            per model (clean value vs AUC, error bars both ways); None adds none.
        tradeoff_metric: the metric of the trade-off panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def floats(values: Sequence[Any] | None) -> list[float] | None:
        return None if values is None else [math.nan if v is None else float(v) for v in values]

    metrics = list(dict.fromkeys(m for c in curves.values() for m in c))
    panels = max(len(metrics) + (tradeoff is not None), 1)
    fig, axes = plt.subplots(1, panels, figsize=(4 * panels, 3.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for model, c in curves.items():
            if metric in c:
                sd = floats(((errors or {}).get(model) or {}).get(metric))
                ax.errorbar(eps, floats(c[metric]), yerr=sd, marker="o", capsize=3, label=model)
        ax.set_xlabel(textwrap.fill(eps_label, 40))  # a per-input rule is long: wrap it under its own panel
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if tradeoff is not None:
        ax = axes[0][len(metrics)]
        for model, (clean, clean_sd, auc, auc_sd) in tradeoff.items():
            ax.errorbar([clean], [auc], xerr=[clean_sd], yerr=[auc_sd], fmt="o", capsize=3)
            ax.annotate(model, (clean, auc), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(f"clean {tradeoff_metric}")
        ax.set_ylabel(f"AUC of {tradeoff_metric}")
        ax.set_title("trade-off: clean vs robust")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


class RobustnessReport:
    """Writes ``robustness.json`` and ``robustness.png`` when a ``RobustEvaluator`` has evaluated every eps.

    The JSON is ``{"task", "attack": {...}, "eps": [...], "eps_scale", "metrics": {name: [value per eps]}, "auc":
    {name: area under the metric-vs-eps curve}}``: ``eps`` (and the AUC) in the evaluator's units (the paper's, in the
    bundles), the attack's budget being ``eps * eps_scale``. With several attacks, ``metrics`` are the worst case,
    ``attack`` is ``{"name": "worst case", "of": [names], "norm", "steps", "random_start"}``, and the JSON adds
    ``attacks`` (each one's settings) and ``per_attack: {attack: {name: [value per eps]}}``; the plot draws the worst
    case and each attack. What the evaluator's probes found (``checks``, ``breaking_eps``) is copied as it is. Only
    rank 0 writes, atomically.

    Args:
        output_dir: the folder for both files.
        task: the task name stored in the JSON (e.g. ``"segmentation"``).
        metric_names: the metrics to report; None reports all.
        filename: the file stem.
        model_name: the curve's label in the plot.

    Raises:
        KeyError: at write time, when a requested metric was not computed.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        task: str,
        metric_names: Sequence[str] | None = None,
        filename: str = "robustness",
        model_name: str = "model",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.task = task
        self.metric_names = None if metric_names is None else list(metric_names)
        self.filename = filename
        self.model_name = model_name
        self.report: dict[str, Any] | None = None

    def attach(self, engine: Engine) -> None:
        """Write the report when ``engine`` fires ``ROBUSTNESS_COMPLETED``.

        Args:
            engine: a :py:class:`monai_amat.engines.RobustEvaluator`.
        """
        if not engine.has_event_handler(self, AttackEvents.ROBUSTNESS_COMPLETED):
            engine.add_event_handler(AttackEvents.ROBUSTNESS_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Build the report from ``engine.state.robustness`` and write it (rank 0)."""
        result = engine.state.robustness
        names = list(result["metrics"]) if self.metric_names is None else self.metric_names
        missing = [n for n in names if n not in result["metrics"]]
        if missing:
            raise KeyError(f"metrics {missing} were not computed; the evaluator has {sorted(result['metrics'])}.")
        metrics = {n: result["metrics"][n] for n in names}
        attacks = result.get("attacks") or {type(engine.attack).__name__.lower(): engine.attack.describe()}
        if len(attacks) == 1:
            attack = next(iter(attacks.values()))
        else:
            first = next(iter(attacks.values()))
            attack = {
                "name": "worst case",
                "of": list(attacks),
                "norm": first["norm"],
                "steps": max(a["steps"] for a in attacks.values()),
                "random_start": all(a["random_start"] for a in attacks.values()),
            }
        self.report = {
            "task": self.task,
            "attack": attack,
            "eps": result["eps"],
            "eps_scale": result.get("eps_scale", 1.0),
            "metrics": metrics,
            "auc": {n: area_under_curve(result["eps"], v) for n, v in metrics.items()},
        }
        per_attack = result.get("per_attack") or {}
        if len(per_attack) > 1:
            self.report["attacks"] = attacks
            self.report["per_attack"] = {a: {n: per_attack[a][n] for n in names} for a in per_attack}
        self.report.update({k: v for k, v in result.items() if k in EXTRA_KEYS})
        if not is_rank0():
            return
        write_json(self.output_dir / f"{self.filename}.json", self.report)
        scale = self.report["eps_scale"]
        curves = {self.model_name if len(per_attack) <= 1 else "worst case": metrics}
        if len(per_attack) > 1:
            curves.update({a: self.report["per_attack"][a] for a in per_attack})
        if result.get("sample_eps") is not None:
            self._write_sample_eps(result["sample_eps"], result["breaking_eps"], scale)
        plot_robustness(
            self.output_dir / f"{self.filename}.png",
            result["eps"],
            curves,
            title=self.task if len(per_attack) <= 1 else f"{self.task}: {self.model_name}",
            eps_label=f"eps{eps_scale_note(scale)}",
        )

    def _write_sample_eps(self, rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any], scale: float) -> None:
        """``sample_eps.csv`` (one row per sample, in the data's order) and its histogram ``sample_eps.png``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        columns = ["sample", *[k for k in (rows[0] if rows else {}) if k not in ("breaking_eps", "status")]]
        columns += ["breaking_eps", "status"]
        with atomic_write(self.output_dir / summary["file"]) as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(columns)
            for i, row in enumerate(rows):
                writer.writerow([i, *[row.get(c) for c in columns[1:]]])
        values = [r["breaking_eps"] for r in rows]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.hist(values, bins=min(max(len(values) // 2, 5), 30), range=(0, summary["max_eps"]))
        ax.set_xlabel(textwrap.fill(f"breaking eps{eps_scale_note(scale)}", 60))
        ax.set_ylabel("samples")
        median = "> max" if summary["median"] is None else f"{summary['median']:.3g}"
        ax.set_title(
            f"{self.model_name}: median {median}; "
            f"{summary['unbroken']} unbroken at {summary['max_eps']:g}, {summary['clean_wrong']} wrong clean",
            fontsize=9,
        )
        fig.tight_layout()
        with atomic_write(self.output_dir / Path(summary["file"]).with_suffix(".png").name, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        plt.close(fig)


def eps_scale_note(scale: float | str) -> str:
    """How a report's eps become attack budgets, for axis labels: nothing for 1, the factor, or a per-input rule.

    Args:
        scale: a report's ``eps_scale`` (a number, or the rule of :py:class:`monai_amat.attacks.PerVoxelEpsScale`).

    Returns:
        Text to append to "eps".
    """
    if isinstance(scale, str):
        return f" (paper units; budget x {scale})"
    return "" if scale == 1.0 else f" (paper units; x{scale:.3g} applied)"
