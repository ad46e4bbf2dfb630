"""What a robust evaluation checks after its curves: signs of gradient masking, and each sample's breaking eps.

Both are probes of :py:class:`monai_amat.engines.RobustEvaluator`: objects with ``run(evaluator) -> dict`` that run
after the last eps and add their findings to ``engine.state.robustness``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from monai_amat.attacks import APGD, PGD
from monai_amat.engines.evaluator import EvaluationPass, RobustEvaluator

__all__ = [
    "GradientMaskingChecks",
    "BreakingEps",
    "check_monotone",
    "check_large_eps",
    "check_beaten",
    "check_stronger",
    "check_worst_case",
    "sample_names",
]

logger = logging.getLogger(__name__)


def _better(a: float, b: float, lower_is_better: bool) -> float:
    """How much better ``a`` is than ``b`` (positive: better)."""
    return b - a if lower_is_better else a - b


def check_monotone(
    eps: Sequence[float],
    metrics: Mapping[str, Sequence[float]],
    lower_is_better: Sequence[str] = (),
    tolerance: float = 0.05,
) -> dict[str, Any]:
    """Whether a metric gets better as eps grows: a stronger attack should never help the model.

    Args:
        eps: ascending noise levels.
        metrics: ``{name: [value per eps]}``.
        lower_is_better: the metrics where lower is better (e.g. an error in mm).
        tolerance: an improvement counts when it exceeds this fraction of the metric's clean (first) magnitude.

    Returns:
        ``{"check": "monotone", "fired", "detail", "violations": [{"metric", "from_eps", "to_eps", "improvement"}]}``.
    """
    violations = []
    for name, values in metrics.items():
        scale = tolerance * max(abs(float(values[0])), 1e-12)
        for k in range(len(values) - 1):
            gain = _better(float(values[k + 1]), float(values[k]), name in lower_is_better)
            if gain > scale:
                violations.append({"metric": name, "from_eps": eps[k], "to_eps": eps[k + 1], "improvement": gain})
    detail = (
        "; ".join(
            f"{v['metric']} improves by {v['improvement']:.4g} from eps {v['from_eps']:g} to {v['to_eps']:g}"
            for v in violations
        )
        or "every metric gets worse (or stays) as eps grows"
    )
    return {"check": "monotone", "fired": bool(violations), "detail": detail, "violations": violations}


def check_large_eps(
    clean: Mapping[str, float],
    large: Mapping[str, float],
    large_eps: float,
    lower_is_better: Sequence[str] = (),
    worst_values: Mapping[str, float] | None = None,
    gap: float = 0.1,
) -> dict[str, Any]:
    """Whether an attack with a very large budget brings every metric near its worst value.

    Args:
        clean: ``{name: clean value}``.
        large: ``{name: value at large_eps}``.
        large_eps: the budget used (evaluator units).
        lower_is_better: the metrics where lower is better; they are checked only with a worst value.
        worst_values: ``{name: worst possible value}``; default 0 for every higher-is-better metric.
        gap: fires when a metric keeps more than this fraction of its clean-to-worst gap.

    Returns:
        ``{"check": "large_eps", "fired", "detail", "eps", "metrics": {name: {"clean", "large", "worst", "kept"}}}``.
    """
    found: dict[str, dict[str, float]] = {}
    fired = []
    for name, value in large.items():
        worst = (worst_values or {}).get(name, None if name in lower_is_better else 0.0)
        if worst is None or name not in clean or abs(clean[name] - worst) < 1e-12:
            continue
        kept = (value - worst) / (clean[name] - worst)
        found[name] = {"clean": clean[name], "large": value, "worst": worst, "kept": kept}
        if kept > gap:
            fired.append(f"{name} keeps {kept:.0%} of its clean-to-worst gap ({value:.4g}, worst {worst:g})")
    detail = "; ".join(fired) or (
        f"every checked metric is within {gap:.0%} of its worst value"
        if found
        else "no metric with a known worst value"
    )
    return {
        "check": "large_eps",
        "fired": bool(fired),
        "detail": f"eps {large_eps:g}: {detail}",
        "eps": large_eps,
        "metrics": found,
    }


def check_stronger(
    reported: Mapping[str, float],
    stronger: Mapping[str, float],
    clean: Mapping[str, float],
    what: str,
    lower_is_better: Sequence[str] = (),
    tolerance: float = 0.05,
) -> dict[str, Any]:
    """Whether a stronger attack gets a metric worse than the reported worst case, at the same eps.

    Args:
        reported: ``{name: reported (worst-case) value}``.
        stronger: ``{name: value under the stronger attack}``.
        clean: ``{name: clean value}``, for the tolerance's scale.
        what: how to call the stronger attack in the detail.
        lower_is_better: the metrics where lower is better.
        tolerance: fires when a metric is worse by more than this fraction of its clean magnitude.

    Returns:
        ``{"check": "stronger_attack", "fired", "detail", "metrics": {name: {"reported", "stronger"}}}``.
    """
    fired = []
    for name, value in stronger.items():
        if name not in reported:
            continue
        loss = _better(reported[name], value, name in lower_is_better)
        if loss > tolerance * max(abs(clean.get(name, reported[name])), 1e-12):
            fired.append(f"{name} {value:.4g} against the reported {reported[name]:.4g}")
    detail = f"{what}: " + ("; ".join(fired) or f"no metric worse than reported by more than {tolerance:.0%}")
    found = {n: {"reported": reported[n], "stronger": v} for n, v in stronger.items() if n in reported}
    return {"check": "stronger_attack", "fired": bool(fired), "detail": detail, "metrics": found}


def check_worst_case(
    eps: Sequence[float],
    worst: Mapping[str, Sequence[float]],
    per_attack: Mapping[str, Mapping[str, Sequence[float]]],
    lower_is_better: Sequence[str] = (),
    tolerance: float = 0.05,
) -> dict[str, Any]:
    """Whether the reported worst case is better than some attack alone: the per-sample score picked the wrong one.

    Args:
        eps: the noise levels.
        worst: ``{name: [worst-case value per eps]}``.
        per_attack: ``{attack: {name: [value per eps]}}``.
        lower_is_better: the metrics where lower is better.
        tolerance: fires when the worst case is better by more than this fraction of the metric's clean magnitude.

    Returns:
        ``{"check": "worst_case", "fired", "detail", "violations": [{"metric", "attack", "eps", "by"}]}``.
    """
    violations = []
    for name, values in worst.items():
        scale = tolerance * max(abs(float(values[0])), 1e-12)
        for attack, curves in per_attack.items():
            for k, (w, a) in enumerate(zip(values, curves.get(name, []))):
                by = _better(float(w), float(a), name in lower_is_better)
                if by > scale:
                    violations.append({"metric": name, "attack": attack, "eps": eps[k], "by": by})
    detail = (
        "; ".join(
            f"{v['metric']} at eps {v['eps']:g} is better than {v['attack']} alone by {v['by']:.4g}" for v in violations
        )
        or "the worst case is never better than any attack alone"
    )
    return {"check": "worst_case", "fired": bool(violations), "detail": detail, "violations": violations}


def _gather(values: torch.Tensor) -> torch.Tensor:
    """All ranks' values, concatenated in rank order (the values themselves without ``torch.distributed``)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, values.cpu())
    return torch.cat(parts)


def check_beaten(
    name: str,
    worst: torch.Tensor,
    other: torch.Tensor,
    what: str,
    fraction: float = 0.05,
    rel_tol: float = 0.0,
) -> dict[str, Any]:
    """Whether another perturbation of the same budget beats the reported worst case on too many samples.

    Args:
        name: the check's name.
        worst: ``(N,)`` per-sample scores of the reported worst case (higher = worse for the model).
        other: ``(N,)`` per-sample scores of the other perturbation.
        what: how to call the other perturbation in the detail.
        fraction: fires when more than this fraction of the samples is beaten.
        rel_tol: a sample counts as beaten when ``other - worst > rel_tol * |worst|``.

    Returns:
        ``{"check": name, "fired", "detail", "beaten", "samples"}``.
    """
    worst, other = worst.double().flatten(), other.double().flatten()
    beaten = int(((other - worst) > rel_tol * worst.abs() + 1e-9).sum())
    n = int(worst.numel())
    fired = beaten > fraction * n
    detail = f"{what} beats the worst case on {beaten} of {n} samples (allowed: {fraction:.0%})"
    return {"check": name, "fired": bool(fired), "detail": detail, "beaten": beaten, "samples": n}


class GradientMaskingChecks:
    """Signs that the attacks under-estimate the model's vulnerability, written into ``robustness.json``.

    After the curves, four checks after Carlini et al. 2019 ("On evaluating adversarial robustness") go into
    ``checks``:

    1. ``monotone``: a metric gets better as eps grows (worst-case curves).
    2. ``large_eps``: at ``large_eps_factor`` x the largest eps, the first attack leaves a metric far from its worst
       value (e.g. Dice not near 0).
    3. ``stronger_attack``: at the largest eps, ``strong_attack`` (default: Auto-PGD with twice the steps of the first
       attack and 2 restarts) gets a metric worse than the reported worst case by more than ``tolerance`` of its
       clean magnitude.
    4. ``random_noise``: random noise of the largest eps's norm scores higher than the worst case on more than
       ``fraction`` of the samples.

    With several attacks a fifth, ``worst_case``, checks the evaluation itself: the worst-case curve is better than
    some attack alone by more than ``tolerance`` (the per-sample score picked the wrong adversarial input).

    A check that fires is logged as a warning. Costs: one pass of the first attack at the large eps, one of the
    strong attack at the largest eps, one forward pass of random noise; the metrics of the extra passes are not
    reported (``engine.state.reported`` is False).

    Args:
        lower_is_better: the metrics where lower is better.
        worst_values: ``{metric: worst possible value}`` for check 2; default 0 for higher-is-better metrics.
        tolerance: checks 1 and 3's tolerance (fraction of the clean magnitude).
        large_eps_factor: check 2's budget, as a multiple of the largest eps.
        gap: check 2 fires when a metric keeps more than this fraction of its clean-to-worst gap.
        strong_attack: check 3's attack; None builds the default from the evaluator's first attack.
        fraction: check 4 fires when random noise beats the worst case on more than this fraction of the samples.

    Raises:
        ValueError: for ``large_eps_factor <= 1`` or a ``fraction`` outside ``[0, 1)``.
    """

    needs_worst_case = True

    def __init__(
        self,
        lower_is_better: Sequence[str] = (),
        worst_values: Mapping[str, float] | None = None,
        tolerance: float = 0.05,
        large_eps_factor: float = 10.0,
        gap: float = 0.1,
        strong_attack: PGD | None = None,
        fraction: float = 0.05,
    ) -> None:
        if not large_eps_factor > 1:
            raise ValueError(f"large_eps_factor must be > 1, got {large_eps_factor!r}.")
        if not 0 <= fraction < 1:
            raise ValueError(f"fraction must be in [0, 1), got {fraction!r}.")
        self.lower_is_better = list(lower_is_better)
        self.worst_values = dict(worst_values or {})
        self.tolerance = float(tolerance)
        self.large_eps_factor = float(large_eps_factor)
        self.gap = float(gap)
        self.strong_attack = strong_attack
        self.fraction = float(fraction)

    def _strong(self, first: PGD) -> PGD:
        if self.strong_attack is not None:
            return self.strong_attack
        return APGD(
            first.loss_fn,
            norm=first.norm,
            steps=2 * first.steps,
            restarts=2,
            value_range=first.value_range,
            train_mode=first.train_mode,
        )

    def _noise_scores(self, evaluator: RobustEvaluator, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample scores of the worst case and of random noise of norm ``eps`` (evaluator units)."""
        worst, noisy = [], []
        for index, _, batch in evaluator.prepared_batches():
            scores, _ = evaluator.worst_case(index, batch[0])
            worst.append(scores)
            noise = evaluator.attack.random_noise(batch[0], eps * evaluator.scale_for(batch[0]))
            noisy.append(evaluator.score(batch, noise).cpu())
        return _gather(torch.cat(worst)), _gather(torch.cat(noisy))

    def run(self, evaluator: RobustEvaluator) -> dict[str, Any]:
        """Run the four checks on an evaluator that has just evaluated every eps.

        Args:
            evaluator: the evaluator; its ``state.robustness`` holds the curves, its ``worst`` the largest eps's
                worst case.

        Returns:
            ``{"checks": [one dict per check]}``.
        """
        rob = evaluator.state.robustness
        eps, metrics = rob["eps"], rob["metrics"]
        checks = [check_monotone(eps, metrics, self.lower_is_better, self.tolerance)]
        if len(rob.get("per_attack") or {}) > 1:
            checks.append(check_worst_case(eps, metrics, rob["per_attack"], self.lower_is_better, self.tolerance))
        top = max(eps)
        if top > 0:
            worst, noisy = self._noise_scores(evaluator, top)
            checks.append(
                check_beaten("random_noise", worst, noisy, f"random noise of norm eps {top:g}", self.fraction)
            )
            strong = self._strong(evaluator.attack)
            stronger = evaluator.evaluate_pass(EvaluationPass(top, strong, reported=False))
            checks.append(
                check_stronger(
                    {name: values[-1] for name, values in metrics.items()},
                    stronger,
                    {name: values[0] for name, values in metrics.items()},
                    f"{type(strong).__name__}-{strong.steps} x {getattr(strong, 'restarts', 1)} at eps {top:g}",
                    self.lower_is_better,
                    self.tolerance,
                )
            )
            if eps[0] == 0:
                large_eps = self.large_eps_factor * top
                large = evaluator.evaluate_pass(
                    EvaluationPass(large_eps, next(iter(evaluator.attacks)), reported=False)
                )
                clean = {name: values[0] for name, values in metrics.items()}
                checks.append(
                    check_large_eps(clean, large, large_eps, self.lower_is_better, self.worst_values, self.gap)
                )
        for check in checks:
            if check["fired"]:
                logger.warning(f"gradient-masking check {check['check']} fired: {check['detail']}")
        return {"checks": checks}


def sample_names(batchdata: Any, keys: Sequence[str], batch_size: int) -> list[dict[str, Any]]:
    """Each sample's identifying values from a raw (collated) batch, e.g. its case and slice, or its file name.

    Args:
        batchdata: the data loader's batch: a dict of batched values or a list of per-sample dicts.
        keys: the keys to read; an image (``MetaTensor``) gives its ``filename_or_obj``.
        batch_size: the number of samples.

    Returns:
        One ``{key: value}`` per sample.

    Raises:
        KeyError: naming a key the batch does not have.
    """
    batched = not isinstance(batchdata, (list, tuple))
    items = [batchdata] if batched else list(batchdata)
    per_key: dict[str, list[Any]] = {}
    for key in keys:
        values: list[Any] = []
        for item in items:
            if not isinstance(item, Mapping) or key not in item:
                have = sorted(item) if isinstance(item, Mapping) else type(item).__name__
                raise KeyError(f"sample name key {key!r} is not in the evaluation batch (it has {have}).")
            values += _as_list(item[key], batched)
        per_key[key] = values
    return [{key: per_key[key][i] if i < len(per_key[key]) else None for key in keys} for i in range(batch_size)]


def _as_list(value: Any, batched: bool) -> list[Any]:
    meta = getattr(value, "meta", None)
    if isinstance(meta, Mapping) and "filename_or_obj" in meta:
        value = meta["filename_or_obj"]
        value = [value] if isinstance(value, str) else value
    if isinstance(value, torch.Tensor):
        listed = value.tolist()
        return listed if batched and isinstance(listed, list) else [listed]
    if isinstance(value, (list, tuple)) and batched:
        return list(value)
    return [value]


class BreakingEps:
    """The smallest eps at which each evaluation sample stops being correct: the evaluation twin of AMAT's margins.

    For every sample: its criterion on the clean input (wrong there: breaking eps 0); an attack at ``max_eps`` (still
    correct: the sample does not break up to ``max_eps``); then ``steps`` bisection attacks between 0 and ``max_eps``
    with per-sample budgets, a sample counting as broken when any iterate of the attack makes it wrong (bisection is
    skipped for a batch where no sample needs it). At most ``1 + steps`` attacks per sample, plus one clean forward
    pass; the result is within ``max_eps / 2**steps`` of the flip point, assuming the
    attack's success grows with eps. The samples' values go to ``engine.state.robustness["sample_eps"]`` (the report
    writes ``sample_eps.csv`` and ``sample_eps.png``) and a summary, with the median, to ``["breaking_eps"]``.

    Args:
        criterion: ``criterion(pred, target) -> BoolTensor[B]``, True where correct (the bundle's training criterion).
        max_eps: the largest eps searched (evaluator units); None: the largest eps of the evaluator's list.
        steps: bisection steps.
        attack: the name of the evaluator's attack to use; None: its first.
        name_keys: batch keys that identify a sample in ``sample_eps.csv`` (e.g. ``["case", "slice"]``).

    Raises:
        ValueError: for ``steps < 1`` or ``max_eps <= 0``.
    """

    def __init__(
        self,
        criterion: Callable[[Any, Any], torch.Tensor],
        max_eps: float | None = None,
        steps: int = 7,
        attack: str | None = None,
        name_keys: Sequence[str] = (),
    ) -> None:
        if int(steps) != steps or steps < 1:
            raise ValueError(f"BreakingEps steps must be an integer >= 1, got {steps!r}.")
        if max_eps is not None and not max_eps > 0:
            raise ValueError(f"BreakingEps max_eps must be > 0, got {max_eps!r}.")
        self.criterion = criterion
        self.max_eps = max_eps
        self.steps = int(steps)
        self.attack = attack
        self.name_keys = list(name_keys)

    def search(
        self,
        attack: PGD,
        network: torch.nn.Module,
        forward: Callable,
        x: torch.Tensor,
        y: Any,
        max_eps: float,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Breaking eps of one batch.

        Args:
            attack: the attack.
            network: the attacked network.
            forward: the forward function from inputs to the loss's prediction.
            x: clean inputs.
            y: targets.
            max_eps: the largest eps searched (evaluator units).
            scale: the evaluator's factor from eps to budget on this batch (:py:meth:`RobustEvaluator.scale_for`).

        Returns:
            ``(breaking eps (B,), clean_wrong (B,), unbroken (B,))``; unbroken samples get ``max_eps``.
        """
        correct = attack.evaluate(network, x, y, fn=self.criterion, forward_fn=forward).bool()
        hi = torch.full((x.shape[0],), float(max_eps), device=x.device)
        broken = attack.attack(network, x, y, hi * scale, criterion=self.criterion, forward_fn=forward).found
        lo = torch.zeros_like(hi)
        for _ in range(self.steps if bool((correct & broken).any()) else 0):
            mid = (lo + hi) / 2
            found = attack.attack(network, x, y, mid * scale, criterion=self.criterion, forward_fn=forward).found
            hi, lo = torch.where(found, mid, hi), torch.where(found, lo, mid)
        broken = broken | (hi < max_eps)  # the attack at max_eps missed, a smaller one did not
        value = torch.where(~correct, torch.zeros_like(hi), torch.where(broken, hi, torch.full_like(hi, max_eps)))
        return value, ~correct, correct & ~broken

    def run(self, evaluator: RobustEvaluator) -> dict[str, Any]:
        """Search every sample's breaking eps.

        Args:
            evaluator: the evaluator (its data, attacks and ``eps_scale`` are used).

        Returns:
            ``{"breaking_eps": summary, "sample_eps": [one row per sample]}``.
        """
        name = self.attack or next(iter(evaluator.attacks))
        if name not in evaluator.attacks:
            raise KeyError(
                f"BreakingEps attack {name!r} is not one of the evaluator's attacks {list(evaluator.attacks)}."
            )
        attack = evaluator.attacks[name]
        max_eps = float(self.max_eps if self.max_eps is not None else max(evaluator.eps_list))
        if not max_eps > 0:
            raise ValueError("BreakingEps needs max_eps > 0: give one, or an eps_list with a level above 0.")
        rows: list[dict[str, Any]] = []
        for _, raw, batch in evaluator.prepared_batches():
            network, forward = evaluator.attack_forward(batch)
            value, clean_wrong, unbroken = self.search(
                attack, network, forward, batch[0], batch[1], max_eps, evaluator.scale_for(batch[0])
            )
            names = sample_names(raw, self.name_keys, len(value))
            for i in range(len(value)):
                status = "clean_wrong" if clean_wrong[i] else ("unbroken" if unbroken[i] else "broken")
                rows.append({**names[i], "breaking_eps": float(value[i]), "status": status})
        if dist.is_available() and dist.is_initialized():
            gathered: list[list[dict[str, Any]]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        ordered = sorted(math.inf if r["status"] == "unbroken" else r["breaking_eps"] for r in rows)
        median = float(np.median(ordered)) if ordered else math.nan
        summary = {
            "attack": name,
            "max_eps": max_eps,
            "tolerance": max_eps / 2**self.steps,
            "samples": len(rows),
            "clean_wrong": sum(r["status"] == "clean_wrong" for r in rows),
            "unbroken": sum(r["status"] == "unbroken" for r in rows),
            "median": median if math.isfinite(median) else None,
            "file": "sample_eps.csv",
        }
        return {"breaking_eps": summary, "sample_eps": rows}
