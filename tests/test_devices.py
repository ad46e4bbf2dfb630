"""What runs on a network's output stays on that output's device.

This machine and CI have no GPU. PyTorch's ``meta`` device stands in for one: an op that mixes a meta tensor with
a CPU tensor raises, as a CUDA tensor mixed with a CPU one does (the landmark decoding built its pixel grid on the
CPU, which only a GPU run showed). Only shapes travel on ``meta``: reading a value back to the host (``.item()``,
``if tensor.any()``) raises there too, so an attack that runs on ``meta`` makes the GPU wait for nothing inside its
loop. The engines read values back by design (margins, skipped batches) and run on a GPU in
``benchmarks/gpu_session.sh``; the detection loss's anchor matching (MONAI's) reads back too.
"""

import pytest
import torch
from monai.networks.nets import DynUNet

from monai_amat.attacks import APGD, PGD
from monai_amat.criteria import DiceCriterion, LossThresholdCriterion
from monai_amat.losses import PerSampleDiceCELoss, PerSampleLandmarkLoss, SegPGDLoss
from monai_amat.metrics import LandmarkErrorMetric
from monai_amat.transforms import DecodeLandmarks, decode_landmarks

DEVICE = "meta"


def test_landmark_decoding_and_errors_stay_on_the_prediction_device():
    pred = torch.randn(2, 3 * 19, 16, 12, device=DEVICE)
    points = decode_landmarks(pred, radius=3.0)
    assert points.device.type == DEVICE and points.shape == (2, 19, 2)
    in_image = DecodeLandmarks(radius_ratio=0.05)(pred[0], orig_size=(40, 32))  # scaled back to the image
    assert in_image.device.type == DEVICE and in_image.shape == (19, 2)
    errors = LandmarkErrorMetric(spacing=0.1)(points, torch.zeros(2, 19, 2))  # true landmarks come from the CPU
    assert errors.device.type == DEVICE and errors.shape == (2, 19)


def test_landmark_loss_and_criterion_stay_on_the_prediction_device():
    loss = PerSampleLandmarkLoss()
    pred, target = torch.randn(2, 57, 16, 12, device=DEVICE), torch.rand(2, 57, 16, 12, device=DEVICE)
    assert {v.device.type for v in loss.components(pred, target).values()} == {DEVICE}
    criterion = LossThresholdCriterion(loss.components, {"heatmap": 0.5, "offset_x": 0.2, "offset_y": 0.2})
    correct = criterion(pred, target)
    assert correct.device.type == DEVICE and correct.dtype == torch.bool and correct.shape == (2,)


@pytest.mark.parametrize("loss", [PerSampleDiceCELoss(), SegPGDLoss()], ids=["dice_ce", "segpgd"])
def test_segmentation_losses_and_dice_criterion_stay_on_the_prediction_device(loss):
    pred = torch.randn(2, 3, 16, 12, device=DEVICE)
    label = torch.zeros(2, 1, 16, 12, device=DEVICE)
    assert loss(pred, label).device.type == DEVICE
    correct = DiceCriterion(0.8)(pred, label)
    assert correct.device.type == DEVICE and correct.shape == (2,)


@pytest.mark.parametrize("attack", [PGD, APGD])
@pytest.mark.parametrize("task", ["segmentation", "landmarks"])
def test_attacks_with_a_criterion_never_wait_for_the_device(attack, task):
    """Every iterate checked (AMAT's attack), bisection included, with the per-sample eps from the CPU margin table:
    the whole attack runs on ``meta``, so nothing in it reads a value back from the device."""
    if task == "segmentation":
        loss, criterion, channels = PerSampleDiceCELoss(), DiceCriterion(0.8), 3
        target = torch.zeros(2, 1, 16, 16, device=DEVICE)
    else:
        loss, channels = PerSampleLandmarkLoss(), 3 * 19
        criterion = LossThresholdCriterion(loss.components, {"heatmap": 0.5, "offset_x": 0.2, "offset_y": 0.2})
        target = torch.rand(2, channels, 16, 16, device=DEVICE)
    net = DynUNet(2, 1, channels, [3, 3, 3], [1, 2, 2], [2, 2]).to(DEVICE)
    x = torch.rand(2, 1, 16, 16, device=DEVICE)
    result = attack(loss, steps=3).attack(
        net, x, target, eps=torch.tensor([1.0, 2.0]), criterion=criterion, bisection_steps=2
    )
    for name in ("adv", "found", "noise_norm", "boundary_norm", "start_wrong"):
        assert getattr(result, name).device.type == DEVICE, name
    with pytest.raises(ValueError, match=r"eps must be finite and >= 0, got \[-1.0\]"):  # still checked, on the CPU
        attack(loss, steps=3).attack(net, x, target, eps=torch.tensor([1.0, -1.0]), criterion=criterion)
