"""The subset of Drive v2's ``q`` search language the emulator understands.

Supported terms (combined with ``and``, ``or``, ``not`` and parentheses, as Drive does)::

    title = 'x'   title != 'x'   title contains 'x'
    mimeType = 'x'   mimeType != 'x'
    trashed = true|false
    'ID' in parents          (``'root'`` is the account's root folder)
    'EMAIL' in owners | writers | readers

Strings are single-quoted with ``\\'`` and ``\\\\`` escapes, as in Drive. Anything else raises :class:`QueryError`,
which the server answers with Drive's 400 ``invalid`` error, like the real API does for a query it cannot parse.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["FileView", "QueryError", "compile_query"]


class QueryError(ValueError):
    """The query is not in the supported subset (or is malformed)."""


@dataclass(frozen=True)
class FileView:
    """What a query can look at: one file as seen by the caller's account."""

    title: str
    mime_type: str
    trashed: bool
    parents: frozenset[str]
    owners: frozenset[str]
    writers: frozenset[str]
    readers: frozenset[str]


Predicate = Callable[[FileView], bool]

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>'(?:[^'\\]|\\.)*')
      | (?P<op>!=|=|\(|\))
      | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
    )""",
    re.VERBOSE,
)


def _tokenize(q: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(q):
        if q[pos:].strip() == "":
            break
        match = _TOKEN.match(q, pos)
        if not match:
            raise QueryError(f"Invalid Value at position {pos}")
        kind = match.lastgroup or ""
        text = match.group(kind)
        if kind == "string":
            text = re.sub(r"\\(.)", r"\1", text[1:-1])
        tokens.append((kind, text))
        pos = match.end()
    return tokens


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.tokens = tokens
        self.pos = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            raise QueryError("Invalid Value: unexpected end of query")
        self.pos += 1
        return token

    def is_word(self, word: str) -> bool:
        token = self.peek()
        return token is not None and token[0] == "word" and token[1].lower() == word

    def parse(self) -> Predicate:
        predicate = self.parse_or()
        if self.peek() is not None:
            raise QueryError(f"Invalid Value near {self.peek()[1]!r}")  # type: ignore[index]
        return predicate

    def parse_or(self) -> Predicate:
        parts = [self.parse_and()]
        while self.is_word("or"):
            self.take()
            parts.append(self.parse_and())
        return parts[0] if len(parts) == 1 else (lambda f: any(p(f) for p in parts))

    def parse_and(self) -> Predicate:
        parts = [self.parse_not()]
        while self.is_word("and"):
            self.take()
            parts.append(self.parse_not())
        return parts[0] if len(parts) == 1 else (lambda f: all(p(f) for p in parts))

    def parse_not(self) -> Predicate:
        if self.is_word("not"):
            self.take()
            inner = self.parse_not()
            return lambda f: not inner(f)
        return self.parse_primary()

    def parse_primary(self) -> Predicate:
        token = self.take()
        if token == ("op", "("):
            inner = self.parse_or()
            if self.take() != ("op", ")"):
                raise QueryError("Invalid Value: missing ')'")
            return inner
        if token[0] == "string":
            return self.parse_membership(token[1])
        if token[0] == "word":
            return self.parse_comparison(token[1])
        raise QueryError(f"Invalid Value near {token[1]!r}")

    def parse_membership(self, value: str) -> Predicate:
        if not self.is_word("in"):
            raise QueryError("Invalid Value: expected 'in' after a string")
        self.take()
        kind, collection = self.take()
        if kind != "word" or collection not in ("parents", "owners", "writers", "readers"):
            raise QueryError(f"Invalid Value: cannot search in {collection!r}")
        return lambda f: value in getattr(f, collection)

    def parse_comparison(self, field: str) -> Predicate:
        op_kind, op = self.take()
        if op_kind == "word" and op == "contains":
            op = "contains"
        elif op_kind != "op" or op not in ("=", "!="):
            raise QueryError(f"Invalid Value: unsupported operator {op!r}")
        kind, raw = self.take()
        value: Any
        if field == "trashed":
            if kind != "word" or raw not in ("true", "false") or op == "contains":
                raise QueryError("Invalid Value: trashed compares to true or false")
            value = raw == "true"
            return (lambda f: f.trashed == value) if op == "=" else (lambda f: f.trashed != value)
        if field not in ("title", "mimeType") or kind != "string":
            raise QueryError(f"Invalid Value: unsupported field {field!r}")
        attr = "title" if field == "title" else "mime_type"
        if op == "=":
            return lambda f: getattr(f, attr) == raw
        if op == "!=":
            return lambda f: getattr(f, attr) != raw
        if field != "title":
            raise QueryError("Invalid Value: contains works on title only")
        needle = raw.lower()
        return lambda f: needle in f.title.lower()


def compile_query(q: str | None) -> Predicate:
    """Compile ``q`` into a predicate over :class:`FileView`; an empty query matches everything."""
    if not q or not q.strip():
        return lambda f: True
    return _Parser(_tokenize(q)).parse()
