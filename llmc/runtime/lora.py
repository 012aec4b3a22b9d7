"""LoRA / QLoRA adapters for the runtime model (torchtitan parameter names).

LoRA (Hu et al. 2021): y = W x + (alpha / r) * B A dropout(x), with A [r, d_in] initialised like
nn.Linear (Kaiming-uniform, a=sqrt(5), as PEFT does) and B [d_out, r] zeros, so training starts
from the base model exactly. The base is frozen. ``merge_lora`` folds (alpha/r) * B @ A into the
weight and removes the adapters, so later stages see a plain model.

QLoRA (Dettmers et al. 2023): the frozen base weights are stored in 4-bit NormalFloat (NF4):
blockwise absmax scaling (block 64) onto the 16 NF4 levels (quantiles of N(0,1), exact zero),
optionally with double quantisation of the absmax constants (8-bit, one fp32 scale per 256 blocks).
On CPU we dequantise to float for the matmul (what bitsandbytes does on GPU, in a fused kernel).

Frozen weights under bf16 autocast (:func:`matmul_only_weights`, :func:`cast_frozen_matmul_weights_`): a weight that
only a matmul inside ``torch.autocast(dtype=bfloat16)`` reads is cast to bf16 by autocast before every use, so a bf16
copy made once gives bit-identical results at half the memory: the frozen base as PEFT users hold it (loaded with
``torch_dtype=torch.bfloat16``).
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from llmc.spec.schema import LORA_TARGETS, NF4_BLOCK, NF4_DQ_BLOCK
from llmc.weight_init import TRUNCATION_SIGMAS

# The 16 NF4 code values (QLoRA paper, Appendix E; bitsandbytes `NF4` table).
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])


# ----------------------------------------------------------------------------- NF4


class NF4Tensor:
    """A weight quantised to NF4: packed 4-bit codes + per-block absmax (optionally 8-bit double-quantised)."""

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor | None, shape: torch.Size, numel: int,
                 block: int, dq_codes: torch.Tensor | None = None, dq_scale: torch.Tensor | None = None,
                 dq_offset: float = 0.0):
        self.packed, self.absmax, self.shape, self.numel, self.block = packed, absmax, shape, numel, block
        self.dq_codes, self.dq_scale, self.dq_offset = dq_codes, dq_scale, dq_offset

    def nbytes(self) -> int:
        n = self.packed.numel()
        if self.dq_codes is not None:
            n += self.dq_codes.numel() + self.dq_scale.numel() * 4 + 4
        else:
            n += self.absmax.numel() * 4
        return n

    def bits_per_param(self) -> float:
        return 8 * self.nbytes() / self.numel

    def block_absmax(self) -> torch.Tensor:
        if self.dq_codes is None:
            return self.absmax
        nb = self.dq_codes.numel()
        scale = self.dq_scale.repeat_interleave(NF4_DQ_BLOCK)[:nb]
        return self.dq_codes.float() * scale + self.dq_offset

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_nf4(self, dtype)

    def to(self, device: torch.device | str) -> NF4Tensor:
        """The same codes and constants on ``device`` (never another dtype: the codes are the weight)."""
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return NF4Tensor(mv(self.packed), mv(self.absmax), self.shape, self.numel, self.block,
                         dq_codes=mv(self.dq_codes), dq_scale=mv(self.dq_scale), dq_offset=self.dq_offset)


#: elements per slice of :func:`quantize_nf4`'s nearest-level search: its temporaries are (slice, 16) fp32 (two of
#: them, 128 B per element), 128 MiB here instead of 128 B per element of the whole matrix (Llama-3-70B's
#: 8192 x 28672 MLP weights: 30 GB)
NF4_SLICE = 1 << 20


def quantize_nf4(w: torch.Tensor, block: int = NF4_BLOCK, double_quant: bool = False) -> NF4Tensor:
    """Blockwise absmax NF4 quantisation: each block is scaled into [-1, 1] and rounded to the nearest level (the
    nearest-level search in slices of :data:`NF4_SLICE` elements, each block's the same as at once)."""
    flat = w.detach().float().reshape(-1)
    numel = flat.numel()
    pad = (-numel) % block
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    blocks = flat.view(-1, block)
    absmax = blocks.abs().amax(dim=1).clamp_min(1e-12)
    levels = NF4_LEVELS.to(blocks.device)
    rows = max(1, NF4_SLICE // block)
    codes = torch.cat([((blocks[i:i + rows] / absmax[i:i + rows, None])[..., None] - levels).abs().argmin(dim=-1)
                       .to(torch.uint8).reshape(-1) for i in range(0, blocks.shape[0], rows)])
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    packed = (codes[0::2] << 4) | codes[1::2]
    if not double_quant:
        return NF4Tensor(packed, absmax, w.shape, numel, block)
    # double quantisation: absmax (positive) - mean, symmetric int8 per NF4_DQ_BLOCK constants, fp32 scale each
    offset = float(absmax.mean())
    centred = absmax - offset
    pad2 = (-centred.numel()) % NF4_DQ_BLOCK
    c2 = torch.cat([centred, centred.new_zeros(pad2)]).view(-1, NF4_DQ_BLOCK)
    scale = (c2.abs().amax(dim=1) / 127).clamp_min(1e-12)
    q = torch.round(c2 / scale[:, None]).clamp(-127, 127).to(torch.int8).reshape(-1)[: absmax.numel()]
    return NF4Tensor(packed, None, w.shape, numel, block, dq_codes=q, dq_scale=scale, dq_offset=offset)


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    codes = torch.stack([q.packed >> 4, q.packed & 0xF], dim=1).reshape(-1).long()
    vals = NF4_LEVELS.to(codes.device)[codes][: math.ceil(q.numel / q.block) * q.block].view(-1, q.block)
    out = (vals * q.block_absmax()[:, None]).reshape(-1)[: q.numel]
    return out.view(q.shape).to(dtype)


class NF4Linear(nn.Module):
    """Frozen linear layer whose weight is stored in NF4 (QLoRA base)."""

    def __init__(self, linear: nn.Linear, block: int = NF4_BLOCK, double_quant: bool = True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_nf4 = quantize_nf4(linear.weight, block, double_quant)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:  # the dequantised weight (for merge / inspection)
        return self.weight_nf4.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_nf4.dequantize(x.dtype), self.bias)

    def _apply(self, fn, recurse: bool = True):
        """``module.to(device)`` / ``.cuda()`` / ``to_empty`` move the NF4 codes too (they are plain tensors, not
        parameters or buffers): to the device ``fn`` gives a uint8 tensor, the only thing a move can change of them
        (a dtype conversion such as ``.half()`` leaves integer tensors, and so the codes' constants, as they are)."""
        out = super()._apply(fn, recurse)
        q = self.weight_nf4
        self.weight_nf4 = q.to(fn(q.packed[:0]).device)
        return out


# ----------------------------------------------------------------------------- LoRA


class LoRALinear(nn.Module):
    """base(x) + (alpha/r) * B(A(dropout(x))); base frozen, A/B trainable."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        d_in, d_out = base.in_features, base.out_features
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, d_in))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear / PEFT
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # the base weight (the model's initialiser reaches it through here)
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling


class LoRAExperts(nn.Module):
    """LoRA on stacked MoE experts (``GroupedExperts``: w1, w3 [E, hidden, D], w2 [E, D, hidden]).

    One adapter per expert and target matrix: A [E, r, d_in], B [E, d_out, r], so the count is
    E * r * (d_in + d_out) per matrix, the same rule as dense layers (PEFT on per-expert linears). The forward is
    PEFT's unmerged one, as :class:`LoRALinear`'s: x W^T + (alpha / r) (dropout(x) A^T) B^T, so the frozen W is read by
    a matmul only (held in bf16 under bf16 autocast: :func:`matmul_only_weights`) and no merged W + BA is made or kept
    for the backward.
    """

    def __init__(self, experts: nn.Module, rank: int, alpha: float, dropout: float, targets: Iterable[str]):
        super().__init__()
        self.base = experts
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.targets = [t for t in ("w1", "w2", "w3") if t in set(targets)]
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for t in self.targets:
            E, d_out, d_in = getattr(experts, t).shape
            a = torch.empty(E, rank, d_in)
            for e in range(E):
                nn.init.kaiming_uniform_(a[e], a=math.sqrt(5))
            self.lora_A[t] = nn.Parameter(a)
            self.lora_B[t] = nn.Parameter(torch.zeros(E, d_out, rank))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """(n, D) -> (n, D): the base experts' own expert (its activation, and gpt-oss's biases and clamp), each
        adapted product x W^T plus (alpha / r) (dropout(x) A^T) B^T."""
        if not self.enabled:
            return self.base.expert(e, x)

        def adapter(t: str, inp: torch.Tensor) -> torch.Tensor | None:
            if t not in self.lora_A:
                return None
            return F.linear(F.linear(self.dropout(inp), self.lora_A[t][e]), self.lora_B[t][e]) * self.scaling

        return self.base.expert(e, x, adapter)

    def delta(self, t: str) -> torch.Tensor:
        return self.scaling * torch.bmm(self.lora_B[t], self.lora_A[t])

    def init_weights(self, std: float, out_std: float, cut: float = TRUNCATION_SIGMAS) -> None:
        self.base.init_weights(std, out_std, cut)  # the base experts (the model's initialiser)


def _targets(model: nn.Module, targets: Iterable[str]) -> list[tuple[nn.Module, str, nn.Module]]:
    tset = set(targets)
    found = []
    for name, mod in model.named_modules():
        for child_name, child in mod.named_children():
            if child_name in tset and isinstance(child, nn.Linear | NF4Linear):
                found.append((mod, child_name, child))
        del name
    return found


def apply_lora(model: nn.Module, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0,
               targets: Iterable[str] = LORA_TARGETS, quantize_base: str = "none") -> int:
    """Freeze the model, wrap every target linear with a LoRA adapter; returns the trainable param count.

    ``quantize_base="nf4"`` first replaces each target's weight with an NF4 copy (QLoRA), quantised on the device
    the weight is on (:func:`llmc.runtime.posttrain.build_policy` keeps a loaded model on the CPU until then); each
    full-precision weight is let go once its codes exist, so the model's memory never holds both copies of all.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    sites = _targets(model, targets)
    if not sites and not any(isinstance(getattr(m, "experts", None), nn.Module) for m in model.modules()):
        raise ValueError(f"no LoRA targets {sorted(set(targets))} found in the model")
    sites.reverse()
    while sites:  # popped, so the list holds no replaced linear (and its full-precision weight) to the end
        parent, cname, child = sites.pop()
        base = NF4Linear(child) if quantize_base == "nf4" and isinstance(child, nn.Linear) else child
        setattr(parent, cname, LoRALinear(base, rank, alpha, dropout))
        del child, base
    expert_targets = [t for t in ("w1", "w2", "w3") if t in set(targets)]
    if expert_targets:  # MoE: stacked experts (never quantised under nf4; bf16 under bf16 autocast)
        for mod in list(model.modules()):
            ex = getattr(mod, "experts", None)
            if ex is not None and not isinstance(ex, LoRAExperts) and all(
                    isinstance(getattr(ex, t, None), nn.Parameter) for t in ("w1", "w2", "w3")):
                mod.experts = LoRAExperts(ex, rank, alpha, dropout, expert_targets)
    return lora_param_count(model)


# ----------------------------------------------------------------------------- frozen weights in bf16


def matmul_only_weights(model: nn.Module, frozen_only: bool = True) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) of the weights that only a matmul reads in ``llmc.runtime.model``'s forward, so that
    under bf16 autocast (torch.amp's CUDA and CPU lists cast ``linear`` / ``matmul`` inputs to bf16, rounding to nearest
    even) their bf16 copy gives bit-identical results (``frozen_only``: those that do not train).

    * every plain ``nn.Linear``'s weight (``F.linear``): attention / MLA projections, dense MLP and shared experts, a
      LoRA adapter's base, the MoE router's gate (``Router`` upcasts the gate's *output* to fp32, not its weight),
      an untied output head;
    * stacked MoE experts (``GroupedExperts`` w1 / w2 / w3, read by ``x @ w.t()``), adapted ones too
      (:class:`LoRAExperts` adds its product to the base's, unmerged).

    Left out (their dtype shows in the results): embeddings (``F.embedding`` is not autocast, and a tied head reads
    them too), norms, biases (gpt-oss's expert biases are added outside the matmul; an ``nn.Linear`` bias is small and
    left with them), attention sinks, the MoE expert bias, NF4 codes, subclasses of ``nn.Linear`` (their own
    forward), and any parameter shared by two modules."""
    from llmc.runtime.model import GroupedExperts

    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    out = []
    for mod in model.modules():
        names = ("weight",) if type(mod) is nn.Linear else ("w1", "w2", "w3") if isinstance(mod, GroupedExperts) else ()
        for n in names:
            p = mod._parameters.get(n)
            if p is None or uses[id(p)] > 1 or (frozen_only and p.requires_grad):
                continue
            out.append((mod, n))
    return out


@torch.no_grad()
def cast_frozen_matmul_weights_(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace each frozen :func:`matmul_only_weights` parameter by its ``dtype`` copy (call only when every forward
    of ``model`` runs under ``dtype`` autocast: ``llmc.runtime.posttrain.bf16_forwards``); returns the number of
    elements cast. Each fp32 tensor is freed as its copy is made (unless referenced elsewhere)."""
    n = 0
    for mod, name in matmul_only_weights(model):
        p = mod._parameters[name]
        if p.dtype != dtype:
            setattr(mod, name, nn.Parameter(p.detach().to(dtype), requires_grad=False))
            n += p.numel()
        del p
    return n


def lora_modules(model: nn.Module) -> Iterator[LoRALinear | LoRAExperts]:
    for m in model.modules():
        if isinstance(m, LoRALinear | LoRAExperts):
            yield m


def lora_param_count(model: nn.Module) -> int:
    return sum(p.numel() for m in lora_modules(model) for n, p in m.named_parameters() if n.startswith("lora_"))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run the base model (adapters off): the DPO/GRPO reference without a second weight copy."""
    mods = list(lora_modules(model))
    prev = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, e in zip(mods, prev, strict=True):
            m.enabled = e


def _base_weight(name: str, m: LoRALinear, base: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """The weight adapter ``m`` (module ``name``) is folded into: for an NF4 (QLoRA) base, the full-precision one in
    ``base`` (under the plain name ``<name>.weight``) when given, not the dequantised 4-bit copy, whose quantisation
    error would stay in the merged model. PEFT warns that merging into a 4-bit layer "may get different generations
    due to rounding errors" (peft/tuners/lora/bnb.py, ``Linear4bit.merge``), and the usual way round it is to reload
    the base in 16-bit and merge there; the adapter is what QLoRA (Dettmers et al. 2023) trains, the base it stands
    for is the original one."""
    if isinstance(m.base, NF4Linear) and base is not None:
        return base[f"{name}.weight"].to(m.lora_A.device)
    return m.base.weight


@torch.no_grad()
def merge_lora(model: nn.Module, base: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Fold (alpha/r)·B@A into each base weight and replace the adapter by a plain nn.Linear. ``base``: the
    full-precision weights of the NF4 (QLoRA) bases by plain name (:func:`_base_weight`)."""
    for pname, parent in list(model.named_modules()):
        for cname, child in list(parent.named_children()):
            if isinstance(child, LoRAExperts):
                for t in child.targets:  # summed in fp32 (a bf16-held base would round most of the delta away)
                    w = getattr(child.base, t)
                    setattr(child.base, t, nn.Parameter((w.detach().float() + child.delta(t).float()).to(
                        child.lora_A[t].dtype)))
                setattr(parent, cname, child.base)
                continue
            if not isinstance(child, LoRALinear):
                continue
            # a base held in bf16 (cast_frozen_matmul_weights_: what its forwards computed with) merges as its fp32
            # value; the export is bf16 anyway (hf_io), the merged fp32 sum rounded once there
            w = _base_weight(f"{pname}.{cname}" if pname else cname, child, base).detach().float()
            lin = nn.Linear(child.in_features, child.out_features, bias=child.base.bias is not None)
            lin.weight.copy_(w + child.delta_weight().float())
            if child.base.bias is not None:
                lin.bias.copy_(child.base.bias)
            lin.to(child.lora_A.dtype)
            setattr(parent, cname, lin)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ----------------------------------------------------------------------------- sharded (FSDP2) runs


def _adapters(model: nn.Module) -> Iterator[tuple[str, str, nn.Parameter, nn.Parameter]]:
    """(module name, target, A, B) of every adapter matrix pair."""
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, "", m.lora_A, m.lora_B
        elif isinstance(m, LoRAExperts):
            for t in m.targets:
                yield name, t, m.lora_A[t], m.lora_B[t]


def _local_slices(p: torch.Tensor) -> tuple[slice, ...]:
    """The block of the full tensor this rank holds: everything for a plain tensor, the DTensor's local
    shard (FSDP2 / TP ``Shard`` placements) otherwise."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(p, DTensor):
        return tuple(slice(None) for _ in p.shape)
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))


def _local(p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return p.to_local() if isinstance(p, DTensor) else p


@torch.no_grad()
def init_lora_(model: nn.Module, seed: int = 0) -> None:
    """(Re)initialise every adapter as :class:`LoRALinear` does (A Kaiming-uniform with a = sqrt(5), i.e.
    U(-1/sqrt(d_in), 1/sqrt(d_in)); B = 0) from a generator seeded by ``seed`` and the adapter's name, so a
    model built whole, one built on the meta device and sharded, and any rank count get the same adapters.
    Each rank writes only its shard of a sharded adapter."""
    for name, t, A, B in _adapters(model):
        g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(f"{name}.{t}".encode())) % 2**63)
        bound = 1.0 / math.sqrt(A.shape[-1])
        full = torch.empty(tuple(A.shape)).uniform_(-bound, bound, generator=g)
        _local(A).copy_(full[_local_slices(A)])
        _local(B).zero_()


def full_lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' full tensors on CPU (as :func:`lora_state_dict`); collective when they are sharded
    (call on every rank). Adapters are small: r x (d_in + d_out) per matrix."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
            for k, v in model.state_dict().items() if "lora_" in k}


@torch.no_grad()
def merged_state_dict(model: nn.Module, base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict with every adapter folded into its base weight (as :func:`merge_lora`, ``base`` too)
    under the plain model's names, without changing the model. Sharded (FSDP2) weights stay sharded: each rank
    adds (alpha/r) B[rows] @ A[:, cols] for the block it holds (A and B are gathered whole, being small)."""
    from torch.distributed.tensor import DTensor

    sd = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            pairs = [(f"{name}.base.weight", f"{name}.weight", _base_weight(name, m, base), m.lora_A, m.lora_B)]
            if m.base.bias is not None:
                sd[f"{name}.bias"] = sd.pop(f"{name}.base.bias")
        elif isinstance(m, LoRAExperts):
            pairs = [(f"{name}.base.{t}", f"{name}.{t}", getattr(m.base, t), m.lora_A[t], m.lora_B[t])
                     if t in m.lora_A else (f"{name}.base.{t}", f"{name}.{t}", None, None, None)
                     for t in ("w1", "w2", "w3")]
        else:
            continue
        for old, new, w, A, B in pairs:
            stored = sd.pop(old, None)
            if w is None:
                sd[new] = stored
                continue
            a = A.full_tensor() if isinstance(A, DTensor) else A
            b = B.full_tensor() if isinstance(B, DTensor) else B
            sl = _local_slices(w)
            if w.dim() == 2:  # (out, in): rows of B, columns of A
                delta = b[sl[0]] @ a[:, sl[1]]
            else:  # stacked experts (E, out, in)
                delta = torch.bmm(b[sl[0], sl[1]], a[sl[0], :, sl[2]])
            local = (_local(w).float() + m.scaling * delta.float()).to(a.dtype)
            sd[new] = (DTensor.from_local(local, w.device_mesh, w.placements, shape=w.shape, stride=w.stride())
                       if isinstance(w, DTensor) else local)
    return sd
