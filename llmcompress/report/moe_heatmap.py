"""The MoE load section of the HTML cost report: a heat-map of token share per layer × expert.

The load comes from calibration (the compile report's `moe-prune` / `moe-skip` decisions, key `load`, per MoE layer),
not from the meta-device trace: `moe_load(compile_report)` collects it, the caller puts it in the cost report as
`report["moe_load"]`, and `render_html` then adds `html_section` (nothing when the key is absent).
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping
from typing import Any

_PASSES = ("moe-prune", "moe-skip")


def moe_load(compile_report: Mapping[str, Any]) -> dict[str, Any] | None:
    """{"layers": [module paths], "share": [[fraction of the layer's expert evaluations per expert]], "tokens":
    [[...]]} from a compile report's JSON (the first graph holding MoE decisions with `load`), or None."""
    for graph in compile_report.get("graphs", []):
        layers, share, tokens = [], [], []
        for record in graph.get("passes", []):
            if record.get("name") not in _PASSES:
                continue
            for d in record.get("decisions", []):
                load = d.get("load")
                if load and d.get("layer") not in layers:
                    layers.append(d["layer"])
                    share.append(list(load["share"]))
                    tokens.append(list(load["tokens"]))
        if layers:
            return {"layers": layers, "share": share, "tokens": tokens}
    return None


def heatmap_png(load: Mapping[str, Any], dpi: int = 110) -> bytes:
    """PNG bytes: layers (rows) × experts (columns), colour = token share, the share printed in each cell."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    share = load["share"]
    n_layers, n_experts = len(share), max(len(r) for r in share)
    grid = [list(r) + [float("nan")] * (n_experts - len(r)) for r in share]
    fig = Figure(figsize=(min(16, 2 + 0.6 * n_experts), 1.2 + 0.45 * n_layers), dpi=dpi)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
    if n_experts <= 16:
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if v < 0.6 * max(max(r) for r in share) else "black")
    ax.set_yticks(range(n_layers), load["layers"], fontsize=8)
    ax.set_xlabel("expert")
    ax.set_title("share of each layer's expert evaluations (%), calibration data", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def html_section(load: Mapping[str, Any]) -> list[str]:
    """The report's "MoE expert load" section: the heat-map and the least / most loaded expert per layer."""
    png = base64.b64encode(heatmap_png(load)).decode("ascii")
    rows = []
    for layer, share in zip(load["layers"], load["share"]):
        lo, hi = min(range(len(share)), key=share.__getitem__), max(range(len(share)), key=share.__getitem__)
        rows.append(f"<tr><td>{html.escape(layer)}</td><td class=\"n\">{lo}: {100 * share[lo]:.1f} %</td>"
                    f"<td class=\"n\">{hi}: {100 * share[hi]:.1f} %</td></tr>")
    return ["<h2>MoE expert load</h2>",
            f'<figure><img alt="MoE expert load heat-map" src="data:image/png;base64,{png}">',
            ("<figcaption>Token share per layer and expert on the calibration data (uniform: 1 / experts)."
             "</figcaption></figure>"),
            '<table><tr><th>layer</th><th class="n">least loaded</th><th class="n">most loaded</th></tr>',
            *rows, "</table>"]
