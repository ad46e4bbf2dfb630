"""STD vs AMAT test mAP on a crowded-nuclei set at the same number of iterations, for each classification loss.

For each ``cls_loss`` (``bce``, ``focal``) the detection bundle trains STD (``train.json`` + ``train_std.json``),
calibrates the thresholds from that model (``calibrate.json``), trains AMAT (``train.json``) for the same epochs on
the same data, and evaluates both on the test split (``evaluate.json``, PGD at ``--eps``); the script prints the
validation mAP of the last epoch, the test mAP at each eps and AMAT / STD of the clean test mAP. The set is
``make_crowded_nuclei`` with its defaults (12 images of 256 x 256, 20-125 nuclei of 8-30 px) unless ``--size`` and
``--count`` say otherwise. Each stage is one ``python -m monai.bundle run`` with 1 torch thread.

Usage: python benchmarks/bench_crowded_detection.py [--out DIR] [--epochs 60] [--size 256] [--count 20 125]
[--eps 0 5 10] [--KEY VALUE ...] (any other --KEY VALUE is a config override, e.g. --seed 1 for another training
seed on the same data, or --detections_per_img 300).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from monai_amat.data import make_crowded_nuclei

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundles" / "bccd_cell_detection_amat" / "configs"


def _run(configs: list[str], log: Path, overrides: dict) -> str:
    """One ``monai.bundle run`` of these configs; its log text (also written to ``log``)."""
    files = str([str(CONFIGS / f"{c}.json") for c in configs])
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files]
    for key, value in overrides.items():
        args += [f"--{key}", repr(value) if not isinstance(value, str) else value]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    log.write_text(done.stdout + done.stderr)
    if done.returncode:
        raise RuntimeError(f"{configs} failed (exit {done.returncode}); see {log}")
    return done.stdout + done.stderr


def main() -> None:
    """Train, calibrate and evaluate STD and AMAT for each classification loss; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (also the network input)")
    parser.add_argument("--count", type=int, nargs=2, default=(20, 125), help="least and most nuclei per image")
    parser.add_argument("--eps", type=float, nargs="+", default=[0, 5, 10])
    known, rest = parser.parse_known_args()
    extra = {k.lstrip("-"): v for k, v in zip(rest[::2], rest[1::2])}
    out = Path(known.out or tempfile.mkdtemp(prefix="crowded_"))
    data = make_crowded_nuclei(out / "data", size=(known.size, known.size), count=tuple(known.count))
    print(f"crowded set {data}; {known.epochs} epochs of batch 4 for every model")
    print("| cls_loss | model | val mAP last epoch | " + " | ".join(f"test mAP eps {e:g}" for e in known.eps) + " |")
    print("|---|---|---:|" + "---:|" * len(known.eps))
    for cls_loss in ("bce", "focal"):
        work = out / cls_loss
        work.mkdir(parents=True, exist_ok=True)
        common = {
            "data_source": "real",
            "dataset_dir": str(data),
            "class_names": "['nucleus']",
            "epochs": known.epochs,
            "batch_size": 4,
            "learning_rate": 3e-3,
            "train_attack_steps": 5,
            "spatial_size": [known.size, known.size],
            "cls_loss": cls_loss,
            "export_model": False,
            "thresholds_file": str(work / "thresholds.json"),
            **extra,
        }
        clean = {}
        for model, configs in (("STD", ["train", "train_std"]), ("AMAT", ["train"])):
            run_dir = work / model.lower()
            log = _run(configs, work / f"{model.lower()}.log", {**common, "output_dir": str(run_dir)})
            val = re.findall(r"Metrics -- val_map: ([0-9.]+)", log)
            if model == "STD":
                _run(["train", "calibrate"], work / "calibrate.log", {**common, "ckpt_path": str(run_dir / "model.pt")})
            evaluation = {"output_dir": str(run_dir), "eps_list": known.eps, "attack_steps": 20}
            evaluation.update({"eval_attacks": "['pgd']", "masking_checks": False, "breaking_eps": False})
            _run(["train", "evaluate"], work / f"{model.lower()}_eval.log", {**common, **evaluation})
            maps = json.loads((run_dir / "robustness.json").read_text())["metrics"]["map"]
            clean[model] = maps[0]
            print(f"| {cls_loss} | {model} | {float(val[-1]):.3f} | " + " | ".join(f"{m:.3f}" for m in maps) + " |")
        print(f"| {cls_loss} | AMAT / STD clean | | {clean['AMAT'] / max(clean['STD'], 1e-9):.2f} |")


if __name__ == "__main__":
    main()
