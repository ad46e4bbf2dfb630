"""AMAT's per-sample margin rule as plain tensor code (no Ignite, no distributed code).

Per epoch, every sample seen gets a running estimate of its boundary (starting from its margin), and flags saying
whether it was wrong on clean input and whether an attack iterate made it wrong. At the end of the epoch:

- clean-correct and never made wrong -> the margin grows by ``delta`` (expand);
- clean-correct and made wrong -> the margin becomes the running estimate (refine);
- clean-wrong -> the margin is kept (or reset to ``delta``, an older variant);
- everything is clamped to ``[0, max_margin]``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["ESTIMATES", "margin_update", "start_radius", "MarginTable"]

ESTIMATES = ("final", "first_wrong")


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
        reset_clean_wrong: reset the margins of clean-wrong samples to ``delta`` (older variant) instead of
            keeping them.
        group_name: name of the per-sample group that :py:meth:`record` may be given (e.g. ``"foreground"``); the
            epoch statistics are then also given for the group and the rest (``..._foreground``,
            ``..._no_foreground``).

    Raises:
        ValueError: for ``num_samples < 1``, ``delta <= 0``, ``max_margin < delta`` or an unknown ``estimate``.
    """

    def __init__(
        self,
        num_samples: int,
        delta: float,
        max_margin: float = math.inf,
        estimate: str = "final",
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
        self.num_samples = int(num_samples)
        self.delta = float(delta)
        self.max_margin = float(max_margin)
        self.estimate_from = estimate
        self.reset_clean_wrong = bool(reset_clean_wrong)
        self.group_name = str(group_name)
        self.margins = torch.full((self.num_samples,), self.delta)
        self.begin_epoch()

    def begin_epoch(self) -> None:
        """Start an epoch's bookkeeping: estimates start at the margins, no sample seen yet."""
        self.boundary_estimate = self.margins.clone()
        self.seen = torch.zeros(self.num_samples, dtype=torch.bool)
        self.found = torch.zeros(self.num_samples, dtype=torch.bool)
        self.clean_wrong = torch.zeros(self.num_samples, dtype=torch.bool)
        self.start_wrong = torch.zeros(self.num_samples, dtype=torch.bool)
        self.group = torch.zeros(self.num_samples, dtype=torch.bool)
        self.grouped = torch.zeros(self.num_samples, dtype=torch.bool)

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

        Samples that appear several times in the batch (crops of one item) are reduced first: their flags with
        "any", their norms with the mean. The running estimate is then ``(previous + norm) / 2``.

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
        found = torch.as_tensor(found).detach().cpu().bool().reshape(-1)
        wrong = ~torch.as_tensor(clean_correct).detach().cpu().bool().reshape(-1)
        norm = (noise_norm if self.estimate_from == "final" else boundary_norm).detach().cpu().float().reshape(-1)
        unique, inverse = torch.unique(indices, return_inverse=True)
        count = torch.zeros(len(unique)).index_add_(0, inverse, torch.ones(len(indices)))
        mean_norm = torch.zeros(len(unique)).index_add_(0, inverse, norm) / count
        any_found = torch.zeros(len(unique)).index_add_(0, inverse, found.float()) > 0
        any_wrong = torch.zeros(len(unique)).index_add_(0, inverse, wrong.float()) > 0
        self.boundary_estimate[unique] = (self.boundary_estimate[unique] + mean_norm) / 2
        self.found[unique] |= any_found
        self.clean_wrong[unique] |= any_wrong
        self.seen[unique] = True
        for flags, table in ((start_wrong, self.start_wrong), (group, self.group)):
            if flags is not None:
                flags = torch.as_tensor(flags).detach().cpu().float().reshape(-1)
                table[unique] |= torch.zeros(len(unique)).index_add_(0, inverse, flags) > 0
        if group is not None:
            self.grouped[unique] = True

    def end_epoch(self) -> dict[str, float]:
        """Apply the margin rule to the samples seen this epoch.

        Returns:
            Statistics: margin mean/min/max; the fractions of seen samples expanded (``margin_expanded``), refined
            (``margin_refined``) and made wrong already by the attack's start iterate (``margin_start_wrong``);
            when groups were recorded, the mean margin and these fractions within the group and the rest too
            (suffixes ``_<group_name>`` and ``_no_<group_name>``).
        """
        correct = self.seen & ~self.clean_wrong
        expand = correct & ~self.found
        refine = correct & self.found
        reset = self.seen & self.clean_wrong if self.reset_clean_wrong else None
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
        return {
            "margins": self.margins.clone(),
            "estimate": self.boundary_estimate.clone(),
            "seen": self.seen.clone(),
            "found": self.found.clone(),
            "clean_wrong": self.clean_wrong.clone(),
            "start_wrong": self.start_wrong.clone(),
            "group": self.group.clone(),
            "grouped": self.grouped.clone(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a table saved by :py:meth:`state_dict`.

        Args:
            state: the saved tensors.

        Raises:
            KeyError: when a tensor is missing.
            ValueError: when the saved table has another number of samples.
        """
        missing = [k for k in ("margins", "estimate", "seen", "found", "clean_wrong") if k not in state]
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
        self.seen = torch.as_tensor(state["seen"]).bool().clone()
        self.found = torch.as_tensor(state["found"]).bool().clone()
        self.clean_wrong = torch.as_tensor(state["clean_wrong"]).bool().clone()
        # diagnostics only: checkpoints written before they existed resume with none recorded
        for name in ("start_wrong", "group", "grouped"):
            default = torch.zeros(self.num_samples, dtype=torch.bool)
            setattr(self, name, torch.as_tensor(state.get(name, default)).bool().clone())
