import csv
import json

import pytest
import torch
from ignite.engine import Events

from monai_amat.attacks import APGD, PGD
from monai_amat.criteria import DiceCriterion, DiceWorstCaseScore, hard_dice
from monai_amat.engines import BreakingEps, GradientMaskingChecks, RobustEvaluator
from monai_amat.engines.probes import (
    check_beaten,
    check_large_eps,
    check_monotone,
    check_stronger,
    check_worst_case,
    sample_names,
)
from monai_amat.handlers import RobustnessReport
from monai_amat.losses import PerSampleDiceCELoss, SegPGDLoss
from tests.helpers import dice_metrics, dice_postprocessing, pretrain, seg_loader, small_unet, synthetic_seg_data


def _neg_dice(pred, target):
    """Minus the per-sample foreground Dice: the worst case picked by it is the worst for MeanDice too."""
    return -hard_dice(pred, target)[:, 0]


@pytest.fixture
def trained():
    data = synthetic_seg_data(8)
    for i, d in enumerate(data):
        d["case"], d["slice"] = f"case_{i // 4}", i % 4
    loss = PerSampleDiceCELoss()
    return data, pretrain(small_unet(), data, loss), loss


def _evaluator(data, net, attacks, eps, handlers=(), probes=(), score_fn=None, loader=None):
    return RobustEvaluator(
        "cpu",
        loader or seg_loader(data),
        net,
        attacks,
        eps,
        postprocessing=dice_postprocessing(),
        key_val_metric=dice_metrics(),
        val_handlers=list(handlers),
        score_fn=score_fn,
        probes=list(probes),
    )


def test_worst_case_is_never_better_than_any_attack(trained, tmp_path):
    data, net, loss = trained
    attacks = {
        "pgd": PGD(loss, steps=5, alpha=2.5),
        "apgd": APGD(loss, steps=5),
        "segpgd": PGD(SegPGDLoss(), steps=5, alpha=2.5),
    }
    report = RobustnessReport(tmp_path, task="segmentation", model_name="unet")
    ev = _evaluator(data, net, attacks, [0, 1.0, 3.0], [report], score_fn=_neg_dice)
    seen = []
    ev.add_event_handler(
        Events.EPOCH_COMPLETED, lambda e: seen.append((e.state.eps, e.state.attack_name, e.state.reported))
    )
    ev.run()
    rob = ev.state.robustness
    worst = rob["metrics"]["mean_dice"]
    for name in attacks:
        curve = rob["per_attack"][name]["mean_dice"]
        assert curve[0] == pytest.approx(worst[0])  # clean: the same value for every attack
        assert all(w <= a + 1e-6 for w, a in zip(worst, curve)), (name, worst, curve)
    assert worst[2] < worst[0]
    # one clean pass, then per eps one pass per attack and the worst case; only the reported ones are flagged
    assert [s for s in seen if s[2]] == [(0.0, "pgd", True), (1.0, "worst case", True), (3.0, "worst case", True)]
    assert len(seen) == 1 + 2 * 4
    written = json.loads((tmp_path / "robustness.json").read_text())
    assert written["attack"]["name"] == "worst case" and written["attack"]["of"] == ["pgd", "apgd", "segpgd"]
    assert written["attacks"]["segpgd"]["loss"] == "SegPGDLoss" and written["attacks"]["apgd"]["name"] == "APGD"
    assert written["metrics"]["mean_dice"] == pytest.approx(worst)
    assert set(written["per_attack"]) == set(attacks)


def test_single_attack_needs_no_worst_case_pass(trained):
    data, net, loss = trained
    ev = _evaluator(data, net, PGD(loss, steps=2), [0, 1.0])
    passes = []
    ev.add_event_handler(Events.EPOCH_COMPLETED, lambda e: passes.append(e.state.attack_name))
    ev.run()
    assert passes == ["pgd", "pgd"]
    assert ev.state.robustness["per_attack"]["pgd"] == ev.state.robustness["metrics"]


def test_a_loader_that_changes_between_passes_is_refused(trained):
    data, net, loss = trained
    ev = _evaluator(
        data, net, {"a": PGD(loss, steps=1), "b": PGD(loss, steps=1)}, [0, 1.0], loader=seg_loader(data, shuffle=True)
    )
    with pytest.raises(RuntimeError, match="same batches in the same order"):
        ev.run()


def test_attacks_must_share_a_norm(trained):
    data, net, loss = trained
    with pytest.raises(ValueError, match="one norm"):
        _evaluator(data, net, {"a": PGD(loss), "b": PGD(loss, norm="linf")}, [0, 1.0])


def test_check_functions_on_hand_made_results():
    eps = [0, 1, 2]
    assert not check_monotone(eps, {"dice": [0.9, 0.6, 0.3], "mre": [1.0, 2.0, 3.0]}, ["mre"])["fired"]
    fired = check_monotone(eps, {"dice": [0.9, 0.3, 0.6]})
    assert fired["fired"] and fired["violations"][0]["to_eps"] == 2
    assert check_monotone(eps, {"mre": [1.0, 3.0, 2.0]}, ["mre"])["fired"]
    assert not check_monotone(eps, {"dice": [0.9, 0.5, 0.52]})["fired"]  # within 5 % of the clean value

    assert check_large_eps({"dice": 0.9}, {"dice": 0.5}, 100.0)["fired"]
    assert not check_large_eps({"dice": 0.9}, {"dice": 0.05}, 100.0)["fired"]
    unchecked = check_large_eps({"mre": 1.0}, {"mre": 1.0}, 100.0, lower_is_better=["mre"])
    assert not unchecked["fired"] and unchecked["metrics"] == {}

    worst = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert not check_beaten("x", worst, worst * 0.5, "noise")["fired"]
    assert check_beaten("x", worst, worst + torch.tensor([0.0, 0.0, 0.0, 1.0]), "noise")["fired"]
    assert not check_beaten("x", worst, worst * 1.01, "stronger", rel_tol=0.05)["fired"]

    per_attack = {"pgd": {"dice": [0.9, 0.5, 0.3]}, "apgd": {"dice": [0.9, 0.6, 0.2]}}
    assert not check_worst_case(eps, {"dice": [0.9, 0.5, 0.2]}, per_attack)["fired"]
    fired = check_worst_case(eps, {"dice": [0.9, 0.5, 0.3]}, per_attack)
    assert fired["fired"] and fired["violations"] == [
        {"metric": "dice", "attack": "apgd", "eps": 2, "by": pytest.approx(0.1)}
    ]

    clean = {"dice": 0.9, "mre": 1.0}
    assert check_stronger({"dice": 0.5}, {"dice": 0.4}, clean, "apgd")["fired"]
    assert not check_stronger({"dice": 0.5}, {"dice": 0.48}, clean, "apgd")["fired"]  # within 5 % of 0.9
    assert not check_stronger({"dice": 0.5}, {"dice": 0.7}, clean, "apgd")["fired"]
    assert check_stronger({"mre": 2.0}, {"mre": 2.5}, clean, "apgd", lower_is_better=["mre"])["fired"]


class Quantised(torch.nn.Module):
    """Rounds its input before the network: the gradient is zero almost everywhere (masked gradients)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x * 4) / 4)


def _checks(ev):
    return {c["check"]: c for c in ev.state.robustness["checks"]}


def test_masking_checks_fire_on_a_masked_model_and_stay_quiet_on_a_normal_one(trained):
    data, net, loss = trained
    masked = Quantised(net)
    probe = GradientMaskingChecks(large_eps_factor=20.0)
    attacks = {
        "pgd": PGD(loss, steps=10, alpha=2.5, random_start=False),
        "apgd": APGD(loss, steps=10, random_start=False),
    }
    ev = _evaluator(data, masked, attacks, [0, 2.0, 8.0], probes=[probe])
    ev.run()
    masked_checks = _checks(ev)
    assert masked_checks["large_eps"]["fired"], masked_checks["large_eps"]
    assert masked_checks["random_noise"]["fired"], masked_checks["random_noise"]
    assert masked_checks["stronger_attack"]["fired"], masked_checks["stronger_attack"]

    # converged attacks on the normal model: a 10-step attack is (rightly) found weaker than APGD-20 x 2 there
    attacks = {"pgd": PGD(loss, steps=40, alpha=2.5), "apgd": APGD(loss, steps=40)}
    ev = _evaluator(data, net, attacks, [0, 2.0, 8.0], probes=[probe])
    ev.run()
    normal = _checks(ev)
    assert set(normal) == {"monotone", "worst_case", "large_eps", "stronger_attack", "random_noise"}
    assert not any(c["fired"] for c in normal.values()), normal


class Linear(torch.nn.Module):
    """f(x) = w . x + b: a gradient attack moves f by exactly |w| per unit of L2 noise."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 1)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_breaking_eps_is_where_the_criterion_flips():
    torch.manual_seed(0)
    net = Linear().eval()
    x = torch.randn(6, 1, 4, 4)
    threshold = 1.5

    def loss(pred, target):
        return pred[:, 0]

    def criterion(pred, target):
        return pred[:, 0] < threshold

    with torch.no_grad():
        flip = (threshold - net(x)[:, 0]) / net.fc.weight.norm()
    attack = PGD(loss, steps=4, alpha=2.0, random_start=False)
    probe = BreakingEps(criterion, steps=7)
    max_eps = float(flip.max()) * 1.2
    value, clean_wrong, unbroken = probe.search(attack, net, net, x, None, max_eps, 1.0)
    tol = max_eps / 2**7
    ok = ~clean_wrong
    assert torch.all(clean_wrong == (flip <= 0))
    assert torch.all(value[~ok] == 0) and not unbroken.any()
    assert torch.all(value[ok] >= flip[ok] - 1e-5) and torch.all(value[ok] <= flip[ok] + tol + 1e-5)
    # half the budget: the samples that need more stay unbroken, at max_eps
    value, _, unbroken = probe.search(attack, net, net, x, None, max_eps / 2, 1.0)
    assert torch.equal(unbroken, ok & (flip > max_eps / 2)) and torch.all(value[unbroken] == max_eps / 2)


def test_breaking_eps_file_and_summary(trained, tmp_path):
    data, net, loss = trained
    report = RobustnessReport(tmp_path, task="segmentation")
    probe = BreakingEps(DiceCriterion(tau=0.5), steps=3, name_keys=["case", "slice"])
    ev = _evaluator(data, net, PGD(loss, steps=3, alpha=2.5), [0, 2.0], [report], probes=[probe])
    ev.run()
    written = json.loads((tmp_path / "robustness.json").read_text())
    summary = written["breaking_eps"]
    assert summary["samples"] == 8 and summary["max_eps"] == 2.0 and summary["tolerance"] == 2.0 / 8
    assert "sample_eps" not in written
    with open(tmp_path / "sample_eps.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["case_0"] * 4 + ["case_1"] * 4 and [r["slice"] for r in rows[:4]] == list(
        "0123"
    )
    values = sorted(float(r["breaking_eps"]) if r["status"] != "unbroken" else float("inf") for r in rows)
    expected = (values[3] + values[4]) / 2
    assert (summary["median"] is None and expected == float("inf")) or summary["median"] == pytest.approx(expected)
    assert all(0 <= float(r["breaking_eps"]) <= 2.0 for r in rows)
    assert (tmp_path / "sample_eps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sample_names_from_batches():
    from monai.data import MetaTensor

    image = MetaTensor(torch.zeros(2, 1, 2, 2), meta={"filename_or_obj": ["a.png", "b.png"]})
    assert sample_names({"image": image, "id": torch.tensor([3, 4])}, ["image", "id"], 2) == [
        {"image": "a.png", "id": 3},
        {"image": "b.png", "id": 4},
    ]
    assert sample_names([{"id": 1}, {"id": 2}], ["id"], 2) == [{"id": 1}, {"id": 2}]
    assert sample_names([{"id": torch.tensor(7)}], ["id"], 1) == [{"id": 7}]  # a list of one item is not a batch
    with pytest.raises(KeyError, match="'case'"):
        sample_names({"id": torch.tensor([1])}, ["case"], 1)


def test_dice_worst_case_score_ranks_by_dice_then_loss():
    target = torch.zeros(3, 1, 2, 2)
    target[:2, 0, 0, 0] = 1
    logits = torch.zeros(3, 2, 2, 2)
    logits[0, 1, 0, 0] = 5.0  # sample 0: perfect foreground
    logits[1, 1, 1, 1] = 5.0  # sample 1: the foreground missed, a false positive
    logits[2, 1, 1, 1] = 5.0  # sample 2: no foreground in the label, a false positive
    loss = PerSampleDiceCELoss()
    score = DiceWorstCaseScore(loss)(logits, target)
    assert score[0] == pytest.approx(0.0, abs=1e-5) and score[1] == pytest.approx(1.0, abs=1e-5)
    quieter = logits.clone()
    quieter[2, 1, 1, 1] = 0.5  # the same (empty) Dice, a lower loss: ranked less bad
    assert DiceWorstCaseScore(loss)(quieter, target)[2] < score[2]
