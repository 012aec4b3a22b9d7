"""Property: whatever a careless or hostile user does to a valid spec, ``llmc plan`` answers in time,
with exit code 0 or 1, no traceback, no INTERNAL error, and every error on one located line.

Structured mutations of every example in examples/ (drop a key, duplicate a key, replace a value by
a scalar of another type, a huge number, inf, nan, a negative, a string with newlines / NUL /
``../`` / ``$(...)``, a deep list, or an alias to another part of the spec), run through the
in-process CLI (``typer.testing.CliRunner`` on ``llmc.cli.app``): ``plan`` and ``plan --format json``.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import signal
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from llmc.cli import app

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
BASES = {p.name: yaml.safe_load(p.read_text()) for p in EXAMPLES}

#: ``file:line: severity[CODE] ...`` or ``file: severity[CODE] ...`` (no line), or a plain ``error: ...``
LOCATED = re.compile(r"^\S.*?(:\d+)?: (error|warning|info)\[[A-Z]+\d*\] .+$")



def _nest(n: int) -> list:
    out: list = []
    for _ in range(n):
        out = [out]
    return out


_deep = st.integers(10, 200).map(_nest)

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.just(10**30), st.just(-(10**20)),
    st.just(1e308), st.just(float("inf")), st.just(float("-inf")), st.just(float("nan")), st.just(-1),
    st.just(0), st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.sampled_from(["line\nbreak", "nul\x00byte", "../../etc", "/abs/path", "$(rm -rf /)", "`id`", "1e400",
                     ".inf", "15,6T", "", " ", "ü" * 5, "a" * 300, "16M", "true", "null", "~", "tiny",
                     "h100-sxm", "cpu", "{a: 1}", "[1, 2]", "*x", "&x y"]),
    st.text(max_size=10),
)
tweaks = st.sampled_from([0, 1, 2, 3, 5, 7, 12, 24, 96, 1000, 4097, 65536, 999_999, 2**20, 2**20 + 8,
                          0.5, 1e-9, 1e9, 1e15, 1e21, 0.99, 0.9999])
values = st.one_of(scalars, _deep, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=5), scalars,
                                                                                 max_size=2))


def _paths(d, prefix=()):
    if len(prefix) > 8:  # a spec is ~5 levels deep; below that are only injected deep lists
        return
    if isinstance(d, dict):
        for k, v in d.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


def _get(d, path):
    for p in path:
        d = d[p]
    return d


def _mutate(spec, data) -> str:
    """One to three structured mutations; the YAML text (aliases where values are shared)."""
    for _ in range(data.draw(st.integers(1, 3), label="n")):
        paths = list(_paths(spec))
        if not paths:
            break
        leaves = [p for p in paths if not isinstance(_get(spec, p), dict | list)]
        path = data.draw(st.sampled_from(leaves or paths) if data.draw(st.integers(0, 4), label="leaf")
                         else st.sampled_from(paths), label="path")
        try:
            parent = _get(spec, path[:-1])
            op = data.draw(st.sampled_from(["drop", "replace", "replace", "alias", "tweak", "tweak"]), label="op")
            old = parent[path[-1]]
            if op == "tweak":  # a type-valid but unusual number: what the compiler must survive
                if isinstance(old, int | float) and not isinstance(old, bool):
                    new = data.draw(tweaks, label="tweak")
                    parent[path[-1]] = type(old)(new) if isinstance(old, int) and new == int(new) else new
            elif op == "drop":
                del parent[path[-1]]
            elif op == "replace":
                parent[path[-1]] = data.draw(values, label="value")
            else:  # share another node: yaml.dump writes an &anchor and an *alias
                other = data.draw(st.sampled_from(paths), label="other")
                target = _get(spec, other)
                if path[: len(other)] != other:  # never put a node inside itself
                    parent[path[-1]] = target
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation replaced a parent
    text = yaml.dump(spec, allow_unicode=True, sort_keys=False)
    if data.draw(st.booleans(), label="dup"):  # duplicate one key line (a duplicate YAML key)
        lines = text.splitlines()
        keyed = [i for i, line in enumerate(lines) if re.match(r"^\s*[\w.-]+:", line)]
        if keyed:
            i = data.draw(st.sampled_from(keyed), label="dup_line")
            lines.insert(i + 1, lines[i])
            text = "\n".join(lines) + "\n"
    return text


def _check(result, started: float) -> None:
    elapsed = time.monotonic() - started
    out = result.stdout + result.stderr
    assert result.exit_code in (0, 1), (result.exit_code, out[-2000:], result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in out
    assert "INTERNAL" not in out
    assert elapsed < 5.0, f"plan took {elapsed:.1f} s"
    for line in result.stderr.splitlines():
        if "error" in line:
            assert LOCATED.match(line), line
    if result.exit_code == 1:
        assert any(LOCATED.match(line) for line in result.stderr.splitlines()), result.stderr


@settings(max_examples=int(os.environ.get("LLMC_FUZZ_EXAMPLES", "60")), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(name=st.sampled_from(sorted(BASES)), fmt=st.sampled_from([[], ["--format", "json"]]), data=st.data())
def test_mutated_examples_plan_cleanly(tmp_path_factory, name, fmt, data):
    text = _mutate(copy.deepcopy(BASES[name]), data)
    spec = tmp_path_factory.mktemp("fuzz") / name
    spec.write_bytes(text.encode("utf-8", "surrogatepass"))
    started = time.monotonic()
    result = CliRunner().invoke(app, ["plan", str(spec), *fmt])
    _check(result, started)


@settings(max_examples=int(os.environ.get("LLMC_FUZZ_BUILDS", "25")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(name=st.sampled_from(sorted(BASES)), data=st.data())
def test_mutated_examples_build_cleanly(tmp_path_factory, name, data):
    """`llmc build` of a mutated spec: what the plan accepts must also render and write, and nothing lands
    outside the output directory (a NUL in model.name once passed the plan and broke the emitted job's Python)."""
    text = _mutate(copy.deepcopy(BASES[name]), data)
    d = tmp_path_factory.mktemp("fuzzb")
    spec = d / name
    spec.write_bytes(text.encode("utf-8", "surrogatepass"))
    result = CliRunner().invoke(app, ["build", str(spec), "-o", str(d / "out")])
    out = result.stdout + result.stderr
    assert result.exit_code in (0, 1), (result.exit_code, out[-2000:], result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in out and "INTERNAL" not in out, out[-2000:]
    for line in result.stderr.splitlines():
        if "error" in line:
            assert LOCATED.match(line), line
    assert {p.name for p in d.iterdir()} <= {name, "out"}


@pytest.mark.parametrize("name", sorted(BASES))
def test_every_example_plans_in_process(tmp_path, name):
    """The unmutated examples: the baseline the mutations start from (exit 0, no error lines)."""
    started = time.monotonic()
    result = CliRunner().invoke(app, ["plan", str(ROOT / "examples" / name), "--format", "json"])
    _check(result, started)
    assert result.exit_code == 0, result.stderr


@settings(max_examples=int(os.environ.get("LLMC_FUZZ_EXAMPLES", "60")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(name=st.sampled_from(sorted(BASES)), data=st.data())
def test_mutated_examples_all_errors_at_once(name, data):
    """The every-error-at-once path (loader errors + the compiler's errors on the best-effort spec)."""
    from llmc.compiler.compile import compile_loaded
    from llmc.spec.load import reads_spec

    text = _mutate(copy.deepcopy(BASES[name]), data)
    started = time.monotonic()
    loaded = reads_spec(text.encode("utf-8", "surrogatepass"), file=name)
    out = compile_loaded(loaded)
    assert time.monotonic() - started < 5.0
    assert (out.compiled is None) == (loaded.run is None)
    if loaded.run is None:
        assert out.errors
    for d in out.diagnostics:
        assert LOCATED.match(d.render()), d.render()
        assert d.file == name


_NUMBERISH = re.compile(r"[0-9][0-9._]*(e[0-9]+)?[KMBGT]?")


def _numeric_leaves(d, prefix=()):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _numeric_leaves(v, (*prefix, k))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from _numeric_leaves(v, (*prefix, i))
    elif (isinstance(d, int | float) and not isinstance(d, bool)) or (isinstance(d, str) and _NUMBERISH.fullmatch(d)):
        yield prefix


@contextlib.contextmanager
def _deadline(seconds: int, what: str):
    """Fail (instead of hanging the suite) when the body runs longer than ``seconds`` (SIGALRM, main thread)."""
    def expire(*_):
        raise AssertionError(f"{what}: no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("name", sorted(BASES))
def test_every_number_at_its_extremes_compiles_cleanly(name):
    """The deterministic sweep behind the random one: each number of each example (``15.6T`` included) set to
    the largest finite double, a denormal-range value and a 31-digit integer; the compiler answers with
    diagnostics, never an exception (1e308 tokens once overflowed the FLOP count)."""
    from llmc.compiler.compile import compile_loaded
    from llmc.spec.load import reads_spec

    paths = list(_numeric_leaves(BASES[name]))
    assert paths
    for path in paths:
        for value in (1e308, 1e-300, 10**30):
            spec = copy.deepcopy(BASES[name])
            node = spec
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
            loaded = reads_spec(yaml.dump(spec, sort_keys=False).encode(), file=name)
            with _deadline(10, f"{'.'.join(map(str, path))} = {value!r}"):  # a stage divisor search once hung here
                out = compile_loaded(loaded)  # raises on an internal error
            for d in out.diagnostics:
                assert LOCATED.match(d.render()), d.render()
