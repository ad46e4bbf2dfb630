"""Robust evaluation: any MONAI metrics under one or several attacks (and their worst case), at every eps of a list."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents, default_prepare_batch
from monai.utils import CommonKeys as Keys

from monai_amat.attacks import PGD
from monai_amat.keys import AttackEvents
from monai_amat.utils import plain_tensor

__all__ = ["EvaluationPass", "RobustEvaluator", "check_eps_list"]


def check_eps_list(eps_list: Sequence[float], name: str = "eps_list") -> list[float]:
    """Validate a list of noise levels: non-empty, each finite and ``>= 0``, strictly ascending.

    Args:
        eps_list: the noise levels.
        name: the config key to name in errors.

    Returns:
        The levels as floats.

    Raises:
        ValueError: naming ``name`` and the bad value.
    """
    values = [float(e) for e in eps_list]
    if not values:
        raise ValueError(f"{name} must hold at least one noise level.")
    bad = [e for e in values if not (e >= 0 and e != float("inf"))]
    if bad:
        raise ValueError(f"{name} values must be finite and >= 0, got {bad} in {values}.")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must be strictly ascending, got {values}.")
    return values


@dataclass(frozen=True)
class EvaluationPass:
    """One run of the metrics over the evaluation data, at one eps under one attack.

    Args:
        eps: the noise level (evaluator units); 0 is the clean input (no attack runs).
        attack: the name of one of the evaluator's attacks, another attack object (e.g. a probe's stronger attack),
            or None: each sample's worst case kept by the earlier passes at this eps.
        keep_worst: its adversarial inputs enter each sample's worst case (the evaluator's own attack passes when
            something reads the worst case).
        reported: its metrics are the reported ones (``engine.state.reported``), which e.g. per-sample writers keep.
    """

    eps: float
    attack: str | PGD | None
    keep_worst: bool = False
    reported: bool = True

    @property
    def name(self) -> str:
        """The attack's name, ``"worst case"`` for the worst-case pass."""
        if self.attack is None:
            return "worst case"
        return self.attack if isinstance(self.attack, str) else type(self.attack).__name__.lower()


class RobustEvaluator(SupervisedEvaluator):
    """A ``SupervisedEvaluator`` that runs its metrics on adversarial inputs, once per eps of ``eps_list``.

    ``run()`` evaluates the whole data set at each eps in turn (eps 0 is the clean input; no attack runs). The
    attack perturbs the prepared inputs before the evaluator's usual forward pass, so inferers, post-transforms,
    metrics and handlers work unchanged (``engine.state.eps`` says which level is running, ``engine.state.attack_name``
    which attack; ``IMAGE`` in the output is the adversarial input). Gradients are enabled for the attack even inside
    a no-grad context. Each run over the data is an :py:class:`EvaluationPass` (``engine.state.evaluation_pass``);
    probes run their own through :py:meth:`evaluate_pass`.

    With several attacks, each eps is evaluated once per attack, then once more on the **worst case**: for every
    sample the adversarial input with the highest ``score_fn`` (the task loss by default) over the attacks. Only the
    worst-case pass has ``engine.state.reported`` True; its metrics are the reported ones. The evaluation data must
    come in the same batches and order on every pass (no shuffling, no random transforms); a batch that differs
    raises an error.

    After the last eps, ``engine.state.robustness`` holds ``{"eps": [...], "eps_scale", "metrics": {name: [value per
    eps]}, "per_attack": {attack: {name: [value per eps]}}, "attacks": {attack: settings}}``, plus what the
    ``probes`` add (e.g. ``"checks"``, ``"breaking_eps"``), and ``AttackEvents.ROBUSTNESS_COMPLETED`` fires
    (see :py:class:`monai_amat.handlers.RobustnessReport`).

    Args:
        device: device to evaluate on.
        val_data_loader: the evaluation data.
        network: the network to evaluate.
        attack: an attack (:py:class:`~monai_amat.attacks.PGD`, :py:class:`~monai_amat.attacks.APGD`), or a mapping
            ``{name: attack}`` of several (all with the same norm); a single attack is named after its class.
        eps_list: ascending noise levels, each ``>= 0``, in the units the report shows (e.g. the paper's).
        eps_scale: the attack's budget is ``eps * eps_scale`` (``> 0``), e.g. to keep the per-pixel noise of the
            paper's eps on smaller inputs; or a callable ``eps_scale(inputs) -> float`` for inputs whose size varies
            (:py:class:`monai_amat.attacks.PerVoxelEpsScale`, whole volumes). ``engine.state.robustness`` records
            the number, or the callable's ``str()``.
        prepare_batch: as in ``SupervisedEvaluator``; the attack perturbs its first item.
        attack_network: the network whose output the attacks' losses take, called directly on the inputs (e.g. a
            detector's ``network``, whose head outputs give its training loss, while the evaluator's ``network`` is
            the detector returning boxes); None attacks the evaluator's own ``network`` through its inferer.
        score_fn: ``score_fn(pred, target) -> Tensor[B]``, higher = worse for the model: picks each sample's worst
            case over the attacks; None uses the first attack's loss.
        probes: objects with ``run(evaluator) -> dict`` (e.g. :py:class:`monai_amat.engines.GradientMaskingChecks`,
            :py:class:`monai_amat.engines.BreakingEps`), run after the last eps in order; what they return is
            merged into ``engine.state.robustness``. A probe with ``needs_worst_case = True`` reads
            :py:meth:`worst_case` of the largest eps.
        kwargs: any other ``SupervisedEvaluator`` argument (``key_val_metric``, ``additional_metrics``,
            ``inferer``, ``postprocessing``, ``val_handlers``, ``amp``...).

    Raises:
        ValueError: for an empty, negative or non-ascending ``eps_list``, ``eps_scale <= 0``, no attack, or
            attacks with different norms.
    """

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: Any,
        network: torch.nn.Module,
        attack: PGD | Mapping[str, PGD],
        eps_list: Sequence[float],
        eps_scale: float | Callable[[torch.Tensor], float] = 1.0,
        prepare_batch: Callable = default_prepare_batch,
        attack_network: torch.nn.Module | None = None,
        score_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        probes: Sequence[Any] = (),
        **kwargs: Any,
    ) -> None:
        event_names = list(kwargs.pop("event_names", None) or []) + [AttackEvents]
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            network=network,
            prepare_batch=prepare_batch,
            event_names=event_names,
            **kwargs,
        )
        self.attacks = dict(attack) if isinstance(attack, Mapping) else {type(attack).__name__.lower(): attack}
        if not self.attacks:
            raise ValueError("RobustEvaluator needs at least one attack.")
        norms = {name: a.norm for name, a in self.attacks.items()}
        if len(set(norms.values())) > 1:
            raise ValueError(f"RobustEvaluator attacks must share one norm, got {norms}.")
        self.attack = next(iter(self.attacks.values()))
        self.eps_list = check_eps_list(eps_list)
        self.eps_scale = eps_scale if callable(eps_scale) else _check_scale(eps_scale)
        self.attack_network = attack_network
        self.score_fn = self.attack.loss_fn if score_fn is None else score_fn
        self.probes = list(probes)
        # each sample's worst case is kept only where something reads it: several attacks, or a probe that asks
        self.keep_worst = len(self.attacks) > 1 or any(getattr(p, "needs_worst_case", False) for p in self.probes)
        self.state.eps = 0.0
        self.state.attack_name = ""
        self.state.reported = True
        self.state.evaluation_pass = None
        self.state.robustness = None
        # per batch index: the clean inputs' checksum, each sample's worst score and adversarial input (CPU)
        self.worst: dict[int, tuple[float, torch.Tensor, torch.Tensor]] = {}

    def attack_forward(self, batch: Sequence[Any]) -> tuple[torch.nn.Module, Callable[[torch.Tensor], Any]]:
        """The network the attacks take gradients through, and the forward function from inputs to its output.

        Args:
            batch: a prepared batch ``(inputs, targets[, args, kwargs])``.

        Returns:
            ``(network, forward)``.
        """
        args, kw = (batch[2], batch[3]) if len(batch) == 4 else ((), {})
        network = self.network if self.attack_network is None else self.attack_network

        def forward(x: torch.Tensor) -> Any:
            with torch.autocast("cuda", **self.amp_kwargs) if self.amp else nullcontext():
                if self.attack_network is not None:
                    return network(x)
                return self.inferer(x, network, *args, **kw)

        return network, forward

    def scale_for(self, inputs: torch.Tensor) -> float:
        """The factor from evaluator eps to the attack's budget on a batch: ``eps_scale``, or its value there.

        Args:
            inputs: the batch's clean inputs.

        Returns:
            The factor.

        Raises:
            ValueError: when a callable ``eps_scale`` gives a value that is not finite and > 0.
        """
        return _check_scale(self.eps_scale(inputs)) if callable(self.eps_scale) else self.eps_scale

    def score(self, batch: Sequence[Any], inputs: torch.Tensor) -> torch.Tensor:
        """Per-sample ``score_fn`` of ``inputs`` (higher = worse for the model).

        Args:
            batch: the prepared batch the inputs belong to (its targets are used).
            inputs: clean or adversarial inputs ``(B, ...)``.

        Returns:
            ``(B,)`` scores.
        """
        network, forward = self.attack_forward(batch)
        return self.attack.evaluate(network, inputs, batch[1], fn=self.score_fn, forward_fn=forward)

    def prepared_batches(self) -> Iterator[tuple[int, Any, Sequence[Any]]]:
        """The evaluation data, prepared on the evaluator's device, outside any engine run.

        Yields:
            ``(batch index, raw batch, prepared batch)``.
        """
        for index, batchdata in enumerate(self.data_loader):
            yield (
                index,
                batchdata,
                self.prepare_batch(batchdata, self.state.device, self.non_blocking, **self.to_kwargs),
            )

    def perturb(self, index: int, batch: Sequence[Any]) -> torch.Tensor:
        """The inputs of a prepared batch under the current pass: clean, attacked, or the kept worst case.

        Args:
            index: the batch index in the data loader's order.
            batch: the prepared batch ``(inputs, targets[, args, kwargs])``.

        Returns:
            The inputs the network sees in this pass.
        """
        evaluation = self.state.evaluation_pass
        if evaluation.eps == 0:
            return batch[0]
        if evaluation.attack is None:
            return self.worst_case(index, batch[0])[1].to(batch[0].device)
        network, forward = self.attack_forward(batch)
        attack = self.attacks[evaluation.attack] if isinstance(evaluation.attack, str) else evaluation.attack
        adv = attack(network, batch[0], batch[1], evaluation.eps * self.scale_for(batch[0]), forward_fn=forward)
        if evaluation.keep_worst:
            self._keep_worst(index, batch, adv)
        return adv

    def _iteration(self, engine: RobustEvaluator, batchdata: dict[str, torch.Tensor]) -> dict:
        """One evaluation iteration of the current pass; returns ``engine.state.output``.

        As ``SupervisedEvaluator``'s, with the inputs perturbed (:py:meth:`perturb`) between preparing the batch and
        the forward pass: ``IMAGE`` in the output is what the network saw.

        Raises:
            ValueError: when ``batchdata`` is None.
            RuntimeError: on a worst-case pass, when the batch was not attacked or differs from the one that was.
        """
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        targets = batch[1]
        args, kwargs = (batch[2], batch[3]) if len(batch) == 4 else ((), {})
        inputs = self.perturb((engine.state.iteration - 1) % engine.state.epoch_length, batch)
        if self.compile:  # torch.compile does not take MetaTensors (MONAI converts them around the forward pass)
            inputs = plain_tensor(inputs)
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        with engine.mode(engine.network):
            with torch.autocast("cuda", **engine.amp_kwargs) if engine.amp else nullcontext():
                engine.state.output[Keys.PRED] = engine.inferer(inputs, engine.network, *args, **kwargs)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def worst_case(self, index: int, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The worst case kept for a batch at the last eps evaluated: per-sample scores and adversarial inputs (CPU).

        Args:
            index: the batch index in the data loader's order.
            inputs: the batch's clean inputs, to check that it is the same batch.

        Returns:
            ``(scores (B,), adversarial inputs)``.

        Raises:
            RuntimeError: when the batch was not attacked, or differs from the one that was.
        """
        if index not in self.worst:
            raise RuntimeError(f"RobustEvaluator: batch {index} was not attacked; the data loader gave more batches.")
        checksum, scores, adv = self.worst[index]
        if adv.shape != inputs.shape or not math.isclose(checksum, _checksum(inputs), rel_tol=1e-6, abs_tol=1e-6):
            raise RuntimeError(
                f"RobustEvaluator: batch {index} differs between passes; the evaluation data loader must give the same "
                "batches in the same order every time (shuffle=False, no random transforms)."
            )
        return scores, adv

    def _keep_worst(self, index: int, batch: Sequence[Any], adv: torch.Tensor) -> None:
        scores = self.score(batch, adv).cpu()
        adv = adv.detach().cpu()
        if index in self.worst:
            old_scores, old_adv = self.worst_case(index, batch[0])
            better = scores > old_scores
            scores = torch.where(better, scores, old_scores)
            adv = torch.where(better.view(-1, *[1] * (adv.dim() - 1)), adv, old_adv)
        self.worst[index] = (_checksum(batch[0]), scores, adv)

    def evaluate_pass(self, evaluation: EvaluationPass, global_epoch: int = 1) -> dict[str, float]:
        """Run the metrics once over the data: the one way to run a pass, for :py:meth:`run` and the probes alike.

        Args:
            evaluation: the pass.
            global_epoch: as in ``SupervisedEvaluator.run``.

        Returns:
            ``{metric name: value}``.
        """
        self.state.evaluation_pass = evaluation
        self.state.eps, self.state.attack_name, self.state.reported = (
            float(evaluation.eps),
            evaluation.name,
            evaluation.reported,
        )
        super().run(global_epoch)
        return {name: float(torch.as_tensor(v).float().mean()) for name, v in self.state.metrics.items()}

    def run(self, global_epoch: int = 1) -> None:  # type: ignore[override]
        """Evaluate at every eps (each attack, then the worst case), run the probes, fire ``ROBUSTNESS_COMPLETED``.

        Args:
            global_epoch: the training epoch this evaluation belongs to (as in ``SupervisedEvaluator``).
        """
        results: dict[str, list[float]] = {}
        per_attack: dict[str, dict[str, list[float]]] = {name: {} for name in self.attacks}
        single = len(self.attacks) == 1
        # the passes are noise levels, not epochs: no "best" key metric across them (MONAI's Workflow would log a
        # new best at eps 0 and StatsHandler repeat it after every pass)
        key_metric_name, self.state.key_metric_name = self.state.key_metric_name, None
        try:
            for eps in self.eps_list:
                self.worst = {}
                if eps == 0:  # the clean input: every attack's value
                    values = self.evaluate_pass(EvaluationPass(eps, next(iter(self.attacks))), global_epoch)
                    attacked = dict.fromkeys(self.attacks, values)
                else:
                    attacked = {
                        name: self.evaluate_pass(EvaluationPass(eps, name, self.keep_worst, single), global_epoch)
                        for name in self.attacks
                    }
                    worst = EvaluationPass(eps, None)
                    values = next(iter(attacked.values())) if single else self.evaluate_pass(worst, global_epoch)
                for name, attack_values in attacked.items():
                    for metric, value in attack_values.items():
                        per_attack[name].setdefault(metric, []).append(value)
                for metric, value in values.items():
                    results.setdefault(metric, []).append(value)
            self.state.robustness = {
                "eps": list(self.eps_list),
                "eps_scale": str(self.eps_scale) if callable(self.eps_scale) else self.eps_scale,
                "metrics": results,
                "per_attack": per_attack,
                "attacks": {name: a.describe() for name, a in self.attacks.items()},
            }
            for probe in self.probes:
                self.state.robustness.update(probe.run(self))
        finally:
            self.state.key_metric_name = key_metric_name
        self.state.eps, self.state.attack_name, self.state.reported = 0.0, "", True
        self.state.evaluation_pass = None
        self.fire_event(AttackEvents.ROBUSTNESS_COMPLETED)


def _check_scale(value: Any) -> float:
    """``value`` as a float (Python, NumPy or 0-d tensor scalars), refused unless finite and > 0."""
    try:
        scale = None if isinstance(value, bool) else float(value)
    except (TypeError, ValueError, RuntimeError):
        scale = None
    if scale is None or not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"eps_scale must be finite and > 0, got {value!r}.")
    return scale


def _checksum(x: torch.Tensor) -> float:
    """A cheap fingerprint of a batch that changes when samples are reordered, flipped or rotated."""
    flat = x.detach().double().flatten(1)
    weights = torch.linspace(1.0, 2.0, flat.shape[1], dtype=flat.dtype, device=flat.device)
    order = torch.arange(1, flat.shape[0] + 1, dtype=flat.dtype, device=flat.device)
    return float(((flat * weights).sum(1) * order).sum()) + float(x.shape[0])
