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
    error_before: float | None = None  # relative error (Eq. E2) of no compensation, from the solver's statistics
    error_after: float | None = None  # the same with the method's T, t
    note: str = ""
    ratio: float | None = None  # the prune ratio of the layer's pair / channel group (the budget's choice)
    # with calibration images (derivation section 13): the errors of the same T, t under the data
    # model's statistics and on the images, and how far the two sets of statistics are apart
    # (relative norms, ``sources.stats_error``)
    predicted_before: float | None = None
    predicted_after: float | None = None
    measured_before: float | None = None
    measured_after: float | None = None
    stats_error: dict | None = None


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
        calib = any(r.measured_after is not None for r in self.layers)
        f4 = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        rows = []
        if calib:
            c = self.options.get("calibration", {})
            solved = "data-free statistics" if c.get("mode") == "audit" else "measured statistics"
            rows.append(f"calibration: {c.get('images', '?')} images, mode {c.get('mode', '?')} (T, t solved from "
                        f"{solved}); errors (Eq. E2) of the same T, t measured on the images and predicted by the "
                        "data model; 'stats err': relative error of the predicted Cov(a, a~_K)")
            rows.append(f"{'layer':<28} {'channels':>11} {'ratio':>5} {'bits':>5} {'measured':>17} {'predicted':>17} "
                        f"{'stats err':>9}  note")
            rows.append(f"{'':<28} {'':>11} {'':>5} {'':>5} {'before':>8} {'after':>8} {'before':>8} {'after':>8}")
        else:
            rows.append(f"{'layer':<28} {'channels':>11} {'ratio':>5} {'bits':>5} {'err before':>11} {'err after':>10}"
                        "  note")
        for r in self.layers:
            ch = f"{r.channels_before}->{r.channels_after}"
            ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
            bits = "-" if r.bits is None else str(r.bits)
            if calib:
                se = None if r.stats_error is None else r.stats_error["cross"]
                f3 = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
                rows.append(f"{r.layer:<28} {ch:>11} {ratio:>5} {bits:>5} {f4(r.measured_before):>8} "
                            f"{f4(r.measured_after):>8} {f4(r.predicted_before):>8} {f4(r.predicted_after):>8} "
                            f"{f3(se):>9}  {r.note}")
            else:
                rows.append(f"{r.layer:<28} {ch:>11} {ratio:>5} {bits:>5} {f4(r.error_before):>11} "
                            f"{f4(r.error_after):>10}  {r.note}")
        pct = lambda a, b: f"{100.0 * a / b:.1f}%" if b else "-"  # noqa: E731
        rows.append("")
        rows.append(f"params {self.params_before:,} -> {self.params_after:,} ({pct(self.params_after, self.params_before)})")
        rows.append(f"bytes  {self.bytes_before:,} -> {self.bytes_after:,} ({pct(self.bytes_after, self.bytes_before)})")
        rows.append(f"MACs   {self.flops_before:,} -> {self.flops_after:,} ({pct(self.flops_after, self.flops_before)})")
        if self.budget:
            b = self.budget
            rows.append(f"budget {b['target']} <= {100 * b['fraction']:.1f}% of the original: achieved "
                        f"{100 * b['achieved']:.2f}%" + ("" if "uniform_ratio" not in b else (
                            f" (uniform ratio {b['uniform_ratio']:.3f} meets it; "
                            + ("kept: no allocation predicted clearly better)" if not b["robust_gain"] > 0 else
                               f"per-unit ratios, predicted robust gain {b['robust_gain']:.3g})"))))
        rows.append(f"time   {self.seconds:.3f} s (method={self.method})")
        return "\n".join(rows)
