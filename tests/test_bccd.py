import os
import re
import shutil
import warnings
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from monai_amat.data import (
    BCCD_CLASSES,
    BCCD_SOURCES,
    bccd_datalist,
    bccd_sets,
    find_bccd_root,
    make_embedded_bccd,
    read_voc_annotation,
)

NUM = 12
SIZE = (320, 240)
SPLITS = ("train", "val", "test", "trainval")


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    return make_embedded_bccd(tmp_path_factory.mktemp("bccd"), num_images=NUM, seed=0, size=SIZE)


@pytest.fixture
def copy(embedded, tmp_path):
    """A writable copy of the embedded set."""
    return shutil.copytree(embedded, tmp_path / "BCCD")


def _stems(root, split):
    return (root / "ImageSets" / "Main" / f"{split}.txt").read_text().split()


def _all_items(root):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the embedded set needs no clipping or dropping
        return bccd_datalist(root, "trainval") + bccd_datalist(root, "test")


def _edit(xml_path, change):
    """Parse an XML file, apply ``change(root)`` and write it back."""
    tree = ET.parse(xml_path)
    change(tree.getroot())
    tree.write(xml_path)


def test_embedded_layout_and_sizes(embedded):
    assert embedded.name == "BCCD"
    assert sorted(p.name for p in embedded.parent.iterdir()) == ["BCCD"]  # no temporary folder left behind
    stems = [f"BloodImage_{i:05d}" for i in range(NUM)]
    assert sorted(p.name for p in (embedded / "JPEGImages").iterdir()) == [f"{s}.jpg" for s in stems]
    assert sorted(p.name for p in (embedded / "Annotations").iterdir()) == [f"{s}.xml" for s in stems]
    assert sorted(p.name for p in (embedded / "ImageSets" / "Main").iterdir()) == [f"{s}.txt" for s in sorted(SPLITS)]
    for stem in stems:
        root = ET.parse(embedded / "Annotations" / f"{stem}.xml").getroot()  # an independent parse
        assert root.tag == "annotation" and root.findtext("filename") == f"{stem}.jpg"
        xml_size = tuple(int(root.findtext(f"size/{tag}")) for tag in ("width", "height", "depth"))
        with Image.open(embedded / "JPEGImages" / f"{stem}.jpg") as im:
            assert im.format == "JPEG" and im.mode == "RGB" and (*im.size, 3) == xml_size == (*SIZE, 3)
        assert {o.findtext("name") for o in root.iter("object")} <= set(BCCD_CLASSES)


def test_embedded_boxes(embedded):
    items = _all_items(embedded)
    assert len(items) == NUM
    width, height = SIZE
    per_class = {c: [] for c in range(3)}
    for item in items:
        assert os.path.isabs(item["image"]) and item["size"] == SIZE
        boxes, labels = item["boxes"], item["labels"]
        assert boxes.dtype == np.float32 and boxes.shape == (len(labels), 4) and labels.dtype == np.int64
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (labels == 1).sum() >= 1 and (labels == 0).sum() >= 5  # a WBC and many RBCs in every image
        for box, label in zip(boxes, labels):
            per_class[int(label)].append(box)
    # mean box side, in pixels of the real 640 x 480 images
    side = {c: np.mean([(b[2] - b[0] + b[3] - b[1]) / 2 for b in per_class[c]]) * 640 / width for c in per_class}
    assert all(per_class.values())  # all three classes over the set
    assert side[1] > side[0] > side[2]  # WBC > RBC > Platelets
    assert 140 < side[1] < 240 and 65 < side[0] < 120 and 15 < side[2] < 40


def test_embedded_boxes_are_tight(embedded):
    """Each box holds stained (darker than the background) pixels within 3 pixels of each of its four sides."""
    for item in _all_items(embedded):
        with Image.open(item["image"]) as im:
            green = np.asarray(im, dtype=float)[..., 1]
        stained = green < np.percentile(green, 90) - 20
        assert 0.2 < stained.mean() < 0.8
        for box in item["boxes"].astype(int):
            x0, y0, x1, y1 = box
            cell = stained[y0:y1, x0:x1]
            assert cell[:3].any() and cell[-3:].any() and cell[:, :3].any() and cell[:, -3:].any(), box
        wbc = item["boxes"][item["labels"] == 1].astype(int)
        x0, y0, x1, y1 = wbc[0]
        assert green[y0:y1, x0:x1].min() < green.min() + 20  # the dark nucleus is in the WBC box


def test_embedded_splits(embedded):
    parts = {split: _stems(embedded, split) for split in SPLITS}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [8, 2, 2]
    assert not set(parts["train"]) & set(parts["val"])
    assert not (set(parts["train"]) | set(parts["val"])) & set(parts["test"])
    assert sorted(parts["train"] + parts["val"] + parts["test"]) == [f"BloodImage_{i:05d}" for i in range(NUM)]
    assert sorted(parts["trainval"]) == sorted(parts["train"] + parts["val"])
    for split in SPLITS:
        data = bccd_datalist(embedded, split)
        assert [os.path.basename(d["image"]) for d in data] == [f"{s}.jpg" for s in parts[split]]


def test_embedded_deterministic_and_idempotent(embedded, tmp_path):
    again = make_embedded_bccd(tmp_path / "a", num_images=NUM, seed=0, size=SIZE)
    for rel in ("JPEGImages/BloodImage_00004.jpg", "Annotations/BloodImage_00011.xml", "ImageSets/Main/train.txt"):
        assert (again / rel).read_bytes() == (embedded / rel).read_bytes()
    other = make_embedded_bccd(tmp_path / "b", num_images=3, seed=1, size=SIZE)
    assert (other / "Annotations/BloodImage_00000.xml").read_bytes() != (
        embedded / "Annotations/BloodImage_00000.xml"
    ).read_bytes()
    assert [len(_stems(other, s)) for s in SPLITS] == [1, 1, 1, 2]

    marker = again / "embedded.json"
    stamp = marker.stat().st_mtime_ns - 10**9
    os.utime(marker, ns=(stamp, stamp))
    assert make_embedded_bccd(tmp_path / "a", num_images=NUM, seed=0, size=SIZE) == again
    assert marker.stat().st_mtime_ns == stamp  # not rewritten

    make_embedded_bccd(tmp_path / "a", num_images=4, seed=0, size=(128, 96))  # other parameters replace it
    assert len(bccd_datalist(again, "trainval") + bccd_datalist(again, "test")) == 4
    assert sorted(os.listdir(tmp_path / "a")) == ["BCCD"]
    with Image.open(again / "JPEGImages" / "BloodImage_00003.jpg") as im:
        assert im.size == (128, 96)

    (tmp_path / "real" / "BCCD" / "JPEGImages").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="BCCD"):
        make_embedded_bccd(tmp_path / "real", num_images=3)
    with pytest.raises(ValueError, match="size"):
        make_embedded_bccd(tmp_path / "c", size=(32, 240))
    with pytest.raises(ValueError, match="num_images"):
        make_embedded_bccd(tmp_path / "c", num_images=2)


def test_nested_mirror(embedded, tmp_path):
    nested = shutil.copytree(embedded, tmp_path / "BCCD_Dataset" / "BCCD")
    assert find_bccd_root(tmp_path / "BCCD_Dataset") == nested
    assert find_bccd_root(nested) == nested
    expected = bccd_datalist(embedded, "train")
    got = bccd_datalist(tmp_path / "BCCD_Dataset", "train")
    assert [d["image"] for d in got] == [d["image"].replace(str(embedded), str(nested)) for d in expected]
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a["boxes"], b["boxes"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
    shutil.copytree(embedded, tmp_path / "BCCD_Dataset" / "other")
    with pytest.raises(ValueError, match="several"):
        find_bccd_root(tmp_path / "BCCD_Dataset")


def test_box_past_border_clipped(copy):
    xml_path = copy / "Annotations" / "BloodImage_00002.xml"
    before = read_voc_annotation(xml_path, copy / "JPEGImages")

    def push_out(root):
        box = root.find("object/bndbox")
        box.find("xmin").text = "-7"
        box.find("xmax").text = str(SIZE[0] + 30)

    _edit(xml_path, push_out)
    with pytest.warns(UserWarning, match=r"BloodImage_00002\.xml.*clipped") as record:
        after = read_voc_annotation(xml_path, copy / "JPEGImages")
    assert len(record) == 1
    assert after["boxes"][0, 0] == 0 and after["boxes"][0, 2] == SIZE[0]
    np.testing.assert_array_equal(after["boxes"][0, 1::2], before["boxes"][0, 1::2])
    np.testing.assert_array_equal(after["boxes"][1:], before["boxes"][1:])
    np.testing.assert_array_equal(after["labels"], before["labels"])


def test_zero_area_box_dropped(copy):
    xml_path = copy / "Annotations" / "BloodImage_00003.xml"
    before = read_voc_annotation(xml_path, copy / "JPEGImages")

    def flatten(root):  # as BCCD's BloodImage_00338.xml: xmin == xmax, ymin == ymax
        box = root.findall("object/bndbox")[1]
        box.find("xmax").text = box.find("xmin").text
        box.find("ymax").text = box.find("ymin").text

    _edit(xml_path, flatten)
    with pytest.warns(UserWarning, match=r"BloodImage_00003\.xml.*dropped 1 box.*object 1"):
        after = read_voc_annotation(xml_path, copy / "JPEGImages")
    np.testing.assert_array_equal(after["boxes"], np.delete(before["boxes"], 1, axis=0))
    np.testing.assert_array_equal(after["labels"], np.delete(before["labels"], 1))


def test_unknown_class(copy):
    xml_path = copy / "Annotations" / "BloodImage_00001.xml"

    def rename(root):
        root.find("object/name").text = "Neutrophil"

    _edit(xml_path, rename)
    with pytest.raises(ValueError, match=r"BloodImage_00001\.xml") as err:
        read_voc_annotation(xml_path, copy / "JPEGImages")
    message = str(err.value)
    assert "Neutrophil" in message and "'RBC'" in message and "class_map" in message
    class_map = {"RBC": 0, "WBC": 1, "Platelets": 2, "Neutrophil": 3}
    item = read_voc_annotation(xml_path, copy / "JPEGImages", class_map=class_map)
    assert item["labels"][0] == 3 and set(item["labels"][1:].tolist()) <= {0, 1, 2}
    stem = "BloodImage_00001"
    split = next(s for s in ("train", "val", "test") if stem in _stems(copy, s))
    with pytest.raises(ValueError, match="class_map"):
        bccd_datalist(copy, split)
    assert 3 in np.concatenate([d["labels"] for d in bccd_datalist(copy, split, class_map=class_map)])
    with pytest.raises(ValueError, match="class_map"):
        read_voc_annotation(xml_path, copy / "JPEGImages", class_map={"RBC": "red"})


def test_malformed_xml(copy):
    xml_path = copy / "Annotations" / "BloodImage_00005.xml"
    xml_path.write_text(xml_path.read_text()[:200])
    with pytest.raises(ValueError, match=r"BloodImage_00005\.xml"):
        read_voc_annotation(xml_path, copy / "JPEGImages")
    split = next(s for s in ("train", "val", "test") if "BloodImage_00005" in _stems(copy, s))
    with pytest.raises(ValueError, match=r"BloodImage_00005\.xml"):
        bccd_datalist(copy, split)


def test_missing_files(copy):
    first, second, third = _stems(copy, "trainval")[:3]
    os.remove(copy / "JPEGImages" / f"{first}.jpg")
    with pytest.raises(FileNotFoundError, match=rf"{first}\.xml.*JPEGImages/{first}\.jpg"):
        read_voc_annotation(copy / "Annotations" / f"{first}.xml", copy / "JPEGImages")
    os.remove(copy / "JPEGImages" / f"{second}.jpg")
    os.remove(copy / "Annotations" / f"{third}.xml")
    with pytest.raises(FileNotFoundError) as err:
        bccd_datalist(copy, "trainval")
    message = str(err.value)  # all missing files in one error, and only those
    assert f"JPEGImages/{first}.jpg" in message and f"JPEGImages/{second}.jpg" in message
    assert f"Annotations/{third}.xml" in message and "3 missing" in message
    assert _stems(copy, "trainval")[3] not in message
    assert len(bccd_datalist(copy, "test")) == 2
    with pytest.raises(FileNotFoundError, match=r"BloodImage_00042\.xml"):
        read_voc_annotation(copy / "Annotations" / "BloodImage_00042.xml", copy / "JPEGImages")


def test_size_mismatch(copy):
    xml_path = copy / "Annotations" / "BloodImage_00004.xml"

    def resize(root):
        root.find("size/width").text = "640"
        root.find("size/height").text = "480"

    _edit(xml_path, resize)
    with pytest.raises(ValueError) as err:
        read_voc_annotation(xml_path, copy / "JPEGImages")
    message = str(err.value)
    assert "BloodImage_00004.xml" in message and "BloodImage_00004.jpg" in message
    assert "640 x 480" in message and f"{SIZE[0]} x {SIZE[1]}" in message

    _edit(xml_path, lambda root: root.remove(root.find("size")))  # no <size>: the image's size is used
    assert read_voc_annotation(xml_path, copy / "JPEGImages")["size"] == SIZE


def test_missing_split_file(copy):
    os.remove(copy / "ImageSets" / "Main" / "val.txt")
    with pytest.raises(FileNotFoundError, match=r"ImageSets/Main/val\.txt"):
        bccd_datalist(copy, "val")
    assert len(bccd_datalist(copy, "train")) == 8
    with pytest.raises(ValueError, match="split"):
        bccd_datalist(copy, "validation")


def test_missing_root(tmp_path):
    for folder in (tmp_path / "nope", tmp_path):
        with pytest.raises(FileNotFoundError) as err:
            bccd_datalist(folder, "train")
        assert "JPEGImages" in str(err.value) and BCCD_SOURCES in str(err.value)
    assert "https://github.com/Shenggan/BCCD_Dataset" in BCCD_SOURCES and "MIT" in BCCD_SOURCES


def test_truncated_image_and_a_training_split_without_boxes_are_named(copy):
    stem = _stems(copy, "train")[0]
    image = copy / "JPEGImages" / f"{stem}.jpg"
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{re.escape(str(image))} .*not a readable image"):
        bccd_datalist(copy, "train")
    image.write_bytes(data)
    for xml in (copy / "Annotations").glob("*.xml"):
        _edit(xml, lambda root: [root.remove(o) for o in root.findall("object")])
    with pytest.raises(ValueError, match=r"training image\(s\) of ImageSets/Main/train.txt hold no box"):
        bccd_sets("real", dataset_dir=copy)
