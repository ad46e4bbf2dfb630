"""A small end-to-end run on MONAI's synthetic 2D segmentation data: STD, SAT and AMAT, then robust evaluation.

``python -m monai_amat.apps.demo --output_dir runs/demo`` trains a standard model, calibrates the Dice threshold from
it (``thresholds.json``), trains AMAT and SAT with that criterion, evaluates all three under PGD at every eps
(``<model>/robustness.json`` and ``.png``) and writes a comparison table (``comparison.md``) and plot
(``comparison.png``). It needs no data download and finishes in a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, Dataset, create_test_image_2d
from monai.engines import SupervisedTrainer
from monai.handlers import MeanDice, StatsHandler, from_engine
from monai.networks.nets import UNet
from monai.transforms import AsDiscreted, Compose
from monai.utils import set_determinism

from monai_amat.attacks import PGD
from monai_amat.criteria import DiceCriterion, calibrate_dice_tau, holds_every_class, save_thresholds
from monai_amat.data import add_sample_index
from monai_amat.engines import AMATTrainer, RobustEvaluator, SATTrainer
from monai_amat.handlers import MarginHandler, RobustnessReport, area_under_curve, plot_robustness
from monai_amat.losses import PerSampleDiceCELoss
from monai_amat.utils import atomic_write

__all__ = ["synthetic_segmentation", "main"]


def synthetic_segmentation(num: int, size: int, seed: int) -> list[dict[str, Any]]:
    """MONAI's synthetic 2D images (bright discs on noise), z-scored, with binary labels and sample indices.

    Args:
        num: number of images.
        size: image side in pixels.
        seed: random seed of the first image (image ``i`` uses ``seed + i``).

    Returns:
        A datalist of ``{"image", "label", "index"}`` dicts holding ``(1, size, size)`` float32 arrays.
    """
    items = []
    for i in range(num):
        image, label = create_test_image_2d(
            size, size, num_objs=4, rad_max=size // 6, noise_max=0.6, random_state=np.random.RandomState(seed + i)
        )
        image = (image - image.mean()) / (image.std() + 1e-8)
        items.append({"image": image[None].astype(np.float32), "label": (label[None] > 0).astype(np.float32)})
    return add_sample_index(items)


def _network() -> UNet:
    return UNet(2, 1, 2, channels=(16, 32, 64), strides=(2, 2), num_res_units=1, norm="batch")


def _train(kind: str, args: argparse.Namespace, train: list[dict], out: Path, tau: float | None) -> tuple[UNet, float]:
    set_determinism(seed=args.seed)
    net = _network()
    loss = PerSampleDiceCELoss()
    opt = torch.optim.Adam(net.parameters(), args.learning_rate)
    loader = DataLoader(Dataset(train), batch_size=args.batch_size, shuffle=True)
    common: dict[str, Any] = {
        "device": "cpu",
        "max_epochs": args.epochs,
        "train_data_loader": loader,
        "network": net,
        "optimizer": opt,
        "loss_function": loss,
        "train_handlers": [StatsHandler(name=f"demo.{kind}", output_transform=from_engine(["loss"], first=True))],
    }
    attack = PGD(loss, steps=args.train_steps, alpha=4.0)
    if kind == "STD":
        trainer: SupervisedTrainer = SupervisedTrainer(**common)
    elif kind == "AMAT":
        margins = MarginHandler(len(train), delta=args.delta, output_dir=out)
        trainer = AMATTrainer(**common, attack=attack, margin_handler=margins, criterion=DiceCriterion(tau), beta=0.5)
    else:
        trainer = SATTrainer(**common, attack=attack, eps=args.sat_eps, adversarial_only=True)
    start = time.perf_counter()
    trainer.run()
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "model.pt", "wb") as f:
        torch.save(net.state_dict(), f)
    return net.eval(), seconds


def _evaluate(net: UNet, test: list[dict], eps: list[float], args: argparse.Namespace, out: Path) -> dict:
    post = Compose([AsDiscreted(keys="pred", argmax=True, to_onehot=2), AsDiscreted(keys="label", to_onehot=2)])
    report = RobustnessReport(out, task="segmentation", model_name=out.name)
    evaluator = RobustEvaluator(
        "cpu",
        DataLoader(Dataset(test), batch_size=args.batch_size),
        net,
        PGD(PerSampleDiceCELoss(), steps=args.eval_steps, alpha=25.0, random_start=False),
        eps,
        postprocessing=post,
        key_val_metric={
            "mean_dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))
        },
        val_handlers=[report],
    )
    evaluator.run()
    return report.report


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Run the demo.

    Args:
        argv: command-line arguments (see ``--help``).

    Returns:
        ``{model: robustness report}``.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="runs/demo")
    parser.add_argument("--num_train", type=int, default=48)
    parser.add_argument("--num_test", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=1e-2)
    parser.add_argument("--train_steps", type=int, default=10, help="PGD steps in training")
    parser.add_argument("--eval_steps", type=int, default=20, help="PGD steps in evaluation")
    parser.add_argument("--delta", type=float, default=1.0, help="AMAT margin step")
    parser.add_argument("--sat_eps", type=float, default=5.0)
    parser.add_argument("--eps", default="0,2,5,10", help="comma-separated evaluation noise levels (L2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    root = Path(args.output_dir)
    eps = [float(e) for e in args.eps.split(",")]
    train = synthetic_segmentation(args.num_train, args.size, args.seed)
    test = synthetic_segmentation(args.num_test, args.size, args.seed + 10_000)

    reports, seconds = {}, {}
    std, seconds["STD"] = _train("STD", args, train, root / "STD", None)
    with torch.no_grad():
        x = torch.stack([torch.as_tensor(d["image"]) for d in train])
        y = torch.stack([torch.as_tensor(d["label"]) for d in train])
        dice = DiceCriterion(0.0, reduction="mean").dice(std(x), y)
    tau = calibrate_dice_tau(dice, holds_every_class(y, 2))
    save_thresholds(
        root / "thresholds.json", "dice", {"tau": tau}, None, str(root / "STD" / "model.pt"), "train", len(train)
    )
    reports["STD"] = _evaluate(std, test, eps, args, root / "STD")
    for kind in ("AMAT", "SAT"):
        net, seconds[kind] = _train(kind, args, train, root / kind, tau)
        reports[kind] = _evaluate(net, test, eps, args, root / kind)

    lines = [
        f"Dice threshold tau = {tau:.4f} (mean Dice of STD on the training images)\n",
        "| model | " + " | ".join(f"Dice @ eps {e:g}" for e in eps) + " | AUC | train s |",
        "|---" * (len(eps) + 3) + "|",
    ]
    for name, rep in reports.items():
        values = rep["metrics"]["mean_dice"]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{v:.3f}" for v in values)
            + f" | {area_under_curve(eps, values):.3f} | {seconds[name]:.0f} |"
        )
    table = "\n".join(lines) + "\n"
    with atomic_write(root / "comparison.md") as f:
        f.write(table)
    plot_robustness(root / "comparison.png", eps, {k: r["metrics"] for k, r in reports.items()}, "synthetic 2D")
    print(table)
    return reports


if __name__ == "__main__":
    main()
