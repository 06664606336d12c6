"""Registry of every weight file the method uses, the weights directory, and a resumable,
checksum-verified downloader for users with internet access.

A file is judged by what it holds, not by its bytes: a registered size that differs (a copy
re-saved by another torch, a float16 copy, an older release of the same weights) is a warning
naming both sizes; loading it strictly (every key, every shape) decides. Users point at their own
copies with MODEL_WEIGHT_FILES (``name=path`` pairs, comma-separated: a path may hold ``=`` but
not ``,``), or put them in the weights directory under the registered names."""

from __future__ import annotations

import hashlib
import os
import urllib.request
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from talk2sam.errors import WeightsError, WeightsMissingError

log = logging.getLogger(__name__)

# the backend's name for it too (Label Studio's ML backends call it MODEL_DIR); the older
# TALK2SAM_WEIGHTS_DIR is read when MODEL_DIR is unset
WEIGHTS_DIR_ENV = "MODEL_DIR"
OLD_WEIGHTS_DIR_ENV = "TALK2SAM_WEIGHTS_DIR"
OWN_FILES_ENV = "MODEL_WEIGHT_FILES"  # name=path,name=path: a user's own copies, by path
DEFAULT_WEIGHTS_DIR = Path.home() / ".cache" / "talk2sam" / "weights"

# tiny Talk2SAM trained on synthetic images only (scripts/learning_check.py): lets the project run
# offline out of the box; real weights replace it wherever they are present
DEMO_CHECKPOINT = Path(__file__).parent / "assets" / "demo_tiny_synthetic.pt"

_HQ = "https://huggingface.co/lkeab/hq-sam/resolve/main/"
_DINO = "https://dl.fbaipublicfiles.com/dinov2/"


@dataclass(frozen=True)
class WeightFile:
    name: str
    what: str
    size_bytes: int | None  # exact size where verified, else None
    sha256: str | None
    url: str | None  # direct download; None where users fetch it by hand
    source: str  # where users get it, in words


WEIGHT_FILES: dict[str, WeightFile] = {w.name: w for w in [
    WeightFile("sam_hq_vit_b.pth", "SAM-HQ ViT-B", 379_335_069, None, _HQ + "sam_hq_vit_b.pth",
               "Hugging Face lkeab/hq-sam"),
    WeightFile("sam_hq_vit_l.pth", "SAM-HQ ViT-L", 1_254_865_805, None, _HQ + "sam_hq_vit_l.pth",
               "Hugging Face lkeab/hq-sam"),
    WeightFile("sam_hq_vit_h.pth", "SAM-HQ ViT-H", 2_570_940_653, None, _HQ + "sam_hq_vit_h.pth",
               "Hugging Face lkeab/hq-sam"),
    WeightFile("sam_hq_vit_tiny.pth", "Light HQ-SAM (TinyViT)", 42_526_881, None,
               _HQ + "sam_hq_vit_tiny.pth", "Hugging Face lkeab/hq-sam"),
    WeightFile("vitl_mlp_infonce.pth", "Talk2DINO psi for DINOv2 ViT-L (~6.3 MB)", None, None,
               None, "Hugging Face lorebianchi98/Talk2DINO-ViTL (Talk2DINO's ViT-L projection)"),
    WeightFile("vitb_mlp_infonce.pth", "Talk2DINO psi for DINOv2 ViT-B", 3_940_664, None,
               "https://github.com/lorebianchi98/Talk2DINO/raw/main/weights/vitb_mlp_infonce.pth",
               "the Talk2DINO repository, weights/ (or Hugging Face lorebianchi98/Talk2DINO-ViTB)"),
    WeightFile("dinov2_vitl14_reg4_pretrain.pth", "DINOv2 ViT-L/14 with registers (~1.2 GB)",
               None, None, _DINO + "dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth",
               "the official DINOv2 release (facebookresearch/dinov2)"),
    WeightFile("dinov2_vitb14_reg4_pretrain.pth", "DINOv2 ViT-B/14 with registers", None, None,
               _DINO + "dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth",
               "the official DINOv2 release (facebookresearch/dinov2)"),
    WeightFile("ViT-B-16.pt", "CLIP ViT-B/16, OpenAI (~335 MiB)", None,
               "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
               "https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9"
               "fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
               "OpenAI's CLIP release (open_clip ViT-B-16-quickgelu / openai)"),
]}


def weights_dir(explicit: str | os.PathLike | None = None,
                env: dict[str, str] | None = None) -> Path:
    """The weights directory: the argument, else $MODEL_DIR (or the older
    $TALK2SAM_WEIGHTS_DIR), else ~/.cache/talk2sam/weights."""
    if explicit:
        return Path(explicit)
    env = os.environ if env is None else env
    named = env.get(WEIGHTS_DIR_ENV) or env.get(OLD_WEIGHTS_DIR_ENV)
    return Path(named) if named else DEFAULT_WEIGHTS_DIR


def own_files(env: Mapping[str, str] | None = None) -> dict[str, Path]:
    """The user's own copies of registered files (MODEL_WEIGHT_FILES), by registered name.

    Raises:
        WeightsError: an entry that is not ``name=path``.
    """
    env = os.environ if env is None else env
    files = {}
    for entry in filter(None, (e.strip() for e in env.get(OWN_FILES_ENV, "").split(","))):
        name, sep, path = entry.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise WeightsError(f"{OWN_FILES_ENV} entry {entry!r} is not name=path, e.g. "
                               f"sam_hq_vit_b.pth=/data/weights/my_sam_hq_b.pth")
        files[name.strip()] = Path(path.strip()).expanduser()
    unknown = sorted(set(files) - set(WEIGHT_FILES))
    if unknown:  # a config of one's own may name other files; a typo is said here
        log.warning("%s names %s, which no built-in config uses (known: %s)", OWN_FILES_ENV,
                    ", ".join(unknown), ", ".join(sorted(WEIGHT_FILES)))
    return files


def locate(name: str, directory: str | os.PathLike | None = None) -> Path:
    """Where the file ``name`` is looked for: the user's own copy, else the weights directory."""
    return own_files().get(name) or weights_dir(directory) / name


def resolve(name: str, directory: str | os.PathLike | None = None) -> Path:
    """Path of a registered weight file, checked for presence; a size that differs from the
    registered one is logged with both numbers (loading strictly decides).

    Raises:
        WeightsMissingError: the file is absent (message names it, its size and its source).
    """
    entry = WEIGHT_FILES.get(name) or WeightFile(name, name, None, None, None, "your own files")
    path = locate(name, directory)
    if not path.is_file():
        raise WeightsMissingError(name, str(path), entry.size_bytes, entry.source)
    if (note := size_note(name, path)) is not None:
        log.warning("%s", note)
    return path


def size_note(name: str, path: Path) -> str | None:
    """What to say of a file whose size differs from the registered one, or None."""
    entry = WEIGHT_FILES.get(name)
    size = path.stat().st_size
    if entry is None or entry.size_bytes is None or size == entry.size_bytes:
        return None
    return (f"{path} has {size:,} bytes, the official {name} {entry.size_bytes:,}: a re-saved, "
            f"float16 or older copy loads if it holds the official keys and shapes; a truncated "
            f"one does not (then download it again from {entry.source})")


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def download(name: str, directory: str | os.PathLike | None = None,
             progress: Callable[[int, int | None], None] | None = None,
             opener: Callable[[urllib.request.Request], object] = urllib.request.urlopen) -> Path:
    """Download one registered file, resuming a partial `.part` file, then verify size/sha256
    and move it into place atomically. `progress(done_bytes, total_bytes)` is called per chunk."""
    entry = WEIGHT_FILES[name]
    if entry.url is None:
        raise WeightsError(f"{name} has no direct download address; get it from {entry.source} "
                           f"and put it in {weights_dir(directory)}")
    target = weights_dir(directory) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    done = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(entry.url, headers={"Range": f"bytes={done}-"} if done else {})
    with opener(request) as response:  # type: ignore[attr-defined]
        if done and getattr(response, "status", 206) != 206:
            done = 0  # the server ignored the range: start over
        length = response.headers.get("Content-Length")
        total = done + int(length) if length else entry.size_bytes
        with open(part, "ab" if done else "wb") as out:
            while block := response.read(1 << 20):
                out.write(block)
                done += len(block)
                if progress:
                    progress(done, total)
    if entry.size_bytes is not None and part.stat().st_size != entry.size_bytes:
        raise WeightsError(f"downloaded {part.stat().st_size:,} bytes of {name}, expected "
                           f"{entry.size_bytes:,}; run the command again to resume")
    if entry.sha256 is not None and sha256_of(part) != entry.sha256:
        part.unlink()
        raise WeightsError(f"checksum of {name} does not match {entry.sha256}; deleted, retry")
    os.replace(part, target)
    return target
