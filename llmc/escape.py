"""Safe embedding of user strings (spec paths, names, free text) into emitted files.

Every function returns text that the target language's own parser reads back as exactly the value
given (or, for comments, as one comment that cannot end early), whatever the input holds: newlines,
quotes, ``$()``, backticks, NUL, or Unicode line separators (U+0085, U+2028, U+2029, which YAML 1.1
treats as line breaks).

API
---
``visible(s) -> str``
    ``s`` on one printable line: backslash, and every character ``str.isprintable`` rejects (controls,
    line/paragraph separators, format characters such as bidi overrides, surrogates), are written
    as Python-style escapes (``\\\\``, ``\\n``, ``\\r``, ``\\t``, ``\\xNN``, ``\\uNNNN``, ``\\UNNNNNNNN``).
``comment(text, lang) -> str``
    A whole one-line comment, marker included, for ``lang`` in ``COMMENT_LANGS``:
    ``"py"``/``"sh"``/``"yaml"`` -> ``"# " + visible(text)``; ``"md"`` -> ``"<!-- ... -->"``
    with ``--`` broken up so the comment cannot close early. In ``py`` a PEP 263 encoding
    declaration (``coding:``/``coding=``) is broken up too, so a comment on line 1 or 2 cannot change
    how Python decodes the file.
``sh_quote(s) -> str``
    ``shlex.quote(s)``; ``ValueError`` for NUL, which no shell argument can carry.
``py_literal(v) -> str``
    A Python literal (``repr``) for ``str``, ``int``, ``bool`` or ``None``; ``ast.literal_eval`` gives ``v``.
``yaml_scalar(s) -> str``
    A one-line YAML double-quoted scalar (PyYAML's emitter, no line folding); ``yaml.safe_load``
    gives ``s`` back.
``md_text(s) -> str``
    Markdown inline text that renders as ``visible(s)``: every ASCII punctuation character is
    backslash-escaped (CommonMark 0.31 section 2.4, "Backslash escapes"), so no emphasis, link, HTML or
    code span can start.
JSON needs nothing here: ``json.dumps`` escapes every control character (RFC 8259 section 7).
"""

from __future__ import annotations

import re
import shlex
import string

import yaml

COMMENT_LANGS = ("py", "sh", "yaml", "md")

_NAMED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
# PEP 263: a comment on line 1 or 2 matching this declares the source encoding.
_PEP263 = re.compile(r"(coding)([:=])")
_MD_PUNCT = frozenset(string.punctuation)


def visible(s: str) -> str:
    """``s`` on one line, with backslashes and non-printable characters escaped Python-style."""
    out = []
    for ch in s:
        if ch in _NAMED:
            out.append(_NAMED[ch])
        elif ch.isprintable():
            out.append(ch)
        else:
            o = ord(ch)
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")
    return "".join(out)


def comment(text: str, lang: str) -> str:
    """One comment line (marker included) that shows ``text`` and cannot end early."""
    body = visible(text)
    if lang == "py":
        return "# " + _PEP263.sub(lambda m: m.group(1) + ("\\x3a" if m.group(2) == ":" else "\\x3d"), body)
    if lang in ("sh", "yaml"):
        return "# " + body
    if lang == "md":
        while "--" in body:
            body = body.replace("--", "-\\x2d")
        return f"<!-- {body} -->"
    raise ValueError(f"comment: unknown language {lang!r} (one of {', '.join(COMMENT_LANGS)})")


def sh_quote(s: str) -> str:
    """A single POSIX shell word that expands to exactly ``s``."""
    if "\0" in s:
        raise ValueError(f"shell arguments cannot contain NUL: {visible(s)}")
    return shlex.quote(s)


def py_literal(v: str | int | bool | None) -> str:
    """A Python literal for ``v`` (``ast.literal_eval`` returns ``v``)."""
    if v is None or isinstance(v, str | int):  # bool is an int
        return repr(v)
    raise TypeError(f"py_literal: unsupported type {type(v).__name__}")


def yaml_scalar(s: str) -> str:
    """A one-line, double-quoted YAML scalar for ``s``."""
    if not isinstance(s, str):
        raise TypeError(f"yaml_scalar: expected str, got {type(s).__name__}")
    text = yaml.safe_dump(s, default_style='"', width=float("inf"), allow_unicode=False)
    return text.rstrip("\n")


def md_text(s: str) -> str:
    """Markdown inline text that renders literally as ``visible(s)``."""
    return "".join("\\" + ch if ch in _MD_PUNCT else ch for ch in visible(s))
