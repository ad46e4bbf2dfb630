import functools
import hashlib
import json
import os
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import nibabel as nib
import numpy as np
import pytest
from monai.apps import DecathlonDataset
from monai.apps.utils import HashCheckError

from monai_amat.data import (
    MSD_TASKS,
    check_case,
    make_embedded_msd,
    prepare_msd,
    read_msd,
    split_cases,
)

TASKS = {
    "Task02_Heart": ({"0": "MRI"}, {"0": "background", "1": "left atrium"}, "la"),
    "Task04_Hippocampus": ({"0": "MRI"}, {"0": "background", "1": "Anterior", "2": "Posterior"}, "hippocampus"),
    "Task05_Prostate": ({"0": "T2", "1": "ADC"}, {"0": "background", "1": "PZ", "2": "TZ"}, "prostate"),
}
SHAPE = (24, 24, 10)


def _arrays(ds):
    return [(nib.load(c["image"]).get_fdata(), np.asarray(nib.load(c["label"]).dataobj)) for c in ds.cases]


def _write_dataset(root, name, training, labels=None):
    root.mkdir(parents=True, exist_ok=True)
    meta = {"name": name, "modality": {"0": "CT"}, "labels": labels or {"0": "background", "1": "x"}}
    meta["training"] = training
    (root / "dataset.json").write_text(json.dumps(meta))


def _save(array, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)


def test_tasks_come_from_monai():
    assert set(MSD_TASKS) == set(TASKS)
    for task, entry in MSD_TASKS.items():
        assert entry == {"url": DecathlonDataset.resource[task], "md5": DecathlonDataset.md5[task]}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_embedded_msd_layout_and_content(tmp_path, task):
    modalities, labels, prefix = TASKS[task]
    task_dir = make_embedded_msd(tmp_path, task, num_cases=3, seed=1, shape=SHAPE)
    assert task_dir == tmp_path / task
    assert sorted(os.listdir(tmp_path)) == [task]  # no temporary folder left behind
    meta = json.loads((task_dir / "dataset.json").read_text())
    assert {"name", "description", "modality", "labels", "numTraining", "numTest", "training", "test"} <= set(meta)
    assert meta["numTraining"] == 3 and meta["test"] == []
    assert meta["training"][0] == {
        "image": f"./imagesTr/{prefix}_000.nii.gz",
        "label": f"./labelsTr/{prefix}_000.nii.gz",
    }
    ds = read_msd(task_dir)
    assert ds.root == task_dir and ds.modalities == modalities and ds.labels == labels
    assert [c["case"] for c in ds.cases] == [f"{prefix}_{i:03d}" for i in range(3)]
    for case, (image, label) in zip(ds.cases, _arrays(ds)):
        assert os.path.isfile(case["image"]) and os.path.isfile(case["label"])
        assert check_case(case) == SHAPE
        img = nib.load(case["image"])
        assert img.get_data_dtype() == np.float32 and nib.load(case["label"]).get_data_dtype() == np.uint8
        np.testing.assert_allclose(img.header.get_zooms()[:3], (1.25, 1.25, 2.5))
        assert image.shape == (SHAPE + (2,) if task == "Task05_Prostate" else SHAPE)
        assert set(np.unique(label).tolist()) == {int(k) for k in labels}
        per_slice = (label > 0).any(axis=(0, 1))
        assert per_slice.any() and not per_slice.all()


def test_embedded_msd_deterministic_and_idempotent(tmp_path):
    a = read_msd(make_embedded_msd(tmp_path / "a", "Task05_Prostate", num_cases=2, shape=SHAPE))
    b = read_msd(make_embedded_msd(tmp_path / "b", "Task05_Prostate", num_cases=2, shape=SHAPE))
    for (ia, la), (ib, lb) in zip(_arrays(a), _arrays(b)):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(la, lb)
    c = read_msd(make_embedded_msd(tmp_path / "c", "Task05_Prostate", num_cases=2, seed=1, shape=SHAPE))
    assert not np.array_equal(_arrays(a)[0][0], _arrays(c)[0][0])

    json_path = a.root / "dataset.json"
    stamp = json_path.stat().st_mtime_ns
    os.utime(json_path, ns=(stamp - 10**9, stamp - 10**9))
    assert make_embedded_msd(tmp_path / "a", "Task05_Prostate", num_cases=2, shape=SHAPE) == a.root
    assert json_path.stat().st_mtime_ns == stamp - 10**9  # not rewritten

    make_embedded_msd(tmp_path / "a", "Task05_Prostate", num_cases=3, shape=SHAPE)  # another size replaces it
    assert len(read_msd(a.root).cases) == 3
    assert sorted(os.listdir(tmp_path / "a")) == ["Task05_Prostate"]
    (a.root / "embedded.json").unlink()  # without its marker the folder is not known to be synthetic: kept
    with pytest.raises(FileExistsError, match="Task05_Prostate"):
        make_embedded_msd(tmp_path / "a", "Task05_Prostate", num_cases=2, shape=SHAPE)
    assert len(read_msd(a.root).cases) == 3


def test_embedded_msd_refuses_unknown_task_and_foreign_folder(tmp_path):
    with pytest.raises(ValueError, match="Task99_Nope"):
        make_embedded_msd(tmp_path, "Task99_Nope")
    _write_dataset(tmp_path / "Task02_Heart", "real", [])
    with pytest.raises(FileExistsError, match="Task02_Heart"):
        make_embedded_msd(tmp_path, "Task02_Heart", num_cases=1, shape=SHAPE)


def test_embedded_heart_is_not_thresholdable(tmp_path):
    ds = read_msd(make_embedded_msd(tmp_path, "Task02_Heart", num_cases=4))
    arrays = _arrays(ds)
    image = np.concatenate([im.ravel() for im, _ in arrays])
    fg = np.concatenate([lab.ravel() > 0 for _, lab in arrays])
    assert image[fg].mean() > image[~fg].mean() + 0.3  # there is contrast to learn from
    best = 0.0
    for t in np.quantile(image, np.linspace(0.0, 1.0, 201)):
        for pred in (image > t, image < t):
            best = max(best, 2 * (pred & fg).sum() / (pred.sum() + fg.sum()))
    assert 0.0 < best < 0.8


def test_read_msd_custom_layout(tmp_path):
    root = tmp_path / "Task99_Custom"
    labels = {"0": "background", "1": "a", "2": "b", "3": "c"}
    _write_dataset(root, "Custom", [{"image": "./scans/s1_img.nii.gz", "label": "./masks/s1_seg.nii.gz"}], labels)
    _save(np.zeros((5, 6, 7), np.float32), root / "scans" / "s1_img.nii.gz")
    _save(np.zeros((5, 6, 7), np.uint8), root / "masks" / "s1_seg.nii.gz")
    ds = read_msd(root)
    assert ds.name == "Custom" and ds.labels == labels and ds.modalities == {"0": "CT"}
    assert ds.cases == [
        {
            "image": str(root / "scans" / "s1_img.nii.gz"),
            "label": str(root / "masks" / "s1_seg.nii.gz"),
            "case": "s1_img",
        }
    ]
    assert check_case(ds.cases[0]) == (5, 6, 7)


def test_read_msd_lists_all_missing_files(tmp_path):
    root = make_embedded_msd(tmp_path, "Task04_Hippocampus", num_cases=3, shape=SHAPE)
    os.remove(root / "imagesTr" / "hippocampus_000.nii.gz")
    os.remove(root / "labelsTr" / "hippocampus_002.nii.gz")
    with pytest.raises(FileNotFoundError) as err:
        read_msd(root)
    assert "imagesTr/hippocampus_000.nii.gz" in str(err.value)
    assert "labelsTr/hippocampus_002.nii.gz" in str(err.value)
    assert "hippocampus_001" not in str(err.value)


def test_read_msd_missing_folder_or_json(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        read_msd(missing, task="Task02_Heart")
    assert str(missing) in str(err.value) and "prepare_msd" in str(err.value)
    assert MSD_TASKS["Task02_Heart"]["url"] in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        read_msd(tmp_path / "empty")
    assert str(tmp_path / "empty" / "dataset.json") in str(err.value) and "prepare_msd" in str(err.value)
    assert "medicaldecathlon.com" in str(err.value)


def test_read_msd_bad_json(tmp_path):
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(ValueError, match="dataset.json"):
        read_msd(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {}, "modality": {}}))
    with pytest.raises(ValueError, match="training"):
        read_msd(tmp_path)


def test_check_case_shape_mismatch_and_corrupt_file(tmp_path):
    image, label, bad = tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz", tmp_path / "bad.nii.gz"
    _save(np.zeros((4, 5, 6, 2), np.float32), image)
    _save(np.zeros((4, 5, 7), np.uint8), label)
    with pytest.raises(ValueError) as err:
        check_case({"image": str(image), "label": str(label)})
    assert str(image) in str(err.value) and str(label) in str(err.value) and "(4, 5, 7)" in str(err.value)
    bad.write_bytes(b"this is not a nifti file at all" * 20)
    with pytest.raises(ValueError, match="bad.nii.gz"):
        check_case({"image": str(image), "label": str(bad)})


def test_split_cases_paper_split():
    cases = [f"case{i}" for i in range(20)]
    train, val, test = split_cases(cases, seed=3)
    assert (len(train), len(val), len(test)) == (16, 1, 3)
    assert sorted(train + val + test) == sorted(cases)
    assert split_cases(cases, seed=3) == (train, val, test)
    assert split_cases(cases, seed=4) != (train, val, test)
    assert [len(s) for s in split_cases(list(range(8)))] == [6, 1, 1]


def test_split_cases_few_cases_warns():
    with pytest.warns(UserWarning, match="3 case"):
        train, val, test = split_cases(["a", "b", "c"])
    assert (len(train), len(val), len(test)) == (1, 1, 1) and sorted(train + val + test) == ["a", "b", "c"]
    with pytest.warns(UserWarning, match="2 case"):
        assert [len(s) for s in split_cases(["a", "b"])] == [1, 0, 1]
    with pytest.warns(UserWarning, match="1 case"):
        assert split_cases(["a"], fold=0) == (["a"], [], [])
    with pytest.raises(ValueError, match="fold"):
        split_cases(["a", "b"], num_folds=5, fold=5)


@pytest.fixture
def loopback_archive(tmp_path):
    make_embedded_msd(tmp_path / "src", "Task04_Hippocampus", num_cases=2, shape=SHAPE)
    served = tmp_path / "served"
    served.mkdir()
    with tarfile.open(served / "Task04_Hippocampus.tar", "w") as tar:
        tar.add(tmp_path / "src" / "Task04_Hippocampus", arcname="Task04_Hippocampus")
    md5 = hashlib.md5((served / "Task04_Hippocampus.tar").read_bytes()).hexdigest()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(served))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/Task04_Hippocampus.tar", md5
    server.shutdown()
    server.server_close()
    thread.join()


def test_prepare_msd_over_loopback(tmp_path, loopback_archive):
    url, md5 = loopback_archive
    out = tmp_path / "out"
    with pytest.raises(HashCheckError, match="hash check"):
        prepare_msd("Task04_Hippocampus", out, url=url, md5="0" * 32)
    assert not list(out.rglob("dataset.json")) and not list(out.rglob("*.tar"))
    task_dir = prepare_msd("Task04_Hippocampus", out, url=url, md5=md5)
    assert task_dir == out / "Task04_Hippocampus"
    ds = read_msd(task_dir)
    assert ds.labels == TASKS["Task04_Hippocampus"][1] and len(ds.cases) == 2
    assert [check_case(c) for c in ds.cases] == [SHAPE, SHAPE]
    assert prepare_msd("Task04_Hippocampus", out, url="http://127.0.0.1:1/unused.tar") == task_dir  # already there
    with pytest.raises(ValueError, match="Task04_Hippocampus"):
        prepare_msd("Task99_Nope", out)


def test_msd_volumes_are_the_slices_stacked_with_one_index_per_case(tmp_path):
    from monai_amat.data.segmentation import msd_slices, msd_volumes

    args = ("embedded", "Task04_Hippocampus", [16, 16])
    kwargs = {"embedded_dir": tmp_path, "embedded_cases": 6}
    volumes, slices = msd_volumes(*args, **kwargs), msd_slices(*args, **kwargs)
    assert [v["index"] for v in volumes["train"]] == list(range(len(volumes["train"])))
    for split in ("train", "val", "test"):
        assert sorted({s["case"] for s in slices[split]}) == sorted(v["case"] for v in volumes[split])
    first = volumes["train"][0]
    depth = first["image"].shape[-1]
    assert first["image"].shape == (1, 16, 16, depth) and first["label"].shape == (1, 16, 16, depth)
    own = [s for s in slices["train"] if s["case"] == first["case"]]
    assert len(own) == depth
    np.testing.assert_array_equal(np.stack([s["image"] for s in own], -1), first["image"])
    np.testing.assert_array_equal(np.stack([s["label"] for s in own], -1), first["label"])
    assert volumes["out_channels"] == slices["out_channels"] == 3
