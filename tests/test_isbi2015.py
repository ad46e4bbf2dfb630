import os
import re
import shutil
import struct
import warnings

import numpy as np
import pytest
from PIL import Image

from monai_amat.data import (
    ISBI2015_SOURCES,
    NUM_LANDMARKS,
    PIXEL_SPACING_MM,
    find_isbi2015_root,
    isbi2015_datalist,
    isbi2015_split,
    make_embedded_isbi2015,
    read_annotation,
    read_isbi2015_image,
)

NUM = 12
SIZE = (160, 200)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    return make_embedded_isbi2015(tmp_path_factory.mktemp("isbi"), num_images=NUM, seed=0, size=SIZE)


@pytest.fixture
def copy(embedded, tmp_path):
    """A writable copy of the embedded set."""
    return shutil.copytree(embedded, tmp_path / "ISBI2015")


def _parse(path):
    """An independent parse of the first 19 lines."""
    with open(path) as f:
        lines = f.read().splitlines()
    return np.array([[float(v) for v in line.split(",")] for line in lines[:NUM_LANDMARKS]])


def _bits_per_pixel(path):
    with open(path, "rb") as f:
        header = f.read(30)
    assert header[:2] == b"BM"
    return struct.unpack("<H", header[28:30])[0]


def _window(image, point, k=2):
    x, y = (int(round(v)) for v in point)
    return image[max(y - k, 0) : y + k + 1, max(x - k, 0) : x + k + 1].astype(float)


def test_embedded_layout_and_datalist(embedded):
    assert embedded.name == "ISBI2015"
    assert sorted(p.name for p in embedded.parent.iterdir()) == ["ISBI2015"]  # no temporary folder left behind
    assert sorted(p.name for p in (embedded / "RawImage" / "TrainingData").iterdir()) == [
        f"{i:03d}.bmp" for i in range(1, NUM + 1)
    ]
    for doctor in ("senior", "junior"):
        for i in range(1, NUM + 1):
            lines = (embedded / f"400_{doctor}" / f"{i:03d}.txt").read_text().splitlines()
            assert len(lines) > NUM_LANDMARKS and "," not in lines[NUM_LANDMARKS]
    data = isbi2015_datalist(embedded)
    assert [d["id"] for d in data] == list(range(1, NUM + 1))
    for d in data:
        path = embedded / "RawImage" / "TrainingData" / f"{d['id']:03d}.bmp"
        assert d["image"] == str(path) and os.path.isabs(d["image"]) and d["spacing"] == PIXEL_SPACING_MM == 0.1
        with Image.open(path) as im:
            assert im.format == "BMP" and im.mode == "L" and im.size == SIZE
        assert _bits_per_pixel(path) == 8
        lm = d["landmarks"]
        assert lm.shape == (NUM_LANDMARKS, 2) and lm.dtype == np.float32
        assert (lm >= 0).all() and (lm[:, 0] <= SIZE[0] - 1).all() and (lm[:, 1] <= SIZE[1] - 1).all()
        senior = _parse(embedded / "400_senior" / f"{d['id']:03d}.txt")
        junior = _parse(embedded / "400_junior" / f"{d['id']:03d}.txt")
        np.testing.assert_allclose(lm, (senior + junior) / 2)
        assert 0 < np.abs(senior - junior).max() <= 2
    assert isbi2015_datalist(embedded, ids=[3, 1])[0]["id"] == 3


def test_embedded_landmarks_move_and_sit_on_the_skull(embedded):
    data = isbi2015_datalist(embedded)
    landmarks = np.stack([d["landmarks"] for d in data])
    assert landmarks.std(axis=0).min() > 1.0  # every landmark moves between images
    rng = np.random.default_rng(0)
    for d in data:
        image = read_isbi2015_image(d["image"])
        assert image.shape == SIZE[::-1] and image.std() > 20
        head = image > 60
        rows, cols = np.flatnonzero(head.sum(1) >= 3), np.flatnonzero(head.sum(0) >= 3)
        x, y = d["landmarks"].T
        assert (x >= cols[0]).all() and (x <= cols[-1]).all() and (y >= rows[0]).all() and (y <= rows[-1]).all()
        random_points = rng.uniform(0, 1, (200, 2)) * (np.array(SIZE) - 1)
        at_landmarks = [_window(image, p) for p in d["landmarks"]]
        at_random = [_window(image, p) for p in random_points]
        # landmarks are on edges of bright structures: high local contrast and brighter than average
        assert np.mean([w.std() for w in at_landmarks]) > 2 * np.mean([w.std() for w in at_random])
        assert np.mean([w.mean() for w in at_landmarks]) > np.mean([w.mean() for w in at_random]) + 20


def test_embedded_deterministic_and_idempotent(embedded, tmp_path):
    again = make_embedded_isbi2015(tmp_path / "a", num_images=NUM, seed=0, size=SIZE)
    for rel in ("RawImage/TrainingData/005.bmp", "400_senior/005.txt", "400_junior/012.txt"):
        assert (again / rel).read_bytes() == (embedded / rel).read_bytes()
    other = make_embedded_isbi2015(tmp_path / "b", num_images=2, seed=1, size=SIZE)
    assert (other / "400_senior/001.txt").read_bytes() != (embedded / "400_senior/001.txt").read_bytes()

    marker = again / "embedded.json"
    stamp = marker.stat().st_mtime_ns - 10**9
    os.utime(marker, ns=(stamp, stamp))
    assert make_embedded_isbi2015(tmp_path / "a", num_images=NUM, seed=0, size=SIZE) == again
    assert marker.stat().st_mtime_ns == stamp  # not rewritten

    make_embedded_isbi2015(tmp_path / "a", num_images=3, seed=0, size=SIZE)  # other parameters replace it
    assert len(isbi2015_datalist(again)) == 3
    assert sorted(os.listdir(tmp_path / "a")) == ["ISBI2015"]

    (tmp_path / "real" / "ISBI2015" / "RawImage").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="ISBI2015"):
        make_embedded_isbi2015(tmp_path / "real", num_images=2)
    with pytest.raises(ValueError, match="size"):
        make_embedded_isbi2015(tmp_path / "c", size=(20, 200))


def test_embedded_other_size(tmp_path):
    size = (96, 120)
    root = make_embedded_isbi2015(tmp_path, num_images=3, seed=2, size=size)
    for d in isbi2015_datalist(root):
        with Image.open(d["image"]) as im:
            assert im.size == size
        lm = d["landmarks"]
        assert (lm >= 0).all() and (lm < np.array(size)).all()


def test_nested_layout_and_annotations_by_md(embedded, tmp_path):
    expected = isbi2015_datalist(embedded)
    nested = shutil.copytree(embedded, tmp_path / "outer" / "ISBI2015")
    (nested / "AnnotationsByMD").mkdir()
    for doctor in ("senior", "junior"):
        shutil.move(nested / f"400_{doctor}", nested / "AnnotationsByMD" / f"400_{doctor}")
    assert find_isbi2015_root(tmp_path / "outer") == nested
    assert find_isbi2015_root(nested) == nested
    got = isbi2015_datalist(tmp_path / "outer")
    assert [d["image"] for d in got] == [d["image"].replace(str(embedded), str(nested)) for d in expected]
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a["landmarks"], b["landmarks"])


def test_rgb_bmp_accepted(copy):
    path = copy / "RawImage" / "TrainingData" / "002.bmp"
    gray = read_isbi2015_image(path)
    Image.fromarray(np.repeat(gray[..., None], 3, axis=-1), mode="RGB").save(path)
    assert _bits_per_pixel(path) == 24
    np.testing.assert_array_equal(read_isbi2015_image(path), gray)
    assert isbi2015_datalist(copy, ids=[2])[0]["image"] == str(path)


def test_read_annotation_tolerates_spaces_and_crlf(tmp_path):
    path = tmp_path / "001.txt"
    lines = [f"{i} , {2 * i}" for i in range(NUM_LANDMARKS)] + ["2", "", "junk"]
    path.write_bytes("\r\n".join(lines).encode())
    points = read_annotation(path)
    assert points.shape == (NUM_LANDMARKS, 2)
    np.testing.assert_array_equal(points[:, 1], 2 * points[:, 0])


def test_bad_annotations(copy):
    short = copy / "400_senior" / "004.txt"
    short.write_text("\n".join(f"{i},{i}" for i in range(18)) + "\n")
    with pytest.raises(ValueError, match=r"004\.txt.*18"):
        read_annotation(short)
    with pytest.raises(ValueError, match=r"004\.txt.*18"):
        isbi2015_datalist(copy, ids=[4])
    bad = copy / "400_junior" / "005.txt"
    lines = bad.read_text().splitlines()
    lines[4] = "12;34"
    bad.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"005\.txt, line 5.*12;34"):
        read_annotation(bad)


def test_missing_files(copy, tmp_path):
    os.remove(copy / "400_junior" / "003.txt")
    os.remove(copy / "400_junior" / "007.txt")
    with pytest.raises(FileNotFoundError) as err:
        isbi2015_datalist(copy)
    message = str(err.value)
    assert "400_junior/003.txt" in message and "400_junior/007.txt" in message and "use_doctors" in message
    assert "004.txt" not in message
    senior = isbi2015_datalist(copy, use_doctors="senior")
    np.testing.assert_array_equal(senior[2]["landmarks"], _parse(copy / "400_senior" / "003.txt"))

    shutil.rmtree(copy / "400_junior")
    with pytest.raises(FileNotFoundError, match=r"(?s)400_junior.*use_doctors"):
        isbi2015_datalist(copy)
    assert len(isbi2015_datalist(copy, use_doctors="senior")) == NUM
    with pytest.raises(FileNotFoundError, match="400_junior"):
        isbi2015_datalist(copy, use_doctors="junior")

    os.remove(copy / "RawImage" / "TrainingData" / "006.bmp")
    os.remove(copy / "RawImage" / "TrainingData" / "009.bmp")
    with pytest.raises(FileNotFoundError) as err:
        isbi2015_datalist(copy, use_doctors="senior")
    assert "TrainingData/006.bmp" in str(err.value) and "TrainingData/009.bmp" in str(err.value)
    assert "use_doctors" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="Test1Data/151.bmp"):  # ids beyond the set: the real layout
        isbi2015_datalist(copy, ids=[151], use_doctors="senior")
    with pytest.raises(ValueError, match="use_doctors"):
        isbi2015_datalist(copy, use_doctors="mean")


def test_missing_root(tmp_path):
    for folder in (tmp_path / "nope", tmp_path):
        with pytest.raises(FileNotFoundError) as err:
            isbi2015_datalist(folder)
        assert "RawImage" in str(err.value) and ISBI2015_SOURCES in str(err.value)
    assert "https://figshare.com/s/37ec464af8e81ae6ebbf" in ISBI2015_SOURCES


def test_split_by_paper_ranges():
    data = [{"id": i} for i in range(400, 0, -1)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        split = isbi2015_split(data)
    assert [len(split[k]) for k in ("train", "val", "test")] == [150, 50, 100]
    assert sorted(d["id"] for d in split["train"]) == list(range(1, 151))
    assert sorted(d["id"] for d in split["val"]) == list(range(151, 201))
    assert sorted(d["id"] for d in split["test"]) == list(range(201, 301))


def test_split_fallback(embedded):
    data = isbi2015_datalist(embedded)
    with pytest.warns(UserWarning, match="by position"):
        split = isbi2015_split(data)
    ids = [[d["id"] for d in split[k]] for k in ("train", "val", "test")]
    assert ids == [list(range(1, 9)), [9, 10], [11, 12]]
    assert sorted(sum(ids, [])) == list(range(1, NUM + 1))
    for n, sizes in ((3, [1, 1, 1]), (5, [3, 1, 1]), (2, [1, 0, 1]), (1, [1, 0, 0])):
        with pytest.warns(UserWarning, match=f"empty for these {n} item"):
            split = isbi2015_split([{"id": i} for i in range(1, n + 1)])
        assert [len(split[k]) for k in ("train", "val", "test")] == sizes
    with pytest.raises(ValueError):
        isbi2015_split([])


def test_landmarks_outside_the_image_and_truncated_images_are_named(copy):
    ann = copy / "400_senior" / "003.txt"
    lines = ann.read_text().splitlines()
    lines[6] = "-500,9000"  # landmark 7; the mean with the junior doctor's point is outside too
    ann.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        ValueError, match=r"003\.txt.*landmark\(s\) \[7\] at \[\(.*\)\] lie outside the 160 x 200 image"
    ):
        isbi2015_datalist(copy, ids=[3])
    isbi2015_datalist(copy, ids=[4])  # the others are fine
    image = next((copy / "RawImage").rglob("004.bmp"))
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{re.escape(str(image))}: not a readable image"):
        isbi2015_datalist(copy, ids=[4])
