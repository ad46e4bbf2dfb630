import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, create_test_image_2d
from monai.networks.nets import UNet
from monai.utils import set_determinism

from monai_amat.data import add_sample_index

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


@pytest.fixture(autouse=True)
def _determinism():
    set_determinism(seed=0)
    yield
    set_determinism(seed=None)
