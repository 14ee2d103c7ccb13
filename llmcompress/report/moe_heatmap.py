"""The MoE load section of the HTML cost report: a heat-map of token share per layer × expert.

The load comes from calibration (the compile report's `moe-prune` / `moe-skip` decisions, key `load`, per MoE layer)
or from a run (fuse-moe's `load_counters`, `llmcompress.moe_load_counters(model)`), not from the meta-device trace:
`moe_load(compile_report)` / `moe_load_from_counters(counters)` collect it, the caller puts it in the cost report as
`report["moe_load"]` (`llmcompress report --compile-report PATH` does), and `render_html` then adds `html_section`
(nothing when the key is absent).
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
    """{"source": "calibration", "layers": [module paths], "share": [[fraction of the layer's expert evaluations per
    expert]], "tokens": [[...]], "mean_weight": [[mean routing weight per expert]] or None} from a compile report's
    JSON (the first graph holding MoE decisions with `load`), or None."""
    for graph in compile_report.get("graphs", []):
        layers, share, tokens, mean_weight = [], [], [], []
        for record in graph.get("passes", []):
            if record.get("name") not in _PASSES:
                continue
            for d in record.get("decisions", []):
                load = d.get("load")
                if load and d.get("layer") not in layers:
                    layers.append(d["layer"])
                    share.append(list(load["share"]))
                    tokens.append(list(load["tokens"]))
                    mean_weight.append(list(load["mean_weight"]) if "mean_weight" in load else None)
        if layers:
            return {"source": "calibration", "layers": layers, "share": share, "tokens": tokens,
                    "mean_weight": None if None in mean_weight else mean_weight}
    return None


def moe_load_from_counters(counters: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    """`moe_load`'s structure ("source": "runtime counters") from `llmcompress.moe_load_counters(model)`, or None
    when it holds no block. Columns are original expert ids (a block `moe-prune` sliced counts its kept experts by
    position, `experts` giving their ids): an expert it removed reads 0."""
    if not counters:
        return None
    layers, share, tokens, mean_weight = [], [], [], []
    for layer, c in counters.items():
        ids = [int(i) for i in c.get("experts", range(len(c["tokens"])))]
        width = max(ids) + 1 if ids else 0
        t, w = [0] * width, [0.0] * width
        for i, n, m in zip(ids, c["tokens"], c["mean_weight"]):
            t[i], w[i] = int(n), round(float(m), 6)
        layers.append(layer)
        tokens.append(t)
        share.append([v / max(1, sum(t)) for v in t])
        mean_weight.append(w)
    return {"source": "runtime counters", "layers": layers, "share": share, "tokens": tokens,
            "mean_weight": mean_weight}


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
    ax.set_title(f"share of each layer's expert evaluations (%), {_source(load)}", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _source(load: Mapping[str, Any]) -> str:
    return {"calibration": "calibration data"}.get(load.get("source", "calibration"), load.get("source", ""))


def html_section(load: Mapping[str, Any]) -> list[str]:
    """The report's "MoE expert load" section: the heat-map and, per layer, the least / most loaded expert and the
    tokens' mean routing weight (when the load has it)."""
    png = base64.b64encode(heatmap_png(load)).decode("ascii")
    weights = load.get("mean_weight") or [None] * len(load["layers"])
    rows = []
    for layer, share, tokens, mean in zip(load["layers"], load["share"], load["tokens"], weights):
        lo, hi = min(range(len(share)), key=share.__getitem__), max(range(len(share)), key=share.__getitem__)
        hit = [w for w, t in zip(mean, tokens) if t] if mean is not None else []
        cell = f"{min(hit):.3f} – {max(hit):.3f}" if hit else "-"
        rows.append(f"<tr><td>{html.escape(layer)}</td><td class=\"n\">{lo}: {100 * share[lo]:.1f} %</td>"
                    f"<td class=\"n\">{hi}: {100 * share[hi]:.1f} %</td><td class=\"n\">{sum(tokens)}</td>"
                    f"<td class=\"n\">{cell}</td></tr>")
    return ["<h2>MoE expert load</h2>",
            f'<figure><img alt="MoE expert load heat-map" src="data:image/png;base64,{png}">',
            (f"<figcaption>Token share per layer and expert, {html.escape(_source(load))} (uniform: 1 / experts)."
             "</figcaption></figure>"),
            ('<table><tr><th>layer</th><th class="n">least loaded</th><th class="n">most loaded</th>'
             '<th class="n">expert evaluations</th><th class="n">mean routing weight (experts hit)</th></tr>'),
            *rows, "</table>"]
