"""Prometheus-style label selectors for ``/query``: ``{a="b", c!="d", e=~"x.*", f!~"y"}``.

An optional metric name in front (``parca_agent_cpu{pid="1"}``) is a ``__name__`` matcher, as in
PromQL. Regular expressions match the whole value (PromQL anchors them). The text comes from
anyone who can reach the port, so its length is bounded and every error is a SelectorError whose
message is safe to show (the caller escapes it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_SELECTOR_CHARS = 4096
MAX_MATCHERS = 64

_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_METRIC = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_OPS = ("=~", "!~", "!=", "=")  # longest first, so "=~" is not read as "="
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "`": "`"}


class SelectorError(ValueError):
    """The selector does not parse; the message says where and why."""


@dataclass(frozen=True)
class Matcher:
    name: str
    op: str
    value: str
    pattern: re.Pattern | None = None

    def matches(self, labels: dict[str, str]) -> bool:
        # A missing label matches as the empty string, as in PromQL.
        actual = labels.get(self.name, "")
        if self.op == "=":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        hit = self.pattern.fullmatch(actual) is not None
        return hit if self.op == "=~" else not hit


@dataclass(frozen=True)
class Selector:
    matchers: tuple[Matcher, ...]

    def matches(self, labels: dict[str, str]) -> bool:
        return all(m.matches(labels) for m in self.matchers)


class _Reader:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def fail(self, what: str) -> SelectorError:
        return SelectorError(f"{what} at position {self.pos + 1}")

    def take(self, pattern: re.Pattern, what: str) -> str:
        m = pattern.match(self.text, self.pos)
        if not m:
            raise self.fail(f"expected {what}")
        self.pos = m.end()
        return m.group(0)

    def take_string(self) -> str:
        quote = self.peek()
        if quote not in ('"', "'", "`"):
            raise self.fail("expected a quoted value")
        self.pos += 1
        out = []
        while True:
            if self.pos >= len(self.text):
                raise self.fail("unterminated string")
            ch = self.text[self.pos]
            self.pos += 1
            if ch == quote:
                return "".join(out)
            if ch == "\\" and quote != "`":
                if self.pos >= len(self.text):
                    raise self.fail("unterminated string")
                esc = self.text[self.pos]
                if esc not in _ESCAPES:
                    raise self.fail(f"unknown escape \\{esc}")
                out.append(_ESCAPES[esc])
                self.pos += 1
            else:
                out.append(ch)


def parse(text: str) -> Selector:
    """Parse a selector; raise SelectorError with a message fit for a 400 answer."""
    if len(text) > MAX_SELECTOR_CHARS:
        raise SelectorError(f"selector is longer than {MAX_SELECTOR_CHARS} characters")
    r = _Reader(text)
    matchers: list[Matcher] = []
    r.skip_space()
    if r.peek() and r.peek() != "{":
        matchers.append(Matcher("__name__", "=", r.take(_METRIC, "a metric name or {")))
        r.skip_space()
    if r.peek() == "{":
        r.pos += 1
        r.skip_space()
        while r.peek() != "}":
            if not r.peek():
                raise r.fail("missing }")
            matchers.append(_matcher(r))
            if len(matchers) > MAX_MATCHERS:
                raise SelectorError(f"more than {MAX_MATCHERS} matchers")
            r.skip_space()
            if r.peek() == ",":
                r.pos += 1
                r.skip_space()
            elif r.peek() != "}":
                raise r.fail("expected , or }" if r.peek() else "missing }")
        r.pos += 1
        r.skip_space()
    if r.pos != len(text):
        raise r.fail("unexpected text after the selector")
    if not matchers:
        raise SelectorError("empty selector: give a metric name or {label=\"value\"}")
    return Selector(tuple(matchers))


def _matcher(r: _Reader) -> Matcher:
    name = r.take(_NAME, "a label name")
    r.skip_space()
    op = next((o for o in _OPS if r.text.startswith(o, r.pos)), None)
    if op is None:
        raise r.fail("expected one of = != =~ !~")
    r.pos += len(op)
    r.skip_space()
    value = r.take_string()
    pattern = None
    if op in ("=~", "!~"):
        try:
            pattern = re.compile(value)
        except re.error as e:
            raise SelectorError(f"bad regular expression for {name}: {e}") from None
    return Matcher(name, op, value, pattern)


def format_labels(labels: dict[str, str]) -> str:
    """The selector that matches exactly these labels (for links to /query)."""
    def quote(v: str) -> str:
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return "{" + ", ".join(f"{k}={quote(v)}" for k, v in sorted(labels.items())) + "}"
