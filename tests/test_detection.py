"""Detection building blocks: the torchvision-free RetinaNet, per-image losses, box resizing, batching and mAP."""

import math

import numpy as np
import pytest
import torch
from monai.apps.detection.metrics.coco import COCOMetric
from monai.apps.detection.metrics.matching import matching_batch
from monai.apps.detection.networks.retinanet_network import RetinaNet
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.data.box_utils import box_iou
from monai.networks.nets.resnet import ResNet

from monai_amat.attacks import PGD, per_sample_norm
from monai_amat.criteria import LossThresholdCriterion
from monai_amat.data import PrepareDetectionBatch, detection_collate
from monai_amat.losses import PerImageDetectionLoss
from monai_amat.metrics import DetectionMAP
from monai_amat.networks import FocalLossPerPositive, ResNetFPN, retinanet_detector
from monai_amat.transforms import ResizeWithBoxesd, boxes_to_original

SIZE = (64, 48)


def _network(returned_layers=(1, 2)):
    backbone = ResNet(
        spatial_dims=2,
        block="basic",
        layers=[1, 1, 1, 1],
        block_inplanes=[8, 16, 32, 64],
        n_input_channels=3,
        conv1_t_stride=2,
        conv1_t_size=7,
    )
    return RetinaNet(2, 3, 3, ResNetFPN(backbone, 2, returned_layers, 16), size_divisible=16)


@pytest.fixture
def detector():
    torch.manual_seed(0)
    anchors = AnchorGeneratorWithAnchorShape(
        feature_map_scales=[1, 2, 4], base_anchor_shapes=[[4, 4], [8, 8], [16, 16]]
    )
    return retinanet_detector(_network(), anchors, batch_size_per_image=32, min_neg=4, pool_size=4)


def _targets(n=3, size=SIZE):
    boxes = [
        [[4.0, 6.0, 14.0, 16.0], [30.0, 20.0, 50.0, 40.0]],
        [[10.0, 10.0, 18.0, 17.0]],
        [[0.0, 0.0, 20.0, 12.0], [40.0, 30.0, 60.0, 46.0], [22.0, 8.0, 30.0, 14.0]],
    ][:n]
    labels = [[0, 1], [2], [0, 0, 1]][:n]
    return [
        {"boxes": torch.tensor(b), "labels": torch.tensor(lab), "image_size": size} for b, lab in zip(boxes, labels)
    ]


def test_resnet_fpn_levels_and_bad_layers():
    fpn = _network((1, 2, 3)).feature_extractor
    maps = fpn(torch.zeros(2, 3, *SIZE))
    # layer1 at stride 4 (conv1 stride 2 + max pool), layer2 8, layer3 16, plus the pooled extra level at 32
    assert [tuple(m.shape) for m in maps.values()] == [(2, 16, 16, 12), (2, 16, 8, 6), (2, 16, 4, 3), (2, 16, 2, 2)]
    for bad in ([], [2, 1], [0, 1], [1, 5]):
        with pytest.raises(ValueError, match="returned_layers"):
            ResNetFPN(_network().feature_extractor.layers, 2, bad)  # any module: the layers are checked first


def test_detector_trains_and_infers_without_torchvision(detector):
    """The detector's own training forward (matcher and sampler isinstance checks) and inference both run."""
    images = torch.rand(3, 3, *SIZE)
    detector.train()
    losses = detector(images, _targets())
    assert set(losses) == {"classification", "box_regression"} and all(torch.isfinite(v) for v in losses.values())
    detector.eval()
    with torch.no_grad():
        out = detector(images)
    assert len(out) == 3 and set(out[0]) == {"boxes", "labels", "labels_scores"}


def test_per_image_losses_equal_the_detector_loss_of_each_image_alone(detector):
    loss = PerImageDetectionLoss(detector)
    images, targets = torch.rand(3, 3, *SIZE), _targets()
    detector.train()  # the detector returns losses ...
    detector.network.eval()  # ... and BatchNorm uses running statistics, so an image's output is the same alone
    torch.manual_seed(1)
    parts = loss.components(detector.network(images), targets)
    assert {k: tuple(v.shape) for k, v in parts.items()} == {"classification": (3,), "box_regression": (3,)}
    torch.manual_seed(1)  # the hard negative sampler draws from the torch generator, image by image
    for i in range(3):
        alone = detector(images[i : i + 1], targets[i : i + 1])
        assert torch.allclose(parts["classification"][i], alone["classification"], atol=1e-6)
        assert torch.allclose(parts["box_regression"][i], alone["box_regression"], atol=1e-6)
    total = PerImageDetectionLoss(detector, weights={"classification": 2.0})
    torch.manual_seed(1)
    assert torch.allclose(
        total(detector.network(images), targets), 2 * parts["classification"] + parts["box_regression"]
    )


def test_per_image_loss_errors(detector):
    loss = PerImageDetectionLoss(detector)
    pred = detector.network(torch.rand(3, 3, *SIZE))
    with pytest.raises(ValueError, match="2 targets for 3 images"):
        loss(pred, _targets(2))
    no_size = [{k: v for k, v in t.items() if k != "image_size"} for t in _targets()]
    with pytest.raises(ValueError, match=r"under 'image_size'.*got \[\] in 3 target"):
        loss(pred, no_size)
    with pytest.raises(ValueError, match=r"got \[\(64, 48\)\] in 3 target"):
        loss(pred, no_size[:1] + _targets()[1:])  # one target lacks it
    with pytest.raises(ValueError, match=r"got \[\(32, 48\), \(64, 48\)\]"):
        loss(pred, _targets(1, (32, 48)) + _targets()[1:])
    pred = detector.network(torch.rand(3, 3, 60, 48))
    with pytest.raises(ValueError, match=r"input size \[60, 48\] is not a multiple"):
        loss(pred, _targets(size=(60, 48)))
    with pytest.raises(ValueError, match="objectness"):
        PerImageDetectionLoss(detector, weights={"objectness": 1.0})


def test_focal_loss_is_the_retinanet_papers_sum_over_the_positives():
    torch.manual_seed(0)
    logits, target = torch.randn(50, 3), (torch.rand(50, 3) > 0.9).float()
    p = torch.sigmoid(logits)
    by_hand = torch.where(target > 0, -0.25 * (1 - p) ** 2 * p.log(), -0.75 * p**2 * (1 - p).log())
    focal = FocalLossPerPositive()
    assert torch.allclose(focal(logits, target), by_hand.sum() / target.sum(), atol=1e-6)
    # an image twice as large with twice the objects has the same loss; easy negatives add almost nothing
    assert torch.allclose(focal(logits.repeat(2, 1), target.repeat(2, 1)), focal(logits, target), atol=1e-6)
    easy = torch.cat([logits, torch.full((1000, 3), -12.0)]), torch.cat([target, torch.zeros(1000, 3)])
    assert torch.allclose(focal(*easy), focal(logits, target), rtol=1e-4)
    assert focal(torch.full((4, 1), -5.0), torch.zeros(4, 1)) < 1e-3  # no positive: divided by 1, not 0


def test_focal_detector_scores_every_anchor_without_a_sampler(detector):
    """With ``cls_loss="focal"`` an image's classification loss covers all its anchors: no draw, no generator use."""
    focal = retinanet_detector(detector.network, detector.anchor_generator, cls_loss="focal")
    assert focal.fg_bg_sampler is None and isinstance(focal.cls_loss_func, FocalLossPerPositive)
    focal.network.eval()
    loss = PerImageDetectionLoss(focal)
    images, targets = torch.rand(3, 3, *SIZE), _targets()
    with torch.no_grad():
        out = focal.network(images)
        first = loss.components(out, targets)["classification"]
        again = loss.components(out, targets)["classification"]
    assert torch.equal(first, again)  # nothing is sampled
    anchors = loss._anchors(out["classification"], SIZE)
    matched = focal.compute_anchor_matched_idxs(
        [anchors] * 3, targets, [m.shape[2:].numel() for m in out["classification"]]
    )
    logits = torch.cat([m.permute(0, 2, 3, 1).reshape(3, -1, 3) for m in out["classification"]], dim=1)
    for i in range(3):
        onehot = torch.zeros_like(logits[i])
        fg = matched[i] >= 0
        onehot[fg, targets[i]["labels"][matched[i][fg]]] = 1.0
        assert torch.allclose(first[i], FocalLossPerPositive()(logits[i], onehot), atol=1e-5)
    with pytest.raises(ValueError, match="cls_loss"):
        retinanet_detector(detector.network, detector.anchor_generator, cls_loss="sampled")


def test_attack_raises_detection_loss_inside_the_ball_with_frozen_batch_norm(detector):
    """PGD in train mode: the loss rises, noise stays in the eps-ball, BatchNorm statistics do not move."""
    loss = PerImageDetectionLoss(detector)
    net = detector.network.train()
    images, targets = torch.rand(3, 3, *SIZE), _targets()
    stats = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}
    assert stats
    eps = torch.tensor([0.0, 2.0, 4.0])
    adv = PGD(loss, steps=10, alpha=2.5, random_start=False, train_mode=True)(net, images, targets, eps)
    assert torch.all(per_sample_norm(adv - images) <= eps + 1e-4)
    assert torch.equal(adv[0], images[0])
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in stats.items())
    assert net.training and all(p.requires_grad for p in net.parameters())
    with torch.no_grad():
        net.eval()
        torch.manual_seed(2)
        clean = loss(net(images), targets)
        torch.manual_seed(2)
        attacked = loss(net(adv), targets)
    assert torch.all(attacked[1:] > clean[1:])


def test_resize_with_boxes_keeps_aspect_pads_and_inverts():
    image = torch.rand(3, 640, 480)
    boxes = np.array([[100.0, 40.0, 180.0, 130.0], [600.0, 400.0, 640.0, 480.0]], dtype=np.float32)
    out = ResizeWithBoxesd("image", spatial_size=(320, 256))({"image": image, "boxes": boxes})
    assert tuple(out["image"].shape) == (3, 320, 256)
    assert torch.all(out["image"][:, :, 240:] == 0) and out["image"][:, :, :240].abs().sum() > 0
    np.testing.assert_allclose(out["box_scale"], [0.5, 0.5])
    np.testing.assert_allclose(out["boxes"], boxes / 2)
    np.testing.assert_array_equal(out["orig_size"], [640, 480])
    np.testing.assert_allclose(boxes_to_original(out["boxes"], out["box_scale"], out["orig_size"]), boxes, atol=1e-4)
    beyond = boxes_to_original(np.array([[-5.0, 0.0, 330.0, 250.0]]), [0.5, 0.5], [640, 480])
    np.testing.assert_allclose(beyond, [[0.0, 0.0, 640.0, 480.0]])  # clipped to the original image
    tall = ResizeWithBoxesd("image", spatial_size=(320, 256))({"image": torch.rand(3, 100, 400)})
    assert tuple(tall["image"].shape) == (3, 320, 256) and "boxes" not in tall
    np.testing.assert_allclose(tall["box_scale"], [0.64, 0.64])


def test_collate_and_prepare_batch():
    items = [
        {"image": torch.rand(3, 8, 8), "boxes": np.ones((n, 4), np.float32), "labels": np.zeros(n), "index": i}
        for i, n in enumerate((2, 0, 5))
    ]
    batch = detection_collate(items)
    assert tuple(batch["image"].shape) == (3, 3, 8, 8) and batch["index"].tolist() == [0, 1, 2]
    assert [len(b) for b in batch["boxes"]] == [2, 0, 5]
    images, targets = PrepareDetectionBatch()(batch, "cpu")
    assert images.shape == (3, 3, 8, 8)
    assert [tuple(t["boxes"].shape) for t in targets] == [(2, 4), (0, 4), (5, 4)]
    assert all(t["labels"].dtype == torch.int64 and t["boxes"].dtype == torch.float32 for t in targets)
    assert [t["image_size"] for t in targets] == [(8, 8)] * 3
    with pytest.raises(KeyError, match="labels"):
        PrepareDetectionBatch()({"image": batch["image"], "boxes": batch["boxes"]})


def test_detection_map_against_monai_coco_metric():
    rng = np.random.default_rng(0)
    truth, preds = [], []
    for _ in range(4):
        xy = rng.uniform(0, 80, (5, 2))
        gt = np.concatenate([xy, xy + rng.uniform(8, 20, (5, 2))], 1)
        labels = rng.integers(0, 3, 5)
        truth.append({"boxes": torch.tensor(gt), "labels": torch.tensor(labels)})
        noisy = gt + rng.normal(0, 1.5, gt.shape)
        preds.append({"boxes": torch.tensor(noisy), "labels": torch.tensor(labels), "labels_scores": torch.rand(5)})
    classes = ["RBC", "WBC", "Platelets"]
    metric, metric_50 = DetectionMAP(classes), DetectionMAP(classes, iou=0.5)
    for m in (metric, metric_50):
        m(preds[:2], truth[:2])
        m(preds[2:], truth[2:])
    coco = COCOMetric(classes, iou_list=[0.5], iou_range=[0.5, 0.95, 0.05], max_detection=[100], verbose=False)
    results = coco(
        matching_batch(
            box_iou,
            coco.iou_thresholds,
            [p["boxes"].numpy() for p in preds],
            [p["labels"].numpy() for p in preds],
            [p["labels_scores"].numpy() for p in preds],
            [t["boxes"].numpy() for t in truth],
            [t["labels"].numpy() for t in truth],
        )
    )[0]
    assert metric.aggregate().item() == pytest.approx(results["mAP_IoU_0.50_0.95_0.05_MaxDet_100"])
    assert metric_50.aggregate().item() == pytest.approx(results["AP_IoU_0.50_MaxDet_100"])
    assert 0.2 < metric.aggregate().item() < metric_50.aggregate().item() <= 1.0  # noisy boxes miss the high IoUs
    assert metric.get_buffer().tolist() == [[5, 5]] * 4

    perfect = DetectionMAP(classes)
    perfect([{**t, "labels_scores": torch.ones(5)} for t in truth], truth)
    assert perfect.aggregate().item() == pytest.approx(1.0)
    empty = DetectionMAP(classes)
    empty([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0), "labels_scores": torch.zeros(0)}], truth[:1])
    assert empty.aggregate().item() == 0.0  # classes without ground truth in these images do not count
    one_class = DetectionMAP(classes)
    only_rbc = {"boxes": truth[0]["boxes"], "labels": torch.zeros(5, dtype=torch.int64)}
    one_class([{**only_rbc, "labels_scores": torch.ones(5)}], [only_rbc])
    assert one_class.aggregate().item() == pytest.approx(1.0)  # MONAI's own class average would give -1/3
    empty.reset()
    with pytest.raises(ValueError, match="seen no image"):
        empty.aggregate()
    with pytest.raises(ValueError, match="2 predictions for 1"):
        empty(preds[:2], truth[:1])


def test_matching_is_reused_only_for_the_same_unchanged_boxes(detector):
    detector.network.eval()
    images, targets = torch.rand(3, 3, *SIZE), _targets()
    loss, calls = PerImageDetectionLoss(detector), []
    match = detector.compute_anchor_matched_idxs
    detector.compute_anchor_matched_idxs = lambda *a: calls.append(1) or match(*a)
    pred = detector.network(images)
    loss(pred, targets)
    loss(pred, targets)
    assert len(calls) == 1
    targets[0]["boxes"][0, 2] += 10.0  # an in-place edit is seen
    torch.manual_seed(3)
    edited = loss.components(pred, targets)
    assert len(calls) == 2
    # equal boxes in new tensors: matched again
    copies = [{**t, "boxes": t["boxes"].clone(), "labels": t["labels"].clone()} for t in targets]
    torch.manual_seed(3)
    again = loss.components(pred, copies)
    assert len(calls) == 3 and all(torch.allclose(edited[k], again[k]) for k in edited)


def test_attack_hands_the_detection_components_to_the_criterion(detector):
    """The criterion judges the very losses each iterate ascended: one classification loss per image and iterate."""
    detector.network.train()
    images, targets = torch.rand(2, 3, *SIZE), _targets(2)
    loss, calls = PerImageDetectionLoss(detector), []
    compute = detector.compute_cls_loss
    detector.compute_cls_loss = lambda *a: calls.append(1) or compute(*a)
    criterion = LossThresholdCriterion(loss.components, {"classification": 0.0, "box_regression": math.inf})
    attack = PGD(loss, steps=3, alpha=2.5, random_start=False, train_mode=True)
    result = attack.attack(detector.network, images, targets, 1.0, criterion=criterion)
    assert len(calls) == 2 * (3 + 1)  # 3 gradient iterates and the final criterion-only one, 2 images each
    assert result.found.all()  # a classification loss above 0 is wrong from the first iterate
    calls.clear()
    unrelated = LossThresholdCriterion(lambda p, t: loss.components(p, t), criterion.thresholds)
    attack.attack(detector.network, images, targets, 1.0, criterion=unrelated)
    assert len(calls) == 2 * (3 + 3 + 1)  # judged from the prediction: computed again on each gradient iterate


def test_importing_the_package_patches_nothing_in_monai():
    """MONAI's detector module is changed only by building a detector through ``retinanet_detector``."""
    import subprocess
    import sys

    code = (
        "import monai.apps.detection.networks.retinanet_detector as r; before = r.Matcher; "
        "import monai_amat, monai_amat.networks, monai_amat.losses, monai_amat.data, monai_amat.apps.bundle; "
        "print(r.Matcher is before)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "True\n"
