"""JSON Schema export (``llmc schema``) and human-number parsing."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmc.spec.load import json_schema
from llmc.spec.numbers import parse_human_number
from llmc.spec.presets import PRESETS


def test_schema_has_descriptions_and_model_forms():
    s = json_schema()
    json.dumps(s)  # serialisable
    assert s["title"] == "RunSpec" and "2020-12" in s["$schema"]
    assert set(s["required"]) >= {"name", "model", "data", "hardware"}
    data = s["$defs"]["Data"]["properties"]
    assert "Total training tokens" in data["tokens"]["description"]
    arch = s["$defs"]["Architecture"]["properties"]
    assert "KV heads" in arch["n_kv_heads"]["description"]
    forms = s["properties"]["model"]["anyOf"]
    assert forms[0]["enum"] == sorted(PRESETS)
    assert "hf_config" in forms[1]["properties"] and "n_layers" in forms[1]["properties"]


def test_schema_accepts_human_numbers():
    tokens = json_schema()["$defs"]["Data"]["properties"]["tokens"]
    types = {t.get("type") for t in tokens.get("anyOf", [tokens])}
    assert {"number", "string"} <= types


def test_an_editor_checking_the_schema_flags_what_llmc_refuses():
    """Bounds are JSON Schema keywords (minimum / exclusiveMinimum / ...), which a validator applies: every example
    validates, a zero GPU count or head count does not (llmc refuses both), and a `4M` token count still does."""
    jsonschema = pytest.importorskip("jsonschema")
    import glob

    import yaml

    v = jsonschema.Draft202012Validator(json_schema())
    text = json.dumps(json_schema())
    assert not any(f'"{k}": ' in text for k in ("gt", "ge", "lt", "le"))
    for path in sorted(glob.glob("examples/*.yaml")):
        assert not list(v.iter_errors(yaml.safe_load(open(path)))), path
    spec = yaml.safe_load(open("examples/llama3_8b_h100x8.yaml"))
    for where, key, bad in (("hardware", "count", 0), ("training", "global_batch_tokens", 0)):
        doc = json.loads(json.dumps(spec))
        doc[where][key] = bad
        assert list(v.iter_errors(doc)), (where, key)
    doc = json.loads(json.dumps(spec))
    doc["model"] = {"preset": "llama3-8b", "n_kv_heads": 0}
    assert list(v.iter_errors(doc))
    doc["model"] = {"preset": "llama3-8b"}
    doc["data"]["tokens"] = "4M"
    assert not list(v.iter_errors(doc))


def test_cli_schema():
    typer_testing = pytest.importorskip("typer.testing")
    from llmc.cli import app

    res = typer_testing.CliRunner().invoke(app, ["schema"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["title"] == "RunSpec"


@pytest.mark.parametrize("text, value", [
    ("15.6e12", 15.6e12), ("15.6T", 15.6e12), ("16M", 16_000_000), ("2_000_000", 2_000_000),
    ("1.4e+12", 1.4e12), ("$2.5M", 2_500_000), ("8k", 8000), ("1.5B", 1.5e9), ("2G", 2e9), (" 7 ", 7),
])
def test_parse_human_number(text, value):
    assert parse_human_number(text) == value


@pytest.mark.parametrize("bad", ["", "abc", "1.2.3", "16X", "T", "1e", True])
def test_parse_human_number_rejects(bad):
    with pytest.raises(ValueError):
        parse_human_number(bad)


@given(st.floats(min_value=1e-3, max_value=1e15, allow_nan=False, allow_infinity=False))
def test_parse_roundtrips_repr(x):
    assert parse_human_number(repr(x)) == x
    assert parse_human_number(x) == x


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["K", "M", "B", "G", "T"]))
def test_suffix_is_exact_for_integers(n, suffix):
    mult = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}[suffix]
    assert parse_human_number(f"{n}{suffix}") == float(n * mult)


def test_field_docs_are_pydantics_attribute_docstrings():
    # the models are built without use_attribute_docstrings (it parses every class's source at import);
    # field_docs reads the same docstrings on demand: compare with pydantic's own extractor, applied to the
    # class that annotates each field
    from pydantic._internal._docs_extraction import extract_docstrings_from_cls

    from llmc.spec.load import _spec_models, field_docs
    from llmc.spec.schema import ModelRef, RunSpec

    models = _spec_models(RunSpec) + [ModelRef]
    assert len(models) > 20
    n = 0
    for cls in models:
        docs = field_docs(cls)
        for name in cls.model_fields:
            owner = next(k for k in cls.__mro__ if name in k.__dict__.get("__annotations__", {}))
            expected = extract_docstrings_from_cls(owner, use_inspect=True).get(name)
            assert docs.get(name) == expected, (cls.__name__, name)
            n += expected is not None
    assert n > 150


def test_schema_carries_every_field_docstring():
    from llmc.spec.load import _spec_models, field_description
    from llmc.spec.schema import RunSpec

    s, n = json_schema(), 0
    for cls in _spec_models(RunSpec):
        props = s if cls is RunSpec else s["$defs"][cls.__name__]
        for name in cls.model_fields:
            desc, prop = field_description(cls, name), props["properties"][name]
            if desc and list(prop) != ["$ref"]:  # pydantic writes a bare $ref for some model-typed fields
                assert prop["description"] == desc, (cls.__name__, name)
                n += 1
    assert n > 150


def test_missing_field_hint_is_the_field_docstring(tmp_path):
    from llmc.spec.load import read_spec

    spec = tmp_path / "s.yaml"
    spec.write_text("name: x\nmodel: llama3-8b\ndata: {tokens: 1e9}\nhardware: {gpu: h100-sxm}\n")
    diags = read_spec(spec).diagnostics
    missing = [d for d in diags if "missing required field" in d.message]
    assert missing, diags
    assert any(d.path == "hardware.count" and d.hint == "Total accelerators (world size), at most 2**20."
               for d in missing), missing


def test_every_source_kind_is_text_or_records_never_both():
    """The torchtitan loader streams TEXT_SOURCE_KINDS, the runtime keeps RECORD_SOURCE_KINDS for post-training: a
    kind added to the spec and to neither list would silently be dropped by both."""
    import typing

    from llmc.spec.schema import RECORD_SOURCE_KINDS, TEXT_SOURCE_KINDS, SourceKind

    assert sorted(TEXT_SOURCE_KINDS + RECORD_SOURCE_KINDS) == sorted(typing.get_args(SourceKind))
    assert not set(TEXT_SOURCE_KINDS) & set(RECORD_SOURCE_KINDS)
