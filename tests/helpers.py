"""Helpers shared by the tests: small data and networks, bundle config paths and tiny overrides, error chains."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader, Dataset, create_test_image_2d
from monai.handlers import MeanDice, from_engine
from monai.networks.nets import UNet
from monai.transforms import AsDiscreted, Compose

from monai_amat.data import add_sample_index
from monai_amat.losses import PerSampleDiceCELoss

SEG_BUNDLES = ["msd_heart_seg_amat", "msd_hippocampus_seg_amat", "msd_prostate_seg_amat"]
# the BCCD tests' network input (a multiple of the FPN's largest stride, 16)
DETECTION_SPATIAL = [64, 64]


# the gradient-masking checks of an evaluation with several attacks
CHECKS = {"monotone", "worst_case", "random_noise", "stronger_attack", "large_eps"}


def synthetic_seg_data(n: int, size: int = 32, seed: int = 0) -> list[dict]:
    """MONAI's synthetic 2D segmentation images (circles on noise), binary labels, with sample indices."""
    items = []
    for i in range(n):
        im, lab = create_test_image_2d(
            size, size, num_objs=3, rad_max=size // 4, noise_max=0.3, random_state=np.random.RandomState(seed + i)
        )
        items.append({"image": im[None].astype(np.float32), "label": (lab[None] > 0).astype(np.float32)})
    return add_sample_index(items)


def seg_loader(data: list[dict], batch_size: int = 4, shuffle: bool = False) -> DataLoader:
    return DataLoader(Dataset(data), batch_size=batch_size, shuffle=shuffle, num_workers=0)


def small_unet(dims: int = 2, out_channels: int = 2, norm: str = "batch") -> UNet:
    return UNet(dims, 1, out_channels, channels=(8, 16), strides=(2,), num_res_units=0, norm=norm)


def stack(data: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of a datalist as two batch tensors."""
    return torch.stack([torch.as_tensor(d["image"]) for d in data]), torch.stack(
        [torch.as_tensor(d["label"]) for d in data]
    )


def pretrain(net: torch.nn.Module, data: list[dict], loss, steps: int = 40) -> torch.nn.Module:
    """A few full-batch Adam steps of standard training; returns the network in eval mode."""
    x, y = stack(data)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss(net(x), y).mean().backward()
        opt.step()
    return net.eval()


class TinyClassifier(torch.nn.Module):
    def __init__(self, in_ch: int = 1, classes: int = 3, size: int = 8):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_ch, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * size * size, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def per_sample_ce(pred, target):
    return torch.nn.functional.cross_entropy(pred, target, reduction="none")


ROOT = Path(__file__).resolve().parents[1]


def configs(bundle, *names):
    return [str(ROOT / "bundles" / bundle / "configs" / f"{n}.json") for n in names]


def tiny(tmp_path, **extra):
    """Overrides that make a run take seconds: a tiny embedded set, 1 epoch, 2 attack steps."""
    return {
        "embedded_dir": str(tmp_path / "data"),
        "embedded_cases": 6,
        "epochs": 1,
        "train_attack_steps": 2,
        "attack_steps": 2,
        "spatial_size": [16, 16],
        "thresholds_file": str(tmp_path / "thresholds.json"),
        "models_dir": str(tmp_path / "models"),
        **extra,
    }


def ckpt_export(bundle, ckpt, filepath, **overrides):
    """``python -m monai.bundle ckpt_export`` of a bundle's ``network_def`` (from inference.json), as a user runs it."""
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "ckpt_export",
        "--net_id",
        "network_def",
        "--filepath",
        str(filepath),
        "--ckpt_file",
        str(ckpt),
        "--config_file",
        configs(bundle, "inference")[0],
        "--meta_file",
        configs(bundle, "metadata")[0],
    ]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    return filepath


def two_cpu_ranks(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 ARGS`` on the CPU (gloo), whatever GPUs the machine has.

    The bundles' ``multi_gpu_train.json`` picks NCCL and ``cuda:LOCAL_RANK`` where CUDA is visible, and a one-GPU
    machine has no ``cuda:1``; these tests are about the gloo path, so the children see no GPU.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def chain(exc_info):
    """The messages of an exception and of what caused it (MONAI's config parser wraps errors)."""
    out, e = [], exc_info.value
    while e is not None:
        out.append(str(e))
        e = e.__cause__ or e.__context__
    return "\n".join(out)


def seg_batch(n=4, size=32):
    data = synthetic_seg_data(n, size)
    x = torch.stack([torch.as_tensor(d["image"]) for d in data])
    y = torch.stack([torch.as_tensor(d["label"]) for d in data])
    return x, y


def trained_unet(x, y, dims=2):
    net = small_unet(dims)
    loss = PerSampleDiceCELoss()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(30):
        opt.zero_grad()
        loss(net(x), y).mean().backward()
        opt.step()
    return net.eval(), loss


def dice_postprocessing():
    return Compose([AsDiscreted(keys="pred", argmax=True, to_onehot=2), AsDiscreted(keys="label", to_onehot=2)])


def dice_metrics():
    return {"mean_dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))}


def detection_tiny(tmp_path, **extra):
    return tiny(
        tmp_path,
        **{
            "batch_size": 2,
            "spatial_size": DETECTION_SPATIAL,
            "embedded_size": [96, 72],
            "anchor_sizes": [4, 8, 16],
            **extra,
        },
    )


def landmark_tiny(tmp_path, **extra):
    return tiny(tmp_path, **{"batch_size": 2, "spatial_size": [40, 32], **extra})
