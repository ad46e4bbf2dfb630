"""The BCCD detection bundle end to end, in-process as ``python -m monai.bundle run`` runs it."""

import csv
import json
import math
import shutil
import xml.etree.ElementTree as ET

import pytest
import torch
from monai.bundle import ConfigParser, run
from PIL import Image

from monai_amat.data.synthetic import make_embedded_bccd
from tests.helpers import CHECKS, DETECTION_SPATIAL, chain, ckpt_export, configs, detection_tiny, two_cpu_ranks

BUNDLE = "bccd_cell_detection_amat"
SPATIAL = DETECTION_SPATIAL


@pytest.mark.slow  # starts processes
def test_detection_bundle_all_configs(tmp_path):
    out = {k: tmp_path / k for k in ("std", "amat", "sat")}
    run(config_file=configs(BUNDLE, "train", "train_std"), output_dir=str(out["std"]), **detection_tiny(tmp_path))
    assert (out["std"] / "model.pt").is_file() and (out["std"] / "checkpoint.pt").is_file()
    run(
        config_file=configs(BUNDLE, "train", "calibrate"),
        ckpt_path=str(out["std"] / "model.pt"),
        **detection_tiny(tmp_path),
    )
    thresholds = json.loads((tmp_path / "thresholds.json").read_text())
    assert thresholds["criterion"] == "loss_threshold"
    assert thresholds["split"] == "train" and thresholds["samples"] > 0  # the authors' split for loss thresholds
    assert set(thresholds["thresholds"]) == {"classification", "box_regression"}
    assert thresholds["statistic"] == "max" and thresholds["z"] is None
    # the authors' detection thresholds: each component's largest per-image loss of the STD model on the training
    # images, computed here outside the calibration handler
    parser = ConfigParser()
    parser.read_config(configs(BUNDLE, "train", "calibrate"))
    for key, value in detection_tiny(tmp_path).items():
        parser[key] = value
    net, loss = parser.get_parsed_content("network").eval(), parser.get_parsed_content("loss")
    net.load_state_dict(torch.load(out["std"] / "model.pt", weights_only=True))
    prepare = parser.get_parsed_content("prepare_batch")
    largest = {}
    with torch.no_grad():
        for batch in parser.get_parsed_content("calibrate#dataloader"):
            images, targets = prepare(batch, torch.device("cpu"))[:2]
            for name, values in loss.components(net(images), targets).items():
                largest[name] = max(largest.get(name, -math.inf), float(values.max()))
    assert thresholds["thresholds"] == pytest.approx(largest, rel=1e-5)

    run(config_file=configs(BUNDLE, "train"), output_dir=str(out["amat"]), **detection_tiny(tmp_path, epochs=2))
    with open(out["amat"] / "margins.csv") as f:
        rows = list(csv.DictReader(f))
    train_items = 4  # 6 embedded images: 4 train, 1 validation, 1 test
    for epoch in ("1", "2"):
        assert sorted(int(r["index"]) for r in rows if r["epoch"] == epoch) == list(range(train_items))
    assert all(float(r["margin"]) >= 0 for r in rows)
    state = torch.load(out["amat"] / "model.pt", weights_only=True)
    assert any(k.startswith("feature_extractor.fpn.") for k in state)  # the RetinaNet network's own state dict

    run(config_file=configs(BUNDLE, "train", "evaluate"), output_dir=str(out["amat"]), **detection_tiny(tmp_path))
    report = json.loads((out["amat"] / "robustness.json").read_text())
    assert report["eps"] == [0, 5, 10, 15] and report["task"] == "detection"
    assert set(report["metrics"]) == {"map", "map_50"} and set(report["auc"]) == {"map", "map_50"}
    assert all(-1 <= v <= 1 and len(vs) == 4 for vs in report["metrics"].values() for v in vs)
    assert report["attack"]["steps"] == 2 and (out["amat"] / "robustness.png").is_file()
    assert report["attack"]["of"] == ["pgd", "apgd"] and report["attacks"]["apgd"]["name"] == "APGD"
    assert {c["check"] for c in report["checks"]} == CHECKS
    with open(out["amat"] / "sample_eps.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == report["breaking_eps"]["samples"] == 1 and rows[0]["image"].endswith(".jpg")

    run(config_file=configs(BUNDLE, "train", "train_sat"), output_dir=str(out["sat"]), **detection_tiny(tmp_path))
    assert (out["sat"] / "model.pt").is_file()

    images = tmp_path / "data" / "BCCD" / "JPEGImages"
    run(
        config_file=configs(BUNDLE, "inference"),
        ckpt_path=str(out["amat"] / "model.pt"),
        input_dir=str(images),
        prediction_dir=str(tmp_path / "pred"),
        spatial_size=SPATIAL,
        anchor_sizes=[4, 8, 16],
        score_thresh=0.0,
    )
    results = sorted((tmp_path / "pred").glob("*_detections.json"))
    assert [p.name for p in results] == [f"BloodImage_{i:05d}_detections.json" for i in range(6)]
    assert len(list((tmp_path / "pred").glob("*_detections.png"))) == 6
    detections = json.loads(results[0].read_text())
    assert detections["boxes"], "score_thresh 0 keeps boxes"
    assert detections["scores"] == sorted(detections["scores"], reverse=True)
    assert set(detections["classes"]) <= {"RBC", "WBC", "Platelets"}
    for xmin, ymin, xmax, ymax in detections["boxes"]:  # back in the 96 x 72 pixels of the original image
        assert 0 <= xmin <= xmax <= 96 and 0 <= ymin <= ymax <= 72
    with Image.open(tmp_path / "pred" / "BloodImage_00000_detections.png") as overlay:
        assert overlay.size == (96, 72)

    ts = ckpt_export(BUNDLE, out["amat"] / "model.pt", tmp_path / "model.ts", spatial_size=str(SPATIAL))
    scripted = torch.jit.load(str(ts))
    heads = scripted(torch.zeros(1, 3, *SPATIAL))
    assert [tuple(m.shape) for m in heads["classification"]] == [(1, 9, 16, 16), (1, 9, 8, 8), (1, 9, 4, 4)]


def _voc_folder(tmp_path):
    """A real-layout BCCD copy nested one level deeper (as in the BCCD repository), with two faulty boxes."""
    src = make_embedded_bccd(tmp_path / "src", num_images=8, seed=3, size=(96, 72))
    real = tmp_path / "BCCD_Dataset" / "BCCD"
    shutil.copytree(src, real)
    (real / "embedded.json").unlink()
    train = (real / "ImageSets" / "Main" / "train.txt").read_text().split()
    xml_path = real / "Annotations" / f"{train[0]}.xml"
    tree = ET.parse(xml_path)
    objects = tree.getroot().findall("object")
    objects[0].find("bndbox/xmax").text = "500"  # past the border: clipped
    objects[1].find("bndbox/xmin").text = objects[1].find("bndbox/xmax").text  # zero width: dropped
    tree.write(xml_path)
    return real, xml_path


def test_real_voc_folder_with_faults(tmp_path):
    real, faulty = _voc_folder(tmp_path)
    common = dict(data_source="real", dataset_dir=str(real.parent), **detection_tiny(tmp_path))
    # real data has no default thresholds: AMAT without a calibration is refused, naming the file, nothing written
    with pytest.raises(Exception) as info:
        run(config_file=configs(BUNDLE, "train"), output_dir=str(tmp_path / "o0"), **common)
    assert common["thresholds_file"] in chain(info) and "calibrate.json" in chain(info)
    assert not (tmp_path / "o0" / "checkpoint.pt").exists()
    common["default_thresholds"] = {"classification": 0.5, "box_regression": 0.5}
    with pytest.warns(UserWarning, match=faulty.name) as warned:
        run(config_file=configs(BUNDLE, "train"), output_dir=str(tmp_path / "o"), **common)
    messages = " ".join(str(w.message) for w in warned)
    assert "clipped" in messages and "dropped 1 box" in messages
    with open(tmp_path / "o" / "margins.csv") as f:
        assert len(list(csv.DictReader(f))) == len((real / "ImageSets" / "Main" / "train.txt").read_text().split())

    tree = ET.parse(faulty)
    tree.getroot().find("object/name").text = "Neutrophil"
    tree.write(faulty)
    with pytest.raises(Exception) as info:
        run(config_file=configs(BUNDLE, "train"), output_dir=str(tmp_path / "o2"), **common)
    assert "Neutrophil" in chain(info) and "class_map" in chain(info) and faulty.name in chain(info)
    assert not (tmp_path / "o2" / "model.pt").exists()
    class_map = {"RBC": 0, "WBC": 1, "Platelets": 2, "Neutrophil": 1}
    with pytest.warns(UserWarning, match=faulty.name):
        run(
            config_file=configs(BUNDLE, "train", "train_std"),
            output_dir=str(tmp_path / "o3"),
            class_map=class_map,
            **common,
        )
    assert (tmp_path / "o3" / "model.pt").is_file()
    with pytest.raises(Exception) as info:  # label 3 with three class_names: refused before anything is trained
        wrong = {**class_map, "Neutrophil": 3}
        run(config_file=configs(BUNDLE, "train"), output_dir=str(tmp_path / "o5"), **{**common, "class_map": wrong})
    assert "class_map" in chain(info) and "'Neutrophil': 3" in chain(info) and "class_names" in chain(info)
    assert not (tmp_path / "o5").exists() or not any((tmp_path / "o5").iterdir())

    (real / "JPEGImages" / faulty.with_suffix(".jpg").name).unlink()
    with pytest.raises(Exception) as info:
        run(config_file=configs(BUNDLE, "train"), output_dir=str(tmp_path / "o4"), class_map=class_map, **common)
    assert faulty.with_suffix(".jpg").name in chain(info) and "does not exist" in chain(info)


def test_missing_data_and_bad_settings_are_named(tmp_path):
    with pytest.raises(Exception) as info:
        run(
            config_file=configs(BUNDLE, "train"),
            data_source="real",
            dataset_dir=str(tmp_path / "none"),
            **detection_tiny(tmp_path),
        )
    assert "JPEGImages" in chain(info) and "BCCD_Dataset" in chain(info)
    with pytest.raises(Exception) as info:
        run(config_file=configs(BUNDLE, "train"), output_dir=str(tmp_path / "o"), **detection_tiny(tmp_path, delta=-1))
    assert "'delta'" in chain(info)
    with pytest.raises(Exception) as info:
        run(config_file=configs(BUNDLE, "train", "evaluate"), eps_list=[0, 10, 5], **detection_tiny(tmp_path))
    assert "'eps_list'" in chain(info)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # starts processes
def test_two_gloo_ranks_train_the_detector(tmp_path):
    """multi_gpu_train.json under torchrun on CPU: every training image once per epoch in margins.csv, one model."""
    out = tmp_path / "ddp"
    overrides = {**detection_tiny(tmp_path, embedded_cases=10, epochs=2), "output_dir": str(out)}
    cmd = ["-m", "monai.bundle", "run", "--config_file", str(configs(BUNDLE, "train", "multi_gpu_train"))]
    for key, value in overrides.items():
        cmd += [f"--{key}", repr(value) if not isinstance(value, str) else value]
    done = two_cpu_ranks(*cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "margins.csv") as f:
        rows = list(csv.DictReader(f))
    for epoch in ("1", "2"):  # 10 images: 6 train, 3 per rank
        assert sorted(int(r["index"]) for r in rows if r["epoch"] == epoch) == list(range(6))
    state = torch.load(out / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("events")) == [
        "checkpoint.pt",
        "margins.csv",
        "model.pt",
        "model_best.pt",
    ]


def test_every_detection_attack_clamps_to_the_image_range(tmp_path):
    """The authors clamp attacked detection images to [0, 1] in AMAT training, SAT and evaluation."""
    overrides = detection_tiny(tmp_path)
    attacks = {}
    for names in (["train"], ["train", "train_sat"]):
        parser = ConfigParser()
        parser.read_config(configs(BUNDLE, *names))
        for key, value in overrides.items():
            parser[key] = value
        attacks[names[-1]] = parser.get_parsed_content("train#trainer").attack
    parser = ConfigParser()
    parser.read_config(configs(BUNDLE, "train", "evaluate"))
    for key, value in overrides.items():
        parser[key] = value
    attacks.update({f"evaluate:{k}": v for k, v in parser.get_parsed_content("evaluate#attacks").items()})
    assert {k: a.value_range for k, a in attacks.items()} == {k: (0.0, 1.0) for k in attacks}
    net = parser.get_parsed_content("network")
    batch = next(iter(parser.get_parsed_content("train#dataloader")))
    images, targets = parser.get_parsed_content("prepare_batch")(batch, torch.device("cpu"))[:2]
    for name, attack in attacks.items():
        adv = attack(net, images, targets, 50.0)  # a budget far past the image range
        assert adv.min() >= 0.0 and adv.max() <= 1.0, name
        assert not torch.equal(adv, images), name
