"""A small synthetic stand-in for the ISBI 2015 cephalograms, in the real layout (BMP images, two doctors' files)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from monai_amat.data.isbi2015 import (
    _DOCTORS,
    _EMBEDDED_GENERATOR,
    _EMBEDDED_NAME,
    _IMAGE_SUBDIRS,
    _MAX_ID,
    _MIN_SIZE,
    _image_subdir,
)
from monai_amat.data.utils import generate_once, smooth_noise

__all__ = ["make_embedded_isbi2015"]

# The synthetic skull, drawn in the frame of a real 1935 x 2400 image (x right, y down, face to the right).
_FRAME = np.array([1935.0, 2400.0])

_LANDMARKS = np.array(
    [
        [800, 1000],  # 1 sella: the centre of the sella turcica
        [1390, 900],  # 2 nasion: front of the frontonasal suture
        [1280, 1140],  # 3 orbitale: lowest point of the orbit rim
        [620, 1130],  # 4 porion: top of the ear canal
        [1385, 1490],  # 5 subspinale (A point)
        [1345, 1800],  # 6 supramentale (B point)
        [1360, 1930],  # 7 pogonion: most anterior point of the bony chin
        [1290, 2010],  # 8 menton: lowest point of the chin
        [1335, 1985],  # 9 gnathion
        [760, 1720],  # 10 gonion: angle of the mandible
        [1395, 1625],  # 11 lower incisal incision
        [1420, 1640],  # 12 upper incisal incision
        [1545, 1580],  # 13 upper lip
        [1525, 1745],  # 14 lower lip
        [1500, 1450],  # 15 subnasale
        [1450, 1985],  # 16 soft tissue pogonion
        [900, 1440],  # 17 posterior nasal spine
        [1440, 1420],  # 18 anterior nasal spine
        [700, 1290],  # 19 articulare
    ],
    dtype=float,
)

_SOFT_TISSUE_VALUE, _BRAIN_VALUE, _BACKGROUND_VALUE = 0.3, 0.4, 0.06


def _ellipse(center: np.ndarray, radii: Sequence[float], start: float = 0.0, stop: float = 2 * np.pi) -> np.ndarray:
    """Points on an ellipse arc (angles in radians, y down), 48 per full turn."""
    num = max(int(48 * abs(stop - start) / (2 * np.pi)), 4)
    t = np.linspace(start, stop, num, endpoint=abs(stop - start) < 2 * np.pi)
    return np.asarray(center, dtype=float) + np.stack([radii[0] * np.cos(t), radii[1] * np.sin(t)], -1)


def _skull_shapes(lm: np.ndarray) -> list[tuple[str, float, np.ndarray]]:
    """The drawing, in painting order, as ``(kind, intensity, points)`` in the real-image frame.

    ``kind`` is ``"fill"`` (a filled polygon) or ``"line"`` (a thick closed or open polyline; a ``"ring"`` is
    closed). The landmarks ``lm`` (19, 2) are vertices of the shapes (or centres, for the sella), so they move with
    them.
    """
    p = [np.asarray(q, dtype=float) for q in lm]
    cranium = np.concatenate(
        [
            [p[1]],
            _ellipse(np.array([830.0, 820.0]), (560, 600), -0.18, -np.pi - 0.55),
            [[420, 1230], [560, 1180], [700, 1170], [800, 1090], [1000, 1040], [1200, 980]],
        ]
    )
    brain_center = cranium.mean(0)
    shapes: list[tuple[str, float, np.ndarray]] = [
        (
            "fill",
            _SOFT_TISSUE_VALUE,
            np.array(
                [
                    [1330, 230],
                    [1440, 450],
                    [1470, 680],
                    p[1] + [65, 10],
                    [1560, 1120],
                    [1665, 1330],
                    [1620, 1420],
                    p[14],
                    [1525, 1500],
                    p[12],
                    [1500, 1655],
                    p[13],
                    [1460, 1860],
                    p[15],
                    [1420, 2070],
                    [1300, 2130],
                    [1120, 2160],
                    [1080, 2600],
                    [250, 2600],
                    [230, 1800],
                    [130, 1300],
                    [120, 900],
                    [250, 450],
                    [600, 200],
                    [1000, 130],
                ]
            ),
        ),
        *[
            ("fill", 0.62, np.array([[480, y], [650, y + 10], [640, y + 130], [470, y + 120]]))
            for y in (1660, 1830, 2000)
        ],
        ("fill", 0.85, cranium),
        ("fill", _BRAIN_VALUE, brain_center + 0.9 * (cranium - brain_center)),
        ("line", 0.75, np.array([[330, 1200], [560, 1200], p[3] + [60, 30], [760, 1080], p[0] + [60, 40], p[1]])),
        ("fill", 0.9, _ellipse(p[0], (70, 60))),
        ("fill", 0.22, _ellipse(p[0] + [0, -20], (48, 50), 0, np.pi)),
        ("ring", 0.7, _ellipse(p[2] - [0, 100], (110, 100), np.pi / 2, np.pi / 2 + 2 * np.pi)),
        ("fill", 0.85, _ellipse(p[3] + [0, 40], (62, 62))),
        ("fill", 0.12, _ellipse(p[3] + [0, 40], (40, 40))),
        ("line", 0.75, np.array([p[1], [1450, 1040], [1500, 1180]])),
        ("fill", 0.72, np.array([p[16], [1100, 1400], p[17], p[4], [1400, 1560], [1300, 1600], [1000, 1570]])),
        *[("fill", 0.9, np.array([[x, 1570], [x + 70, 1570], [x + 65, 1650], [x + 5, 1650]])) for x in (1000, 1090)],
        (
            "fill",
            0.75,
            np.array(
                [
                    p[18],
                    [720, 1230],
                    [790, 1240],
                    [840, 1330],
                    [900, 1290],
                    [930, 1420],
                    [950, 1600],
                    [1250, 1690],
                    [1375, 1700],
                    p[5],
                    p[6],
                    p[8],
                    p[7],
                    [1100, 1950],
                    [900, 1830],
                    p[9],
                    [710, 1500],
                ]
            ),
        ),
        *[("fill", 0.9, np.array([[x, 1665], [x + 70, 1665], [x + 65, 1730], [x + 5, 1730]])) for x in (1000, 1090)],
        ("fill", 0.95, np.array([[1300, 1790], [1360, 1790], p[10] + [12, 10], p[10], p[10] + [-15, 12]])),
        ("fill", 0.97, np.array([[1345, 1470], [1405, 1480], p[11] + [8, -15], p[11], p[11] + [-22, -10]])),
    ]
    return shapes


def _similarity(rng: np.random.Generator, size: tuple[int, int], frame_points: np.ndarray) -> np.ndarray:
    """A random similarity transform (rotation +-8 deg, scale 0.9-1.1, translation) in pixels of ``size``.

    The translation (up to 5% of the size) is drawn among those keeping ``frame_points`` at least 2 pixels inside
    the image, so no landmark leaves it.

    Returns:
        ``(2, 3)`` matrix mapping real-frame points ``[x, y, 1]`` to pixels.
    """
    w, h = size
    angle = np.deg2rad(rng.uniform(-8.0, 8.0))
    scale = rng.uniform(0.9, 1.1)
    to_pixels = np.diag(np.asarray(size, dtype=float) / _FRAME)
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    center = np.array([w - 1, h - 1]) / 2.0
    linear = rotation @ to_pixels
    offset = center - rotation @ center
    moved = frame_points @ linear.T + offset
    margin = 2.0
    shift = np.empty(2)
    for axis, length in enumerate(size):
        lo = margin - moved[:, axis].min()
        hi = length - 1 - margin - moved[:, axis].max()
        lo, hi = max(lo, -0.05 * length), min(hi, 0.05 * length)
        shift[axis] = rng.uniform(lo, hi) if lo <= hi else (lo + hi) / 2.0
    return np.concatenate([linear, (offset + shift)[:, None]], axis=1)


def _draw_mask(kind: str, points: np.ndarray, size: tuple[int, int], width: int, blur: float) -> np.ndarray:
    """A shape's soft mask in ``[0, 1]``, ``(height, width)``."""
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    xy = [tuple(q) for q in points.tolist()]
    if kind == "fill":
        draw.polygon(xy, fill=255)
    else:
        draw.line(xy + xy[:1] if kind == "ring" else xy, fill=255, width=width, joint="curve")
    return np.asarray(mask.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float64) / 255.0


def _embedded_case(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic cephalogram: ``(height, width)`` uint8 image and ``(19, 2)`` x, y landmarks in pixels."""
    w, h = size
    landmarks = _LANDMARKS + np.clip(rng.normal(0.0, 12.0, _LANDMARKS.shape), -30.0, 30.0)
    matrix = _similarity(rng, size, landmarks)
    line_width = max(1, round(0.015 * h))
    blur = max(0.5, 0.002 * h)
    image = np.full((h, w), _BACKGROUND_VALUE)
    texture = smooth_noise(rng, (h, w), 0.01 * h)
    for kind, value, points in _skull_shapes(landmarks):
        pixels = points @ matrix[:, :2].T + matrix[:, 2]
        mask = _draw_mask(kind, pixels, size, line_width, blur)
        shade = value * (1.0 + 0.08 * texture) if value > _BRAIN_VALUE else value
        image = image * (1.0 - mask) + shade * mask
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    direction = rng.normal(size=2)
    gradient = (direction[0] * yy + direction[1] * xx) / np.linalg.norm(direction)
    image += 0.08 * (gradient - gradient.mean()) + 0.03 * smooth_noise(rng, (h, w), 0.03 * h)
    image += 0.025 * rng.standard_normal((h, w))
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8), landmarks @ matrix[:, :2].T + matrix[:, 2]


def _write_annotation(path: Path, points: np.ndarray, extra: Sequence[int]) -> None:
    """Write integer ``x,y`` lines and extra non-landmark lines, with Windows line ends as the real files."""
    lines = [f"{x},{y}" for x, y in points.tolist()] + [str(v) for v in extra]
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())


def make_embedded_isbi2015(
    root_dir: str | os.PathLike, num_images: int = 12, seed: int = 0, size: tuple[int, int] = (160, 200)
) -> Path:
    """Generate a small deterministic synthetic data set in the real ISBI 2015 layout.

    Writes ``root_dir/ISBI2015/RawImage/TrainingData/001.bmp``, ... (8-bit grayscale BMP; ids above 150 go to
    ``Test1Data`` and above 300 to ``Test2Data``, as in the real layout), ``400_senior/NNN.txt`` and
    ``400_junior/NNN.txt`` (19 integer ``x,y`` lines plus two non-landmark lines, Windows line ends) and a marker
    ``embedded.json`` recording the parameters. Each image is an X-ray-like lateral skull facing right: bright bone
    (cranium, skull base, sella turcica, orbit, ear canal rim, maxilla, mandible, teeth, vertebrae), grey soft tissue
    with nose, lips and chin, dark background, texture, noise and a smooth intensity gradient. The 19 landmarks are
    defined points of the drawing (the sella centre, vertices of the bone and soft-tissue outlines, the lowest point
    of the orbit, the top of the ear canal, the incisor tips) and move with it: per image a small per-landmark shape
    variation, then a random similarity transform (rotation +-8 degrees, scale 0.9-1.1, translation) that keeps every
    landmark inside the image. The senior's points are the rounded landmarks; the junior's differ by up to 2 pixels.

    The set is written into a temporary folder beside ``root_dir/ISBI2015`` and renamed at the end. When the marker
    records the same parameters nothing is written; an older synthetic set is replaced.

    Args:
        root_dir: the folder to write ``ISBI2015`` into.
        num_images: the number of cases (ids ``1..num_images``), at most 400.
        seed: the generation seed; case ``i`` depends only on ``(seed, size, i)``.
        size: ``(width, height)`` of the images, each at least 32.

    Returns:
        ``root_dir/ISBI2015``, the folder to pass as ``dataset_dir``.

    Raises:
        ValueError: when ``num_images`` is not in ``[1, 400]`` or ``size`` is not two sizes >= 32.
        FileExistsError: when ``root_dir/ISBI2015`` exists and is not a synthetic set made by this function.
    """
    if not 1 <= num_images <= _MAX_ID:
        raise ValueError(f"make_embedded_isbi2015: num_images must be in [1, {_MAX_ID}], got {num_images}.")
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < _MIN_SIZE:
        raise ValueError(f"make_embedded_isbi2015: size must be (width, height), each >= {_MIN_SIZE}, got {size}.")
    ids = list(range(1, num_images + 1))
    meta = {"generator": _EMBEDDED_GENERATOR, "num_images": num_images, "seed": seed, "size": list(size), "ids": ids}

    def write(tmp: Path) -> None:
        for folder in (*(f"RawImage/{s}" for s in _IMAGE_SUBDIRS), *(f"400_{d}" for d in _DOCTORS)):
            (tmp / folder).mkdir(parents=True)
        for case_id in ids:
            rng = np.random.default_rng([seed, *size, case_id])
            image, landmarks = _embedded_case(rng, size)
            Image.fromarray(image, mode="L").save(tmp / "RawImage" / _image_subdir(case_id) / f"{case_id:03d}.bmp")
            bounds = np.array(size) - 1
            senior = np.clip(np.rint(landmarks), 0, bounds).astype(int)
            junior = np.clip(senior + rng.integers(-2, 3, senior.shape), 0, bounds)
            extra = rng.integers(1, 4, 2).tolist()
            _write_annotation(tmp / "400_senior" / f"{case_id:03d}.txt", senior, extra)
            _write_annotation(tmp / "400_junior" / f"{case_id:03d}.txt", junior, extra)

    return generate_once(Path(root_dir) / _EMBEDDED_NAME, meta, write)
