"""Benchmark and annotation loaders (METHOD.md section 4): every one yields `Item` dicts.

File datasets pair an image with a ground-truth mask by file stem; the text prompt comes from the
file name, the box is the mask's tight box (`talk2sam.data.items.mask_box_xyxy`):

- ThinObject5K: `images/<name>.jpg`, `masks/<name>.png`, optional `list/<split>.txt`;
  `<category>_PNG<number>` -> the category.
- DIS5K: `DIS-TR`, `DIS-VD`, `DIS-TE1`..`DIS-TE4`, each with `im/*.jpg` and `gt/*.png`;
  `<group#>#<Group>#<class#>#<Class>#<name>` -> `split('#')[3]`; scene / action classes dropped.
- BIG: `<name>_im.jpg` with `<name>_gt.png` in one folder; the word is parsed from `<name>`.
- Generic folder: `images/<name>.<ext>`, `masks/<name>.png`, `words.json` or `words.csv`.
- Formats of other installed packages, by entry point (`FORMAT_ENTRY_POINTS`).

Underscores in words become spaces (the word is a CLIP text prompt). Files are read lazily, one
item per `__getitem__`, so building a dataset only lists folders.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from talk2sam.errors import AnnotationError, DatasetLayoutError
from talk2sam.data.items import Item, ItemDataset, load_mask, load_rgb, make_item

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DIS5K_SPLITS = ("DIS-TR", "DIS-VD", "DIS-TE1", "DIS-TE2", "DIS-TE3", "DIS-TE4")

# Our choice, not the paper's: the paper drops DIS5K files "whose names are scenes or actions"
# (e.g. "skiing") but does not publish its list. These class names denote an activity or a place
# rather than one object; matched case-insensitively with "-", "_" and spaces treated alike.
# It was not checked against the real DIS5K class list: compare the kept counts with the paper's
# (2,777 DIS-TR / 457 DIS-VD) before reporting. Override with `dis5k(..., drop_classes=...)`;
# pass `()` to keep every class.
DIS5K_DROPPED_CLASSES: tuple[str, ...] = (
    "skiing", "snowboarding", "skating", "skateboarding", "surfing", "windsurfing", "kitesurfing",
    "paragliding", "parachuting", "hang gliding", "climbing", "rock climbing", "diving",
    "swimming", "dancing", "cycling", "running", "jumping", "fishing", "sailing", "rowing",
    "riding", "horse riding", "playing", "juggling", "acrobatics", "gymnastics", "yoga",
    "landscape", "scene", "scenery", "street", "city", "cityscape", "forest", "mountain",
    "beach", "garden", "park", "playground", "indoor", "outdoor",
)  # fmt: skip


@dataclass(frozen=True)
class MaskRecord:
    """One image / mask file pair and its word."""

    name: str
    image_path: Path
    mask_path: Path
    word: str


class MaskFileDataset:
    """Torch-style dataset over image / mask file pairs (`len`, integer `getitem`).

    Items: see `talk2sam.data.items.Item`; the box is the mask's tight box.
    """

    def __init__(self, records: Sequence[MaskRecord]):
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Item:
        rec = self.records[index]
        return make_item(load_rgb(rec.image_path), load_mask(rec.mask_path), rec.word, rec.name)

    @property
    def words(self) -> list[str]:
        """The distinct words, sorted."""
        return sorted({rec.word for rec in self.records})


def _clean_word(word: str) -> str:
    return " ".join(word.replace("_", " ").split())


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetLayoutError(f"{what}: folder {path} not found")
    return path


def _files_by_stem(folder: Path, extensions: Iterable[str]) -> dict[str, Path]:
    exts = {e.lower() for e in extensions}
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in exts:
            if path.stem in found:
                raise DatasetLayoutError(f"two files for {path.stem!r} in {folder}")
            found[path.stem] = path
    return found


def _first(names: Iterable[str], n: int = 5) -> str:
    """The first ``n`` names in sorted order, for an error message."""
    return ", ".join(sorted(names)[:n])


def _pair_by_stem(image_dir: Path, mask_dir: Path) -> list[tuple[str, Path, Path]]:
    """(stem, image, mask) for every image; both folders must hold the same stems."""
    images = _files_by_stem(image_dir, IMAGE_EXTENSIONS)
    masks = _files_by_stem(mask_dir, (".png",))
    for missing, have, lacks in (
        (images.keys() - masks.keys(), image_dir, mask_dir),
        (masks.keys() - images.keys(), mask_dir, image_dir),
    ):
        if missing:
            raise DatasetLayoutError(
                f"{len(missing)} files in {have} have no partner in {lacks}: {_first(missing)}")
    return [(stem, images[stem], masks[stem]) for stem in sorted(images)]


def thinobject5k_word(name: str) -> str:
    """`<category>_PNG<number>` -> category (underscores become spaces).

    Raises:
        DatasetLayoutError: the name does not follow the pattern.
    """
    match = re.fullmatch(r"(.+)_PNG\d+", name)
    if not match:
        raise DatasetLayoutError(f"ThinObject5K name {name!r} is not <category>_PNG<number>")
    return _clean_word(match.group(1))


def thinobject5k(root: str | Path, split: str | None = None) -> MaskFileDataset:
    """ThinObject5K in its published layout.

    Args:
        root: folder with `images/` (jpg) and `masks/` (png).
        split: None for every pair, else the name of a list file `list/<split>.txt`
            (e.g. "train", "test") whose lines name images (extension optional).

    Raises:
        DatasetLayoutError: missing folders or list file, unpaired files, names off the pattern.
    """
    root = Path(root)
    pairs = _pair_by_stem(
        _require_dir(root / "images", "ThinObject5K"), _require_dir(root / "masks", "ThinObject5K")
    )
    if split is not None:
        list_file = root / "list" / f"{split}.txt"
        if not list_file.is_file():
            raise DatasetLayoutError(f"ThinObject5K split list {list_file} not found")
        wanted = {Path(line.strip()).stem for line in list_file.read_text().splitlines()}
        wanted.discard("")
        unknown = wanted - {stem for stem, _, _ in pairs}
        if unknown:
            raise DatasetLayoutError(f"{list_file} names {len(unknown)} images not in "
                                     f"{root / 'images'}: {_first(unknown)}")
        pairs = [p for p in pairs if p[0] in wanted]
    return MaskFileDataset(
        [MaskRecord(stem, im, gt, thinobject5k_word(stem)) for stem, im, gt in pairs]
    )


def dis5k_word(name: str) -> str:
    """`<group#>#<Group>#<class#>#<Class>#<name>` -> `<Class>` (`split('#')[3]`).

    Raises:
        DatasetLayoutError: fewer than five '#'-separated fields.
    """
    fields = name.split("#")
    if len(fields) < 5 or not fields[3].strip():
        raise DatasetLayoutError(
            f"DIS5K name {name!r} is not <group#>#<Group>#<class#>#<Class>#<name>"
        )
    return _clean_word(fields[3])


def _class_key(word: str) -> str:
    return " ".join(re.split(r"[\s_\-]+", word.lower())).strip()


def dis5k(
    root: str | Path,
    splits: Sequence[str] = ("DIS-TR",),
    drop_classes: Iterable[str] = DIS5K_DROPPED_CLASSES,
) -> MaskFileDataset:
    """DIS5K in its published layout.

    Args:
        root: folder holding the split folders (`DIS-TR`, `DIS-VD`, `DIS-TE1`..`DIS-TE4`), each
            with `im/` and `gt/`.
        splits: which split folders to read, in order.
        drop_classes: class names (4th field) to leave out, see `DIS5K_DROPPED_CLASSES`.

    Raises:
        DatasetLayoutError: unknown split, missing folders, unpaired files, names off the pattern.
    """
    root = Path(root)
    dropped = {_class_key(c) for c in drop_classes}
    records = []
    for split in splits:
        if split not in DIS5K_SPLITS:
            raise DatasetLayoutError(f"unknown DIS5K split {split!r}; known: {DIS5K_SPLITS}")
        folder = _require_dir(root / split, "DIS5K")
        for stem, im, gt in _pair_by_stem(
            _require_dir(folder / "im", "DIS5K"), _require_dir(folder / "gt", "DIS5K")
        ):
            word = dis5k_word(stem)
            if _class_key(word) not in dropped:
                records.append(MaskRecord(f"{split}/{stem}", im, gt, word))
    return MaskFileDataset(records)


def big_word(name: str) -> str:
    """BIG `<name>` -> its leading alphabetic token, e.g. "aeroplane_2008_000037" -> "aeroplane".

    Raises:
        DatasetLayoutError: the name does not start with a letter.
    """
    match = re.match(r"[A-Za-z]+", name)
    if not match:
        raise DatasetLayoutError(
            f"BIG name {name!r} has no leading alphabetic token; pass word_from_name"
        )
    return match.group(0)


def big(root: str | Path, word_from_name: Callable[[str], str] = big_word) -> MaskFileDataset:
    """BIG: `<name>_im.jpg` and `<name>_gt.png` side by side in `root`.

    Args:
        root: the folder (e.g. BIG's `test/` or `val/`).
        word_from_name: `<name>` -> word; default `big_word`.

    Raises:
        DatasetLayoutError: missing folder, an image without its mask or the reverse.
    """
    root = _require_dir(Path(root), "BIG")
    images = {p.name[: -len("_im.jpg")]: p for p in sorted(root.glob("*_im.jpg"))}
    masks = {p.name[: -len("_gt.png")]: p for p in sorted(root.glob("*_gt.png"))}
    unpaired = images.keys() ^ masks.keys()
    if unpaired:
        raise DatasetLayoutError(f"{len(unpaired)} BIG names in {root} lack their _im.jpg or "
                                 f"_gt.png: {_first(unpaired)}")
    return MaskFileDataset(
        [MaskRecord(n, images[n], masks[n], _clean_word(word_from_name(n))) for n in sorted(images)]
    )


def _read_words(root: Path) -> dict[str, str]:
    json_path, csv_path = root / "words.json", root / "words.csv"
    if json_path.is_file():
        words = json.loads(json_path.read_text())
        if not isinstance(words, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in words.items()
        ):
            raise AnnotationError(f"{json_path} must map names to words (a JSON object of strings)")
        return words
    if csv_path.is_file():
        with csv_path.open(newline="") as handle:
            rows = [row for row in csv.reader(handle) if row]
        if rows and [c.strip().lower() for c in rows[0]] == ["name", "word"]:
            rows = rows[1:]
        bad = [row for row in rows if len(row) != 2]
        if bad:
            raise AnnotationError(f"{csv_path}: rows must be name,word; got {bad[0]}")
        return {name.strip(): word.strip() for name, word in rows}
    raise DatasetLayoutError(f"no words.json or words.csv in {root}")


def folder_dataset(root: str | Path) -> MaskFileDataset:
    """Generic folder: `images/<name>.<ext>`, `masks/<name>.png`, and `words.json`
    (`{"<name>": "<word>"}`) or `words.csv` (rows `name,word`, optional header).

    Raises:
        DatasetLayoutError: missing folders or words file, unpaired files.
        AnnotationError: malformed words file, or an image with no word.
    """
    root = Path(root)
    pairs = _pair_by_stem(
        _require_dir(root / "images", "folder dataset"),
        _require_dir(root / "masks", "folder dataset"),
    )
    words = _read_words(root)
    missing = [stem for stem, _, _ in pairs if not words.get(stem, "").strip()]
    if missing:
        raise AnnotationError(f"{len(missing)} images have no word: {_first(missing)}")
    return MaskFileDataset([MaskRecord(s, im, gt, _clean_word(words[s])) for s, im, gt in pairs])


def write_folder_dataset(dataset: ItemDataset, root: str | Path) -> Path:
    """Write a dataset's items in the generic folder layout that `folder_dataset` reads back.

    Images go to `images/<name>.png` (lossless, so a round trip is exact), masks to
    `masks/<name>.png` as 0/255, words to `words.json`. Names must be unique file stems.

    Returns:
        `root` as a Path.

    Raises:
        DatasetLayoutError: a repeated name or one that is not a plain file stem.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    words: dict[str, str] = {}
    for index in range(len(dataset)):
        item = dataset[index]
        name = item["name"]
        if name in words or not name or Path(name).name != name or name.startswith("."):
            raise DatasetLayoutError(f"item name {name!r} is repeated or not a plain file stem")
        Image.fromarray(item["image"]).save(root / "images" / f"{name}.png")
        Image.fromarray(item["mask"].astype(np.uint8) * 255).save(root / "masks" / f"{name}.png")
        words[name] = item["word"]
    (root / "words.json").write_text(json.dumps(words, indent=1, sort_keys=True))
    return root


def write_published_layout(dataset: ItemDataset, root: str | Path, format: str,
                           split: str | None = None, first_number: int = 0) -> Path:
    """Write items in a benchmark's published layout, which its loader reads back (images as
    JPEG, quality 95, as published; masks as 0/255 PNG). Used to make small stand-ins of
    ThinObject5K, DIS5K and BIG (e.g. from the synthetic generator) for end-to-end runs.

    Args:
        format: "thinobject5k" (`images/<word>_PNG<i>.jpg`, `masks/`, `list/<split>.txt`),
            "dis5k" (`<split>/im/1#Synthetic#<i>#<Word>#<name>.jpg`, `<split>/gt/`) or "big"
            (`<word>_<i>_im.jpg`, `<word>_<i>_gt.png`); "folder" is `write_folder_dataset`.
        split: thinobject5k: the list file to add the items to (default "train"); dis5k: the
            split folder (default "DIS-TR").
        first_number: numbers in the file names start here (keep names of two splits apart).

    Returns:
        `root` as a Path.
    """
    if format == "folder":
        return write_folder_dataset(dataset, root)
    root = Path(root)
    names = []
    for i in range(len(dataset)):
        item, index = dataset[i], first_number + i
        word = item["word"].replace(" ", "_")
        if format == "thinobject5k":
            name = f"{word}_PNG{index}"
            image_path, mask_path = root / "images" / f"{name}.jpg", root / "masks" / f"{name}.png"
        elif format == "dis5k":
            name = f"1#Synthetic#{index}#{word.capitalize()}#{word}_{index:05d}"
            folder = root / (split or "DIS-TR")
            image_path, mask_path = folder / "im" / f"{name}.jpg", folder / "gt" / f"{name}.png"
        elif format == "big":
            name = f"{word}_{index:05d}"
            image_path, mask_path = root / f"{name}_im.jpg", root / f"{name}_gt.png"
        else:
            raise DatasetLayoutError(f"no published layout named {format!r}")
        image_path.parent.mkdir(parents=True, exist_ok=True)
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(item["image"]).save(image_path, quality=95)
        Image.fromarray(item["mask"].astype(np.uint8) * 255).save(mask_path)
        names.append(name)
    if format == "thinobject5k":
        (root / "list").mkdir(parents=True, exist_ok=True)
        list_file = root / "list" / f"{split or 'train'}.txt"
        old = list_file.read_text().splitlines() if list_file.is_file() else []
        list_file.write_text("\n".join(old + [f"{n}.jpg" for n in names]) + "\n")
    return root


BUILTIN_FORMATS = ("folder", "thinobject5k", "dis5k", "big")
# Formats other installed packages add: an entry point NAME = "module:factory" in this group;
# factory(root, images_root=..., split=...) returns an ItemDataset. The ML backend adds its
# Label Studio export format ("labelstudio") this way.
FORMAT_ENTRY_POINTS = "talk2sam.datasets"


def _plugin_formats() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=FORMAT_ENTRY_POINTS)}


FORMATS = BUILTIN_FORMATS + tuple(sorted(set(_plugin_formats()) - set(BUILTIN_FORMATS)))


def open_dataset(root: str | Path, format: str, split: str | None = None,
                 images_root: str | Path | None = None) -> ItemDataset:
    """A dataset by its published layout name (the commands' `--format`).

    Args:
        root: the dataset folder (or, for a format of another package, what it reads).
        format: one of FORMATS.
        split: thinobject5k: the list file `list/<split>.txt`; dis5k: split folders,
            comma-separated (default DIS-TR); passed on to other packages' formats.
        images_root: for formats that name images by reference (e.g. labelstudio): the folder
            holding them.

    Raises:
        DatasetLayoutError: unknown format, or the layout's own errors.
    """
    root = Path(root)
    if format == "folder":
        return folder_dataset(root)
    if format == "thinobject5k":
        return thinobject5k(root, split)
    if format == "dis5k":
        return dis5k(root, tuple(split.split(",")) if split else ("DIS-TR",))
    if format == "big":
        return big(root)
    plugin = _plugin_formats().get(format)
    if plugin is not None:
        try:
            return _PluginDataset(plugin.load()(root, images_root=images_root, split=split))
        except ValueError as exc:  # the contract: a plugin reports bad data as ValueError
            raise AnnotationError(f"{format}: {exc}") from exc
    raise DatasetLayoutError(f"unknown dataset format {format!r}; choose one of {FORMATS}")


class _PluginDataset:
    """Another package's dataset, its ValueErrors reported as this package's AnnotationError."""

    def __init__(self, dataset: ItemDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Item:
        try:
            return self.dataset[index]
        except AnnotationError:
            raise
        except ValueError as exc:
            raise AnnotationError(str(exc)) from exc


class Subset:
    """The items of `dataset` at `indices`, in that order."""

    def __init__(self, dataset: ItemDataset, indices: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Item:
        return self.dataset[self.indices[index]]
