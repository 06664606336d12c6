"""Talk2SAM: the stages composed (constructor injection, as SAM's `Sam` composes its parts).

`encode_image` runs everything that depends only on the image (SAM-HQ encoder, DINOv2); `decode`
runs what depends on the prompts (text, psi, map, mask-prompt encoder, decoder) for N boxes of one
image in one decoder call. With no text branch the same object is the box-only SAM-HQ baseline."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import TypeVar

import torch
from torch import nn

from talk2sam import geometry, sam_hq
from talk2sam.configs import ModelConfig
from talk2sam.projection import Projection
from talk2sam.similarity import similarity_map, text_image_score
from talk2sam.text import TextEncoder
from talk2sam.vision import DinoEncoder, DinoFeatures

T = TypeVar("T")


@dataclass
class ImageFeatures:
    """Everything per image, computed once.

    sam_embedding: (1, C, S/16, S/16); sam_interm: (1, S/16, S/16, Cv) early ViT features;
    dino_patches: (gh, gw, D) or None; dino_cls_attn: (heads, gh, gw) or None;
    height, width: original image size.
    """

    sam_embedding: torch.Tensor
    sam_interm: torch.Tensor
    dino_patches: torch.Tensor | None
    dino_cls_attn: torch.Tensor | None
    height: int
    width: int

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ImageFeatures:
        """Moved to `device`; with `dtype`, floating tensors are cast to it too."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for key, value in moved.items():
            if isinstance(value, torch.Tensor):
                cast = dtype if dtype is not None and value.is_floating_point() else None
                moved[key] = value.to(device, dtype=cast)
        return ImageFeatures(**moved)

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in vars(self).values()
                   if isinstance(v, torch.Tensor))


@dataclass
class DecoderOutput:
    """low_res_logits: (N, 1, S/4, S/4) in SAM's padded mask frame; iou: (N,) predicted IoU;
    sim_maps: (N, gh, gw) DINOv2 frame or None; text_scores: (N,) eq. 4 score or None."""

    low_res_logits: torch.Tensor
    iou: torch.Tensor
    sim_maps: torch.Tensor | None
    text_scores: torch.Tensor | None


class Talk2Sam(nn.Module):
    def __init__(self, cfg: ModelConfig, sam: nn.Module, dino: DinoEncoder | None = None,
                 text: TextEncoder | None = None, psi: Projection | None = None):
        super().__init__()
        if (dino is None) != (text is None) or (text is None) != (psi is None):
            raise ValueError("the text branch needs DINOv2, the text encoder and psi together")
        self.cfg = cfg
        self.sam = sam
        self.dino = dino
        self.text = text
        self.psi = psi
        # residual dense mode: the encoded map reaches the decoder through this 1x1 conv, which
        # starts at zero so that an untrained text branch leaves box-only SAM-HQ unchanged
        self.map_gate: nn.Conv2d | None = None
        if text is not None and cfg.dense_mode == "residual":
            self.map_gate = nn.Conv2d(cfg.sam.prompt_dim, cfg.sam.prompt_dim, kernel_size=1)
            nn.init.zeros_(self.map_gate.weight)
            nn.init.zeros_(self.map_gate.bias)
        self.version = f"{cfg.name}-unversioned"  # set by build.py from the weights it loaded
        # whether psi, the mask-prompt encoder and the gate were trained (a Talk2SAM checkpoint);
        # False for a model built from the public weights alone
        self.text_trained = False
        self.channels_last = False  # see use_channels_last

    def use_channels_last(self) -> None:
        """Keep SAM-HQ's convolutions and their inputs channels-last (NHWC). On the CPU that
        made Light HQ-SAM's TinyViT encoder 1.7x and a warm decode 1.3x faster, with the same
        masks (docs/PERFORMANCE.md); the parameters' values do not change."""
        self.sam.to(memory_format=torch.channels_last)
        self.channels_last = True

    @property
    def uses_text(self) -> bool:
        return self.text is not None

    @property
    def device(self) -> torch.device:
        return self.sam.pixel_mean.device

    @property
    def long_side(self) -> int:
        return self.cfg.sam.image_size

    def encode_image(self, rgb: torch.Tensor, overlap: bool = False) -> ImageFeatures:
        """rgb: (H, W, 3) uint8 tensor, original frame -> ImageFeatures.

        overlap: on CUDA, run DINOv2 in a side stream while SAM-HQ's encoder runs in the current
        one (the two encoders are independent). Ignored elsewhere: on CPU both already use all
        cores, and DINOv2 in a second thread gave no clear gain (docs/PERFORMANCE.md)."""
        height, width = rgb.shape[:2]
        x = rgb.to(self.device).permute(2, 0, 1)[None].float()

        def encode_sam() -> tuple[torch.Tensor, torch.Tensor]:
            canvas = sam_hq.preprocess(self.sam, rgb, self.long_side)
            if self.channels_last:
                canvas = canvas.contiguous(memory_format=torch.channels_last)
            return sam_hq.encode_image(self.sam, canvas)

        if self.dino is None:
            embedding, interm = encode_sam()
            return ImageFeatures(embedding, interm, None, None, height, width)
        dino_enc = self.dino

        def encode_dino() -> DinoFeatures:
            return dino_enc(dino_enc.preprocess(x / 255.0))

        if overlap and x.is_cuda:
            (embedding, interm), dino = _overlap_cuda(encode_sam, encode_dino)
        else:
            embedding, interm = encode_sam()
            dino = encode_dino()
        return ImageFeatures(embedding, interm, dino.patches[0], dino.cls_attn[0], height, width)

    def project_words(self, words: Sequence[str]) -> torch.Tensor:
        """Words -> psi(t), (N, D) not normalised."""
        if self.text is None or self.psi is None:
            raise ValueError("this model has no text branch (box-only SAM-HQ)")
        return self.psi(self.text(words))

    def word_maps(self, feats: ImageFeatures, words: Sequence[str], scaling: str | None = None
                  ) -> torch.Tensor:
        """(N, gh, gw) similarity maps of ``words`` over the image, as `decode` makes them
        (the config's scaling unless ``scaling`` is given)."""
        return self._maps(feats, self.project_words(words), scaling or self.cfg.map_scaling)

    def _maps(self, feats: ImageFeatures, psi_t: torch.Tensor, scaling: str) -> torch.Tensor:
        return similarity_map(feats.dino_patches, feats.dino_cls_attn, psi_t,
                              self.cfg.map_variant, scaling, self.cfg.background_weight)

    def decode(self, feats: ImageFeatures, boxes_xyxy: torch.Tensor | None,
               words: Sequence[str] | None, output: str = "sam+hq",
               hq: torch.Tensor | None = None,
               points: tuple[torch.Tensor, torch.Tensor] | None = None) -> DecoderOutput:
        """N boxes (N, 4) XYXY original-frame pixels (already validated; None: clicks alone)
        and N words (or None for box only) of one image -> DecoderOutput. `output` picks the
        decoder's logits, `hq` passes this image's `sam_hq.hq_features` computed earlier,
        `points` N rows of clicks: original-frame pixels (N, P, 2) and labels (N, P), 1
        positive, 0 negative, -1 padding (see `sam_hq.decode`)."""
        scale = torch.tensor(geometry.canvas_scale(feats.height, feats.width, self.long_side),
                             device=self.device)
        boxes_canvas = None if boxes_xyxy is None else boxes_xyxy.to(self.device).float() * scale
        if points is not None:
            points = (points[0].to(self.device).float() * scale[:2],
                      points[1].to(self.device))
        mask_prompt = sim = scores = None
        if words is not None and self.uses_text:
            count = len(boxes_xyxy) if boxes_xyxy is not None else len(points[1])
            if len(words) != count:
                raise ValueError(f"{count} prompts but {len(words)} words")
            psi_t = self.project_words(words)
            sim = self._maps(feats, psi_t, self.cfg.map_scaling)
            scores = text_image_score(feats.dino_patches, feats.dino_cls_attn, psi_t)
            mask_prompt = geometry.map_to_mask_frame(sim, feats.height, feats.width,
                                                     self.long_side)
        logits, iou = sam_hq.decode(self.sam, feats.sam_embedding, feats.sam_interm, boxes_canvas,
                                    mask_prompt, output, self.map_gate, hq, points)
        return DecoderOutput(logits, iou, sim, scores)

    def upscale(self, logits: torch.Tensor, feats: ImageFeatures) -> torch.Tensor:
        """(N, 1, S/4, S/4) -> (N, H, W) logits in the original frame."""
        return geometry.mask_frame_to_original(logits, feats.height, feats.width, self.long_side)


def _overlap_cuda(main_fn: Callable[[], T], side_fn: Callable[[], DinoFeatures]
                  ) -> tuple[T, DinoFeatures]:
    """Run `side_fn` in a side CUDA stream while `main_fn` runs in the current one; the current
    stream waits for the side one before the results are used. Autocast and inference mode are
    thread-local, and this stays in the caller's thread, so both runs keep them."""
    main = torch.cuda.current_stream()
    side = torch.cuda.Stream(device=main.device)
    side.wait_stream(main)  # the side stream reads inputs the current stream produced
    with torch.cuda.stream(side):
        side_out = side_fn()
    main_out = main_fn()
    main.wait_stream(side)
    for t in (side_out.patches, side_out.cls_attn):
        t.record_stream(main)  # allocated on the side stream, used on the current one
    return main_out, side_out
