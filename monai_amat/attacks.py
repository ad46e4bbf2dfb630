"""Gradient attacks (PGD, Auto-PGD) that ascend any per-sample task loss.

The attacks are task-agnostic: a task contributes a per-sample loss ``loss_fn(pred, target) -> Tensor[B]`` and,
optionally, a criterion ``criterion(pred, target) -> BoolTensor[B]`` that says which samples are still "correct".
A loss with a ``set_progress(fraction)`` method (e.g. :py:class:`monai_amat.losses.SegPGDLoss`) is told, before
every gradient evaluation, how far the attack has gone (0 at the start, towards 1 at the last step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from monai.utils import convert_to_dst_type
from torch import nn

from monai_amat.criteria import LossThresholdCriterion
from monai_amat.utils import is_ddp, map_tensors, plain_tensor

__all__ = [
    "PGD",
    "APGD",
    "AttackResult",
    "per_sample_norm",
    "check_per_sample",
    "loss_and_correct",
    "hands_over",
    "map_tensors",
    "to_float32",
    "voxel_eps_scale",
    "PerVoxelEpsScale",
]

NORMS = ("l2", "linf")
# normalisation layers whose running statistics must not move while an attack runs the network in train mode
_STAT_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def per_sample_norm(x: torch.Tensor, norm: str = "l2") -> torch.Tensor:
    """Norm of every batch item of ``x``.

    Args:
        x: tensor of shape ``(B, ...)``.
        norm: ``"l2"`` or ``"linf"``.

    Returns:
        Tensor of shape ``(B,)``.
    """
    flat = x.detach().flatten(1).float()
    return torch.linalg.vector_norm(flat, ord=2 if norm == "l2" else math.inf, dim=1)


def check_per_sample(loss: torch.Tensor, batch_size: int, name: str = "loss_fn") -> torch.Tensor:
    """Check that ``loss`` holds one value per sample.

    Args:
        loss: the value returned by a per-sample loss.
        batch_size: number of samples in the batch.
        name: how to call the loss in the error message.

    Returns:
        ``loss`` unchanged.

    Raises:
        ValueError: when ``loss`` is not a tensor of shape ``(batch_size,)``.
    """
    if not isinstance(loss, torch.Tensor) or tuple(loss.shape) != (batch_size,):
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"{name} must return one value per sample, shape ({batch_size},), got {shape}; "
            "use reduction='none' and average over all but the batch dimension "
            "(see monai_amat.losses.PerSampleLoss)."
        )
    return loss


def hands_over(loss_fn: Callable[[Any, Any], torch.Tensor], criterion: Any) -> bool:
    """Whether ``criterion`` judges the very components ``loss_fn`` sums, so they are computed once and handed over.

    Args:
        loss_fn: the per-sample loss.
        criterion: the criterion, or None.

    Returns:
        True for a :py:class:`LossThresholdCriterion` built on ``loss_fn.components``.
    """
    return isinstance(criterion, LossThresholdCriterion) and criterion.judges(loss_fn)


def loss_and_correct(
    loss_fn: Callable[[Any, Any], torch.Tensor],
    pred: Any,
    targets: Any,
    batch_size: int,
    criterion: Callable[[Any, Any], torch.Tensor] | None = None,
    name: str = "loss_fn",
    hand_over: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The per-sample loss of a prediction and, with a criterion, which samples are correct.

    A criterion that judges the loss's own components (:py:meth:`LossThresholdCriterion.judges`) gets the components
    the loss has just summed instead of computing them again; any other criterion sees the detached prediction.

    Args:
        loss_fn: the per-sample loss.
        pred: the prediction.
        targets: the targets.
        batch_size: number of samples.
        criterion: ``criterion(pred, target) -> BoolTensor[B]``; None skips it.
        name: how to call the loss in an error message.
        hand_over: :py:func:`hands_over` of ``loss_fn`` and ``criterion``, when the caller has decided it once for
            many calls (an attack's iterates); None decides it here.

    Returns:
        ``(loss (B,), correct (B,) bool or None)``.

    Raises:
        ValueError: when the loss is not one value per sample.
    """
    if hands_over(loss_fn, criterion) if hand_over is None else hand_over:
        parts = loss_fn.components(pred, targets)
        return check_per_sample(loss_fn.total(parts), batch_size, name), criterion.check(parts)
    loss = check_per_sample(loss_fn(pred, targets), batch_size, name)
    return loss, None if criterion is None else criterion(map_tensors(pred, torch.Tensor.detach), targets)


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def to_float32(pred: Any) -> Any:
    """Cast every floating tensor of a (nested) prediction to float32, so losses and input gradients are float32.

    Args:
        pred: a network output (tensor, list/tuple or dict).

    Returns:
        The same structure with float32 floating tensors.
    """
    return map_tensors(pred, lambda t: t.float() if t.is_floating_point() else t)


def voxel_eps_scale(size: Sequence[int], reference_size: Sequence[int]) -> float:
    """The factor that gives an input of ``size`` the per-voxel noise an eps gives an input of ``reference_size``.

    An L2 budget ``eps`` spread over ``n`` voxels gives each about ``eps / sqrt(n)``; the factor is
    ``sqrt(prod(size) / prod(reference_size))``, so ``eps * factor`` on the input has the per-voxel noise of ``eps``
    on the reference (e.g. the paper's 2D slice size, for a 3D patch or volume; channels alike on both sides).

    Args:
        size: the input's spatial size (2D or 3D).
        reference_size: the size the eps values are given for (sizes >= 1).

    Returns:
        The factor; 0 for a size holding 0, which the bundles' ``check_config`` refuses under its config key.
    """
    return math.sqrt(math.prod(size) / math.prod(reference_size))


class PerVoxelEpsScale:
    """An evaluator ``eps_scale`` that depends on the input: :py:func:`voxel_eps_scale` of its spatial size.

    For inputs whose size varies (whole volumes of different depths), so that every input gets the per-voxel noise
    an eps gives an input of ``reference_size``; ``str()`` is the rule, which reports record.

    Args:
        reference_size: the size the eps values are given for (e.g. the paper's slice size).

    Raises:
        ValueError: when ``reference_size`` is empty or holds a value < 1.
    """

    def __init__(self, reference_size: Sequence[int]) -> None:
        self.reference_size = [int(s) for s in reference_size]
        if not self.reference_size or min(self.reference_size) < 1:
            raise ValueError(f"PerVoxelEpsScale: reference_size must be sizes >= 1, got {self.reference_size}.")

    def __call__(self, inputs: torch.Tensor) -> float:
        """The factor for a batch ``(B, C, *spatial)``, whose samples share one size.

        Args:
            inputs: the batch.

        Returns:
            ``voxel_eps_scale(inputs.shape[2:], reference_size)``.
        """
        return voxel_eps_scale(inputs.shape[2:], self.reference_size)

    def __str__(self) -> str:
        return f"sqrt(voxels per channel / {math.prod(self.reference_size)}) per input"


@dataclass
class AttackResult:
    """What :py:meth:`PGD.attack` found, per sample.

    Attributes:
        adv: adversarial inputs, detached, same shape and type as the clean inputs.
        found: ``(B,)`` bool; some iterate made the sample wrong (always False without a criterion).
        noise_norm: ``(B,)`` norm of the final noise ``adv - inputs``.
        boundary_norm: ``(B,)`` noise norm of the first iterate that made the sample wrong, refined by bisection
            when asked; equal to ``noise_norm`` where nothing was found.
        start_wrong: ``(B,)`` bool; the start iterate (the random start, or the clean input without one) already
            made the sample wrong (always False without a criterion).
    """

    adv: torch.Tensor
    found: torch.Tensor
    noise_norm: torch.Tensor
    boundary_norm: torch.Tensor
    start_wrong: torch.Tensor


class PGD:
    """Untargeted projected gradient descent that ascends a per-sample loss, with one ``eps`` per sample.

    Every step ascends the summed per-sample loss (L2: the gradient divided by its per-sample L2 norm; Linf: its
    sign) with the per-sample step ``alpha * eps / steps``, projects the noise back onto the per-sample eps-ball,
    then clamps the values to ``value_range`` when one is given. Gradients are taken only with respect to the
    input: parameters get none, and their ``requires_grad`` flags and the network's train/eval mode are restored
    on return.

    Example::

        attack = PGD(per_sample_loss, norm="l2", steps=20, alpha=4.0)
        adv = attack(network, images, labels, eps=torch.tensor([1.0, 2.5]))

    Args:
        loss_fn: ``loss_fn(pred, target) -> Tensor[B]``, one loss value per sample. ``pred`` is whatever the
            network (or ``forward_fn``) returns, cast to float32: a tensor, a list/tuple or a dict.
        norm: ``"l2"`` or ``"linf"``.
        steps: number of ascent steps; the step size ``alpha * eps / steps`` keeps ``alpha`` meaningful when
            ``steps`` changes.
        alpha: relative step size.
        random_start: start from a random point of the eps-ball (or of the sphere of radius ``start_radius``
            when the call gives one) instead of the clean input.
        value_range: ``(lo, hi)`` to clamp adversarial values to; None (default) does not clamp.
        train_mode: run the network in train mode during the attack, with its normalisation layers frozen in
            eval mode, for networks that only yield losses in train mode (detection). Default: eval mode.
        start_on_sphere: with ``random_start`` and no ``start_radius`` in the call, start on the L2 sphere of
            radius ``eps`` instead of uniformly in the ball, as the authors' evaluation does (``get_noise_init``:
            uniform noise per value, projected to the ball, lies on its surface in high dimension). Linf starts
            uniformly in the cube either way.

    Raises:
        ValueError: for an unknown ``norm``, ``steps < 1``, ``alpha <= 0`` or an empty ``value_range``.
    """

    def __init__(
        self,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        norm: str = "l2",
        steps: int = 20,
        alpha: float = 4.0,
        random_start: bool = True,
        value_range: Sequence[float] | None = None,
        train_mode: bool = False,
        start_on_sphere: bool = False,
    ) -> None:
        norm = str(norm).lower()
        if norm not in NORMS:
            raise ValueError(f"PGD norm must be one of {NORMS}, got {norm!r}.")
        if int(steps) != steps or steps < 1:
            raise ValueError(f"PGD steps must be an integer >= 1, got {steps!r}.")
        if not alpha > 0:
            raise ValueError(f"PGD alpha must be > 0, got {alpha!r}.")
        if value_range is not None and (len(value_range) != 2 or not value_range[0] < value_range[1]):
            raise ValueError(f"PGD value_range must be (lo, hi) with lo < hi, got {value_range!r}.")
        self.loss_fn = loss_fn
        self.norm = norm
        self.steps = int(steps)
        self.alpha = float(alpha)
        self.random_start = bool(random_start)
        self.value_range = None if value_range is None else (float(value_range[0]), float(value_range[1]))
        self.train_mode = bool(train_mode)
        self.start_on_sphere = bool(start_on_sphere)

    def __call__(
        self,
        network: nn.Module,
        inputs: torch.Tensor,
        targets: Any,
        eps: float | torch.Tensor,
        *,
        start_radius: float | torch.Tensor | None = None,
        forward_fn: Callable[[torch.Tensor], Any] | None = None,
    ) -> torch.Tensor:
        """Adversarial inputs within the per-sample eps-ball.

        Args:
            network: the network to attack (its mode and parameter flags are restored on return).
            inputs: clean inputs ``(B, C, spatial...)``; 2D and 3D, plain tensors or MetaTensors.
            targets: whatever ``loss_fn`` takes as target (tensor, list of dicts, ...).
            eps: noise budget, a float or a ``(B,)`` tensor, each ``>= 0``.
            start_radius: radius of the random start per sample (float or ``(B,)``); None: uniform in the ball.
            forward_fn: computes the prediction from the (perturbed) inputs, e.g. an inferer around ``network``;
                default ``network(x)``.

        Returns:
            Detached adversarial inputs of the same shape and type as ``inputs``.
        """
        return self.attack(network, inputs, targets, eps, start_radius=start_radius, forward_fn=forward_fn).adv

    def attack(
        self,
        network: nn.Module,
        inputs: torch.Tensor,
        targets: Any,
        eps: float | torch.Tensor,
        *,
        criterion: Callable[[Any, Any], torch.Tensor] | None = None,
        start_radius: float | torch.Tensor | None = None,
        forward_fn: Callable[[torch.Tensor], Any] | None = None,
        bisection_steps: int = 0,
    ) -> AttackResult:
        """Run the attack and, with a criterion, check every iterate.

        Args:
            network: the network to attack.
            inputs: clean inputs ``(B, ...)``.
            targets: targets for ``loss_fn`` and ``criterion``.
            eps: noise budget, a float or a ``(B,)`` tensor, each ``>= 0``.
            criterion: ``criterion(pred, target) -> BoolTensor[B]``, True where the sample is still correct;
                evaluated on every iterate (the start, each step, and the final one).
            start_radius: radius of the random start per sample; None: uniform in the eps-ball.
            forward_fn: computes the prediction from the inputs; default ``network(x)``.
            bisection_steps: refine the first-wrong noise norm by bisection between the last correct and the
                first wrong iterate (one extra forward pass per step); 0 disables it.

        Returns:
            An :py:class:`AttackResult`.

        Raises:
            ValueError: for a negative or non-finite ``eps``, or a loss that is not one value per sample.
        """
        # plain tensors: MetaTensor's per-op dispatch on the targets would be paid by the loss on every iterate
        x, targets = plain_tensor(inputs).detach(), map_tensors(targets, plain_tensor)
        batch = x.shape[0]
        eps_t = self._per_sample(eps, batch, x, "eps")
        forward = network if forward_fn is None else forward_fn
        track = criterion is not None
        found = torch.zeros(batch, dtype=torch.bool, device=x.device)
        boundary = torch.zeros(batch, device=x.device)
        brackets = (torch.zeros_like(x), torch.zeros_like(x)) if track and bisection_steps > 0 else None
        first_checked: list[torch.Tensor] = []  # ``found`` right after the very first iterate

        hand_over = hands_over(self.loss_fn, criterion)  # decided once, not on every iterate

        def evaluate(adv: torch.Tensor, grad: bool, loss: bool = True) -> tuple[Any, Any]:
            """Forward pass of one iterate: its loss (and input gradient) when asked, the criterion when tracking."""
            adv = adv.detach().requires_grad_(grad)
            value, correct = None, None
            with torch.set_grad_enabled(grad):
                pred = to_float32(forward(adv))
                if loss or grad:
                    value, correct = loss_and_correct(
                        self.loss_fn, pred, targets, batch, criterion, hand_over=hand_over
                    )
            if track:
                if correct is None:
                    correct = criterion(map_tensors(pred, torch.Tensor.detach), targets)
                self._track(correct, adv.detach() - x, found, boundary, brackets)
                if not first_checked:
                    first_checked.append(found.clone())
            gradient = torch.autograd.grad(value.sum(), adv)[0] if grad else None
            return (None if value is None else value.detach()), gradient

        with self._attack_mode(network), torch.enable_grad():
            adv = self._iterate(x, eps_t, start_radius, evaluate, track)
            if brackets is not None:
                with torch.no_grad():
                    boundary = self._bisect(forward, criterion, x, targets, found, boundary, brackets, bisection_steps)

        noise_norm = per_sample_norm(adv - x, self.norm)
        return AttackResult(
            adv=convert_to_dst_type(adv, inputs)[0].detach(),
            found=found,
            noise_norm=noise_norm,
            boundary_norm=torch.where(found, boundary, noise_norm),
            start_wrong=first_checked[0] if first_checked else found,
        )

    def _iterate(
        self,
        x: torch.Tensor,
        eps: torch.Tensor,
        start_radius: float | torch.Tensor | None,
        evaluate: Callable[..., tuple[Any, Any]],
        track: bool,
    ) -> torch.Tensor:
        """The attack's iterates from the start point; returns the adversarial inputs.

        ``evaluate(adv, grad, loss=True) -> (loss, input gradient)`` runs the forward pass of an iterate (and checks
        the criterion when tracking); subclasses change only this method.
        """
        adv = self._clamp(x + self._start(x, eps, start_radius))
        step_size = _view(self.alpha * eps / self.steps, x)
        for step in range(self.steps):
            self._set_progress(step / self.steps)
            _, grad = evaluate(adv, True)
            adv = self._step(x, adv, grad, step_size, eps)
        if track:  # the final iterate: the criterion only
            with torch.no_grad():
                evaluate(adv, False, loss=False)
        return adv

    def evaluate(
        self,
        network: nn.Module,
        inputs: torch.Tensor,
        targets: Any,
        *,
        fn: Callable[[Any, Any], torch.Tensor] | None = None,
        forward_fn: Callable[[torch.Tensor], Any] | None = None,
    ) -> torch.Tensor:
        """A per-sample function of the prediction (the loss, a criterion), with the network in the attack's mode.

        Args:
            network: the network (its mode and parameter flags are restored on return).
            inputs: inputs ``(B, ...)``.
            targets: targets for ``fn``.
            fn: ``fn(pred, target) -> Tensor[B]``; default the attack's loss.
            forward_fn: computes the prediction from the inputs; default ``network(x)``.

        Returns:
            ``(B,)`` detached values, computed without gradients.

        Raises:
            ValueError: for an ``fn`` that does not return one value per sample.
        """
        x, targets = plain_tensor(inputs), map_tensors(targets, plain_tensor)
        forward = network if forward_fn is None else forward_fn
        with self._attack_mode(network), torch.no_grad():
            pred = to_float32(forward(x.detach()))
            value = (self.loss_fn if fn is None else fn)(pred, targets)
            return check_per_sample(torch.as_tensor(value).view(-1), x.shape[0], "fn").detach()

    def random_noise(self, inputs: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
        """Inputs plus random noise of the attack's budget: the baseline an attack of that budget must beat.

        The noise is the attack's random start at full size: on the L2 sphere of radius ``eps`` (Linf: uniform in
        the cube), clamped to ``value_range``.

        Args:
            inputs: clean inputs ``(B, ...)``.
            eps: noise norm, a float or a ``(B,)`` tensor.

        Returns:
            The noisy inputs (a plain tensor).
        """
        x = plain_tensor(inputs).detach()
        eps_t = self._per_sample(eps, x.shape[0], x, "eps")
        return self._clamp(x + self._start(x, eps_t, eps_t, force=True))

    def _set_progress(self, fraction: float) -> None:
        setter = getattr(self.loss_fn, "set_progress", None)
        if setter is not None:
            setter(fraction)

    def describe(self) -> dict[str, Any]:
        """The attack's settings, as reports record them.

        Returns:
            ``{"name", "loss", "norm", "steps", "alpha", "random_start", "start_on_sphere", "value_range"}`` (and
            what a subclass adds); ``loss`` is the class name of the loss.
        """
        return {
            "name": type(self).__name__,
            "loss": type(self.loss_fn).__name__,
            "norm": self.norm,
            "steps": self.steps,
            "alpha": self.alpha,
            "random_start": self.random_start,
            "start_on_sphere": self.start_on_sphere,
            "value_range": self.value_range,
        }

    def _per_sample(self, value: float | torch.Tensor, batch: int, x: torch.Tensor, name: str) -> torch.Tensor:
        # checked where the value lives (a float or the CPU margin table: no wait for the device), then moved
        t = torch.as_tensor(value, dtype=torch.float32).detach()
        if t.dim() == 0:
            t = t.expand(batch)
        if tuple(t.shape) != (batch,):
            raise ValueError(f"PGD {name} must be a float or a tensor of shape ({batch},), got shape {tuple(t.shape)}.")
        bad = (~torch.isfinite(t)) | (t < 0)
        if bad.any():
            raise ValueError(
                f"PGD {name} must be finite and >= 0, got {t[bad].tolist()} at batch positions "
                f"{bad.nonzero().flatten().tolist()}."
            )
        return t.to(device=x.device, dtype=x.dtype)

    def _start(
        self, x: torch.Tensor, eps: torch.Tensor, start_radius: float | torch.Tensor | None, force: bool = False
    ) -> torch.Tensor:
        if not (self.random_start or force):
            return torch.zeros_like(x)
        if start_radius is None:
            radius, on_sphere = eps, self.start_on_sphere
        else:
            radius, on_sphere = self._per_sample(start_radius, x.shape[0], x, "start_radius"), True
        if self.norm == "linf":
            noise = (torch.rand_like(x) * 2 - 1) * _view(radius, x)
        else:
            noise = torch.randn_like(x)
            scale = radius if on_sphere else radius * torch.rand_like(radius)
            noise = noise * _view(scale / per_sample_norm(noise).clamp_min(1e-12).to(x.dtype), x)
        return self._project(noise, eps)

    def _project(self, noise: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        if self.norm == "linf":
            bound = _view(eps, noise)
            return noise.clamp(-bound, bound)
        factor = torch.clamp(eps / per_sample_norm(noise).clamp_min(1e-12).to(noise.dtype), max=1.0)
        return noise * _view(factor, noise)

    def _clamp(self, adv: torch.Tensor) -> torch.Tensor:
        return adv if self.value_range is None else adv.clamp(*self.value_range)

    def _step(
        self, x: torch.Tensor, adv: torch.Tensor, grad: torch.Tensor, step_size: torch.Tensor, eps: torch.Tensor
    ) -> torch.Tensor:
        if self.norm == "linf":
            direction = grad.sign()
        else:
            direction = grad / _view(per_sample_norm(grad).clamp_min(1e-12).to(grad.dtype), grad)
        adv = adv + step_size * direction
        return self._clamp(x + self._project(adv - x, eps)).detach()

    def _track(
        self,
        correct: torch.Tensor,
        noise: torch.Tensor,
        found: torch.Tensor,
        boundary: torch.Tensor,
        brackets: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> None:
        """Record, in place, the first iterate that made each sample wrong (and the last one before it).

        Written with ``torch.where`` rather than boolean indexing, so no step waits for the device.
        """
        correct = correct.to(device=found.device, dtype=torch.bool).view(-1)
        new = ~correct & ~found
        boundary.copy_(torch.where(new, per_sample_norm(noise, self.norm).to(boundary.dtype), boundary))
        if brackets is not None:
            last_correct, first_wrong = brackets
            last_correct.copy_(torch.where(_view(correct & ~found, noise), noise, last_correct))
            first_wrong.copy_(torch.where(_view(new, noise), noise, first_wrong))
        found |= new

    def _bisect(
        self,
        forward: Callable[[torch.Tensor], Any],
        criterion: Callable[[Any, Any], torch.Tensor],
        x: torch.Tensor,
        targets: Any,
        found: torch.Tensor,
        boundary: torch.Tensor,
        brackets: tuple[torch.Tensor, torch.Tensor],
        steps: int,
    ) -> torch.Tensor:
        """Bisect between the last correct and the first wrong noise; return the norm of the wrong end."""
        low, high = brackets
        for _ in range(steps):
            mid = (low + high) / 2
            correct = criterion(to_float32(forward(self._clamp(x + mid))), targets).to(found.device).view(-1)
            move_low = _view(correct & found, x)
            low = torch.where(move_low, mid, low)
            high = torch.where(_view(~correct & found, x), mid, high)
        return torch.where(found, per_sample_norm(high, self.norm).to(boundary.dtype), boundary)

    @contextmanager
    def _attack_mode(self, network: nn.Module) -> Iterator[None]:
        """Freeze parameters and set the attack's mode; restore both, and skip DDP's gradient sync."""
        modes = [(m, m.training) for m in network.modules()]
        flags = [(p, p.requires_grad) for p in network.parameters()]
        try:
            network.train(self.train_mode)
            if self.train_mode:
                for m in network.modules():
                    if isinstance(m, _STAT_LAYERS):
                        m.eval()
            for p, _ in flags:
                p.requires_grad_(False)
            no_sync = network.no_sync() if is_ddp(network) else nullcontext()
            with no_sync:
                yield
        finally:
            for m, mode in modes:
                m.training = mode
            for p, flag in flags:
                p.requires_grad_(flag)


def apgd_checkpoints(steps: int) -> list[int]:
    """The iterations at which Auto-PGD checks its progress (Croce & Hein 2020, section 3.2).

    The paper's ``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` in whole
    iterations, as the authors' code counts them: the first period is ``int(0.22 * steps)``, each next one
    ``int(0.03 * steps)`` shorter, down to ``int(0.06 * steps)`` (each at least 1).

    Args:
        steps: the number of iterations.

    Returns:
        The ascending checkpoints in ``[1, steps]``.
    """
    period, shrink, shortest = (max(int(f * steps), 1) for f in (0.22, 0.03, 0.06))
    points = [period]
    while points[-1] + max(period - shrink, shortest) <= steps:
        period = max(period - shrink, shortest)
        points.append(points[-1] + period)
    return [p for p in points if p <= steps]


class APGD(PGD):
    """Auto-PGD (Croce & Hein 2020) on a per-sample loss, with one ``eps`` per sample.

    Same contract as :py:class:`PGD`; the step size is adapted per sample instead of fixed: it starts at
    ``2 * eps``, steps use momentum ``0.75``, and at the checkpoints of :py:func:`apgd_checkpoints` a sample whose
    loss increased in fewer than ``rho`` of the steps since the last checkpoint, or whose step size and best loss
    both stayed the same, has its step size halved and restarts from its best point. The result is every sample's
    best (highest-loss) iterate over all restarts; restarts after the first start at random in the eps-ball.
    ``steps`` gradient evaluations cost as many forward and backward passes as ``PGD`` with the same ``steps``,
    plus one forward pass for the loss of the last iterate.

    Args:
        loss_fn: ``loss_fn(pred, target) -> Tensor[B]``, one loss value per sample.
        norm: ``"l2"`` or ``"linf"``.
        steps: number of iterations per restart.
        rho: fraction of increasing steps below which the step size is halved at a checkpoint.
        random_start: start the first restart from a random point of the eps-ball instead of the clean input.
        value_range: ``(lo, hi)`` to clamp adversarial values to; None (default) does not clamp.
        restarts: number of runs; each sample keeps its best iterate over all of them.
        train_mode: run the network in train mode with frozen normalisation layers (see :py:class:`PGD`).

    Raises:
        ValueError: for an unknown ``norm``, ``steps < 1``, ``rho`` outside ``(0, 1]`` or ``restarts < 1``.
    """

    momentum = 0.75

    def __init__(
        self,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        norm: str = "l2",
        steps: int = 100,
        rho: float = 0.75,
        random_start: bool = True,
        value_range: Sequence[float] | None = None,
        restarts: int = 1,
        train_mode: bool = False,
    ) -> None:
        super().__init__(loss_fn, norm, steps, 2.0, random_start, value_range, train_mode)
        if not 0 < rho <= 1:
            raise ValueError(f"APGD rho must be in (0, 1], got {rho!r}.")
        if int(restarts) != restarts or restarts < 1:
            raise ValueError(f"APGD restarts must be an integer >= 1, got {restarts!r}.")
        self.rho = float(rho)
        self.restarts = int(restarts)

    def describe(self) -> dict[str, Any]:
        """The attack's settings, as reports record them.

        Returns:
            :py:meth:`PGD.describe` (``alpha`` None: the step size adapts) plus ``rho`` and ``restarts``.
        """
        return {**super().describe(), "alpha": None, "rho": self.rho, "restarts": self.restarts}

    def _iterate(
        self,
        x: torch.Tensor,
        eps: torch.Tensor,
        start_radius: float | torch.Tensor | None,
        evaluate: Callable[..., tuple[Any, Any]],
        track: bool,
    ) -> torch.Tensor:
        """Every restart; each sample's highest-loss iterate over all of them (the criterion sees every iterate)."""
        best_adv, best_loss = x, torch.full((x.shape[0],), -math.inf, device=x.device)
        for restart in range(self.restarts):
            start = self._start(x, eps, start_radius if restart == 0 else None, force=restart > 0)
            adv, loss = self._run(x, self._clamp(x + start), eps, evaluate)
            better = loss > best_loss
            best_loss = torch.where(better, loss, best_loss)
            best_adv = torch.where(_view(better, x), adv, best_adv)
        return best_adv

    def _run(
        self,
        x: torch.Tensor,
        adv: torch.Tensor,
        eps: torch.Tensor,
        evaluate: Callable[..., tuple[Any, Any]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One Auto-PGD run from ``adv``; returns each sample's best iterate and its loss."""
        self._set_progress(0.0)
        loss, grad = evaluate(adv, True)
        best_adv, best_loss, best_grad = adv, loss, grad
        step_size = 2 * eps
        checkpoints = set(apgd_checkpoints(self.steps))
        since, increases = 0, torch.zeros_like(loss)
        last_best, reduced_last = best_loss.clone(), torch.ones_like(loss, dtype=torch.bool)
        prev_adv, prev_loss = adv, loss
        for it in range(1, self.steps + 1):
            self._set_progress(it / self.steps)
            a = 1.0 if it == 1 else self.momentum
            z = self._step(x, adv, grad, _view(step_size, x), eps)
            new = self._clamp(x + self._project(adv + a * (z - adv) + (1 - a) * (adv - prev_adv) - x, eps))
            prev_adv, adv = adv, new.detach()
            loss, grad = evaluate(adv, it < self.steps)
            increases += (loss > prev_loss).to(increases.dtype)
            prev_loss = loss
            better = loss > best_loss
            best_loss = torch.where(better, loss, best_loss)
            best_adv = torch.where(_view(better, x), adv, best_adv)
            if grad is not None:
                best_grad = torch.where(_view(better, x), grad, best_grad)
            since += 1
            if it in checkpoints and it < self.steps:
                stalled = (increases < self.rho * since) | (~reduced_last & (best_loss <= last_best))
                reduced_last, last_best = stalled, best_loss.clone()
                step_size = torch.where(stalled, step_size / 2, step_size)
                adv = torch.where(_view(stalled, x), best_adv, adv)
                grad = torch.where(_view(stalled, x), best_grad, grad)
                since, increases = 0, torch.zeros_like(loss)
        return best_adv, best_loss
