"""P004's hints (llmc/compiler/checks.py ``_p004_hints``): each is offered only where the memory model says it helps,
and each, applied with ``--set`` and compiled again, lowers what the plan needs (or fits, where it says so)."""

from __future__ import annotations

import re

from llmc.compiler.compile import compile_spec
from llmc.compiler.search import usable_bytes
from llmc.overrides import load_with_overrides, parse_override

EX405 = "examples/llama3_405b_h100x16384.yaml"
PINNED = ("parallelism.tp=8", "parallelism.pp=4")


def _compile(path, *sets):
    run, lines, data = load_with_overrides(path, [parse_override(s) for s in sets])
    return compile_spec(run, str(path), lines, spec_bytes=data)


def _codes(c) -> set[str]:
    return {d.code for d in c.diagnostics if d.severity == "error"}


def _p004(c):
    (d,) = [d for d in c.diagnostics if d.code == "P004"]
    return d


def _need(c) -> int:
    """What the compiled run needs per GPU: its plan's memory, else the closest layout's (P004)."""
    return c.memory.per_gpu_bytes if c.plan is not None else c.unfit.memory.per_gpu_bytes


def _split(hint: str) -> list[str]:
    """The hints of "try a; b; c", split at the semicolons outside parentheses."""
    assert hint.startswith("try "), hint
    out, depth, cur = [], 0, ""
    for ch in hint[4:]:
        depth += (ch == "(") - (ch == ")")
        if ch == ";" and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out + [cur.strip()]


# what a hint that does not fit on its own adds inside its closing parenthesis (checks._hint_list)
OVER = r"(?:, still over the [\d.]+ GiB usable: combine it with another change)?"


def _sets(h: str) -> tuple[list[str], bool]:
    """(the --set overrides that apply hint ``h``, whether it says the result fits)."""
    if m := re.fullmatch(r"more GPUs: hardware\.count ([\d,]+) would need about [\d.]+ GiB per GPU as [^,]+"
                         r"(?:, with a global batch of at least [\d,]+ sequences \(training\.global_batch_tokens "
                         r"([\d,]+)\))?", h):
        return ([f"hardware.count={m[1].replace(',', '')}"]
                + ([f"training.global_batch_tokens={m[2].replace(',', '')}"] if m[2] else [])), True
    if m := re.fullmatch(r"parallelism\.(.+?) instead of the pinned .+ \(about [\d.]+ GiB per GPU(, which fits; or "
                         r"unpin it and let the search choose)?" + OVER + r"\)", h):
        return [f"parallelism.{k}={v}" for k, v in (kv.split(" ") for kv in m[1].split(", "))], bool(m[2])
    if m := re.match(r"CPU (?:optimizer|parameter) offload \(parallelism\.(offload_\w+)(?: with training\.backend "
                     r"(\w+))?: about [\d.]+ GiB per GPU as .+ on \w+" + OVER + r"\)$", h):
        return [f"parallelism.{m[1]}=true"] + ([f"training.backend={m[2]}"] if m[2] else []), False
    if m := re.fullmatch(r"a shorter seq_len than \d+ \(([\d,]+): about [\d.]+ GiB per GPU" + OVER + r"\)", h):
        return [f"data.seq_len={m[1].replace(',', '')}"], False
    if m := re.fullmatch(r"a GPU with more memory \(([\w.-]+): [\d.]+ GiB\)", h):
        return [f"hardware.gpu={m[1]}"], True
    raise AssertionError(f"a hint this test does not know: {h!r}")


def _check_each_hint_helps(path, base: tuple[str, ...], c) -> list[str]:
    """Apply every hint of ``c``'s P004 on top of ``base`` and compile again: the need drops, and a hint that says
    the result fits gives a plan. Returns the hints."""
    hints = _split(_p004(c).hint)
    for h in hints:
        sets, fits = _sets(h)
        again = _compile(path, *base, *sets)
        assert again.plan is not None or "P004" in _codes(again), (h, [d.render() for d in again.diagnostics])
        if fits:
            assert again.plan is not None and "P004" not in _codes(again), (h, sets)
        if not h.startswith("a GPU with more memory"):  # (a larger GPU's plan may use more of its memory)
            assert _need(again) < _need(c), (h, _need(again), _need(c))
    return hints


def test_pinned_pipeline_hints_name_more_stages_not_more_gpus_or_offload():
    """Llama 3.1 405B pinned to tp 8 x pp 4 on 16,384 H100s: torchtitan keeps each pipeline stage's weights whole and
    its fp32 gradients unsharded, which more data parallelism does not shrink, and DeepSpeed, the backend that
    offloads, cannot run the pinned tp / pp: neither "more GPUs" nor offload is offered, pp 8 is (it fits)."""
    c = _compile(EX405, *PINNED)
    d = _p004(c)
    assert "more GPUs" not in d.hint and "offload" not in d.hint, d.hint
    assert "parallelism.pp 8 instead of the pinned pp 4" in d.hint and "which fits" in d.hint, d.hint
    hints = _check_each_hint_helps(EX405, PINNED, c)
    assert any(h.startswith("parallelism.pp 8") for h in hints)
    # why "more GPUs" is not offered: with a batch that splits over 4x the GPUs the pinned layout still does not fit
    usable = usable_bytes(c.gpu.hbm_bytes, c.backend.name)
    big = ("training.global_batch_tokens=67108864",)
    for n in (16384, 32768, 65536):
        more = _compile(EX405, *PINNED, *big, f"hardware.count={n}")
        assert more.plan is None and _need(more) > usable, n
        assert "more GPUs" not in _p004(more).hint
    # why offload is not offered: it moves the run to DeepSpeed, which cannot run the pinned tp / pp (P018)
    off = _compile(EX405, *PINNED, "parallelism.offload_optimizer=true")
    assert {d.path for d in off.diagnostics if d.code == "P018"} == {"parallelism.tp", "parallelism.pp"}


def test_fsdp_short_of_memory_names_the_gpu_count_that_fits(tmp_path):
    """Llama 3 70B pinned to pure FSDP (tp 1, pp 1, ZeRO-3) on 8 H100s: the states shrink with the shard group, so
    "more GPUs" names a count, and that count (the fewest doubling of the cluster) plans while half of it does not."""
    spec = tmp_path / "fsdp.yaml"
    spec.write_text("name: t\nmodel: llama3-70b\nhardware: {gpu: h100-sxm, count: 8}\n"
                    "data: {seq_len: 8192, tokens: 1T}\nparallelism: {tp: 1, pp: 1, zero_stage: 3}\n")
    c = _compile(spec)
    d = _p004(c)
    m = re.search(r"more GPUs: hardware\.count ([\d,]+)", d.hint)
    assert m, d.hint
    n = int(m[1].replace(",", ""))
    assert n > 8
    half = _compile(spec, f"hardware.count={n // 2}")
    assert half.plan is None and "P004" in _codes(half)
    hints = _check_each_hint_helps(spec, (), c)  # the count among them: it plans
    assert hints[0].startswith("more GPUs")


def test_a_pinned_shard_group_still_gets_more_gpus_where_the_search_grows_other_degrees():
    """With dp_shard pinned, more GPUs keep the shard group but the search grows tp / pp / cp on them: Mixtral 8x7B on
    8 H100s pinned to ep 2, dp_shard 2 does not fit, and on 16 it does (tp 8). The hint said only "a GPU with more
    memory"; it names more GPUs again, as not evaluated here."""
    sets = ("parallelism.ep=2", "parallelism.dp_shard=2")
    c = _compile("examples/mixtral_8x7b.yaml", "hardware.count=8", *sets)
    hints = _split(_p004(c).hint)
    (more,) = [h for h in hints if h.startswith("more GPUs")]
    assert "hardware.count 16" in more and "not evaluated" in more, hints
    assert "P004" not in _codes(_compile("examples/mixtral_8x7b.yaml", "hardware.count=16", *sets))
