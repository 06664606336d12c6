"""Data: benchmark loaders, dataset formats of other packages and synthetic thin structures, as
`Item` dicts."""

from talk2sam.data.datasets import (
    DIS5K_DROPPED_CLASSES,
    MaskFileDataset,
    MaskRecord,
    big,
    dis5k,
    folder_dataset,
    thinobject5k,
    write_folder_dataset,
)
from talk2sam.errors import (
    AnnotationError,
    DatasetError,
    DatasetLayoutError,
    EmptyMaskError,
    ImageFormatError,
)
from talk2sam.data.items import Item, ItemDataset, load_mask, load_rgb, mask_box_xyxy, to_rgb_uint8
from talk2sam.data.synthetic import (
    CLASS_WORDS,
    SyntheticSample,
    SyntheticThinDataset,
    generate_sample,
    save_preview_grid,
)

__all__ = [
    "CLASS_WORDS",
    "DIS5K_DROPPED_CLASSES",
    "AnnotationError",
    "DatasetError",
    "DatasetLayoutError",
    "EmptyMaskError",
    "ImageFormatError",
    "Item",
    "ItemDataset",
    "MaskFileDataset",
    "MaskRecord",
    "SyntheticSample",
    "SyntheticThinDataset",
    "big",
    "dis5k",
    "folder_dataset",
    "generate_sample",
    "load_mask",
    "load_rgb",
    "mask_box_xyxy",
    "save_preview_grid",
    "thinobject5k",
    "to_rgb_uint8",
    "write_folder_dataset",
]
