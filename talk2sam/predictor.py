"""The predictor: per-image state computed once, then many (box, word) prompts answered cheaply.

Like SAM's `SamPredictor`: `set_image` runs the SAM-HQ and DINOv2 encoders once; `predict` runs the
text branch (cached per word), the map and one decoder call for all boxes. Not thread-safe: one
predictor per worker process."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import numpy as np
import torch

from talk2sam import geometry, prompts, sam_hq
from talk2sam.bounded_cache import BoundedCache
from talk2sam.errors import ImageNotSetError, InvalidPromptError, UnusableImageError
from talk2sam.find import DEFAULT_MAX_REGIONS, DEFAULT_THRESHOLD, candidate_boxes, distinct
from talk2sam.heads import SWITCHING, Head, current_head
from talk2sam.model import DecoderOutput, ImageFeatures, Talk2Sam
from talk2sam.prediction import Prediction

MAX_PIXELS_DEFAULT = 100_000_000
UPSCALE_CHUNK_PIXELS = 1 << 24  # mask pixels upscaled at once (16 M: 128 MiB of float32 logits)


def normalize_image(image: np.ndarray, max_pixels: int = MAX_PIXELS_DEFAULT) -> np.ndarray:
    """Bring an image to (H, W, 3) uint8 RGB, deliberately: grayscale is repeated to 3 channels,
    RGBA drops alpha (no compositing: Label Studio shows the RGB), 16-bit and float [0, 1] images
    are rescaled to 8 bits. Anything else raises UnusableImageError."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4) or min(img.shape[:2]) < 1:
        raise UnusableImageError(f"expected an (H, W), (H, W, 3) or (H, W, 4) image, "
                                f"got shape {img.shape}")
    if img.shape[0] * img.shape[1] > max_pixels:
        raise UnusableImageError(f"image of {img.shape[1]}x{img.shape[0]} pixels exceeds the "
                                f"limit of {max_pixels:,} pixels")
    if img.dtype == np.uint16:
        img = (img.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    elif img.dtype in (np.float32, np.float64):
        if not np.all(np.isfinite(img)) or img.min() < 0 or img.max() > 1:
            raise UnusableImageError("float images must be finite and in [0, 1]")
        img = (img * 255.0 + 0.5).astype(np.uint8)
    elif img.dtype == np.bool_:
        img = img.astype(np.uint8) * 255
    elif img.dtype != np.uint8:
        raise UnusableImageError(f"unsupported image dtype {img.dtype}")
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return np.array(img[..., :3], dtype=np.uint8, order="C", copy=True)


def default_encoder_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the hardware computes it natively (CUDA; CPUs with AVX-512 BF16 or AMX,
    as oneDNN reports them), else float32. On such a CPU bfloat16 encoders halved set_image for
    vit_tiny-dinob, and the demo's masks agreed with float32 ones at a median IoU of 0.998
    (docs/PERFORMANCE.md)."""
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        try:
            if torch.ops.mkldnn._is_mkldnn_bf16_supported():
                return torch.bfloat16
        except (AttributeError, RuntimeError):  # an older or a stripped build: stay safe
            pass
    return torch.float32


class Talk2SamPredictor:
    """Args:
        model: a built Talk2Sam (or box-only SAM-HQ), on its device.
        max_pixels: larger images raise UnusableImageError.
        overlap_encoders: on CUDA, run DINOv2 in a side stream beside SAM-HQ's encoder
            (see `Talk2Sam.encode_image`); off by default until measured on a GPU with
            `scripts/benchmark.py`. No effect on CPU.
        encoder_dtype: autocast dtype of the two image encoders; None: `default_encoder_dtype`
            (bfloat16 on CUDA and on CPUs with native bfloat16, else float32). Everything after them (similarity map, prompt encoder, decoder)
            runs in float32, as training and evaluation run it: features are cast to float32
            when they leave the encoders.
        channels_last: keep SAM-HQ's convolutions in NHWC (`Talk2Sam.use_channels_last`);
            None: on the CPU only, where it was measured to help.
        cache: keep the features of several images, by the `key` given to `set_image` (a
            worker serving many tasks); None keeps only the current image's.
    """

    def __init__(self, model: Talk2Sam, max_pixels: int = MAX_PIXELS_DEFAULT,
                 overlap_encoders: bool = False, encoder_dtype: torch.dtype | None = None,
                 channels_last: bool | None = None, cache: BoundedCache | None = None):
        self.model = model.eval()
        self.max_pixels = max_pixels
        self.overlap_encoders = overlap_encoders
        self.encoder_dtype = encoder_dtype
        if channels_last or (channels_last is None and self.device.type == "cpu"):
            model.use_channels_last()
        self.features: ImageFeatures | None = None
        self.cache = cache
        # the HQ decoder's per-image features of the current image, beside the embedding they
        # came from: a second box on the same image skips a third of a CPU decode
        self._hq: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def model_version(self) -> str:
        return self.model.version

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _encoder_autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.encoder_dtype or default_encoder_dtype(self.device)
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    @torch.inference_mode()
    def set_image(self, image: np.ndarray | Callable[[], np.ndarray], key: str | None = None,
                  warm: bool = False) -> bool:
        """Compute everything that depends only on the image.

        Args:
            image: (H, W[, C]) array, or a function returning it, called only when the
                features of ``key`` are not cached (a worker skips the download then).
            key: the image's name in the cache; None: not cached.
            warm: a warm-up put (see `BoundedCache`: it never evicts images in use).
        Returns:
            Whether the features came from the cache.
        """
        if key is not None and self.cache is not None:
            cached = self.cache.get(key, warm=warm)
            if cached is not None:
                self.features = cached
                return True
        rgb = normalize_image(image() if callable(image) else image, self.max_pixels)
        with self._encoder_autocast():
            feats = self.model.encode_image(torch.from_numpy(rgb), overlap=self.overlap_encoders)
        self.features = feats.to(self.device, dtype=torch.float32)
        if key is not None and self.cache is not None:
            self.cache.put(key, self.features, self.features.nbytes(), warm=warm)
        return False

    def cached_keys(self) -> list[str]:
        """Keys of the images whose features are cached, least recently used first."""
        return [] if self.cache is None else self.cache.keys()

    def set_features(self, features: ImageFeatures) -> None:
        """Reuse features computed earlier (by another predictor on the same SAM-HQ module)."""
        self.features = features.to(self.device, dtype=torch.float32)

    def reset_image(self) -> None:
        self.features = None
        self._hq = None

    def head(self) -> Head:
        """A copy of the trained parts in use (see `talk2sam.heads`)."""
        return current_head(self.model)

    @torch.inference_mode()
    def use_head(self, head: Head) -> None:
        """Answer with ``head``'s trained parts from now on, on the same encoders and cached
        image features (a copy into the model's own tensors: no allocation)."""
        self.model.version = SWITCHING  # a copy cut short is never taken for either head
        self._hq = None  # made by the decoder being replaced
        own = self.model.state_dict()
        for key, value in head.state.items():
            own[key].copy_(value)
        self.model.version = head.version
        self.model.text_trained = head.text_trained

    def _hq_features(self, feats: ImageFeatures) -> torch.Tensor:
        if self._hq is None or self._hq[0] is not feats.sam_embedding:
            self._hq = (feats.sam_embedding, sam_hq.hq_features(
                self.model.sam, feats.sam_embedding, feats.sam_interm))
        return self._hq[1]

    @torch.inference_mode()
    def predict(self, boxes_xyxy: np.ndarray | Sequence[Sequence[float]],
                words: Sequence[str] | str | None = None,
                box_margin_px: float | None = None, return_logits: bool = False,
                clicks: Sequence[Sequence[tuple[float, float, bool]]] | None = None
                ) -> Prediction:
        """Segment N prompts of the current image: boxes, with their word and clicks.

        Args:
            boxes_xyxy: (N, 4) or (4,) XYXY float pixels in the original frame; boxes partly
                outside are clipped, boxes wholly outside, empty or NaN raise. A row of NaN is
                a prompt without a box: its clicks alone (SAM's point prompt).
            words: N words (or one word for all boxes); None runs box-only SAM-HQ.
            box_margin_px: if given, mask pixels farther than this outside their box are
                dropped (an annotator's box says where the object is); None keeps SAM's mask.
            return_logits: also return SAM's low-res logits (copied off the device).
            clicks: N lists of (x, y, positive) original-frame pixels refining each prompt
                (SAM's positive and negative points); None: no clicks.
        Raises:
            ImageNotSetError, InvalidPromptError.
        """
        if self.features is None:
            raise ImageNotSetError("call set_image(image) before predict(...)")
        feats = self.features
        raw = np.asarray(boxes_xyxy, dtype=np.float64)
        raw = raw[None] if raw.ndim == 1 else raw
        if raw.ndim != 2 or raw.shape[1] != 4 or len(raw) == 0:
            raise InvalidPromptError(f"boxes must have shape (N, 4) XYXY, got {raw.shape}")
        boxed = ~np.isnan(raw).all(axis=1)
        points = prompts.check_clicks(clicks, len(raw), feats.height, feats.width)
        if points is not None and not (points[1] >= 0).any(axis=1)[~boxed].all():
            raise InvalidPromptError("a prompt without a box needs at least one click")
        if points is None and not boxed.all():
            raise InvalidPromptError("a prompt without a box needs clicks")
        boxes = raw.copy()
        if boxed.any():
            boxes[boxed] = prompts.check_boxes(raw[boxed], feats.height, feats.width)
        if isinstance(words, str):
            words = [words] * len(boxes)
        if words is not None:
            words = list(words)
            if len(words) != len(boxes):
                raise InvalidPromptError(f"{len(boxes)} boxes but {len(words)} words")
            if not self.model.uses_text:
                words = None  # box-only model: the word cannot steer it
        out = self._decode(feats, boxes, boxed, words, points)
        # upscaled a few rows at a time: N full-size float masks at once would need
        # N x H x W x 8 bytes (1 MP x 256 boxes: 2 GiB), the bool masks kept need an eighth
        rows = max(1, UPSCALE_CHUNK_PIXELS // (feats.height * feats.width))
        masks = np.concatenate([
            (self.model.upscale(out.low_res_logits[i:i + rows], feats) > 0).cpu().numpy()
            for i in range(0, len(boxes), rows)])

        def numpy(t: torch.Tensor | None) -> np.ndarray | None:
            return None if t is None else t.float().cpu().numpy()

        if box_margin_px is not None and boxed.any():
            masks[boxed] &= geometry.box_masks(boxes[boxed], feats.height, feats.width,
                                               box_margin_px)
        return Prediction(
            masks=masks,
            logits=numpy(out.low_res_logits[:, 0]) if return_logits else None,
            scores=numpy(out.iou.clamp(0.0, 1.0)),  # the IoU head is unbounded; IoU is not
            text_scores=numpy(out.text_scores),
            sim_maps=numpy(out.sim_maps),
        )

    @torch.inference_mode()
    def find(self, word: str, threshold: float = DEFAULT_THRESHOLD,
             max_regions: int = DEFAULT_MAX_REGIONS,
             box_margin_px: float = 0.0) -> Prediction:
        """Segment every instance of ``word`` in the current image, without a box: candidate
        regions of the word's similarity map (`talk2sam.find`), one box each, each box with
        the word through the decoder; empty masks and masks repeating a better one dropped.

        Args:
            word: the text prompt.
            threshold: share of the map's range a patch must reach to be part of a region.
            max_regions: at most this many regions (the strongest first).
            box_margin_px: mask pixels farther than this outside their box are dropped,
                as in `predict` (a mask spilling over other regions would repeat them).
        Returns:
            A Prediction whose rows are the regions found (possibly none), best score first,
            with ``boxes_xyxy`` the boxes placed.
        Raises:
            ImageNotSetError, InvalidPromptError (a model without a text branch).
        """
        if self.features is None:
            raise ImageNotSetError("call set_image(image) before find(...)")
        if not self.model.uses_text:
            raise InvalidPromptError("finding by text alone needs a model with a text branch")
        feats = self.features
        sim = self.model.word_maps(feats, [word], scaling="raw")
        boxes, _ = candidate_boxes(sim[0].float().cpu().numpy(), feats.height, feats.width,
                                        threshold, max_regions)
        if not len(boxes):
            empty = np.zeros((0,), np.float32)
            return Prediction(masks=np.zeros((0, feats.height, feats.width), bool), logits=None,
                              scores=empty, text_scores=empty, sim_maps=None,
                              boxes_xyxy=np.zeros((0, 4)))
        out = self.predict(boxes, word, box_margin_px=box_margin_px)
        keep = distinct(out.masks, out.scores)
        return Prediction(masks=out.masks[keep], logits=None, scores=out.scores[keep],
                          text_scores=out.text_scores[keep], sim_maps=out.sim_maps[keep],
                          boxes_xyxy=boxes[keep])

    def _decode(self, feats: ImageFeatures, boxes: np.ndarray, boxed: np.ndarray,
                words: list[str] | None, points: tuple[np.ndarray, np.ndarray] | None
                ) -> DecoderOutput:
        """One decoder call for the prompts with a box and one for those without (SAM's
        prompt encoder takes boxes for all rows of a call or for none), in the rows' order."""
        parts, order = [], []
        for rows in (np.flatnonzero(boxed), np.flatnonzero(~boxed)):
            if not len(rows):
                continue
            part_points = None
            if points is not None:  # padded to the most clicks of these rows only
                most = int((points[1][rows] >= 0).sum(axis=1).max())
                part_points = None if most == 0 else (
                    torch.from_numpy(points[0][rows, :most]).float(),
                    torch.from_numpy(points[1][rows, :most]))
            parts.append(self.model.decode(
                feats, torch.from_numpy(boxes[rows]).float() if boxed[rows[0]] else None,
                None if words is None else [words[i] for i in rows],
                hq=self._hq_features(feats), points=part_points))
            order.extend(rows.tolist())
        if len(parts) == 1:
            return parts[0]
        back = torch.from_numpy(np.argsort(order))

        def joined(name: str) -> torch.Tensor | None:
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else torch.cat(values)[back]

        return DecoderOutput(joined("low_res_logits"), joined("iou"), joined("sim_maps"),
                             joined("text_scores"))


def build_predictor(config: str = "tiny", weights_dir: str | None = None,
                    checkpoint: str | None = None, device: str | None = None,
                    use_text: bool = True, random_init: bool = False,
                    encoder_dtype: torch.dtype | None = None,
                    cache: BoundedCache | None = None) -> Talk2SamPredictor:
    """The one entry point for serving: build (or load a checkpoint), move to the device.
    device None -> CUDA when available, else CPU; encoder_dtype: see Talk2SamPredictor."""
    from talk2sam.build import build_model, default_device, load_checkpoint

    if checkpoint:
        model = load_checkpoint(checkpoint, weights_dir)
    else:
        model = build_model(config, weights_dir, use_text=use_text, random_init=random_init)
    device = default_device(device)
    return Talk2SamPredictor(model.to(device), encoder_dtype=encoder_dtype, cache=cache)
