"""The ISBI 2015 landmark bundle end to end, in-process as ``python -m monai.bundle run`` runs it."""

import csv
import json
import math
import shutil

import pytest
import torch
from monai.bundle import run

from monai_amat.data.synthetic import make_embedded_isbi2015
from tests.helpers import CHECKS, chain, ckpt_export, configs, landmark_tiny

BUNDLE = "isbi2015_ceph_landmark_amat"


@pytest.mark.slow  # starts processes
def test_landmark_bundle_all_configs(tmp_path):
    out = {k: tmp_path / k for k in ("std", "amat", "sat")}
    run(config_file=configs(BUNDLE, "train", "train_std"), output_dir=str(out["std"]), **landmark_tiny(tmp_path))
    run(
        config_file=configs(BUNDLE, "train", "calibrate"),
        ckpt_path=str(out["std"] / "model.pt"),
        **landmark_tiny(tmp_path),
    )
    thresholds = json.loads((tmp_path / "thresholds.json").read_text())
    assert thresholds["criterion"] == "loss_threshold" and thresholds["z"] == 2.0
    assert thresholds["split"] == "train" and thresholds["samples"] > 0  # the authors' split for loss thresholds
    assert set(thresholds["thresholds"]) == {"heatmap", "offset_x", "offset_y"}

    run(config_file=configs(BUNDLE, "train"), output_dir=str(out["amat"]), **landmark_tiny(tmp_path, epochs=3))
    with open(out["amat"] / "margins.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and {r["epoch"] for r in rows} == {"1", "2", "3"}
    # the authors' landmark rule: margins start at delta, grow by delta while the sample survives, never shrink;
    # delta 0.5 in the paper's units, whose input had 3 channels (ours 1) of 200 x 160 pixels (ours 40 x 32)
    step = 0.5 * math.sqrt(40 * 32 / (3 * 200 * 160))
    margins = {}
    for r in rows:
        margins.setdefault(int(r["index"]), [step]).append(float(r["margin"]))
    for history in margins.values():
        assert all(b >= a - 1e-6 for a, b in zip(history, history[1:])), history
        assert all(m / step == pytest.approx(round(m / step), abs=1e-4) for m in history), history
    run(config_file=configs(BUNDLE, "train", "evaluate"), output_dir=str(out["amat"]), **landmark_tiny(tmp_path))
    report = json.loads((out["amat"] / "robustness.json").read_text())
    assert report["eps"] == [0, 0.5, 1, 1.5, 2, 2.5, 3] and report["task"] == "landmarks"
    assert set(report["metrics"]) == {"mre_mm", "sdr_2mm", "sdr_2.5mm", "sdr_3mm", "sdr_4mm"}
    assert all(0 <= v <= 1 for k, vs in report["metrics"].items() if k.startswith("sdr") for v in vs)
    with open(out["amat"] / "landmark_errors.csv") as f:
        errors = list(csv.DictReader(f))
    assert len(errors) == 7 * 19 and {e["landmark"] for e in errors} == {str(k) for k in range(1, 20)}
    clean = [float(e["mean_mm"]) for e in errors if e["eps"] == "0"]
    assert sum(clean) / 19 == pytest.approx(report["metrics"]["mre_mm"][0], rel=1e-3)
    last = [float(e["mean_mm"]) for e in errors if e["eps"] == "3"]  # the worst case's rows, not one attack's
    assert sum(last) / 19 == pytest.approx(report["metrics"]["mre_mm"][-1], rel=1e-3)
    assert report["attack"]["of"] == ["pgd", "apgd"] and set(report["per_attack"]) == {"pgd", "apgd"}
    assert all(w >= p - 1e-6 for w, p in zip(report["metrics"]["mre_mm"], report["per_attack"]["pgd"]["mre_mm"]))
    assert {c["check"] for c in report["checks"]} == CHECKS
    with open(out["amat"] / "sample_eps.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == report["breaking_eps"]["samples"] >= 1 and all(r["image"].endswith(".bmp") for r in rows)

    run(config_file=configs(BUNDLE, "train", "train_sat"), output_dir=str(out["sat"]), **landmark_tiny(tmp_path))
    assert (out["sat"] / "model.pt").is_file()

    images = tmp_path / "data" / "ISBI2015" / "RawImage" / "TrainingData"
    run(
        config_file=configs(BUNDLE, "inference"),
        ckpt_path=str(out["amat"] / "model.pt"),
        input_dir=str(images),
        prediction_dir=str(tmp_path / "pred"),
        spatial_size=[40, 32],
    )
    with open(tmp_path / "pred" / "landmarks.csv") as f:
        points = list(csv.DictReader(f))
    assert len(points) == 6 * 19 and {p["image"] for p in points} == {f"{i:03d}.bmp" for i in range(1, 7)}
    assert all(float(p["x_mm"]) == pytest.approx(1.2 * float(p["x_px"]), abs=1e-2) for p in points)
    assert len(list((tmp_path / "pred").glob("*_landmarks.png"))) == 6

    ts = ckpt_export(BUNDLE, out["amat"] / "model.pt", tmp_path / "model.ts", spatial_size="[40, 32]")
    assert torch.jit.load(str(ts))(torch.zeros(1, 1, 40, 32)).shape == (1, 57, 40, 32)


def test_real_layout_nested_and_one_doctor(tmp_path):
    """`--data_source real` on a copy in the real layout (ids 1-300, nested one level, annotations under
    AnnotationsByMD/), with the junior doctor's files gone: an error naming the switch, then a run with it."""
    src = make_embedded_isbi2015(tmp_path / "src", num_images=300, seed=1, size=(40, 48))
    real = tmp_path / "download" / "ISBI2015_dataset"
    shutil.copytree(src / "RawImage", real / "RawImage")
    shutil.copytree(src / "400_senior", real / "AnnotationsByMD" / "400_senior")
    assert (real / "RawImage" / "Test1Data" / "151.bmp").is_file()  # ids above 150 sit where the real data has them
    common = dict(data_source="real", dataset_dir=str(tmp_path / "download"), **landmark_tiny(tmp_path, batch_size=16))
    with pytest.raises(Exception) as info:
        run(config_file=configs(BUNDLE, "train"), output_dir=str(tmp_path / "o"), **common)
    assert "use_doctors" in chain(info) and "400_junior" in chain(info)
    with pytest.warns(UserWarning, match="senior doctor's landmarks only"):
        run(config_file=configs(BUNDLE, "train"), output_dir=str(tmp_path / "o"), use_doctors="senior", **common)
    with open(tmp_path / "o" / "margins.csv") as f:
        assert len(list(csv.DictReader(f))) == 150  # the paper's training ids 1-150
