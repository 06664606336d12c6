"""Typed errors of the talk2sam package. Every error the package raises on purpose derives from
`Talk2SamError`, so callers (the backend's job boundary, the CLI) can tell them from bugs."""

from __future__ import annotations


class Talk2SamError(Exception):
    """Base class of the package's expected failures."""


class ConfigError(Talk2SamError, ValueError):
    """Unknown model configuration name or an invalid combination of settings."""


class DiskSpaceError(Talk2SamError, OSError):
    """Not enough free disk for what a command would write (e.g. the feature cache)."""


class WeightsError(Talk2SamError):
    """A weight file is missing, truncated, corrupt or of the wrong architecture."""


class WeightsMissingError(WeightsError, FileNotFoundError):
    def __init__(self, name: str, path: str, size_bytes: int | None, source: str):
        size = f"{size_bytes:,} bytes" if size_bytes else "size unknown"
        super().__init__(
            f"weight file {name!r} not found at {path} (expected {size}); get it from {source}, "
            f"or run `talk2sam download-weights --only {name}` on a machine with internet"
        )
        self.name, self.path = name, path


class WeightsMismatchError(WeightsError):
    """The file loaded but its keys or shapes do not match the architecture (nothing is loaded)."""

    def __init__(self, path: str, missing: list[str], unexpected: list[str], detail: str = ""):
        def head(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" ... (+{len(keys) - 5})" if len(keys) > 5 else "")

        parts = [f"weights in {path} do not match the architecture"]
        if missing:
            parts.append(f"{len(missing)} missing keys: {head(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {head(unexpected)}")
        if detail:
            parts.append(detail)
        super().__init__("; ".join(parts))
        self.path, self.missing, self.unexpected = path, missing, unexpected


class UnusableImageError(Talk2SamError, ValueError):
    """The image cannot be used (wrong shape, dtype, empty, too large)."""


class InvalidPromptError(Talk2SamError, ValueError):
    """A box or word prompt cannot be used (outside the image, zero area, NaN, empty word)."""


class ImageNotSetError(Talk2SamError, RuntimeError):
    """`predict` was called before `set_image`."""


# ---------------------------------------------------------------- datasets


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
