"""A RetinaNet detector built from MONAI's own networks, so that nothing needs torchvision.

MONAI's ``resnet_fpn_feature_extractor`` takes a ResNet's intermediate layers with torchvision's
``IntermediateLayerGetter``, and ``RetinaNetDetector`` checks its matcher and sampler against torchvision classes;
torchvision does not load beside the CPU torch this package targets. :py:class:`ResNetFPN` runs the ResNet layers
itself and feeds MONAI's ``FeaturePyramidNetwork``; :py:func:`retinanet_detector` configures a
``RetinaNetDetector`` with MONAI's ATSS matcher and hard negative sampler (see ``_torchvision_free``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.apps.detection.networks import retinanet_detector as _retinanet_detector
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.losses.focal_loss import sigmoid_focal_loss
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from monai.networks.nets.resnet import ResNet
from monai.utils import optional_import
from torch import nn

__all__ = ["FocalLossPerPositive", "ResNetFPN", "retinanet_detector"]


def _torchvision_free() -> None:
    """Let ``RetinaNetDetector`` train without torchvision; called by :py:func:`retinanet_detector`, not at import.

    When torchvision is missing (or broken), MONAI binds its ``Matcher`` and ``BalancedPositiveNegativeSampler``
    names to placeholders whose ``isinstance`` check raises; the detector runs that check before its own ones on
    every matching call, even with MONAI's ATSS matcher (and, should the order change, on sampling). Stand-in classes
    that nothing is an instance of make those checks fall through to MONAI's own matcher and sampler; torchvision's
    own classes are kept when it loads. MONAI offers no other way: the alternative is a copy of its two methods.
    """
    for name in ("Matcher", "BalancedPositiveNegativeSampler"):
        if not optional_import("torchvision.models.detection._utils", name=name)[1]:
            setattr(_retinanet_detector, name, type(f"{name}Unavailable", (), {}))


def _out_channels(layer: nn.Module) -> int:
    """Channels out of a ResNet layer: those of its last convolution."""
    convs = [m for m in layer.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    return int(convs[-1].out_channels)


class ResNetFPN(nn.Module):
    """Feature pyramid on a MONAI ResNet, as MONAI's ``resnet_fpn_feature_extractor`` builds it, without torchvision.

    The ResNet's stem (``conv1``, ``bn1``, ``act``, ``maxpool`` unless ``no_max_pool``) and ``layer1`` up to the
    deepest returned layer run in turn; the returned layers feed MONAI's ``FeaturePyramidNetwork`` with a max-pooled
    extra level, so ``len(returned_layers) + 1`` maps of ``out_channels`` come out. The ResNet's head (``avgpool``,
    ``fc``) is not used.

    Example::

        backbone = ResNet(spatial_dims=2, block="basic", layers=[1, 1, 1, 1], block_inplanes=[16, 32, 64, 128],
                          n_input_channels=3, conv1_t_stride=2, conv1_t_size=7)
        network = RetinaNet(2, num_classes=3, num_anchors=3, feature_extractor=ResNetFPN(backbone, 2, [1, 2]))

    Args:
        backbone: a MONAI ``ResNet``.
        spatial_dims: 2 or 3.
        returned_layers: which of ``layer1``..``layer4`` feed the pyramid (ascending).
        out_channels: channels of every pyramid map (``RetinaNet`` reads this attribute).

    Raises:
        ValueError: when ``returned_layers`` is empty, not ascending or outside 1..4.
    """

    def __init__(
        self, backbone: ResNet, spatial_dims: int, returned_layers: Sequence[int] = (1, 2, 3), out_channels: int = 256
    ) -> None:
        super().__init__()
        returned = [int(k) for k in returned_layers]
        ascending = all(b > a for a, b in zip(returned, returned[1:]))
        if not returned or not ascending or not 1 <= returned[0] <= returned[-1] <= 4:
            raise ValueError(f"returned_layers must be ascending layer numbers in 1..4, got {list(returned_layers)}.")
        stem = [backbone.conv1, backbone.bn1, backbone.act]
        if not backbone.no_max_pool:
            stem.append(backbone.maxpool)
        self.stem = nn.Sequential(*stem)
        self.layers = nn.ModuleList(getattr(backbone, f"layer{k}") for k in range(1, returned[-1] + 1))
        self.returned_layers = returned
        self.out_channels = int(out_channels)
        self.fpn = FeaturePyramidNetwork(
            spatial_dims,
            [_out_channels(self.layers[k - 1]) for k in returned],
            self.out_channels,
            extra_blocks=LastLevelMaxPool(spatial_dims),
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The pyramid maps, finest first.

        Args:
            x: images ``(B, C, *spatial)``.

        Returns:
            ``{name: (B, out_channels, *spatial_k)}`` in ascending stride.
        """
        x = self.stem(x)
        features = {}
        for k, layer in enumerate(self.layers, start=1):
            x = layer(x)
            if k in self.returned_layers:
                features[str(k)] = x
        return self.fpn(features)


class FocalLossPerPositive(nn.Module):
    """The RetinaNet paper's classification loss: sigmoid focal loss summed over all anchors, over the positives.

    MONAI's ``FocalLoss`` averages over all elements (or sums), so its value falls with the number of anchors; the
    RetinaNet paper (Lin et al., 2017) divides the sum by the number of anchors assigned to a box, which keeps the
    loss of an image on the same scale however many anchors and objects it has. The focal term itself is MONAI's
    ``sigmoid_focal_loss``.

    Args:
        gamma: focusing parameter.
        alpha: weight of the positives (``1 - alpha`` for the negatives).
    """

    def __init__(self, gamma: float = 2.0, alpha: float = 0.25) -> None:
        super().__init__()
        self.gamma, self.alpha = float(gamma), float(alpha)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of these anchors.

        Args:
            logits: ``(N, classes)`` classification logits of ``N`` anchors.
            target: ``(N, classes)`` one-hot targets (all zero for a background anchor).

        Returns:
            The summed focal loss over the number of positive anchors (at least 1).
        """
        positives = target.sum().clamp(min=1)
        return sigmoid_focal_loss(logits, target, self.gamma, self.alpha).sum() / positives


def retinanet_detector(
    network: nn.Module,
    anchor_generator: nn.Module,
    atss_candidates: int = 4,
    batch_size_per_image: int = 64,
    positive_fraction: float = 0.3,
    min_neg: int = 16,
    pool_size: int = 20,
    score_thresh: float = 0.05,
    topk_candidates_per_level: int = 1000,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
    cls_loss: str = "bce",
    box_key: str = "boxes",
    label_key: str = "labels",
) -> RetinaNetDetector:
    """A MONAI ``RetinaNetDetector`` set up for training and inference without torchvision.

    Matching is MONAI's ATSS (``set_atss_matcher``). The classification loss is either MONAI's default, binary
    cross-entropy over anchors drawn by its hard negative sampler (``cls_loss="bce"``, ``set_hard_negative_sampler``),
    or the RetinaNet paper's focal loss over every anchor (``cls_loss="focal"``, :py:class:`FocalLossPerPositive`,
    no sampler). On crowded images, where many unmatched anchors overlap an object, the hard negatives are mostly such
    near-duplicates of positives and the sampled loss can stall; the focal loss weighs them down instead. The box
    selector keeps boxes above ``score_thresh`` after non-maximum suppression at ``nms_thresh``. Spatial dimensions,
    classes and ``size_divisible`` are the network's.

    Args:
        network: the RetinaNet network (``monai.apps.detection.networks.retinanet_network.RetinaNet``).
        anchor_generator: e.g. ``AnchorGeneratorWithAnchorShape``.
        atss_candidates: ATSS candidates per level.
        batch_size_per_image: sampled anchors per image for the classification loss.
        positive_fraction: largest fraction of positives among them.
        min_neg: fewest negatives sampled.
        pool_size: hard negatives are drawn from the ``pool_size`` times as many highest-scoring negatives.
        score_thresh: lowest score of a returned box.
        topk_candidates_per_level: candidates per level before suppression.
        nms_thresh: IoU of non-maximum suppression.
        detections_per_img: most boxes returned per image.
        cls_loss: ``"bce"`` (sampled binary cross-entropy) or ``"focal"`` (focal loss over all anchors); the sampler
            arguments apply to ``"bce"`` only.
        box_key: the targets' box key.
        label_key: the targets' label key.

    Returns:
        The configured detector (its ``network`` is ``network``).

    Raises:
        ValueError: when ``cls_loss`` is neither ``"bce"`` nor ``"focal"``.
    """
    if cls_loss not in ("bce", "focal"):
        raise ValueError(f"cls_loss must be 'bce' or 'focal', got {cls_loss!r}.")
    _torchvision_free()
    detector = RetinaNetDetector(network=network, anchor_generator=anchor_generator)
    detector.set_target_keys(box_key=box_key, label_key=label_key)
    detector.set_atss_matcher(num_candidates=atss_candidates, center_in_gt=False)
    if cls_loss == "focal":
        detector.set_cls_loss(FocalLossPerPositive())
    else:
        detector.set_hard_negative_sampler(
            batch_size_per_image=batch_size_per_image,
            positive_fraction=positive_fraction,
            min_neg=min_neg,
            pool_size=pool_size,
        )
    detector.set_box_selector_parameters(
        score_thresh=score_thresh,
        topk_candidates_per_level=topk_candidates_per_level,
        nms_thresh=nms_thresh,
        detections_per_img=detections_per_img,
    )
    return detector
