"""A bundle training killed (SIGKILL) mid-epoch and resumed with ``--resume True`` ends as the uninterrupted run."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, RandFlipd, RandScaleIntensityd

from monai_amat.data.segmentation import msd_slices
from monai_amat.handlers.checkpoint import (
    AtomicCheckpointSaver,
    TrainingCheckpoint,
    data_generators,
    generator_states,
    set_generator_states,
)
from tests.helpers import ROOT, configs, tiny

BUNDLE = "msd_hippocampus_seg_amat"
BUNDLES = ["msd_heart_seg_amat", "msd_hippocampus_seg_amat", "msd_prostate_seg_amat", "isbi2015_ceph_landmark_amat"]
EPOCHS = 3


def _command(tmp_path, out, *extra):
    """``python -m monai.bundle run`` of the tiny AMAT training: 48 slices, batch 4, 12 iterations per epoch."""
    settings = tiny(tmp_path, epochs=EPOCHS, batch_size=4, default_tau=0.15)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs(BUNDLE, "train")[0]]
    cmd += ["--output_dir", str(out)]
    for key, value in settings.items():
        cmd += [f"--{key}", str(value)]
    return cmd + list(extra)


def _env():
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _start(cmd):
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc):
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-5000:]


def _kill_at(cmd, marker):
    """Start the training and SIGKILL it as soon as its log shows ``marker`` (an iteration inside an epoch)."""
    proc = _start(cmd)
    try:
        for line in proc.stdout:
            if marker in line:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.stdout.close()
        proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before {marker!r} (rc {proc.returncode})"


def _epochs_in_csv(path):
    return sorted({line.split(",")[0] for line in path.read_text().splitlines()[1:]})


@pytest.mark.slow  # starts processes
def test_killed_twice_and_resumed_ends_as_the_uninterrupted_run(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "killed"
    settings = tiny(tmp_path)
    msd_slices(
        "embedded",
        "Task04_Hippocampus",
        settings["spatial_size"],
        embedded_dir=settings["embedded_dir"],
        embedded_cases=settings["embedded_cases"],
        seed=0,
    )  # the bundle's data, made once for every run
    reference = _start(_command(tmp_path, ref))  # the uninterrupted run, beside the interrupted ones

    # killed during epoch 1: no checkpoint yet, --resume True starts from scratch
    _kill_at(_command(tmp_path, out, "--resume", "True"), f"Epoch: 1/{EPOCHS}, Iter: 3/")
    assert not (out / "checkpoint.pt").exists() and not (out / "margins.csv").exists()
    # killed again in the middle of epoch 2: the files hold epoch 1 whole, nothing of epoch 2
    _kill_at(_command(tmp_path, out, "--resume", "True"), f"Epoch: 2/{EPOCHS}, Iter: 3/")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["trainer"]["iteration"] == ckpt["trainer"]["epoch_length"] == 12
    assert _epochs_in_csv(out / "margins.csv") == ["1"] and not (out / "model.pt").exists()
    assert not list(out.glob(".*.tmp"))  # the kills fell between writes: no temporary file left behind

    _finish(_start(_command(tmp_path, out, "--resume", "True")))
    _finish(reference)
    expected = (ref / "margins.csv").read_text()
    assert (out / "margins.csv").read_text() == expected
    assert _epochs_in_csv(out / "margins.csv") == ["1", "2", "3"]
    last = [line.split(",")[2] for line in expected.splitlines()[1:] if line.startswith(f"{EPOCHS},")]
    assert len(set(last)) > 1  # margins differ between samples: the comparison means something
    for name in ("model.pt", "model_best.pt"):  # the best model too: the resumed run knew the best metric so far
        a, b = (torch.load(d / name, weights_only=True) for d in (ref, out))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), name


@pytest.mark.parametrize("bundle", BUNDLES)
def test_checkpoints_hold_the_best_model_saver(bundle, tmp_path):
    """``best_model`` in the checkpoint objects is the saver of model_best.pt, also when MLflow adds a handler."""
    for name in ("train", "train_sat", "train_std"):
        parser = ConfigParser()
        parser.read_config(configs(bundle, *sorted({"train", name})))
        parser.update({**tiny(tmp_path), "output_dir": str(tmp_path / "out")})
        parser["validate#handlers"].append({"_target_": "StatsHandler", "iteration_log": False})
        saver = parser.get_parsed_content("train#checkpoint_objects")["best_model"]
        assert isinstance(saver, AtomicCheckpointSaver) and saver._key_metric_checkpoint is not None


def test_data_pipeline_random_states_round_trip():
    """The transforms' random states (MONAI seeds them when it builds the loader) are found, saved and restored."""
    data = [{"image": np.full((1, 4, 4), i, dtype=np.float32), "label": np.zeros((1, 4, 4))} for i in range(8)]
    transform = Compose([RandFlipd(["image", "label"], prob=0.5), RandScaleIntensityd("image", factors=0.5, prob=1.0)])
    loader = DataLoader(Dataset(data, transform), batch_size=4, shuffle=True, generator=torch.Generator())
    generators = data_generators(loader)
    # Compose, RandFlipd, RandScaleIntensityd and its inner RandScaleIntensity; the loader's torch.Generator
    assert sum(isinstance(g, np.random.RandomState) for g in generators) == 4
    assert sum(isinstance(g, torch.Generator) for g in generators) == 1
    saved = generator_states(generators)
    first = [b["image"].clone() for b in loader]
    assert not torch.equal(torch.cat(first), torch.cat([b["image"] for b in loader]))  # another epoch differs
    assert set_generator_states(generators, saved)
    assert all(torch.equal(x, b["image"]) for x, b in zip(first, loader))  # restored: the same epoch again
    assert not set_generator_states(generators[1:], saved)  # another pipeline: nothing restored


def test_a_checkpoint_of_another_bundle_or_size_is_refused_by_name(tmp_path):
    engine = Engine(lambda e, b: None)
    net = torch.nn.Linear(2, 2)
    TrainingCheckpoint(tmp_path, {"network": net}, bundle="bundle_a", num_samples=10).save(engine)
    for bundle, size, named in (("bundle_b", 10, "'bundle_a'"), ("bundle_a", 11, "num_samples 10")):
        other = TrainingCheckpoint(tmp_path, {"network": net}, resume=True, bundle=bundle, num_samples=size)
        with pytest.raises(ValueError, match=f"{named}.*another bundle or data set"):
            other.load(engine)


def test_every_save_replaces_the_checkpoint_in_place(tmp_path):
    """Ignite's Checkpoint keeps one file under the fixed name, rewritten by each save (the same step included)."""
    engine = Engine(lambda e, b: None)
    net = torch.nn.Linear(2, 2)
    saver = TrainingCheckpoint(tmp_path, {"network": net}, bundle="b", num_samples=3)
    for value in (1.0, 2.0):
        with torch.no_grad():
            net.weight.fill_(value)
        saver.save(engine)  # no iteration between the saves
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert torch.all(state["network"]["weight"] == 2.0)
    assert state["meta"] == {"bundle": "b", "num_samples": 3, "settings": {}} and len(state["rng"]) == 1


def test_resume_with_another_epoch_length_runs_whole_epochs(tmp_path):
    """A checkpoint of 2 processes resumed by 1 (or with another batch size): the next epoch covers all batches."""
    net = torch.nn.Linear(2, 2)
    first = Engine(lambda e, b: None)
    TrainingCheckpoint(tmp_path, {"network": net, "trainer": first}).attach(first)
    first.run(range(4), max_epochs=1)
    resumed = Engine(lambda e, b: None)
    TrainingCheckpoint(tmp_path, {"network": net, "trainer": resumed}, resume=True).attach(resumed)
    resumed.state.max_epochs, resumed.state.epoch_length = 2, 8  # as MONAI's Workflow sets them before run()
    seen = []
    resumed.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.batch))
    resumed.run(range(8))
    assert seen == list(range(8)) and resumed.state.epoch == 2 and resumed.state.iteration == 16
