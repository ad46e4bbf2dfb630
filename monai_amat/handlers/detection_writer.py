"""Ignite handler that writes detection results: boxes, classes and scores per image (JSON) and an overlay PNG."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.utils import IgniteInfo, min_version, optional_import

from monai_amat.transforms.boxes import boxes_to_original
from monai_amat.utils import atomic_write

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["DetectionWriter"]

_COLOURS = ("#ff3030", "#30a0ff", "#ffd000", "#30ff60", "#ff60ff", "#00e0e0")


class DetectionWriter:
    """Inference output of a detector: ``<image stem>_detections.json`` and ``<image stem>_detections.png``.

    Reads, from an evaluator with batch-level outputs (``decollate=False``), the detector's predictions
    (``engine.state.output["pred"]``: per image boxes, labels, scores on the network's input grid) and, from the
    batch, each image's file name, resize factor and original size (as stored by
    :py:class:`monai_amat.transforms.ResizeWithBoxesd`). Boxes are mapped back to the original image's pixels.
    The JSON holds ``{"image", "boxes": [[xmin, ymin, xmax, ymax], ...], "labels", "classes", "scores"}`` sorted by
    score; the PNG draws the boxes (one colour per class) over the image. Files are written atomically; under
    ``torch.distributed`` each rank writes the files of its own images (one file per image: nothing to gather).

    Args:
        output_dir: where to write.
        classes: class names in label order.
        box_key: the predictions' box key.
        label_key: their label key.
        score_key: their score key.
        scale_key: the batch key of the resize factors.
        orig_size_key: the batch key of the original sizes.
        output_transform: maps ``engine.state.output`` to the dict holding the predictions, as MONAI handlers take it.
        batch_transform: maps ``engine.state.batch`` to the dict holding the images and their sizes.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        classes: Sequence[str],
        box_key: str = "boxes",
        label_key: str = "labels",
        score_key: str = "labels_scores",
        scale_key: str = "box_scale",
        orig_size_key: str = "orig_size",
        output_transform: Callable[[Any], Any] = lambda x: x,
        batch_transform: Callable[[Any], Any] = lambda x: x,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.classes = [str(c) for c in classes]
        self.keys = (box_key, label_key, score_key)
        self.scale_key = scale_key
        self.orig_size_key = orig_size_key
        self.output_transform = output_transform
        self.batch_transform = batch_transform

    def attach(self, engine: Engine) -> None:
        """Write the detections of every iteration.

        Args:
            engine: an evaluator with batch-level outputs, whose prediction is the detector's list of dicts.
        """
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)

    def iteration_completed(self, engine: Engine) -> None:
        """Write each image's JSON and overlay.

        Raises:
            KeyError: when the batch lacks the resize factor or original size of its images.
        """
        batch = self.batch_transform(engine.state.batch)
        missing = [k for k in (self.scale_key, self.orig_size_key) if k not in batch]
        if missing:
            raise KeyError(f"DetectionWriter needs {missing} in the batch (ResizeWithBoxesd stores them).")
        image = batch["image"]
        paths = image.meta["filename_or_obj"] if hasattr(image, "meta") else batch["image_path"]
        box_key, label_key, score_key = self.keys
        for i, pred in enumerate(self.output_transform(engine.state.output)["pred"]):
            scale = torch.as_tensor(batch[self.scale_key][i]).tolist()
            orig = torch.as_tensor(batch[self.orig_size_key][i]).tolist()
            boxes = boxes_to_original(pred[box_key], scale, orig)
            labels = torch.as_tensor(pred[label_key]).cpu().long().tolist()
            scores = torch.as_tensor(pred[score_key]).detach().cpu().float().tolist()
            order = np.argsort(scores, kind="stable")[::-1]
            result = {
                "image": str(paths[i]),
                "boxes": [[round(float(v), 2) for v in boxes[k]] for k in order],
                "labels": [labels[k] for k in order],
                "classes": [self._name(labels[k]) for k in order],
                "scores": [round(scores[k], 4) for k in order],
            }
            stem = Path(str(paths[i])).name.split(".")[0]
            with atomic_write(self.output_dir / f"{stem}_detections.json") as f:
                json.dump(result, f, indent=2)
            self._overlay(str(paths[i]), result, self.output_dir / f"{stem}_detections.png")

    def _name(self, label: int) -> str:
        return self.classes[label] if 0 <= label < len(self.classes) else str(label)

    def _overlay(self, path: str, result: dict[str, Any], out: Path) -> None:
        from PIL import Image, ImageDraw

        with Image.open(path) as im:
            canvas = im.convert("RGB")
        draw = ImageDraw.Draw(canvas)
        for box, label, score in zip(result["boxes"], result["labels"], result["scores"]):
            colour = _COLOURS[label % len(_COLOURS)]
            draw.rectangle(box, outline=colour, width=2)
            draw.text((box[0] + 2, box[1] + 1), f"{self._name(label)} {score:.2f}", fill=colour)
        with atomic_write(out, "wb") as f:
            canvas.save(f, format="PNG")
