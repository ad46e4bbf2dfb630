import numpy as np
import pytest
import torch

from monai_amat.attacks import PGD
from monai_amat.criteria import LossThresholdCriterion
from monai_amat.losses import PerSampleLandmarkLoss
from monai_amat.metrics import LandmarkErrorMetric
from monai_amat.transforms import (
    DecodeLandmarksd,
    LandmarkTargetd,
    ResizeWithLandmarksd,
    decode_landmarks,
    landmark_target,
)


def test_target_disks_and_offsets():
    lm = torch.tensor([[10.0, 5.0], [3.0, 12.0]])
    t = landmark_target(lm, (20, 16), radius=2.0)
    assert t.shape == (6, 20, 16)
    assert t[0, 5, 10] == 1 and t[0, 5, 13] == 0 and t[0, 7, 10] == 1 and t[0, 8, 10] == 0
    assert t[2, 5, 9] == pytest.approx(0.5) and t[4, 4, 10] == pytest.approx(0.5)  # (landmark - pixel) / r
    assert torch.all(t[2:4][t[0:2].repeat(1, 1, 1) == 0] == 0)  # offsets vanish outside the disks
    assert torch.all(t[2:].abs() <= 1)


def test_decode_inverts_the_target_at_subpixel_positions():
    lm = torch.tensor([[10.3, 5.6], [3.2, 12.9], [14.0, 17.5]])
    t = landmark_target(lm, (20, 16), radius=3.0)
    logits = torch.cat([(t[:3] * 2 - 1) * 10, t[3:]])[None]  # a perfect network
    assert torch.allclose(decode_landmarks(logits, radius=3.0)[0], lm, atol=1e-4)


def test_resize_scales_landmarks_and_keeps_the_original_size():
    image = np.zeros((1, 240, 190), dtype=np.float32)
    lm = np.array([[95.0, 120.0], [0.0, 0.0]], dtype=np.float32)
    d = ResizeWithLandmarksd("image", spatial_size=(200, 160))({"image": image, "landmarks": lm})
    assert tuple(d["image"].shape) == (1, 200, 160) and tuple(d["orig_size"]) == (240, 190)
    assert np.allclose(d["landmarks"][0], [95 * 160 / 190, 120 * 200 / 240])
    d = LandmarkTargetd(radius_ratio=0.05)(d)
    assert d["target"].shape == (6, 200, 160) and d["target"][0].sum() > 0


def test_loss_components_and_criterion():
    lm = torch.tensor([[[8.0, 8.0]], [[4.0, 10.0]]])
    target = torch.stack([landmark_target(x, (16, 16), 3.0) for x in lm])
    perfect = torch.cat([(target[:, :1] * 2 - 1) * 20, target[:, 1:]], dim=1)
    loss = PerSampleLandmarkLoss()
    c = loss.components(perfect, target)
    assert set(c) == {"heatmap", "offset_x", "offset_y"} and all(v.shape == (2,) for v in c.values())
    assert torch.all(c["heatmap"] < 0.01) and torch.all(c["offset_x"] < 1e-6)
    worse = perfect.clone()
    worse[1, 1] += 0.5  # x offsets of sample 1 off by 0.5 everywhere
    cw = loss.components(worse, target)
    assert cw["offset_x"][1] == pytest.approx(0.5) and cw["offset_x"][0] < 1e-6
    assert loss(worse, target)[1] > loss(worse, target)[0]
    crit = LossThresholdCriterion(loss.components, {"heatmap": 0.1, "offset_x": 0.1, "offset_y": 0.1})
    assert crit(worse, target).tolist() == [True, False]


def test_attack_raises_the_landmark_loss():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 3, padding=1))
    x = torch.randn(2, 1, 16, 16)
    target = torch.stack([landmark_target(torch.tensor([[8.0, 8.0]]), (16, 16), 3.0)] * 2)
    loss = PerSampleLandmarkLoss()
    adv = PGD(loss, steps=5, alpha=5.0, random_start=False)(net, x, target, 2.0)
    with torch.no_grad():
        assert torch.all(loss(net(adv), target) > loss(net(x), target))


def test_mre_and_sdr():
    truth = torch.zeros(2, 3, 2)
    pred = truth.clone()
    pred[0, 0, 0] = 10  # 1 mm at 0.1 mm per pixel
    pred[1, 2, 1] = 30  # 3 mm
    mre, sdr2 = LandmarkErrorMetric(0.1), LandmarkErrorMetric(0.1, sdr_mm=2.0)
    for m in (mre, sdr2):
        m(list(pred), list(truth))  # decollated: one (K, 2) per sample
    assert mre.aggregate().item() == pytest.approx(4 / 6)
    assert sdr2.aggregate().item() == pytest.approx(5 / 6)
    assert mre.errors().shape == (2, 3)
    with pytest.raises(ValueError, match="differ in shape"):
        LandmarkErrorMetric()(torch.zeros(1, 3, 2), torch.zeros(1, 2, 2))


def test_decode_post_transform_maps_back_to_original_pixels():
    lm = np.array([[95.0, 120.0], [30.0, 200.0]], dtype=np.float32)
    d = {"image": np.zeros((1, 240, 190), dtype=np.float32), "landmarks": lm, "landmarks_orig": lm.copy()}
    d = LandmarkTargetd(radius_ratio=0.05)(ResizeWithLandmarksd("image", spatial_size=(200, 160))(d))
    t = torch.as_tensor(d["target"])
    d["pred"] = torch.cat([(t[:2] * 2 - 1) * 10, t[2:]])
    out = DecodeLandmarksd(radius_ratio=0.05)(d)
    assert torch.allclose(out["pred_landmarks"], torch.as_tensor(lm), atol=1e-3)
    assert torch.equal(out["true_landmarks"], torch.as_tensor(lm))


def test_attack_hands_the_landmark_components_to_the_criterion(monkeypatch):
    """The criterion judges the components each iterate's loss summed: computed once, with the same values."""
    import monai_amat.losses as losses

    calls = []
    split = losses.split_landmark_output
    monkeypatch.setattr(losses, "split_landmark_output", lambda t: calls.append(1) or split(t))
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 6, 3, padding=1)
    x, target = torch.rand(2, 1, 12, 10), torch.rand(2, 6, 12, 10)
    loss = PerSampleLandmarkLoss()
    seen = []
    criterion = LossThresholdCriterion(loss.components, {"heatmap": 0.9, "offset_x": 1.0, "offset_y": 1.0})
    check = criterion.check
    monkeypatch.setattr(criterion, "check", lambda parts: seen.append(parts) or check(parts))
    assert criterion.judges(loss) and not criterion.judges(PerSampleLandmarkLoss())
    PGD(loss, steps=3, alpha=2.5, random_start=False).attack(net, x, target, 0.5, criterion=criterion)
    # 3 gradient iterates, each split once for the prediction and once for the target, and a final criterion-only
    # iterate; judging again from the prediction would split twice more per gradient iterate
    assert len(calls) == 2 * 3 + 2 and len(seen) == 4
    assert seen[0]["heatmap"].requires_grad  # the very tensors the loss summed for the gradient
    unrelated = LossThresholdCriterion(lambda p, t: loss.components(p, t), criterion.thresholds)
    calls.clear()
    PGD(loss, steps=3, alpha=2.5, random_start=False).attack(net, x, target, 0.5, criterion=unrelated)
    assert len(calls) == 2 * 3 + 2 * 4  # not the loss's own components: judged from the prediction


def test_landmark_writer_gathers_the_ranks_rows_and_writes_each_image_once(tmp_path, monkeypatch):
    from ignite.engine import Engine
    from monai.data import MetaTensor
    from PIL import Image

    import monai_amat.handlers.landmark_writers as writers

    paths = []
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((8, 10), np.uint8)).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    # rank 1 (simulated) inferred image b, and a repeat of a that a DistributedSampler added to even out the ranks
    other_rank = ["b.png,1,2.00,3.00,0.200,0.300\n", "a.png,1,1.00,1.00,0.100,0.100\n"]
    monkeypatch.setattr(writers, "gather_objects", lambda rows: [list(rows), other_rank])
    writer = writers.LandmarkWriter(
        tmp_path / "out",
        key="points",
        output_transform=lambda output: output["items"],  # another engine's output layout
        batch_transform=lambda batch: batch["items"],
    )
    (tmp_path / "out").mkdir()
    image = MetaTensor(torch.zeros(1, 8, 10), meta={"filename_or_obj": paths[0]})
    engine = Engine(lambda e, b: {"items": [{"points": torch.tensor([[1.0, 1.0]])}]})
    writer.attach(engine)
    engine.run([{"items": [{"image": image}]}], max_epochs=1)
    lines = (tmp_path / "out" / "landmarks.csv").read_text().splitlines()
    assert lines == ["image,landmark,x_px,y_px,x_mm,y_mm", "a.png,1,1.00,1.00,0.100,0.100", other_rank[0].strip()]
    assert (tmp_path / "out" / "a_landmarks.png").is_file()  # this rank's overlay; rank 1 draws b's


def test_array_versions_aliases_and_missing_keys():
    from monai_amat.transforms import (
        DecodeLandmarks,
        LandmarkTarget,
        LandmarkTargetD,
        LandmarkTargetDict,
        ResizeWithBoxesD,
        ResizeWithBoxesd,
        ResizeWithLandmarksDict,
    )

    lm = torch.tensor([[10.0, 5.0], [3.0, 12.0]])
    target = LandmarkTarget(0.1)(lm, (20, 16))
    assert torch.equal(target, landmark_target(lm, (20, 16), radius=2.0))
    # the target read as a (perfect) prediction decodes to the landmarks, and to a 2x larger original image's pixels
    logits = torch.cat([target[:2] * 20 - 10, target[2:]])
    assert torch.allclose(DecodeLandmarks(0.1)(logits), lm, atol=1e-3)
    assert torch.allclose(DecodeLandmarks(0.1)(logits, (40, 32)), lm * 2, atol=1e-3)
    assert LandmarkTargetD is LandmarkTargetDict is LandmarkTargetd and ResizeWithBoxesD is ResizeWithBoxesd
    image = {"image": torch.zeros(1, 40, 32)}
    assert ResizeWithLandmarksDict(["image", "other"], spatial_size=(20, 16), allow_missing_keys=True)(image)[
        "image"
    ].shape == (1, 20, 16)
    assert "target" not in LandmarkTargetd(allow_missing_keys=True)(image)  # inference data: no landmarks
    with pytest.raises(KeyError):
        LandmarkTargetd()(image)


def test_resize_transforms_invert_through_monai_applied_operations():
    from monai.data import MetaTensor
    from monai.transforms import Compose, Invertd

    from monai_amat.transforms import ResizeWithBoxesd

    image = MetaTensor(torch.rand(1, 40, 30))
    lm = np.array([[10.0, 5.0], [3.0, 36.0]], np.float32)
    resize = ResizeWithLandmarksd("image", spatial_size=(20, 16))
    out = resize({"image": image, "landmarks": lm})
    assert out["image"].shape == (1, 20, 16) and len(out["image"].applied_operations) == 1
    back = resize.inverse(out)
    assert back["image"].shape == (1, 40, 30) and not back["image"].applied_operations
    np.testing.assert_allclose(back["landmarks"], lm, rtol=1e-5)

    boxes = np.array([[4.0, 6.0, 20.0, 28.0]], np.float32)
    pipeline = Compose([ResizeWithBoxesd("image", spatial_size=(32, 32))])
    original = MetaTensor(torch.rand(1, 40, 30))
    out = pipeline({"image": original, "boxes": boxes})
    assert out["image"].shape == (1, 32, 32)  # fitted (factor 0.8) and padded at the end
    back = pipeline.inverse(out)
    assert back["image"].shape == (1, 40, 30)
    np.testing.assert_allclose(back["boxes"], boxes, rtol=1e-5)
    # MONAI's Invertd maps a prediction on the network grid back to the original image through the same operations
    out = pipeline({"image": original, "boxes": boxes})
    out["pred"] = out["image"].clone()
    inverted = Invertd("pred", transform=pipeline, orig_keys="image")(out)
    assert inverted["pred"].shape == (1, 40, 30)
