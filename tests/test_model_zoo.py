"""MONAI's own bundle tooling on every bundle: the workflow property checks, verify_net_in_out, the metadata fields."""

import json

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow, verify_net_in_out
from monai.transforms import Compose, Invertd

from tests.helpers import DETECTION_SPATIAL, ROOT, SEG_BUNDLES, configs, tiny

BUNDLES = [*SEG_BUNDLES, "isbi2015_ceph_landmark_amat", "bccd_cell_detection_amat"]
# the embedded data set's folder name under embedded_dir, per bundle
DATA_SET = dict(zip(BUNDLES, ("Task02_Heart", "Task04_Hippocampus", "Task05_Prostate", "ISBI2015", "BCCD")))


def _overrides(bundle, tmp_path):
    extra = {"spatial_size": DETECTION_SPATIAL} if bundle.startswith("bccd") else {}
    return tiny(tmp_path, output_dir=str(tmp_path / "run"), **extra)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_train_and_inference_workflows_pass_monai_property_checks(bundle, tmp_path):
    """``check_properties()`` lists the required properties a workflow lacks and the optional ones at a wrong ID."""
    for extra in ((), ("train_std",), ("train_sat",)):
        workflow = ConfigWorkflow(
            config_file=configs(bundle, "train", *extra),
            meta_file=configs(bundle, "metadata")[0],
            workflow_type="train",
            **_overrides(bundle, tmp_path),
        )
        workflow.initialize()
        assert workflow.check_properties() == [], (bundle, extra)
    overrides = _overrides(bundle, tmp_path)
    parser = ConfigParser()
    parser.read_config(configs(bundle, "inference"))
    parser.update({k: v for k, v in overrides.items() if k == "spatial_size"})
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "model.pt")
    workflow = ConfigWorkflow(
        config_file=configs(bundle, "inference"),
        meta_file=configs(bundle, "metadata")[0],
        workflow_type="inference",
        ckpt_path=str(tmp_path / "model.pt"),
        dataset_dir=str(tmp_path / "data" / DATA_SET[bundle]),  # the set the training workflows generated
        **{k: v for k, v in overrides.items() if k == "spatial_size"},
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    data_set = str(tmp_path / "data" / DATA_SET[bundle])
    assert workflow.dataset_dir == data_set  # MONAI's property: the data set folder, whose images it infers on
    assert workflow.parser.get_parsed_content("input_dir").startswith(data_set + "/")
    assert len(workflow.dataset) > 0
    # MONAI's Invertd maps a prediction on the network grid back to the input image's grid through the
    # preprocessing's applied operations
    item = workflow.dataset[0]
    item["pred"] = item["image"].clone()
    preprocessing = workflow.parser.get_parsed_content("preprocessing")
    inverted = Invertd("pred", transform=preprocessing, orig_keys="image")(item)
    loaded = Compose(preprocessing.transforms[:2])({"image": item["image"].meta["filename_or_obj"]})["image"]
    assert inverted["pred"].shape[1:] == loaded.shape[1:]  # loading and channel-first: nothing to invert
    assert item["image"].shape[1:] != inverted["pred"].shape[1:]  # the network grid is another one


@pytest.mark.parametrize("bundle", [b for b in BUNDLES if not b.startswith("bccd")])
def test_verify_net_in_out(bundle):
    """The network maps the metadata's input shape to its output shape (not for detection, as in the model zoo)."""
    verify_net_in_out(
        net_id="network_def", meta_file=configs(bundle, "metadata")[0], config_file=configs(bundle, "inference")
    )


# the fields MONAI's metadata schema requires (meta_schema_20240725, which the bundles name; verify_metadata downloads
# the schema, which this machine cannot)
REQUIRED = ("schema", "version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version")
REQUIRED += ("task", "description", "authors", "copyright", "network_data_format")


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_has_the_schema_fields(bundle):
    meta = json.loads((ROOT / "bundles" / bundle / "configs" / "metadata.json").read_text())
    assert meta["schema"].endswith("/meta_schema_20240725.json")
    assert not [k for k in REQUIRED if k not in meta]
    for kind in ("inputs", "outputs"):
        for name, fmt in meta["network_data_format"][kind].items():
            assert {"type", "format", "num_channels", "spatial_shape", "dtype", "channel_def"} <= set(fmt), name
    assert meta["version"] in meta["changelog"]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_model_zoo_layout(bundle):
    import yaml

    folder = ROOT / "bundles" / bundle
    for name in ("metadata.json", "train.json", "evaluate.json", "inference.json", "multi_gpu_train.json"):
        assert (folder / "configs" / name).is_file(), name
    assert (folder / "configs" / "logging.conf").is_file() and (folder / "LICENSE").is_file()
    assert "Licence:" in (folder / "docs" / "data_license.txt").read_text()
    assert (folder / "docs" / "README.md").is_file()
    assert yaml.safe_load((folder / "large_files.yml").read_text()) == {"large_files": []}  # no released weights
    train, inference = (json.loads((folder / "configs" / f"{n}.json").read_text()) for n in ("train", "inference"))
    # the trained AMAT model goes where inference.json (and ckpt_export, verify_net_in_out) look for it
    assert train["models_dir"] == "$@bundle_root + '/models'" and train["export_model"] is True
    parser = ConfigParser(inference)
    parser["bundle_root"] = "/zoo"
    assert parser.get_parsed_content("ckpt_path") == "/zoo/models/model.pt"


@pytest.mark.slow  # starts a process
def test_ckpt_export_with_the_bundle_defaults(tmp_path):
    """``monai.bundle ckpt_export`` finds ``models/model.pt`` (where train.json exports) under ``bundle_root``."""
    import subprocess
    import sys

    bundle = "msd_hippocampus_seg_amat"
    parser = ConfigParser()
    parser.read_config(configs(bundle, "inference"))
    (tmp_path / "models").mkdir()
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "models" / "model.pt")
    cmd = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--bundle_root", str(tmp_path)]
    cmd += ["--config_file", configs(bundle, "inference")[0], "--meta_file", configs(bundle, "metadata")[0]]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    net = torch.jit.load(str(tmp_path / "models" / "model.ts"))
    assert net(torch.zeros(1, 1, 32, 32)).shape == (1, 3, 32, 32)
