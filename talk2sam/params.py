"""Parameter counts of the real-size architectures (random init) next to the paper's Table 1."""

from __future__ import annotations

from dataclasses import dataclass

from talk2sam.build import build_model, count_params, set_trainable

# paper Table 1 (SAM-HQ ViT-H, DINOv2 ViT-L/14, CLIP ViT-B/16)
PAPER_TABLE_1 = {
    "SAM-HQ": (5.65e6, 641e6),
    "Talk2SAM, CLIP frozen": (7.22e6, 1.096e9),
    "Talk2SAM, CLIP partial": (10.64e6, 1.096e9),
}


@dataclass
class ParamRow:
    model: str
    trainable: int
    total_with_clip_vision: int  # the paper's accounting: the whole CLIP model
    total_served: int  # what a server loads: CLIP's text tower only
    paper_trainable: float
    paper_total: float
    not_in_paper: int = 0  # of `trainable`: the residual dense mode's map gate

    @property
    def trainable_ratio(self) -> float:
        return self.trainable / self.paper_trainable

    @property
    def total_ratio(self) -> float:
        return self.total_with_clip_vision / self.paper_total


def param_rows(config: str = "vit_h") -> list[ParamRow]:
    """Build the architectures at random init and count. ViT-H needs about 5 GB of RAM."""
    from talk2sam.text import build_clip

    sam_only = build_model(config, use_text=False, random_init=True)
    sam_total = count_params(sam_only)
    rows = [ParamRow("SAM-HQ", count_params(sam_only, trainable_only=True), sam_total, sam_total,
                     *PAPER_TABLE_1["SAM-HQ"])]
    del sam_only
    model = build_model(config, random_init=True)
    vision_tower = count_params(build_clip(model.cfg.clip).visual)  # dropped by TextEncoder
    served = count_params(model)
    gate = count_params(model.map_gate) if model.map_gate is not None else 0
    for mode, label in (("frozen", "Talk2SAM, CLIP frozen"), ("partial", "Talk2SAM, CLIP partial")):
        set_trainable(model, clip_mode=mode)
        rows.append(ParamRow(label, count_params(model, trainable_only=True),
                             served + vision_tower, served, *PAPER_TABLE_1[label], gate))
    return rows


def format_table(rows: list[ParamRow]) -> str:
    lines = [
        ("| model | trainable | of which not in the paper | paper | ratio | total (whole CLIP) "
         "| paper | ratio | total served (CLIP text only) |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.trainable:,} | {r.not_in_paper:,} | "
            f"{r.paper_trainable / 1e6:.2f}M | {r.trainable_ratio:.4f} | "
            f"{r.total_with_clip_vision:,} | {r.paper_total / 1e6:,.0f}M | {r.total_ratio:.4f} | "
            f"{r.total_served:,} |")
    gates = {r.not_in_paper for r in rows if r.not_in_paper}
    if gates:
        lines.append(f"\nNot in the paper: the zero-initialised 1x1 conv of dense_mode 'residual' "
                     f"({gates.pop():,} parameters; 'replace' has none).")
    return "\n".join(lines)
