"""Stages 7-8: SAM-HQ with a box and a dense map prompt (the only importer of segment_anything_hq).

The dense map goes through SAM's `prompt_encoder.mask_downscaling` (trainable in Talk2SAM); the
result either replaces SAM's "no mask" embedding (the paper's wiring) or is added to it through
a zero-initialised gate (`map_gate`, the residual default); the decoder is SAM-HQ's, fed SAM's image embedding and the
early ViT features (`interm_embeddings[0]`, output of the first global-attention block)."""

from __future__ import annotations

import warnings
from functools import partial

import torch
from torch import nn

from talk2sam.configs import SamSpec

with warnings.catch_warnings():
    # segment_anything_hq imports deprecated timm paths and re-registers TinyViT names in timm.
    warnings.simplefilter("ignore")
    from segment_anything_hq.build_sam import build_sam_vit_t
    from segment_anything_hq.modeling import (
        ImageEncoderViT,
        MaskDecoderHQ,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

# SAM's pixel statistics on the 0-255 scale
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def build_sam_hq(spec: SamSpec) -> Sam:
    """SAM-HQ architecture at random init, in eval mode and with nothing frozen (freezing is
    `build.set_trainable`'s job). Weights are loaded strictly by `build.py`."""
    if spec.variant == "vit_tiny":
        sam = build_sam_vit_t(checkpoint=None)  # TinyViT encoder; the builder freezes: undo below
    else:
        grid = spec.image_size // 16
        sam = Sam(
            image_encoder=ImageEncoderViT(
                depth=spec.encoder_depth, embed_dim=spec.encoder_dim, img_size=spec.image_size,
                mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                num_heads=spec.encoder_heads, patch_size=16, qkv_bias=True, use_rel_pos=True,
                global_attn_indexes=spec.global_attn_indexes, window_size=spec.window_size,
                out_chans=spec.prompt_dim,
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=spec.prompt_dim, image_embedding_size=(grid, grid),
                input_image_size=(spec.image_size, spec.image_size),
                mask_in_chans=spec.mask_in_chans,
            ),
            mask_decoder=MaskDecoderHQ(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(depth=2, embedding_dim=spec.prompt_dim,
                                              mlp_dim=spec.decoder_mlp_dim,
                                              num_heads=spec.decoder_heads),
                transformer_dim=spec.prompt_dim, iou_head_depth=3,
                iou_head_hidden_dim=spec.prompt_dim, vit_dim=spec.encoder_dim,
            ),
            pixel_mean=list(PIXEL_MEAN), pixel_std=list(PIXEL_STD),
        )
    for p in sam.parameters():
        p.requires_grad_(True)
    return sam.eval()


def preprocess(sam: Sam, rgb: torch.Tensor, long_side: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, S, S), as SamPredictor makes it: the uint8 image's longest side
    resized to S by SAM-HQ's own ResizeLongestSide.apply_image (PIL, on the CPU), normalised and
    zero-padded. A resize of the float image differs by up to 1e-2 in logits (vit_b)."""
    from segment_anything_hq.utils.transforms import ResizeLongestSide

    resized = ResizeLongestSide(long_side).apply_image(rgb.cpu().numpy())
    x = torch.as_tensor(resized, device=sam.pixel_mean.device).permute(2, 0, 1)[None].float()
    return sam.preprocess(x)


def encode_image(sam: Sam, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, S, S) preprocessed -> image embedding (B, C, S/16, S/16) and early ViT features
    (B, S/16, S/16, Cv)."""
    embedding, interm = sam.image_encoder(x)
    return embedding, interm[0]


DECODER_OUTPUTS = ("sam+hq", "hq", "sam")


def hq_features(sam: Sam, embedding: torch.Tensor, interm: torch.Tensor) -> torch.Tensor:
    """The HQ decoder's per-image features (1, C/8, S/4, S/4), as MaskDecoderHQ.forward makes
    them: they depend on the image and the decoder's weights only, not on the prompts."""
    decoder = sam.mask_decoder
    return decoder.embedding_encoder(embedding) + decoder.compress_vit_feat(
        interm.permute(0, 3, 1, 2))


def decode(
    sam: Sam,
    embedding: torch.Tensor,
    interm: torch.Tensor,
    boxes_canvas: torch.Tensor | None,
    mask_prompt: torch.Tensor | None,
    output: str = "sam+hq",
    map_gate: nn.Module | None = None,
    hq: torch.Tensor | None = None,
    points: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode N boxes of ONE image in one call.

    Args:
        embedding: (1, C, g, g) image embedding; interm: (1, g, g, Cv) early ViT features.
        boxes_canvas: (N, 4) XYXY boxes in SAM's padded canvas, or None (clicks alone).
        mask_prompt: (N, 1, S/4, S/4) dense map in the low-res mask frame, or None (box only).
        output: "sam+hq" sums SAM's and the HQ token's logits (SAM-HQ's `hq_token_only=False`,
            its choice for thin objects); "hq" is the HQ token alone; "sam" is SAM's own
            single-mask output (the plain-SAM baseline of the paper's tables).
        map_gate: None: the encoded mask prompt replaces the "no mask" embedding; a module:
            "no mask" + map_gate(encoded prompt) (residual mode).
        hq: `hq_features` of this image computed earlier with the same decoder weights, or
            None to compute them (training always does: they carry gradients).
        points: clicks, SAM's point prompt: canvas coordinates (N, P, 2) and labels (N, P),
            1 positive, 0 negative, -1 padding; None: no clicks.
    Returns:
        low-res logits (N, 1, S/4, S/4) and predicted IoU (N,).
    """
    if output not in DECODER_OUTPUTS:
        raise ValueError(f"decoder output must be one of {DECODER_OUTPUTS}, got {output!r}")
    decoder = sam.mask_decoder
    if map_gate is None:
        sparse, dense = sam.prompt_encoder(points=points, boxes=boxes_canvas, masks=mask_prompt)
    else:
        sparse, dense = sam.prompt_encoder(points=points, boxes=boxes_canvas, masks=None)
        if mask_prompt is not None:
            dense = dense + map_gate(sam.prompt_encoder.mask_downscaling(mask_prompt))
    # as MaskDecoderHQ.forward does, but keeping SAM's and the HQ logits apart
    masks, iou = decoder.predict_masks(
        image_embeddings=embedding,
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        hq_features=hq_features(sam, embedding, interm) if hq is None else hq,
    )
    sam_logits, hq_logits = masks[:, 0:1], masks[:, -1:]
    logits = {"sam+hq": sam_logits + hq_logits, "hq": hq_logits, "sam": sam_logits}[output]
    return logits, iou[:, 0]
