"""Robust evaluation: any MONAI metrics under a PGD attack, at every eps of a list."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from monai.engines import SupervisedEvaluator
from monai.engines.utils import default_prepare_batch

from monai_amat.attacks import PGD
from monai_amat.engines.utils import AdversarialEvents

__all__ = ["RobustEvaluator", "check_eps_list"]


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


class RobustEvaluator(SupervisedEvaluator):
    """A ``SupervisedEvaluator`` that runs its metrics on adversarial inputs, once per eps of ``eps_list``.

    ``run()`` evaluates the whole data set at each eps in turn (eps 0 is the clean input; no attack runs). The
    attack perturbs the prepared inputs before the evaluator's usual forward pass, so inferers, post-transforms,
    metrics and handlers work unchanged (``engine.state.eps`` says which level is running; ``IMAGE`` in the
    output is the adversarial input). Gradients are enabled for the attack even inside a no-grad context. After
    the last eps, ``engine.state.robustness`` holds ``{"eps": [...], "eps_scale", "metrics": {name: [value per
    eps]}}`` and ``AdversarialEvents.ROBUSTNESS_COMPLETED`` fires (see
    :py:class:`monai_amat.handlers.RobustnessReport`).

    Args:
        device: device to evaluate on.
        val_data_loader: the evaluation data.
        network: the network to evaluate.
        attack: the PGD attack (its loss must take the evaluator's targets).
        eps_list: ascending noise levels, each ``>= 0``, in the units the report shows (e.g. the paper's).
        eps_scale: the attack's budget is ``eps * eps_scale`` (``> 0``), e.g. to keep the per-pixel noise of the
            paper's eps on smaller inputs; ``engine.state.robustness`` records it.
        prepare_batch: as in ``SupervisedEvaluator``; the attack perturbs its first item.
        attack_network: the network whose output the attack's loss takes, called directly on the inputs (e.g. a
            detector's ``network``, whose head outputs give its training loss, while the evaluator's ``network`` is
            the detector returning boxes); None attacks the evaluator's own ``network`` through its inferer.
        kwargs: any other ``SupervisedEvaluator`` argument (``key_val_metric``, ``additional_metrics``,
            ``inferer``, ``postprocessing``, ``val_handlers``, ``amp``...).

    Raises:
        ValueError: for an empty, negative or non-ascending ``eps_list``, or ``eps_scale <= 0``.
    """

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: Any,
        network: torch.nn.Module,
        attack: PGD,
        eps_list: Sequence[float],
        eps_scale: float = 1.0,
        prepare_batch: Callable = default_prepare_batch,
        attack_network: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        event_names = list(kwargs.pop("event_names", None) or []) + [AdversarialEvents]
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            network=network,
            prepare_batch=self._attacked_batch,
            event_names=event_names,
            **kwargs,
        )
        self.attack = attack
        self.eps_list = check_eps_list(eps_list)
        if not (eps_scale > 0 and math.isfinite(eps_scale)):
            raise ValueError(f"eps_scale must be finite and > 0, got {eps_scale!r}.")
        self.eps_scale = float(eps_scale)
        self.clean_prepare_batch = prepare_batch
        self.attack_network = attack_network
        self.state.eps = 0.0
        self.state.robustness = None

    def _attacked_batch(self, batchdata: Any, device: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
        batch = self.clean_prepare_batch(batchdata, device, non_blocking, **kwargs)
        if self.state.eps == 0:
            return batch
        args, kw = (batch[2], batch[3]) if len(batch) == 4 else ((), {})

        network = self.network if self.attack_network is None else self.attack_network

        def forward(x: torch.Tensor) -> Any:
            with torch.autocast("cuda", **self.amp_kwargs) if self.amp else nullcontext():
                if self.attack_network is not None:
                    return network(x)
                return self.inferer(x, network, *args, **kw)

        adv = self.attack(network, batch[0], batch[1], self.state.eps * self.eps_scale, forward_fn=forward)
        return (adv, *batch[1:])

    def run(self, global_epoch: int = 1) -> None:  # type: ignore[override]
        """Evaluate at every eps, then fire ``ROBUSTNESS_COMPLETED``.

        Args:
            global_epoch: the training epoch this evaluation belongs to (as in ``SupervisedEvaluator``).
        """
        results: dict[str, list[float]] = {}
        for eps in self.eps_list:
            self.state.eps = eps
            super().run(global_epoch)
            for name, value in self.state.metrics.items():
                results.setdefault(name, []).append(float(torch.as_tensor(value).float().mean()))
        self.state.eps = 0.0
        self.state.robustness = {"eps": list(self.eps_list), "eps_scale": self.eps_scale, "metrics": results}
        self.fire_event(AdversarialEvents.ROBUSTNESS_COMPLETED)
