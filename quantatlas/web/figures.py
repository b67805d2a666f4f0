"""Plotly figures, built with plotly's figure objects (plotly.graph_objects, which validate every
property) and handed to the page as plain JSON (data + layout) for plotly.js.

User strings (arm names, titles) reach plotly's hover text, which understands a few HTML
tags; they are escaped here so they show as text. A point with a non-finite coordinate is left
out (the rest still draws), and the JSON never holds NaN or Infinity (`records.plain`).
"""
from __future__ import annotations

import html
import math
import zlib

import plotly.graph_objects as go

from quantatlas.atlas.records import plain

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
BITS_TITLES = {"bits_per_weight": "bits per quantized weight", "bits_per_param": "bits per parameter (whole model)"}
#: the landscape is coloured by model family (architecture, atlas/architecture.py): one colour per family on
#: every plot; orange stays the llama.cpp reference points
FAMILY_COLOURS = {"qwen3": PALETTE[0], "llama": PALETTE[2], "qwen3_moe": PALETTE[4], "mixtral": PALETTE[5],
                  "unknown": PALETTE[7]}
OTHER_FAMILY_COLOURS = (PALETTE[3], PALETTE[6], PALETTE[8], PALETTE[9])


def family_colour(family: str | None) -> str:
    """A model family's colour: fixed for the zoo's and unknown, else one of the others by a stable hash."""
    if family in FAMILY_COLOURS:
        return FAMILY_COLOURS[family]
    return OTHER_FAMILY_COLOURS[zlib.crc32(str(family).encode()) % len(OTHER_FAMILY_COLOURS)]


def _e(s) -> str:
    return html.escape(str(s if s is not None else ""), quote=True)


def _finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def _as_json(fig: go.Figure) -> dict:
    """data + layout as plain JSON, without the template plotly.py adds (plotly.js's defaults)."""
    d = fig.to_plotly_json()
    d["layout"].pop("template", None)
    return plain({"data": d["data"], "layout": d["layout"]})


def _hover(p: dict) -> str:
    se = p.get("kld_se")
    tokens = p.get("tokens")
    return (f"<b>{_e(p['arm'])}</b> ({_e(p['experiment'])})<br>{_e(p['title'])}<br>"
            f"KLD {p['kld_mean']:.4g}{f' ± {se:.2g}' if _finite(se) else ''} at {p['bits']:.4g} bits<br>"
            f"{f'{tokens:,} tokens scored · ' if isinstance(tokens, int) else ''}{p['n_runs']} run(s)"
            f"{' · Pareto' if p['pareto'] else ''}<br>{_e(', '.join(p['techniques']) or 'fp16')}")


def _label(p: dict) -> str:
    return _e(p.get("label") or f"{p['arm']} · {p['experiment']}")


def landscape_figure(group: dict, bits: str) -> dict:
    """Mean KLD (log) against bits: arms, llama.cpp reference points, the Pareto frontier (a
    staircase: what the best known arm at most this many bits reaches). Each point has its SE as an
    error bar and its arm, experiment, SE and tokens scored on hover; the points on the frontier and
    the llama.cpp formats are labelled with arm and experiment."""
    drawable = [p for p in group["points"] if _finite(p.get("bits"), p.get("kld_mean"))]
    ours = [p for p in drawable if not p["llamacpp"]]
    refs = [p for p in drawable if p["llamacpp"]]
    frontier = [f for f in group["frontier"] if _finite(f.get("bits"), f.get("kld_mean"))]

    def trace(points, name, symbol, colour, label_all=False):
        se = [p.get("kld_se") if _finite(p.get("kld_se")) else 0.0 for p in points]
        text = [_label(p) if label_all or p["pareto"] else "" for p in points]
        return go.Scatter(mode="markers+text", name=name,
                          x=[p["bits"] for p in points], y=[p["kld_mean"] for p in points],
                          error_y={"type": "data", "array": se, "visible": True, "thickness": 1, "width": 3,
                                   "color": colour},
                          customdata=[[p["url"]] for p in points], hovertext=[_hover(p) for p in points],
                          hoverinfo="text", text=text, textposition="top center",
                          textfont={"size": 10, "color": "#555"},
                          marker={"symbol": symbol, "size": 11, "color": colour,
                                  "line": {"width": [2.5 if p["pareto"] else 0.5 for p in points], "color": "#111"}})

    data = []
    if frontier:
        data.append(go.Scatter(mode="lines", name="Pareto frontier", hoverinfo="skip",
                               x=[f["bits"] for f in frontier], y=[f["kld_mean"] for f in frontier],
                               line={"shape": "hv", "dash": "dot", "color": "#444", "width": 1.5}))
    if ours:   # in the colour of the model's family (the plot's header names it in the same colour)
        data.append(trace(ours, "arms", "circle", family_colour(group.get("family"))))
    if refs:
        data.append(trace(refs, "llama.cpp formats (reference)", "diamond", PALETTE[1], label_all=True))
    layout = {
        "xaxis": {"title": {"text": BITS_TITLES.get(bits, bits)}, "zeroline": False},
        "yaxis": {"title": {"text": "mean KLD (log)"}, "type": "log"},
        "hovermode": "closest", "height": 460, "margin": {"l": 70, "r": 20, "t": 20, "b": 50},
        "legend": {"orientation": "h", "y": -0.18}, "plot_bgcolor": "#fbfbfd",
    }
    return _as_json(go.Figure(data=data, layout=go.Layout(template="none", **layout)))


def kld_ecdf_figure(dist: dict) -> dict:
    """Per arm, the empirical CDF of per-token KLD (pooled over seeds), KLD on a log axis."""
    data = []
    for i, a in enumerate(dist["arms"]):
        xy = [(x, y) for x, y in zip(a["x"], a["y"]) if _finite(x, y)]
        data.append(go.Scatter(mode="lines", name=_e(a["arm"]), x=[x for x, _ in xy], y=[y for _, y in xy],
                               line={"shape": "hv", "width": 1.8, "color": PALETTE[i % len(PALETTE)]},
                               hovertemplate="KLD %{x:.4g}<br>F %{y:.4f}<extra>" + _e(a["arm"]) + "</extra>"))
    layout = {
        "xaxis": {"title": {"text": "per-token KLD (log)"}, "type": "log"},
        "yaxis": {"title": {"text": "fraction of tokens with KLD ≤ x"}, "range": [0, 1.02]},
        "height": 360, "margin": {"l": 70, "r": 20, "t": 10, "b": 50}, "hovermode": "closest",
        "legend": {"orientation": "h", "y": -0.25}, "plot_bgcolor": "#fbfbfd",
    }
    return _as_json(go.Figure(data=data, layout=go.Layout(template="none", **layout)))
