"""The MSD bundles in 3D: ``configs/volumetric.json`` merged last (patch training, sliding-window evaluation)."""

import csv
import json
import math
import re

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow, run
from monai.inferers import SlidingWindowInferer

from monai_amat.apps.compare import CompareError, Comparison
from monai_amat.apps.compare.stages import StageError, bundle_defaults
from monai_amat.attacks import PGD, PerVoxelEpsScale, voxel_eps_scale
from monai_amat.data.segmentation import msd_volumes
from monai_amat.data.synthetic import make_embedded_msd
from monai_amat.engines import RobustEvaluator
from monai_amat.losses import PerSampleDiceCELoss
from tests.helpers import CHECKS, ROOT, SEG_BUNDLES, chain, configs, small_unet, tiny


def tiny3d(tmp_path, **extra):
    """The tiny 2D overrides plus a 3D patch and a small 3D network: 16 x 16 x 12 volumes, 16 x 16 x 8 patches."""
    return tiny(tmp_path, **{"patch_size": [16, 16, 8], "filters": [8, 16, 32], **extra})


def _task(bundle):
    return json.loads(open(configs(bundle, "train")[0]).read())["task"]


def _paper_size(bundle):
    return json.loads(open(configs(bundle, "train")[0]).read())["paper_spatial_size"]


@pytest.mark.parametrize("bundle", SEG_BUNDLES)
def test_bundle_in_3d_std_calibrate_amat_evaluate_sat_inference(bundle, tmp_path):
    settings = tiny3d(tmp_path)
    data = msd_volumes("embedded", _task(bundle), [16, 16], embedded_dir=settings["embedded_dir"], embedded_cases=6)
    out = {k: tmp_path / k for k in ("std", "amat", "sat")}

    run(config_file=configs(bundle, "train", "train_std", "volumetric"), output_dir=str(out["std"]), **settings)
    state = torch.load(out["std"] / "model.pt", weights_only=True)
    assert state["input_block.conv1.conv.weight"].dim() == 5  # a 3D network
    run(
        config_file=configs(bundle, "train", "calibrate", "volumetric"),
        ckpt_path=str(out["std"] / "model.pt"),
        **settings,
    )
    thresholds = json.loads((tmp_path / "thresholds.json").read_text())
    assert thresholds["samples"] == len(data["train"])  # one Dice per training volume

    run(config_file=configs(bundle, "train", "volumetric"), output_dir=str(out["amat"]), **{**settings, "epochs": 2})
    with open(out["amat"] / "margins.csv") as f:
        rows = list(csv.DictReader(f))
    n = len(data["train"])  # one margin per training case
    assert sorted({int(r["index"]) for r in rows}) == list(range(n)) and len(rows) == 2 * n
    ckpt = torch.load(out["amat"] / "checkpoint.pt", weights_only=True)
    assert ckpt["margins"]["margins"].numel() == n
    # the training budget is the patch's (not the 2D slice's), and a resume must keep the patch and strides
    settings_3d = ckpt["meta"]["settings"]
    assert math.isclose(settings_3d["eps_scale"], voxel_eps_scale([16, 16, 8], _paper_size(bundle)))
    assert settings_3d["patch_size"] == [16, 16, 8] and settings_3d["strides"] == [[1, 1, 1], [2, 2, 2], [2, 2, 2]]
    exported = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert exported["input_block.conv1.conv.weight"].dim() == 5

    run(config_file=configs(bundle, "train", "evaluate", "volumetric"), output_dir=str(out["amat"]), **settings)
    report = json.loads((out["amat"] / "robustness.json").read_text())
    assert report["eps_scale"] == str(PerVoxelEpsScale(_paper_size(bundle)))
    assert report["attack"]["of"] == ["pgd", "apgd", "segpgd"] and {c["check"] for c in report["checks"]} == CHECKS
    with open(out["amat"] / "sample_eps.csv") as f:
        samples = list(csv.DictReader(f))
    assert [r["case"] for r in samples] == [v["case"] for v in data["test"]] and "slice" not in samples[0]

    run(config_file=configs(bundle, "train", "train_sat", "volumetric"), output_dir=str(out["sat"]), **settings)
    assert (out["sat"] / "model.pt").is_file()

    images = tmp_path / "data" / _task(bundle) / "imagesTr"
    run(
        config_file=configs(bundle, "inference", "volumetric"),
        ckpt_path=str(tmp_path / "models" / "model.pt"),
        input_dir=str(images),
        prediction_dir=str(tmp_path / "pred"),
        spatial_size=[16, 16],
        patch_size=[16, 16, 8],
        filters=[8, 16, 32],
    )
    preds = sorted((tmp_path / "pred").glob("*_seg.nii.gz"))
    assert len(preds) == 6
    pred, image = nib.load(preds[0]), nib.load(sorted(images.glob("*.nii.gz"))[0])
    assert pred.shape == image.shape[:3] and np.allclose(pred.affine, image.affine, atol=1e-5)


def _msd_folder_of_two_depths(tmp_path):
    """An MSD task folder whose cases alternate between 6 and 10 slices (other names than the embedded ones)."""
    task_dir = tmp_path / "Task98_Depths"
    (task_dir / "imagesTr").mkdir(parents=True)
    (task_dir / "labelsTr").mkdir()
    training = []
    for depth in (6, 10):
        src = make_embedded_msd(
            tmp_path / f"src{depth}", "Task04_Hippocampus", num_cases=4, seed=depth, shape=(20, 20, depth)
        )
        for entry in json.loads((src / "dataset.json").read_text())["training"]:
            name = f"d{depth}_{len(training)}.nii.gz"
            (task_dir / "imagesTr" / name).write_bytes((src / entry["image"]).read_bytes())
            (task_dir / "labelsTr" / name).write_bytes((src / entry["label"]).read_bytes())
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = json.loads((src / "dataset.json").read_text())
    meta.update({"name": "Depths", "description": "test", "numTraining": len(training), "training": training})
    (task_dir / "dataset.json").write_text(json.dumps(meta))
    return task_dir


def test_real_msd_folder_with_volumes_of_different_depths(tmp_path):
    """Training pads the 6-slice cases to the 8-slice patch; evaluation attacks each whole volume."""
    task_dir = _msd_folder_of_two_depths(tmp_path)
    bundle = "msd_hippocampus_seg_amat"
    strides = [[1, 1, 1], [2, 2, 2], [2, 2, 2]]  # the real-data default has 4 levels; the tiny network has 3
    settings = {**tiny3d(tmp_path, default_tau=0.3), "data_source": "real", "dataset_dir": str(task_dir)}
    settings["strides"] = strides
    settings.pop("embedded_dir")
    out = tmp_path / "amat"
    run(config_file=configs(bundle, "train", "volumetric"), output_dir=str(out), **settings)
    data = msd_volumes("real", "Task04_Hippocampus", [16, 16], dataset_dir=task_dir)
    depths = {v["image"].shape[-1] for split in ("train", "test") for v in data[split]}
    assert depths == {6, 10}
    margins = (out / "margins.csv").read_text().splitlines()[1:]
    assert len(margins) == len(data["train"])
    run(config_file=configs(bundle, "train", "evaluate", "volumetric"), output_dir=str(out), **settings)
    report = json.loads((out / "robustness.json").read_text())
    assert report["breaking_eps"]["samples"] == len(data["test"])
    assert all(0 <= v <= 1 for v in report["metrics"]["dice_mean"])


def test_patch_size_must_suit_the_strides(tmp_path):
    """Refused first, before an earlier run is replaced (--overwrite True) and before any data is made."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.pt").write_bytes(b"an earlier run")
    for config in ("train", "train_std", "train_sat", "calibrate", "evaluate"):
        with pytest.raises(Exception) as info:
            run(
                config_file=configs("msd_heart_seg_amat", "train", config, "volumetric"),
                output_dir=str(out),
                overwrite=True,
                **tiny3d(tmp_path, patch_size=[16, 16, 6]),
            )
        assert re.search(r"'patch_size' = \[16, 16, 6\] is invalid.*multiples of \[4, 4, 4\]", chain(info), re.S)
    assert (out / "model.pt").read_bytes() == b"an earlier run" and not (tmp_path / "data").exists()


def test_3d_training_without_a_calibration_names_the_missing_file(tmp_path):
    """The 2D default tau (a slice Dice of the paper) is not used on 3D patches: a calibration is required."""
    settings = tiny3d(tmp_path)
    with pytest.raises(Exception) as info:
        run(config_file=configs("msd_heart_seg_amat", "train", "volumetric"), output_dir=str(tmp_path), **settings)
    assert f"{settings['thresholds_file']} not found" in chain(info) and "default_tau is null" in chain(info)


def _loss(net, x, y):
    return PerSampleDiceCELoss()(SlidingWindowInferer((16, 16, 8), overlap=0.5, mode="gaussian")(x, net), y)


def test_pgd_through_the_sliding_window_inferer_stays_in_the_ball_and_raises_the_loss():
    torch.manual_seed(0)
    net = small_unet(dims=3, norm="instance").eval()
    x = torch.randn(2, 1, 16, 16, 20)  # larger than one window along the depth: several windows, overlapping
    y = (x[:, :1] > 0.5).float()
    inferer = SlidingWindowInferer((16, 16, 8), overlap=0.5, mode="gaussian")
    eps = 2.0
    attack = PGD(PerSampleDiceCELoss(), norm="l2", steps=5, alpha=1.0)
    adv = attack(net, x, y, eps, forward_fn=lambda v: inferer(v, net))
    assert bool(((adv - x).flatten(1).norm(dim=1) <= eps + 1e-4).all())
    with torch.no_grad():
        assert bool((_loss(net, adv, y) > _loss(net, x, y)).all())


class _Recording(PGD):
    """PGD that records the budget of every call."""

    budgets: list

    def __call__(self, network, x, y, eps, **kwargs):
        self.budgets.append((x.shape[-1], float(eps)))
        return super().__call__(network, x, y, eps, **kwargs)


def test_per_voxel_eps_scale_gives_each_volume_its_own_budget():
    torch.manual_seed(0)
    reference = [32, 32]
    net = small_unet(dims=3, norm="instance").eval()
    volumes = [torch.randn(1, 1, 16, 16, d) for d in (8, 12, 20)]
    loader = [{"image": v, "label": (v > 0.5).float()} for v in volumes]
    attack = _Recording(PerSampleDiceCELoss(), norm="l2", steps=1, alpha=1.0)
    attack.budgets = []
    evaluator = RobustEvaluator(
        "cpu",
        loader,
        net,
        attack,
        eps_list=[0, 2],
        eps_scale=PerVoxelEpsScale(reference),
        inferer=SlidingWindowInferer((16, 16, 8)),
    )
    evaluator.run()
    assert [depth for depth, _ in attack.budgets] == [8, 12, 20]
    expected = [2 * math.sqrt(16 * 16 * d / (32 * 32)) for d in (8, 12, 20)]
    assert [budget for _, budget in attack.budgets] == pytest.approx(expected)
    assert voxel_eps_scale([16, 16, 8], reference) == pytest.approx(math.sqrt(2))
    assert evaluator.state.robustness["eps_scale"] == "sqrt(voxels per channel / 1024) per input"

    evaluator = RobustEvaluator("cpu", loader, net, attack, eps_list=[0, 2], eps_scale=lambda x: -1.0)
    with pytest.raises(ValueError, match="eps_scale must be finite and > 0, got -1.0"):
        evaluator.run()
    attack.budgets = []  # NumPy and 0-d tensor factors are numbers too
    RobustEvaluator("cpu", loader[:1], net, attack, eps_list=[0, 2], eps_scale=lambda x: torch.tensor(0.5)).run()
    RobustEvaluator("cpu", loader[:1], net, attack, eps_list=[0, 2], eps_scale=np.float32(0.5)).run()
    assert [budget for _, budget in attack.budgets] == [1.0, 1.0]
    with pytest.raises(ValueError, match=r"reference_size must be sizes >= 1, got \[0, 4\]"):
        PerVoxelEpsScale([0, 4])


def _stop_after_first_epoch(workflow):
    trainer = workflow.parser.get_parsed_content("train#trainer")
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda engine: engine.terminate())


def test_a_3d_run_stopped_after_an_epoch_and_resumed_ends_as_the_uninterrupted_run(tmp_path):
    bundle = "msd_prostate_seg_amat"
    files = configs(bundle, "train", "volumetric")
    settings = tiny3d(tmp_path, epochs=2, default_tau=0.3)
    run(config_file=files, output_dir=str(tmp_path / "ref"), **settings)

    out = tmp_path / "stopped"
    stopped = ConfigWorkflow(config_file=files, workflow_type="train", output_dir=str(out), **settings)
    stopped.initialize()
    _stop_after_first_epoch(stopped)
    stopped.run()
    stopped.finalize()
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)["trainer"]
    assert ckpt["iteration"] == ckpt["epoch_length"]  # one epoch
    with pytest.raises(Exception) as info:
        run(config_file=files, output_dir=str(out), resume=True, **{**settings, "patch_size": [16, 8, 16]})
    assert re.search(r"training settings \(patch_size: \[16, 16, 8\] -> \[16, 8, 16\]\)", chain(info))
    run(config_file=files, output_dir=str(out), resume=True, **settings)

    expected = (tmp_path / "ref" / "margins.csv").read_text()
    assert (out / "margins.csv").read_text() == expected
    assert len({line.split(",")[2] for line in expected.splitlines()[1:]}) > 1  # margins differ between cases
    a, b = (torch.load(d / "model.pt", weights_only=True) for d in (tmp_path / "ref", out))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_compare_runs_every_stage_with_the_overlay(tmp_path, monkeypatch):
    bundle = "msd_hippocampus_seg_amat"
    bundle_dir = ROOT / "bundles" / bundle
    assert bundle_defaults(bundle_dir, overlays=["volumetric"])["epochs"] == 60 != bundle_defaults(bundle_dir)["epochs"]
    overrides = {"embedded_dir": str(tmp_path / "data"), "epochs": 1}
    comparison = Comparison(bundle, tmp_path / "cmp", overrides, sat_eps=[5], overlays=["volumetric"], in_process=True)
    assert all(stage.settings["overlays"] == ["volumetric"] for stage in comparison.stages)

    def refuse(**kwargs):
        raise RuntimeError("stop here")

    monkeypatch.setattr("monai.bundle.run", refuse)
    with pytest.raises(StageError, match="stop here"):
        comparison.run()
    args = json.loads((tmp_path / "cmp" / "std" / "compare_train_args.json").read_text())
    assert [p.rsplit("/", 1)[1] for p in args["config_file"]] == ["train.json", "train_std.json", "volumetric.json"]
    with pytest.raises(CompareError, match="no configs/planar.json"):
        Comparison(bundle, tmp_path / "cmp2", overrides, overlays=["planar"])
