"""The documentation stays true to the code.

* Every diagnostic code llmc emits has a row, with its severity, in a README table (``llmc/spec/README.md`` for the
  loader's, ``llmc/compiler/README.md`` "Diagnostic codes" for every other), and every row's code is still emitted or
  marked retired. The emitted set is read from the source: the code literal of each ``sink.add`` / ``out.add``,
  ``diag`` / ``ctx.diag`` / ``_diag``, ``ModelGap``, ``MeasurementError`` / ``_read_text`` call and
  ``Diagnostic(code=...)``, and every ``error[X123]`` / ``warning[X123]`` string the CLI and the runtime print.
* README.md names every code letter in use.
* The figures README.md quotes from `llmc plan` and the demo model are what llmc prints now.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LLMC = ROOT / "llmc"
CODE = r"[A-Z]\d{3}"
SEVERITIES = ("error", "warning", "info")

# a call whose first code-literal argument is the code it emits; what may come before it: other arguments (one
# level of parentheses, string literals that are not codes), never the call's closing parenthesis
_CALL = re.compile(
    r"\b(?P<fn>ctx\.diag|add|diag|_diag|ModelGap|MeasurementError|_read_text)\(\s*"
    r"(?:[^\"()]|\([^()]*\)|\"(?!" + CODE + r"\")[^\"\n]*\")*?"
    r"\"(?P<code>" + CODE + r")\"(?:\s*,\s*\"(?P<sev>error|warning|info)\")?")
_KEYWORD = re.compile(r"\bcode=\"(?P<code>" + CODE + r")\"(?:\s*,\s*severity=\"(?P<sev>error|warning|info)\")?")
_PRINTED = re.compile(r"\b(?P<sev>error|warning|info)\[(?P<code>" + CODE + r")\]")
# calls whose diagnostics are errors without a severity argument: the loader's (``ctx.diag``'s severity defaults to
# error and no call passes another), calibration's (raised), the torchtitan model gaps (reported as errors)
_ALWAYS_ERROR = {"ctx.diag", "_diag", "MeasurementError", "_read_text", "ModelGap"}


def _sources() -> list[Path]:
    return sorted(p for p in LLMC.rglob("*") if p.suffix in (".py", ".j2") and "__pycache__" not in p.parts)


def emitted_codes() -> dict[str, dict]:
    """{code: {"severities": {...}, "where": {file:line, ...}}} for every code emitted in llmc/."""
    out: dict[str, dict] = defaultdict(lambda: {"severities": set(), "where": set()})
    for path in _sources():
        text = path.read_text()
        for rx in (_CALL, _KEYWORD, _PRINTED):
            for m in rx.finditer(text):
                sev = m["sev"] or ("error" if m.groupdict().get("fn") in _ALWAYS_ERROR else None)
                entry = out[m["code"]]
                if sev:
                    entry["severities"].add(sev)
                entry["where"].add(f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start('code')) + 1}")
    return dict(out)


def code_constants() -> dict[str, str]:
    """{code: file:line} of every string constant in llmc/*.py that is exactly a code (``"X308"``), GPU names
    (``skypilot_name="H100"``) aside: the safety net for a code emitted through a call the regexes do not know."""
    out: dict[str, str] = {}
    for path in _sources():
        if path.suffix != ".py":
            continue
        tree = ast.parse(path.read_text())
        gpu_names = {id(k.value) for k in ast.walk(tree) if isinstance(k, ast.keyword) and k.arg == "skypilot_name"}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(CODE, node.value)
                    and id(node) not in gpu_names):
                out.setdefault(node.value, f"{path.relative_to(ROOT)}:{node.lineno}")
    return out


def readme_tables() -> dict[str, list[dict]]:
    """{code: [{"severity": cell, "meaning": cell, "file": README}]} from every README.md table with a ``code``
    column (the severity column may be absent: then "")."""
    out: dict[str, list[dict]] = defaultdict(list)
    files = [ROOT / "README.md", *sorted(LLMC.rglob("README.md"))]
    for f in files:
        lines = f.read_text().splitlines()
        for i, line in enumerate(lines[:-1]):
            if not (line.startswith("|") and re.match(r"^\|[\s:|-]+\|$", lines[i + 1].strip())):
                continue
            header = [c.strip().lower() for c in line.strip().strip("|").split("|")]
            if header[0] != "code":  # (a table whose code column only cites a code, e.g. the spec limits)
                continue
            ci = 0
            si = header.index("severity") if "severity" in header else None
            mi = next((k for k, h in enumerate(header) if h == "meaning"), None)
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                cells = [c.strip() for c in row.strip().strip("|").split("|")]
                code = cells[ci].strip("`") if len(cells) > ci else ""
                if re.fullmatch(CODE, code):
                    out[code].append({"severity": cells[si] if si is not None and len(cells) > si else "",
                                      "meaning": cells[mi] if mi is not None and len(cells) > mi else "",
                                      "file": str(f.relative_to(ROOT))})
    return dict(out)


def test_emission_regexes_see_every_code_constant():
    """A code literal the regexes miss would be a code the docs test never checks: extend ``_CALL``."""
    emitted = emitted_codes()
    missed = {c: w for c, w in code_constants().items() if c not in emitted}
    assert not missed, f"code literals not found by the emission regexes: {missed}"


def test_every_emitted_code_has_a_readme_row():
    emitted, documented = emitted_codes(), readme_tables()
    missing = {c: sorted(e["where"]) for c, e in sorted(emitted.items()) if c not in documented}
    assert not missing, ("codes emitted in llmc/ without a row in a README table (llmc/spec/README.md for the loader's, "
                         f"llmc/compiler/README.md 'Diagnostic codes' for the rest): {missing}")


def test_every_readme_row_is_emitted_or_retired():
    emitted = emitted_codes()
    stale = {c: [r["file"] for r in rows] for c, rows in sorted(readme_tables().items())
             if c not in emitted and not any("retired" in r["severity"].lower() for r in rows)}
    assert not stale, f"README table rows for codes llmc no longer emits (mark them retired, or drop them): {stale}"


def test_readme_rows_state_severity_and_meaning():
    bad = {c: rows for c, rows in readme_tables().items()
           if not any(any(s in r["severity"].lower() for s in (*SEVERITIES, "retired")) for r in rows)
           or not all(r["meaning"] for r in rows)}
    assert not bad, f"README rows without a severity or a meaning: {bad}"


def test_readme_severities_match_the_code():
    documented = readme_tables()
    wrong = {}
    for code, e in sorted(emitted_codes().items()):
        cells = " ".join(r["severity"].lower() for r in documented.get(code, []))
        if not cells:
            continue  # (test_every_emitted_code_has_a_readme_row)
        missing = [s for s in sorted(e["severities"]) if s not in cells]
        if missing:
            wrong[code] = f"emitted as {', '.join(missing)} ({', '.join(sorted(e['where']))}), documented as {cells!r}"
    assert not wrong, f"severities the README tables do not state: {wrong}"


def test_readme_names_every_code_letter():
    text = (ROOT / "README.md").read_text()
    m = re.search(r"Diagnostic codes:(.*?)Tables", text, re.S)
    assert m, "README.md: the 'Diagnostic codes: ... Tables' paragraph is gone"
    letters = sorted({c[0] for c in emitted_codes()})
    unnamed = [x for x in letters if f"`{x}`" not in m.group(1)]
    assert not unnamed, f"README.md's list of code letters leaves out {unnamed}"


# ------------------------------------------------------------------------------------- quoted command output


def _plan_entries(text: str) -> list[str]:
    """The ' label   value' lines of `llmc plan`'s text report, each with its continuation lines joined."""
    entries: list[str] = []
    open_ = False
    for line in text.splitlines():
        if line.startswith(" ") and not line.startswith("  ") and line.strip():
            entries.append(line.strip())
            open_ = True
        elif line.startswith("  ") and open_:
            entries[-1] += " " + line.strip()
        else:
            open_ = False
    return entries


def _squash(s: str) -> str:
    return re.sub(r"\s+", "", s)


def _squashed_with_word_ends(s: str) -> tuple[str, set[int]]:
    """``s`` without whitespace (the README narrows the report's columns; the report wraps long values), and the
    offsets in it where a word of ``s`` ends."""
    out, ends = [], set()
    for word in s.split():
        out.append(word)
        ends.add(sum(map(len, out)))
    return "".join(out), ends


def _quoted_plans() -> list[tuple[str, list[str]]]:
    """(spec, [quoted lines]) of every ```` $ llmc plan SPEC ```` block in README.md."""
    text = (ROOT / "README.md").read_text()
    return [(m.group(1), [ln for ln in m.group(2).splitlines() if ln.strip() and ln.strip() != "..."])
            for m in re.finditer(r"^\$ llmc plan (\S+)\n(.*?)^```", text, re.S | re.M)]


@pytest.mark.parametrize("spec,quoted", _quoted_plans(), ids=[s for s, _ in _quoted_plans()])
def test_readme_plan_output_is_current(spec, quoted):
    """The README's `llmc plan` excerpt is what llmc prints now (an elided middle is written ' ... ')."""
    from typer.testing import CliRunner

    from llmc.cli import app

    r = CliRunner().invoke(app, ["plan", str(ROOT / spec)])
    assert r.exit_code == 0, r.output
    entries = [_squashed_with_word_ends(e) for e in _plan_entries(r.output)]

    def matches(entry: tuple[str, set[int]], parts: list[str]) -> bool:
        """The quoted parts in order, the first at the entry's start, the last ending where a word ends (the
        report goes on after what the README quotes: the 'why' paragraph's other lines)."""
        s, word_ends = entry
        if not s.startswith(parts[0]):
            return False
        at = len(parts[0])
        for p in parts[1:]:
            at = s.find(p, at)
            if at < 0:
                return False
            at += len(p)
        return at in word_ends

    for line in quoted:
        parts = [_squash(p) for p in line.split(" ... ")]
        assert any(matches(e, parts) for e in entries), (
            f"README.md quotes `llmc plan {spec}` as {line.strip()!r}, which llmc no longer prints; it prints:\n"
            + "\n".join(_plan_entries(r.output)))


def test_readme_demo_model_figures():
    """'The demo trains a N-layer model (preset `P`, X.YM parameters)': the preset tiny_cpu.yaml uses."""
    from llmc.compiler.params import params_total
    from llmc.spec.presets import PRESETS

    text = (ROOT / "README.md").read_text()
    m = re.search(r"The demo trains a (\d+)-layer model \(preset `([\w.-]+)`, ([\d.]+)M parameters\)", text)
    assert m, "README.md: the demo model sentence is gone"
    layers, preset, millions = int(m.group(1)), m.group(2), float(m.group(3))
    assert re.search(rf"^model: {re.escape(preset)}\s*$", (ROOT / "examples/tiny_cpu.yaml").read_text(), re.M)
    arch = PRESETS[preset]
    assert arch.n_layers == layers
    assert round(params_total(arch) / 1e6, 1) == millions
