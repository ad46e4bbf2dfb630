"""Per-sample task losses: one value per batch item, as the attack and the AMAT loss need."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

__all__ = [
    "ComponentLoss",
    "PerSampleLoss",
    "PerSampleDiceCELoss",
    "SegPGDLoss",
    "PerSampleLandmarkLoss",
    "PerImageDetectionLoss",
    "split_landmark_output",
]


def split_landmark_output(pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a ``(B, 3K, H, W)`` output into heatmap logits, x-offsets and y-offsets, each ``(B, K, H, W)``.

    Also exported by :py:mod:`monai_amat.transforms` (its first home), for the landmark decoding.

    Args:
        pred: the landmark network's output.

    Returns:
        ``(heatmap logits, x-offsets, y-offsets)``.

    Raises:
        ValueError: when the channel count is not a multiple of 3.
    """
    if pred.shape[1] % 3:
        raise ValueError(f"a landmark output needs 3K channels (heatmap, x-offset, y-offset), got {pred.shape[1]}.")
    return torch.chunk(pred, 3, dim=1)


def _identity_key(tensors: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, int]]:
    """Tensors with their versions, as a cache key.

    Identity, not equality: a cache that holds the tensors keeps their ids from being reused; an in-place edit bumps
    the version.
    """
    return [(t, t._version) for t in tensors]


def _same_identity(key: list[tuple[torch.Tensor, int]], tensors: Sequence[torch.Tensor]) -> bool:
    return len(key) == len(tensors) and all(k is t and v == t._version for (k, v), t in zip(key, tensors))


@runtime_checkable
class ComponentLoss(Protocol):
    """A per-sample loss that is a weighted sum of named per-sample components.

    ``loss(pred, target) == loss.total(loss.components(pred, target))``. An attack whose criterion judges these very
    components (:py:class:`~monai_amat.criteria.LossThresholdCriterion` built on ``loss.components``) computes them
    once per iterate, sums them for the gradient and hands them to the criterion.
    """

    def components(self, pred: Any, target: Any) -> dict[str, torch.Tensor]:
        """``{name: (B,) tensor}``, the per-sample components."""
        ...

    def total(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(B,)`` the weighted sum of ``parts``."""
        ...


class PerSampleLoss(nn.Module):
    """Reduce an unreduced loss to one value per sample (mean over all but the batch dimension).

    Args:
        loss: a loss built with ``reduction="none"`` (any output shape ``(B, ...)``).
    """

    def __init__(self, loss: Callable[[Any, Any], torch.Tensor]) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, pred: Any, target: Any) -> torch.Tensor:
        """``(B,)`` per-sample loss."""
        out = self.loss(pred, target)
        return out.flatten(1).mean(1) if out.dim() > 1 else out


class PerSampleDiceCELoss(nn.Module):
    """Dice + cross-entropy, one value per sample, with optional deep supervision.

    MONAI's ``DiceCELoss`` only reduces over the batch ("mean"/"sum"); AMAT needs each sample's loss, so this
    combines MONAI's ``DiceLoss(reduction="none")`` with a per-voxel cross-entropy averaged per sample.

    Args:
        include_background: include class 0 in the Dice term.
        lambda_dice: weight of the Dice term.
        lambda_ce: weight of the cross-entropy term.
        smooth_nr: Dice numerator smoothing.
        smooth_dr: Dice denominator smoothing.
        deep_supervision_weights: for networks that return several outputs in train mode (a list/tuple, or a
            tensor stacked on dim 1 as ``DynUNet`` does), the weight of each output; None weights them
            ``1/2**k`` normalised (nnU-Net). A plain tensor prediction uses no weights.
    """

    def __init__(
        self,
        include_background: bool = True,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        deep_supervision_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.dice = DiceLoss(
            include_background=include_background,
            to_onehot_y=True,
            softmax=True,
            reduction="none",
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
        )
        self.lambda_dice = lambda_dice
        self.lambda_ce = lambda_ce
        self.deep_supervision_weights = deep_supervision_weights

    def single(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of one output ``(B, C, spatial...)`` against labels ``(B, 1, spatial...)``.

        Returns:
            ``(B,)`` per-sample loss. Labels are resized (nearest) to a lower-resolution output.
        """
        if target.shape[2:] != logits.shape[2:]:
            target = F.interpolate(target.float(), size=logits.shape[2:], mode="nearest")
        dice = self.dice(logits, target).flatten(1).mean(1)
        ce = F.cross_entropy(logits, target[:, 0].long(), reduction="none").flatten(1).mean(1)
        return self.lambda_dice * dice + self.lambda_ce * ce

    def forward(self, pred: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """``(B,)`` per-sample loss.

        Args:
            pred: logits ``(B, C, spatial...)``; several outputs as a list/tuple, or stacked ``(B, S, C, ...)``
                when ``target`` has one dimension less.
            target: labels ``(B, 1, spatial...)``.
        """
        if isinstance(pred, torch.Tensor) and pred.dim() == target.dim() + 1:
            pred = torch.unbind(pred, dim=1)
        if isinstance(pred, torch.Tensor):
            return self.single(pred, target)
        weights = self.deep_supervision_weights or [0.5**k for k in range(len(pred))]
        total = sum(weights[: len(pred)])
        return sum(w * self.single(p, target) for w, p in zip(weights, pred)) / total


class SegPGDLoss(nn.Module):
    """SegPGD's attack loss (Gu et al., ECCV 2022), one value per sample.

    Per-pixel cross-entropy, split between pixels the network still classifies correctly, weighted ``1 - lam``,
    and pixels it already gets wrong, weighted ``lam``, averaged per sample; ``lam = progress / 2`` grows from 0
    at the attack's first step to ``(T - 1) / 2T`` at its last (SegPGD's ``(t - 1) / 2T``), so the attack first
    flips correct pixels instead of pushing already-wrong ones further. Attacks set the progress through
    :py:meth:`set_progress` before each gradient evaluation. Made for :py:class:`~monai_amat.attacks.PGD`, as in the
    SegPGD paper: with APGD, whose step-size rule and best-iterate choice compare loss values across iterations, the
    changing weights bias it towards late iterates.

    Example::

        attack = PGD(SegPGDLoss(), steps=100, alpha=25.0)
    """

    def __init__(self) -> None:
        super().__init__()
        self.progress = 0.0

    def set_progress(self, fraction: float) -> None:
        """Set how far the attack has gone.

        Args:
            fraction: in ``[0, 1]``.

        Raises:
            ValueError: outside ``[0, 1]``.
        """
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"SegPGDLoss progress must be in [0, 1], got {fraction!r}.")
        self.progress = float(fraction)

    def forward(self, pred: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """``(B,)`` per-sample loss.

        Args:
            pred: logits ``(B, C, spatial...)`` (of several outputs, the first: the full-resolution one).
            target: labels ``(B, 1, spatial...)``.

        Returns:
            ``(B,)`` weighted cross-entropy per sample.
        """
        logits = pred if isinstance(pred, torch.Tensor) else pred[0]
        labels = target[:, 0].long()
        ce = F.cross_entropy(logits, labels, reduction="none")
        wrong = (logits.detach().argmax(1) != labels).to(ce.dtype)
        lam = self.progress / 2
        return (ce * ((1 - lam) * (1 - wrong) + lam * wrong)).flatten(1).mean(1)


class PerSampleLandmarkLoss(nn.Module):
    """Heatmap + offset loss of a landmark network, one value per sample, with its components.

    Components (each ``(B,)``): ``heatmap`` — soft Dice loss of the sigmoid heatmaps (or binary cross-entropy),
    averaged over landmarks; ``offset_x`` / ``offset_y`` — L1 error of the offset maps inside the true disks.
    The loss is ``lambda_heatmap * heatmap + lambda_offset * (offset_x + offset_y)``; the authors' code weighs the
    heatmap term 0.5 and uses no Dice smoothing. :py:meth:`components` (unweighted) feeds the loss-threshold
    criterion and its calibration.

    Args:
        heatmap: ``"dice"`` or ``"bce"``.
        lambda_offset: weight of the offset terms.
        smooth: soft Dice smoothing.
        lambda_heatmap: weight of the heatmap term.

    Raises:
        ValueError: for an unknown ``heatmap`` loss.
    """

    def __init__(
        self, heatmap: str = "dice", lambda_offset: float = 1.0, smooth: float = 1.0, lambda_heatmap: float = 1.0
    ) -> None:
        super().__init__()
        if heatmap not in ("dice", "bce"):
            raise ValueError(f"heatmap loss must be 'dice' or 'bce', got {heatmap!r}.")
        self.heatmap = heatmap
        self.lambda_offset = lambda_offset
        self.lambda_heatmap = lambda_heatmap
        self.smooth = smooth

    def components(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample loss components.

        Args:
            pred: ``(B, 3K, H, W)`` heatmap logits, x-offsets, y-offsets.
            target: ``(B, 3K, H, W)`` as made by ``LandmarkTargetd``.

        Returns:
            ``{"heatmap", "offset_x", "offset_y"}``, each ``(B,)``.
        """
        heat, off_x, off_y = split_landmark_output(pred)
        disk, tx, ty = split_landmark_output(target)
        if self.heatmap == "dice":
            prob = torch.sigmoid(heat)
            inter = (prob * disk).flatten(2).sum(2)
            denom = prob.flatten(2).sum(2) + disk.flatten(2).sum(2)
            heat_loss = (1 - (2 * inter + self.smooth) / (denom + self.smooth + 1e-8)).mean(1)
        else:
            heat_loss = F.binary_cross_entropy_with_logits(heat, disk, reduction="none").flatten(1).mean(1)
        area = disk.flatten(1).sum(1).clamp_min(1.0)
        return {
            "heatmap": heat_loss,
            "offset_x": ((off_x - tx).abs() * disk).flatten(1).sum(1) / area,
            "offset_y": ((off_y - ty).abs() * disk).flatten(1).sum(1) / area,
        }

    def total(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(B,)`` ``lambda_heatmap * heatmap + lambda_offset * (offset_x + offset_y)`` of :py:meth:`components`."""
        return self.lambda_heatmap * parts["heatmap"] + self.lambda_offset * (parts["offset_x"] + parts["offset_y"])

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(B,)`` per-sample loss."""
        return self.total(self.components(pred, target))


def _flatten_head_maps(maps: Sequence[torch.Tensor], num_anchors: int) -> torch.Tensor:
    """Head output maps ``[(B, A*C, *grid_k)]`` as one ``(B, sum_k(prod(grid_k) * A), C)`` tensor.

    The layout of MONAI's ``RetinaNetDetector`` (its private ``_reshape_maps``): grid positions first, then anchors.
    """
    flat = []
    for m in maps:
        batch, spatial = m.shape[0], m.shape[2:]
        view = m.view(batch, num_anchors, m.shape[1] // num_anchors, *spatial)
        order = (0, *range(3, 3 + len(spatial)), 1, 2)
        flat.append(view.permute(order).reshape(batch, -1, view.shape[2]))
    return torch.cat(flat, dim=1)


class PerImageDetectionLoss:
    """A RetinaNet detector's training losses, one value per image, from its network's head outputs.

    MONAI's ``RetinaNetDetector`` returns the classification and box-regression losses of the whole batch; AMAT
    needs each image's. This computes them image by image with the detector's own anchors, matcher, sampler and
    loss functions, from what ``detector.network`` returns (``{cls_key: [maps], box_reg_key: [maps]}``), so the
    network can be trained, attacked and calibrated like any other. The anchors are laid out on the image size that
    each target carries under ``image_size_key`` (:py:class:`~monai_amat.data.PrepareDetectionBatch` sets it). The
    anchor-to-box matching depends on the boxes only, so it is kept while the same target tensors come back (a
    training iteration's clean pass, attack iterates and adversarial pass match once). The hard negative sampler
    draws from the torch random generator, as in the detector.

    Args:
        detector: a configured ``RetinaNetDetector`` (matcher and sampler set, e.g. by
            :py:func:`monai_amat.networks.retinanet_detector`).
        weights: weight of each component in the total, by key (default 1 each).
        image_size_key: the targets' key of the spatial size of the network's input images.

    Raises:
        ValueError: for a weight key that is not one of the detector's loss keys.
    """

    def __init__(self, detector: Any, weights: dict[str, float] | None = None, image_size_key: str = "image_size"):
        self.detector = detector
        self.keys = (detector.cls_key, detector.box_reg_key)
        self.weights = {k: 1.0 for k in self.keys}
        unknown = sorted(set(weights or {}) - set(self.keys))
        if unknown:
            raise ValueError(f"loss weights {unknown} are not detector losses; use {list(self.keys)}.")
        self.weights.update({k: float(v) for k, v in (weights or {}).items()})
        self.image_size_key = image_size_key
        self._matched: tuple[list[tuple[torch.Tensor, int]], torch.Tensor, list[torch.Tensor]] | None = None
        self._layout_anchors: tuple[tuple, torch.Tensor] | None = None

    def _image_size(self, target: Sequence[dict]) -> tuple[int, ...]:
        """The one spatial size of the batch's images, as its targets give it."""
        sizes = {tuple(int(s) for s in t[self.image_size_key]) for t in target if self.image_size_key in t}
        if len(sizes) != 1 or any(self.image_size_key not in t for t in target):
            raise ValueError(
                f"PerImageDetectionLoss lays the anchors out on the images' spatial size, which every target must give "
                f"under '{self.image_size_key}' (PrepareDetectionBatch sets it); got {sorted(sizes)} in "
                f"{len(target)} target(s)."
            )
        return sizes.pop()

    def _anchors(self, cls_maps: Sequence[torch.Tensor], spatial: tuple[int, ...]) -> torch.Tensor:
        """The anchors of one image of size ``spatial``, for these head output maps."""
        for m in cls_maps:
            if any(s % g for s, g in zip(spatial, m.shape[2:])):
                raise ValueError(
                    f"input size {list(spatial)} is not a multiple of the feature map size {list(m.shape[2:])}; "
                    "give the network inputs divisible by its largest stride (the bundles' spatial_size)."
                )
        # the anchors depend on the sizes and device only: made once per layout, not on every attack iterate
        layout = (spatial, tuple(tuple(m.shape[2:]) for m in cls_maps), cls_maps[0].device, cls_maps[0].dtype)
        if self._layout_anchors is None or self._layout_anchors[0] != layout:
            shape = (1, 0, *spatial)
            anchors = self.detector.anchor_generator(torch.empty(shape, device=cls_maps[0].device), cls_maps)[0]
            self._layout_anchors = (layout, anchors)
        return self._layout_anchors[1]

    def _match(self, anchors: torch.Tensor, target: Sequence[dict], locations: list[int]) -> list[torch.Tensor]:
        """The detector's anchor matching of each image, reused while the very same box tensors come back."""
        boxes = [t[self.detector.target_box_key] for t in target]
        if self._matched is not None:
            cached_key, cached_anchors, matched = self._matched
            if cached_anchors is anchors and _same_identity(cached_key, boxes):
                return matched
        matched = self.detector.compute_anchor_matched_idxs([anchors] * len(boxes), target, locations)
        self._matched = (_identity_key(boxes), anchors, matched)
        return matched

    def components(self, pred: dict[str, Sequence[torch.Tensor]], target: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Each loss component per image.

        Args:
            pred: the network's head outputs, ``{cls_key: [(B, A*classes, *grid_k)], box_reg_key: [...]}``.
            target: one dict per image with the detector's box and label keys and ``image_size_key``.

        Returns:
            ``{cls_key: (B,), box_reg_key: (B,)}``.

        Raises:
            ValueError: when the targets are not one per image, do not give one image size, or the image size is not
                a multiple of the feature maps'.
        """
        det = self.detector
        cls_maps, box_maps = list(pred[det.cls_key]), list(pred[det.box_reg_key])
        batch = cls_maps[0].shape[0]
        if len(target) != batch:
            raise ValueError(f"{len(target)} targets for {batch} images; give one dict of boxes and labels per image.")
        anchors = self._anchors(cls_maps, self._image_size(target))
        cls_logits = _flatten_head_maps(cls_maps, det.num_anchors_per_loc)
        box_regression = _flatten_head_maps(box_maps, det.num_anchors_per_loc)
        matched = self._match(anchors, target, [m.shape[2:].numel() for m in cls_maps])
        cls, box = [], []
        for i in range(batch):
            cls.append(det.compute_cls_loss(cls_logits[i : i + 1], target[i : i + 1], matched[i : i + 1]))
            box_i = det.compute_box_loss(box_regression[i : i + 1], target[i : i + 1], [anchors], matched[i : i + 1])
            box.append(box_i.to(box_regression))
        return {det.cls_key: torch.stack(cls), det.box_reg_key: torch.stack(box)}

    def total(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(B,)`` the weighted sum of :py:meth:`components`."""
        return sum(self.weights[k] * parts[k] for k in self.keys)

    def __call__(self, pred: dict[str, Sequence[torch.Tensor]], target: Sequence[dict]) -> torch.Tensor:
        """``(B,)`` the weighted sum of :py:meth:`components`."""
        return self.total(self.components(pred, target))
