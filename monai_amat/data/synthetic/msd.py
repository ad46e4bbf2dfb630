"""A small synthetic stand-in for the paper's MSD tasks, in the real MSD layout (NIfTI files and ``dataset.json``)."""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from monai_amat.data.utils import generate_once, smooth_noise
from monai_amat.utils import write_json

__all__ = ["make_embedded_msd"]

_EMBEDDED_MARKER = "Synthetic stand-in for"
_GENERATOR = "monai_amat.data.make_embedded_msd"

# Per task: file prefix, dataset.json "name"/"modality"/"labels", the structure's mean intensity per modality and
# foreground label (background is 1.0), and how a 2-label structure is cut in two ("plane": halves along its long
# axis; "core": label 2 is the inner core, label 1 the shell around it); optionally its appearance: "axes" (the
# range of the ellipsoid's semi-axes as fractions of the volume's half extent, default _AXES), "bias" (the bias
# field's log-amplitude, default 0.2) and "noise" (a factor on the texture and the noise, default 1).
_EMBEDDED_SPECS: dict[str, dict[str, Any]] = {
    "Task02_Heart": {
        "prefix": "la",
        "name": "LeftAtrium",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "left atrium"},
        "means": [[1.9]],
        "split": "plane",
    },
    "Task04_Hippocampus": {
        "prefix": "hippocampus",
        "name": "Hippocampus",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
        "means": [[2.4, 1.5]],
        "split": "plane",
        # learnable by standard training (mean Dice of the two halves about 0.78, as nnU-Net's ~0.89 on the real
        # task): a weaker, smoother bias field and less texture, so that the halves keep their contrast within a
        # case, and a structure spanning most slices (the real crops hold the hippocampus in most of them)
        "bias": 0.05,
        "noise": 0.7,
        "axes": [[0.3, 0.22, 0.5], [0.45, 0.32, 0.7]],
    },
    "Task05_Prostate": {
        "prefix": "prostate",
        "name": "PROSTATE",
        "modality": {"0": "T2", "1": "ADC"},
        "labels": {"0": "background", "1": "PZ", "2": "TZ"},
        "means": [[2.0, 1.6], [1.7, 0.5]],
        "split": "core",
    },
}

_AXES = [[0.3, 0.22, 0.3], [0.45, 0.32, 0.45]]
_APPEARANCE = ("means", "split", "axes", "bias", "noise")
_DEFAULT_SHAPE = (48, 48, 12)
_SPACING = (1.25, 1.25, 2.5)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """A random in-plane rotation with a small tilt out of the axial plane."""
    a, t = rng.uniform(0.0, np.pi), rng.uniform(-0.25, 0.25)
    rz = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(t), -np.sin(t)], [0.0, np.sin(t), np.cos(t)]])
    return rx @ rz


def _blob(
    rng: np.random.Generator, coords: np.ndarray, center: np.ndarray, axes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A rotated ellipsoid with a smoothly perturbed surface.

    Returns:
        The mask, the ellipsoid's normalised squared radius per voxel and its local coordinates (last axis).
    """
    local = (coords - center) @ _rotation(rng)
    q = ((local / axes) ** 2).sum(-1)
    wobble = smooth_noise(rng, q.shape, 0.5 * float(axes.min()), _SPACING)
    return q + 0.2 * wobble / np.abs(wobble).max() < 1.0, q, local


def _embedded_case(
    rng: np.random.Generator, spec: dict[str, Any], shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic case: image ``(X, Y, Z)`` or ``(X, Y, Z, M)`` and label ``(X, Y, Z)``."""
    half = np.array(shape) * np.array(_SPACING) / 2.0
    coords = np.stack(
        np.meshgrid(*[(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, _SPACING)], indexing="ij"), -1
    )
    center = rng.uniform(-1.0, 1.0, 3) * half * np.array([0.25, 0.25, 0.15])
    axes = rng.uniform(*spec.get("axes", _AXES)) * half
    structure, q, local = _blob(rng, coords, center, axes)
    structure[..., [0, -1]] = False  # the structure never reaches the first and last axial slices
    label = structure.astype(np.uint8)
    if len(spec["labels"]) == 3:
        second = q < 0.4 if spec["split"] == "core" else local[..., 0] < 0.0
        label[structure & second] = 2
    distractors = np.zeros(shape, dtype=bool)
    for _ in range(int(rng.integers(2, 4))):
        d_axes = axes.mean() * rng.uniform(0.5, 0.75) * rng.uniform(0.8, 1.2, 3)
        candidates = rng.uniform(-0.7, 0.7, (20, 3)) * half
        clearance = np.linalg.norm(candidates - center, axis=1) - axes.max() - d_axes.max()
        clear = np.flatnonzero(clearance > 0)
        d_center = candidates[clear[0] if clear.size else np.argmax(clearance)]
        distractors |= _blob(rng, coords, d_center, d_axes)[0]
    distractors &= ~structure
    rim = (q < 1.6) & ~structure & ~distractors
    channels = []
    for means in spec["means"]:
        clean = np.ones(shape)
        for value, mean in enumerate(means, start=1):
            clean[label == value] = mean
        clean[rim] = 0.5  # a dark rim (as CSF around the hippocampus): context a network can learn
        clean[distractors] = rng.choice(means) * rng.uniform(0.65, 0.85)
        amount = spec.get("noise", 1.0)
        texture = 0.25 * smooth_noise(rng, shape, 3.0, _SPACING) + 0.1 * smooth_noise(rng, shape, 1.0, _SPACING)
        bias = np.exp(spec.get("bias", 0.2) * smooth_noise(rng, shape, 0.3 * float(half.max()), _SPACING))
        noisy = bias * (clean + amount * texture) + amount * 0.2 * rng.standard_normal(shape)
        channels.append(np.maximum(noisy, 0.0).astype(np.float32))
    image = channels[0] if len(channels) == 1 else np.stack(channels, -1)
    return image, label


def _save_nifti(array: np.ndarray, path: Path) -> None:
    """Save with a 1.25 x 1.25 x 2.5 mm affine."""
    affine = np.diag([*_SPACING, 1.0])
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, path)


def make_embedded_msd(
    root_dir: str | os.PathLike,
    task: str,
    num_cases: int = 8,
    seed: int = 0,
    shape: tuple[int, int, int] | None = None,
) -> Path:
    """Generate a small deterministic synthetic data set in the real MSD layout, shaped like ``task``.

    Writes ``root_dir/<task>/imagesTr/<prefix>_NNN.nii.gz``, ``labelsTr/<prefix>_NNN.nii.gz`` and a ``dataset.json``
    with the real MSD keys, modalities and labels (Task05_Prostate: one 4D image per case, T2 and ADC last).
    Images are float32, labels uint8, with a 1.25 x 1.25 x 2.5 mm affine. Each case holds a rotated, wobbly ellipsoid
    (two adjacent sub-regions of different mean intensity for 2-label tasks) whose position, size and orientation
    vary, on a textured noisy background with a bias field, plus unlabelled distractor blobs of similar intensity, so
    that no global threshold segments it; the first and last axial slices hold no foreground.

    Written as the other stand-ins are (:py:func:`monai_amat.data.utils.generate_once`): into a temporary folder
    beside ``root_dir/<task>``, renamed at the end, with ``embedded.json`` recording the parameters. When the folder
    already holds the same synthetic set, nothing is written; a synthetic set with other parameters is replaced.

    Args:
        root_dir: the folder to write ``<task>`` into.
        task: one of ``"Task02_Heart"``, ``"Task04_Hippocampus"``, ``"Task05_Prostate"``.
        num_cases: the number of training cases.
        seed: the generation seed; case ``i`` depends only on ``(task, seed, shape, i)``.
        shape: the spatial shape ``(X, Y, Z)``, each at least 4; defaults to ``(48, 48, 12)``.

    Returns:
        The task folder ``root_dir/<task>``.

    Raises:
        ValueError: when ``task`` is unknown, ``num_cases < 1`` or ``shape`` is not 3 sizes >= 4.
        FileExistsError: when ``root_dir/<task>`` exists and is not a synthetic set made by this function.
    """
    if task not in _EMBEDDED_SPECS:
        raise ValueError(f"unknown task {task!r} for make_embedded_msd; known tasks: {sorted(_EMBEDDED_SPECS)}.")
    if num_cases < 1:
        raise ValueError(f"make_embedded_msd: num_cases must be >= 1, got {num_cases}.")
    shape = tuple(int(s) for s in (shape or _DEFAULT_SHAPE))
    if len(shape) != 3 or min(shape) < 4:
        raise ValueError(f"make_embedded_msd: shape must be 3 sizes >= 4, got {shape}.")
    spec = _EMBEDDED_SPECS[task]
    task_dir = Path(root_dir) / task
    description = f"{_EMBEDDED_MARKER} {task} (monai_amat.data.make_embedded_msd, seed={seed}, shape={list(shape)})"

    def write(folder: Path) -> None:
        (folder / "imagesTr").mkdir()
        (folder / "labelsTr").mkdir()
        training = []
        for i in range(num_cases):
            rng = np.random.default_rng([seed, zlib.crc32(task.encode()), *shape, i])
            image, label = _embedded_case(rng, spec, shape)
            file_name = f"{spec['prefix']}_{i:03d}.nii.gz"
            _save_nifti(image, folder / "imagesTr" / file_name)
            _save_nifti(label, folder / "labelsTr" / file_name)
            training.append({"image": f"./imagesTr/{file_name}", "label": f"./labelsTr/{file_name}"})
        dataset = {
            "name": spec["name"],
            "description": description,
            "reference": "synthetic",
            "tensorImageSize": "4D" if len(spec["modality"]) > 1 else "3D",
            "modality": spec["modality"],
            "labels": spec["labels"],
            "numTraining": num_cases,
            "numTest": 0,
            "training": training,
            "test": [],
        }
        write_json(folder / "dataset.json", dataset)

    meta = {"generator": _GENERATOR, "task": task, "num_cases": num_cases, "seed": seed, "shape": list(shape)}
    meta["appearance"] = {k: spec[k] for k in _APPEARANCE if k in spec}  # a set of other looks is made again
    return generate_once(task_dir, meta, write)
