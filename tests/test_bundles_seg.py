"""The segmentation bundles end to end, run in-process the way ``python -m monai.bundle run`` runs them."""

import csv
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import run

from monai_amat.data.synthetic import make_embedded_msd
from tests.helpers import CHECKS, ROOT, SEG_BUNDLES, chain, ckpt_export, configs, tiny

BUNDLES = SEG_BUNDLES


@pytest.mark.parametrize("bundle", BUNDLES)
def test_bundle_std_calibrate_amat_evaluate_sat_inference(bundle, tmp_path):
    out = {k: tmp_path / k for k in ("std", "amat", "sat")}
    run(config_file=configs(bundle, "train", "train_std"), output_dir=str(out["std"]), **tiny(tmp_path))
    assert (out["std"] / "model.pt").is_file() and (out["std"] / "model_best.pt").is_file()
    assert not (tmp_path / "models").exists()  # only AMAT training exports the bundle's model
    run(config_file=configs(bundle, "train", "calibrate"), ckpt_path=str(out["std"] / "model.pt"), **tiny(tmp_path))
    thresholds = json.loads((tmp_path / "thresholds.json").read_text())
    assert thresholds["criterion"] == "dice" and 0 <= thresholds["thresholds"]["tau"] <= 1
    assert thresholds["split"] == "train" and thresholds["samples"] > 0  # the authors' split (docs/fidelity.md)

    run(config_file=configs(bundle, "train"), output_dir=str(out["amat"]), **tiny(tmp_path, epochs=2))
    state = torch.load(out["amat"] / "model.pt", weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    exported = torch.load(tmp_path / "models" / "model.pt", weights_only=True)  # models/model.pt, the zoo's place
    assert exported.keys() == state.keys() and all(torch.equal(exported[k], state[k]) for k in state)
    with open(out["amat"] / "margins.csv") as f:
        rows = list(csv.DictReader(f))
    n = len({r["index"] for r in rows})
    assert n > 0 and len(rows) == 2 * n and {r["epoch"] for r in rows} == {"1", "2"}
    ckpt = torch.load(out["amat"] / "checkpoint.pt", weights_only=True)
    assert (
        ckpt["trainer"]["iteration"] == 2 * ckpt["trainer"]["epoch_length"] and ckpt["margins"]["margins"].numel() == n
    )

    run(config_file=configs(bundle, "train", "evaluate"), output_dir=str(out["amat"]), **tiny(tmp_path))
    report = json.loads((out["amat"] / "robustness.json").read_text())
    eps = json.loads(Path(configs(bundle, "evaluate")[0]).read_text())["eps_list"]
    assert report["task"] == "segmentation" and report["eps"] == eps and eps[0] == 0
    paper = json.loads(Path(configs(bundle, "train")[0]).read_text())["paper_spatial_size"]
    assert report["eps_scale"] == pytest.approx((16 * 16 / (paper[0] * paper[1])) ** 0.5)
    assert report["attack"]["random_start"] is True  # the authors' evaluation PGD starts at random
    assert report["attack"]["name"] == "worst case" and report["attack"]["of"] == ["pgd", "apgd", "segpgd"]
    assert set(report["metrics"]) == {"dice_mean", "dice_total"} and all("dice" in k for k in report["auc"])
    assert all(len(v) == len(eps) for v in report["metrics"].values())
    assert set(report["per_attack"]) == {"pgd", "apgd", "segpgd"}
    assert {c["check"] for c in report["checks"]} == CHECKS
    assert report["breaking_eps"]["max_eps"] == eps[-1] and report["breaking_eps"]["attack"] == "pgd"
    with open(out["amat"] / "sample_eps.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == report["breaking_eps"]["samples"] > 0 and set(rows[0]) >= {"case", "slice", "breaking_eps"}
    assert all(0 <= float(r["breaking_eps"]) <= eps[-1] for r in rows)
    assert (out["amat"] / "robustness.png").stat().st_size > 0 and (out["amat"] / "sample_eps.png").is_file()

    run(config_file=configs(bundle, "train", "train_sat"), output_dir=str(out["sat"]), **tiny(tmp_path))
    assert (out["sat"] / "model.pt").is_file() and not (out["sat"] / "margins.csv").exists()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["model.pt"]
    after_sat = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(after_sat[k], state[k]) for k in state)  # SAT does not replace the exported AMAT model

    task = json.loads(Path(configs(bundle, "train")[0]).read_text())["task"]
    images = tmp_path / "data" / task / "imagesTr"
    run(
        config_file=configs(bundle, "inference"),
        ckpt_path=str(tmp_path / "models" / "model.pt"),
        input_dir=str(images),
        prediction_dir=str(tmp_path / "pred"),
        spatial_size=[16, 16],
    )
    preds = sorted((tmp_path / "pred").glob("*_seg.nii.gz"))
    assert len(preds) == 6
    first = sorted(images.glob("*.nii.gz"))[0]
    pred, image = nib.load(preds[0]), nib.load(first)
    assert pred.shape == image.shape[:3] and np.allclose(pred.affine, image.affine, atol=1e-5)


@pytest.mark.slow  # starts processes
def test_ckpt_export_and_real_data_on_any_msd_folder(tmp_path):
    """`--data_source real` reads an MSD folder with other file names, modalities and labels."""
    custom = make_embedded_msd(tmp_path / "src", "Task05_Prostate", num_cases=6, seed=3, shape=(24, 24, 6))
    task_dir = tmp_path / "Task99_Custom"
    (task_dir / "imagesTr").mkdir(parents=True)
    (task_dir / "labelsTr").mkdir()
    training = []
    for i, entry in enumerate(json.loads((custom / "dataset.json").read_text())["training"]):
        img, lab = custom / entry["image"], custom / entry["label"]
        (task_dir / "imagesTr" / f"case{i}.nii.gz").write_bytes(img.read_bytes())
        (task_dir / "labelsTr" / f"case{i}.nii.gz").write_bytes(lab.read_bytes())
        training.append({"image": f"./imagesTr/case{i}.nii.gz", "label": f"./labelsTr/case{i}.nii.gz"})
    meta = {
        "name": "Custom",
        "modality": {"0": "A", "1": "B"},
        "labels": {"0": "bg", "1": "x", "2": "y", "3": "unused"},
        "numTraining": 6,
        "training": training,
        "test": [],
    }
    (task_dir / "dataset.json").write_text(json.dumps(meta))
    bundle = "msd_hippocampus_seg_amat"
    out = tmp_path / "amat"
    run(
        config_file=configs(bundle, "train"),
        output_dir=str(out),
        data_source="real",
        dataset_dir=str(task_dir),
        epochs=1,
        train_attack_steps=1,
        batch_size=4,
        spatial_size=[16, 16],
        filters=[8, 16, 32],
        thresholds_file=str(tmp_path / "none.json"),
        models_dir=str(tmp_path / "models"),
    )
    state = torch.load(out / "model.pt", weights_only=True)
    first_conv = next(v for k, v in state.items() if k.endswith("conv1.conv.weight"))
    last = state["output_block.conv.conv.weight"]
    assert first_conv.shape[1] == 2 and last.shape[0] == 4  # channels and classes came from dataset.json

    ts = ckpt_export(
        bundle,
        out / "model.pt",
        tmp_path / "model.ts",
        in_channels=2,
        out_channels=4,
        filters="[8, 16, 32]",
        spatial_size="[16, 16]",
    )
    net = torch.jit.load(str(ts))
    assert net(torch.zeros(1, 2, 16, 16)).shape == (1, 4, 16, 16)


def test_bad_settings_are_named_before_training(tmp_path):
    bundle = "msd_hippocampus_seg_amat"
    cases = [
        ({"delta": -1.0}, ["train"], r"'delta' = -1.0 is invalid"),
        ({"data_source": "real"}, ["train"], r"'dataset_dir' must name the data set folder"),
        ({"data_source": "real", "dataset_dir": str(tmp_path / "nowhere")}, ["train"], r"nowhere.*prepare_msd"),
        ({"eps_list": [0, 5, 2]}, ["train", "evaluate"], r"'eps_list'.*ascending"),
        ({"beta": 1.5}, ["train"], r"'beta' = 1.5 is invalid"),
    ]
    for overrides, names, pattern in cases:
        with pytest.raises(Exception) as info:
            run(
                config_file=configs(bundle, *names), output_dir=str(tmp_path / "out"), **{**tiny(tmp_path), **overrides}
            )
        assert re.search(pattern, chain(info), re.S), chain(info)
    assert not (tmp_path / "out" / "model.pt").exists()


def test_mlflow_tracking(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    run(
        config_file=configs("msd_hippocampus_seg_amat", "train", "train_std"),
        output_dir=str(tmp_path / "std"),
        tracking="mlflow",
        tracking_uri=uri,
        **tiny(tmp_path),
    )
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and "train_loss" in runs[0].data.metrics


def test_resume_extends_a_run_and_refuses_a_foreign_checkpoint(tmp_path):
    bundle = "msd_hippocampus_seg_amat"
    out = tmp_path / "amat"
    run(config_file=configs(bundle, "train"), output_dir=str(out), **tiny(tmp_path))
    first = (out / "margins.csv").read_text().splitlines()
    run(config_file=configs(bundle, "train"), output_dir=str(out), resume=True, **tiny(tmp_path, epochs=2))
    rows = (out / "margins.csv").read_text().splitlines()
    assert rows[: len(first)] == first and {r.split(",")[0] for r in rows[1:]} == {"1", "2"}
    assert len(rows) - 1 == 2 * (len(first) - 1)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["trainer"]["iteration"] == 2 * ckpt["trainer"]["epoch_length"]
    with pytest.raises(Exception) as info:  # another data set size: refused, not half-loaded
        run(
            config_file=configs(bundle, "train"),
            output_dir=str(out),
            resume=True,
            **tiny(tmp_path, epochs=3, embedded_cases=7),
        )
    assert "another bundle or data set" in chain(info)


# the keys in which the MSD bundles may differ, per config file: the task, its sizes and its noise levels
TASK_KEYS = {
    "train.json": {"bundle_name", "task", "data_defaults", "paper_spatial_size", "delta", "sat_eps_list"},
    "train_sat.json": {"sat_eps"},
    "evaluate.json": {"eps_list"},
    "volumetric.json": {"+data_defaults#embedded", "+data_defaults#real"},
    "inference.json": {"bundle_name", "dataset_dir", "data_defaults", "in_channels", "out_channels"},
    "metadata.json": {"name", "task", "description", "data_source", "network_data_format"}
    | {"image_classes", "label_classes", "pred_classes"},
}


def test_msd_bundles_share_one_skeleton():
    """Each MSD bundle is self-contained (the model-zoo rule); a change to one bundle's shared part must reach all."""
    folders = [ROOT / "bundles" / b / "configs" for b in BUNDLES]
    names = sorted(p.name for p in folders[0].iterdir())
    assert all(sorted(p.name for p in f.iterdir()) == names for f in folders) and "multi_gpu_train.json" in names
    for name in names:
        texts = [(f / name).read_text() for f in folders]
        if not name.endswith(".json"):
            assert len(set(texts)) == 1, name
            continue
        parsed = [json.loads(t) for t in texts]
        keys = set().union(*parsed)
        differ = {k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in parsed}) > 1}
        assert differ <= TASK_KEYS.get(name, set()), (name, sorted(differ - TASK_KEYS.get(name, set())))
    for folder in folders:  # inference.json repeats the training's network sizes: they must agree
        train, inference = (
            json.loads((folder / n).read_text())["data_defaults"] for n in ("train.json", "inference.json")
        )
        assert train.keys() == inference.keys() == {"embedded", "real"}, folder
        for source in train:
            assert all(train[source][k] == inference[source][k] for k in ("spatial_size", "filters")), folder


@pytest.mark.slow  # a whole standard training on the embedded defaults (about 20 s on 2 cores)
def test_standard_training_fits_the_embedded_hippocampus(tmp_path):
    """The stand-in is learnable: STD with the bundle's embedded defaults reaches a Dice in the real task's range."""
    bundle, out = "msd_hippocampus_seg_amat", tmp_path / "std"
    common = {"embedded_dir": str(tmp_path / "data"), "models_dir": str(tmp_path / "models")}
    run(config_file=configs(bundle, "train", "train_std"), output_dir=str(out), **common)
    clean = {"eps_list": [0], "eval_attacks": ["pgd"], "masking_checks": False, "breaking_eps": False}
    run(config_file=configs(bundle, "train", "evaluate"), output_dir=str(out), **common, **clean)
    report = json.loads((out / "robustness.json").read_text())
    assert report["metrics"]["dice_mean"][0] >= 0.7, report["metrics"]  # 0.33 on the stand-in before it
