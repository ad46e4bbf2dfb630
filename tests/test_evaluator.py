import json
import logging

import pytest
import torch
from monai.engines import SupervisedEvaluator
from monai.handlers import StatsHandler

from monai_amat.attacks import PGD
from monai_amat.engines import RobustEvaluator
from monai_amat.handlers import RobustnessReport, area_under_curve
from monai_amat.losses import PerSampleDiceCELoss
from tests.helpers import dice_metrics, dice_postprocessing, pretrain, seg_loader, small_unet, synthetic_seg_data


@pytest.fixture
def trained():
    data = synthetic_seg_data(8)
    net = small_unet()
    loss = PerSampleDiceCELoss()
    return data, pretrain(net, data, loss), loss


def test_robust_evaluator_metrics_per_eps_and_report(trained, tmp_path, caplog):
    data, net, loss = trained
    report = RobustnessReport(tmp_path, task="segmentation")
    stats = StatsHandler(iteration_log=False, name=None)  # logs through the engine's logger
    ev = RobustEvaluator(
        "cpu",
        seg_loader(data),
        net,
        PGD(loss, steps=5, alpha=2.5, random_start=False),
        [0, 1.0, 4.0],
        postprocessing=dice_postprocessing(),
        key_val_metric=dice_metrics(),
        val_handlers=[report, stats],
    )
    with caplog.at_level(logging.INFO), torch.no_grad():  # as inside a ValidationHandler: input gradients still
        ev.run()
    assert caplog.text.count("Metrics -- mean_dice") == 3  # one line per eps ...
    assert "best" not in caplog.text  # ... and no "best value" across noise levels
    assert ev.state.key_metric_name == "mean_dice"
    clean = SupervisedEvaluator(
        "cpu", seg_loader(data), net, postprocessing=dice_postprocessing(), key_val_metric=dice_metrics()
    )
    clean.run()
    dice = ev.state.robustness["metrics"]["mean_dice"]
    assert dice[0] == pytest.approx(clean.state.metrics["mean_dice"], abs=1e-6)
    assert dice[0] > dice[1] > dice[2]

    written = json.loads((tmp_path / "robustness.json").read_text())
    assert set(written) == {"task", "attack", "eps", "eps_scale", "metrics", "auc"}
    assert written["eps_scale"] == 1.0
    assert written["eps"] == [0.0, 1.0, 4.0] and written["metrics"]["mean_dice"] == pytest.approx(dice)
    assert written["attack"]["norm"] == "l2" and written["attack"]["steps"] == 5
    expected_auc = (dice[0] + dice[1]) / 2 * 1.0 + (dice[1] + dice[2]) / 2 * 3.0
    assert written["auc"]["mean_dice"] == pytest.approx(expected_auc)
    png = (tmp_path / "robustness.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["robustness.json", "robustness.png"]


def test_area_under_curve():
    assert area_under_curve([0, 1, 3], [1, 1, 0]) == pytest.approx(2.0)
    assert area_under_curve([0], [0.7]) == 0.0


@pytest.mark.parametrize(
    "eps, match", [([], "at least one"), ([0, -1], ">= 0"), ([0, 2, 1], "ascending"), ([0, 0], "ascending")]
)
def test_bad_eps_list(trained, eps, match):
    data, net, loss = trained
    with pytest.raises(ValueError, match=f"eps_list.*{match}|{match}"):
        RobustEvaluator("cpu", seg_loader(data), net, PGD(loss), eps)


def test_report_names_a_missing_metric(trained, tmp_path):
    data, net, loss = trained
    ev = RobustEvaluator(
        "cpu",
        seg_loader(data[:4]),
        net,
        PGD(loss, steps=1),
        [0],
        postprocessing=dice_postprocessing(),
        key_val_metric=dice_metrics(),
        val_handlers=[RobustnessReport(tmp_path, "segmentation", ["hd95"])],
    )
    with pytest.raises(KeyError, match="hd95"):
        ev.run()
    assert not any(tmp_path.iterdir())
