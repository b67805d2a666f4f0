"""Server-rendered pages: the Jinja templates with the atlas's number filters, and the plotly.js
that the installed plotly package ships (the pages load nothing from elsewhere)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from quantatlas.atlas.records import plain

HERE = Path(__file__).resolve().parent


def plotly_js() -> Path:
    """plotly.min.js as shipped inside the installed plotly package."""
    import plotly

    path = Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise RuntimeError(f"plotly.min.js not found at {path}: reinstall plotly")
    return path


def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) >= 1e7 or abs(v) < 1e-4):
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}"
    return str(v)


def pct(v: Any) -> str:
    return "–" if v is None else f"{100 * v:+.1f} %"


def short(v: Any, n: int = 12) -> str:
    s = "" if v is None else str(v)
    return s if len(s) <= n else s[:n] + "…"


def repro(row: dict) -> str:
    if row.get("reproductions") is None:
        return row.get("reproductions_column") or "–"
    n, agree = row["reproductions"], row.get("reproductions_agree") or 0
    return "0" if n == 0 else f"{agree}/{n} agree"


class Pages:
    """The page templates (autoescaped); `render` answers one page."""

    def __init__(self, folder: Path = HERE / "templates"):
        env = Environment(loader=FileSystemLoader(str(folder)), autoescape=select_autoescape(default=True),
                          trim_blocks=True, lstrip_blocks=True)
        env.filters.update(fmt=fmt, pct=pct, short=short, repro=repro)
        # figures and other embedded JSON: strict (plotly.js's JSON.parse refuses NaN and Infinity)
        env.policies["json.dumps_function"] = lambda obj, **kw: json.dumps(plain(obj), allow_nan=False, **kw)
        self.env = env

    def render(self, name: str, status: int = 200, **context) -> HTMLResponse:
        return HTMLResponse(self.env.get_template(name).render(**context), status_code=status)
