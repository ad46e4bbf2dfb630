"""AMAT vs SAT epoch wall time of a bundle, measured side by side: epochs of the two trainers alternate.

Both trainers come from the bundle's own configs (train.json, and train.json + train_sat.json), on the same data,
with the same attack steps. Each round runs one more epoch of AMAT, then one more of SAT (validation included, as in
a real run); the script prints the median epoch time of each and their ratio.

Usage: python benchmarks/bench_bundle_epoch.py [--bundle msd_hippocampus_seg_amat] [--rounds 6] [--KEY VALUE ...]
(any other --KEY VALUE is a config override, e.g. --train_attack_steps 20 --data_source real --dataset_dir DIR).
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
import tempfile
import time
from pathlib import Path

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
    args, rest = parser.parse_known_args()
    overrides = {}
    for key, value in zip(rest[::2], rest[1::2]):
        try:
            overrides[key.lstrip("-")] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key.lstrip("-")] = value
    tmp = Path(tempfile.mkdtemp())
    common = {"epochs": args.rounds + 1, "thresholds_file": str(tmp / "none.json"), **overrides}
    trainers = {
        "AMAT": trainer(args.bundle, ["train"], {**common, "output_dir": str(tmp / "amat")}),
        "SAT": trainer(args.bundle, ["train", "train_sat"], {**common, "output_dir": str(tmp / "sat")}),
    }
    times = {k: [] for k in trainers}
    for r in range(args.rounds + 1):
        for name, t in trainers.items():
            t.state.max_epochs = r + 1
            start = time.perf_counter()
            t.run()
            if r > 0:  # the first epoch warms up
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        json.dumps(
            {"bundle": args.bundle, "overrides": overrides, "epoch_s": med, "amat/sat": med["AMAT"] / med["SAT"]}
        )
    )


if __name__ == "__main__":
    main()
