"""Adversarial trainers: one adversarial iteration shared by AMAT (per-sample margins) and SAT (one fixed eps)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, Protocol

import torch
import torch.distributed as dist
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys

from monai_amat.attacks import PGD, AttackResult, check_per_sample, loss_and_correct, map_tensors, to_float32
from monai_amat.keys import AttackEvents, AttackKeys
from monai_amat.utils import is_ddp, plain_tensor

__all__ = ["RobustTrainer", "AMATTrainer", "SATTrainer", "MarginSource"]


class MarginSource(Protocol):
    """What :py:class:`AMATTrainer` needs of its margins (:py:class:`monai_amat.handlers.MarginHandler` has it).

    The engines do not import the handlers: this protocol states the contract instead.
    """

    def attach(self, engine: Any) -> None:
        """Register the per-iteration and per-epoch margin updates on the trainer."""

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """The current margins of the samples with these indices."""

    def start_radius(self, margins: torch.Tensor) -> torch.Tensor:
        """AMAT's random-start radius for these margins."""


class RobustTrainer(SupervisedTrainer):
    """A ``SupervisedTrainer`` whose iteration trains on clean and adversarial inputs.

    Each iteration: a clean pass with the per-sample loss ``L``; a PGD attack with a per-sample budget chosen
    by the subclass; an adversarial pass with loss ``L_adv``; the update with
    ``(1 - beta) * mean(L) + beta * sum(L_adv over clean-correct samples) / B``, then optional gradient-norm
    clipping. The clean term is back-propagated right after the clean pass, so its graph is freed before the
    attack runs: the gradients add up to those of the whole loss, and peak memory stays that of adversarial-only
    training. MONAI's ``IterationEvents`` fire at the same points as in ``SupervisedTrainer``
    (``FORWARD_COMPLETED`` after both passes), and :py:class:`AttackEvents.ATTACK_COMPLETED` after the attack.
    The iteration knows nothing about the task: targets may be tensors or lists of dicts, as long as
    ``loss_function`` (and the criterion) take them.

    Args:
        device: device to train on.
        max_epochs: total number of epochs.
        train_data_loader: the training data; each batch dict carries an integer ``index_key`` per sample
            (required by AMAT, optional for SAT).
        network: the network to train.
        optimizer: its optimizer.
        loss_function: per-sample loss ``loss_function(pred, target) -> Tensor[B]``.
        attack: the PGD attack; None builds ``PGD(loss_function)`` (L2, 20 steps, alpha 4, random start).
        beta: weight of the adversarial term, in ``[0, 1]``.
        criterion: ``criterion(pred, target) -> BoolTensor[B]``, checked on every attack iterate (and on clean
            input when ``clean_criterion``); None finds nothing.
        clean_criterion: apply the criterion to the clean prediction too; False (as the authors' reference code)
            counts every sample as clean-correct.
        grad_clip_norm: clip the gradient norm to this value (the nnU-Net code uses 12); None does not clip.
        bisection_steps: refine the first-wrong noise norm by bisection (see ``PGD.attack``).
        index_key: the batch key holding sample indices.
        skip_non_finite: when a clean or adversarial loss is not finite (NaN, inf), skip the batch (no optimizer
            step, no margin bookkeeping: ``AttackEvents.ATTACK_COMPLETED`` does not fire for it), log a warning
            naming the epoch, iteration and sample indices, and count it in ``engine.state.skipped_batches``. Under
            ``torch.distributed`` every rank skips a batch that any rank skips, so no rank waits for the others'
            gradients. False (default): stop the run with a ``FloatingPointError`` carrying the same names.
        kwargs: any other ``SupervisedTrainer`` argument (``inferer``, ``prepare_batch``, ``train_handlers``,
            ``amp``, ``key_train_metric``, ``decollate``...). ``accumulation_steps`` other than 1 is not supported.

    Raises:
        ValueError: for ``beta`` outside ``[0, 1]``, ``grad_clip_norm <= 0`` or ``accumulation_steps != 1``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Any,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable[[Any, Any], torch.Tensor],
        attack: PGD | None = None,
        beta: float = 0.5,
        criterion: Callable[[Any, Any], torch.Tensor] | None = None,
        clean_criterion: bool = False,
        grad_clip_norm: float | None = None,
        bisection_steps: int = 0,
        index_key: str = AttackKeys.INDEX,
        skip_non_finite: bool = False,
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta!r}.")
        if grad_clip_norm is not None and not grad_clip_norm > 0:
            raise ValueError(f"grad_clip_norm must be > 0 or None, got {grad_clip_norm!r}.")
        if kwargs.get("accumulation_steps", 1) != 1:
            raise ValueError("accumulation_steps other than 1 is not supported by adversarial trainers.")
        if clean_criterion and criterion is None:
            raise ValueError("clean_criterion=True needs a criterion.")
        event_names = list(kwargs.pop("event_names", None) or []) + [AttackEvents]
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            event_names=event_names,
            **kwargs,
        )
        self.attack = PGD(loss_function) if attack is None else attack
        self.beta = float(beta)
        self.criterion = criterion
        self.clean_criterion = clean_criterion
        self.grad_clip_norm = grad_clip_norm
        self.bisection_steps = int(bisection_steps)
        self.index_key = index_key
        self.skip_non_finite = bool(skip_non_finite)
        self.state.skipped_batches = 0

    def budget(self, engine: RobustTrainer, indices: torch.Tensor | None, batch_size: int) -> tuple[Any, Any]:
        """Per-sample noise budget and random-start radius of this batch.

        Args:
            engine: this trainer.
            indices: the batch's sample indices (None when the batch has none).
            batch_size: number of samples.

        Returns:
            ``(eps, start_radius)``: floats or ``(B,)`` tensors; ``start_radius`` None means uniform in the ball.
        """
        raise NotImplementedError

    def sample_indices(self, batchdata: Any, batch_size: int) -> torch.Tensor | None:
        """The batch's sample indices, or None when the batch has none.

        Args:
            batchdata: the batch as the data loader gave it.
            batch_size: number of samples.

        Returns:
            ``(B,)`` int64 tensor on the CPU, or None.

        Raises:
            ValueError: when the index count differs from the batch size.
        """
        if not isinstance(batchdata, dict) or self.index_key not in batchdata:
            return None
        indices = torch.as_tensor(batchdata[self.index_key]).detach().cpu().reshape(-1)
        if indices.numel() != batch_size:
            raise ValueError(f"batch key {self.index_key!r} holds {indices.numel()} indices for {batch_size} samples.")
        return indices.long()

    def _forward_fn(self, engine: RobustTrainer, args: tuple, kwargs: dict) -> Callable[[torch.Tensor], Any]:
        autocast = engine.amp and engine.scaler is not None

        def forward(x: torch.Tensor) -> Any:
            with torch.autocast("cuda", **engine.amp_kwargs) if autocast else nullcontext():
                return engine.inferer(x, engine.network, *args, **kwargs)

        return forward

    def _non_finite(self, engine: RobustTrainer, losses: dict[str, torch.Tensor], indices: Any) -> str | None:
        """A message naming the epoch, iteration and samples whose loss is not finite, or None when all are.

        With ``skip_non_finite`` under ``torch.distributed``, the ranks agree (one all-reduce of a flag): a batch
        skipped on one rank is skipped on all, and the other ranks' message says the loss was on another rank.

        Args:
            engine: this trainer.
            losses: ``{name: (B,) per-sample loss}``.
            indices: the batch's sample indices, or None.

        Returns:
            The message, or None.
        """
        bad = ~torch.stack([torch.isfinite(v.detach()) for v in losses.values()]).all(0)
        any_bad = bool(bad.any())
        where = f"epoch {engine.state.epoch}, iteration {engine.state.iteration}"
        if self.skip_non_finite and dist.is_available() and dist.is_initialized():
            flag = torch.tensor([float(any_bad)], device=bad.device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() > 0 and not any_bad:
                return f"non-finite loss on another rank at {where}."
        if not any_bad:
            return None
        pos = bad.nonzero().flatten().cpu()
        who = f"sample indices {indices[pos].tolist()}" if indices is not None else f"batch positions {pos.tolist()}"
        values = {k: v.detach()[pos.to(v.device)].tolist() for k, v in losses.items()}
        return f"non-finite loss at {where} for {who}: {values}."

    def _iteration(self, engine: RobustTrainer, batchdata: dict[str, torch.Tensor]) -> dict:
        """One adversarial training iteration; returns ``engine.state.output``.

        The stages, each event fired when its stage is done, in ``SupervisedTrainer``'s order with the attack
        inserted: the clean pass (:py:meth:`clean_pass`) -> ``FORWARD_COMPLETED``; the attack and the adversarial
        pass (:py:meth:`attack_pass`) -> ``ATTACK_COMPLETED``; the loss -> ``LOSS_COMPLETED``; its backward ->
        ``BACKWARD_COMPLETED``; the optimizer step (:py:meth:`optimizer_step`) -> ``MODEL_COMPLETED``. A batch with
        a non-finite loss is skipped (``skip_non_finite``) after the adversarial pass, before ``ATTACK_COMPLETED``,
        so no handler records its attack; of its events only ``FORWARD_COMPLETED`` has fired.

        Besides MONAI's ``IMAGE``, ``LABEL``, ``PRED`` (clean) and ``LOSS``, the output holds the
        :py:class:`AttackKeys`: the adversarial image and prediction, the per-sample eps, found flags (and
        whether the start iterate was already wrong), noise norms, clean-correct flags, clean and adversarial losses,
        and the sample indices.

        Raises:
            ValueError: when ``batchdata`` is None or a loss is not one value per sample.
            FloatingPointError: when a loss is not finite (naming the epoch, iteration and sample indices) and
                ``skip_non_finite`` is False.
        """
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        # plain tensors from here on: no loss, criterion or attack reads the metadata, and MetaTensor's per-op
        # dispatch on the labels, which every checked attack iterate touches, cost AMAT several % of an iteration
        inputs, targets = map_tensors((batch[0], batch[1]), plain_tensor)
        args, kwargs = (batch[2], batch[3]) if len(batch) == 4 else ((), {})
        size = inputs.shape[0]
        indices = self.sample_indices(batchdata, size)
        forward = self._forward_fn(engine, args, kwargs)
        out = engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets, AttackKeys.INDEX: indices}

        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        clean, correct, clean_term = self.clean_pass(engine, inputs, targets, forward)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)

        adv = self.attack_pass(engine, inputs, targets, indices, forward, correct)
        adv_term = self.beta * (adv * correct).sum() / size
        out.update(
            {
                Keys.LOSS: clean_term.detach() + adv_term,
                AttackKeys.CLEAN_LOSS: clean.detach(),
                AttackKeys.ADV_LOSS: adv.detach(),
            }
        )
        problem = self._non_finite(engine, {"clean": clean, "adversarial": adv}, indices)
        if problem is not None:
            return self._skip(engine, problem, adv_term)
        engine.fire_event(AttackEvents.ATTACK_COMPLETED)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)

        self._backward(engine, adv_term)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        self.optimizer_step(engine)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def clean_pass(
        self, engine: RobustTrainer, inputs: torch.Tensor, targets: Any, forward: Callable[[torch.Tensor], Any]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The clean forward pass, its per-sample loss and "correct", and the backward of the clean term.

        The clean term's gradient is back-propagated here, to free its graph before the attack (the peak memory of
        adversarial-only SAT); under DDP it only accumulates locally and is all-reduced with the adversarial term's.
        Writes the detached clean prediction to ``engine.state.output``.

        Args:
            engine: this trainer.
            inputs: the clean inputs ``(B, ...)``.
            targets: the batch's targets.
            forward: the forward function from inputs to the network's output.

        Returns:
            ``(clean loss (B,), clean-correct flags (B,), clean term (1 - beta) mean(loss))``.
        """
        size = inputs.shape[0]
        ddp = is_ddp(engine.network)  # compiled (MONAI's ``compile=True``) or not
        with engine.network.no_sync() if ddp and self.beta < 1.0 else nullcontext():
            with torch.set_grad_enabled(self.beta < 1.0):
                pred = forward(inputs)
                criterion = self.criterion if self.clean_criterion else None
                clean, correct = loss_and_correct(
                    engine.loss_function, to_float32(pred), targets, size, criterion, "loss_function"
                )
            if correct is None:
                correct = torch.ones(size, dtype=torch.bool, device=clean.device)
            correct = correct.to(clean.device).bool()
            clean_term = (1.0 - self.beta) * clean.mean()
            if clean_term.requires_grad:
                self._backward(engine, clean_term)
        engine.state.output[Keys.PRED] = map_tensors(pred, torch.Tensor.detach)
        return clean, correct, clean_term

    def attack_pass(
        self,
        engine: RobustTrainer,
        inputs: torch.Tensor,
        targets: Any,
        indices: torch.Tensor | None,
        forward: Callable[[torch.Tensor], Any],
        correct: torch.Tensor,
    ) -> torch.Tensor:
        """The attack at each sample's budget and the adversarial forward pass; writes the attack's outputs.

        Args:
            engine: this trainer.
            inputs: the clean inputs ``(B, ...)``.
            targets: the batch's targets.
            indices: the batch's sample indices, or None.
            forward: the forward function from inputs to the network's output.
            correct: the clean-correct flags ``(B,)``.

        Returns:
            The per-sample adversarial loss ``(B,)``, with its graph.
        """
        size = inputs.shape[0]
        out = engine.state.output
        eps, radius = self.budget(engine, indices, size)
        result: AttackResult = self.attack.attack(
            engine.network,
            inputs,
            targets,
            eps,
            criterion=self.criterion,
            start_radius=radius,
            forward_fn=forward,
            bisection_steps=self.bisection_steps,
        )
        out.update(
            {
                AttackKeys.ADV_IMAGE: result.adv,
                AttackKeys.EPS: torch.as_tensor(eps, dtype=torch.float32).expand(size).clone(),
                AttackKeys.FOUND: result.found,
                AttackKeys.NOISE_NORM: result.noise_norm,
                AttackKeys.BOUNDARY_NORM: result.boundary_norm,
                AttackKeys.START_WRONG: result.start_wrong,
                AttackKeys.CLEAN_CORRECT: correct,
            }
        )
        out[AttackKeys.ADV_PRED] = forward(result.adv)
        return check_per_sample(
            engine.loss_function(to_float32(out[AttackKeys.ADV_PRED]), targets), size, "loss_function"
        )

    def optimizer_step(self, engine: RobustTrainer) -> None:
        """Clip the gradient norm (``grad_clip_norm``) and step the optimizer (through the AMP scaler when on).

        Args:
            engine: this trainer.
        """
        if self.grad_clip_norm is not None:
            if engine.amp and engine.scaler is not None:
                engine.scaler.unscale_(engine.optimizer)
            torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.grad_clip_norm)
        if engine.amp and engine.scaler is not None:
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            engine.optimizer.step()

    def _skip(self, engine: RobustTrainer, problem: str, adv_term: torch.Tensor) -> dict:
        """Skip a batch with a non-finite loss, or raise when ``skip_non_finite`` is False; its output, detached."""
        if not self.skip_non_finite:
            raise FloatingPointError(problem)
        engine.state.skipped_batches += 1
        engine.logger.warning(f"skipped batch {engine.state.skipped_batches} of this run: {problem}")
        if is_ddp(engine.network):  # DDP expects the backward of its synchronised forward: one all-reduce, dropped
            (adv_term * 0.0).backward()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)  # drop the gradients of this batch
        engine.state.output[Keys.LOSS] = engine.state.output[Keys.LOSS].detach()
        return engine.state.output

    @staticmethod
    def _backward(engine: RobustTrainer, term: torch.Tensor) -> None:
        """Accumulate the gradient of one term of the loss (scaled under AMP); one scale serves both terms."""
        (engine.scaler.scale(term) if engine.amp and engine.scaler is not None else term).backward()


class AMATTrainer(RobustTrainer):
    """Adaptive-margin adversarial training: each sample is attacked within its own margin.

    The margins live in a :py:class:`monai_amat.handlers.MarginHandler`, which this trainer attaches first
    (before ``train_handlers``, so statistics handlers see the updated margins) unless it is already attached.
    The random start has radius ``clamp(margin - delta, min=delta)``.

    Example::

        margins = MarginHandler(num_samples=len(train_ds), delta=2.5, output_dir="runs/amat")
        trainer = AMATTrainer(device, 50, loader, net, opt, PerSampleDiceCELoss(), margin_handler=margins,
                              criterion=DiceCriterion(tau=0.8))

    Args:
        margin_handler: holds the per-sample margins.
        args: positional arguments of :py:class:`RobustTrainer`.
        kwargs: keyword arguments of :py:class:`RobustTrainer` (``beta`` defaults to 0.5).
    """

    def __init__(self, *args: Any, margin_handler: MarginSource, **kwargs: Any) -> None:
        handlers = [h for h in kwargs.pop("train_handlers", None) or [] if h is not margin_handler]
        super().__init__(*args, train_handlers=[margin_handler, *handlers], **kwargs)
        self.margin_handler = margin_handler

    def budget(self, engine: RobustTrainer, indices: torch.Tensor | None, batch_size: int) -> tuple[Any, Any]:
        """Margins of the batch's samples as eps, and AMAT's start radius.

        Raises:
            ValueError: when the batch has no sample indices.
        """
        if indices is None:
            raise ValueError(
                f"AMATTrainer needs an integer {self.index_key!r} key in every batch (0..N-1, stable across epochs) "
                "to look up per-sample margins; add it to the datalist with "
                "monai_amat.data.add_sample_index(datalist), or name the key with index_key=..."
            )
        # left on the CPU with the table: the attack checks them there and copies them over without a device wait
        margins = self.margin_handler.lookup(indices)
        return margins, self.margin_handler.start_radius(margins)


class SATTrainer(RobustTrainer):
    """Standard adversarial training: every sample is attacked with the same ``eps``.

    Args:
        eps: the one noise level, ``>= 0``.
        adversarial_only: train on adversarial samples only (``beta = 1``, as the authors' segmentation code);
            False mixes ``(1 - beta)`` clean and ``beta`` adversarial (landmark and detection code).
        start_on_sphere: with a random start, start on the sphere of radius ``eps`` (the authors' SAT); False
            starts uniformly inside the ball.
        args: positional arguments of :py:class:`RobustTrainer`.
        kwargs: keyword arguments of :py:class:`RobustTrainer`.

    Raises:
        ValueError: for a negative ``eps``, or ``adversarial_only`` with a ``beta`` other than 1.
    """

    def __init__(
        self, *args: Any, eps: float, adversarial_only: bool = False, start_on_sphere: bool = True, **kwargs: Any
    ) -> None:
        if not eps >= 0:
            raise ValueError(f"SAT eps must be >= 0, got {eps!r}.")
        if adversarial_only:
            if kwargs.get("beta", 1.0) != 1.0:
                raise ValueError(f"adversarial_only=True means beta=1, got beta={kwargs['beta']!r}.")
            kwargs["beta"] = 1.0
        super().__init__(*args, **kwargs)
        self.eps = float(eps)
        self.start_on_sphere = bool(start_on_sphere)

    def budget(self, engine: RobustTrainer, indices: torch.Tensor | None, batch_size: int) -> tuple[Any, Any]:
        """The fixed eps; the random start on its sphere, or uniform in the ball."""
        return self.eps, self.eps if self.start_on_sphere else None
