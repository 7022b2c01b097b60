"""Research logs to safe HTML: markdown-it with raw HTML off, images off and a link allow-list.

That is the whole sanitiser. Raw HTML in a log (``<script>``, ``<img onerror=...>``) is escaped
into text, a link whose scheme is not http, https or mailto (``javascript:``, ``data:``,
``vbscript:``, ``file:``) is left as plain text, and images are not rendered (an image would make
the browser fetch a URL on its own). The viewer's Content-Security-Policy (no inline script, no
foreign origin) is a second fence. ``[[artifact:ID]]`` references become placeholders that the page
fills with the interactive graph.
"""

from __future__ import annotations

import re

from markdown_it import MarkdownIt

ARTIFACT_REF = re.compile(r"\[\[artifact:([A-Za-z0-9][A-Za-z0-9_.-]{0,120})\]\]")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")
SAFE_SCHEMES = frozenset({"http", "https", "mailto"})


def link_allowed(url: str) -> bool:
    """True for http(s) / mailto URLs and scheme-less (relative or #fragment) ones."""
    # Browsers ignore ASCII whitespace and control characters inside a scheme ("java\tscript:").
    cleaned = re.sub(r"[\x00-\x20\x7f]+", "", url)
    m = _SCHEME.match(cleaned)
    if m is None:
        return not cleaned.startswith("//")  # protocol-relative URLs reach another host
    return m.group(1).lower() in SAFE_SCHEMES


def _renderer() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
    md.enable("table").enable("strikethrough")
    md.disable("image")
    md.validateLink = link_allowed  # type: ignore[method-assign]
    return md


_MD = _renderer()


_COMMENT_LINE = re.compile(r"^<!--.*-->[ \t]*$", re.MULTILINE)


def render_markdown(text: str) -> str:
    """Sanitised HTML of a markdown document, artifact references turned into placeholders.

    Whole-line HTML comments (the research log's entry markers) are dropped, not shown."""
    html = _MD.render(_COMMENT_LINE.sub("", text))
    return ARTIFACT_REF.sub(
        lambda m: f'<span class="artifact-slot" data-artifact="{m.group(1)}"></span>', html)


def artifact_refs(text: str) -> list[str]:
    """Artifact ids cited in a markdown document, in order, without repeats."""
    return list(dict.fromkeys(ARTIFACT_REF.findall(text)))
