"""llmc.escape: hostile strings parsed back by each language's own parser never add statements."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import tokenize
from io import BytesIO

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmc.escape import comment, md_text, py_literal, sh_quote, visible, yaml_scalar

HOSTILE = ["\n", "\r", "\r\n", "\u2028", "\u2029", "\u0085", "\x00", "\x0b", "\x0c", "\x1b[2J", "'", '"',
           "`id`", "$(id)", "${HOME}", "\\", "\\n", "#", "-->", "--", "<!--", "*", "_", "[x](y)", "<b>",
           "&amp;", "\t", "\u202e", "\ufeff", "coding: utf-7", "coding=latin-1", ": ", "- ", "{a: 1}",
           "|", ">", "!!python/object", "&a", "*a", "%YAML", "---", "...", "é", "\U0001f600", "\\x0a"]

hostile = st.lists(st.one_of(st.sampled_from(HOSTILE), st.text(max_size=8)), max_size=12).map("".join)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _has_line_break(s: str) -> bool:
    return len(s.splitlines()) > 1 or any(c in s for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")


@SETTINGS
@given(hostile)
def test_visible_is_one_printable_line_and_invertible(s):
    v = visible(s)
    assert v.isprintable() and not _has_line_break(v)
    # the escapes are Python's: decoding them gives the string back
    assert ast.literal_eval('"' + v.replace('"', '\\"') + '"') == s


@SETTINGS
@given(hostile)
def test_py_comment_is_one_comment(s):
    src = f"x = 1  {comment(s, 'py')}\ny = 2\n"
    tree = ast.parse(src)
    assert [type(n) for n in tree.body] == [ast.Assign, ast.Assign]
    toks = [t for t in tokenize.tokenize(BytesIO(src.encode()).readline) if t.type == tokenize.COMMENT]
    assert len(toks) == 1 and toks[0].string == comment(s, "py")
    # on line 1 it can never be read as a PEP 263 encoding declaration
    first = (comment(s, "py") + "\nx = 1\n").encode()
    assert tokenize.detect_encoding(BytesIO(first).readline)[0] == "utf-8"


def test_pep263_declaration_is_broken():
    assert "coding:" not in comment("x coding: utf-7", "py")
    assert "coding=" not in comment("coding=latin-1", "py")


@SETTINGS
@given(hostile)
def test_py_literal_round_trips(s):
    lit = py_literal(s)
    tree = ast.parse(f"x = {lit}\n")
    assert len(tree.body) == 1
    assert ast.literal_eval(lit) == s
    for v in (None, True, 3):
        assert ast.literal_eval(py_literal(v)) == v
    with pytest.raises(TypeError):
        py_literal(1.5)


@SETTINGS
@given(hostile)
def test_yaml_scalar_and_comment_round_trip(s):
    doc = f"a: {yaml_scalar(s)}  {comment(s, 'yaml')}\nb: [{yaml_scalar(s)}]\n"
    assert "\n" not in yaml_scalar(s)
    assert yaml.safe_load(doc) == {"a": s, "b": [s]}
    assert yaml.safe_load(f"{comment(s, 'yaml')}\nc: 1\n") == {"c": 1}


@SETTINGS
@given(hostile)
def test_md_comment_and_text(s):
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark")
    c = comment(s, "md")
    assert c.startswith("<!-- ") and c.endswith(" -->") and "--" not in c[4:-3]
    assert not _has_line_break(c)
    toks = md.parse(f"before {md_text(s)} after\n")
    assert [t.type for t in toks] == ["paragraph_open", "inline", "paragraph_close"]
    kids = toks[1].children
    assert [t.type for t in kids] == ["text"] * len(kids)  # no emphasis, link, code or html
    assert "".join(t.content for t in kids) == f"before {visible(s)} after"


BASH = shutil.which("bash")


@pytest.mark.skipif(BASH is None, reason="bash not installed")
@settings(max_examples=60, deadline=None)
@given(hostile.filter(lambda s: "\x00" not in s))
def test_sh_quote_and_comment_with_bash(s):
    script = f"printf '%s' {sh_quote(s)}  {comment(s, 'sh')}\nexit 0\n"
    assert subprocess.run([BASH, "-n", "-c", script]).returncode == 0
    r = subprocess.run([BASH, "-c", script], capture_output=True)
    assert r.returncode == 0
    assert r.stdout.decode("utf-8", "surrogateescape") == s


def test_sh_quote_refuses_nul():
    with pytest.raises(ValueError, match="NUL"):
        sh_quote("a\x00b")


def test_unknown_comment_language():
    with pytest.raises(ValueError):
        comment("x", "c")


def test_json_needs_nothing():
    s = "a\n\u2028\x00\"'"
    assert json.loads(json.dumps(s)) == s and "\n" not in json.dumps(s)


def test_every_template_filter_fails_on_a_missing_context_key():
    """StrictUndefined everywhere: a key the emitter did not pass fails the render, also through ``py`` (whose
    ``repr`` of an Undefined would otherwise print the word ``Undefined`` into a generated Python file)."""
    from jinja2 import UndefinedError

    from llmc.emit.common import jinja_env

    env = jinja_env()
    for name in ("py", "cpy", "csh", "cyaml", "cmd", "sh", "yaml", "md", "visible"):  # llmc's filters
        with pytest.raises(UndefinedError, match="missing"):
            env.from_string("x = {{ missing | " + name + " }}").render()
    assert env.from_string("x = {{ v | py }}").render(v=1.5) == "x = 1.5"
