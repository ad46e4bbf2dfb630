"""Nothing silent, nothing lost: boolean text overrides, protected output folders, resume settings, named files."""

import hashlib
import json
import os
import re
import stat

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser, run

from monai_amat.apps.bundle import RUN_FILES, load_model
from monai_amat.apps.settings import BOOL_KEYS, SETTINGS, as_bool, check_config
from monai_amat.data.segmentation import msd_slices
from monai_amat.data.synthetic import make_embedded_msd
from monai_amat.data.utils import move_into_place
from monai_amat.handlers.checkpoint import TrainingCheckpoint
from tests.helpers import ROOT, chain, configs, tiny

BUNDLE = "msd_hippocampus_seg_amat"


@pytest.mark.parametrize(
    "text, value",
    [("true", True), ("False", False), ("FALSE", False), ("yes", True), ("No", False), ("1", True), ("0", False)]
    + [(True, True), (False, False), (1, True), (0, False)],
)
def test_boolean_text_is_parsed(text, value):
    assert as_bool(text, "resume") is value


@pytest.mark.parametrize("text", ["maybe", "", "2", 2, 0.5, None, [True]])
def test_other_boolean_values_are_refused_by_key(text):
    with pytest.raises(ValueError, match="config key 'skip_non_finite'"):
        as_bool(text, "skip_non_finite")
    with pytest.raises(ValueError, match="config key 'masking_checks'"):
        check_config({"masking_checks": text})


def _strings(tree, path=()):
    """(path, text) of every string in a parsed config."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _strings(v, (*path, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _strings(v, (*path, i))
    elif isinstance(tree, str):
        yield path, tree


def test_every_boolean_key_of_every_bundle_is_read_parsed():
    """A consumer reading ``@resume`` directly would take the text "false" for True: they read ``@checked[...]``.

    Only the ``settings`` dicts (the input of ``check_config``) and ``check_output_dir`` (which parses its own) read
    the raw values; every key a config reads from ``checked`` is in the settings of the runs that merge it.
    """
    raw, unknown, missing = [], [], []
    for folder in sorted((ROOT / "bundles").glob("*/configs")):
        texts = {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json") if p.stem != "metadata"}
        for name, config in texts.items():
            for path, text in _strings(config):
                if path[0] in ("settings", "+settings") or "check_output_dir(" in text:
                    continue
                raw += [(folder.parent.name, name, key) for key in BOOL_KEYS if re.search(rf"@{key}(?![\w#])", text)]
            bases = [] if name in ("train", "inference") else ["inference"] if name == "volumetric" else ["train"]
            for base in bases or [None]:
                merged = {**texts.get(base, {}).get("settings", {}), **config.get("settings", {})}
                merged.update(config.get("+settings", {}))
                unknown += [(folder.parent.name, name, k) for k in merged if k not in SETTINGS and k != "dataset_dir"]
                read = set(re.findall(r"@checked\['(\w+)'\]", json.dumps(config)))
                missing += [(folder.parent.name, name, k) for k in sorted(read - set(merged))]
    assert not raw and not unknown and not missing, (raw, unknown, missing)


def _digest(folder, names=None):
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and (names is None or p.name in names)]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_a_finished_run_is_not_overwritten_and_resume_checks_its_settings(tmp_path):
    out = tmp_path / "amat"
    settings = tiny(tmp_path, default_tau=0.15)
    run(config_file=configs(BUNDLE, "train"), output_dir=str(out), **settings)
    before = _digest(out)
    assert {"model.pt", "checkpoint.pt", "margins.csv"} <= set(before)

    # a fresh run (also "--resume false" as text) refuses, naming both ways on, and leaves the old run as it was
    for extra in ({}, {"resume": "false"}, {"resume": "False", "overwrite": "no"}):
        with pytest.raises(Exception) as info:
            run(config_file=configs(BUNDLE, "train"), output_dir=str(out), **settings, **extra)
        assert re.search(rf"{out} holds a training run \(checkpoint.pt.*--resume True.*--overwrite True", chain(info))
        assert _digest(out) == before

    # resuming with another delta or input size is refused with the list of differences
    for extra, named in (
        ({"delta": 4.0}, r"delta: 2\.5 -> 4\.0"),
        ({"spatial_size": [32, 32]}, r"\[16, 16\] -> \[32, 32\]"),
    ):
        with pytest.raises(Exception) as info:
            run(config_file=configs(BUNDLE, "train"), output_dir=str(out), **{**settings, **extra}, resume="yes")
        assert re.search(rf"checkpoint\.pt was written with other training settings \(.*{named}", chain(info))
    # a refused resume leaves the run's files as they were (its TensorBoard writer has logged the attempt)
    assert _digest(out, RUN_FILES) == {name: digest for name, digest in before.items() if name in RUN_FILES}

    # --overwrite true (text) replaces the run: one epoch of new margins, no row of the old run left
    run(config_file=configs(BUNDLE, "train"), output_dir=str(out), **{**settings, "seed": 1}, overwrite="true")
    after = _digest(out)
    assert after["model.pt"] != before["model.pt"] and after["margins.csv"] != before["margins.csv"]
    assert (out / "margins.csv").read_text().count("\n1,") == (out / "margins.csv").read_text().count("\n") - 1


def test_a_corrupted_checkpoint_is_named(tmp_path):
    engine = Engine(lambda e, b: None)
    engine.state.max_epochs = 1
    net = torch.nn.Linear(2, 2)
    saver = TrainingCheckpoint(tmp_path, {"network": net}, settings={"spatial_size": (16, 16)})
    saver.save(engine)
    data = saver.path.read_bytes()
    saver.path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{re.escape(str(saver.path))} cannot be read as a checkpoint"):
        TrainingCheckpoint(tmp_path, {"network": net}, resume=True).load(engine)
    saver.save(engine)  # whole again: another network width is named with the file and the object
    wider = torch.nn.Linear(2, 3)
    with pytest.raises(ValueError, match=rf"{re.escape(str(saver.path))}: its 'network' does not fit this run"):
        TrainingCheckpoint(tmp_path, {"network": wider}, resume=True).load(engine)
    # the same settings given as a tuple or a list are the same (the checkpoint gives lists back)
    TrainingCheckpoint(tmp_path, {"network": net}, resume=True, settings={"spatial_size": [16, 16]}).load(engine)


def _corrupt(path, fn):
    """Rewrite a NIfTI file with ``fn`` applied to its voxels (header and affine kept)."""
    img = nib.load(path)
    data = np.asarray(img.dataobj).astype(np.float32)
    nib.save(nib.Nifti1Image(fn(data), img.affine), path)


@pytest.mark.parametrize(
    "what, fn, message",
    [
        (
            "image",
            lambda d: np.where(np.arange(d.size).reshape(d.shape) < 4, np.nan, d),
            r"4 voxel\(s\) are NaN or inf",
        ),
        ("image", lambda d: np.where(np.arange(d.size).reshape(d.shape) == 7, np.inf, d), r"1 voxel\(s\) are NaN"),
        ("label", lambda d: np.where(d > 0, 7.0, d), r"not a label of dataset.json \(integers 0..2\), e.g. \[7.0\]"),
        ("label", lambda d: np.where(np.arange(d.size).reshape(d.shape) == 0, -1.0, d), r"e.g. \[-1.0\]"),
        ("label", lambda d: np.where(d > 0, 0.5, d), r"not a label of dataset.json .*e.g. \[0.5\]"),
    ],
)
def test_bad_voxels_are_named_before_training(tmp_path, what, fn, message):
    root = make_embedded_msd(tmp_path, "Task04_Hippocampus", num_cases=6, seed=0, shape=(12, 12, 4))
    cases = json.loads((root / "dataset.json").read_text())["training"]
    path = root / cases[-1][what]  # any split: the check runs on every file before training
    _corrupt(path, fn)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: .*{message}"):
        msd_slices("real", "Task04_Hippocampus", [16, 16], dataset_dir=root)


def test_a_truncated_nifti_is_named(tmp_path):
    root = make_embedded_msd(tmp_path, "Task04_Hippocampus", num_cases=6, seed=0, shape=(12, 12, 4))
    path = root / json.loads((root / "dataset.json").read_text())["training"][2]["image"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 7 // 10])  # the header still reads, the voxels end early (EOFError)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} cannot be read \(EOFError"):
        msd_slices("real", "Task04_Hippocampus", [16, 16], dataset_dir=root)


def test_embedded_data_folders_get_the_umask_permissions(tmp_path):
    root = make_embedded_msd(tmp_path, "Task04_Hippocampus", num_cases=2, seed=0, shape=(12, 12, 4))
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(root.stat().st_mode) == 0o777 & ~mask  # not mkdtemp's 0700


@pytest.mark.parametrize(
    "bundle, size",
    [
        ("msd_heart_seg_amat", [18, 18]),
        ("isbi2015_ceph_landmark_amat", [17, 24]),
        ("bccd_cell_detection_amat", [40, 48]),
    ],
)
def test_a_spatial_size_the_strides_cannot_divide_is_refused_by_name(bundle, size, tmp_path):
    with pytest.raises(Exception) as info:
        run(config_file=configs(bundle, "train"), output_dir=str(tmp_path / "out"), **tiny(tmp_path, spatial_size=size))
    assert re.search(
        r"config key 'spatial_size' = \[\d+, \d+\] is invalid: the network's strides need multiples", chain(info)
    )
    assert not (tmp_path / "data").exists()  # refused before the data set is made


def test_inference_names_and_skips_an_unreadable_input(tmp_path, capsys):
    root = make_embedded_msd(tmp_path, "Task04_Hippocampus", num_cases=3, seed=0, shape=(12, 12, 4))
    inputs = sorted((root / "imagesTr").glob("*.nii.gz"))
    data = inputs[1].read_bytes()
    inputs[1].write_bytes(data[: len(data) * 7 // 10])
    parser = ConfigParser()
    parser.read_config(configs(BUNDLE, "inference")[0])
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "model.pt")
    settings = {"input_dir": str(root / "imagesTr"), "ckpt_path": str(tmp_path / "model.pt")}
    out = tmp_path / "predictions"
    run(config_file=configs(BUNDLE, "inference"), prediction_dir=str(out), **settings)
    assert f"ERROR - {inputs[1]}: cannot be read (EOFError" in capsys.readouterr().out  # the bundle's logging.conf
    written = sorted(p.name for p in out.iterdir())
    assert written == [
        inputs[0].name.replace(".nii.gz", "_seg.nii.gz"),
        inputs[2].name.replace(".nii.gz", "_seg.nii.gz"),
    ]
    with pytest.raises(Exception) as info:
        run(
            config_file=configs(BUNDLE, "inference"),
            prediction_dir=str(tmp_path / "p2"),
            strict_inputs="true",
            **settings,
        )
    assert f"{inputs[1]}: cannot be read (EOFError" in chain(info) and "strict_inputs is true" in chain(info)
    assert not (tmp_path / "p2").exists()


def test_a_data_set_another_rank_just_put_in_place_is_kept(tmp_path, monkeypatch):
    """Two ranks generate the embedded set at once: the slower one must not replace the set the other is reading."""
    out, mine, theirs = tmp_path / "set", tmp_path / ".set.mine", tmp_path / ".set.theirs"
    for folder in (mine, theirs):
        folder.mkdir()
        (folder / "marker.txt").write_text(folder.name)
    chmod = os.chmod

    def other_rank_finishes_first(path, mode):  # between the slower rank's checks
        chmod(path, mode)
        if not out.exists():
            os.rename(theirs, out)

    monkeypatch.setattr(os, "chmod", other_rank_finishes_first)
    move_into_place(mine, out, lambda: (out / "marker.txt").is_file())
    assert (out / "marker.txt").read_text() == ".set.theirs"  # left in place, not moved away and deleted


def test_a_truncated_model_file_is_named(tmp_path):
    net = torch.nn.Linear(2, 2)
    torch.save(net.state_dict(), tmp_path / "model.pt")
    data = (tmp_path / "model.pt").read_bytes()
    (tmp_path / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match=rf"{re.escape(str(tmp_path / 'model.pt'))} cannot be read as a model"):
        load_model(net, tmp_path / "model.pt")
