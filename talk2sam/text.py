"""Stage 1: CLIP text embedding of the class word (open_clip, OpenAI ViT-B/16 weights).

The embedding is CLIP's projected text feature *before* L2 normalisation, as Talk2DINO uses it.
Embeddings are cached per word while the encoder is frozen; the cache is dropped whenever CLIP's
weights, its trainable set or its device change."""

from __future__ import annotations

from collections.abc import Sequence

import open_clip
import torch
from torch import nn

from talk2sam.configs import MAX_WORD_CHARS, ClipSpec
from talk2sam.errors import InvalidPromptError



def build_clip(spec: ClipSpec) -> open_clip.model.CLIP:
    """The whole CLIP model at random init (weights are loaded in `build.py`)."""
    cfg = spec.cfg if spec.cfg is not None else open_clip.get_model_config(spec.open_clip_name)
    return open_clip.model.CLIP(**cfg)


def clean_word(word: str) -> str:
    if not isinstance(word, str):
        raise InvalidPromptError(f"text prompt must be a string, got {type(word).__name__}")
    cleaned = " ".join(word.split())
    if not cleaned:
        raise InvalidPromptError("text prompt is empty")
    if len(cleaned) > MAX_WORD_CHARS:
        raise InvalidPromptError(
            f"text prompt is {len(cleaned)} characters long; at most {MAX_WORD_CHARS} are accepted"
        )
    return cleaned


class TextEncoder(nn.Module):
    """CLIP text tower returning (N, text_dim) float32 embeddings, unnormalised.

    Only the text tower is kept: the vision tower is dropped after loading (the method never runs it).
    """

    def __init__(self, clip: open_clip.model.CLIP, templates: Sequence[str] = ("{}",)):
        super().__init__()
        clip.visual = None  # never used by the method; frees ~86M parameters
        self.clip = clip
        self.templates = tuple(templates)
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=clip.context_length)
        self._cache: dict[str, torch.Tensor] = {}
        self._cache_stamp: tuple | None = None

    def partial_parameters(self) -> list[nn.Parameter]:
        """The 'CLIP partial' set of the paper: last text block, final norm, text projection."""
        params = list(self.clip.transformer.resblocks[-1].parameters())
        params += list(self.clip.ln_final.parameters())
        proj = self.clip.text_projection
        params += list(proj.parameters()) if isinstance(proj, nn.Module) else [proj]
        return params

    def is_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.clip.parameters())

    def _stamp(self) -> tuple:
        """Changes whenever a cached embedding could be stale: the device, which parameters
        train, a parameter's storage (`p.data = ...`) or an in-place update of it (optimizer
        steps, load_state_dict; not writes through `p.data`, which bypass version counters;
        parameters made under inference mode have none)."""
        params = list(self.clip.parameters())
        return (str(params[0].device), tuple(p.requires_grad for p in params),
                tuple((p.data_ptr(), 0 if p.is_inference() else p._version) for p in params))

    def forward(self, words: Sequence[str]) -> torch.Tensor:
        """Embed words; (N, text_dim) float32 on the encoder's device. Templates are averaged."""
        cleaned = [clean_word(w) for w in words]
        stamp = self._stamp()
        if stamp != self._cache_stamp:
            self._cache.clear()
            self._cache_stamp = stamp
        if self.is_frozen():  # CLIP has no dropout: a frozen encoder's answer never changes
            missing = [w for w in dict.fromkeys(cleaned) if w not in self._cache]
            if missing:
                with torch.no_grad():
                    for word, emb in zip(missing, self._embed(missing)):
                        self._cache[word] = emb
            return torch.stack([self._cache[w] for w in cleaned])
        return self._embed(cleaned)

    def _apply(self, fn, *args, **kwargs):  # noqa: ANN001, ANN202 - nn.Module's signature
        self._cache.clear()  # .to(), .cuda(), .half(): the cached tensors would not follow
        return super()._apply(fn, *args, **kwargs)

    def _embed(self, words: list[str]) -> torch.Tensor:
        device = self.clip.token_embedding.weight.device
        prompts = [t.format(w) for w in words for t in self.templates]
        tokens = self.tokenizer(prompts).to(device)
        emb = self.clip.encode_text(tokens, normalize=False).float()
        return emb.view(len(words), len(self.templates), -1).mean(dim=1)
