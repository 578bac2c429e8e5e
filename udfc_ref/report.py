"""The compression report: per layer and in total, printable and JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class LayerReport:
    layer: str
    op: str
    channels_before: int
    channels_after: int
    bits: int | None
    pruned: bool
    error_before: float | None = None  # relative data-model error, no compensation (Eq. E2)
    error_after: float | None = None  # relative data-model error with the method's T, t
    note: str = ""
    ratio: float | None = None  # the prune ratio of the layer's pair / channel group (the budget's choice)


@dataclass
class Report:
    method: str
    options: dict
    layers: list[LayerReport] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    seconds: float = 0.0
    stage_seconds: dict = field(default_factory=dict)
    budget: dict | None = None  # target, fraction asked, achieved and predicted fraction (compress to a budget)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format(self) -> str:
        rows = [f"{'layer':<28} {'channels':>11} {'ratio':>5} {'bits':>5} {'err before':>11} {'err after':>10}  note"]
        for r in self.layers:
            ch = f"{r.channels_before}->{r.channels_after}"
            ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
            bits = "-" if r.bits is None else str(r.bits)
            eb = "-" if r.error_before is None else f"{r.error_before:.4f}"
            ea = "-" if r.error_after is None else f"{r.error_after:.4f}"
            rows.append(f"{r.layer:<28} {ch:>11} {ratio:>5} {bits:>5} {eb:>11} {ea:>10}  {r.note}")
        pct = lambda a, b: f"{100.0 * a / b:.1f}%" if b else "-"  # noqa: E731
        rows.append("")
        rows.append(f"params {self.params_before:,} -> {self.params_after:,} ({pct(self.params_after, self.params_before)})")
        rows.append(f"bytes  {self.bytes_before:,} -> {self.bytes_after:,} ({pct(self.bytes_after, self.bytes_before)})")
        rows.append(f"MACs   {self.flops_before:,} -> {self.flops_after:,} ({pct(self.flops_after, self.flops_before)})")
        if self.budget:
            b = self.budget
            rows.append(f"budget {b['target']} <= {100 * b['fraction']:.1f}% of the original: achieved "
                        f"{100 * b['achieved']:.2f}%")
        rows.append(f"time   {self.seconds:.3f} s (method={self.method})")
        return "\n".join(rows)
