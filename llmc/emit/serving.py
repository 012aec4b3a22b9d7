"""Serving targets: ``serving/vllm.yaml`` (vLLM 0.33.0; its own parser reads it in tests) and
``serving/sglang.yaml`` (SGLang 0.5).

Reads ``compiled.serving`` (the compiler sizes each target: tp/pp, KV budget, fit) and, from the spec's target,
the names it passes through (``host``, ``served_model_name``). One config file per target; a second target on the
same engine gets ``serving/<engine>-2.yaml`` and so on. Without ``host`` neither config names one: each engine binds
its own default (vLLM every interface, SGLang 127.0.0.1).

Diagnostics:
    V001 error    a serving target does not fit (normally reported by the compiler already)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmc.diagnostics import Diagnostic
from llmc.emit.base import Emitter
from llmc.emit.common import diag, header_lines, jinja_env
from llmc.escape import yaml_scalar

VLLM_PORT = 8000
SGLANG_PORT = 30000
#: ``quantization`` names for llmc's 16-bit export quantized on load, per engine. vLLM 0.33.0 refuses ``fp8`` for
#: weights that are not fp8 already: ``Fp8Config(is_checkpoint_fp8_serialized=False)`` raises "The `fp8`
#: quantization method no longer supports online quantization. Please use `--quantization fp8_per_tensor`"
#: (vllm/model_executor/layers/quantization/fp8.py), and ``fp8_per_tensor`` is its online shorthand for fp8 weights
#: with one scale per tensor (vllm/config/quantization.py ``_ONLINE_SHORTHANDS``; in ``QUANTIZATION_METHODS``).
#: SGLang quantizes 16-bit weights on load with ``--quantization fp8`` (docs/backend/quantization.md, "Online
#: Quantization").
ONLINE_QUANTIZATION = {"vllm": {"fp8": "fp8_per_tensor"}, "sglang": {"fp8": "fp8"}}


@dataclass(frozen=True)
class ServeCommand:
    """How a serving config runs, from the build directory: the command, with what comes before it (a Ray cluster
    started on every node) and after it (on which nodes), one text for the config's header and the build's README."""

    command: str
    before: str = ""
    after: str = ""

    def text(self) -> str:
        return " ".join(x for x in (self.before, self.command, self.after) if x)

    def markdown(self) -> str:
        return " ".join(x for x in (self.before, f"`{self.command}`", self.after) if x)


def _vllm(p: Any, model_dir: str, served: str, name: str, host: str | None) -> tuple[list[tuple[str, str]],
                                                                                   ServeCommand]:
    nodes = p.nodes
    items = [("model", yaml_scalar(model_dir)), ("served-model-name", yaml_scalar(served)), ("dtype", "bfloat16"),
             ("tensor-parallel-size", str(p.tensor_parallel_size)),
             ("pipeline-parallel-size", str(p.pipeline_parallel_size)),
             ("max-model-len", str(p.max_model_len)),
             ("max-num-seqs", str(p.max_num_seqs)),
             ("max-num-batched-tokens", str(p.max_num_batched_tokens)),
             ("gpu-memory-utilization", repr(float(p.gpu_memory_utilization))),
             ("kv-cache-dtype", p.kv_cache_dtype)]
    if p.quantization:
        items.append(("quantization", ONLINE_QUANTIZATION["vllm"].get(p.quantization, p.quantization)))
    # vLLM's --enable-prefix-caching is a BooleanOptionalAction; a YAML `true` becomes the flag
    items.append(("enable-prefix-caching" if p.prefix_caching else "no-enable-prefix-caching", "true"))
    if p.expert_parallel:  # (a store_true flag: a YAML `true` sets it)
        items.append(("enable-expert-parallel", "true"))
    if nodes > 1:  # pipeline stages on several nodes: vLLM runs them on a Ray cluster
        items.append(("distributed-executor-backend", "ray"))
    items += _bind(host, VLLM_PORT)
    before = f"`ray start` on all {nodes} nodes, then on the head node:" if nodes > 1 else ""
    return items, ServeCommand(f"vllm serve --config {name}", before=before)


def _sglang(p: Any, model_dir: str, served: str, name: str, host: str | None) -> tuple[list[tuple[str, str]],
                                                                                     ServeCommand]:
    nodes = p.nodes
    # SGLang's mem_fraction_static covers weights + KV pool only (activations live outside it),
    # so it is vLLM's utilisation minus llmc's workspace/activation reserve.
    mem_frac = round(float(p.gpu_memory_utilization)
                     - p.reserve_gib_per_gpu / p.capacity_gib, 3)
    kv = "fp8_e4m3" if p.kv_cache_dtype == "fp8" else "auto"
    items = [("model-path", yaml_scalar(model_dir)), ("served-model-name", yaml_scalar(served)), ("dtype", "bfloat16"),
             ("tp-size", str(p.tensor_parallel_size)),
             ("pp-size", str(p.pipeline_parallel_size)),
             ("context-length", str(p.max_model_len)),
             ("max-running-requests", str(p.max_num_seqs)),
             ("chunked-prefill-size", str(p.max_num_batched_tokens)),
             ("mem-fraction-static", repr(mem_frac)),
             ("kv-cache-dtype", kv)]
    if p.quantization:
        items.append(("quantization", ONLINE_QUANTIZATION["sglang"].get(p.quantization, p.quantization)))
    if not p.prefix_caching:
        items.append(("disable-radix-cache", "true"))
    if nodes > 1:
        items.append(("nnodes", str(nodes)))
    items += _bind(host, SGLANG_PORT)
    cmd = f"python -m sglang.launch_server --config {name}"
    if nodes > 1:
        return items, ServeCommand(f"{cmd} --node-rank <0..{nodes - 1}> --dist-init-addr <first node>:50000",
                                   after=f"(on each of the {nodes} nodes)")
    return items, ServeCommand(cmd)


ENGINES = {"vllm": _vllm, "sglang": _sglang}


def _bind(host: str | None, port: int) -> list[tuple[str, str]]:
    """The server's address: the spec's ``host`` where it names one, else none (the engine's own default: vLLM
    every interface, SGLang 127.0.0.1), and the port."""
    return ([("host", yaml_scalar(host))] if host else []) + [("port", str(port))]


#: Where each engine's server listens without a ``--host``: vLLM 0.33.0's default None binds ("", port), every
#: interface (vllm/entrypoints/common/cli_args.py; vllm/entrypoints/launchers/launcher.py ``sock_addr``); SGLang's
#: ``ServerArgs.host`` defaults to "127.0.0.1" (python/sglang/srt/server_args.py).
DEFAULT_BIND = {"vllm": "every interface", "sglang": "127.0.0.1"}
PORTS = {"vllm": VLLM_PORT, "sglang": SGLANG_PORT}


def _notes(p: Any, model_dir: str, cmd: ServeCommand, host: str | None) -> list[str]:
    g = lambda k: getattr(p, k)  # noqa: E731
    pp, nodes = g("pipeline_parallel_size"), g("nodes")
    stages = [] if pp <= 1 else [
        f"{pp} pipeline stages on {nodes} node{'s' if nodes > 1 else ''}; the per-GPU figures below are the most "
        "loaded stage's, which bounds the sequences the replica holds"]
    return [
        f"target serving[{g('index')}]: {g('gpus')} x {g('gpu')} (tp {g('tensor_parallel_size')}, "
        f"pp {pp}{', MoE layers expert parallel' if g('expert_parallel') else ''}), stage {g('stage')!r}",
        *stages,
        f"weights {g('weights_gib')} GiB total, {g('weights_gib_per_gpu')} GiB per GPU; "
        f"workspace reserve {g('reserve_gib_per_gpu')} GiB per GPU",
        f"KV cache: {g('kv_bytes_per_token')} B/token, {g('kv_gib_per_seq')} GiB per sequence per GPU at "
        f"{g('max_model_len')} tokens; needs {g('kv_gib_needed')} GiB for {g('concurrency')} sequences, "
        f"budget {g('kv_budget_gib')} GiB per GPU ({g('max_seqs_that_fit')} sequences fit)",
        f"model: export the {g('stage')!r} checkpoint to Hugging Face format in {model_dir} first",
        f"listens on {host or DEFAULT_BIND[g('engine')] + ' (the engine default; serving[].host sets one)'}, port "
        f"{PORTS[g('engine')]}, and does not authenticate requests",
        f"run from the build directory: {cmd.text()}",
    ]


class ServingEmitter(Emitter):
    name = "serving"

    def applies(self, compiled) -> bool:
        return bool(compiled.serving)

    def diagnostics(self, compiled) -> list[Diagnostic]:
        return [diag("V001", "error", f"serving[{p.index}]",
                     f"serving target {p.engine} does not fit (see `llmc plan`)")
                for p in compiled.serving if not p.fits]

    def files(self, compiled, earlier: Mapping[str, str]) -> dict[str, str]:
        header = header_lines(compiled)
        return {t.file: jinja_env().get_template("serving/engine.yaml.j2").render(header=header, notes=t.notes,
                                                                                   items=t.items)
                for t in _targets(compiled)}


@dataclass(frozen=True)
class _Target:
    file: str
    items: list[tuple[str, str]]
    command: ServeCommand
    notes: list[str]


def _targets(compiled) -> list[_Target]:
    """Each serving target's config file, its keys, the command that runs it and the config's header notes."""
    out = []
    counts: dict[str, int] = {}
    for p in compiled.serving:
        eng = p.engine
        counts[eng] = counts.get(eng, 0) + 1
        name = f"serving/{eng}.yaml" if counts[eng] == 1 else f"serving/{eng}-{counts[eng]}.yaml"
        model_dir = f"run/{p.stage}/hf"
        # the spec's target (a plan made without one, as tests build: the defaults)
        target = compiled.spec.serving[p.index] if p.index < len(compiled.spec.serving) else None
        host = target.host if target is not None else None
        served = (target.served_model_name if target is not None else None) or f"{compiled.spec.name}-{p.stage}"
        items, cmd = ENGINES[eng](p, model_dir, served, name, host)
        out.append(_Target(name, items, cmd, _notes(p, model_dir, cmd, host)))
    return out


def served_files(compiled, files: Mapping[str, str]) -> list[dict[str, str]]:
    """The serving configs among the build ``files``, each with the command that runs it as its header says
    (markdown: the command in backticks), for README.md."""
    return [{"file": t.file, "command": t.command.markdown()} for t in _targets(compiled) if t.file in files]
