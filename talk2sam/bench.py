"""Model-level benchmarks: cold image latency, warm per-prompt latency, batched boxes, encoders.

Everything here is torch only (the service-level benchmarks, which need Redis, rq and the
backend, live in ``ml_backend/bench_service.py``; ``scripts/benchmark.py`` prints both). Each function measures SAM-HQ and Talk2SAM on the
same images and the same SAM-HQ module (one set of random or loaded weights shared by both), and
returns a :class:`Table` of medians. Timings are wall clock: on a shared CPU they are noisy, so
compare only within one run.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from talk2sam.model import Talk2Sam
from talk2sam.predictor import Talk2SamPredictor

WORDS = ("wire", "fence", "pole", "cable", "bicycle", "railing", "antenna", "mast")


@dataclass
class Table:
    """A markdown table: a title, column names and rows of already formatted cells."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    values: dict[str, float] = field(default_factory=dict)  # named medians, ms or ratios

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        lines += [""] + [f"{note}" for note in self.notes]
        return "\n".join(lines).rstrip() + "\n"


def median_ms(seconds: Sequence[float]) -> float:
    return 1000.0 * statistics.median(seconds)


def percentile_ms(seconds: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) in ms."""
    ordered = sorted(seconds)
    rank = max(1, int(np.ceil(q / 100.0 * len(ordered))))
    return 1000.0 * ordered[rank - 1]


def fmt_ms(ms: float) -> str:
    return f"{ms:,.1f}" if ms < 100 else f"{ms:,.0f}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[..., object], *args: object) -> float:
    """Seconds taken by fn(*args), with the device synchronised before and after."""
    _sync(device)
    start = time.perf_counter()
    fn(*args)
    _sync(device)
    return time.perf_counter() - start


def synthetic_images(count: int, height: int = 300, width: int = 400,
                     seed: int = 0) -> list[np.ndarray]:
    """(H, W, 3) uint8 RGB images: noise over a sky gradient with a dark diagonal 'wire'."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        img = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
        img += np.linspace(120, 190, height, dtype=np.uint8)[:, None, None]
        rows = (np.arange(width) * (0.1 + 0.05 * i) + height * 0.2).astype(int) % height
        img[rows, np.arange(width)] = 20
        images.append(img)
    return images


def boxes_for(image: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """(count, 4) XYXY float pixel boxes inside the image, at least 8 px a side."""
    height, width = image.shape[:2]
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(0, width * 0.6, count)
    y0 = rng.uniform(0, height * 0.6, count)
    w = rng.uniform(8, width * 0.4, count)
    h = rng.uniform(8, height * 0.4, count)
    return np.stack([x0, y0, np.minimum(x0 + w, width), np.minimum(y0 + h, height)], axis=1)


@dataclass
class Pair:
    """Box-only SAM-HQ and Talk2SAM sharing one SAM-HQ module (same backbone, same weights)."""

    samhq: Talk2SamPredictor
    talk2sam: Talk2SamPredictor
    config: str

    @property
    def device(self) -> torch.device:
        return self.talk2sam.device

    def describe(self) -> str:
        cfg = self.talk2sam.model.cfg
        return (f"config `{self.config}`: SAM-HQ `{cfg.sam.variant}` encoder at "
                f"{cfg.sam.image_size} px, DINOv2 `{cfg.dino.arch}` at {cfg.dino.image_size} px "
                f"({self.talk2sam.model.dino.dim}-d), device {self.device}")


def build_pair(config: str, device: str | None = None, weights_dir: str | None = None,
               random_init: bool = True) -> Pair:
    """Build Talk2SAM and a box-only SAM-HQ around the same SAM-HQ module."""
    from talk2sam.build import build_model, default_device

    model = build_model(config, weights_dir, use_text=True, random_init=random_init)
    device = default_device(device)
    model = model.to(device).eval()
    samhq = Talk2Sam(model.cfg, model.sam)
    samhq.version = model.version.replace("talk2sam", "samhq", 1)
    return Pair(Talk2SamPredictor(samhq), Talk2SamPredictor(model), config)


def warm_up(pair: Pair, image: np.ndarray) -> None:
    """One untimed pass of each path (allocator, lazy kernels, first-call overheads)."""
    box = boxes_for(image, 1)
    pair.talk2sam.set_image(image)
    pair.talk2sam.predict(box, "warmup")
    pair.samhq.set_features(pair.talk2sam.features)  # same SAM-HQ module: same embedding
    pair.samhq.predict(box)


def cold_table(pair: Pair, images: Sequence[np.ndarray], repeats: int = 1) -> Table:
    """(1) Cold latency per image, set_image + first predict (one box), SAM-HQ vs Talk2SAM,
    interleaved image by image. Talk2SAM's first word is one it has not seen (its CLIP text
    encoding is included), as when a new label is used on a new image."""
    samhq_s, t2s_s, sam_enc_s, dino_s = [], [], [], []
    model = pair.talk2sam.model
    for r in range(repeats):
        for i, image in enumerate(images):
            box = boxes_for(image, 1, seed=i)
            word = f"{WORDS[i % len(WORDS)]} {r}-{i}"  # never cached: text encoder included
            samhq_s.append(timed(pair.device, _cold, pair.samhq, image, box, None))
            t2s_s.append(timed(pair.device, _cold, pair.talk2sam, image, box, word))
            sam_t, dino_t = encoder_split(model, image)
            sam_enc_s.append(sam_t)
            dino_s.append(dino_t)
    cold_samhq, cold_t2s = median_ms(samhq_s), median_ms(t2s_s)
    table = Table(
        "Cold image latency (set_image + first predict, 1 box)",
        ["model", "median ms", "min ms", "n", "ratio to SAM-HQ"],
    )
    table.rows.append(["SAM-HQ (box only)", fmt_ms(cold_samhq), fmt_ms(1000 * min(samhq_s)),
                       str(len(samhq_s)), "1.00"])
    table.rows.append(["Talk2SAM (box + new word)", fmt_ms(cold_t2s), fmt_ms(1000 * min(t2s_s)),
                       str(len(t2s_s)), f"{cold_t2s / cold_samhq:.2f}"])
    table.rows.append(["  of which SAM-HQ image encoder", fmt_ms(median_ms(sam_enc_s)), "",
                       str(len(sam_enc_s)), ""])
    table.rows.append(["  of which DINOv2 (+ CLS attention)", fmt_ms(median_ms(dino_s)), "",
                       str(len(dino_s)), ""])
    sam_ms, dino_ms = median_ms(sam_enc_s), median_ms(dino_s)
    table.notes.append(f"{pair.describe()}. From the encoders alone (less exposed to load "
                       f"drift between the two cold runs): (SAM-HQ encoder + DINOv2) / SAM-HQ "
                       f"encoder = {(sam_ms + dino_ms) / sam_ms:.2f}. Paper (V100, ViT-B): "
                       f"Talk2SAM 302 ms vs SAM-HQ 142 ms, ratio 2.13.")
    table.values.update(cold_samhq_ms=cold_samhq, cold_talk2sam_ms=cold_t2s,
                        cold_ratio=cold_t2s / cold_samhq, sam_encoder_ms=sam_ms,
                        dino_ms=dino_ms, encoder_ratio=(sam_ms + dino_ms) / sam_ms)
    return table


def _cold(pred: Talk2SamPredictor, image: np.ndarray, box: np.ndarray, word: str | None) -> None:
    pred.set_image(image)
    pred.predict(box, word)


@torch.inference_mode()
def encoder_split(model: Talk2Sam, image: np.ndarray) -> tuple[float, float]:
    """Seconds of SAM-HQ's image encoder and of DINOv2, each alone, on one image."""
    from talk2sam import sam_hq

    rgb = torch.from_numpy(image).to(model.device)
    x = rgb.permute(2, 0, 1)[None].float()
    sam_t = timed(model.device, lambda: sam_hq.encode_image(
        model.sam, sam_hq.preprocess(model.sam, rgb, model.long_side)))
    dino = model.dino
    if dino is None:
        return sam_t, 0.0
    return sam_t, timed(model.device, lambda: dino(dino.preprocess(x / 255.0)))


def warm_table(pair: Pair, images: Sequence[np.ndarray], prompts: int = 10,
               cold: Table | None = None) -> Table:
    """(2) Per-prompt latency on a cached image: a new box with a word already seen (text
    cached), and a new box with a new word (CLIP text encoder runs); ratio to the cold median."""
    samhq_s, box_s, word_s = [], [], []
    for i, image in enumerate(images):
        pair.talk2sam.set_image(image)
        pair.samhq.set_features(pair.talk2sam.features)  # same SAM-HQ module: same embedding
        pair.talk2sam.predict(boxes_for(image, 1), "wire")  # "wire" now cached
        for j in range(prompts):
            box = boxes_for(image, 1, seed=1000 * i + j)
            samhq_s.append(timed(pair.device, pair.samhq.predict, box))
            box_s.append(timed(pair.device, pair.talk2sam.predict, box, "wire"))
            word_s.append(timed(pair.device, pair.talk2sam.predict, box, f"new word {i}-{j}"))
    table = Table("Warm per-prompt latency on a cached image (1 box)",
                  ["prompt", "median ms", "p90 ms", "n", "% of cold"])
    cold_ms = {"samhq": cold.values["cold_samhq_ms"], "t2s": cold.values["cold_talk2sam_ms"]} \
        if cold else {}
    for label, samples, key, name in (
        ("SAM-HQ: new box", samhq_s, "samhq", "warm_samhq_ms"),
        ("Talk2SAM: new box, cached word", box_s, "t2s", "warm_box_ms"),
        ("Talk2SAM: new box, new word", word_s, "t2s", "warm_word_ms"),
    ):
        med = median_ms(samples)
        share = f"{100 * med / cold_ms[key]:.1f} %" if key in cold_ms else ""
        table.rows.append([label, fmt_ms(med), fmt_ms(percentile_ms(samples, 90)),
                           str(len(samples)), share])
        table.values[name] = med
        if key in cold_ms:
            table.values[name.replace("_ms", "_share")] = med / cold_ms[key]
    table.notes.append("Target: warm per-prompt <= 5 % of cold.")
    return table


def batch_table(pair: Pair, image: np.ndarray, counts: Sequence[int] = (1, 4, 16),
                repeats: int = 3) -> Table:
    """(3) N boxes in one predict call vs N calls of one box (Talk2SAM, cached word)."""
    pred = pair.talk2sam
    pred.set_image(image)
    pred.predict(boxes_for(image, 1), "wire")
    table = Table("N boxes in one call vs N calls (Talk2SAM, cached image and word)",
                  ["N", "one call ms", "N calls ms", "speed-up", "one call ms/box"])
    for n in counts:
        boxes = boxes_for(image, n, seed=n)
        one, many = [], []
        for _ in range(repeats):
            one.append(timed(pair.device, pred.predict, boxes, "wire"))
            many.append(timed(pair.device, _one_by_one, pred, boxes, "wire"))
        one_ms, many_ms = median_ms(one), median_ms(many)
        table.rows.append([str(n), fmt_ms(one_ms), fmt_ms(many_ms), f"{many_ms / one_ms:.2f}x",
                           fmt_ms(one_ms / n)])
        table.values[f"batch_{n}_speedup"] = many_ms / one_ms
        table.values[f"batch_{n}_ms_per_box"] = one_ms / n
    table.notes.append(f"median of {repeats} runs each")
    return table


def _one_by_one(pred: Talk2SamPredictor, boxes: np.ndarray, word: str) -> None:
    for box in boxes:
        pred.predict(box, word)


def _encode_threaded(model: Talk2Sam, rgb: torch.Tensor) -> None:
    """Talk2SAM's image encoding with DINOv2 in a second thread (CPU experiment only).
    Inference mode is thread-local, so the thread enters it itself."""
    from talk2sam import sam_hq

    x = rgb.to(model.device).permute(2, 0, 1)[None].float()
    dino = model.dino
    out: dict[str, object] = {}

    def run_dino() -> None:
        with torch.inference_mode():
            out["dino"] = dino(dino.preprocess(x / 255.0))

    thread = threading.Thread(target=run_dino)
    thread.start()
    sam_hq.encode_image(model.sam, sam_hq.preprocess(model.sam, rgb, model.long_side))
    thread.join()


def overlap_table(pair: Pair, images: Sequence[np.ndarray], repeats: int = 1) -> Table:
    """Talk2SAM set_image with the encoders one after the other vs overlapped: a side CUDA
    stream on GPU (`overlap_encoders=True`), a second thread on CPU (experiment here only)."""
    pred, model, device = pair.talk2sam, pair.talk2sam.model, pair.device
    seq, ovl = [], []
    for _ in range(repeats):
        for image in images:
            pred.overlap_encoders = False
            seq.append(timed(device, pred.set_image, image))
            if device.type == "cuda":
                pred.overlap_encoders = True
                ovl.append(timed(device, pred.set_image, image))
                pred.overlap_encoders = False
            else:
                with torch.inference_mode():
                    ovl.append(timed(device, _encode_threaded, model, torch.from_numpy(image)))
    how = "side CUDA stream" if device.type == "cuda" else \
        f"DINOv2 in a second thread, {torch.get_num_threads()} intra-op threads each"
    seq_ms, ovl_ms = median_ms(seq), median_ms(ovl)
    table = Table("Overlapping the DINOv2 and SAM-HQ encoders (Talk2SAM set_image)",
                  ["encoders", "median ms", "n", "ratio"])
    table.rows.append(["one after the other", fmt_ms(seq_ms), str(len(seq)), "1.00"])
    table.rows.append([f"overlapped ({how})", fmt_ms(ovl_ms), str(len(ovl)),
                       f"{ovl_ms / seq_ms:.2f}"])
    table.values.update(sequential_ms=seq_ms, overlapped_ms=ovl_ms)
    return table


def precision_table(pair: Pair, images: Sequence[np.ndarray], boxes: int = 4) -> Table:
    """Talk2SAM's image encoders in float32 vs bfloat16 (autocast; the decoder stays float32):
    set_image time, and how far the masks of the same boxes and word agree (IoU of the two
    masks; with random weights masks can be near-empty or near-full, so the share of pixels
    on which they agree is given too)."""
    pred = pair.talk2sam
    kept = pred.encoder_dtype
    times: dict[torch.dtype, list[float]] = {torch.float32: [], torch.bfloat16: []}
    ious, same = [], []
    try:
        for i, image in enumerate(images):
            box = boxes_for(image, boxes, seed=i)
            masks = {}
            for dtype in times:
                pred.encoder_dtype = dtype
                times[dtype].append(timed(pair.device, pred.set_image, image))
                masks[dtype] = pred.predict(box, "wire").masks
            a, b = masks[torch.float32], masks[torch.bfloat16]
            for k in range(len(box)):
                union = (a[k] | b[k]).sum()
                ious.append(float((a[k] & b[k]).sum() / union) if union else 1.0)
                same.append(float((a[k] == b[k]).mean()))
    finally:
        pred.encoder_dtype = kept
    fp32_ms, bf16_ms = median_ms(times[torch.float32]), median_ms(times[torch.bfloat16])
    table = Table("Image encoders in float32 vs bfloat16 (Talk2SAM set_image; decoder float32)",
                  ["encoders", "set_image median ms", "n", "ratio", "mask IoU median (min)",
                   "pixels agreeing"])
    table.rows.append(["float32", fmt_ms(fp32_ms), str(len(times[torch.float32])), "1.00", "",
                       ""])
    table.rows.append(["bfloat16", fmt_ms(bf16_ms), str(len(times[torch.bfloat16])),
                       f"{bf16_ms / fp32_ms:.2f}",
                       f"{statistics.median(ious):.4f} ({min(ious):.4f})",
                       f"{100 * statistics.median(same):.2f} %"])
    table.values.update(fp32_ms=fp32_ms, bf16_ms=bf16_ms, bf16_ratio=bf16_ms / fp32_ms,
                        bf16_iou_median=statistics.median(ious), bf16_iou_min=min(ious),
                        bf16_pixels_agree=statistics.median(same))
    return table


def tuning_table(config: str, images: Sequence[np.ndarray], prompts: int = 5,
                 device: str | None = None) -> Table:
    """The CPU path's tuning, one step at a time on one config: set_image and a warm box
    (cached word) with float32 NCHW encoders and the HQ features recomputed per call (the
    path before tuning), then channels-last, then the HQ features kept per image, then
    bfloat16 encoders (`default_encoder_dtype`; only where the CPU computes it natively)."""
    from talk2sam.predictor import default_encoder_dtype

    pair = build_pair(config, device)
    pred, model = pair.talk2sam, pair.talk2sam.model
    steps = [("float32, NCHW, HQ features per call (before tuning)", False, False, torch.float32),
             ("+ channels-last SAM-HQ", True, False, torch.float32),
             ("+ HQ features kept per image", True, True, torch.float32)]
    if default_encoder_dtype(pair.device) == torch.bfloat16:
        steps.append(("+ bfloat16 encoders (the default here)", True, True, torch.bfloat16))
    table = Table(f"`{config}`: the CPU path, one step at a time",
                  ["step", "set_image median ms", "warm box median ms", "n (images / boxes)",
                   "set_image ratio", "warm box ratio"])
    base: tuple[float, float] | None = None
    for label, channels_last, keep_hq, dtype in steps:
        model.sam.to(memory_format=torch.channels_last if channels_last
                     else torch.contiguous_format)
        model.channels_last = channels_last
        pred.encoder_dtype = dtype
        encode, box = [], []
        for i, image in enumerate(images):
            encode.append(timed(pair.device, pred.set_image, image))
            pred.predict(boxes_for(image, 1), "wire")  # "wire" cached
            for j in range(prompts):
                if not keep_hq:
                    pred._hq = None  # as every call did before the predictor kept them
                box.append(timed(pair.device, pred.predict, boxes_for(image, 1, seed=j), "wire"))
        enc_ms, box_ms = median_ms(encode), median_ms(box)
        base = base or (enc_ms, box_ms)
        table.rows.append([label, fmt_ms(enc_ms), fmt_ms(box_ms), f"{len(encode)} / {len(box)}",
                           f"{enc_ms / base[0]:.2f}", f"{box_ms / base[1]:.2f}"])
    table.notes.append(f"{pair.describe()}; {torch.get_num_threads()} intra-op threads. Each "
                       f"step keeps the ones above it.")
    return table


def head_table(pair: Pair, image: np.ndarray, prompts: int = 10, gpu_gib: float = 24.0,
               headroom_gib: float = 4.0) -> Table:
    """(8) One base, many projects: the cost of answering projects A and B alternately on one
    predictor (a head switch before each box) against staying on one project, the memory a head
    takes, and how many fit beside the model on a ``gpu_gib`` GPU."""
    from talk2sam.heads import Head

    pred = pair.talk2sam
    base = pred.head()
    generator = torch.Generator().manual_seed(0)
    other = Head("project-b", {k: v + 0.01 * torch.randn(v.shape, generator=generator).to(v)
                               if v.is_floating_point() else v.clone()
                               for k, v in base.state.items()}, True)
    pred.set_image(image)
    pred.predict(boxes_for(image, 1), "wire")  # the word and the HQ features cached
    same, switch, switched_box = [], [], []
    for j in range(prompts):
        box = boxes_for(image, 1, seed=j)
        same.append(timed(pred.device, pred.predict, box, "wire"))
        switch.append(timed(pred.device, pred.use_head, other if j % 2 == 0 else base))
        switched_box.append(timed(pred.device, pred.predict, box, "wire"))
    pred.use_head(base)
    model_bytes = sum(t.numel() * t.element_size() for t in pred.model.state_dict().values())
    room = gpu_gib * 2**30 - model_bytes - headroom_gib * 2**30
    fit = max(0, int(room // base.nbytes))
    table = Table("One base, many projects: head switch and memory (projects A and B "
                  "alternately on one predictor)",
                  ["measure", "value"])
    table.rows += [
        ["box, same project as the last (median ms, n)",
         f"{fmt_ms(median_ms(same))} ({prompts})"],
        ["head switch (median ms, n)", f"{fmt_ms(median_ms(switch))} ({prompts})"],
        ["box right after a switch (median ms, n)",
         f"{fmt_ms(median_ms(switched_box))} ({prompts})"],
        ["switch + box vs same-project box",
         f"{(median_ms(switch) + median_ms(switched_box)) / median_ms(same):.2f}x"],
        ["memory per head held MiB (its tensors: trained parts, float32)",
         f"{base.nbytes / 2**20:,.1f}"],
        ["model MiB (encoders, CLIP, decoder)", f"{model_bytes / 2**20:,.0f}"],
        [f"heads beside the model on a {gpu_gib:g} GiB GPU", f"{fit:,}"],
    ]
    table.values.update({"head_switch_ms": median_ms(switch), "same_box_ms": median_ms(same),
                         "switched_box_ms": median_ms(switched_box),
                         "head_mib": base.nbytes / 2**20, "heads_fit": float(fit)})
    table.notes.append(
        f"A switch copies the head into the model's own tensors (no allocation); the image's "
        f"features stay cached, only the HQ decoder's per-image features are made again for "
        f"the new decoder (the 'box right after a switch' row). Heads beside the model: "
        f"({gpu_gib:g} GiB - the model's weights - {headroom_gib:g} GiB left for activations "
        f"and the feature cache) / head size; an estimate from sizes, not a GPU measurement.")
    return table
