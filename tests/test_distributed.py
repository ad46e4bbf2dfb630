"""A bundle's ``multi_gpu_train.json`` in two gloo processes on the CPU, launched by ``torch.distributed.run``."""

import csv
import json

import pytest
import torch
from monai.bundle import ConfigParser

from monai_amat.data.segmentation import msd_volumes
from tests.helpers import ROOT, configs, tiny, two_cpu_ranks

BUNDLE = "msd_hippocampus_seg_amat"
N = 47  # one sample fewer than the 48 slices of 6 embedded cases: DistributedSampler pads rank 1 with a repeat


@pytest.mark.slow  # starts processes
def test_two_gloo_ranks_share_one_margin_table(tmp_path):
    """torchrun, 2 processes, the bundle's multi_gpu_train.json; a NaN loss on rank 1 at iteration 2 is skipped."""
    out = tmp_path / "amat"
    override = {
        # a plain DistributedSampler (no foreground oversampling), whose split of the data set is checked below
        **tiny(tmp_path, epochs=2, batch_size=4, default_tau=0.15, skip_non_finite=True, oversample_foreground=False),
        "output_dir": str(out),
        "train#dataset#data": f"$@data['train'][:{N}]",
        "train#margins#num_samples": N,
        "checkpoint#num_samples": N,
    }
    spec = {"config_file": configs(BUNDLE, "train", "multi_gpu_train"), "override": override, "nan_at": [1, 2]}
    proc = two_cpu_ranks(str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path / "ranks.pt"), json.dumps(spec))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    result = torch.load(tmp_path / "ranks.pt", weights_only=True)
    rank0, rank1 = result["ranks"]
    # the two ranks trained on different halves of the data (rank 1 has one repeat) ...
    first, second = set(rank0["indices"]), set(rank1["indices"])
    assert len(rank0["indices"]) == len(rank1["indices"]) == 24
    assert first | second == set(range(N)) and len(first & second) == 1
    # ... both skipped the batch whose loss was NaN on rank 1 only, and all-reduced gradients once per iteration
    # (2 epochs x 6): the clean term's gradient is accumulated locally (no_sync) and goes with the adversarial term's,
    # the skipped batch's round is dropped, and the attacks' 2 x 11 PGD steps all-reduced nothing
    assert result["iterations"] == 12 and rank0["skipped"] == rank1["skipped"] == 1
    assert rank0["rounds"] == rank1["rounds"] == 12
    # ... and hold one identical margin table, which is the checkpoint's and margins.csv's last epoch
    m0, m1 = result["tables"]
    assert m0.shape == (N,) and torch.equal(m0, m1)
    assert len(set(m0.tolist())) > 1  # margins differ between samples: the comparison means something
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert torch.equal(ckpt["margins"]["margins"], m0) and len(ckpt["rng"]) == 2
    with open(out / "margins.csv") as f:
        rows = list(csv.DictReader(f))
    for epoch in ("1", "2"):
        assert sorted(int(r["index"]) for r in rows if r["epoch"] == epoch) == list(range(N))
    assert len(rows) == 2 * N
    last = torch.tensor([float(r["margin"]) for r in rows if r["epoch"] == "2"])
    assert torch.allclose(last, m0, rtol=1e-6)

    # rank 0 alone wrote the files, and the network is saved without DDP's "module." prefix: the single-process
    # network of train.json loads model.pt and the checkpoint's network as they are
    assert len(list(out.glob("events.out.tfevents.*"))) == 1 and not list(out.glob(".*"))
    parser = ConfigParser()
    parser.read_config(configs(BUNDLE, "train"))
    parser.update(tiny(tmp_path))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    net.load_state_dict(ckpt["network"])


@pytest.mark.slow  # starts processes
def test_two_gloo_ranks_train_the_3d_variant_with_one_validation_volume(tmp_path):
    """multi_gpu_train.json before volumetric.json: one margin per case on both ranks; a validation set of one
    volume, fewer than the ranks, is padded by the validation sampler instead of refused."""
    out = tmp_path / "amat"
    override = {
        **tiny(tmp_path, epochs=2, embedded_cases=8, patch_size=[16, 16, 8], filters=[8, 16, 32], default_tau=0.3),
        "output_dir": str(out),
    }
    spec = {"config_file": configs(BUNDLE, "train", "multi_gpu_train", "volumetric"), "override": override}
    spec["nan_at"] = [-1, -1]
    proc = two_cpu_ranks(str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path / "ranks.pt"), json.dumps(spec))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    data = msd_volumes("embedded", "Task04_Hippocampus", [16, 16], embedded_dir=tmp_path / "data", embedded_cases=8)
    assert len(data["val"]) == 1 and "val_dice" in proc.stdout + proc.stderr
    m0, m1 = torch.load(tmp_path / "ranks.pt", weights_only=True)["tables"]
    assert m0.shape == (len(data["train"]),) and torch.equal(m0, m1)


def test_multi_gpu_configs_override_only_what_train_json_defines():
    bundles = sorted(p.parent.parent for p in (ROOT / "bundles").glob("*/configs/multi_gpu_train.json"))
    assert {b.name for b in bundles} >= {
        "msd_heart_seg_amat",
        "msd_hippocampus_seg_amat",
        "msd_prostate_seg_amat",
        "isbi2015_ceph_landmark_amat",
    }
    for bundle in bundles:
        multi = json.loads((bundle / "configs" / "multi_gpu_train.json").read_text())
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs" / "train.json"))
        for key in multi:
            parent = key.lstrip("+").rsplit("#", 1)[0] if "#" in key else key.lstrip("+")
            assert parent in parser, f"{bundle.name}: multi_gpu_train.json sets {key!r}, train.json lacks {parent!r}"
        assert "DistributedDataParallel" in multi["network"]["_target_"]
        assert any("init_process_group" in e and "gloo" in e for e in multi["initialize"])


def test_ranks_above_0_keep_the_handlers_that_change_training_subclasses_too(monkeypatch):
    from monai.handlers import StatsHandler, ValidationHandler

    import monai_amat.apps.distributed as distributed
    from monai_amat.handlers import MarginHandler

    class MyValidation(ValidationHandler):  # kept: it changes the training like its base class
        pass

    class Flagged:  # kept: it says so
        every_rank = True

    handlers = [StatsHandler(), MyValidation(interval=1), MarginHandler(4, delta=1.0), Flagged(), object()]
    assert distributed.main_rank_handlers(handlers) == handlers  # rank 0 (no torch.distributed here): all of them
    monkeypatch.setattr(distributed, "is_rank0", lambda: False)
    assert distributed.main_rank_handlers(handlers) == handlers[1:4]


def test_rank_device_per_local_rank_and_too_many_processes_for_the_gpus(monkeypatch):
    from monai_amat.apps.distributed import rank_device

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(KeyError, match="start multi_gpu_train.json with torchrun"):
        rank_device()
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rank_device() == torch.device("cpu")  # gloo processes
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert rank_device() == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # two processes on a one-GPU machine
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK 1 but 1 GPU\(s\) visible.*CUDA_VISIBLE_DEVICES="):
        rank_device()


def test_is_ddp_sees_through_torch_compile(tmp_path):
    """The trainer and the attack skip DDP's gradient sync for the clean pass and the attack; under MONAI's
    ``compile=True`` they get torch.compile's wrapper of the DDP module and must still recognise it."""
    import torch.distributed as dist

    from monai_amat.utils import is_ddp

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        net = torch.nn.Linear(2, 2)
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        assert is_ddp(ddp) and is_ddp(torch.compile(ddp, backend="eager"))
        assert not is_ddp(net) and not is_ddp(torch.compile(net, backend="eager"))
    finally:
        dist.destroy_process_group()
