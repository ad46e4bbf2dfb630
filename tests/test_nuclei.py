import json
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from monai.bundle import ConfigParser, run
from PIL import Image

from monai_amat.data import bccd_datalist, make_crowded_nuclei
from monai_amat.data.synthetic.nuclei import NUCLEUS
from tests.helpers import configs

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
BUNDLE = "bccd_cell_detection_amat"
NUM = 12
SIZE = (256, 256)
CLASS_MAP = {NUCLEUS: 0}


@pytest.fixture(scope="module")
def nuclei(tmp_path_factory):
    return make_crowded_nuclei(tmp_path_factory.mktemp("nuclei"), num_images=NUM, seed=0, size=SIZE)


def _items(root):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no box needs clipping or dropping
        return bccd_datalist(root, "trainval", CLASS_MAP) + bccd_datalist(root, "test", CLASS_MAP)


def test_layout_as_voc(nuclei):
    assert nuclei.name == "Nuclei" and sorted(p.name for p in nuclei.parent.iterdir()) == ["Nuclei"]
    for split, n in (("train", 8), ("val", 2), ("test", 2)):
        assert len(bccd_datalist(nuclei, split, CLASS_MAP)) == n
    root = ET.parse(nuclei / "Annotations" / "Nuclei_00000.xml").getroot()
    assert {o.findtext("name") for o in root.iter("object")} == {NUCLEUS}
    assert "make_crowded_nuclei" in root.findtext("source/database")
    with Image.open(nuclei / "JPEGImages" / "Nuclei_00000.jpg") as im:
        assert im.mode == "RGB" and im.size == SIZE


def test_crowded_small_touching_objects(nuclei):
    """20-125 objects of 8-30 px per image, many of them touching a neighbour, the background dark."""
    counts, sides, touching = [], [], 0
    for item in _items(nuclei):
        boxes = item["boxes"]
        counts.append(len(boxes))
        sides.extend(((boxes[:, 2] - boxes[:, 0]) + (boxes[:, 3] - boxes[:, 1])) / 2)
        x0, y0, x1, y1 = (boxes[:, k] for k in range(4))
        overlap_x = np.minimum(x1[:, None], x1[None]) - np.maximum(x0[:, None], x0[None])
        overlap_y = np.minimum(y1[:, None], y1[None]) - np.maximum(y0[:, None], y0[None])
        meets = (overlap_x >= 0) & (overlap_y >= 0)
        np.fill_diagonal(meets, False)
        touching += int(meets.any(1).sum())
        with Image.open(item["image"]) as im:
            grey = np.asarray(im, dtype=float)
        assert (grey[..., 0] == grey[..., 1]).all()  # grey values in three equal channels
        inside = np.zeros(grey.shape[:2], bool)
        for b in boxes.astype(int):
            inside[b[1] : b[3], b[0] : b[2]] = True
        assert np.median(grey[..., 0][~inside]) < 40 < np.median(grey[..., 0][inside])
    assert min(counts) >= 20 and max(counts) <= 125 and max(counts) > 80
    assert 5 <= min(sides) and max(sides) <= 32 and 12 < np.mean(sides) < 25
    assert touching > 0.3 * sum(counts)


def test_bundle_reads_it_from_class_names_alone(nuclei):
    """`--class_names "['nucleus']"` is all the detection bundle needs: its class_map follows the names."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "bccd_cell_detection_amat" / "configs" / "train.json"))
    parser.update({"data_source": "real", "dataset_dir": str(nuclei), "class_names": [NUCLEUS]})
    data = parser.get_parsed_content("data")
    assert [len(data[s]) for s in ("train", "val", "test")] == [8, 2, 2]
    assert {int(v) for item in data["train"] for v in item["labels"]} == {0}
    assert parser.get_parsed_content("network_def#num_classes") == 1


def test_deterministic_and_checked(nuclei, tmp_path):
    again = make_crowded_nuclei(tmp_path / "a", num_images=NUM, seed=0, size=SIZE)
    for name in ("Annotations/Nuclei_00003.xml", "ImageSets/Main/test.txt"):
        assert (again / name).read_bytes() == (nuclei / name).read_bytes()
    other = make_crowded_nuclei(tmp_path / "b", num_images=3, seed=1, size=(96, 64), count=(5, 5))
    assert all(len(i["boxes"]) <= 5 for i in bccd_datalist(other, "trainval", CLASS_MAP))
    with pytest.raises(ValueError, match="num_images"):
        make_crowded_nuclei(tmp_path / "c", num_images=2)
    with pytest.raises(ValueError, match="size"):
        make_crowded_nuclei(tmp_path / "c", size=(32, 256))
    with pytest.raises(ValueError, match="diameter"):
        make_crowded_nuclei(tmp_path / "c", diameter=(30.0, 8.0))
    (tmp_path / "d" / "Nuclei").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="Nuclei"):
        make_crowded_nuclei(tmp_path / "d")


@pytest.mark.slow  # three trainings of 60 epochs on 8 crowded images: about 90 s on one core
def test_std_and_amat_both_learn_on_crowded_images(tmp_path):
    """STD and AMAT (the focal detector, thresholds calibrated from the STD model) both reach a clear test mAP in
    the same number of iterations on crowded, touching nuclei in the real VOC layout."""
    root = make_crowded_nuclei(tmp_path / "data", size=(128, 128), count=(15, 40), diameter=(8, 20))
    common = {
        "data_source": "real",
        "dataset_dir": str(root),
        "class_names": [NUCLEUS],
        "epochs": 60,
        "batch_size": 4,
        "learning_rate": 3e-3,
        "train_attack_steps": 2,
        "spatial_size": [128, 128],
        "anchor_sizes": [8, 16, 32],
        "cls_loss": "focal",
        "export_model": False,
        "thresholds_file": str(tmp_path / "thresholds.json"),
    }
    evaluation = {"eps_list": [0], "eval_attacks": ["pgd"], "masking_checks": False, "breaking_eps": False}
    maps = {}
    for name, extra in (("std", ["train_std"]), ("amat", [])):
        out = tmp_path / name
        run(config_file=configs(BUNDLE, "train", *extra), output_dir=str(out), **common)
        if name == "std":
            run(config_file=configs(BUNDLE, "train", "calibrate"), ckpt_path=str(out / "model.pt"), **common)
        run(config_file=configs(BUNDLE, "train", "evaluate"), output_dir=str(out), **common, **evaluation)
        maps[name] = json.loads((out / "robustness.json").read_text())["metrics"]["map"][0]
    assert min(maps.values()) > 0.25, maps
