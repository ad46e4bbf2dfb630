"""AMAT's per-sample margin rule as plain tensor code (no Ignite, no distributed code).

The rule of the authors' code (``AMAT_update_margin`` and ``run_AMAT_iteration`` of their nnU-Net fork; the landmark
and YOLOv5 scripts differ only where the switches below say). Per epoch, every sample seen gets two flags, each set
when **any** of its appearances (batches drawn with replacement, crops of one item) had it: "survived" (no attack
iterate made it wrong) and "clean-correct" (the criterion on clean input); and a running estimate of its boundary,
starting from its margin and averaged with the final noise norm of each clean-correct appearance. At the end of the
epoch:

- clean-correct and survived -> the margin grows by ``delta`` (expand);
- clean-correct and never survived -> the margin becomes the running estimate (refine), unless refining is off
  (the authors' landmark script), in which case it is kept;
- never clean-correct -> the margin is kept (or reset to ``delta``, an older variant);
- everything is clamped to ``[0, max_margin]``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["ESTIMATES", "margin_update", "start_radius", "MarginTable"]

ESTIMATES = ("final", "first_wrong")
# the per-epoch bookkeeping tensors of a MarginTable's state, beside its margins
BOOKKEEPING = ("estimate", "seen", "survived", "clean_correct", "estimated", "start_wrong", "group", "grouped")


def margin_update(
    margins: torch.Tensor,
    expand: torch.Tensor,
    refine: torch.Tensor,
    estimate: torch.Tensor,
    delta: float,
    max_margin: float = math.inf,
    reset: torch.Tensor | None = None,
) -> torch.Tensor:
    """The end-of-epoch margin update of AMAT.

    Args:
        margins: ``(N,)`` current margins.
        expand: ``(N,)`` bool, samples whose margin grows by ``delta``.
        refine: ``(N,)`` bool, samples whose margin becomes ``estimate`` (must not overlap ``expand``).
        estimate: ``(N,)`` boundary estimates.
        delta: the margin step.
        max_margin: upper bound of the margins (may be infinite).
        reset: ``(N,)`` bool, samples whose margin goes back to ``delta``; None resets nothing.

    Returns:
        The new ``(N,)`` margins, clamped to ``[0, max_margin]``.
    """
    new = torch.where(expand, margins + delta, margins)
    new = torch.where(refine, estimate.to(new.dtype), new)
    if reset is not None:
        new = torch.where(reset, torch.full_like(new, delta), new)
    return new.clamp(min=0.0, max=max_margin)


def start_radius(margins: torch.Tensor, delta: float) -> torch.Tensor:
    """Radius of AMAT's random start: ``clamp(margin - delta, min=delta)``.

    Args:
        margins: per-sample margins.
        delta: the margin step.

    Returns:
        Per-sample start radii.
    """
    return (margins - delta).clamp(min=delta)


class MarginTable:
    """One margin per training sample, with the bookkeeping of the current epoch.

    Args:
        num_samples: number of training samples ``N``; sample indices are ``0..N-1``.
        delta: initial margin and margin step, ``> 0``.
        max_margin: upper bound of the margins, ``>= delta`` (``math.inf`` for none).
        estimate: ``"final"`` (the authors' code): the boundary estimate is the running mean of the final
            noise norms; ``"first_wrong"``: the running mean of the noise norm of the first iterate that made
            the sample wrong (refined by bisection when the attack does it).
        refine: move the margins of clean-correct samples that no attack survived to their boundary estimate (the
            authors' segmentation and detection code); False keeps them (the authors' landmark script).
        floor: lower bound of the running boundary estimate, applied at every step of the running mean as the
            authors' detection code does (``torch.max((E_new + temp) / 2, bottom)`` with ``bottom = delta``);
            0 for none. Must lie in ``[0, max_margin]``.
        reset_clean_wrong: reset the margins of samples never clean-correct to ``delta`` (older variant) instead
            of keeping them.
        group_name: name of the per-sample group that :py:meth:`record` may be given (e.g. ``"foreground"``); the
            epoch statistics are then also given for the group and the rest (``..._foreground``,
            ``..._no_foreground``).

    Raises:
        ValueError: for ``num_samples < 1``, ``delta <= 0``, ``max_margin < delta``, an unknown ``estimate`` or a
            ``floor`` outside ``[0, max_margin]``.
    """

    def __init__(
        self,
        num_samples: int,
        delta: float,
        max_margin: float = math.inf,
        estimate: str = "final",
        refine: bool = True,
        floor: float = 0.0,
        reset_clean_wrong: bool = False,
        group_name: str = "group",
    ) -> None:
        if int(num_samples) != num_samples or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}.")
        if not (delta > 0 and math.isfinite(delta)):
            raise ValueError(f"delta must be finite and > 0, got {delta!r}.")
        if max_margin is None or not max_margin >= delta:
            raise ValueError(f"max_margin must be >= delta ({delta}), got {max_margin!r}.")
        if estimate not in ESTIMATES:
            raise ValueError(f"estimate must be one of {ESTIMATES}, got {estimate!r}.")
        if floor is None or not 0 <= floor <= max_margin:
            raise ValueError(f"floor must lie in [0, max_margin = {max_margin}], got {floor!r}.")
        self.num_samples = int(num_samples)
        self.delta = float(delta)
        self.max_margin = float(max_margin)
        self.estimate_from = estimate
        self.refine = bool(refine)
        self.floor = float(floor)
        self.reset_clean_wrong = bool(reset_clean_wrong)
        self.group_name = str(group_name)
        self.margins = torch.full((self.num_samples,), self.delta)
        self.begin_epoch()

    def begin_epoch(self) -> None:
        """Start an epoch's bookkeeping: estimates start at the margins, no sample seen yet."""
        self.boundary_estimate = self.margins.clone()
        flags = {name: torch.zeros(self.num_samples, dtype=torch.bool) for name in BOOKKEEPING[1:]}
        self.seen, self.survived, self.clean_correct, self.estimated = (flags[k] for k in BOOKKEEPING[1:5])
        self.start_wrong, self.group, self.grouped = (flags[k] for k in BOOKKEEPING[5:])

    def check_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Validate sample indices against the table.

        Args:
            indices: sample indices of a batch.

        Returns:
            The indices as a flat CPU ``int64`` tensor.

        Raises:
            ValueError: for non-integer indices or indices outside ``0..N-1``.
        """
        indices = torch.as_tensor(indices).detach().cpu().reshape(-1)
        if indices.is_floating_point() and not torch.equal(indices, indices.round()):
            raise ValueError(f"sample indices must be integers, got {indices.tolist()}.")
        indices = indices.long()
        bad = (indices < 0) | (indices >= self.num_samples)
        if bad.any():
            raise ValueError(
                f"sample index {indices[bad].tolist()} outside the margin table of {self.num_samples} samples "
                f"(indices must be 0..{self.num_samples - 1}); is num_samples the size of the training set?"
            )
        return indices

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Margins of the given samples.

        Args:
            indices: sample indices.

        Returns:
            Their margins, as a ``(B,)`` float tensor on the CPU.
        """
        return self.margins[self.check_indices(indices)]

    def record(
        self,
        indices: torch.Tensor,
        clean_correct: torch.Tensor,
        found: torch.Tensor,
        noise_norm: torch.Tensor,
        boundary_norm: torch.Tensor,
        start_wrong: torch.Tensor | None = None,
        group: torch.Tensor | None = None,
    ) -> None:
        """Record one batch's attack results.

        A sample's flags are set when any appearance has them: "survived" where ``found`` is False, "clean-correct"
        where ``clean_correct`` is True. Its running estimate becomes ``max((previous + norm) / 2, floor)``, with
        ``norm`` the mean noise norm of its clean-correct appearances in this batch (several appear when crops of
        one item share it; the authors' code keeps one of them, arbitrarily); a batch with none leaves it.

        Args:
            indices: ``(B,)`` sample indices.
            clean_correct: ``(B,)`` bool, the criterion on clean input.
            found: ``(B,)`` bool, some attack iterate made the sample wrong.
            noise_norm: ``(B,)`` norm of the final noise.
            boundary_norm: ``(B,)`` noise norm of the first wrong iterate, equal to ``noise_norm`` where no
                iterate made the sample wrong (as :py:class:`monai_amat.attacks.AttackResult` gives it).
            start_wrong: ``(B,)`` bool, the attack's start iterate already made the sample wrong (diagnostics only).
            group: ``(B,)`` bool, the sample belongs to the group named ``group_name`` (diagnostics only).
        """
        indices = self.check_indices(indices)
        unique, inverse = torch.unique(indices, return_inverse=True)

        def any_of(flags: torch.Tensor) -> torch.Tensor:
            flags = torch.as_tensor(flags).detach().cpu().float().reshape(-1)
            return torch.zeros(len(unique)).index_add_(0, inverse, flags) > 0

        correct = torch.as_tensor(clean_correct).detach().cpu().bool().reshape(-1)
        norm = (noise_norm if self.estimate_from == "final" else boundary_norm).detach().cpu().float().reshape(-1)
        count = torch.zeros(len(unique)).index_add_(0, inverse, correct.float())
        total = torch.zeros(len(unique)).index_add_(0, inverse, torch.where(correct, norm, 0.0))
        has = count > 0
        rows = unique[has]
        estimate = (self.boundary_estimate[rows] + total[has] / count[has]) / 2
        self.boundary_estimate[rows] = estimate.clamp(min=self.floor)
        self.estimated[rows] = True
        self.seen[unique] = True
        self.survived[unique] |= any_of(~torch.as_tensor(found).detach().cpu().bool())
        self.clean_correct[unique] |= has
        if start_wrong is not None:
            self.start_wrong[unique] |= any_of(start_wrong)
        if group is not None:
            self.group[unique] |= any_of(group)
            self.grouped[unique] = True

    def end_epoch(self) -> dict[str, float]:
        """Apply the margin rule to the samples seen this epoch.

        Returns:
            Statistics: margin mean/min/max; the fractions of seen samples expanded (``margin_expanded``), refined
            (``margin_refined``) and made wrong already by the attack's start iterate (``margin_start_wrong``);
            when groups were recorded, the mean margin and these fractions within the group and the rest too
            (suffixes ``_<group_name>`` and ``_no_<group_name>``).
        """
        correct = self.seen & self.clean_correct
        expand = correct & self.survived
        refine = correct & ~self.survived if self.refine else torch.zeros_like(correct)
        reset = self.seen & ~self.clean_correct if self.reset_clean_wrong else None
        self.margins = margin_update(
            self.margins, expand, refine, self.boundary_estimate, self.delta, self.max_margin, reset
        )
        stats = {
            "margin_mean": float(self.margins.mean()),
            "margin_min": float(self.margins.min()),
            "margin_max": float(self.margins.max()),
        }
        subsets = {"": self.seen}
        if (self.seen & self.grouped).any():
            in_group = self.seen & self.grouped & self.group
            subsets[f"_{self.group_name}"] = in_group
            subsets[f"_no_{self.group_name}"] = self.seen & self.grouped & ~self.group
        for suffix, subset in subsets.items():
            count = max(int(subset.sum()), 1)
            if suffix:
                stats[f"margin_mean{suffix}"] = float(self.margins[subset].mean()) if subset.any() else 0.0
            stats[f"margin_expanded{suffix}"] = int((expand & subset).sum()) / count
            stats[f"margin_refined{suffix}"] = int((refine & subset).sum()) / count
            stats[f"margin_start_wrong{suffix}"] = int((self.start_wrong & subset).sum()) / count
        return stats

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only, so checkpoints load with ``weights_only=True``."""
        tables = (self.boundary_estimate, self.seen, self.survived, self.clean_correct, self.estimated)
        tables += (self.start_wrong, self.group, self.grouped)
        return {"margins": self.margins.clone(), **{k: v.clone() for k, v in zip(BOOKKEEPING, tables)}}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a table saved by :py:meth:`state_dict`.

        Args:
            state: the saved tensors.

        Raises:
            KeyError: when a tensor is missing (named in the message).
            ValueError: when the saved table has another number of samples.
        """
        missing = [k for k in ("margins", *BOOKKEEPING) if k not in state]
        if missing:
            raise KeyError(f"margin state is missing {missing}.")
        size = int(torch.as_tensor(state["margins"]).numel())
        if size != self.num_samples:
            raise ValueError(
                f"the checkpoint holds margins for {size} samples but this table has {self.num_samples}: "
                "it comes from another data set (or another size of it)."
            )
        self.margins = torch.as_tensor(state["margins"]).float().clone()
        self.boundary_estimate = torch.as_tensor(state["estimate"]).float().clone()
        for name in BOOKKEEPING[1:]:
            setattr(self, name, torch.as_tensor(state[name]).bool().clone())
