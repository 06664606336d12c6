import math

import torch

from talk2sam.similarity import head_embeddings, similarity_map, text_image_score


def naive_head_embeddings(patches, cls_attn):
    gh, gw, dim = patches.shape
    out = []
    for head in cls_attn:
        logits = [float(head[h, w]) for h in range(gh) for w in range(gw)]
        top = max(logits)
        exp = [math.exp(v - top) for v in logits]
        total = sum(exp)
        emb = [0.0] * dim
        for idx, e in enumerate(exp):
            h, w = divmod(idx, gw)
            for d in range(dim):
                emb[d] += e / total * float(patches[h, w, d])
        out.append(emb)
    return torch.tensor(out, dtype=torch.float64)


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_head_embeddings_match_naive_loop_eq_2_3():
    torch.manual_seed(0)
    patches = torch.randn(3, 4, 5, dtype=torch.float64)
    cls_attn = torch.randn(2, 3, 4, dtype=torch.float64) * 3
    assert torch.allclose(head_embeddings(patches, cls_attn),
                          naive_head_embeddings(patches, cls_attn), atol=1e-10)


def test_max_head_score_matches_naive_loop_eq_4():
    torch.manual_seed(1)
    patches = torch.randn(3, 3, 6, dtype=torch.float64)
    cls_attn = torch.randn(4, 3, 3, dtype=torch.float64)
    psi_t = torch.randn(2, 6, dtype=torch.float64)
    heads = naive_head_embeddings(patches, cls_attn).tolist()
    expected = [max(cosine(t, h) for h in heads) for t in psi_t.tolist()]
    got = text_image_score(patches, cls_attn, psi_t)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-10)


def test_dense_map_is_per_patch_cosine():
    torch.manual_seed(2)
    patches = torch.randn(2, 3, 4, dtype=torch.float64)
    cls_attn = torch.randn(2, 2, 3, dtype=torch.float64)
    psi_t = torch.randn(1, 4, dtype=torch.float64)
    sim = similarity_map(patches, cls_attn, psi_t)
    for h in range(2):
        for w in range(3):
            expected = cosine(patches[h, w].tolist(), psi_t[0].tolist())
            assert abs(float(sim[0, h, w]) - expected) < 1e-10


def test_map_scalings_and_background_variant():
    torch.manual_seed(3)
    patches, cls_attn, psi_t = torch.randn(4, 4, 8), torch.randn(2, 4, 4), torch.randn(3, 8)
    raw = similarity_map(patches, cls_attn, psi_t)
    assert raw.shape == (3, 4, 4) and raw.min() >= -1 and raw.max() <= 1
    mm = similarity_map(patches, cls_attn, psi_t, scaling="minmax")
    assert torch.allclose(mm.flatten(1).amin(1), torch.zeros(3), atol=1e-6)
    assert torch.allclose(mm.flatten(1).amax(1), torch.ones(3), atol=1e-6)
    sg = similarity_map(patches, cls_attn, psi_t, scaling="sigmoid")
    assert torch.allclose(sg, torch.sigmoid(raw))
    bg = similarity_map(patches, cls_attn, psi_t, variant="patch+background")
    assert bg.shape == raw.shape and not torch.allclose(bg, raw)
