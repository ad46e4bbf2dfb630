"""AMAT vs SAT epoch wall time and peak memory of a bundle, measured side by side: epochs of the two trainers alternate.

Both trainers come from the bundle's own configs (train.json, and train.json + train_sat.json), on the same data,
with the same attack steps. Each round runs one more epoch of AMAT, then one more of SAT (validation included, as in
a real run); the script prints the median epoch time of each and their ratio. Peak memory: CUDA's max allocated
over the timed epochs; on the CPU the peak RSS growth of a first epoch (data already loaded), in a fresh process
per trainer.

Usage: python benchmarks/bench_bundle_epoch.py [--bundle msd_hippocampus_seg_amat] [--rounds 6] [--overlay volumetric]
[--KEY VALUE ...] (``--overlay``: a bundle config merged last into both, e.g. the MSD bundles' 3D ``volumetric``; any
other --KEY VALUE is a config override, e.g. --train_attack_steps 20 --data_source real --dataset_dir DIR).
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from memory import child_env, peak_rss_growth_mb
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[1]


def trainer(bundle, names, overrides):
    parser = ConfigParser()
    parser.read_config([str(ROOT / "bundles" / bundle / "configs" / f"{n}.json") for n in names])
    parser.update(overrides)
    for i in range(len(parser["initialize"])):
        parser.get_parsed_content(f"initialize#{i}")
    return parser.get_parsed_content("train#trainer")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", default="msd_hippocampus_seg_amat")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--overlay", action="append", default=[])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    overrides = {}
    for key, value in zip(rest[::2], rest[1::2]):
        try:
            overrides[key.lstrip("-")] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key.lstrip("-")] = value
    tmp = Path(tempfile.mkdtemp())
    common = {"epochs": args.rounds + 1, "thresholds_file": str(tmp / "none.json"), **overrides}
    configs = {"AMAT": ["train", *args.overlay], "SAT": ["train", "train_sat", *args.overlay]}
    if args.child:
        t = trainer(args.bundle, configs[args.child], {**common, "output_dir": str(tmp / "child")})
        t.state.max_epochs = 1
        print(peak_rss_growth_mb(t.run))
        return
    trainers = {
        name: trainer(args.bundle, names, {**common, "output_dir": str(tmp / name)}) for name, names in configs.items()
    }
    cuda = torch.cuda.is_available() and trainers["AMAT"].state.device.type == "cuda"
    peak = {}
    times = {k: [] for k in trainers}
    for r in range(args.rounds + 1):
        for name, t in trainers.items():
            t.state.max_epochs = r + 1
            if cuda and r == 1:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            t.run()
            if r > 0:  # the first epoch warms up
                times[name].append(time.perf_counter() - start)
            if cuda and r == 1:
                peak[name] = torch.cuda.max_memory_allocated() / 2**20
    for name in trainers if not cuda else ():
        cmd = [sys.executable, __file__, "--child", name, *sys.argv[1:]]
        peak[name] = float(subprocess.check_output(cmd, text=True, env=child_env()).strip().splitlines()[-1])
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "bundle": args.bundle,
        "overlays": args.overlay,
        "overrides": overrides,
        "device": str(trainers["AMAT"].state.device),
        "epoch_s": med,
        "epochs_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "amat/sat": med["AMAT"] / med["SAT"],
        "peak_mb": peak,
        "amat/sat_peak": peak["AMAT"] / peak["SAT"] if peak["SAT"] > 0 else None,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
