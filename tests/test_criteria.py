import math

import numpy as np
import pytest
import torch

from monai_amat.criteria import (
    DiceCriterion,
    LossThresholdCriterion,
    calibrate_dice_tau,
    calibrate_thresholds,
    channel_argmax,
    hard_dice,
    holds_every_class,
    huber_location_scale,
    load_thresholds,
    save_thresholds,
)


def _logits(labels, classes):
    return torch.nn.functional.one_hot(labels, classes).movedim(-1, 1).float() * 10


def test_hard_dice_by_hand():
    y = torch.zeros(3, 1, 4, 4, dtype=torch.long)
    y[:, 0, :2, :2] = 1  # 4 foreground pixels
    p = torch.zeros(3, 4, 4, dtype=torch.long)
    p[0, :2, :2] = 1  # perfect
    p[1, :2, :1] = 1  # 2 of 4, no false positive: 2*2 / (2+4)
    p[2, 3, 3] = 1  # one false positive only: 0
    d = hard_dice(_logits(p, 2), y)
    assert d.shape == (3, 1)
    assert torch.allclose(d[:, 0], torch.tensor([1.0, 4 / 6, 0.0]))
    # the smoothed variant is an option: (2*2+1)/(2+4+1), (0+1)/(1+4+1)
    assert torch.allclose(hard_dice(_logits(p, 2), y, smooth=1.0)[:, 0], torch.tensor([1.0, 5 / 7, 1 / 6]))
    # empty label: 0 whatever the prediction (unsmoothed); 1 for an empty prediction when smoothed
    empty = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    pe = torch.zeros(2, 4, 4, dtype=torch.long)
    pe[1, 0, 0] = 1
    assert hard_dice(_logits(pe, 2), empty)[:, 0].tolist() == [0.0, 0.0]
    assert torch.allclose(hard_dice(_logits(pe, 2), empty, smooth=1.0)[:, 0], torch.tensor([1.0, 0.5]))


def _authors_dice_max(logits, label, classes):
    """getOnlineDiceMax of the authors' nnU-Net code, re-written with numpy for one sample."""
    seg = logits.argmax(0).numpy()
    gt = label[0].numpy()
    values = []
    for c in range(1, classes):
        tp = np.sum((seg == c) & (gt == c))
        fp = np.sum((seg == c) & (gt != c))
        fn = np.sum((seg != c) & (gt == c))
        values.append(2 * tp / (2 * tp + fp + fn + 1e-8))
    return max(values)


def test_dice_criterion_is_the_authors_formula_on_random_tensors():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 3, 8, 8, generator=g)
    labels = torch.randint(0, 3, (16, 1, 8, 8), generator=g)
    labels[:4] = 0  # background-only slices
    labels[4:8][labels[4:8] == 2] = 0  # slices lacking class 2
    crit = DiceCriterion(tau=0.3)
    got = crit.dice(logits, labels)
    want = torch.tensor([_authors_dice_max(logits[i], labels[i], 3) for i in range(16)], dtype=torch.float32)
    assert torch.allclose(got, want, atol=1e-6)
    assert got[:4].tolist() == [0.0] * 4  # no foreground: never correct
    assert not crit(logits, labels)[:4].any()
    assert torch.equal(crit(logits, labels), want >= 0.3)


def test_empty_slice_with_empty_prediction_is_wrong_and_a_missing_class_scores_zero():
    empty = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    perfect_empty = _logits(torch.zeros(1, 4, 4, dtype=torch.long), 3)
    assert DiceCriterion(tau=0.0)(perfect_empty, empty).tolist() == [True]  # tau 0 accepts anything
    assert DiceCriterion(tau=0.01)(perfect_empty, empty).tolist() == [False]
    assert DiceCriterion(tau=0.01, smooth=1.0)(perfect_empty, empty).tolist() == [True]  # the departure
    y = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    y[0, 0, :2, :2] = 1  # class 2 absent from the slice
    d = hard_dice(_logits(y[:, 0], 3), y)
    assert d.tolist() == [[1.0, 0.0]]
    assert DiceCriterion(tau=0.9)(_logits(y[:, 0], 3), y).tolist() == [True]  # max picks the present class
    assert DiceCriterion(tau=0.9, reduction="mean")(_logits(y[:, 0], 3), y).tolist() == [False]
    assert holds_every_class(y, 3).tolist() == [False]
    y[0, 0, 3, 3] = 2
    assert holds_every_class(y, 3).tolist() == [True]
    assert holds_every_class(torch.nn.functional.one_hot(y[:, 0], 3).movedim(-1, 1), 3).tolist() == [True]


def test_dice_criterion_max_over_foreground_and_deep_supervision():
    y = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    y[0, 0, :2, :2] = 1
    y[0, 0, 2:, 2:] = 2
    p = y[:, 0].clone()
    p[0, 2:, 2:] = 0  # class 2 missed entirely, class 1 perfect
    logits = _logits(p, 3)
    assert DiceCriterion(tau=0.9)(logits, y).tolist() == [True]
    assert DiceCriterion(tau=0.9, reduction="mean")(logits, y).tolist() == [False]
    stacked = torch.stack([logits, torch.zeros_like(logits)], dim=1)  # DynUNet's (B, S, C, H, W)
    assert DiceCriterion(tau=0.9)(stacked, y).tolist() == [True]
    assert DiceCriterion(tau=0.9)([logits, logits[..., ::2, ::2]], y).tolist() == [True]
    with pytest.raises(ValueError, match="tau"):
        DiceCriterion(tau=1.5)
    with pytest.raises(ValueError, match="smoothing"):
        DiceCriterion(tau=0.5, smooth=-1)


def test_loss_threshold_criterion():
    def components(pred, target):
        return {"box": pred[:, 0], "cls": pred[:, 1]}

    crit = LossThresholdCriterion(components, {"box": 1.0, "cls": 0.5})
    pred = torch.tensor([[0.5, 0.1], [1.5, 0.1], [0.5, 0.6], [1.0, 0.5]])
    assert crit(pred, None).tolist() == [True, False, False, True]
    with pytest.raises(KeyError, match="obj"):
        LossThresholdCriterion(components, {"box": 1.0, "obj": 1.0})(pred, None)


def test_huber_matches_statsmodels():
    from statsmodels.robust.scale import Huber

    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(2.0, 0.5, 200), rng.normal(30, 1, 10)])  # 5% outliers
    mu, s = huber_location_scale(values)
    ref_mu, ref_s = Huber()(values)
    assert mu == pytest.approx(float(ref_mu), rel=1e-6) and s == pytest.approx(float(ref_s), rel=1e-6)
    assert abs(mu - 2.0) < 0.2 < abs(values.mean() - 2.0)  # robust to the outliers
    assert huber_location_scale([1.0, 1.0, 1.0, 5.0]) == (1.0, 0.0)
    with pytest.raises(ValueError, match="finite"):
        huber_location_scale([1.0, math.nan])


def test_calibration_and_thresholds_file(tmp_path):
    rng = np.random.default_rng(1)
    losses = {"heatmap": torch.tensor(rng.normal(0.3, 0.05, 100)), "offset": torch.tensor(rng.normal(2.0, 0.5, 100))}
    thr = calibrate_thresholds(losses, z=2.0)
    for k, v in losses.items():
        mu, s = huber_location_scale(v)
        assert thr[k] == pytest.approx(mu + 2 * s)
        assert float(v.mean()) < thr[k] < float(v.max()) + 1
    # the authors' detection statistic: each component's largest loss
    largest = {k: pytest.approx(float(v.max())) for k, v in losses.items()}
    assert calibrate_thresholds(losses, statistic="max") == largest
    with pytest.raises(ValueError, match="statistic"):
        calibrate_thresholds(losses, statistic="median")
    with pytest.raises(ValueError, match="'heatmap'"):
        calibrate_thresholds({"heatmap": [1.0, math.inf]}, statistic="max")
    assert calibrate_dice_tau(torch.tensor([0.9, 0.8, 1.0, 0.2]), torch.tensor([True, True, False, False])) == (
        pytest.approx(0.85)
    )
    with pytest.raises(ValueError, match="no sample contains every foreground class"):
        calibrate_dice_tau(torch.tensor([1.0]), torch.tensor([False]))
    path = tmp_path / "thresholds.json"
    save_thresholds(path, "loss_threshold", thr, 2.0, "model.pt", "train", 100)
    data = load_thresholds(path)
    assert data["thresholds"] == pytest.approx(thr) and data["z"] == 2.0 and data["model"] == "model.pt"
    assert data["split"] == "train" and data["samples"] == 100
    assert [p.name for p in tmp_path.iterdir()] == ["thresholds.json"]  # no temporary file left behind
    (tmp_path / "bad.json").write_text('{"criterion": "dice"}')
    with pytest.raises(ValueError, match=r"bad.json: missing key\(s\) \['thresholds'\]"):
        load_thresholds(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        load_thresholds(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_thresholds(tmp_path / "missing.json")


def test_channel_argmax_matches_torch():
    logits = torch.randn(3, 4, 5, 6)
    logits[0, 2] = logits[0, 1]  # ties go to the first maximum, as torch.argmax
    assert torch.equal(channel_argmax(logits), logits.argmax(1))


def test_calibration_handler_takes_the_mean_dice_over_slices_holding_every_class(tmp_path):
    from ignite.engine import Engine

    from monai_amat.handlers import CalibrationHandler

    label = torch.zeros(4, 1, 4, 4, dtype=torch.long)
    label[:, 0, 0, :2] = 1
    label[:, 0, 3, :2] = 2
    label[2, 0, 3, :2] = 0  # slice 2 lacks class 2: skipped
    label[3] = 0  # slice 3 has no foreground: skipped
    pred = label[:, 0].clone()
    pred[0, 0, 1] = 0  # slice 0: class 1 Dice 2/3, class 2 Dice 1 -> mean 5/6
    pred[1, 1, 1] = 2  # slice 1: class 1 Dice 1, class 2 Dice 4/5 -> mean 9/10
    batches = [{"pred": _logits(pred, 3), "label": label}]
    handler = CalibrationHandler(tmp_path / "thresholds.json", mode="dice", model="std.pt", split="val")
    engine = Engine(lambda e, batch: batch)
    handler.attach(engine)
    engine.run(batches, max_epochs=1)
    data = load_thresholds(tmp_path / "thresholds.json")
    assert data["thresholds"]["tau"] == pytest.approx((5 / 6 + 9 / 10) / 2, abs=1e-6)
    assert data["split"] == "val" and data["samples"] == 4 and data["criterion"] == "dice" and data["z"] is None


def test_calibration_handler_gathers_the_ranks_values_and_takes_an_output_transform(tmp_path, monkeypatch):
    """Under torch.distributed the thresholds rest on every rank's samples (here a second rank's, simulated)."""
    from ignite.engine import Engine

    import monai_amat.handlers.calibration as calibration
    from monai_amat.handlers import CalibrationHandler

    other_rank = {"heat": torch.tensor([10.0, 10.0, 10.0, 10.0])}
    monkeypatch.setattr(calibration, "gather_objects", lambda mine: [mine, other_rank])
    components = {"heat": torch.tensor([1.0, 1.0, 1.0, 1.0])}
    handler = CalibrationHandler(
        tmp_path / "thresholds.json",
        mode="loss",
        components_fn=lambda pred, label: {"heat": pred},
        output_transform=lambda output: (output["logits"], output["y"]),  # another engine's output keys
    )
    engine = Engine(lambda e, batch: batch)
    handler.attach(engine)
    engine.run([{"logits": components["heat"], "y": None}], max_epochs=1)
    data = load_thresholds(tmp_path / "thresholds.json")
    assert data["samples"] == 8 and data["criterion"] == "loss_threshold"
    mu, scale = huber_location_scale(torch.cat([components["heat"], other_rank["heat"]]))
    assert data["thresholds"]["heat"] == pytest.approx(mu + 2.0 * scale)
