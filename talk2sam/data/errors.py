"""Typed errors of the data package (datasets, synthetic generator)."""

from __future__ import annotations

from talk2sam.errors import Talk2SamError


class DatasetError(Talk2SamError, ValueError):
    """Base class of the data package's expected failures."""


class DatasetLayoutError(DatasetError):
    """A dataset folder does not have the expected layout (missing folder, unpaired file)."""


class ImageFormatError(DatasetError):
    """An image or mask has a mode, dtype or shape we do not convert, or sizes disagree."""


class AnnotationError(DatasetError):
    """An annotation file (a words file) is malformed or cannot be paired with its image."""


class EmptyMaskError(DatasetError):
    """A ground-truth mask has no foreground pixel, so it has no box and no object to prompt."""
