import pytest
import torch
import torchattacks  # test-only dependency: pip install --no-deps torchattacks
from monai.data import MetaTensor

from monai_amat.attacks import PGD, per_sample_norm
from monai_amat.losses import PerSampleDiceCELoss
from tests.helpers import TinyClassifier, per_sample_ce, seg_batch, small_unet, trained_unet


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_stays_in_per_sample_ball_and_raises_loss(norm):
    x, y = seg_batch()
    net, loss = trained_unet(x, y)
    eps = torch.tensor([0.0, 0.5, 2.0, 4.0]) if norm == "l2" else torch.tensor([0.0, 0.01, 0.05, 0.1])
    adv = PGD(loss, norm=norm, steps=10, alpha=2.5)(net, x, y, eps)
    assert adv.shape == x.shape and not adv.requires_grad
    n = per_sample_norm(adv - x, norm)
    assert torch.all(n <= eps * (1 + 1e-5) + 1e-6), (n, eps)
    assert torch.equal(adv[0], x[0])  # eps 0 gives the clean input back
    with torch.no_grad():
        clean, attacked = loss(net(x), y), loss(net(adv), y)
    assert torch.all(attacked[1:] > clean[1:])
    # a larger budget hurts more
    assert attacked[3] - clean[3] > attacked[1] - clean[1]


def test_pgd_random_start_and_value_range():
    x, y = seg_batch()
    net, loss = trained_unet(x, y)
    lo, hi = float(x.min()), float(x.max())
    eps = torch.full((4,), 3.0)
    adv = PGD(loss, steps=3, random_start=True, value_range=(lo, hi))(
        net, x, y, eps, start_radius=torch.full((4,), 5.0)
    )
    assert adv.min() >= lo and adv.max() <= hi
    assert torch.all(per_sample_norm(adv - x) <= 3.0 + 1e-4)
    # a start radius outside the ball is projected onto it: with no steps' room the noise sits at eps
    start = PGD(loss, steps=1, alpha=1e-6, random_start=True)
    adv = start(net, x, y, 1.0, start_radius=5.0)
    assert torch.allclose(per_sample_norm(adv - x), torch.ones(4), atol=1e-3)


def test_evaluation_start_on_the_sphere():
    # the authors' evaluation starts on the sphere of radius eps; with a step far too small to move, the norm of
    # the noise is the start's: eps on the sphere, spread inside the ball otherwise
    x, y = seg_batch()
    net, loss = trained_unet(x, y)
    eps = torch.tensor([0.5, 1.0, 2.0, 4.0])
    for on_sphere in (True, False):
        adv = PGD(loss, steps=1, alpha=1e-6, start_on_sphere=on_sphere)(net, x, y, eps)
        ratio = per_sample_norm(adv - x) / eps
        assert torch.allclose(ratio, torch.ones(4), atol=1e-3) == on_sphere, ratio
    assert PGD(loss, start_on_sphere=True).describe()["start_on_sphere"] is True


def test_pgd_3d_metatensor_and_restores_network_state():
    x = torch.randn(2, 1, 8, 8, 8)
    y = (x > 0.5).float()
    net = small_unet(dims=3)
    net.train()
    net.model[0].conv.weight.requires_grad_(False)  # one frozen parameter must stay frozen, the rest trainable
    running = [b.clone() for b in net.buffers()]
    mx = MetaTensor(x, meta={"filename_or_obj": "case_0.nii.gz"})
    adv = PGD(PerSampleDiceCELoss(), steps=2)(net, mx, y, 1.0)
    assert isinstance(adv, MetaTensor) and adv.meta["filename_or_obj"] == "case_0.nii.gz"
    assert net.training
    flags = [p.requires_grad for p in net.parameters()]
    assert flags[0] is False and all(flags[1:])
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(a, b) for a, b in zip(running, net.buffers()))  # eval mode: no statistics update


def test_pgd_train_mode_freezes_normalisation():
    net = TinyClassifier()
    net.eval()
    seen = []
    net.register_forward_hook(lambda m, i, o: seen.append((m.training, m.bn.training)))
    running = net.bn.running_mean.clone()
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    PGD(per_sample_ce, steps=2, train_mode=True)(net, x, y, 0.5)
    assert seen and all(s == (True, False) for s in seen)
    assert torch.equal(running, net.bn.running_mean) and not net.training


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_pgd_structured_network_outputs(kind):
    class Multi(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = TinyClassifier()

        def forward(self, x):
            out = self.net(x)
            return (out, out * 0.5) if kind == "tuple" else {"logits": out}

    def loss(pred, target):
        logits = pred[0] if kind == "tuple" else pred["logits"]
        return per_sample_ce(logits, target)

    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    net = Multi().eval()
    adv = PGD(loss, steps=5, random_start=False)(net, x, y, 1.0)
    with torch.no_grad():
        assert torch.all(loss(net(adv), y) > loss(net(x), y))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_matches_torchattacks(norm):
    torch.manual_seed(1)
    net = TinyClassifier().eval()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 3, (8,))
    eps, steps = (8 / 255, 10) if norm == "linf" else (0.5, 10)
    abs_step = 2 / 255 if norm == "linf" else 0.1
    ours = PGD(
        per_sample_ce, norm=norm, steps=steps, alpha=abs_step * steps / eps, random_start=False, value_range=(0, 1)
    )
    ref_cls = torchattacks.PGD if norm == "linf" else torchattacks.PGDL2
    ref = ref_cls(net, eps=eps, alpha=abs_step, steps=steps, random_start=False)
    expected = ref(x, y)
    got = ours(net, x, y, eps)
    assert torch.allclose(got, expected, atol=1e-6), (got - expected).abs().max()
    assert not torch.equal(got, x)


def test_attack_reports_found_and_first_wrong_norm():
    torch.manual_seed(0)
    net = TinyClassifier().eval()
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        y = net(x).argmax(1)  # every sample starts correct

    def correct(pred, target):
        return pred.argmax(1) == target

    norms = []

    def spy(pred, target):
        c = correct(pred, target)
        norms.append(c.clone())
        return c

    attack = PGD(per_sample_ce, steps=10, alpha=1.5, random_start=False)
    eps = torch.tensor([0.0, 0.2, 5.0, 20.0])
    res = attack.attack(net, x, y, eps, criterion=spy)
    assert len(norms) == 11  # every iterate: the start, after each of the steps but the last, and the final one
    assert not res.found[0]  # eps 0 cannot change anything
    assert res.found[3]  # a huge budget flips the class
    checks = torch.stack(norms)
    assert torch.equal(res.found, (~checks).any(0))
    assert torch.all(res.boundary_norm[res.found] <= res.noise_norm[res.found] + 1e-5)
    assert torch.all(res.boundary_norm[res.found] > 0)
    assert torch.equal(res.boundary_norm[~res.found], res.noise_norm[~res.found])
    # bisection only moves the estimate towards the boundary
    refined = attack.attack(net, x, y, eps, criterion=correct, bisection_steps=6)
    assert torch.equal(refined.found, res.found)
    assert torch.all(refined.boundary_norm[res.found] <= res.boundary_norm[res.found] + 1e-5)
    with torch.no_grad():
        assert torch.allclose(refined.noise_norm, res.noise_norm)


def test_pgd_float32_loss_for_half_precision_outputs():
    net = TinyClassifier().eval()
    seen = []

    def loss(pred, target):
        seen.append(pred.dtype)
        return per_sample_ce(pred, target)

    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    adv = PGD(loss, steps=2)(net, x, y, 0.5, forward_fn=lambda v: net(v).to(torch.bfloat16))
    assert seen == [torch.float32, torch.float32] and adv.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"norm": "l1"}, "norm"),
        ({"steps": 0}, "steps"),
        ({"alpha": 0.0}, "alpha"),
        ({"value_range": (1.0, 0.0)}, "value_range"),
    ],
)
def test_pgd_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PGD(per_sample_ce, **kwargs)


def test_pgd_bad_eps_and_loss_shape():
    net = TinyClassifier().eval()
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"eps must be finite and >= 0, got \[-1.0\] at batch positions \[1\]"):
        PGD(per_sample_ce)(net, x, y, torch.tensor([0.5, -1.0]))
    with pytest.raises(ValueError, match="shape"):
        PGD(per_sample_ce)(net, x, y, torch.tensor([0.5, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"one value per sample, shape \(2,\), got \(\)"):
        PGD(lambda p, t: per_sample_ce(p, t).mean())(net, x, y, 0.5)
