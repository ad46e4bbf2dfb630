"""Loss-defined "correct": the criteria AMAT checks on every attack iterate, and their calibration.

A criterion is a callable ``criterion(pred, target) -> BoolTensor[B]``, True where a sample is still correct.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from monai_amat.losses import ComponentLoss
from monai_amat.utils import read_json, write_json

__all__ = [
    "channel_argmax",
    "hard_dice",
    "label_indices",
    "holds_every_class",
    "DiceCriterion",
    "DiceWorstCaseScore",
    "LossThresholdCriterion",
    "huber_location_scale",
    "CALIBRATION_STATISTICS",
    "calibrate_thresholds",
    "calibrate_dice_tau",
    "save_thresholds",
    "load_thresholds",
]


def _first(pred: Any) -> torch.Tensor:
    """The full-resolution output of a network that may return several (deep supervision)."""
    while isinstance(pred, (list, tuple)):
        pred = pred[0]
    return pred


def channel_argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(1)`` (first maximum on ties), by a running maximum over the channels.

    On the CPU ``argmax`` over a short channel dimension is ~10-50x slower than this loop, and the criterion runs
    on every attack iterate.

    Args:
        logits: ``(B, C, spatial...)``.

    Returns:
        ``(B, spatial...)`` int64 class indices.
    """
    best = logits[:, 0]
    index = torch.zeros_like(best, dtype=torch.long)
    for c in range(1, logits.shape[1]):
        better = logits[:, c] > best
        index = torch.where(better, c, index)
        best = torch.where(better, logits[:, c], best)
    return index


def hard_dice(pred: Any, target: torch.Tensor, include_background: bool = False, smooth: float = 0.0) -> torch.Tensor:
    """Hard Dice per sample and class, ``(2|P∩Y| + s) / (|P| + |Y| + s + 1e-8)``.

    With ``smooth=0`` (default) this is the authors' ``2tp / (2tp + fp + fn + 1e-8)``: a class absent from both
    the prediction and the label scores 0. ``smooth=1`` is the smoothed variant, where such a class scores 1.

    Args:
        pred: logits ``(B, C, spatial...)`` (argmax over C; one channel: sigmoid > 0.5), or deep-supervision
            outputs (a list/tuple, or a tensor stacked on dim 1) whose first item is that.
        target: labels ``(B, 1, spatial...)`` or one-hot ``(B, C, spatial...)``.
        include_background: keep class 0.
        smooth: the smoothing term.

    Returns:
        ``(B, C')`` Dice values, ``C'`` the classes kept.

    Raises:
        ValueError: when the spatial shapes of ``pred`` and ``target`` differ.
    """
    logits = _first(pred).detach()
    if logits.dim() == target.dim() + 1:  # deep-supervision outputs stacked on dim 1 (DynUNet in train mode)
        logits = logits[:, 0]
    if logits.shape[2:] != target.shape[2:] or logits.shape[0] != target.shape[0]:
        raise ValueError(f"prediction shape {tuple(logits.shape)} does not match target shape {tuple(target.shape)}.")
    num_classes = max(logits.shape[1], 2)
    labels = (logits[:, 0] > 0).long() if logits.shape[1] == 1 else channel_argmax(logits)
    truth = label_indices(target)
    dice = []
    # boolean masks per class: cheaper than one-hot tensors, and this runs on every attack iterate
    for c in range(0 if include_background else 1, num_classes):
        p, y = (labels == c).flatten(1), (truth == c).flatten(1)
        inter = (p & y).sum(1).float()
        dice.append((2 * inter + smooth) / ((p.sum(1) + y.sum(1)).float() + smooth + 1e-8))
    return torch.stack(dice, dim=1)


def label_indices(target: torch.Tensor) -> torch.Tensor:
    """Class indices of a label map.

    Args:
        target: labels ``(B, 1, spatial...)`` or one-hot ``(B, C, spatial...)``.

    Returns:
        ``(B, spatial...)`` int64 class indices.
    """
    return target[:, 0].long() if target.shape[1] == 1 else channel_argmax(target)


def holds_every_class(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Which samples' labels contain every foreground class ``1..num_classes-1``.

    Args:
        target: labels ``(B, 1, spatial...)`` or one-hot ``(B, C, spatial...)``.
        num_classes: number of classes, background included.

    Returns:
        ``(B,)`` bool.
    """
    truth = label_indices(target).flatten(1)
    present = [(truth == c).any(1) for c in range(1, max(num_classes, 2))]
    return torch.stack(present, dim=1).all(1)


class DiceWorstCaseScore:
    """Ranks a sample's adversarial inputs for the worst case over several attacks: the lower its Dice, the worse.

    ``1 - hard Dice`` (unsmoothed, mean over the foreground classes, as ``MeanDice`` averages them) plus a tie-break
    below Dice's resolution, ``1e-6 * L / (1 + L)`` of the task loss ``L``, for samples whose Dice every attack leaves
    the same (e.g. 0 on slices without foreground, where the loss still tells more false positives). Ranking by the
    loss alone can keep an input with a higher loss but a better Dice (SegPGD trades loss for flipped pixels).

    Args:
        loss_fn: the per-sample task loss, for the tie-break.
    """

    def __init__(self, loss_fn: Callable[[Any, Any], torch.Tensor]) -> None:
        self.loss_fn = loss_fn

    def __call__(self, pred: Any, target: torch.Tensor) -> torch.Tensor:
        """Per-sample score, higher = worse for the model.

        Args:
            pred: logits ``(B, C, spatial...)`` (or deep-supervision outputs, see :py:func:`hard_dice`).
            target: labels ``(B, 1, spatial...)`` or one-hot.

        Returns:
            ``(B,)`` scores.
        """
        loss = self.loss_fn(pred, target).detach().float()
        dice = hard_dice(pred, target).mean(1).to(loss.device)
        return (1 - dice) + 1e-6 * loss / (1 + loss.abs())


class DiceCriterion:
    """A sample is correct while its hard Dice is at least ``tau``.

    The default is exactly the authors' attack criterion (``getOnlineDiceMax`` of their nnU-Net code): argmax of
    the logits, per foreground class ``2tp / (2tp + fp + fn + 1e-8)`` without smoothing, the maximum over the
    classes. A sample whose label has no foreground is therefore never correct (its margin never expands), and a
    class absent from the sample scores 0, so the maximum picks the classes that are present.

    Args:
        tau: the Dice threshold (the mean Dice of a standard-trained model in the paper).
        reduction: how to combine foreground classes, ``"max"`` (the authors') or ``"mean"`` (a departure).
        include_background: count class 0 as well (a departure).
        smooth: Dice smoothing term; 0 (the authors'); 1 makes an empty label with an empty prediction score 1
            (a departure that lets background-only samples expand their margins).

    Raises:
        ValueError: for ``tau`` outside ``[0, 1]``, an unknown ``reduction`` or a negative ``smooth``.
    """

    def __init__(self, tau: float, reduction: str = "max", include_background: bool = False, smooth: float = 0.0):
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"Dice threshold tau must be in [0, 1], got {tau!r}.")
        if reduction not in ("max", "mean"):
            raise ValueError(f"reduction must be 'max' or 'mean', got {reduction!r}.")
        if not smooth >= 0:
            raise ValueError(f"Dice smoothing must be >= 0, got {smooth!r}.")
        self.tau = float(tau)
        self.reduction = reduction
        self.include_background = include_background
        self.smooth = float(smooth)

    def dice(self, pred: Any, target: torch.Tensor) -> torch.Tensor:
        """Per-sample Dice as the criterion sees it.

        Args:
            pred: network output.
            target: labels.

        Returns:
            ``(B,)`` Dice values.
        """
        d = hard_dice(pred, target, self.include_background, self.smooth)
        return d.amax(1) if self.reduction == "max" else d.mean(1)

    def __call__(self, pred: Any, target: torch.Tensor) -> torch.Tensor:
        """``(B,)`` bool, True where Dice ``>= tau``."""
        return self.dice(pred, target) >= self.tau


class LossThresholdCriterion:
    """A sample is correct while every loss component is at most its threshold.

    Args:
        components_fn: ``components_fn(pred, target) -> {name: Tensor[B]}``, the per-sample loss components.
        thresholds: ``{name: threshold}``, one per component (``math.inf`` disables one).

    Raises:
        ValueError: for an empty or non-numeric threshold table.
    """

    def __init__(
        self, components_fn: Callable[[Any, Any], Mapping[str, torch.Tensor]], thresholds: Mapping[str, float]
    ):
        if not thresholds:
            raise ValueError("LossThresholdCriterion needs at least one threshold.")
        bad = {k: v for k, v in thresholds.items() if not isinstance(v, (int, float)) or math.isnan(v)}
        if bad:
            raise ValueError(f"thresholds must be numbers, got {bad}.")
        self.components_fn = components_fn
        self.thresholds = {k: float(v) for k, v in thresholds.items()}

    def __call__(self, pred: Any, target: Any) -> torch.Tensor:
        """``(B,)`` bool, True where every component is at most its threshold.

        Raises:
            KeyError: when the loss does not return a component that has a threshold.
        """
        return self.check(self.components_fn(pred, target))

    def check(self, components: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The criterion on components already computed (an attack hands over those it has just ascended).

        Args:
            components: ``{name: Tensor[B]}``, at least one per threshold.

        Returns:
            ``(B,)`` bool, True where every component is at most its threshold.

        Raises:
            KeyError: when a component that has a threshold is missing.
        """
        missing = [k for k in self.thresholds if k not in components]
        if missing:
            raise KeyError(f"loss components {sorted(components)} lack {missing}, which have thresholds.")
        ok = [components[k].detach() <= thr for k, thr in self.thresholds.items()]
        return torch.stack(ok).all(0)

    def judges(self, loss_fn: Any) -> bool:
        """Whether this criterion reads the components that ``loss_fn`` sums.

        True when ``components_fn`` is ``loss_fn.components``: an attack may then compute them once and hand them over.

        Args:
            loss_fn: an attack's loss.

        Returns:
            True for a :py:class:`~monai_amat.losses.ComponentLoss` whose ``components`` is this criterion's source.
        """
        return isinstance(loss_fn, ComponentLoss) and self.components_fn == loss_fn.components


def _normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def huber_location_scale(
    values: Sequence[float] | np.ndarray | torch.Tensor, c: float = 1.5, tol: float = 1e-8, max_iter: int = 30
) -> tuple[float, float]:
    """Joint Huber M-estimate of location and scale (Huber's proposal 2), as ``statsmodels.robust.scale.Huber``.

    Starts from the median and the normalised MAD and iterates the clipped mean and the winsorised scale.

    Args:
        values: the sample (e.g. per-sample clean losses).
        c: clipping constant in units of scale.
        tol: relative convergence tolerance.
        max_iter: iteration limit; on reaching it a warning is given and the last estimate returned.

    Returns:
        ``(location, scale)``; ``(median, 0)`` when the MAD is zero (most values equal).

    Raises:
        ValueError: when ``values`` is empty or not finite.
    """
    a = np.asarray(torch.as_tensor(values).detach().cpu().double().reshape(-1))
    if a.size == 0 or not np.isfinite(a).all():
        raise ValueError(f"Huber estimate needs a non-empty finite sample, got {a.size} values.")
    mu = float(np.median(a))
    scale = float(np.median(np.abs(a - mu)) / 0.6744897501960817)
    if scale == 0.0:
        return mu, 0.0
    tmp = 2 * _normal_cdf(c) - 1
    gamma = tmp + c**2 * (1 - tmp) - 2 * c * math.exp(-(c**2) / 2) / math.sqrt(2 * math.pi)
    n = a.size - 1
    for _ in range(max_iter):
        new_mu = float(np.clip(a, mu - c * scale, mu + c * scale).mean())
        inside = np.abs((a - mu) / scale) <= c
        denom = n * gamma - (a.size - inside.sum()) * c**2
        new_scale = math.sqrt(float(np.sum(inside * (a - new_mu) ** 2)) / denom) if denom > 0 else scale
        if abs(scale - new_scale) <= new_scale * tol and abs(mu - new_mu) <= new_scale * tol:
            return new_mu, new_scale
        mu, scale = new_mu, new_scale
    warnings.warn(f"Huber estimate did not converge in {max_iter} iterations; using the last estimate.", stacklevel=2)
    return mu, scale


CALIBRATION_STATISTICS = ("huber", "max")


def calibrate_thresholds(
    losses: Mapping[str, Sequence[float] | torch.Tensor], z: float = 2.0, statistic: str = "huber"
) -> dict[str, float]:
    """Loss thresholds from a trained model's per-sample clean losses.

    Args:
        losses: ``{component: per-sample clean losses}`` over the training set.
        z: how many robust scales above the robust mean (``"huber"``).
        statistic: ``"huber"``: Huber mean ``+ z ×`` Huber scale (the authors' landmark script); ``"max"``: the
            largest loss (their YOLOv5 ``evaluate_adv_get_dist.py``, where the Huber line is commented out).

    Returns:
        ``{component: threshold}``.

    Raises:
        ValueError: for an unknown ``statistic``, or a component without finite values.
    """
    if statistic not in CALIBRATION_STATISTICS:
        raise ValueError(f"statistic must be one of {CALIBRATION_STATISTICS}, got {statistic!r}.")
    out = {}
    for name, values in losses.items():
        if statistic == "huber":
            mu, scale = huber_location_scale(values)
            out[name] = mu + z * scale
        else:
            values = torch.as_tensor(values).detach().double().reshape(-1)
            if values.numel() == 0 or not torch.isfinite(values).all():
                raise ValueError(f"loss component {name!r}: the maximum needs a non-empty finite sample.")
            out[name] = float(values.max())
    return out


def calibrate_dice_tau(dice: torch.Tensor, complete: torch.Tensor) -> float:
    """Dice threshold ``tau`` as the authors' ``getOnlineDiceMean``: the mean over the samples that hold every class.

    Args:
        dice: ``(N,)`` per-sample Dice of a trained model, the mean over the foreground classes (unsmoothed).
        complete: ``(N,)`` bool, the sample's label contains every foreground class
            (:py:func:`holds_every_class`); the other samples are left out.

    Returns:
        The mean Dice over the complete samples.

    Raises:
        ValueError: when no sample holds every foreground class.
    """
    dice = torch.as_tensor(dice).float().reshape(-1)
    keep = torch.as_tensor(complete).bool().reshape(-1)
    if not keep.any():
        raise ValueError("cannot calibrate the Dice threshold: no sample contains every foreground class.")
    return float(dice[keep].mean())


def save_thresholds(
    path: str | os.PathLike,
    criterion: str,
    thresholds: Mapping[str, float],
    z: float | None,
    model: str,
    split: str | None = None,
    samples: int | None = None,
    statistic: str | None = None,
) -> None:
    """Write ``thresholds.json`` atomically (``criterion``, ``thresholds``, ``z``, ``model``, ``split``, ...).

    The file also records ``samples`` and ``statistic`` (how loss thresholds were computed).

    Args:
        path: the file to write.
        criterion: the criterion's name, e.g. ``"dice"`` or ``"loss_threshold"``.
        thresholds: ``{name: value}``.
        z: the z used for calibration (None for Dice and the maximum).
        model: the model file the thresholds were calibrated on.
        split: the data split the values came from (``"val"``, ``"train"``), None when unknown.
        samples: how many samples the thresholds rest on.
        statistic: how the loss thresholds were computed (:py:data:`CALIBRATION_STATISTICS`), None for Dice.
    """
    write_json(
        path,
        {
            "criterion": criterion,
            "thresholds": {k: float(v) for k, v in thresholds.items()},
            "z": z,
            "model": str(model),
            "split": split,
            "samples": samples,
            "statistic": statistic,
        },
    )


def load_thresholds(path: str | os.PathLike) -> dict:
    """Read ``thresholds.json``.

    Args:
        path: the file to read.

    Returns:
        Its content.

    Raises:
        FileNotFoundError: when the file is missing.
        ValueError: when a key is missing or a threshold is not a number.
    """
    data = read_json(path, required=("criterion", "thresholds"))
    bad = {k: v for k, v in data["thresholds"].items() if not isinstance(v, (int, float))}
    if bad:
        raise ValueError(f"{path}: thresholds must be numbers, got {bad}.")
    return data
