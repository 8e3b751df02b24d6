"""HTML pages from the templates in templates/, with every value escaped.

Labels, process names and command lines are chosen by whoever runs a process, so nothing from a
profile reaches HTML without ``html.escape``. ``Markup`` marks the few fragments built here from
escaped parts; plain ``str`` values are always escaped when a template is filled.
"""

from __future__ import annotations

import html
import string
from pathlib import Path

TEMPLATES = Path(__file__).parent / "templates"


class Markup(str):
    """HTML that is already safe: only made by the functions of this module."""


def escape(value) -> Markup:
    if isinstance(value, Markup):
        return value
    return Markup(html.escape(str(value), quote=True))


def _load(name: str) -> string.Template:
    return string.Template((TEMPLATES / name).read_text(encoding="utf-8"))


_LAYOUT = _load("layout.html")
_BODIES = {name: _load(f"{name}.html") for name in ("index", "target", "query", "message")}
# Only the profile page draws a flame graph; the others skip the libraries' 340 kB.
_SCRIPTS = {"index": ["ui.js"], "target": ["d3.min.js", "d3-flamegraph.min.js", "ui.js"]}


def render(page: str, title: str, **values) -> bytes:
    """The page's template inside the layout; values are escaped unless they are Markup."""
    body = _BODIES[page].substitute({k: escape(v) for k, v in values.items()})
    scripts = "\n".join(f'<script src="/static/{name}"></script>'
                        for name in _SCRIPTS.get(page, []))
    return _LAYOUT.substitute(title=escape(title), body=body, page=escape(page),
                              scripts=scripts).encode("utf-8")


def label_chips(labels: dict[str, str]) -> Markup:
    """Labels as ``name="value"`` chips, the same look the scripts give them."""
    chips = "".join(
        f'<span class="chip"><span class="chip-name">{escape(k)}</span>='
        f'<span class="chip-value">{escape(v)}</span></span>'
        for k, v in sorted(labels.items()) if k != "__name__")
    return Markup(chips or '<span class="muted">no labels</span>')
