import csv
import math
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.handlers import CheckpointLoader, CheckpointSaver, StatsHandler

from monai_amat.attacks import PGD
from monai_amat.criteria import DiceCriterion, LossThresholdCriterion
from monai_amat.engines import AMATTrainer, SATTrainer
from monai_amat.handlers import MarginHandler, label_has_foreground
from monai_amat.keys import AttackEvents
from monai_amat.losses import PerSampleDiceCELoss
from tests.helpers import pretrain, seg_loader, small_unet, stack, synthetic_seg_data


class Recorder:
    """Copies what the margin rule needs from every iteration, and the margins at every epoch start."""

    def __init__(self, handler):
        self.handler = handler
        self.rows, self.start_margins, self.losses = [], {}, []

    def attach(self, engine):
        engine.add_event_handler(
            Events.EPOCH_STARTED, lambda e: self.start_margins.update({e.state.epoch: self.handler.margins.clone()})
        )
        engine.add_event_handler(AttackEvents.ATTACK_COMPLETED, self.attack)
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self.loss)

    def attack(self, engine):
        o = engine.state.output
        self.rows.append(
            (
                engine.state.epoch,
                o["index"].clone(),
                o["eps"].clone(),
                o["found"].clone(),
                o["noise_norm"].clone(),
                o["clean_correct"].clone(),
            )
        )

    def loss(self, engine):
        o = engine.state.output
        self.losses.append(
            (o["loss"].item(), o["clean_loss"].clone(), o["adv_loss"].clone(), o["clean_correct"].clone())
        )


def expected_margins(n, delta, max_margin, rows, epochs):
    """The margin rule (docs/fidelity.md; the authors' code), written out per sample in plain Python, independent of
    monai_amat.margins."""
    margins = [delta] * n
    history = []
    for epoch in range(1, epochs + 1):
        est = list(margins)
        survived, seen = [False] * n, [False] * n
        for e, idx, _, fnd, norm, _ in rows:
            if e != epoch:
                continue
            for i, f, v in zip(idx.tolist(), fnd.tolist(), norm.tolist()):
                est[i] = (est[i] + v) / 2
                survived[i] |= not f
                seen[i] = True
        for i in range(n):
            if seen[i]:
                margins[i] = min(margins[i] + delta if survived[i] else est[i], max_margin)
        history.append(list(margins))
    return history


def _amat(
    tmp_path,
    n=8,
    epochs=3,
    delta=1.0,
    max_margin=math.inf,
    tau=0.75,
    steps=3,
    quantile=0.3,
    norm="batch",
    data=None,
    criterion=None,
    group_fn=None,
    device="cpu",
    **kwargs,
):
    data = synthetic_seg_data(n) if data is None else data
    net = small_unet(norm=norm).to(device)
    loss = PerSampleDiceCELoss()
    if tau is None:  # pre-train, then put the Dice threshold at a low quantile of clean Dice: some fall, some hold
        x, y = stack(data)
        pretrain(net, data, loss)
        with torch.no_grad():
            tau = float(DiceCriterion(0.0).dice(net.eval()(x), y).quantile(quantile))
    handler = MarginHandler(n, delta=delta, max_margin=max_margin, output_dir=tmp_path, group_fn=group_fn)
    trainer = AMATTrainer(
        device,
        epochs,
        seg_loader(data, 4, shuffle=True),
        net,
        torch.optim.Adam(net.parameters(), 1e-2),
        loss,
        attack=PGD(loss, steps=steps),
        margin_handler=handler,
        criterion=DiceCriterion(tau) if criterion is None else criterion,
        **kwargs,
    )
    return trainer, handler, net


def test_amat_margins_move_as_the_rule_says(tmp_path):
    # margins small enough that some samples hold under attack and some fall, at any thread count (delta 0.5 had
    # every sample fall with one torch thread)
    n, epochs, delta, max_margin = 8, 4, 0.1, 0.3
    trainer, handler, _ = _amat(tmp_path, n, epochs, delta, max_margin, tau=None)
    rec = Recorder(handler)
    rec.attach(trainer)
    trainer.run()

    # the attack budget is each sample's margin at the start of the epoch
    for epoch, idx, eps, *_ in rec.rows:
        assert torch.allclose(eps, rec.start_margins[epoch][idx])
    history = expected_margins(n, delta, max_margin, rec.rows, epochs)
    with open(tmp_path / "margins.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n * epochs
    for epoch in range(1, epochs + 1):
        got = {int(r["index"]): float(r["margin"]) for r in rows if int(r["epoch"]) == epoch}
        assert sorted(got) == list(range(n))
        assert [got[i] for i in range(n)] == pytest.approx(history[epoch - 1], rel=1e-6)
    assert torch.allclose(handler.margins, torch.tensor(history[-1]))
    # the run exercised both branches of the rule (the clamp is checked by hand in test_margins.py)
    found = torch.cat([r[3] for r in rec.rows])
    assert found.any() and (~found).any()
    assert handler.margins.max() <= max_margin
    assert {"margin_mean", "margin_expanded", "margin_refined"} <= set(trainer.state.metrics)


def test_margin_diagnostics_of_a_run_with_known_outcome(tmp_path):
    n, epochs, delta = 8, 2, 0.5
    data = synthetic_seg_data(n)
    for item in data[4:]:
        item["label"] = np.zeros_like(item["label"])  # background-only slices

    def run(criterion):
        trainer, handler, _ = _amat(
            tmp_path, n, epochs, delta, data=data, criterion=criterion, steps=2, group_fn=label_has_foreground
        )
        trainer.run()
        return trainer.state.metrics, handler.margins

    # foreground slices always correct, background slices always wrong
    metrics, margins = run(lambda pred, y: y.flatten(1).amax(1) > 0)
    assert margins[:4].tolist() == [delta * (1 + epochs)] * 4
    assert metrics["margin_expanded_foreground"] == 1.0 and metrics["margin_start_wrong_foreground"] == 0.0
    assert metrics["margin_expanded_no_foreground"] == 0.0 and metrics["margin_refined_no_foreground"] == 1.0
    assert metrics["margin_start_wrong_no_foreground"] == 1.0 and metrics["margin_start_wrong"] == 0.5
    # the authors' Dice criterion never lets a background-only slice expand, whatever the network predicts
    metrics, margins = run(DiceCriterion(tau=0.5))
    assert metrics["margin_expanded_no_foreground"] == 0.0 and metrics["margin_start_wrong_no_foreground"] == 1.0
    assert (margins[4:] <= delta + 1e-6).all()


def test_amat_loss_is_mixed_over_clean_correct_samples(tmp_path):
    trainer, handler, _ = _amat(
        tmp_path, epochs=1, beta=0.3, clean_criterion=True, tau=None, quantile=0.5, norm="instance"
    )
    rec = Recorder(handler)
    rec.attach(trainer)
    trainer.run()
    for loss, clean, adv, correct in rec.losses:
        assert loss == pytest.approx(
            0.7 * clean.mean().item() + 0.3 * (adv * correct).sum().item() / len(adv), rel=1e-5
        )
    # clean-wrong samples keep their margin; clean-correct ones expand or are refined
    idx = torch.cat([r[1] for r in rec.rows])
    correct = torch.cat([r[5] for r in rec.rows])
    found = torch.cat([r[3] for r in rec.rows])
    assert (~correct).any() and correct.any()
    assert torch.all(handler.margins[idx[~correct]] == 1.0)
    assert torch.all(handler.margins[idx[correct & ~found]] == 2.0)


def test_iteration_events_and_outputs(tmp_path):
    trainer, handler, _ = _amat(tmp_path, epochs=1)
    order = []
    for ev in (
        AttackEvents.ATTACK_COMPLETED,
        IterationEvents.FORWARD_COMPLETED,
        IterationEvents.LOSS_COMPLETED,
        IterationEvents.BACKWARD_COMPLETED,
        IterationEvents.MODEL_COMPLETED,
    ):
        trainer.add_event_handler(ev, lambda e, ev=ev: order.append(ev))
    StatsHandler(name="amat_test", output_transform=lambda o: o[0]["loss"]).attach(trainer)
    trainer.run()
    one = order[:5]
    assert one == [  # SupervisedTrainer's order, the attack between the (clean) forward pass and the loss
        IterationEvents.FORWARD_COMPLETED,
        AttackEvents.ATTACK_COMPLETED,
        IterationEvents.LOSS_COMPLETED,
        IterationEvents.BACKWARD_COMPLETED,
        IterationEvents.MODEL_COMPLETED,
    ]
    assert order == one * 2  # two iterations
    out = trainer.state.output  # decollated: one dict per sample
    assert isinstance(out, list) and len(out) == 4
    assert {"adv_image", "adv_pred", "eps", "found", "noise_norm", "index", "pred", "loss"} <= set(out[0])
    assert isinstance(trainer, SupervisedTrainer)


def test_sat_fixed_eps_adversarial_only(tmp_path):
    data = synthetic_seg_data(8)
    net = small_unet()
    loss = PerSampleDiceCELoss()
    before = [p.clone() for p in net.parameters()]
    trainer = SATTrainer(
        "cpu",
        1,
        seg_loader(data),
        net,
        torch.optim.SGD(net.parameters(), 0.1),
        loss,
        attack=PGD(loss, steps=2),
        eps=1.5,
        adversarial_only=True,
        decollate=False,
    )
    seen = []
    trainer.add_event_handler(IterationEvents.LOSS_COMPLETED, lambda e: seen.append(dict(e.state.output)))
    trainer.run()
    assert trainer.beta == 1.0
    for o in seen:
        assert torch.all(o["eps"] == 1.5) and torch.all(o["noise_norm"] <= 1.5 + 1e-4)
        assert o["loss"].item() == pytest.approx(o["adv_loss"].mean().item(), rel=1e-6)
        assert not o["pred"].requires_grad  # the clean pass has no gradient when only adversarial loss counts
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    with pytest.raises(ValueError, match="beta=1"):
        SATTrainer(
            "cpu",
            1,
            seg_loader(data),
            net,
            torch.optim.SGD(net.parameters(), 0.1),
            loss,
            eps=1.0,
            adversarial_only=True,
            beta=0.5,
        )


def test_amp_flag_and_grad_clipping_run(tmp_path):
    device = "cuda" if torch.cuda.is_available() else "cpu"  # AMP really on with a GPU
    trainer, handler, net = _amat(tmp_path, epochs=1, amp=True, grad_clip_norm=1e-3, device=device)
    norms = []
    trainer.add_event_handler(
        IterationEvents.MODEL_COMPLETED,
        lambda e: norms.append(
            torch.norm(torch.stack([p.grad.norm() for p in net.parameters() if p.grad is not None]))
        ),
    )
    with pytest.warns(UserWarning, match="CUDA is not available") if device == "cpu" else nullcontext():
        trainer.run()
    assert norms and all(n <= 1e-3 * 1.01 for n in norms)


def test_monai_compile_flag_trains_exactly_as_without(tmp_path):
    """MONAI's ``compile=True`` (here torch.compile's eager backend: the same operations, traced by Dynamo) through
    the clean pass, the attack's mode and gradient switches and the adversarial pass: same weights, same margins."""
    runs = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        kwargs = {"compile": True, "compile_kwargs": {"backend": "eager"}} if compiled else {}
        trainer, handler, net = _amat(tmp_path / str(compiled), n=8, epochs=2, tau=None, **kwargs)
        trainer.run()
        assert isinstance(trainer.network, torch._dynamo.eval_frame.OptimizedModule) == compiled
        runs[compiled] = [p.detach().clone() for p in net.parameters()], handler.margins.clone()
    assert all(torch.equal(a, b) for a, b in zip(runs[False][0], runs[True][0]))
    assert torch.equal(runs[False][1], runs[True][1]) and len(set(runs[True][1].tolist())) > 1


def test_checkpoint_round_trip_restores_margins(tmp_path):
    trainer, handler, net = _amat(tmp_path, epochs=2)
    handler.table.margins = torch.rand(8) + 0.5  # a table where every sample differs
    CheckpointSaver(str(tmp_path), {"net": net, "margins": handler}, save_final=True, final_filename="ckpt.pt").attach(
        trainer
    )
    trainer.run()
    assert len(set(handler.margins.tolist())) > 1
    raw = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert torch.equal(raw["margins"]["margins"], handler.margins)

    trainer2, handler2, net2 = _amat(tmp_path / "resumed", epochs=2)
    CheckpointLoader(str(tmp_path / "ckpt.pt"), {"net": net2, "margins": handler2}).attach(trainer2)
    trainer2.fire_event(Events.STARTED)
    assert torch.equal(handler2.margins, handler.margins)
    for a, b in zip(handler.state_dict().values(), handler2.state_dict().values()):
        assert torch.equal(a, b)
    wrong = MarginHandler(9, delta=1.0)
    with pytest.raises(ValueError, match="margins for 8 samples but this table has 9"):
        wrong.load_state_dict(raw["margins"])


def test_structured_targets_through_the_same_iteration(tmp_path):
    """A detection-like task: a list of dicts per batch as targets, per-image losses, a loss-threshold criterion."""

    class BoxNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(
                torch.nn.Conv2d(1, 4, 3, padding=1),
                torch.nn.ReLU(),
                torch.nn.AdaptiveAvgPool2d(2),
                torch.nn.Flatten(),
                torch.nn.Linear(16, 4),
            )

        def forward(self, x):
            return self.body(x)

    def components(pred, targets):
        box = torch.stack([(p - t["boxes"]).abs().mean() for p, t in zip(pred, targets)])
        return {"box": box, "size": (pred[:, 2:] - pred[:, :2]).abs().mean(1)}

    def loss_fn(pred, targets):
        return components(pred, targets)["box"]

    g = torch.Generator().manual_seed(0)
    items = [
        {"image": torch.rand(1, 8, 8, generator=g), "boxes": torch.rand(1, 4, generator=g), "index": i}
        for i in range(6)
    ]

    def collate(batch):
        return {
            "image": torch.stack([b["image"] for b in batch]),
            "targets": [{"boxes": b["boxes"]} for b in batch],
            "index": torch.tensor([b["index"] for b in batch]),
        }

    def prepare(batchdata, device=None, non_blocking=False, **kw):
        return batchdata["image"].to(device), [{k: v.to(device) for k, v in t.items()} for t in batchdata["targets"]]

    loader = torch.utils.data.DataLoader(items, batch_size=3, collate_fn=collate)
    net = BoxNet()
    handler = MarginHandler(6, delta=0.5, output_dir=tmp_path)
    trainer = AMATTrainer(
        "cpu",
        2,
        loader,
        net,
        torch.optim.Adam(net.parameters(), 1e-2),
        loss_fn,
        prepare_batch=prepare,
        attack=PGD(loss_fn, steps=3, alpha=5.0),
        margin_handler=handler,
        decollate=False,
        criterion=LossThresholdCriterion(components, {"box": 0.3, "size": math.inf}),
    )
    rec = Recorder(handler)
    rec.attach(trainer)
    trainer.run()
    assert isinstance(trainer.state.output["label"], list)
    assert (tmp_path / "margins.csv").read_text().count("\n") == 1 + 2 * 6
    assert handler.margins.tolist() == pytest.approx(expected_margins(6, 0.5, math.inf, rec.rows, 2)[-1], rel=1e-6)


def test_errors_name_the_bad_value(tmp_path):
    data = synthetic_seg_data(4)
    net = small_unet()
    opt = torch.optim.SGD(net.parameters(), 0.1)
    loss = PerSampleDiceCELoss()
    with pytest.raises(ValueError, match="beta must be in"):
        AMATTrainer("cpu", 1, seg_loader(data), net, opt, loss, margin_handler=MarginHandler(4, 1.0), beta=1.5)
    with pytest.raises(ValueError, match="delta"):
        MarginHandler(4, delta=0.0)
    with pytest.raises(ValueError, match="max_margin"):
        MarginHandler(4, delta=1.0, max_margin=0.5)
    with pytest.raises(ValueError, match="SAT eps must be >= 0"):
        SATTrainer("cpu", 1, seg_loader(data), net, opt, loss, eps=-1.0)

    no_index = [{k: v for k, v in d.items() if k != "index"} for d in data]
    t = AMATTrainer("cpu", 1, seg_loader(no_index), net, opt, loss, margin_handler=MarginHandler(4, 1.0))
    with pytest.raises(ValueError, match="add_sample_index"):
        t.run()
    t = AMATTrainer("cpu", 1, seg_loader(data), net, opt, loss, margin_handler=MarginHandler(3, 1.0))
    with pytest.raises(ValueError, match=r"sample index \[3\] outside the margin table of 3 samples"):
        t.run()
    t = AMATTrainer(
        "cpu", 1, seg_loader(data), net, opt, lambda p, y: loss(p, y).mean(), margin_handler=MarginHandler(4, 1.0)
    )
    with pytest.raises(ValueError, match="one value per sample"):
        t.run()

    def nan_for_sample_2(pred, target):
        out = loss(pred, target)
        return torch.where(torch.arange(len(out)) == 2, torch.full_like(out, math.nan), out)

    t = AMATTrainer(
        "cpu",
        1,
        seg_loader(data),
        net,
        opt,
        nan_for_sample_2,
        attack=PGD(loss, steps=1),
        margin_handler=MarginHandler(4, 1.0),
    )
    with pytest.raises(FloatingPointError, match=r"epoch 1, iteration 1 for sample indices \[2\]"):
        t.run()


@pytest.mark.parametrize("beta", [0.3, 1.0])
def test_update_equals_the_gradient_of_the_whole_loss(tmp_path, beta):
    """The clean term is back-propagated before the attack; the summed gradient is that of the whole mixed loss."""
    trainer, _, net = _amat(tmp_path, epochs=1, beta=beta, clean_criterion=True, tau=None, norm="instance")
    trainer.attack.random_start = False
    grads, expected = [], []

    def check(engine):
        o = engine.state.output
        grads.append([p.grad.clone() for p in net.parameters()])
        net.zero_grad()
        loss = trainer.loss_function
        clean = loss(net(o["image"]), o["label"])
        adv = loss(net(o["adv_image"]), o["label"])
        total = (1 - beta) * clean.mean() + beta * (adv * o["clean_correct"]).sum() / len(adv)
        expected.append(torch.autograd.grad(total, list(net.parameters())))
        for p, g in zip(net.parameters(), grads[-1]):
            p.grad = g.clone()

    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, check)
    trainer.run()
    assert len(grads) == 2
    for got, want in zip(grads, expected):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
