"""Function records parsed from the Python standard library: the shared source of the code tasks.

The documents are exactly those ``steplab data prepare --source stdlib`` reads (``iter_documents``), so a
task item's ``key`` (its document) puts it on the same side of the split as the document is in training.
Parsing is line-based (a regex for one-line ``def`` headers), not ``ast``: it takes ~1 s for the whole
standard library and never fails on a file that does not parse under this Python.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

DEF = re.compile(r"^(\s*)(?:async\s+)?def \w+\(.*\)(?:\s*->\s*[^:]+)?:\s*$")
DOC = re.compile(r'^\s*[rRuU]?("""|\'\'\')(.*)$')
CONTEXT_CHARS = 400  # text before the line in question that goes into the prompt
MAX_BYTES = 12_000_000  # the quickstart's corpus (the whole standard library here)


@dataclass(frozen=True)
class Function:
    doc: str  # the document it comes from (the split key)
    context: str  # lines before the def header (at most CONTEXT_CHARS, whole lines)
    header: str  # the def line, without its newline
    next_line: str  # the first non-blank line after the header, without its newline
    docstring: str  # the docstring's first line (text after the quotes, closing quotes removed), or ""


@functools.lru_cache(maxsize=1)
def stdlib_documents() -> tuple[str, ...]:
    from steplab.data.sources import iter_documents

    return tuple(iter_documents("stdlib", max_bytes=MAX_BYTES))


def context_before(lines: list[str], i: int, chars: int = CONTEXT_CHARS) -> str:
    """Whole lines before line ``i`` (each with its newline), at most ``chars`` characters."""
    out: list[str] = []
    size = 0
    for line in reversed(lines[max(0, i - 40):i]):
        if size + len(line) + 1 > chars:
            break
        out.append(line + "\n")
        size += len(line) + 1
    return "".join(reversed(out))


@functools.lru_cache(maxsize=1)
def stdlib_functions() -> tuple[Function, ...]:
    out = []
    for doc in stdlib_documents():
        lines = doc.split("\n")
        for i, line in enumerate(lines[:-1]):
            if not DEF.match(line) or len(line) > 120:
                continue
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            if j >= len(lines) or len(lines[j]) > 120:
                continue
            nxt = lines[j]
            m = DOC.match(nxt)
            docstring = ""
            if m:
                docstring = m.group(2).split(m.group(1))[0].rstrip()
            out.append(Function(doc, context_before(lines, i), line, nxt, docstring))
    return tuple(out)


def reindent(line: str, like: str) -> str:
    """``line`` with the leading whitespace of ``like`` (so indentation gives no choice away)."""
    return like[:len(like) - len(like.lstrip())] + line.lstrip()
