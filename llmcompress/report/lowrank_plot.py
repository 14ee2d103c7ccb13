"""The "Low-rank quality / size" section of the HTML cost report: what a `lowrank-split` compile measured, and
what `benchmarks/lowrank_quality.py` measured, as embedded PNG plots.

Entry points: `lowrank_section(compile_report=, quality=)` reads the two files `llmcompress report` is given
(`--compile-report`, `--lowrank-quality`) into the report dict's `lowrank` key (plain JSON, so the HTML renders from
the JSON report too); `section_html(section)` renders it. Two plots:

* from the compile report (written to `options["report"]` by a compile that ran `lowrank-split` with a `ratio`):
  each allocated layer's relative output error (E(r) / E(0), measured on the dense model's calibration activations:
  the curves the rank allocation spent the budget on) against the kept fraction of its parameters, the rank it got
  marked;
* from the quality JSON: validation perplexity against kept fraction of the targeted linears' parameters, one line
  per method (svd, asvd, svd-llm), dense as a dashed line.

A file that is missing, is not JSON or lacks what the plot needs raises `LowrankInputError` naming the file and the
field.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmcompress.errors import LLMCompressError

METHOD_ORDER = ("svd", "asvd", "svd-llm")


class LowrankInputError(LLMCompressError, ValueError):
    """A compile report or quality JSON given to `llmcompress report` is missing or does not hold what the
    low-rank section plots."""


def _read_json(path: str | Path, what: str) -> Any:
    p = Path(path).expanduser()
    if not p.is_file():
        raise LowrankInputError(f"{what} {str(path)!r} does not exist")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LowrankInputError(f"{what} {str(path)!r} is not valid JSON: {e}") from None


def _number(row: Mapping[str, Any], key: str) -> float | None:
    v = row.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def load_quality(path: str | Path) -> dict[str, Any]:
    """The rows of a `benchmarks/lowrank_quality.py` JSON: {source, device, windows, calibration, git, rows
    [{model, method, ratio, kept_fraction, perplexity, dense_perplexity, delta_pct}], missing_runs}.

    kept_fraction is the row's measured `params_kept_fraction` (the compile report's), else its asked `ratio`."""
    return parse_quality(_read_json(path, "low-rank quality JSON"), str(path))


def parse_quality(doc: Any, path: str) -> dict[str, Any]:
    """`load_quality` of a JSON document already read (`path`: where it came from, for messages and captions)."""
    what = "low-rank quality JSON"
    results = doc.get("results") if isinstance(doc, dict) else None
    if not isinstance(results, list):
        raise LowrankInputError(f"{what} {str(path)!r} has no 'results' list: expected the JSON "
                                "benchmarks/lowrank_quality.py writes ({'results': [{model, method, ratio, "
                                "perplexity, params_kept_fraction, ...}]})")
    rows = []
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            raise LowrankInputError(f"{what} {str(path)!r}: results[{i}] is not an object")
        for key in ("model", "method"):
            if not isinstance(r.get(key), str):
                raise LowrankInputError(f"{what} {str(path)!r}: results[{i}] has no string {key!r}")
        ppl = _number(r, "perplexity")
        if ppl is None or ppl <= 0:
            raise LowrankInputError(f"{what} {str(path)!r}: results[{i}] ({r['model']} {r['method']}) has no "
                                    f"positive 'perplexity' (got {r.get('perplexity')!r})")
        kept = _number(r, "params_kept_fraction")
        kept = kept if kept is not None else _number(r, "ratio")
        if kept is None or not 0 < kept <= 1:
            raise LowrankInputError(f"{what} {str(path)!r}: results[{i}] ({r['model']} {r['method']}) needs "
                                    f"'params_kept_fraction' or 'ratio' in (0, 1] (got "
                                    f"{r.get('params_kept_fraction', r.get('ratio'))!r})")
        rows.append({"model": r["model"], "method": r["method"], "ratio": _number(r, "ratio"), "kept_fraction": kept,
                     "perplexity": ppl, "dense_perplexity": _number(r, "dense_perplexity"),
                     "delta_pct": _number(r, "delta_pct")})
    if not rows:
        raise LowrankInputError(f"{what} {str(path)!r} has no rows in 'results'")
    calibration = doc.get("calibration") if isinstance(doc.get("calibration"), dict) else {}
    return {"source": str(path), "device": doc.get("device"), "windows": doc.get("windows"),
            "calibration": {k: calibration.get(k) for k in ("samples", "seq_len")}, "git": doc.get("git"),
            "rows": rows, "missing_runs": list(doc.get("missing_runs") or [])}


def load_layer_curves(path: str | Path) -> list[dict[str, Any]]:
    """Every `lowrank-split` layer decision with an `error_curve` in a compile report: [{graph, layer, method,
    shape, rank, curve}], graph by graph; [] when the compile did not run lowrank-split with a ratio."""
    what = "compile report"
    doc = _read_json(path, what)
    graphs = doc.get("graphs") if isinstance(doc, dict) else None
    if not isinstance(graphs, list):
        raise LowrankInputError(f"{what} {str(path)!r} has no 'graphs' list: expected the JSON the backend writes "
                                "to options['report']")
    out = []
    for g_index, g in enumerate(graphs):
        for p in (g.get("passes") or []) if isinstance(g, dict) else []:
            if not isinstance(p, dict) or p.get("name") != "lowrank-split":
                continue
            for d in p.get("decisions") or []:
                rank = d.get("rank") if isinstance(d, dict) else None
                curve = rank.get("error_curve") if isinstance(rank, dict) else None
                if curve is None:
                    continue
                if not (isinstance(curve, dict) and all(isinstance(curve.get(k), list) for k in
                                                        ("kept_fraction", "relative_error"))
                        and len(curve["kept_fraction"]) == len(curve["relative_error"]) > 0
                        and isinstance(curve.get("chosen"), dict)):
                    raise LowrankInputError(f"{what} {str(path)!r}: graph {g_index}, layer {d.get('layer')!r}: "
                                            "malformed 'error_curve' (expected kept_fraction and relative_error "
                                            "lists of one length, and chosen)")
                out.append({"graph": g.get("index", g_index), "layer": d.get("layer"), "method": rank.get("method"),
                            "shape": rank.get("shape"), "rank": rank.get("rank"), "curve": curve})
    return out


def lowrank_section(compile_report: str | Path | None = None, quality: str | Path | None = None
                    ) -> dict[str, Any] | None:
    """The report's `lowrank` key: {compile_report, layers, quality} (a part null when its file was not given), or
    None when neither was given or the compile report has no low-rank layer and no quality file was given."""
    layers = load_layer_curves(compile_report) if compile_report is not None else None
    q = load_quality(quality) if quality is not None else None
    if not layers and q is None:
        return None
    return {"compile_report": str(compile_report) if compile_report is not None else None, "layers": layers or None,
            "quality": q}


def _figure(figsize: tuple[float, float], dpi: int) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=dpi)


def _png(fig: Any) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _methods(rows: list[dict[str, Any]]) -> list[str]:
    found = {r["method"] for r in rows}
    return [m for m in METHOD_ORDER if m in found] + sorted(found - set(METHOD_ORDER))


def quality_series(quality: Mapping[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """{line label: [(kept fraction, perplexity)] sorted by kept fraction}: one line per model and method (the label
    is the method alone when the file holds one model)."""
    rows = quality["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    out: dict[str, list[tuple[float, float]]] = {}
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        for method in _methods(mine):
            label = method if len(models) == 1 else f"{model} {method}"
            out[label] = sorted((r["kept_fraction"], r["perplexity"]) for r in mine if r["method"] == method)
    return out


def quality_figure(quality: Mapping[str, Any], dpi: int = 110) -> Any:
    """Perplexity against kept fraction (x inverted: less kept to the right), dense per model as a dashed line."""
    fig = _figure((7, 4.4), dpi)
    ax = fig.add_subplot(1, 1, 1)
    series = quality_series(quality)
    for label, pts in series.items():
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
    dense = {r["model"]: r["dense_perplexity"] for r in quality["rows"] if r["dense_perplexity"] is not None}
    for (model, ppl), style in zip(dense.items(), ("--", ":", "-.", (0, (5, 5)))):
        ax.axhline(ppl, color="gray", linestyle=style, lw=1, label=f"{model} dense {ppl:.2f}")
    ax.set_xlabel("kept fraction of the targeted linears' parameters")
    ax.set_ylabel("validation perplexity")
    values = [y for pts in series.values() for _, y in pts] + list(dense.values())
    if max(values) > 3 * min(values):  # a method that blows up would flatten the others on a linear axis
        import matplotlib.ticker

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.invert_xaxis()
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(_quality_title(quality), fontsize=9)
    return fig


def _quality_title(quality: Mapping[str, Any]) -> str:
    cal = quality.get("calibration") or {}
    parts = [f"{quality['windows']} validation windows" if quality.get("windows") else None,
             f"calibration {cal['samples']} x {cal['seq_len']}" if cal.get("samples") else None,
             str(quality["device"]) if quality.get("device") else None,
             f"commit {str(quality['git']['commit'])[:10]}" if (quality.get("git") or {}).get("commit") else None]
    return "lowrank-split: perplexity / kept fraction\n" + ", ".join(p for p in parts if p)


def curves_figure(layers: list[dict[str, Any]], dpi: int = 110) -> Any:
    """Each layer's relative output error against its kept fraction (one line per layer, coloured by the layer's
    kind: its last name component), the rank it got as a black dot; log y (errors span decades)."""
    fig = _figure((7, 4.4), dpi)
    import matplotlib

    ax = fig.add_subplot(1, 1, 1)
    kinds = list(dict.fromkeys(_kind(x["layer"]) for x in layers))
    cmap = matplotlib.colormaps["tab10"]
    for x in layers:
        c = x["curve"]
        i = kinds.index(_kind(x["layer"]))
        pts = [(k, e) for k, e in zip(c["kept_fraction"], c["relative_error"]) if e > 0]
        ax.plot([k for k, _ in pts], [e for _, e in pts], color=cmap(i % 10), lw=0.8, alpha=0.7)
    chosen = [x["curve"]["chosen"] for x in layers if x["rank"] != "dense" and x["curve"]["chosen"]["relative_error"] > 0]
    ax.scatter([c["kept_fraction"] for c in chosen], [c["relative_error"] for c in chosen], s=14, c="black", zorder=3,
               label=f"rank chosen ({len(chosen)} split)")
    for i, kind in enumerate(kinds):
        ax.plot([], [], color=cmap(i % 10), label=kind)
    ax.set_xlabel("kept fraction of the layer's parameters, r (N + K) / (N K)")
    ax.set_ylabel("relative output error E(r) / E(0)")
    ax.set_yscale("log")
    ax.set_xlim(0, 1)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    dense = sum(1 for x in layers if x["rank"] == "dense")
    ax.set_title(f"lowrank-split: error curves the rank allocation used, {len(layers)} layers"
                 f"{f' ({dense} left dense: not marked)' if dense else ''}", fontsize=9)
    return fig


def _kind(layer: str | None) -> str:
    return (layer or "?").rsplit(".", 1)[-1]


def _img(png: bytes, alt: str, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def section_html(section: Mapping[str, Any], dpi: int = 110) -> str:
    """The section: heading, the layer-curve plot (compile report), the perplexity plot and its table (quality)."""
    e = html.escape
    parts = ["<h2>Low-rank quality / size</h2>"]
    layers = section.get("layers")
    if layers:
        split = sum(1 for x in layers if x["rank"] != "dense")
        parts.append(_img(_png(curves_figure(layers, dpi)), "low-rank error curves",
                          f"From {section['compile_report']}: {len(layers)} layers the rank allocation saw, {split} "
                          "split. Relative output error measured on the dense model's calibration activations "
                          "(the curves the allocation spends the ratio budget on), black dots at the ranks the "
                          "layers got."))
    q = section.get("quality")
    if q:
        git = q.get("git") or {}
        commit = f", commit {str(git.get('commit'))[:10]}{' (dirty)' if git.get('dirty') else ''}" \
            if git.get("commit") else ""
        missing = f" Rows not measured: {', '.join(q['missing_runs'])}." if q.get("missing_runs") else ""
        parts.append(_img(_png(quality_figure(q, dpi)), "perplexity against kept fraction",
                          f"From {q['source']}{commit}: validation perplexity against the kept fraction of the "
                          f"targeted linears' parameters (measured, from each row's compile report).{missing}"))
        parts.append("<table><tr><th>model</th><th>method</th><th class=\"n\">kept</th><th class=\"n\">perplexity"
                     "</th><th class=\"n\">vs dense</th></tr>")
        for r in sorted(q["rows"], key=lambda r: (r["model"], METHOD_ORDER.index(r["method"])
                                                  if r["method"] in METHOD_ORDER else 99, -r["kept_fraction"])):
            delta = "" if r["delta_pct"] is None else f"{r['delta_pct']:+.1f} %"
            parts.append(f"<tr><td>{e(r['model'])}</td><td>{e(r['method'])}</td>"
                         f"<td class=\"n\">{r['kept_fraction']:.3f}</td><td class=\"n\">{r['perplexity']:.3f}</td>"
                         f"<td class=\"n\">{e(delta)}</td></tr>")
        parts.append("</table>")
    return "\n".join(parts)
