"""Faults and bad input: invalid settings named before training, non-finite losses, files written atomically."""

import logging
import math
import os
import re
import stat

import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser, run
from monai.engines.utils import IterationEvents

from monai_amat.attacks import PGD
from monai_amat.engines import AMATTrainer, SATTrainer
from monai_amat.handlers import MarginHandler
from monai_amat.handlers.checkpoint import AtomicCheckpointSaver
from monai_amat.keys import AttackEvents
from monai_amat.losses import PerSampleDiceCELoss
from monai_amat.utils import atomic_write
from tests.helpers import chain, configs, seg_loader, small_unet, synthetic_seg_data, tiny

BUNDLES = [
    "msd_heart_seg_amat",
    "msd_hippocampus_seg_amat",
    "msd_prostate_seg_amat",
    "isbi2015_ceph_landmark_amat",
    "bccd_cell_detection_amat",
]

# (overrides, configs merged, the key the error must name)
BAD_VALUES = [
    ({"delta": -1.0}, ["train"], "delta"),
    ({"delta": 0}, ["train"], "delta"),
    ({"sat_eps": -2.0}, ["train", "train_sat"], "sat_eps"),
    ({"eps_list": [0, -1, 2]}, ["train", "evaluate"], "eps_list"),
    ({"eps_list": [0, 5, 2]}, ["train", "evaluate"], "eps_list"),
    ({"norm": "l3"}, ["train"], "norm"),
    ({"norm": "l1"}, ["train", "train_sat"], "norm"),
    ({"norm": "linf2"}, ["train", "evaluate"], "norm"),
    ({"beta": 1.5}, ["train"], "beta"),
    ({"beta": -0.1}, ["train"], "beta"),
    ({"epochs": 0}, ["train"], "epochs"),
    ({"epochs": 0}, ["train", "train_sat"], "epochs"),
    ({"epochs": 0}, ["train", "train_std"], "epochs"),
    ({"max_margin": 0.5, "delta": 1.0}, ["train"], "max_margin"),
    ({"amp_dtype": "float64"}, ["train", "evaluate"], "amp_dtype"),
    ({"spatial_size": [0, 0]}, ["train"], "spatial_size"),
    ({"spatial_size": [0, 0]}, ["train", "evaluate"], "spatial_size"),
    ({"seed": "abc"}, ["train", "train_sat"], "seed"),
    ({"seed": -1}, ["train", "train_std"], "seed"),
    ({"embedded_cases": 0}, ["train", "calibrate"], "embedded_cases"),
    ({"skip_non_finite": "flase"}, ["train"], "skip_non_finite"),
    ({"resume": "ture"}, ["train"], "resume"),
]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_bad_values_are_named_before_anything_runs(bundle, tmp_path):
    out = tmp_path / "out"
    for overrides, names, key in BAD_VALUES:
        with pytest.raises(Exception) as info:
            run(config_file=configs(bundle, *names), output_dir=str(out), **{**tiny(tmp_path), **overrides})
        assert re.search(rf"config key '{key}'", chain(info)), (overrides, chain(info))
        assert not out.exists() and not (tmp_path / "data").exists(), overrides  # nothing written, no data made


def _amat(tmp_path, loss, skip):
    data = synthetic_seg_data(8)
    net = small_unet()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    margins = MarginHandler(8, delta=1.0, output_dir=tmp_path)
    trainer = AMATTrainer(
        "cpu",
        1,
        seg_loader(data, batch_size=4),
        net,
        opt,
        loss,
        attack=PGD(PerSampleDiceCELoss(), steps=1),
        margin_handler=margins,
        skip_non_finite=skip,
    )
    return trainer, net, margins


class NanAt:
    """A per-sample loss that is NaN for one sample; attach it to count batches (the loader does not shuffle)."""

    def __init__(self, index: int, batch_size: int = 4):
        self.index, self.batch_size, self.batch = index, batch_size, -1
        self.base = PerSampleDiceCELoss()

    def attach(self, engine):
        engine.add_event_handler(Events.ITERATION_STARTED, self.next_batch)

    def next_batch(self, engine):
        self.batch += 1

    def __call__(self, pred, target):
        out = self.base(pred, target)
        if self.batch != self.index // self.batch_size:
            return out
        return torch.where(torch.arange(len(out)) == self.index % self.batch_size, torch.full_like(out, math.nan), out)


def test_non_finite_loss_stops_the_run_naming_epoch_iteration_and_samples(tmp_path):
    loss = NanAt(6)
    trainer, _, _ = _amat(tmp_path, loss, skip=False)
    loss.attach(trainer)
    with pytest.raises(FloatingPointError, match=r"epoch 1, iteration 2 for sample indices \[6\].*'clean': \[nan\]"):
        trainer.run()
    assert not (tmp_path / "margins.csv").exists()


def test_skip_non_finite_skips_and_counts_the_batch(tmp_path, caplog):
    loss = NanAt(1)
    trainer, net, margins = _amat(tmp_path, loss, skip=True)
    loss.attach(trainer)
    before = {}

    def snapshot(engine):
        before[engine.state.iteration] = [p.detach().clone() for p in net.parameters()]

    trainer.add_event_handler(Events.ITERATION_STARTED, snapshot)
    changed = {}

    def compare(engine):
        now = list(net.parameters())
        changed[engine.state.iteration] = any(
            not torch.equal(a, b) for a, b in zip(before[engine.state.iteration], now)
        )

    trainer.add_event_handler(Events.ITERATION_COMPLETED, compare)
    fired = []
    for event in (IterationEvents.FORWARD_COMPLETED, AttackEvents.ATTACK_COMPLETED, IterationEvents.MODEL_COMPLETED):
        trainer.add_event_handler(event, lambda e, ev=event: fired.append((e.state.iteration, ev)))
    with caplog.at_level(logging.WARNING):
        trainer.run()
    assert trainer.state.skipped_batches == 1
    # the skipped batch's clean pass ran (FORWARD_COMPLETED), nothing after it
    assert [ev for i, ev in fired if i == 1] == [IterationEvents.FORWARD_COMPLETED]
    assert [ev for i, ev in fired if i == 2] == [
        IterationEvents.FORWARD_COMPLETED,
        AttackEvents.ATTACK_COMPLETED,
        IterationEvents.MODEL_COMPLETED,
    ]
    assert changed == {1: False, 2: True}  # the skipped batch stepped nothing, the next one trained
    # the skipped batch (samples 0..3) left the margin table alone; the other batch's samples were updated
    assert margins.margins.tolist() == [1.0] * 4 + [2.0] * 4  # no criterion: the trained batch expands
    assert any(
        re.search(r"skipped batch 1.*epoch 1, iteration 1 for sample indices \[1\]", r.message) for r in caplog.records
    )


@pytest.mark.parametrize("bundle", BUNDLES)
def test_norm_and_skip_non_finite_are_bundle_settings(bundle, tmp_path):
    for names, trainer_type in ((["train"], AMATTrainer), (["train", "train_sat"], SATTrainer)):
        for value in (False, True):
            parser = ConfigParser()
            parser.read_config(configs(bundle, *names))
            parser.update({**tiny(tmp_path), "output_dir": str(tmp_path / "out"), "skip_non_finite": value})
            trainer = parser.get_parsed_content("train#trainer")
            assert isinstance(trainer, trainer_type) and trainer.skip_non_finite is value
            assert trainer.attack.norm == "l2"
    parser = ConfigParser()
    parser.read_config(configs(bundle, "train", "evaluate"))
    parser.update({"norm": "linf"})
    assert parser.get_parsed_content("train#attack").norm == "linf"
    assert all(a.norm == "linf" for a in parser.get_parsed_content("evaluate#attacks").values())


def test_atomic_write_keeps_the_old_file_on_failure_and_gives_normal_permissions(tmp_path):
    path = tmp_path / "margins.csv"
    with atomic_write(path) as f:
        f.write("old\n")
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    with pytest.raises(RuntimeError), atomic_write(path) as f:
        f.write("half of the new")
        raise RuntimeError("killed")
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["margins.csv"]


def test_atomic_checkpoint_saver_replaces_models_in_one_rename(tmp_path, monkeypatch):
    net = torch.nn.Linear(3, 1)
    saver = AtomicCheckpointSaver(
        save_dir=str(tmp_path), save_dict={"model": net}, save_key_metric=True, key_metric_filename="model_best.pt"
    )
    engine = Engine(lambda e, b: None)
    engine.state.metrics = {"dice": 0.5}
    engine.state.key_metric_name = "dice"
    saver.attach(engine)
    engine.run([0], max_epochs=1)
    best = tmp_path / "model_best.pt"
    first = torch.load(best, weights_only=True)
    assert torch.equal(first["weight"], net.weight)

    # a better model whose save is interrupted half-way: the previous best stays whole, no temporary file is left
    with torch.no_grad():
        net.weight.add_(1.0)
    engine.state.metrics = {"dice": 0.9}
    real_save = torch.save

    def interrupted(obj, f, **kwargs):
        real_save(obj, f, **kwargs)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        saver._key_metric_checkpoint(engine)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(torch.load(best, weights_only=True)["weight"], first["weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_best.pt"]
    engine.state.metrics = {"dice": 0.95}
    saver._key_metric_checkpoint(engine)  # the next better model is saved
    assert torch.equal(torch.load(best, weights_only=True)["weight"], net.weight)


def test_best_model_saver_state_survives_a_resume(tmp_path):
    """Restored from the checkpoint, the saver keeps model_best.pt against a worse model, as the first run would."""

    def saver_and_engine(dice):
        saver = AtomicCheckpointSaver(
            save_dir=str(tmp_path), save_dict={"model": net}, save_key_metric=True, key_metric_filename="model_best.pt"
        )
        engine = Engine(lambda e, b: None)
        engine.state.metrics, engine.state.key_metric_name = {"dice": dice}, "dice"
        return saver, engine

    net = torch.nn.Linear(3, 1)
    first, engine = saver_and_engine(0.9)
    first._key_metric_checkpoint(engine)
    best = torch.load(tmp_path / "model_best.pt", weights_only=True)["weight"].clone()
    state = first.state_dict()
    assert [p for p, _ in state["_saved"]] == [0.9]
    with torch.no_grad():
        net.weight.add_(1.0)
    resumed, engine = saver_and_engine(0.5)  # a worse model after the resume
    resumed.load_state_dict(state)
    resumed._key_metric_checkpoint(engine)
    assert torch.equal(torch.load(tmp_path / "model_best.pt", weights_only=True)["weight"], best)
    fresh, engine = saver_and_engine(0.5)  # without the state, the worse model would replace the best one
    fresh._key_metric_checkpoint(engine)
    assert not torch.equal(torch.load(tmp_path / "model_best.pt", weights_only=True)["weight"], best)
    AtomicCheckpointSaver(save_dir=str(tmp_path), save_dict={"model": net}, save_final=True).load_state_dict({})
