"""The comparison runner: the paper's protocol on a bundle, tables and plot, skipping, resuming, argument errors."""

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from monai_amat.apps.compare import claims_verdict, load_model_result, main, write_comparison
from monai_amat.attacks import PerVoxelEpsScale

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "msd_hippocampus_seg_amat"
PNG = b"\x89PNG\r\n\x1a\n"


def tiny_args(tmp_path, out, *extra):
    """The done-when command shrunk: tiny embedded set (in tmp_path), 16 x 16 input, narrow network, 1 epoch.

    An option of ``extra`` that the shrunk command has replaces its value there (the runner refuses repeats).
    """
    base = _tiny_base(tmp_path, out)
    extra = list(extra)
    for i, token in enumerate(extra[:-1]):
        if token in base[::2]:
            base[base.index(token) + 1] = extra[i + 1]
            extra[i : i + 2] = [None, None]
    return base + [t for t in extra if t is not None]


def _tiny_base(tmp_path, out):
    return [
        "--bundle",
        str(BUNDLE),
        "--output_dir",
        str(out),
        "--epochs",
        "1",
        "--attack_steps",
        "2",
        "--sat_eps",
        "[1, 4]",
        "--embedded_dir",
        str(tmp_path / "data"),
        "--embedded_cases",
        "6",
        "--spatial_size",
        "[16, 16]",
        "--filters",
        "[8, 16, 32]",
    ]


def run_files(out):
    """``{path: mtime}`` of every file the stages wrote (the comparison files themselves are rewritten each time)."""
    return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and not p.name.startswith("comparison.")}


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core CPU, tiny networks run several times faster than with two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow  # starts processes
def test_compare_runs_skips_resumes_and_reevaluates(tmp_path, capsys, one_thread):
    out = tmp_path / "cmp"
    args = tiny_args(tmp_path, out, "--in_process")
    assert main(args) == 0
    eps = json.loads((BUNDLE / "configs" / "evaluate.json").read_text())["eps_list"]

    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["bundle"] == "msd_hippocampus_seg_amat" and comparison["eps"] == eps
    assert comparison["seeds"] == [0] and comparison["verdict"]["metric"] == "dice_mean"
    assert [m["name"] for m in comparison["models"]] == ["STD", "AMAT", "SAT-1", "SAT-4"]
    for m in comparison["models"]:
        assert set(m["metrics"]) == {"dice_mean", "dice_total"} == set(m["auc"])
        assert all(len(v) == len(eps) for v in m["metrics"].values())
        assert m["train_seconds"] > 0
        assert m["seeds"] == [0] and m["metrics_sd"]["dice_mean"] == [0.0] * len(eps) and m["auc_sd"]["dice_mean"] == 0
        assert m["per_seed"][0]["metrics"] == m["metrics"] and m["run_dir"] == m["per_seed"][0]["run_dir"]
    md = (out / "comparison.md").read_text()
    assert "## dice_mean (higher is better)" in md and "| model | clean | eps 2 | eps 6 | eps 10 | AUC |" in md
    assert all(f"| {n} |" in md for n in ("STD", "AMAT", "SAT-1", "SAT-4")) and "## Claims verdict" in md
    assert "Seed: 0." in md and "±" not in md
    assert (out / "comparison.png").read_bytes()[:8] == PNG

    # the overrides reached every run: network width, epochs, attack steps, SAT level, data folder, thresholds
    for run in ("std", "amat", "sat_1", "sat_4"):
        state = torch.load(out / run / "model.pt", weights_only=True)
        assert next(v for k, v in state.items() if k.endswith("conv1.conv.weight")).shape[0] == 8
        ckpt = torch.load(out / run / "checkpoint.pt", weights_only=True)
        assert ckpt["trainer"]["max_epochs"] == 1 and ckpt["trainer"]["iteration"] == ckpt["trainer"]["epoch_length"]
        assert json.loads((out / run / "robustness.json").read_text())["attack"]["steps"] == 2
    assert json.loads((out / "sat_4" / "compare_train_args.json").read_text())["sat_eps"] == 4.0
    assert json.loads((out / "amat" / "compare_train_args.json").read_text())["train_attack_steps"] == 2
    assert json.loads((out / "thresholds.json").read_text())["model"] == str(out / "std" / "model.pt")
    assert (tmp_path / "data" / "Task04_Hippocampus" / "dataset.json").is_file()

    # the same command again: every stage is skipped, nothing in the run folders is rewritten
    before = run_files(out)
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.count("finished earlier, skipped") == 9
    assert run_files(out) == before
    assert json.loads((out / "comparison.json").read_text())["models"] == comparison["models"]

    # a training setting changed: refused before anything runs
    with pytest.raises(SystemExit) as info:
        main(tiny_args(tmp_path, out, "--in_process", "--learning_rate", "0.01"))
    assert info.value.code == 2 and "trained with other settings (learning_rate" in capsys.readouterr().err
    assert run_files(out) == before
    # an AMAT-only setting changed: AMAT is named, not STD (which does not use it)
    with pytest.raises(SystemExit) as info:
        main(tiny_args(tmp_path, out, "--in_process", "--beta", "0.3"))
    assert f"{out / 'amat'} was trained with other settings (beta: None then, 0.3 now)" in capsys.readouterr().err

    # an interrupted AMAT training (record unfinished, checkpoint.pt left): resumed, then re-evaluated
    record = json.loads((out / "amat" / "compare_train.json").read_text())
    (out / "amat" / "compare_train.json").write_text(json.dumps({**record, "finished": False}))
    (out / "amat" / "model.pt").unlink()
    assert main(args) == 0
    assert "AMAT training -> amat/model.pt (resuming from checkpoint.pt)" in capsys.readouterr().out
    assert json.loads((out / "amat" / "compare_train_args.json").read_text())["resume"] is True
    assert json.loads((out / "amat" / "compare_train.json").read_text())["resumed"] is True
    after = run_files(out)
    changed = {p.relative_to(out).as_posix() for p in after if after[p] != before.get(p)}
    assert {"amat/model.pt", "amat/robustness.json"} <= changed and not any(c.startswith("s") for c in changed)

    # an evaluation setting changed: every model re-evaluated, nothing retrained
    assert main([*args, "--eps_list", "[0, 3]"]) == 0
    assert json.loads((out / "comparison.json").read_text())["eps"] == [0, 3]
    assert all(after[p] == p.stat().st_mtime_ns for p in after if p.name == "model.pt")

    # a training killed before its record was written (its model.pt and checkpoint.pt left): trained afresh over
    # its own folder, which the bundle allows only with overwrite
    (out / "sat_1" / "compare_train.json").unlink()
    assert main([*args, "--eps_list", "[0, 3]"]) == 0
    assert "SAT-1 training -> sat_1/model.pt\n" in capsys.readouterr().out
    assert json.loads((out / "sat_1" / "compare_train_args.json").read_text())["overwrite"] is True

    # the default runner: one `python -m monai.bundle run` process per stage, its output shown and logged
    (out / "sat_4" / "robustness.json").unlink()
    cmd = [sys.executable, "-m", "monai_amat.apps.compare", *tiny_args(tmp_path, out, "--eps_list", "[0, 3]")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("finished earlier, skipped") == 8 and "stage 9/9: SAT-4 evaluation done" in proc.stdout
    assert "RobustEvaluator" in (out / "sat_4" / "compare_evaluate.log").read_text()
    assert (out / "sat_4" / "robustness.json").is_file()


def test_compare_with_seeds(tmp_path, capsys, one_thread):
    out = tmp_path / "cmp"
    args = tiny_args(tmp_path, out, "--in_process", "--sat_eps", "[2]", "--seeds", "[0, 1]")
    assert main(args) == 0
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["seeds"] == [0, 1] and [m["name"] for m in comparison["models"]] == ["STD", "AMAT", "SAT-2"]
    assert not (out / "std").exists() and not (out / "thresholds.json").exists()
    for seed in (0, 1):
        calibration = json.loads((out / f"compare_calibrate_s{seed}.json").read_text())
        assert calibration["finished"] and calibration["settings"]["seed"] == seed
        assert json.loads((out / f"thresholds_s{seed}.json").read_text())["model"] == str(
            out / f"std_s{seed}" / "model.pt"
        )
        amat_args = json.loads((out / f"amat_s{seed}" / "compare_train_args.json").read_text())
        assert amat_args["seed"] == seed and amat_args["thresholds_file"] == str(out / f"thresholds_s{seed}.json")
        assert "data_seed" not in amat_args
        assert json.loads((out / f"sat_2_s{seed}" / "compare_train.json").read_text())["settings"]["seed"] == seed
    for m, folder in zip(comparison["models"], ("std", "amat", "sat_2")):
        runs = [json.loads((out / f"{folder}_s{seed}" / "robustness.json").read_text()) for seed in (0, 1)]
        assert [r["seed"] for r in m["per_seed"]] == m["seeds"] == [0, 1] and "run_dir" not in m
        assert [r["metrics"] for r in m["per_seed"]] == [r["metrics"] for r in runs]
        for metric, mean in m["metrics"].items():
            pairs = list(zip(*(r["metrics"][metric] for r in runs)))
            assert mean == pytest.approx([statistics.mean(p) for p in pairs])
            assert m["metrics_sd"][metric] == pytest.approx([statistics.stdev(p) for p in pairs])
        assert m["auc"]["dice_mean"] == pytest.approx(statistics.mean(r["auc"]["dice_mean"] for r in runs))
        assert m["auc_sd"]["dice_mean"] == pytest.approx(statistics.stdev(r["auc"]["dice_mean"] for r in runs))
        times = [r["train_seconds"] for r in m["per_seed"]]
        assert m["train_seconds"] == pytest.approx(statistics.mean(times)) and m["train_seconds_sd"] > 0
    assert comparison["models"][0]["per_seed"][0]["metrics"] != comparison["models"][0]["per_seed"][1]["metrics"]
    md = (out / "comparison.md").read_text()
    assert "Seeds: 0, 1; every cell is the mean ± the sample sd over the seeds." in md
    assert "| AMAT | " in md and md.split("| AMAT | ")[1].split("\n")[0].count(" ± ") == 6  # 4 eps, AUC, time
    assert "means over seeds 0, 1 with their sample sds" in md and "difference " in md
    assert (out / "comparison.png").read_bytes()[:8] == PNG

    # the evaluation is the per-sample worst case of the bundle's attacks, with checks and breaking eps
    assert "evaluation: the per-sample worst case of pgd, apgd, segpgd (L2, 2 steps each)" in md
    assert "## Attacks, gradient-masking checks and breaking eps (dice_mean)" in md
    record = json.loads((out / "amat_s0" / "compare_evaluate.json").read_text())
    assert record["settings"]["eval_attacks"] == ["pgd", "apgd", "segpgd"] and record["settings"]["breaking_eps"]
    for m, folder in zip(comparison["models"], ("std", "amat", "sat_2")):
        runs = [json.loads((out / f"{folder}_s{seed}" / "robustness.json").read_text()) for seed in (0, 1)]
        assert set(m["per_attack_auc"]) == {"pgd", "apgd", "segpgd"}
        assert all(m["auc"]["dice_mean"] <= m["per_attack_auc"][a]["dice_mean"] + 0.02 for a in m["per_attack_auc"])
        fired = {c: sum(c in [x["check"] for x in r["checks"] if x["fired"]] for r in runs) for c in m["checks_fired"]}
        assert m["checks_fired"] == fired
        medians = [r["breaking_eps"]["median"] for r in runs]
        assert m["breaking_eps"]["median"] == (None if None in medians else pytest.approx(statistics.mean(medians)))

    # the same command again: all 7 stages of both seeds are skipped, the per-seed calibrations included
    before = run_files(out)
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.count("finished earlier, skipped") == 2 * 7 and run_files(out) == before


def scored(name, clean, auc, clean_sd=0.0, auc_sd=0.0, seconds=10.0, metric="dice_mean"):
    """A hand-made comparison entry: clean value and AUC of one metric, with their sds over seeds."""
    return {
        "name": name,
        "metrics": {metric: [clean, clean / 2]},
        "auc": {metric: auc},
        "metrics_sd": {metric: [clean_sd, 0.0]},
        "auc_sd": {metric: auc_sd},
        "train_seconds": seconds,
    }


def test_claims_verdict_uses_combined_sd_and_direction():
    amat = scored("AMAT", 0.80, 1.00, 0.01, 0.02, seconds=30.0)
    # SAT-4 beats AMAT on both by more than the combined sd (0.014 clean, 0.028 AUC); SAT-1 only within it
    models = [scored("STD", 0.95, 0.5), amat, scored("SAT-1", 0.81, 1.02, 0.01, 0.02), scored("SAT-4", 0.9, 1.2)]
    verdict = claims_verdict(models)
    assert verdict["metric"] == "dice_mean" and verdict["lower_is_better"] is False
    assert verdict["a"]["holds"] is False and verdict["a"]["sats_beating_amat"] == ["SAT-4"]
    b = verdict["b"]  # the SAT with the clean value nearest AMAT's is SAT-1: AUCs within the combined sd
    assert (b["sat"], b["quantity"], b["outcome"]) == ("SAT-1", "auc", "within sd")
    assert b["difference"] == pytest.approx(-0.02) and b["combined_sd"] == pytest.approx(0.02 * 2**0.5)
    assert verdict["c"]["sat"] == "SAT-1" and verdict["c"]["outcome"] == "within sd"
    assert verdict["d"] == {
        "amat_seconds": 30.0,
        "sat_seconds_mean": 10.0,
        "ratio": 3.0,
        "per_sat": {"SAT-1": 3.0, "SAT-4": 3.0},
        "sat_seconds_total": 20.0,
        "ratio_to_all_sats": 1.5,  # one AMAT training against the two SAT trainings of the eps search
    }
    e = verdict["e"]  # AMAT's clean 0.80 lies below every other model's: the frontier's end point SAT-1
    assert e["between"] == ["SAT-1"] and e["inside"] is False and e["frontier_auc"] == pytest.approx(1.02)
    assert e["gain"] == pytest.approx(-0.02) and e["gain_in_sd"] == pytest.approx(-0.02 / (0.02 * 2**0.5))
    json.dumps(verdict)  # plain values only
    # between SAT-1 (0.81, 1.02 ± 0.02) and SAT-4 (0.9, 1.2 ± 0): at clean 0.85 the frontier is 4/9 of the way
    e = claims_verdict([*models[:1], scored("AMAT", 0.85, 1.3, 0.0, 0.02), *models[2:]])["e"]
    w = 0.04 / 0.09
    assert e["between"] == ["SAT-1", "SAT-4"] and e["inside"] is True
    assert e["frontier_auc"] == pytest.approx(1.02 + w * 0.18) and e["frontier_auc_sd"] == pytest.approx(0.02 * (1 - w))
    assert e["gain_in_sd"] == pytest.approx((1.3 - 1.02 - w * 0.18) / math.hypot(0.02, 0.02 * (1 - w)))

    # within the combined sd on both: the claim holds; the same gap with sd 0 is a clear win for SAT
    assert claims_verdict([amat, scored("SAT-1", 0.81, 1.02, 0.01, 0.02)])["a"]["holds"] is True
    assert claims_verdict([amat, scored("SAT-1", 0.805, 1.01)])["a"]["holds"] is True  # AMAT's sd counts too
    assert claims_verdict([scored("AMAT", 0.8, 1.0), scored("SAT-1", 0.805, 1.01)])["a"]["holds"] is False

    # lower is better for errors: a SAT with lower clean error and lower AUC beats AMAT; higher values do not
    mre = [scored("AMAT", 2.0, 5.0, 0.1, 0.1, metric="mre_mm"), scored("SAT-3", 1.5, 4.0, 0.1, 0.1, metric="mre_mm")]
    verdict = claims_verdict(mre)
    assert verdict["lower_is_better"] is True and verdict["a"]["sats_beating_amat"] == ["SAT-3"]
    assert verdict["e"]["gain"] == pytest.approx(-1.0)  # an AUC of errors 1.0 higher than the frontier's: below it
    assert verdict["b"]["outcome"] == "worse" and verdict["c"]["outcome"] == "worse"
    mre[1] = scored("SAT-3", 2.5, 6.0, 0.1, 0.1, metric="mre_mm")
    verdict = claims_verdict(mre)
    assert verdict["a"]["holds"] is True and verdict["b"]["outcome"] == verdict["c"]["outcome"] == "better"

    assert claims_verdict([amat, scored("STD", 0.9, 1.0)]) is None  # no SAT model


def robustness(eps, metrics, steps=100, **extra):
    return {
        "task": "landmarks",
        "attack": {"name": "PGD", "norm": "l2", "steps": steps, "alpha": 5.0, "random_start": False},
        "eps": eps,
        "metrics": metrics,
        **extra,
    }


def test_tables_and_plot_from_robustness_files(tmp_path):
    eps = [0, 1, 2]
    models = {  # sdr: higher is better; mre_mm: lower is better
        "std": ("STD", {"sdr_2mm": [0.9, 0.1, 0.0], "mre_mm": [1.0, 5.0, 9.0]}, 10.0),
        "amat": ("AMAT", {"sdr_2mm": [0.8, 0.6, 0.4], "mre_mm": [1.2, 2.0, 3.0]}, 40.0),
        "sat_1": ("SAT-1", {"sdr_2mm": [0.85, 0.5, 0.2], "mre_mm": [1.1, 2.5, 4.0]}, 36.0),
        "sat_5": ("SAT-5", {"sdr_2mm": [0.5, 0.45, 0.4], "mre_mm": [2.0, 2.0, 2.0]}, 44.0),
    }
    results = []
    for folder, (name, metrics, seconds) in models.items():
        (tmp_path / folder).mkdir()
        scale = {} if folder == "std" else {"eps_scale": 0.25}  # an older file without eps_scale beside newer ones
        (tmp_path / folder / "robustness.json").write_text(json.dumps(robustness(eps, metrics, **scale)))
        record = {"finished": True, "train_seconds": seconds, "settings": {}}
        (tmp_path / folder / "compare_train.json").write_text(json.dumps(record))
        results.append(load_model_result(tmp_path / folder, name))
    assert results[1]["auc"] == {"sdr_2mm": pytest.approx(1.2), "mre_mm": pytest.approx(4.1)}  # computed: no "auc"

    comparison = write_comparison(tmp_path, "toy_bundle", eps, results, settings={"epochs": 3, "overrides": {}})
    assert json.loads((tmp_path / "comparison.json").read_text()) == comparison
    assert [m["train_seconds"] for m in comparison["models"]] == [10.0, 40.0, 36.0, 44.0]
    assert comparison["eps_scale"] == 0.25 and comparison["seeds"] == []
    md = (tmp_path / "comparison.md").read_text()
    assert "evaluation attack: PGD L2, 100 steps, alpha 5.0; eps 0, 1, 2 (paper units; x0.25 applied)." in md
    assert "Settings: epochs 3." in md and "±" not in md
    assert "## sdr_2mm (higher is better)" in md and "## mre_mm (lower is better)" in md
    assert "| model | clean | eps 1 | eps 2 | AUC | training time (s) |" in md
    assert "| AMAT | 0.800 | 0.600 | 0.400 | 1.200 | 40 |" in md
    # the verdict is on the first metric, sdr_2mm: AUCs AMAT 1.2, SAT-1 1.025, SAT-5 0.9; clean 0.8, 0.85, 0.5
    assert comparison["verdict"]["metric"] == "sdr_2mm" and comparison["verdict"]["a"]["holds"] is True
    assert "## Claims verdict" in md and "Main metric sdr_2mm (higher is better; its AUC too), one seed;" in md
    assert "- (a) No SAT beats AMAT on both clean sdr_2mm and AUC by more than their combined sd: holds." in md
    nearest = "the SAT with the clean sdr_2mm nearest AMAT's"
    assert f"- (b) AUC: AMAT 1.200 vs SAT-1 1.025, {nearest}: difference +0.175: AMAT better." in md
    nearest = "the SAT with the AUC nearest AMAT's"
    assert f"- (c) Clean sdr_2mm: AMAT 0.800 vs SAT-1 0.850, {nearest}: difference -0.050: AMAT worse." in md
    ratios = "AMAT / SAT = 1.00 (SAT-1 1.11, SAT-5 0.91); one AMAT training against the 2 SAT trainings that find"
    assert f"- (d) Training time: AMAT 40 s, SAT 40 s on average over 2 models: {ratios} the best eps: 0.50." in md
    assert "- (e) Frontier of STD and the SAT levels at AMAT's clean sdr_2mm (linear between SAT-5 and SAT-1)" in md
    assert (tmp_path / "comparison.png").read_bytes()[:8] == PNG

    with pytest.raises(ValueError, match="STD: sdr_2mm has 3 values for 2 eps"):
        write_comparison(tmp_path, "toy_bundle", [0, 1], results)
    with pytest.raises(ValueError, match="different eps_scale values"):
        write_comparison(tmp_path, "toy_bundle", eps, [*results, {**results[1], "name": "X", "eps_scale": 0.5}])

    rule = str(PerVoxelEpsScale([4, 4]))  # the 3D evaluations' per-volume factor is recorded as its rule
    per_volume = [{**r, "eps_scale": rule} for r in results]
    comparison = write_comparison(tmp_path, "toy_bundle", eps, per_volume)
    assert comparison["eps_scale"] == rule
    assert f"eps 0, 1, 2 (paper units; budget x {rule})." in (tmp_path / "comparison.md").read_text()
    with pytest.raises(ValueError, match="different eps_scale values"):
        write_comparison(tmp_path, "toy_bundle", eps, [*per_volume, {**results[1], "name": "X"}])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--bundle", "bundles/nowhere"], "argument --bundle: bundles/nowhere: no such bundle folder"),
        (["--spatial_size"], "argument --spatial_size: expected one value"),
        (["--spatial_size", "--epochs", "1"], "argument --spatial_size: expected one value"),
        (["--sat_eps", "[1, -2]"], "argument --sat_eps: expected a number or a list of numbers >= 0"),
        (["--sat_eps", "five"], "argument --sat_eps: expected a number or a list"),
        (["--sat_eps", "[1, 1.0]"], "argument --sat_eps: repeated level"),
        (["--epoch", "1"], "argument --epoch: not a config key of bundle msd_hippocampus_seg_amat"),
        (["--resume", "True"], "argument --resume: the comparison runner sets it itself"),
        (["--eps_list", "[0, 5, 2]"], "'eps_list'"),
        (["--seeds", "[0, -1]"], "argument --seeds: expected a list of distinct integers >= 0"),
        (["--seeds", "[0, 0]"], "argument --seeds: expected a list of distinct integers >= 0"),
        (["--seeds", "[1.5]"], "argument --seeds: expected a list of distinct integers >= 0"),
        (["--seeds", "3"], "argument --seeds: expected a list of distinct integers >= 0"),
        (["--seeds", "[0, 1]", "--seed", "2"], "argument --seeds: give the seeds with --seeds only"),
        # AMAT-only and SAT-only settings are checked before the STD stage runs
        (["--beta", "1.5"], "config key 'beta' = 1.5 is invalid"),
        (["--delta", "0"], "config key 'delta' = 0 is invalid"),
        (["--train_alpha", "abc"], "config key 'train_alpha' = 'abc' is invalid"),
        (["--skip_non_finite", "maybe"], "config key 'skip_non_finite' = 'maybe' is invalid"),
        (["--output_dir", "elsewhere"], "argument --output_dir: given twice"),
        (["--epochs", "1", "--epochs=2"], "argument --epochs: given twice"),
    ],
)
def test_argument_errors_name_the_argument(tmp_path, capsys, extra, message):
    args = ["--bundle", str(BUNDLE), "--output_dir", str(tmp_path / "cmp"), "--in_process"]
    if extra[0] == "--bundle":
        args = args[2:]
    with pytest.raises(SystemExit) as info:
        main([*args, *extra])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "usage: python -m monai_amat.apps.compare" in err
    assert not (tmp_path / "cmp").exists()


@pytest.mark.slow  # starts processes
def test_help():
    proc = subprocess.run(
        [sys.executable, "-m", "monai_amat.apps.compare", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.startswith("usage: python -m monai_amat.apps.compare --bundle BUNDLE --output_dir DIR")
    assert "[--KEY VALUE ...]" in proc.stdout and "--attack_steps K" in proc.stdout


def _processes_with(text):
    """The PIDs whose command line contains ``text``."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow  # starts processes
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_runner_stops_its_stage_and_the_retry_keeps_the_log(tmp_path):
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "monai_amat.apps.compare", *tiny_args(tmp_path, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runner = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    args_file = str(out / "std" / "compare_train_args.json")
    deadline = time.time() + 120
    while not (children := _processes_with(args_file)) and time.time() < deadline and runner.poll() is None:
        time.sleep(0.2)
    assert children, "the STD stage never started"
    runner.kill()
    runner.wait(timeout=30)
    deadline = time.time() + 30
    while _processes_with(args_file) and time.time() < deadline:
        time.sleep(0.2)
    assert not _processes_with(args_file)  # the stage's `monai.bundle run` died with the runner

    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "std" / "compare_train.log").read_text()
    headers = [line for line in log.splitlines() if line.startswith("--- ") and "monai.bundle run --args_file" in line]
    assert len(headers) == 2  # both attempts kept
