import pytest
import torch
from monai.data import MetaTensor

from monai_amat.attacks import APGD, PGD, apgd_checkpoints, per_sample_norm
from monai_amat.losses import PerSampleDiceCELoss, SegPGDLoss
from tests.helpers import TinyClassifier, per_sample_ce, seg_batch, small_unet, trained_unet


def test_checkpoints_follow_the_paper():
    # p = 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 (Croce & Hein 2020, section 3.2)
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(1) == [1]
    points = apgd_checkpoints(37)
    assert points == sorted(set(points)) and 1 <= points[0] and points[-1] <= 37


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_apgd_stays_in_ball_and_value_range(norm):
    x, y = seg_batch()
    net, loss = trained_unet(x, y)
    lo, hi = float(x.min()), float(x.max())
    eps = torch.tensor([0.0, 0.5, 2.0, 4.0]) if norm == "l2" else torch.tensor([0.0, 0.01, 0.05, 0.1])
    adv = APGD(loss, norm=norm, steps=10, value_range=(lo, hi), restarts=2)(net, x, y, eps)
    assert adv.shape == x.shape and not adv.requires_grad
    assert torch.all(per_sample_norm(adv - x, norm) <= eps * (1 + 1e-5) + 1e-6)
    assert adv.min() >= lo and adv.max() <= hi
    assert torch.equal(adv[0], x[0])
    with torch.no_grad():
        assert torch.all(loss(net(adv), y)[1:] > loss(net(x), y)[1:])


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_apgd_at_least_as_strong_as_pgd(norm):
    x, y = seg_batch(n=8)
    net, loss = trained_unet(x, y)
    eps = 2.0 if norm == "l2" else 0.05
    steps = 20
    torch.manual_seed(0)
    pgd = PGD(loss, norm=norm, steps=steps, alpha=2.5, random_start=False)(net, x, y, eps)
    torch.manual_seed(0)
    apgd = APGD(loss, norm=norm, steps=steps, random_start=False)(net, x, y, eps)
    with torch.no_grad():
        assert loss(net(apgd), y).mean() >= loss(net(pgd), y).mean()


def test_apgd_returns_the_best_iterate():
    torch.manual_seed(0)
    net = TinyClassifier().eval()
    x, y = torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    seen = []

    def spy(pred, target):
        value = per_sample_ce(pred, target)
        seen.append(value.detach().clone())
        return value

    adv = APGD(spy, steps=12, restarts=2)(net, x, y, 1.0)
    assert len(seen) == 2 * 13  # per restart: the start and one evaluation per iteration
    with torch.no_grad():
        assert torch.allclose(per_sample_ce(net(adv), y), torch.stack(seen).amax(0), atol=1e-5)


def test_apgd_criterion_3d_metatensor_and_network_state():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8, 8)
    y = (x > 0.5).float()
    net = small_unet(dims=3)
    net.train()
    running = [b.clone() for b in net.buffers()]
    mx = MetaTensor(x, meta={"filename_or_obj": "case_0.nii.gz"})
    calls = []

    def never_correct(pred, target):
        calls.append(1)
        return torch.zeros(pred.shape[0], dtype=torch.bool)

    res = APGD(PerSampleDiceCELoss(), steps=3).attack(net, mx, y, 1.0, criterion=never_correct)
    assert isinstance(res.adv, MetaTensor) and res.adv.meta["filename_or_obj"] == "case_0.nii.gz"
    assert len(calls) == 4 and res.found.all() and res.start_wrong.all()
    assert net.training and all(p.grad is None for p in net.parameters())
    assert all(torch.equal(a, b) for a, b in zip(running, net.buffers()))


def test_loss_is_told_the_progress():
    class Spy:
        def __init__(self):
            self.progress = []

        def set_progress(self, fraction):
            self.progress.append(fraction)

        def __call__(self, pred, target):
            return per_sample_ce(pred, target)

    net = TinyClassifier().eval()
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    spy = Spy()
    PGD(spy, steps=4)(net, x, y, 0.5)
    assert spy.progress == [0.0, 0.25, 0.5, 0.75]
    spy = Spy()
    APGD(spy, steps=4)(net, x, y, 0.5)
    assert spy.progress == [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize(
    "kwargs, match", [({"rho": 0.0}, "rho"), ({"restarts": 0}, "restarts"), ({"steps": 0}, "steps")]
)
def test_apgd_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        APGD(per_sample_ce, **kwargs)


def test_segpgd_loss_weights_correct_then_wrong_pixels():
    logits = torch.zeros(1, 2, 1, 4)
    logits[0, 1, 0, :2] = 3.0  # pixels 0, 1 predicted foreground
    target = torch.tensor([[[[1, 0, 1, 0]]]]).float()  # pixel 0 correct fg, 1 wrong, 2 wrong, 3 correct bg
    ce = torch.nn.functional.cross_entropy(logits, target[:, 0].long(), reduction="none").flatten()
    correct = torch.tensor([True, False, False, True])
    loss = SegPGDLoss()
    assert torch.allclose(loss(logits, target), ce[correct].sum() / 4)  # first step: correct pixels only
    loss.set_progress(1.0)
    assert torch.allclose(loss(logits, target), (ce[correct].sum() + ce[~correct].sum()) / 8)
    loss.set_progress(0.5)
    assert torch.allclose(loss(logits, target), (0.75 * ce[correct].sum() + 0.25 * ce[~correct].sum()) / 4)
    with pytest.raises(ValueError, match="progress"):
        loss.set_progress(1.5)


def test_segpgd_attack_lowers_dice():
    x, y = seg_batch()
    net, task_loss = trained_unet(x, y)
    adv = PGD(SegPGDLoss(), steps=10, alpha=2.5)(net, x, y, 2.0)
    with torch.no_grad():
        assert task_loss(net(adv), y).mean() > task_loss(net(x), y).mean()
        assert (net(adv).argmax(1) != y[:, 0]).sum() > (net(x).argmax(1) != y[:, 0]).sum()


def test_apgd_restarts_start_at_random_and_start_wrong_is_the_first_iterate():
    torch.manual_seed(0)
    net = TinyClassifier().eval()
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    seen = []

    def forward(v):
        seen.append(v.detach().clone())
        return net(v)

    APGD(per_sample_ce, steps=3, random_start=False, restarts=2)(net, x, y, 1.0, forward_fn=forward)
    assert torch.equal(seen[0], x) and not torch.equal(seen[4], x)  # restart 2 starts at random in the ball

    def wrong_once_moved(pred, target):
        return torch.tensor([bool(torch.equal(seen[-1], x))] * 4)

    seen.clear()
    res = APGD(per_sample_ce, steps=3, random_start=False).attack(
        net, x, y, 1.0, criterion=wrong_once_moved, forward_fn=forward
    )
    assert res.found.all() and not res.start_wrong.any()
