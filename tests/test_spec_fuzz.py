"""Property: whatever the YAML says, the loader returns a spec or raises SpecError, never anything else."""

from __future__ import annotations

from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmc.diagnostics import SpecError
from llmc.spec.load import loads_spec

ROOT = Path(__file__).resolve().parents[1]
BASES = [yaml.safe_load((ROOT / "examples" / n).read_text())
         for n in ("tiny_cpu.yaml", "llama3_8b_h100x8.yaml", "deepseek_v3.yaml")]
BASES.append({"name": "s", "model": {"preset": "tiny-moe", "moe": {"top_k": 1}},
              "hardware": {"gpu": "cpu", "count": 1}, "data": {"seq_len": 64, "tokens": "1M"},
              "stages": [{"name": "a", "kind": "sft", "rope_scaling": {"type": "yarn", "factor": 2}}],
              "serving": [{"stage": "a"}]})

values = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10**13), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["16M", "15.6e12", "1e", "tiny", "llama3-8", "n_kv_head", "bf8"]),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=6), st.integers(), max_size=3),
)


def _paths(d, prefix=()):
    if isinstance(d, dict):
        for k, v in d.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


def _set(d, path, value):
    for p in path[:-1]:
        d = d[p]
    d[path[-1]] = value


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(BASES) - 1), st.data())
def test_mutated_specs_never_crash(base_i, data):
    import copy

    spec = copy.deepcopy(BASES[base_i])
    paths = list(_paths(spec))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        try:
            _set(spec, path, data.draw(values))
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation replaced a parent
    if data.draw(st.booleans()):
        spec[data.draw(st.text(min_size=1, max_size=8))] = data.draw(values)
    text = yaml.safe_dump(spec, allow_unicode=True)
    try:
        loads_spec(text, file="fuzz.yaml")
    except SpecError as e:
        assert e.diagnostics
        for d in e.diagnostics:
            assert d.severity == "error" and d.code[0] in "SMGVD"
            assert "\n" not in d.render()


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=80))
def test_arbitrary_text_never_crashes(text):
    try:
        loads_spec(text, file="fuzz.yaml")
    except SpecError as e:
        assert e.diagnostics
