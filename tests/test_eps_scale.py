"""eps_scale: every eps-like key of every bundle is written in the paper's units and scaled where it is used."""

import math

import pytest
from monai.bundle import ConfigParser

from monai_amat.apps.bundle import default_eps_scale
from monai_amat.apps.settings import check_config
from monai_amat.attacks import PerVoxelEpsScale
from tests.helpers import SEG_BUNDLES, configs, detection_tiny, landmark_tiny, tiny

TINY = {
    **{b: tiny for b in SEG_BUNDLES},
    "isbi2015_ceph_landmark_amat": landmark_tiny,
    "bccd_cell_detection_amat": detection_tiny,
}


def _parser(bundle, names, overrides):
    parser = ConfigParser()
    parser.read_config(configs(bundle, *names))
    for key, value in overrides.items():
        parser[key] = value
    return parser


def test_default_eps_scale_and_its_check(caplog):
    assert default_eps_scale(True, [32, 32], [64, 64]) == 0.5
    assert default_eps_scale(False, [32, 32], [64, 64]) == 1.0
    # the per-value noise counts channels too: the paper's RGB input of a grey X-ray against our one channel
    assert default_eps_scale(False, [32, 32], [64, 64], 1, 3) == pytest.approx(math.sqrt(1 / 3))
    assert default_eps_scale(True, [32, 32], [64, 64], 1, 3) == pytest.approx(0.5 / math.sqrt(3))
    with pytest.raises(ValueError, match="paper_channels"):
        default_eps_scale(True, [32, 32], [64, 64], 1, 0)
    with caplog.at_level("INFO"):
        assert check_config({"eps_scale": 0.25})
    assert "eps_scale = 0.25" in caplog.text
    for bad in (0.0, -1.0, math.inf, "1"):
        with pytest.raises(ValueError, match="'eps_scale'"):
            check_config({"eps_scale": bad})
    caplog.clear()
    with caplog.at_level("INFO"):  # the 3D evaluation's per-volume rule is logged as the rule
        assert check_config({"eps_scale": PerVoxelEpsScale([64, 64])})
    assert "eps_scale = sqrt(voxels per channel / 4096) per input" in caplog.text


@pytest.mark.parametrize("bundle", list(TINY))
def test_every_eps_like_key_is_scaled_and_recorded(bundle, tmp_path):
    overrides = TINY[bundle](tmp_path)
    amat = _parser(bundle, ["train"], overrides)
    scale = amat.get_parsed_content("eps_scale")
    paper = amat.get_parsed_content("paper_spatial_size")
    size = amat.get_parsed_content("spatial_size")
    channels = amat.get_parsed_content("network_def#in_channels") if "network_def#in_channels" in amat else 1
    paper_channels = amat.get("paper_in_channels", channels)
    channel_scale = math.sqrt(channels / paper_channels)
    assert channel_scale == (math.sqrt(1 / 3) if bundle == "isbi2015_ceph_landmark_amat" else 1.0)
    assert scale == pytest.approx(math.sqrt(math.prod(size) / math.prod(paper)) * channel_scale) and scale < 1
    delta, max_margin = amat.get_parsed_content("delta"), amat.get_parsed_content("max_margin")
    margins = amat.get_parsed_content("train#margins")
    assert margins.delta == pytest.approx(delta * scale)
    assert margins.table.max_margin == pytest.approx(max_margin * scale)
    assert margins.table.floor == pytest.approx(amat.get_parsed_content("margin_floor") * scale)
    # the authors' rule per task: landmarks never refine, detection floors the estimate at delta
    assert margins.table.refine is (bundle != "isbi2015_ceph_landmark_amat")
    assert margins.table.floor == pytest.approx(margins.delta if bundle == "bccd_cell_detection_amat" else 0.0)

    sat = _parser(bundle, ["train", "train_sat"], overrides)
    trainer = sat.get_parsed_content("train#trainer")
    assert trainer.eps == pytest.approx(sat.get_parsed_content("sat_eps") * scale)
    assert trainer.start_on_sphere is True

    evaluate = _parser(bundle, ["train", "evaluate"], overrides)
    evaluator = evaluate.get_parsed_content("evaluate#evaluator")
    assert evaluator.eps_scale == pytest.approx(scale)
    assert evaluator.eps_list == evaluate.get_parsed_content("eps_list")  # the paper's units
    assert evaluator.attack.random_start is True

    # an explicit override wins, and real data default to 1
    unscaled = _parser(bundle, ["train"], {**overrides, "eps_scale": 1.0})
    assert unscaled.get_parsed_content("train#margins").delta == pytest.approx(delta)
    real = _parser(bundle, ["train"], {**overrides, "data_source": "real"})
    assert real.get_parsed_content("eps_scale") == pytest.approx(channel_scale)
