"""The one table of settings and what is derived from it: the check, checkpoint records, the runner's key sets."""

import pytest

from monai_amat.apps.bundle import for_data_source
from monai_amat.apps.compare.stages import EVAL_ONLY_KEYS, RESERVED
from monai_amat.apps.settings import (
    BOOL_KEYS,
    SETTINGS,
    STAGES,
    check_config,
    checkpoint_settings,
    runner_keys,
    unused_by,
)


def test_check_parses_booleans_and_passes_other_keys():
    parsed = check_config({"amp": "false", "margin_refine": "Yes", "num_workers": 2, "delta": 2.5, "max_margin": 3})
    assert parsed == {"amp": False, "margin_refine": True, "num_workers": 2, "delta": 2.5, "max_margin": 3}
    assert set(BOOL_KEYS) >= {"amp", "resume", "overwrite", "margin_refine", "breaking_eps", "strict_inputs"}
    with pytest.raises(ValueError, match=r"config key 'max_margin' = 2 is invalid: must be >= delta \(2.5\)"):
        check_config({"delta": 2.5, "max_margin": 2})  # a rule reads the keys checked before it
    with pytest.raises(ValueError, match="config key 'spatial_size' .* multiples of 8, e.g. \\[32, 8\\]"):
        check_config({"spatial_multiple": 8, "spatial_size": [36, 12]})


def test_each_training_stage_records_what_it_uses():
    values = check_config(
        {"spatial_size": [32, 32], "filters": [8, 16], "delta": 1.0, "norm": "l2", "sat_eps": 5.0, "epochs": 3}
    )
    assert checkpoint_settings(values, "amat") == {
        "spatial_size": [32, 32],
        "filters": [8, 16],
        "delta": 1.0,
        "norm": "l2",
    }
    assert checkpoint_settings(values, "sat") == {
        "spatial_size": [32, 32],
        "filters": [8, 16],
        "norm": "l2",
        "sat_eps": 5.0,
    }
    assert checkpoint_settings(values, "std") == {"spatial_size": [32, 32], "filters": [8, 16]}
    with pytest.raises(ValueError, match="config key 'stage' = 'train'"):
        checkpoint_settings(values, "train")


def test_the_runner_key_sets_come_from_the_table():
    assert all(set(s.stages) <= set(STAGES) for s in SETTINGS.values())
    assert {"resume", "overwrite", "export_model", "ckpt_path", "thresholds_file", "sat_eps"} <= set(RESERVED)
    assert set(runner_keys()) <= set(RESERVED)
    assert {"eps_list", "attack_steps", "eval_attacks", "breaking_eps"} <= set(EVAL_ONLY_KEYS)
    assert not {"norm", "epochs", "batch_size"} & set(EVAL_ONLY_KEYS)  # they change the training too
    std, sat, amat = unused_by("std"), unused_by("sat"), unused_by("amat")
    assert {"delta", "beta", "default_tau", "train_attack_steps", "norm", "sat_start_on_sphere"} <= set(std)
    assert {"delta", "beta", "margin_refine"} <= set(sat) and "train_attack_steps" not in sat
    assert "sat_start_on_sphere" in amat and not {"delta", "epochs", "norm"} & set(amat)
    assert not {"epochs", "batch_size", "learning_rate", "seed"} & (set(std) | set(sat) | set(amat))


def test_defaults_per_data_source_name_the_key():
    defaults = {"embedded": {"epochs": 16}, "real": {"epochs": 50}}
    assert for_data_source(defaults, "real") == {"epochs": 50}
    with pytest.raises(ValueError, match="config key 'data_source' = 'Real' is invalid: must be 'embedded' or 'real'"):
        for_data_source(defaults, "Real")
