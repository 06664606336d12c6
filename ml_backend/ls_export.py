"""Label Studio's JSON export as a dataset: one item per mask region (brush or polygon), its box
the same label's rectangle of the same annotation. The trainer reads a project's export so, and ``talk2sam train``
/ ``talk2sam evaluate`` read an export file as the ``labelstudio`` dataset format (registered as
the ``talk2sam.datasets`` entry point ``labelstudio``: ``talk2sam`` itself knows nothing of Label
Studio).

Nothing here imports torch; ``talk2sam.data`` is imported only when an item is built.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.errors import AnnotationFormatError
from ml_backend.ls_format import MASK_TYPES, rectangle_xyxy, result_mask


def _pixels_inside(mask: np.ndarray, box: np.ndarray) -> int:
    """Mask pixels whose centres lie in a continuous XYXY box."""
    x0, y0 = max(0, math.ceil(box[0] - 0.5)), max(0, math.ceil(box[1] - 0.5))
    x1, y1 = math.ceil(box[2] - 0.5), math.ceil(box[3] - 0.5)
    return int(np.count_nonzero(mask[y0 : max(y0, y1), x0 : max(x0, x1)]))


def _single_label(result: dict[str, Any], key: str) -> str:
    labels = result.get("value", {}).get(key) or []
    if len(labels) != 1:
        raise AnnotationFormatError(
            f"{key} result {result.get('id')!r} has {len(labels)} labels; expected exactly one"
        )
    return str(labels[0])


@dataclass(frozen=True)
class _LsRegion:
    name: str
    task_id: Any
    image_ref: str
    word: str
    mask_result: dict[str, Any]  # its brushlabels or polygonlabels result
    rectangles: tuple[dict[str, Any], ...]  # same-label rectangles of the same annotation


class LabelStudioExportDataset:
    """Objects annotated in Label Studio, from its JSON export: one item per mask region.

    Pairing rule: a `brushlabels` or `polygonlabels` region's word is its label; its box is the `rectanglelabels`
    region of the same annotation with the same label (when several, the one holding most mask
    pixels, then the smallest; when none holds any, or there is none, the mask's tight box).
    Rectangle boxes are continuous pixels (`rectangle_xyxy`); mask boxes use the inclusive
    convention of `mask_box_xyxy`. Cancelled annotations (`was_cancelled`) are skipped.

    Args:
        export: path of the export file, or its parsed list of tasks.
        load_image: image reference (URL or path as in `task["data"]`) -> image array or PIL
            image; the result is normalised by `to_rgb_uint8`. The backend plugs in its fetcher.
        image_key: the `task["data"]` key of the image; default "image", or the only key.
        skip_malformed: leave out a task with no image reference or a region with several
            labels, with its reason in ``left_out``, instead of raising (a trainer must not die
            on one bad task).

    Raises:
        AnnotationFormatError: malformed export; unless skip_malformed, a region with several
            labels or a task with no image reference.
    """

    def __init__(
        self,
        export: str | Path | list[dict[str, Any]],
        load_image: Callable[[str], Any],
        image_key: str | None = None,
        skip_malformed: bool = False,
    ):
        tasks = json.loads(Path(export).read_text()) if isinstance(export, (str, Path)) else export
        if not isinstance(tasks, list):
            raise AnnotationFormatError("a Label Studio JSON export must be a list of tasks")
        self._load_image = load_image
        self._cache: tuple[str, np.ndarray] | None = None  # last image: regions share images
        self.regions: list[_LsRegion] = []
        self.left_out: list[str] = []  # with skip_malformed: what was left out, and why
        for task in tasks:
            try:
                self.regions += self._task_regions(task, image_key)
            except AnnotationFormatError as exc:
                if not skip_malformed:
                    raise
                self.left_out.append(f"task {task.get('id')!r}: {exc}")

    @staticmethod
    def _task_regions(task: dict[str, Any], image_key: str | None) -> list[_LsRegion]:
        data = task.get("data", {})
        key = image_key or ("image" if "image" in data else None)
        if key is None and len(data) == 1:
            key = next(iter(data))
        if key is None or not isinstance(data.get(key), str):
            raise AnnotationFormatError(
                f"task {task.get('id')!r}: no image reference in data keys {sorted(data)}; "
                "pass image_key"
            )
        regions = []
        for ann in task.get("annotations", []):
            if ann.get("was_cancelled"):
                continue
            results = ann.get("result", [])
            rects = [r for r in results if r.get("type") == "rectanglelabels"]
            for res in results:
                if res.get("type") not in MASK_TYPES:
                    continue
                word = _single_label(res, res["type"])
                same = tuple(r for r in rects if _single_label(r, "rectanglelabels") == word)
                name = f"task{task.get('id')}_ann{ann.get('id')}_{res.get('id')}"
                regions.append(_LsRegion(name, task.get("id"), data[key], word, res, same))
        return regions

    def __len__(self) -> int:
        return len(self.regions)

    def _image(self, ref: str) -> np.ndarray:
        from talk2sam.data.items import to_rgb_uint8

        if self._cache is None or self._cache[0] != ref:
            self._cache = (ref, to_rgb_uint8(self._load_image(ref)))
        return self._cache[1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        from talk2sam.data.items import make_item  # the trainer's side only: not at import
        region = self.regions[index]
        mask = result_mask(region.mask_result)
        image = self._image(region.image_ref)
        if image.shape[:2] != mask.shape:
            raise AnnotationFormatError(
                f"{region.name}: image {region.image_ref!r} is {image.shape[1]}x{image.shape[0]} "
                f"but the annotation was made on {mask.shape[1]}x{mask.shape[0]}"
            )
        box = None
        if region.rectangles:
            boxes = [np.array(rectangle_xyxy(r["value"], mask.shape[1], mask.shape[0]),
                              dtype=np.float32) for r in region.rectangles]
            # Most mask pixels inside first, then the smallest rectangle.
            scores = [
                (_pixels_inside(mask, b), -float((b[2] - b[0]) * (b[3] - b[1]))) for b in boxes
            ]
            best = max(range(len(boxes)), key=scores.__getitem__)
            box = boxes[best] if scores[best][0] > 0 else None
        return make_item(image, mask, " ".join(region.word.replace("_", " ").split()),
                         region.name, box)


def open_export(root: str | Path, images_root: str | Path | None = None,
                split: str | None = None) -> LabelStudioExportDataset:
    """The ``labelstudio`` dataset format: a JSON export file, images from disk."""
    return LabelStudioExportDataset(root, local_image_loader(images_root))


def local_image_loader(images_root: str | Path | None) -> Callable[[str], Any]:
    """Label Studio image reference -> PIL image from disk (``?d=relative/path`` or file name)."""
    from urllib.parse import parse_qs, urlparse

    def load(ref: str) -> Any:
        candidates = [Path(ref)]
        if images_root:
            local = parse_qs(urlparse(ref).query).get("d", [""])[0]
            if local:
                candidates.append(Path(images_root) / local)
            candidates.append(Path(images_root) / Path(urlparse(ref).path).name)
        for path in candidates:
            if path.is_file():
                from PIL import Image, ImageOps

                return ImageOps.exif_transpose(Image.open(path))  # as the workers see it
        raise AnnotationFormatError(f"image {ref!r} not found; pass --images-root DIR")

    return load
