"""Parallelism search: enumerate layouts, drop what cannot work, keep what fits, rank by step time.

Enumeration (torchtitan's mesh: world = dp_replicate x dp_shard x cp x tp x pp; EP borrows ranks from the others:
on torchtitan from dp_shard x cp x tp, its expert mesh efsdp x ep spanning them, on llmc's other profiles from
dp_shard x cp, ``plan.ep_domain``):

* tp: divisors of the NVLink domain (the node; a GB200 / GB300 NVL72 rack's 72 GPUs,
  ``hardware.nvlink_group``) that divide n_heads and n_kv_heads (MLA: n_heads); TP never leaves NVLink (TP needs
  NVLink bandwidth: Narayanan et al. 2021, arXiv:2104.04473 §3.2).
* pp: divisors of world/tp up to n_layers; uneven splits allowed (Llama 3 405B: 126 layers / 16).
  Schedules 1F1B and Interleaved1F1B with v in {2, 4, 8} virtual stages when the layers allow
  (Megatron requires grad_accum % pp == 0 for interleaving); GPipe and ZBVZeroBubble when pinned.
* cp: powers of two dividing seq_len / (2 tp), only from 32k tokens (ring attention pays off for
  long sequences).
* ep (MoE only): divisors of num_experts that divide dp_shard x cp x tp on torchtitan (0.3.0's only constraints:
  its expert mesh needs efsdp = dp_shard x cp x tp / ep whole, parallel_dims.py build_mesh, and its all-to-all
  splits the experts evenly over the EP ranks, token_dispatcher.py), dp_shard x cp on the other profiles.
* dp_shard x dp_replicate = the rest (HSDP: shard inside a node or a few nodes, replicate across);
  ZeRO-1 (shard optimizer state, reduce once per step), ZeRO-2 (and gradients, reduced every micro-batch) or
  ZeRO-3/FSDP over dp_shard on DeepSpeed; on a backend that shards with FSDP2 (``Backend.zero12 == "fsdp2"``:
  torchtitan, native), which runs ZeRO-1 as ZeRO-2, ZeRO-2 or ZeRO-3, so the plan names the stage that runs
  (:func:`zero_stages`).
* micro_batch: powers of two up to 16K tokens per GPU; grad_accum from the batch identity
  global_batch_seqs = micro_batch x grad_accum x dp (integral or rejected; >= pp when pp > 1).
* activation checkpointing: none, selective, full.

Pruning (the search must answer for 16,384 GPUs in well under a second): every layout gets a
cheap lower bound on its step time (closed-form timing, no recomputation, memory ignored) and
layouts are visited best-first. A layout -- or one candidate inside it -- is skipped when its bound
cannot beat the best plan already found for any value it stands for (tp, pp, cp, ep, ZeRO stage,
schedule, and its (tp, pp, cp, ep) layout), so the chosen plan, the alternatives and the
per-dimension comparisons of those dimensions are exactly what an exhaustive search gives
(tests/test_search.py checks that against brute force). Memory is monotone: it never rises with a
larger shard group (at a fixed EP degree), never falls with a larger micro-batch or weaker recomputation, so
one "least-memory corner" evaluation can rule out whole groups of layouts, and the micro-batch scan
stops at the first misfit (an assumption about memory.py that holds up to its small fixed buffers).
Memory results are cached on the fields memory depends on, and the fit checks evaluate only the
peak stage (``memory_per_gpu(..., per_stage=False)``). The fit of each (layout group, micro-batch, AC)
is found once, by binary search over dp_shard (:meth:`_Search.fit_from_ds`; a million GPUs give hundreds of
dp_shard x dp_replicate splits per layout), and batch rejections are kept once per (tp, pp, cp) and
reason (all are counted).

Ranking: step time (0.1 % bins), then memory per GPU, then simplicity (fewer parallel dimensions, no
interleaving). Within the model's error band of the fastest the choice is never riskier than the fastest, and safer
where the fastest's memory is at risk (:func:`_choose`): where the memory model's error reaches the fastest's memory
from the usable limit, the fastest candidate of the band it does not reach (with a P006 bubble no larger) takes the
fastest's place, simpler or not (a search with that stricter fit check, :meth:`_Search.sub_search`); then a simpler
layout (:func:`_simplicity`: less recomputation, then fewer pipeline stages, then no CP, then smaller TP and EP) is
chosen when it is no riskier than that plan (:meth:`_Search.declined`: its memory the memory model's error below the
usable limit or no more than that plan's, its P006 bubble no larger); where none of a class the search evaluated
passes, a search focused on that class finds its fastest one that does (:meth:`_Search.focus`: the pruning skips
candidates that cannot beat what is known, such as a smaller micro-batch with less memory). Rejected layouts keep a
one-line reason, and ``reasons`` explains the choice against the best plan for every other value of each dimension;
every verdict there is read off the candidates' own numbers (a tie is a difference that prints as 0.0%; a value
whose evaluated candidates did not fit but whose others the step-time bound skipped is "pruned", not "does not
fit").
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field, fields

from llmc.compiler import backends
from llmc.compiler.calibration import UNCALIBRATED_MEMORY_MAX_ERR_PCT
from llmc.compiler.hardware import nvlink_group
from llmc.compiler.memory import max_chunk_layers
from llmc.compiler.plan import EP_SPANS_TP, ParallelPlan, ep_domain
from llmc.compiler.result import Candidate, MemoryNumbers
from llmc.compiler.timing import LayoutTimer, StepModel, step_time
from llmc.compiler.units import gib

_BOUNDED = "memory bounded by a weaker AC mode"  # a Candidate's reason: its per_gpu_bytes is an upper bound
AC_ORDER = ("none", "selective", "full")  # the scan: each keeps less than the one before and costs more
AC_RANKS = ("none", "selective", "partial", "full")  # order of plans and of "simpler" (less recomputation first)
CP_MIN_SEQ = 32_768
# P006's threshold: a pipeline of p stages fed fewer than 4 p micro-batches (v x m < 4 p interleaved) idles more than
# ~20% of its time, (p - 1) / (v m + p - 1) (Narayanan et al. 2021, arXiv:2104.04473 sec. 2.2); bubble_warning
BUBBLE_MICROS_PER_STAGE = 4
# the memory error the simpler-layout rule keeps below the usable limit when the caller names none: llmc's largest
# |error| on published peak memory, uncalibrated (benchmarks/RESULTS.md "peak reserved memory rows", all rows: 12.0%)
MEMORY_ERROR_BAND = UNCALIBRATED_MEMORY_MAX_ERR_PCT / 100.0
INTERLEAVE_V = (2, 4, 8)
MAX_MICRO_TOKENS = 16_384  # micro-batches beyond this many tokens per GPU gain no GEMM efficiency


@dataclass
class SearchResult:
    best: Candidate | None
    memory: MemoryNumbers | None  # of the best plan
    alternatives: list[Candidate]  # best plan of other (tp, pp, cp, ep) layouts, ranked
    rejected: list[Candidate]  # closest memory miss per layout, one per structural reason, then the rest
    rejected_counts: dict[str, int]  # reason category -> number of candidates
    closest: Candidate | None  # the non-fitting candidate with the least memory (for P004)
    reasons: list[str]
    evaluated: int = 0  # memory evaluations
    fitting: int = 0
    batch_blocked: bool = False  # every layout failed the batch identity
    backend: str = "generic"  # the backend profile the search timed and sized (StepModel.backend)
    fastest: Candidate | None = None  # the fastest fitting candidate (best, unless the simpler-layout rule chose)


_PLAN_FIELDS = {f.name: f.default for f in fields(ParallelPlan)}
assert not hasattr(ParallelPlan, "__post_init__")  # _plan relies on the plain dataclass __init__


def _plan(**values) -> ParallelPlan:
    """``ParallelPlan(**values)``: the same frozen instance, filled the way its generated ``__init__`` fills
    it, at a quarter of the cost (a search at a million GPUs builds tens of thousands of plans)."""
    plan = object.__new__(ParallelPlan)
    d = plan.__dict__
    d.update(_PLAN_FIELDS)
    d.update(values)
    return plan


def divisors(n: int) -> list[int]:
    small, large = [], []
    i = 1
    while i * i <= n:
        if n % i == 0:
            small.append(i)
            if i * i != n:
                large.append(n // i)
        i += 1
    return small + large[::-1]


def zero_stages(pinned: int | None, shard: int, offload_optimizer: bool, backend: str) -> tuple[int, ...]:
    """The ZeRO stages the search tries for a shard group of ``shard`` (dp_shard x cp) ranks: the pinned one (a ZeRO-1
    pin on a backend that shards with FSDP2, ``Backend.zero12 == "fsdp2"``, as the ZeRO-2 it runs: FSDP2 has no
    ZeRO-1, checks.check_zero_pin, P021, so the plan names what runs); without a shard group DDP (0), or with
    optimizer offload ZeRO-2 (ZeRO-Offload on one GPU, Ren et al. 2021 sec. 6); else the backend's sharded stages:
    2 and 3 on FSDP2; 1, 2 and 3 on DeepSpeed, whose ZeRO-1 (BF16_Optimizer: replicated fp32 gradients, reduced once
    per step) and ZeRO-2 (fp32 gradient partitions, reduced every micro-batch) differ in memory and time
    (``backends.ds_reduce_buffer_bytes``, ``timing._Layout._split``); 1 and 3 on the reference profiles (megatron,
    generic). P004's hints (``checks``) ask the same."""
    zero12 = backends.get_backend(backend).zero12
    if pinned is not None:
        return (2,) if pinned == 1 and zero12 == "fsdp2" else (pinned,)
    if shard == 1:
        return (2,) if offload_optimizer else (0,)
    return {"fsdp2": (2, 3), "deepspeed": (1, 2, 3)}.get(zero12, (1, 3))


def micro_steps(per_dp: int, micro_batch: int, pp: int, schedule: str) -> int | None:
    """The micro-steps (grad_accum) of ``per_dp`` sequences per data-parallel rank in micro-batches of ``micro_batch``
    under a ``pp``-stage pipeline: whole micro-batches, at least pp of them under a pipeline, a multiple of pp for the
    interleaved schedule (Megatron's); None where they do not split. P004's hints (``checks``) ask the same."""
    if micro_batch < 1 or per_dp % micro_batch:
        return None
    m = per_dp // micro_batch
    if pp > 1 and (m < pp or (schedule == "Interleaved1F1B" and m % pp)):
        return None
    return m


def bubble_warning(p: ParallelPlan) -> bool:
    """P006's condition: a pipeline fed fewer than :data:`BUBBLE_MICROS_PER_STAGE` micro-batches per stage (v x m <
    4 p for the interleaved schedule; the zero-bubble schedule excepted)."""
    v = p.pp_virtual_stages if p.pp_schedule == "Interleaved1F1B" else 1
    return (p.pp > 1 and p.pp_schedule != "ZBVZeroBubble"
            and v * p.grad_accum < BUBBLE_MICROS_PER_STAGE * p.pp)


def _bubble(pp: int, schedule: str, v: int, m: int) -> float:
    """:func:`bubble_fraction` of a pipeline of ``pp`` stages running ``schedule`` with ``v`` chunks per rank over
    ``m`` micro-batches."""
    v = v if schedule == "Interleaved1F1B" else 1
    if pp <= 1 or schedule == "ZBVZeroBubble" or v * m >= BUBBLE_MICROS_PER_STAGE * pp:
        return 0.0
    return (pp - 1) / (v * m + pp - 1)


def bubble_fraction(p: ParallelPlan) -> float:
    """The bubble P006 quotes where :func:`bubble_warning` draws it, the pipeline's idle share (p - 1) / (v m + p - 1)
    (Narayanan et al. 2021, arXiv:2104.04473 sec. 2.2); 0 where it draws none. What the simpler-layout rule compares:
    a plan's bubble may be no larger than the fastest's (:class:`_Reference`)."""
    return _bubble(p.pp, p.pp_schedule, p.pp_virtual_stages, p.grad_accum)


def _complexity(p: ParallelPlan) -> int:
    return ((p.tp > 1) + (p.pp > 1) + (p.cp > 1) + (p.ep > 1) + (p.dp_replicate > 1 and p.dp_shard > 1)
            + (p.pp_schedule != "1F1B") + (p.activation_checkpointing != "none") + (p.zero_stage == 3))


_LOG_BIN = math.log(1.001)
_AC_RANK = {ac: i for i, ac in enumerate(AC_RANKS)}


def _step_bin(step: float) -> int:
    return round(math.log(step) / _LOG_BIN)


def _pct(step: float, ref: float) -> float:
    """``step`` against ``ref`` in percent (+: slower), as the reasons print it."""
    return 100 * (step / ref - 1)


def _tied(step: float, ref: float) -> bool:
    """A tie in the reasons: the percentage they print (one decimal) is 0.0; the list of other values and the verdict
    beside it use this one threshold."""
    return f"{abs(_pct(step, ref)):.1f}" == "0.0"


def _rank_key(c: Candidate):
    # step time in 0.1 % bins so that near-ties go to the smaller / simpler plan
    return (_step_bin(c.step_seconds), c.per_gpu_bytes, _complexity(c.plan), _plan_tuple(c.plan))


def _plan_tuple(p: ParallelPlan) -> tuple:
    return (p.tp, p.pp, p.cp, p.ep, p.dp_shard, p.dp_replicate, p.pp_schedule, p.pp_virtual_stages,
            p.micro_batch, _AC_RANK[p.activation_checkpointing], p.ac_layers, p.zero_stage)


def describe(p: ParallelPlan) -> str:
    """Compact one-line plan: ``tp8 pp16(Interleaved1F1B v4) dp_shard128 zero1 mb1x16 ac=full``
    (micro_batch x grad_accum; dp_rep/cp/ep only when > 1)."""
    parts = [f"tp{p.tp}"]
    if p.pp > 1:
        sched = p.pp_schedule + (f" v{p.pp_virtual_stages}" if p.pp_schedule == "Interleaved1F1B" else "")
        parts.append(f"pp{p.pp}({sched})")
    if p.cp > 1:
        parts.append(f"cp{p.cp}")
    if p.ep > 1:
        parts.append(f"ep{p.ep}")
    if p.dp_replicate > 1:
        parts.append(f"dp_rep{p.dp_replicate}")
    parts.append(f"dp_shard{p.dp_shard}")
    if p.dp_shard * p.cp > 1:
        parts.append(f"zero{p.zero_stage}")
    parts.append(f"mb{p.micro_batch}x{p.grad_accum}")
    parts.append(f"ac={p.ac_label}")
    if p.loss_chunk_tokens:
        parts.append(f"loss_slice={p.loss_chunk_tokens}")
    return " ".join(parts)


@dataclass(frozen=True)
class _Reference:
    """The plan the simpler-layout rule measures a candidate's risk against (:meth:`_Search.declined`): the fastest,
    or, where the memory model's error reaches the fastest's memory, the fastest candidate in the band it does not
    reach."""

    cand: Candidate
    mem: int  # its memory per GPU
    bubble: float  # its P006 bubble (bubble_fraction; 0: none)
    name: str  # how the reasons call it, possessive ("the fastest's")


@dataclass
class _Layout:
    """One (degrees, ZeRO, schedule) combination with its valid micro-batches and a time lower bound."""

    t: int
    p: int
    c: int
    e: int
    ds: int
    dr: int
    z: int
    sched: str
    v: int
    mbs: tuple[int, ...]  # micro-batches satisfying the batch identity and the pipeline constraints
    per_dp: int
    timer: LayoutTimer
    lb: float = 0.0  # fastest step time over mbs without recomputation (memory ignored)
    required: tuple = ()  # its (dimension, value) keys of REQUIRED_DIMS (see _Search.can_skip)
    none_times: tuple = ()  # timer.time(mb, per_dp // mb, "none") for each of mbs (computed for lb)
    keys: tuple = ()  # fixed_keys(), once a candidate of the layout fits

    def order(self, ac: str) -> tuple:
        """``_plan_tuple(self.plan(self.mbs[0], ac))`` without building the plan."""
        return (self.t, self.p, self.c, self.e, self.ds, self.dr, self.sched, self.v, self.mbs[0],
                _AC_RANK[ac], 0, self.z)

    def plan(self, mb: int, ac: str, ac_layers: int = 0, chunk: int = 0) -> ParallelPlan:
        return _plan(dp_replicate=self.dr, dp_shard=self.ds, tp=self.t, pp=self.p, pp_schedule=self.sched,
                     pp_virtual_stages=self.v, cp=self.c, ep=self.e, micro_batch=mb,
                     grad_accum=self.per_dp // mb, activation_checkpointing=ac, ac_layers=ac_layers,
                     zero_stage=self.z, loss_chunk_tokens=chunk)

    def fixed_keys(self) -> list[tuple[str, object]]:
        return [("tp", self.t), ("pp", self.p), ("cp", self.c), ("ep", self.e), ("dp_shard", self.ds),
                ("zero_stage", self.z), ("pp_schedule", self.sched)]



@dataclass
class _Family:
    """The layouts of one (tp, pp, cp, ep, ZeRO, schedule, v) that differ only in the dp_shard x dp_replicate
    split (``members``), with a lower bound on all of their step times."""

    t: int
    p: int
    c: int
    e: int
    z: int
    sched: str
    v: int
    mbs: tuple[int, ...]
    per_dp: int
    dp: int
    required: tuple
    members: list[tuple[int, int]] = field(default_factory=list)  # (dp_shard, dp_replicate), ascending dp_shard
    lb: float = 0.0
    timer: LayoutTimer | None = None  # the split-free timer bound() builds; the members' timers share its terms

    def bound(self, sm: StepModel) -> float:
        """The fastest step over ``mbs`` without recomputation and without the terms that depend on the data-parallel
        split (FSDP / ZeRO traffic, parameter fetches from the host, replica all-reduce, optimizer update): every
        other term of
        :meth:`LayoutTimer.time` is the same for all members, so this is <= each member's ``_Layout.lb``."""
        timer = self.timer = LayoutTimer(sm, self.t, self.p, self.c, self.e, self.dp, 1, self.z, self.sched, self.v)
        timer.fsdp_passes, timer.fsdp_latency, timer.per_step_comm, timer.optimizer = 0, 0.0, 0.0, 0.0
        timer.param_fetch = 0.0
        return min(timer.time(mb, self.per_dp // mb, "none")[0] for mb in self.mbs)

    def expand(self) -> list[_Layout]:
        out = []
        for ds, dr in self.members:
            timer = self.timer.with_split(ds, dr)  # bound() built it: a family is expanded only after its bound
            time = timer.time
            none_times = tuple(time(mb, self.per_dp // mb, "none") for mb in self.mbs)
            lay = _Layout(self.t, self.p, self.c, self.e, ds, dr, self.z, self.sched, self.v, self.mbs, self.per_dp,
                          timer, min(st for st, _ in none_times), none_times=none_times)
            lay.required = self.required
            out.append(lay)
        return out


class _Search:
    """Mutable state of one search (see :func:`search`)."""

    def __init__(self, arch, sm, world, gpu, seq_len, G, pins, memory_fn, fits_fn, top_k, peak_fn=None,
                 loss_slice: int = 0):
        self.arch, self.sm, self.world, self.gpu, self.seq_len, self.G = arch, sm, world, gpu, seq_len, G
        self.loss_slice = loss_slice  # tokens per slice of the loss the runner can compute (0: it cannot)
        self.pins, self.memory_fn, self.fits_fn, self.top_k = pins, memory_fn, fits_fn, top_k
        self.peak_fn = peak_fn or memory_fn  # the candidates' fit checks need only the peak stage
        self.capacity = gpu.hbm_bytes
        self._usable: str | None = None  # usable_txt()
        pin_ac = pins.activation_checkpointing
        # the scanned modes; a pinned "partial" scans none of them and is tried by try_partial alone, with "full"
        # as its least-memory corner (partial keeps at least what full keeps)
        self.acs = AC_ORDER if pin_ac is None else () if pin_ac == "partial" else (pin_ac,)
        self.partial = pin_ac in (None, "partial")
        self.partial_pin = pin_ac == "partial"
        self.partial_k = getattr(pins, "ac_layers", None)
        # the least-memory candidate of a layout: the strongest mode scanned, or the pinned partial count (without a
        # count: full, which keeps no more than any count does), so a layout that fails it reports that plan
        pinned_k = self.partial_pin and self.partial_k is not None
        self.corner_ac = "partial" if pinned_k else "full" if self.partial_pin else self.acs[-1]
        self.corner_k = self.partial_k if pinned_k else 0
        self.fitting: list[Candidate] = []
        self.rejected: list[Candidate] = []
        self.counts: dict[str, int] = {}
        self.best_by: dict[tuple[str, object], Candidate] = {}
        self.best_rank: dict[tuple[str, object], tuple] = {}  # _rank_key of best_by's candidates
        self.nofit_by: dict[tuple[str, object], int] = {}
        self.struct_by: dict[tuple[str, object], str] = {}
        self.layout_best: dict[tuple, Candidate] = {}
        self.layout_rank: dict[tuple, tuple] = {}  # _rank_key of layout_best's candidates
        self.mem_cache: dict[tuple, MemoryNumbers] = {}
        self.corners: dict[tuple, tuple[list, list]] = {}  # (tp, pp, cp, sched, v, zero) -> (failing, fitting)
        self.evaluated = 0
        self.band = 0.0  # relative error band for the simpler-layout preference (see search())
        self.mem_band = MEMORY_ERROR_BAND  # the memory model's relative error, kept below the usable limit (declined)
        self.fit_check = True  # False: fits_fn passes every candidate (the reasons do not call them fitting)
        # a sub-search for the simpler-layout rule (sub_search): only micro-batch counts whose P006 bubble is at most
        # max_bubble (None: any), only candidates no slower than step_cap, and only the best one (best_only: its
        # can_skip is can_skip_best, which compares with the fastest found, ``top``, instead of the best of every value)
        self.max_bubble: float | None = None
        self.step_cap = math.inf
        self.best_only = False
        self.top = math.inf
        self.sub_fitting: list[Candidate] = []  # the sub-searches' candidates (counted in SearchResult.fitting)
        # what the step-time bound skipped, for the reasons of dp_shard, recomputation and micro-batch (whose values
        # the search does not compare exactly; pruned_bounds): per dp_shard and micro-batch the least bound of the
        # families and layouts skipped whole that stand for it, the least bound of any (every AC mode), and the
        # dp_shard, micro-batch, AC mode and bound of each candidate skipped inside a layout, flat
        self.skipped_ds: dict[int, float] = {}
        self.skipped_mb: dict[int, float] = {}
        self.skipped_any: float | None = None
        self.skipped_cands: list = []
        # CP would be a candidate but is not searched below CP_MIN_SEQ tokens (the reasons say so: cp_unsearched)
        self.cp_off = cp_unsearched(pins, seq_len, world)
        self.pruned = 0
        self.layouts_total = 0
        self.layouts_batch_bad = 0
        # the shard sizes of each (tp, pp, cp, schedule, v, ZeRO, ep) group, ascending, and per (group,
        # micro-batch, AC) the smallest of them that fits
        self.ds_lists: dict[tuple, list[int]] = {}
        self.fit_from: dict[tuple, float | None] = {}
        # per (tp, pp, cp, schedule, v, ZeRO, ep, micro-batch): the (dp_shard, ac_layers) of partial candidates that
        # did not fit; memory never rises with either (fit_from_ds, try_partial), so they rule out smaller ones
        self.partial_fails: dict[tuple, list[tuple[int, int]]] = {}
        self.partial_found: int | None = None  # the count of try_partial's last added candidate (the fewest that fit)

    # ------------------------------------------------------------------ bookkeeping
    def reject(self, plan: ParallelPlan, category: str, reason: str, mem: int = 0, dims: tuple = (),
               dim_reason: str | None = None) -> None:
        self.counts[category] = self.counts.get(category, 0) + 1
        self.rejected.append(Candidate(plan, 0.0, 0.0, mem, False, reason))
        for d in dims:
            self.struct_by.setdefault((d, getattr(plan, d)), dim_reason or reason)

    def batch_reason(self) -> str:
        return (f"the batch of {self.G} sequences cannot be split{' at cp 1' if self.cp_off else ''} (micro_batch x "
                "grad_accum x dp, >= pp micro-batches)")

    def exact_bytes(self, c: Candidate) -> int:
        """``c``'s memory per GPU: its own, or, for a candidate whose memory a weaker AC mode bounded, evaluated."""
        if c.reason == _BOUNDED:
            return self.memory(c.plan).per_gpu_bytes
        return c.per_gpu_bytes

    def mem_safe(self, mem: float) -> bool:
        """Does ``mem`` bytes per GPU stay the memory model's error (``mem_band``) below the usable limit?"""
        return mem * (1 + self.mem_band) <= self.usable()

    def reference(self, c: Candidate, name: str) -> _Reference:
        return _Reference(c, self.exact_bytes(c), bubble_fraction(c.plan), name)

    def declined(self, c: Candidate, ref: _Reference) -> list[str]:
        """Why the simpler-layout rule does not take ``c`` over ``ref`` (the fastest, or the fastest the memory error
        does not reach; empty: it may): never a riskier plan for simplicity. Its memory per GPU must stay the memory
        model's error (``mem_band``) below the usable limit, or be no more than ``ref``'s (not checked without a fit
        check), and its P006 bubble (:func:`bubble_fraction`) be no larger than ``ref``'s (none where ``ref`` draws
        none)."""
        out = []
        p = c.plan
        if self.fit_check and c.per_gpu_bytes > ref.mem and not self.mem_safe(c.per_gpu_bytes):  # (at least its own)
            mem = self.exact_bytes(c)
            if mem > ref.mem and not self.mem_safe(mem):
                out.append(f"its {gib(mem)} is within the memory model's {100 * self.mem_band:.0f}% error of the "
                           f"{self.usable_txt()}" + ("" if self.mem_safe(ref.mem) else f", above {ref.name} "
                                                     f"{gib(ref.mem)}"))
        bubble = bubble_fraction(p)
        if bubble > ref.bubble:
            v = p.pp_virtual_stages if p.pp_schedule == "Interleaved1F1B" else 1
            what = f"{p.grad_accum} micro-batches{f' x v{v}' if v > 1 else ''} for {p.pp} stages"
            out.append(f"its pipeline bubble draws P006 ({what})" if not ref.bubble else
                       f"its pipeline bubble, ~{100 * bubble:.1f}% (P006: {what}), is larger than {ref.name} "
                       f"~{100 * ref.bubble:.1f}%")
        return out

    def sub_search(self, pins, ref: _Reference | None, max_bubble: float, step_cap: float = math.inf
                   ) -> Candidate | None:
        """The fastest candidate under ``pins`` that :meth:`declined` does not decline against ``ref`` (None: whose
        memory the memory model's error does not reach), exactly: a search whose fit check adds that memory rule, whose
        micro-batch counts draw no P006 bubble larger than ``max_bubble`` and that skips what cannot beat the fastest
        it found or is slower than ``step_cap`` (its best is what an exhaustive search gives, where this search skipped
        candidates that could not beat what it knew, such as a smaller micro-batch with less memory). None when there
        is none (or the memory model refuses the pins). Its candidates count as evaluated (``sub_fitting``)."""
        fits, usable, band = self.fits_fn, self.usable(), self.mem_band
        cap = -1 if ref is None else ref.mem
        tight = ((lambda m: fits(m) and (m.per_gpu_bytes * (1 + band) <= usable or m.per_gpu_bytes <= cap))
                 if self.fit_check else fits)
        F = _Search(self.arch, self.sm, self.world, self.gpu, self.seq_len, self.G, pins, self.memory_fn, tight, 0,
                    self.peak_fn, self.loss_slice)
        F.fit_check, F.mem_band, F.max_bubble, F.step_cap, F.best_only = self.fit_check, band, max_bubble, step_cap, True
        F.can_skip = F.can_skip_best
        F.mem_cache = self.mem_cache  # (the same memory function: its results are shared)
        before = len(self.mem_cache)
        _run(F)
        self.evaluated += len(self.mem_cache) - before
        self.sub_fitting.extend(F.fitting)
        return min(F.fitting, key=_rank_key, default=None)

    def focus(self, c: Candidate, ref: _Reference) -> Candidate | None:
        """The fastest candidate of ``c``'s recomputation mode and degrees (tp, pp, cp, ep) that :meth:`declined`
        does not decline against ``ref`` (:meth:`sub_search` pinned to them)."""
        p = c.plan
        pins = self.pins.model_copy(update={"tp": p.tp, "pp": p.pp, "cp": p.cp, "ep": p.ep,
                                            "activation_checkpointing": p.activation_checkpointing})
        return self.sub_search(pins, ref, ref.bubble)

    def memory(self, plan: ParallelPlan) -> MemoryNumbers:
        # memory depends on dp_replicate only through "is there data parallelism" (buffers), and on
        # grad_accum only through min(pp, m) in-flight micro-batches (all of m for GPipe)
        m = plan.grad_accum if plan.pp_schedule == "GPipe" else min(plan.grad_accum, plan.pp)
        key = (plan.dp_shard, plan.dp > 1, plan.tp, plan.pp, plan.pp_schedule, plan.pp_virtual_stages, plan.cp,
               plan.ep, plan.micro_batch, m, plan.activation_checkpointing, plan.ac_layers, plan.zero_stage,
               plan.loss_chunk_tokens)
        hit = self.mem_cache.get(key)
        if hit is None:
            self.evaluated += 1
            hit = self.peak_fn(plan)
            self.mem_cache[key] = hit
        return hit

    def chunk(self, lay: _Layout, mb: int) -> int:
        """The loss slice of ``lay``'s least-memory candidates at micro-batch ``mb``: the runner's slice, or 0 when it
        cannot slice the loss or one slice holds the rank's whole micro-step (mb x seq_len / cp tokens)."""
        s = self.loss_slice
        return s if s and mb * self.seq_len > s * lay.c else 0

    def fitting_plan(self, lay: _Layout, mb: int, ac: str, k: int = 0) -> tuple[ParallelPlan, MemoryNumbers, bool]:
        """(plan, memory, fits) of a candidate: with the whole loss when it fits, else with the loss in slices (where
        the runner can: its head recomputed in the backward, so never faster) when that fits, else the misfit with the
        least memory. Memory never rises when the loss is sliced, so "fits either way" has every monotonicity the
        search relies on (dp_shard, ep, micro-batch, recomputation)."""
        plan = lay.plan(mb, ac, k)
        mem = self.memory(plan)
        if self.fits_fn(mem):
            return plan, mem, True
        c = self.chunk(lay, mb)
        if not c:
            return plan, mem, False
        plan = lay.plan(mb, ac, k, c)
        mem = self.memory(plan)
        return plan, mem, self.fits_fn(mem)

    def note_nofit(self, plan: ParallelPlan, mem: int, dims=("tp", "pp", "cp", "ep", "dp_shard", "zero_stage",
                                                           "pp_schedule", "activation_checkpointing",
                                                           "micro_batch")) -> None:
        nofit_by = self.nofit_by
        values = plan.__dict__
        for d in dims:
            k = (d, values[d])
            cur = nofit_by.get(k)
            if cur is None or mem < cur:
                nofit_by[k] = mem

    def add_fit(self, cand: Candidate, lay: _Layout) -> None:
        self.fitting.append(cand)
        if self.best_only and cand.step_seconds < self.top:  # (the fastest found: can_skip_best's bound)
            self.top = cand.step_seconds
        rk = _rank_key(cand)
        best_rank = self.best_rank
        if not lay.keys:
            lay.keys = tuple(lay.fixed_keys())
        for k in (*lay.keys, ("activation_checkpointing", cand.plan.activation_checkpointing),
                  ("micro_batch", cand.plan.micro_batch)):
            cur = best_rank.get(k)
            if cur is None or rk < cur:
                self.best_by[k] = cand
                best_rank[k] = rk
        lk = (lay.t, lay.p, lay.c, lay.e)
        cur = self.layout_rank.get(lk)
        if cur is None or rk < cur:
            self.layout_best[lk] = cand
            self.layout_rank[lk] = rk

    def pruned_bounds(self, keys) -> dict[tuple[str, object], float]:
        """For each (dimension, value) of ``keys`` (dp_shard, activation_checkpointing, micro_batch) that the step-time
        bound skipped a candidate of, the least bound of those: a lower bound on the step time of the value's
        candidates that were not evaluated. Families and layouts skipped whole stand for every member's dp_shard, every
        micro-batch of theirs and every recomputation mode searched (with their bound, below each of theirs)."""
        out: dict[tuple[str, object], float] = {}
        cands = self.skipped_cands
        for i in range(0, len(cands), 4):
            ds, mb, ac, b = cands[i:i + 4]
            for k in (("dp_shard", ds), ("micro_batch", mb), ("activation_checkpointing", ac)):
                if k in keys and (k not in out or b < out[k]):
                    out[k] = b
        # the layouts and families skipped whole (_run)
        for k, b in self.skipped_ds.items():
            if ("dp_shard", k) in keys and b < out.get(("dp_shard", k), math.inf):
                out[("dp_shard", k)] = b
        for k, b in self.skipped_mb.items():
            if ("micro_batch", k) in keys and b < out.get(("micro_batch", k), math.inf):
                out[("micro_batch", k)] = b
        if self.skipped_any is not None:
            for ac in self.acs + (("partial",) if self.partial else ()):
                k = ("activation_checkpointing", ac)
                if k in keys and self.skipped_any < out.get(k, math.inf):
                    out[k] = self.skipped_any
        return out

    # ------------------------------------------------------------------ pruning
    def can_skip(self, lay: _Layout, step: float | None = None) -> bool:
        """Exact pruning: skip a layout (or one of its candidates, when ``step`` is given) that cannot
        beat the best plan of any value it stands for."""
        bound = (lay.lb if step is None else step) / TIE
        best_by = self.best_by
        for k in lay.required:
            cur = best_by.get(k)
            if cur is None or cur.step_seconds > bound:
                return False
        lk = (lay.t, lay.p, lay.c, lay.e)
        cur = self.layout_best.get(lk)
        if cur is None:  # a new (tp, pp, cp, ep) layout: needed only if it could enter the alternatives
            faster = sum(1 for c in self.layout_best.values() if c.step_seconds <= bound)
            return faster > self.top_k
        return cur.step_seconds <= bound

    def can_skip_best(self, lay: _Layout, step: float | None = None) -> bool:
        """A sub-search's :meth:`can_skip` (``best_only``): skip what is slower than ``step_cap`` or cannot beat the
        fastest candidate found (it ranks after it: a later 0.1 % step bin)."""
        t = lay.lb if step is None else step
        return t > self.step_cap or self.top * TIE <= t

    def corner_fits(self, lay: _Layout) -> bool:
        """Does this layout's least-memory candidate (smallest micro-batch, strongest AC) fit?

        Memory never rises with a larger shard group (dp_shard) at fixed (tp, pp, cp, schedule, ZeRO stage, ep),
        so a corner that fails at ds kills every layout with ds' <= ds without evaluating it, and one that fits
        proves the same for every ds' >= ds. (Not across EP degrees: on torchtitan the routed experts are / tp
        without EP and / ep with it, so an ep below tp holds more of them than ep 1.)
        """
        if lay.ds * lay.c > 1:
            first = self.fit_from_ds(lay, lay.mbs[0], self.corner_ac)
            if first is not None:
                if lay.ds >= first:
                    return True
                self.counts["memory"] = self.counts.get("memory", 0) + 1
                return False
        gk = (lay.t, lay.p, lay.c, lay.sched, lay.v, lay.z, lay.e)
        fails, fits = self.corners.setdefault(gk, ([], []))
        if any(ds >= lay.ds and e >= lay.e for ds, e in fails):
            self.counts["memory"] = self.counts.get("memory", 0) + 1
            return False
        if any(ds <= lay.ds and e <= lay.e for ds, e in fits):
            return True
        plan = lay.plan(lay.mbs[0], self.corner_ac, self.corner_k, self.chunk(lay, lay.mbs[0]))
        try:
            mem = self.memory(plan)
        except ValueError as e:  # a layout the memory model refuses (e.g. more pipeline chunks than blocks)
            fails.append((lay.ds, lay.e))
            self.reject(plan, "pins", f"invalid layout: {e}")
            return False
        if self.fits_fn(mem):
            fits.append((lay.ds, lay.e))
            return True
        fails.append((lay.ds, lay.e))
        self.note_nofit(plan, mem.per_gpu_bytes)
        self.reject(plan, "memory", f"memory {gib(mem.per_gpu_bytes)} > {self.usable_txt()} even with micro_batch "
                    f"{lay.mbs[0]} and {plan.ac_label} recomputation", mem.per_gpu_bytes)
        return False

    def fit_from_ds(self, lay: _Layout, mb: int, ac: str) -> float | None:
        """The smallest dp_shard of ``lay``'s group (same tp, pp, cp, schedule, v, ZeRO stage, ep) whose
        candidate with this micro-batch and AC mode fits (inf: none does), by binary search over the
        group's shard sizes with dp_shard x cp > 1; None when the memory model refuses the layout.

        Exact: at fixed (tp, pp, cp, ep, schedule, ZeRO, micro-batch, AC, dp = dp_shard x dp_replicate)
        and dp_shard x cp > 1, every term of memory.py is non-increasing in dp_shard (sharded states
        divide by it; activations, buckets and the communicators joined do not grow with it; the
        dp_replicate communicator disappears at dp_replicate = 1), so the misfits are a prefix of the
        ascending shard sizes. The probes are real candidates: the failing ones count as misfits.
        """
        key = (lay.t, lay.p, lay.c, lay.sched, lay.v, lay.z, lay.e, mb, ac)
        if key in self.fit_from:
            return self.fit_from[key]
        dss = self.ds_lists[key[:7]]
        dp = lay.ds * lay.dr
        corner = mb == lay.mbs[0] and ac == self.corner_ac
        lo, hi = 0, len(dss)
        first: float | None
        probes = 0
        try:
            while lo < hi:
                # the largest shard group first, then the smallest: a group where nothing fits (e.g. no
                # recomputation for a large model) or everything fits is settled by one or two evaluations
                mid = hi - 1 if probes == 0 else lo if probes == 1 else (lo + hi) // 2
                probes += 1
                ds = dss[mid]
                plan = _plan(dp_replicate=dp // ds, dp_shard=ds, tp=lay.t, pp=lay.p, pp_schedule=lay.sched,
                             pp_virtual_stages=lay.v, cp=lay.c, ep=lay.e, micro_batch=mb,
                             grad_accum=lay.per_dp // mb, activation_checkpointing=ac,
                             ac_layers=self.corner_k if ac == "partial" else 0, zero_stage=lay.z,
                             loss_chunk_tokens=self.chunk(lay, mb))
                mem = self.memory(plan)
                if self.fits_fn(mem):
                    hi = mid
                    continue
                lo = mid + 1
                self.note_nofit(plan, mem.per_gpu_bytes)
                if corner:
                    self.reject(plan, "memory", f"memory {gib(mem.per_gpu_bytes)} > {self.usable_txt()} even with "
                                f"micro_batch {mb} and {plan.ac_label} recomputation", mem.per_gpu_bytes)
            first = dss[lo] if lo < len(dss) else math.inf
        except ValueError:  # the memory model refuses the layout: the per-layout path reports it
            first = None
        self.fit_from[key] = first
        return first

    def usable_txt(self) -> str:
        if self._usable is None:
            self._usable = f"{gib(usable_bytes(self.capacity, self.sm.backend))} usable"
        return self._usable

    def usable(self) -> float:
        return usable_bytes(self.capacity, self.sm.backend)

    # ------------------------------------------------------------------ one layout
    def evaluate(self, lay: _Layout) -> None:
        """Try micro-batches x AC; memory is monotone in both, so scans stop at the first misfit. Then, per
        micro-batch, partial recomputation (:meth:`try_partial`)."""
        best_nofit: tuple[int, ParallelPlan] | None = None
        fit_mem: dict[int, int] = {}  # micro-batch -> memory with the weakest AC mode that fits
        fit_step: dict[int, float] = {}  # micro-batch -> that candidate's step time
        fit_ac: dict[int, str] = {}  # micro-batch -> that AC mode
        fit_chunk: dict[int, int] = {}  # micro-batch -> that candidate's loss slice (0: the whole loss)
        nofit_from = math.inf  # the smallest micro-batch where the strongest scanned AC mode does not fit
        any_fit = skipped = False
        strongest = self.acs[-1] if self.acs else None
        for ac in self.acs:
            for i, mb in enumerate(lay.mbs):
                if mb in fit_mem and not fit_chunk[mb]:
                    # a weaker AC already fits with this micro-batch (and the whole loss): this one fits too and is slower;
                    # time it for the per-dimension comparison, memory bounded by the weaker mode's
                    plan = lay.plan(mb, ac)
                    step, mfu = lay.timer.time(mb, lay.per_dp // mb, ac)
                    cand = Candidate(plan, step, mfu, fit_mem[mb], True, _BOUNDED)
                    if step >= fit_step[mb]:
                        # ranks after the weaker mode's candidate (step bin >=, same memory, more complex or
                        # later in plan order), which holds every other key it shares: only its AC mode's
                        self.fitting.append(cand)
                        k = ("activation_checkpointing", ac)
                        rk, cur = _rank_key(cand), self.best_rank.get(k)
                        if cur is None or rk < cur:
                            self.best_by[k] = cand
                            self.best_rank[k] = rk
                    else:
                        self.add_fit(cand, lay)
                    continue
                step, mfu = lay.none_times[i] if ac == "none" else lay.timer.time(mb, lay.per_dp // mb, ac)
                if self.can_skip(lay, step):
                    skipped = True
                    self.skipped_cands.extend((lay.ds, mb, ac, step))
                    continue  # fits or not, it cannot improve any required comparison
                if lay.ds * lay.c > 1:
                    first = self.fit_from_ds(lay, mb, ac)
                    if first is not None and lay.ds < first:
                        if ac == strongest:
                            nofit_from = min(nofit_from, mb)
                        break  # a larger shard group of its group does not fit: neither does this one
                plan, mem, ok = self.fitting_plan(lay, mb, ac)
                if not ok:
                    self.note_nofit(plan, mem.per_gpu_bytes)
                    if best_nofit is None or mem.per_gpu_bytes < best_nofit[0]:
                        best_nofit = (mem.per_gpu_bytes, plan)
                    if ac == strongest:
                        nofit_from = min(nofit_from, mb)
                    break
                if plan.loss_chunk_tokens:  # fits with the loss in slices only: slower by the head's recomputation
                    step, mfu = lay.timer.time(mb, lay.per_dp // mb, ac, False, 0, True)
                    if self.can_skip(lay, step):
                        skipped = True
                        self.skipped_cands.extend((lay.ds, mb, ac, step))
                        continue
                self.add_fit(Candidate(plan, step, mfu, mem.per_gpu_bytes, True, ""), lay)
                any_fit = True
                fit_mem[mb] = mem.per_gpu_bytes
                fit_step[mb] = step
                fit_ac[mb] = ac
                fit_chunk[mb] = plan.loss_chunk_tokens
        if self.partial:
            for mb in lay.mbs:
                # full recomputation keeps the least: where it does not fit, no partial one does
                if mb >= nofit_from:
                    continue
                if fit_ac.get(mb) == "none" and not fit_chunk[mb]:
                    self.skipped_cands.extend((lay.ds, mb, "partial", fit_step[mb]))  # (fits, and is slower)
                    continue  # ... and where nothing is recomputed (with the whole loss), none is needed
                outcomes = [self.try_partial(lay, mb, fit_step.get(mb))]
                chunk = self.chunk(lay, mb)
                if chunk and outcomes[0] is not False and self.partial_found != 1:
                    # with the loss in slices: fewer blocks recomputed than the whole loss needs (with as many or more,
                    # the whole loss fits and is faster; where the whole loss's counts are pruned, slower ones are too)
                    outcomes.append(self.try_partial(lay, mb, fit_step.get(mb), chunk, self.partial_found))
                misfit = False
                for res in outcomes:
                    if res is True:
                        any_fit = True
                    elif res is False:
                        skipped = True
                    elif res is not None:
                        misfit = True
                        if best_nofit is None or res[0] < best_nofit[0]:
                            best_nofit = res
                if misfit and self.partial_pin and True not in outcomes:
                    break  # more sequences per micro-batch only need more memory
        if not any_fit and skipped:
            self.pruned += 1  # its corner fits, but nothing it could offer beats what is known
        elif not any_fit and best_nofit is not None:
            mem_b, plan = best_nofit
            self.reject(plan, "memory", f"memory {gib(mem_b)} > {self.usable_txt()}", mem_b)

    def try_partial(self, lay: _Layout, mb: int, weaker_step: float | None, chunk: int = 0,
                    below: int | None = None):
        """Partial recomputation at micro-batch ``mb``: the fewest blocks per model chunk recomputed whole that
        fit (or the pinned ``ac_layers``). Memory falls and step time rises with every block recomputed, so
        the fewest that fit is the fastest; it is only worth a memory evaluation when faster than
        ``weaker_step`` (the step of the weakest scanned AC mode that fits). True: a candidate was added;
        False: pruned (it cannot beat what is known); (bytes, plan): the least-memory misfit; None: nothing
        to try. ``chunk``: the loss in slices of that many tokens (0: whole); ``below``: only counts below it. The count
        of an added candidate is left in ``partial_found`` (None when none was added)."""
        self.partial_found = None
        m = lay.per_dp // mb
        time = lay.timer.time
        if chunk:
            def time(mb, m, ac, breakdown, k):  # noqa: F811 (the head recomputed for each slice)
                return lay.timer.time(mb, m, ac, breakdown, k, True)
        top = max_chunk_layers(self.arch.n_layers, lay.p, lay.sched, lay.v) - 1  # more = every block ("full")
        if self.partial_k is not None:
            lo = hi = self.partial_k
        else:
            lo, hi = 1, top
            if hi < 1:
                return None
            if weaker_step is not None:  # only counts faster than the weaker mode that fits (or tied with it) can rank
                limit = weaker_step * TIE  # before it (_rank_key: 0.1 % bins, then less memory)
                if (t_1 := time(mb, m, "partial", False, 1)[0]) >= limit:
                    self.skipped_cands.extend((lay.ds, mb, "partial", t_1))
                    return None
                a, b = 1, hi
                while a < b:  # the largest count still below the limit (step time rises with the count)
                    c = (a + b + 1) // 2
                    if time(mb, m, "partial", False, c)[0] < limit:
                        a = c
                    else:
                        b = c - 1
                hi = a
        if below is not None:
            top, hi = min(top, below - 1), min(hi, below - 1)
            if hi < lo:
                return None
        if self.can_skip(lay, (t_lo := time(mb, m, "partial", False, lo)[0])):
            self.skipped_cands.extend((lay.ds, mb, "partial", t_lo))
            return False
        if lo < hi and self.can_skip(lay, time(mb, m, "partial", False, hi)[0]):
            a, b = lo, hi  # the largest count that could still improve a comparison (can_skip is monotone in time)
            while a < b:
                c = (a + b + 1) // 2
                if self.can_skip(lay, time(mb, m, "partial", False, c)[0]):
                    b = c - 1
                else:
                    a = c
            hi = a
        fails = self.partial_fails.setdefault((lay.t, lay.p, lay.c, lay.sched, lay.v, lay.z, lay.e, mb, chunk), []) \
            if lay.ds * lay.c > 1 else []  # the dp_shard monotonicity holds with a shard group (fit_from_ds)
        ds = lay.ds
        if any(d >= ds and k >= hi for d, k in fails):
            self.counts["memory"] = self.counts.get("memory", 0) + 1
            return None  # a larger shard group with at least as many blocks recomputed did not fit
        plan = lay.plan(mb, "partial", hi, chunk)
        try:
            mem = self.memory(plan)
        except ValueError as e:
            self.reject(plan, "pins", f"invalid layout: {e}")
            return None
        if not self.fits_fn(mem):
            self.note_nofit(plan, mem.per_gpu_bytes)
            fails.append((ds, hi))
            return (mem.per_gpu_bytes, plan)
        while lo < hi:  # the fewest that fit: binary search, memory never rises with the count
            c = (lo + hi) // 2
            if any(d >= ds and k >= c for d, k in fails):
                lo = c + 1
                continue
            cplan = lay.plan(mb, "partial", c, chunk)
            cmem = self.memory(cplan)
            if self.fits_fn(cmem):
                hi, plan, mem = c, cplan, cmem
            else:
                self.note_nofit(cplan, cmem.per_gpu_bytes)
                fails.append((ds, c))
                lo = c + 1
        self.partial_found = hi
        if self.partial_k is None:
            # counts in the same 0.1 % step bin as the fewest that fit rank before it by their lower memory: take the
            # largest (step time rises with the count, memory falls)
            b0 = _step_bin(time(mb, m, "partial", False, hi)[0])
            a, b = hi, top
            while a < b:
                c = (a + b + 1) // 2
                if _step_bin(time(mb, m, "partial", False, c)[0]) == b0:
                    a = c
                else:
                    b = c - 1
            if a > hi:
                hi = a
                plan = lay.plan(mb, "partial", hi, chunk)
                mem = self.memory(plan)
        step, mfu = time(mb, m, "partial", False, hi)
        self.add_fit(Candidate(plan, step, mfu, mem.per_gpu_bytes, True, ""), lay)
        return True


# dimensions whose best plan per value the search guarantees exactly (a layout is only skipped when it
# cannot beat the best plan of any of these values); dp_shard, AC and micro-batch comparisons in the
# reasons are the best among the layouts evaluated ("best found")
REQUIRED_DIMS = ("tp", "pp", "cp", "ep", "zero_stage", "pp_schedule")
TIE = 1.001  # step times within 0.1 % count as a tie (then less memory, then the simpler plan wins)
# the generic profile's fit margin for allocator fragmentation (backends.GENERIC_HEADROOM), which the post-training
# stages' estimate and its recomputation options also keep (stages.py); a backend profile's plan may fill 95% of the
# GPU (backends.PROFILE_HEADROOM: the memory model's measured error; usable_bytes)
USABLE_FRACTION = backends.GENERIC_HEADROOM


def usable_bytes(capacity: float, backend: str | None) -> float:
    """The bytes per GPU a plan on ``backend`` may use: the fit check's headroom (``backends.fit_headroom``, what
    ``memory.fits`` compares against) x ``capacity``; the figure every "usable" in the plan's messages quotes."""
    return capacity * backends.fit_headroom(backend)


def search(arch, sm: StepModel, *, world: int, gpu, seq_len: int, global_batch_seqs: int, precision: str,
           pins, memory_fn, fits_fn=None, top_k: int = 5, band: float = 0.0, peak_fn=None,
           loss_slice: int = 0, mem_band: float = MEMORY_ERROR_BAND, fit_check: bool = True) -> SearchResult:
    """Find the fastest plan that fits.

    Args:
        arch: the model ``Architecture``.
        sm: :func:`timing.step_model` constants for this model/cluster.
        world: number of GPUs.
        gpu: ``hardware.GPU`` (with the spec's gpus_per_node override applied).
        pins: the spec's ``Parallelism`` (None fields are searched).
        memory_fn: ``plan -> MemoryNumbers`` (``memory.memory_per_gpu`` with the run's settings bound).
        peak_fn: the same without ``per_stage_bytes`` (``memory_per_gpu(..., per_stage=False)``), for
            the fit checks of the candidates; default ``memory_fn``. The best plan's memory is
            ``memory_fn``'s.
        fits_fn: ``MemoryNumbers -> bool`` (default: ``memory.fits``).
        band: the model's relative error band; among fitting plans predicted within it of the fastest, the
            safer where the fastest's memory is within ``mem_band`` of the usable limit, then the simplest
            (:func:`_simplicity`: the least recomputation, then the fewest pipeline stages, then no CP, then the
            smallest TP and EP) that is no riskier (:func:`_choose`), and ``reasons`` says which rule decided (0 =
            always the fastest).
        mem_band: the memory model's relative error (default :data:`MEMORY_ERROR_BAND`): a plan taken within the band
            leaves it below the usable limit, or holds no more than the fastest.
        fit_check: False when ``fits_fn`` passes every candidate (the reasons then do not call them fitting).
        loss_slice: tokens per slice of the loss the backend's runner can compute (``memory.loss_slice_tokens``; 0:
            it cannot): a candidate whose whole logits do not fit is tried with the loss in slices
            (``_Search.fitting_plan``).

    Layouts are visited in order of a lower bound on their step time (no recomputation, memory
    ignored) and skipped when that bound cannot beat the best plan found for any of the values
    the layout stands for, so the result (best plan, alternatives, per-dimension comparisons) is
    the same as an exhaustive search with far fewer memory evaluations.
    """
    if fits_fn is None:
        from llmc.compiler.memory import fits as fits_fn
    S = _Search(arch, sm, world, gpu, seq_len, global_batch_seqs, pins, memory_fn, fits_fn, top_k, peak_fn, loss_slice)
    S.band, S.mem_band, S.fit_check = band, mem_band, fit_check
    _run(S)
    return _result(S)


def _run(S: _Search) -> None:
    """The best-first visit of every layout (see :func:`search`); the candidates land in ``S``."""
    ac0 = _AC_RANK[S.acs[0] if S.acs else "partial"]  # lay.order(...), inlined
    # best first: layouts in order of (lower bound, plan order); a family of layouts (all dp_shard x dp_replicate
    # splits of one tp, pp, cp, ep, ZeRO, schedule) enters with a bound below all of its members' (its time
    # without data-parallel traffic and optimizer update) and is expanded, or skipped whole, when it comes up
    # (on a tie before the layouts: a member never comes after a layout it precedes in the full order)
    heap: list[tuple] = []
    for n, fam in enumerate(_enumerate(S)):
        fam.lb = fam.bound(S.sm)
        heap.append((fam.lb, 0, n, fam))
    heapq.heapify(heap)
    n = len(heap)
    # what the bound skips whole, for pruned_bounds: the first bound (the least: the heap gives nondecreasing bounds,
    # a family's layouts entering at bounds no less than its own) of each dp_shard and micro-batch, and the first of
    # all (every AC mode)
    skipped_ds, skipped_mb = S.skipped_ds, S.skipped_mb
    track = not S.best_only  # (a sub-search's reasons are not written)
    while heap:
        item = heapq.heappop(heap)
        if item[1] == 0:
            fam = item[-1]
            if S.can_skip(fam):  # exact: every member's bound is >= the family's, and can_skip is monotone
                S.pruned += len(fam.members)
                if not track:
                    continue
                if S.skipped_any is None:
                    S.skipped_any = fam.lb
                for ds, _ in fam.members:
                    if ds not in skipped_ds:
                        skipped_ds[ds] = fam.lb
                for mb in fam.mbs:
                    if mb not in skipped_mb:
                        skipped_mb[mb] = fam.lb
                continue
            for lay in fam.expand():
                n += 1
                heapq.heappush(heap, (lay.lb, 1, (lay.t, lay.p, lay.c, lay.e, lay.ds, lay.dr, lay.sched, lay.v,
                                                  lay.mbs[0], ac0, 0, lay.z), n, lay))
            continue
        lay = item[-1]
        if S.can_skip(lay):
            S.pruned += 1
            if not track:
                continue
            if S.skipped_any is None:
                S.skipped_any = lay.lb
            if lay.ds not in skipped_ds:
                skipped_ds[lay.ds] = lay.lb
            for mb in lay.mbs:
                if mb not in skipped_mb:
                    skipped_mb[mb] = lay.lb
            continue
        if S.corner_fits(lay):
            S.evaluate(lay)
    if S.pruned:
        S.counts["pruned"] = S.pruned


def tp_problem(arch, world: int, t: int, gpu) -> tuple[str, str] | None:
    """(rejection kind, reason) when tensor-parallel degree ``t`` cannot run ``arch`` on ``world`` GPUs of ``gpu``,
    None when it can: TP divides the world, stays on one NVLink fabric (the node, or an NVL72 rack:
    ``hardware.nvlink_group``) and divides it, and divides the heads (MLA: n_heads). The search's rule, which the
    checks' batch hints use too."""
    gpn, dom = gpu.gpus_per_node, nvlink_group(gpu)
    where = f"{dom} GPUs per NVLink domain" if dom != gpn else f"{gpn} GPUs per node"
    kv = arch.n_heads if arch.mla is not None else arch.kv_heads
    if world % t:
        return "pins", f"tp {t} does not divide {world} GPUs"
    if t > dom:
        return "tp", f"tp {t} > {where} (TP must stay on NVLink)"
    if dom % t:
        return "tp", f"tp {t} does not divide {where} (a TP group would leave NVLink)"
    if arch.n_heads % t or kv % t:
        return "heads", f"{f'n_heads {arch.n_heads}' if arch.n_heads % t else f'n_kv_heads {kv}'} not divisible by tp {t}"
    return None


def cp_degrees(seq_len: int, t: int) -> list[int]:
    """The context-parallel degrees the search tries at tensor-parallel degree ``t``: 1, and from
    :data:`CP_MIN_SEQ` tokens on the powers of two up to 32 that split the sequence into 2 x tp x cp chunks (ring
    attention's load-balanced halves)."""
    if seq_len < CP_MIN_SEQ:
        return [1]
    return [c for c in (1, 2, 4, 8, 16, 32) if c == 1 or seq_len % (2 * t * c) == 0]


def _enumerate(S: _Search) -> list[_Family]:
    """Every structurally valid layout; structural rejections are recorded on the way."""
    arch, world, pins, G = S.arch, S.world, S.pins, S.G
    L = arch.n_layers
    moe = arch.moe
    out: list[_Layout] = []
    titan, gpu = S.sm.backend == "torchtitan", S.gpu.key != "cpu"  # (the torchtitan job's own limits)
    nvfp4_parts = (backends.converted_parts(backends.get_backend(S.sm.backend), arch, "nvfp4")
                   if S.sm.precision == "nvfp4" else frozenset())

    dom = nvlink_group(S.gpu)  # (the node, or an NVL72 rack's 72 GPUs)
    tp_values = [pins.tp] if pins.tp is not None else [t for t in divisors(world) if t <= dom]
    for t in tp_values:
        probe = ParallelPlan(tp=t)
        if (problem := tp_problem(arch, world, t, S.gpu)) is not None:
            S.reject(probe, problem[0], problem[1], dims=("tp",))
            continue
        if nvfp4_parts and pins.tp is None and (bad := backends.nvfp4_misaligned(S.arch, nvfp4_parts, t)):
            # torchao's NVFP4 GEMMs need 128-aligned local dims (a pinned tp is reported as T017 instead)
            name, k, n, style, dim = bad
            S.reject(probe, "tp", f"nvfp4: {name} ({k} -> {n}, {style}) has a local dim of {dim:g} at tp {t}, not "
                     f"a multiple of {backends.NVFP4_GEMM_ALIGN}", dims=("tp",))
            continue
        rest = world // t
        for p in ([pins.pp] if pins.pp is not None else [p for p in divisors(rest) if p <= L]):
            probe = ParallelPlan(tp=t, pp=p)
            if rest % p:
                S.reject(probe, "pins", f"pp {p} does not divide {rest} (= {world} GPUs / tp {t})", dims=("pp",))
                continue
            if p > L:
                S.reject(probe, "pp", f"pp {p} > {L} layers", dims=("pp",))
                continue
            if titan and arch.tied_embeddings and p > 1:  # (X303: backends.torchtitan_layout_problem)
                S.reject(probe, "pp", f"{backends.torchtitan_layout_problem(arch, S.seq_len, t, 1, p, gpu).message} "
                         "(X303)", dims=("pp",))
                continue
            cps = [pins.cp] if pins.cp is not None else cp_degrees(S.seq_len, t)
            for c in cps:
                probe = ParallelPlan(tp=t, pp=p, cp=c)
                if rest % (p * c):
                    S.reject(probe, "pins", f"cp {c} x pp {p} x tp {t} does not divide {world} GPUs", dims=("cp",))
                    continue
                if c > 1 and S.seq_len % (2 * t * c):
                    S.reject(probe, "cp", f"seq_len {S.seq_len} not divisible by 2 x tp x cp = {2 * t * c}",
                             dims=("cp",))
                    continue
                # torchtitan's job splits the sequence over tp x cp and cuts its loss into chunks: a length it
                # cannot split is no torchtitan plan (backends.torchtitan_layout_problem)
                problem = backends.torchtitan_layout_problem(arch, S.seq_len, t, c, 1, gpu) if titan else None
                if problem is not None:
                    S.reject(probe, "seq", f"{problem.message} ({problem.code})", dims=("tp", "cp"))
                    continue
                dp = rest // (p * c)
                S.layouts_total += 1
                if G % dp:
                    S.layouts_batch_bad += 1
                    S.reject(_plan(tp=t, pp=p, cp=c, dp_shard=dp), "batch",
                             f"global batch {G} seqs not divisible by dp {dp}", dims=("tp", "pp", "cp"),
                             dim_reason=S.batch_reason())
                    continue
                out.extend(_enumerate_dp(S, t, p, c, dp, G // dp, moe, L))
    return out


def _enumerate_dp(S: _Search, t, p, c, dp, per_dp, moe, L) -> list[_Family]:
    pins = S.pins
    if pins.dp_shard is not None and pins.dp_replicate is not None:
        pairs = [(pins.dp_shard, pins.dp_replicate)]
    elif pins.dp_shard is not None:
        pairs = [(pins.dp_shard, dp // pins.dp_shard if dp % pins.dp_shard == 0 else 0)]
    elif pins.dp_replicate is not None:
        pairs = [(dp // pins.dp_replicate if dp % pins.dp_replicate == 0 else 0, pins.dp_replicate)]
    else:
        pairs = [(ds, dp // ds) for ds in divisors(dp)]
    mbs_all = [1 << k for k in range(0, 31) if (1 << k) <= per_dp and per_dp % (1 << k) == 0
               and ((1 << k) == 1 or (1 << k) * S.seq_len / c <= MAX_MICRO_TOKENS)]
    if pins.micro_batch is not None:
        mbs_all = [pins.micro_batch]
    # the schedules and their micro-batches depend on pp and the batch only, not on the dp split
    scheds = _schedules(p, L, pins)
    sched_mbs = []
    for sched, v in scheds:
        mbs = []
        for mb in mbs_all:
            m = micro_steps(per_dp, mb, p, sched)
            if m is None:
                continue  # (not whole micro-batches; under pp fewer than pp, or interleaved not a multiple of pp)
            if S.max_bubble is not None and _bubble(p, sched, v, m) > S.max_bubble:
                continue  # (a bubble larger than the simpler-layout rule allows: _Search.sub_search)
            mbs.append(mb)
        why = None
        if not mbs:  # every (dp_shard, ep, ZeRO) of this schedule is rejected with the same reason
            why = (f"{per_dp} seqs per dp rank give too few micro-batches for pp {p}"
                   + (" (interleaving needs grad_accum % pp == 0)" if sched == "Interleaved1F1B" else "")
                   if p > 1 else f"{per_dp} seqs per dp rank not divisible by micro_batch {mbs_all[0]}")
        sched_mbs.append((sched, v, tuple(mbs), why))
    req = (("tp", t), ("pp", p), ("cp", c))
    batch_dims = ("tp", "pp", "cp")
    batch_reason = S.batch_reason()
    rejected, counts = S.rejected, S.counts
    # of the batch rejections of this (tp, pp, cp), which share a few reasons, only the first (in _plan_tuple
    # order) of each reason is kept as a candidate; all are counted. The reasons per dimension, the reasons and
    # the first candidate of each reason in the ordered rejection list stay the same.
    grouped: dict[str, tuple] = {}
    n_batch = 0
    families: dict[tuple, _Family] = {}
    for ds, dr in pairs:
        if ds * dr != dp:
            S.reject(ParallelPlan(tp=t, pp=p, cp=c, dp_shard=max(ds, 1), dp_replicate=max(dr, 1)), "pins",
                     f"dp_shard x dp_replicate must be {dp} (= world / (tp {t} x pp {p} x cp {c}))")
            continue
        zeros = zero_stages(pins.zero_stage, ds * c, bool(pins.offload_optimizer), S.sm.backend)
        if moe is None:
            eps = [1] if pins.ep in (None, 1) else [pins.ep]
        elif pins.ep is not None:
            eps = [pins.ep]
        else:
            eps = [e for e in divisors(moe.num_experts) if ep_domain(ds, c, t, S.sm.backend) % e == 0]
        for e in eps:
            if e > 1 and moe is None:
                S.reject(ParallelPlan(dp_replicate=dr, dp_shard=ds, tp=t, pp=p, cp=c, ep=e), "ep",
                         "ep > 1 needs a mixture-of-experts model", dims=("ep",))
                continue
            if moe is not None and (moe.num_experts % e or ep_domain(ds, c, t, S.sm.backend) % e):
                span = ("dp_shard x cp x tp" if S.sm.backend in EP_SPANS_TP else "dp_shard x cp")
                S.reject(ParallelPlan(dp_replicate=dr, dp_shard=ds, tp=t, pp=p, cp=c, ep=e), "ep",
                         f"ep {e} must divide num_experts {moe.num_experts} and {span} "
                         f"{ep_domain(ds, c, t, S.sm.backend)}", dims=("ep",))
                continue
            # fp8 experts split over TP without EP: their grouped GEMM's per-rank width (backends.torchtitan_layout_problem)
            problem = (backends.torchtitan_layout_problem(S.arch, S.seq_len, t, c, p, S.gpu.key != "cpu", ep=e,
                                                          expert_align=S.sm.fp8_expert_align)
                       if S.sm.backend == "torchtitan" and S.sm.fp8_expert_align else None)
            if problem is not None:
                S.reject(ParallelPlan(dp_replicate=dr, dp_shard=ds, tp=t, pp=p, cp=c, ep=e), "ep",
                         f"{problem.message} ({problem.code})", dims=("ep",))
                continue
            for z in zeros:
                if z == 0 and ds * c > 1:
                    S.reject(ParallelPlan(dp_replicate=dr, dp_shard=ds, tp=t, pp=p, cp=c, ep=e), "pins",
                             "zero_stage 0 (DDP) needs dp_shard x cp = 1")
                    continue
                if not scheds:
                    what = " and ".join(f"{k} {getattr(pins, k)}" for k in ("pp_schedule", "pp_virtual_stages")
                                        if getattr(pins, k) is not None)
                    why = (f"{what} needs pp > 1" if p == 1 else
                           f"{what} at pp {p}: more pipeline chunks than {L} layers + 2 (an embedding and a head "
                           "chunk), or a chunk count the schedule does not run")
                    S.reject(ParallelPlan(dp_replicate=dr, dp_shard=ds, tp=t, pp=p, cp=c, ep=e), "pins", why,
                             dims=("pp",))
                    continue
                for sched, v, mbs, why in sched_mbs:
                    if not mbs:
                        n_batch += 1
                        k = (e, ds, dr, sched, v, z)  # the order of _plan_tuple inside this (tp, pp, cp)
                        cur = grouped.get(why)
                        if cur is None or k < cur:
                            grouped[why] = k
                        continue
                    fam = families.get((e, z, sched, v))
                    if fam is None:
                        fam = families[(e, z, sched, v)] = _Family(
                            t, p, c, e, z, sched, v, mbs, per_dp, dp,
                            req + (("ep", e), ("zero_stage", z), ("pp_schedule", sched)))
                    fam.members.append((ds, dr))
                    if ds * c > 1:  # ascending: pairs follow divisors(dp)
                        S.ds_lists.setdefault((t, p, c, sched, v, z, e), []).append(ds)
    if grouped:
        for i, (why, (e, ds, dr, sched, v, z)) in enumerate(grouped.items()):
            plan = _plan(dp_replicate=dr, dp_shard=ds, tp=t, pp=p, cp=c, ep=e, zero_stage=z, pp_schedule=sched,
                         pp_virtual_stages=v, micro_batch=mbs_all[0], grad_accum=max(1, per_dp // mbs_all[0]))
            if i == 0:
                S.reject(plan, "batch", why, dims=batch_dims, dim_reason=batch_reason)
            else:
                rejected.append(Candidate(plan, 0.0, 0.0, 0, False, why))
        counts["batch"] += n_batch - 1
    return list(families.values())


_SIMPLER_RULE = "less recomputation, then fewer pipeline stages, then no context parallelism, then smaller TP and EP"


def _choose(S: _Search, fitting: list[Candidate]) -> tuple[Candidate, str | None]:
    """(the chosen candidate, the reason line of the simpler-layout rule or None) from the ranked fitting candidates.

    Never a riskier plan than the fastest for simplicity, and a safer one where the fastest's memory is at risk:

    1. Where the memory model's error (``S.mem_band``) reaches the fastest's memory from the usable limit, the fastest
       candidate predicted within the error band ``S.band`` that it does not reach (and whose P006 bubble is no larger)
       takes the fastest's place as the reference, simpler or not (:meth:`_Search.sub_search`, exact); where there is
       none the fastest stays, and the line says its memory is within the error.
    2. Of the candidates within the band and no more complex than the reference (:func:`_simplicity`), the simplest
       (then the first in rank) that :meth:`_Search.declined` does not decline against it: memory the error below the
       usable limit or no more than the reference's, a bubble no larger than the reference's. Class by class
       (recomputation mode and degrees, simplest first), :meth:`_Search.focus` finds the class's fastest one that
       passes (the search skipped what could not beat what it knew) and refines the one taken.

    The line says which rule decided: the one taken and what it passed, or the simplest one declined and why (and a
    layout of smaller degrees in the band that recomputes more, so is not simpler)."""
    fastest = fitting[0]
    if S.band <= 0:
        return fastest, None
    limit = fastest.step_seconds * (1.0 + S.band)
    band = f"inside the model's +-{100 * S.band:.0f}% error band"
    err = f"the memory model's {100 * S.mem_band:.0f}% error"

    def slower(c: Candidate) -> str:
        return f"{100 * (c.step_seconds / fastest.step_seconds - 1):.1f}% slower"

    top = S.reference(fastest, "the fastest's")
    risky = S.fit_check and not S.mem_safe(top.mem)
    safe = None  # (1.)
    if risky:
        safe = S.sub_search(S.pins, None, top.bubble, limit)
        if safe is not None and safe.step_seconds > limit:
            safe = None
    ref = top if safe is None else S.reference(safe, f"{describe(safe.plan)}'s")
    s0 = _simplicity(ref.cand.plan)
    cands = fitting if safe is None else [safe, *(c for c in fitting if c.plan != safe.plan)]
    pool = sorted((c for c in cands if c.step_seconds <= limit and _simplicity(c.plan) <= s0),
                  key=lambda c: (_simplicity(c.plan), _rank_key(c)))

    first_declined = chosen = outside = None  # outside: the first declined one's class's best that passes, too slow
    for _, members in itertools.groupby(pool, key=lambda c: _simplicity(c.plan)):
        members = list(members)
        for c in members:
            why = S.declined(c, ref)
            if not why:
                chosen = c
                break
            if first_declined is None:
                first_declined = (c, why)
        if chosen is ref.cand:
            break
        # the fastest candidate of this class that passes, exactly: this search skips candidates that cannot beat
        # what it knows, and a slower one of the class (a smaller micro-batch, a finer shard) may pass where the ones
        # it evaluated do not
        exact = S.focus(members[0], ref)
        if exact is not None and exact.step_seconds <= limit and (chosen is None or _rank_key(exact) < _rank_key(chosen)):
            chosen = exact
        elif exact is not None and exact.step_seconds > limit and outside is None and first_declined is not None \
                and _simplicity(first_declined[0].plan) == _simplicity(exact.plan):
            outside = exact
        if chosen is not None:
            break
    chosen = chosen or ref.cand  # (the reference passes against itself: its class always yields one)
    # the first layout of smaller degrees in the band that the order above does not count as simpler, for recomputing
    # more than the plan (the reviewer's question: why not the one with fewer pipeline stages?)
    rank = _AC_RANK[chosen.plan.activation_checkpointing]
    heavier = min((c for c in fitting if c.step_seconds <= limit and _degrees(c.plan) < _degrees(chosen.plan)
                   and _AC_RANK[c.plan.activation_checkpointing] > rank),
                  key=lambda c: (_degrees(c.plan), _rank_key(c)), default=None)
    heavy_note = None
    if heavier is not None:
        heavy_note = (("the fastest" if heavier is fastest else f"{describe(heavier.plan)} ({slower(heavier)}, {band})")
                      + ", of smaller degrees, is not simpler: it "
                      f"recomputes more ({heavier.plan.ac_label} against {chosen.plan.ac_label})"
                      + "".join(f"; {w}" for w in S.declined(heavier, ref)))
    at_risk = f"{gib(top.mem)}, within {err} of the {S.usable_txt()}"
    if chosen is fastest:
        notes = []
        if risky:
            notes.append(f"kept the fastest though it needs {at_risk}: no candidate {band} has memory that error below the limit"
                         + (" with a pipeline bubble no larger" if top.bubble else ""))
        if first_declined is not None and _simplicity(first_declined[0].plan) < s0:
            d, dwhy = first_declined
            notes.append(f"kept the fastest over the simpler {describe(d.plan)} ({_SIMPLER_RULE}): {slower(d)} "
                         f"predicted, {band}, but " + "; ".join(dwhy)
                         + (f" (the fastest layout of its degrees and recomputation that passes, "
                            f"{describe(outside.plan)}, is {slower(outside)}: outside the band)" if outside else ""))
        if heavy_note:
            notes.append(("" if notes else "kept the fastest: ") + heavy_note)
        return fastest, "; ".join(notes) or None
    checks = []
    against = top if chosen is safe else ref  # (what it was checked against)
    if S.fit_check:
        mem = S.exact_bytes(chosen)
        checks.append(f"{gib(mem)}, at least {err} below the {S.usable_txt()}" if S.mem_safe(mem) else
                      f"{gib(mem)}, no more than {against.name} {gib(against.mem)}")
    if chosen.plan.pp > 1:
        bubble = bubble_fraction(chosen.plan)
        checks.append("no pipeline-bubble warning (P006)" if not bubble else
                      f"a pipeline bubble of ~{100 * bubble:.1f}% (P006), no larger than {against.name} "
                      f"~{100 * against.bubble:.1f}%")
    passed = ", with " + " and ".join(checks) if checks else ""
    simpler = _simplicity(chosen.plan) < _simplicity(fastest.plan)
    if chosen is safe:
        note = (f"chose {describe(chosen.plan)} over the fastest {describe(fastest.plan)}, which needs {at_risk}: the "
                f"fastest candidate {band} whose memory stays that error below the limit"
                + (f" (and simpler: {_SIMPLER_RULE})" if simpler else "") + f", {slower(chosen)} predicted{passed}")
    else:
        note = "" if safe is None else (
            f"the fastest, {describe(fastest.plan)}, needs {at_risk}; {describe(safe.plan)} ({slower(safe)}, "
            f"{gib(ref.mem)}) is the fastest candidate {band} whose memory stays that error below the limit; ")
        if safe is None and risky:
            note = (f"the fastest needs {at_risk}, and no candidate {band} has memory that error below the limit"
                    + (" with a pipeline bubble no larger" if top.bubble else "") + "; ")
        note += (f"chose the simpler {describe(chosen.plan)} over "
                 + (f"the fastest {describe(fastest.plan)}" if safe is None else "it")
                 + f": {slower(chosen)}{'' if safe is None else ' than the fastest'} predicted, {band} "
                 f"({_SIMPLER_RULE}){passed}")
    if first_declined is not None and first_declined[0] is not fastest:
        d, dwhy = first_declined
        note += (f"; {describe(d.plan)} ({slower(d)}), "
                 f"{'simpler still' if _simplicity(d.plan) < _simplicity(chosen.plan) else 'as simple'}, was "
                 "declined: " + "; ".join(dwhy))
    if heavy_note:
        note += "; " + heavy_note
    return chosen, note


def _result(S: _Search) -> SearchResult:
    fitting = sorted(S.fitting, key=_rank_key)
    best = fastest = fitting[0] if fitting else None
    simpler_note = None
    if best is not None:
        best, simpler_note = _choose(S, fitting)
    alternatives: list[Candidate] = []
    if best is not None:
        others = sorted((c for k, c in S.layout_best.items() if k != _layout(best.plan)), key=_rank_key)
        for c in others[: S.top_k]:
            pct = 100 * (c.step_seconds / best.step_seconds - 1)
            alternatives.append(Candidate(c.plan, c.step_seconds, c.mfu, c.per_gpu_bytes, True,
                                          f"{pct:+.1f}% step time"))
    closest = None
    for c in S.rejected:
        if c.per_gpu_bytes and (closest is None or c.per_gpu_bytes < closest.per_gpu_bytes):
            closest = c
    # most informative first: the closest memory miss of each (tp, pp, cp, ep) layout, then one candidate
    # per distinct structural reason, then everything else
    ordered = sorted(S.rejected, key=lambda c: (c.per_gpu_bytes == 0, c.per_gpu_bytes, _plan_tuple(c.plan)))
    head, rest, seen = [], [], set()
    for c in ordered:
        key = _layout(c.plan) if c.per_gpu_bytes else c.reason
        (rest if key in seen else head).append(c)
        seen.add(key)
    rejected = head + rest
    mem = None
    if best is not None:
        S.memory(best.plan)  # counted when not cached (a candidate whose memory a weaker AC mode bounded)
        mem = S.memory_fn(best.plan)  # with every stage's bytes
    n_fit = len(fitting)
    if S.sub_fitting:  # the simpler-layout rule's sub-searches' candidates, where new (they fit too)
        seen_plans = {c.plan for c in fitting}
        n_fit += len({c.plan for c in S.sub_fitting} - seen_plans)
    res = SearchResult(
        best=best, memory=mem, alternatives=alternatives, rejected=rejected,
        rejected_counts=dict(S.counts), closest=closest, reasons=[], evaluated=S.evaluated, fitting=n_fit,
        batch_blocked=S.layouts_total > 0 and S.layouts_batch_bad == S.layouts_total, backend=S.sm.backend,
        fastest=fastest,
    )
    # the values whose every evaluated candidate failed the fit check but that the step-time bound skipped others of
    # ("does not fit" only where none was skipped)
    unfit = {k for k in S.nofit_by if k[0] in _PRUNABLE_DIMS and k not in S.best_by} if best is not None else ()
    res.reasons = explain(res, S.sm, S.best_by, S.nofit_by, S.struct_by, S.capacity, fitting, S.pins,
                          exact=S.exact_bytes, fit_check=S.fit_check, cp_off=S.cp_off,
                          pruned_by=S.pruned_bounds(unfit) if unfit else {})
    if simpler_note:
        res.reasons.insert(1, simpler_note)
    return res


def _simplicity(p: ParallelPlan) -> tuple:
    """Lower = simpler: less recomputation (none, selective, partial, full: :data:`AC_RANKS`; a recomputation mode is
    never taken for simpler than a faster, lighter one), then fewer pipeline stages, then no CP, then smaller TP and
    EP. Layouts of the same mode and degrees are equally simple: between them the faster wins (the ZeRO stage,
    schedule, micro-batch or partial count are not simplifications worth a slower step)."""
    return (_AC_RANK[p.activation_checkpointing], p.pp, p.cp, p.tp, p.ep)


def _degrees(p: ParallelPlan) -> tuple:
    """The parallel degrees in :func:`_simplicity`'s order (fewer pipeline stages, then no CP, smaller TP and EP)."""
    return (p.pp, p.cp, p.tp, p.ep)


def _layout(p: ParallelPlan) -> tuple:
    return (p.tp, p.pp, p.cp, p.ep)


def _schedules(p: int, L: int, pins) -> list[tuple[str, int]]:
    """(schedule, chunks per rank) options for pp = p; empty when a pinned schedule or chunk count cannot apply.
    At most L + 2 chunks: the first may hold only the embedding, the last only the norm and head."""
    pinned = pins.pp_schedule
    pin_v = pins.pp_virtual_stages
    if p == 1:
        # a pinned multi-stage schedule or chunk count asks for a pipeline; plain 1F1B is also what pp = 1 reports
        return [("1F1B", 1)] if pinned in (None, "1F1B") and pin_v in (None, 1) else []
    inter = [v for v in ((pin_v,) if pin_v is not None else INTERLEAVE_V) if v > 1 and p * v <= L + 2]
    if pinned == "Interleaved1F1B":
        return [("Interleaved1F1B", v) for v in inter]
    if pinned == "ZBVZeroBubble":  # V-shape: two chunks per rank
        return [("ZBVZeroBubble", 2)] if 2 * p <= L + 2 and pin_v in (None, 2) else []
    if pinned is not None:
        return [(pinned, 1)] if pin_v in (None, 1) else []
    return ([("1F1B", 1)] if pin_v in (None, 1) else []) + [("Interleaved1F1B", v) for v in inter]


# ---------------------------------------------------------------------------------------- reasons


def _value_order(v) -> tuple:
    if isinstance(v, str):
        return (1, _AC_RANK.get(v, 9), v)
    return (0, v, "")

_DIM_LABEL = {
    "tp": "TP", "pp": "PP", "cp": "CP", "ep": "EP", "dp_shard": "FSDP shard", "zero_stage": "ZeRO stage",
    "activation_checkpointing": "activation checkpointing", "micro_batch": "micro-batch",
    "pp_schedule": "pipeline schedule",
}


_SIMPLER_DIMS = ("tp", "pp", "cp", "ep", "activation_checkpointing")
#: the dimensions whose values the step-time bound may skip candidates of without a fitting one of the value (the
#: others are REQUIRED_DIMS: a value without a fitting candidate had every candidate evaluated)
_PRUNABLE_DIMS = ("dp_shard", "activation_checkpointing", "micro_batch")
#: the dimension whose values trade memory for step time: the reasons give each other value's memory per GPU beside its
#: step time (ZeRO-1 for a step 0.5 % faster than ZeRO-3 may hold a third more), so the choice can be judged
_MEMORY_TRADE_DIMS = ("zero_stage",)


def _verdict(dim, chosen, values, best_by, nofit_by, best: Candidate, pick: str, exact,
             cp_off: bool = False, pruned_by=None) -> str:
    """Why this value and not another, in a few words, each read off the candidates' own numbers (``best``: the
    chosen candidate; ``best_by``: the best fitting candidate per (dimension, value); ``pick``: why the simpler-layout
    rule chose ``best`` over a faster one ("": it did not); ``exact``: a candidate's memory; ``cp_off``: CP is not
    searched, so a value other rejections rule out may run with it; ``pruned_by``: per (dimension, value) without a
    fitting candidate the least step-time bound of its skipped ones). Only for the dimensions with a "simpler" value
    (:data:`_SIMPLER_DIMS`): a faster value is named as faster (the choice then was the simpler-layout rule's), a tie
    as a tie (the printed percentage 0.0, as in the list: :func:`_tied`; with less memory only where the chosen holds
    less), "needed" only when every candidate of the simpler values failed the fit check, "the only workable choice"
    only when no other value fits."""
    if dim not in _SIMPLER_DIMS or not values:
        return ""
    step = best.step_seconds
    pruned_by = pruned_by or {}
    rank = _AC_RANK.__getitem__ if dim == "activation_checkpointing" else (lambda v: v)
    alts = [(v, best_by[(dim, v)]) for v in values if (dim, v) in best_by]
    faster = [(v, c) for v, c in alts if c.step_seconds < step and not _tied(c.step_seconds, step)]
    if faster:
        v, c = min(faster, key=lambda vc: (vc[1].step_seconds, rank(vc[0])))
        # (without the simpler-layout rule's pick, the faster one ranked after the chosen: the same 0.1 % step bin)
        why = pick or "ranked after it in the same 0.1% step bin, where less memory, then fewer dimensions, go first"
        return f" ({v} is {-_pct(c.step_seconds, step):.1f}% faster: {why})"
    simpler = [v for v in values if rank(v) < rank(chosen)]
    fit_simpler = [(v, c) for v, c in alts if rank(v) < rank(chosen)]
    if fit_simpler:
        v, c = min(fit_simpler, key=lambda vc: (vc[1].step_seconds, rank(vc[0])))
        if not _tied(c.step_seconds, step):
            return f" (faster than {v} by {_pct(c.step_seconds, step):.1f}%)"
        return f" (tie with {v}{', less memory' if exact(best) < exact(c) else ''})"
    if not simpler:
        return " (the simplest choice)"
    skipped = [v for v in simpler if (dim, v) in pruned_by]
    if skipped:  # not all of a simpler value's candidates were evaluated: no claim that it does not fit
        v = min(skipped, key=lambda v: (pruned_by[(dim, v)], rank(v)))
        return f" ({v}: pruned by the step-time bound, >= {_pct(pruned_by[(dim, v)], step):+.1f}%)"
    unfit = [v for v in simpler if (dim, v) in nofit_by]
    if unfit:
        v = max(unfit, key=rank)
        return f" (needed: {v} does not fit{' at cp 1' if cp_off else ''}, >= {gib(nofit_by[(dim, v)])})"
    if alts:  # the simpler values cannot run; every other value that fits is slower
        v, c = min(alts, key=lambda vc: (vc[1].step_seconds, rank(vc[0])))
        if _tied(c.step_seconds, step):
            return f" (tie with {v}{', less memory' if exact(best) < exact(c) else ''})"
        return f" (faster than {v} by {_pct(c.step_seconds, step):.1f}%)"
    return " (the only workable choice without context parallelism)" if cp_off else " (the only workable choice)"


def cp_unsearched(pins, seq_len: int, world: int) -> bool:
    """Would context parallelism be a candidate here but for :data:`CP_MIN_SEQ`? (cp not pinned, so the backend
    runs it, a sequence shorter than CP_MIN_SEQ that ring attention's 2 x cp chunks split at cp 2, an even GPU
    count.) The reasons then say that CP was not searched, and no verdict claims an impossibility that CP might
    lift."""
    return (getattr(pins, "cp", None) is None and seq_len < CP_MIN_SEQ and seq_len % 4 == 0 and world % 2 == 0
            and world > 1)


def pins_set(pins) -> dict:
    """The parallelism fields the spec pinned (offload_optimizer and offload_params are settings, not pins)."""
    if pins is None:
        return {}
    return {k: v for k, v in pins.model_dump(exclude={"offload_optimizer", "offload_params"}).items()
            if v is not None}


def explain(res: SearchResult, sm: StepModel, best_by, nofit_by, struct_by, capacity: int,
            fitting: list[Candidate], pins=None, *, exact=None, fit_check: bool = True,
            cp_off: bool = False, pruned_by=None) -> list[str]:
    """The choice in words: what was picked, and what every other value of each dimension costs. ``exact``: a
    candidate's memory (default: its ``per_gpu_bytes``); ``fit_check``: whether the candidates were checked to fit;
    ``cp_off``: CP would be a candidate but is not searched below :data:`CP_MIN_SEQ` (:func:`cp_unsearched`);
    ``pruned_by``: per (dimension, value) of ``nofit_by`` without a fitting candidate, the least step-time bound of the
    candidates of it the search skipped (such a value is "pruned", not "does not fit")."""
    best = res.best
    if best is None:
        return []
    exact = exact or (lambda c: c.per_gpu_bytes)
    simpler_pick = res.fastest is not None and res.fastest is not best
    b = best.plan
    out: list[str] = []
    _, _, br = step_time(sm, b)
    step = best.step_seconds
    simpler = simpler_pick and _simplicity(b) < _simplicity(res.fastest.plan)
    pruned_by = pruned_by or {}
    # (not simpler than the fastest, not the fastest: taken for memory, _choose's first rule)
    pick = ("" if not simpler_pick else "chosen as the simpler layout within the error band" if simpler else
            "chosen within the error band as the fastest's memory is within the memory model's error")
    head = ("fastest" if not simpler_pick else "chosen as the simpler layout within the error band (over the fastest)"
            if simpler else "chosen within the error band over the fastest (its memory is within the memory model's "
            "error of the limit)")
    out.append(f"{head} of {res.fitting} {'fitting ' if fit_check else ''}candidates evaluated"
               f"{'' if fit_check else ' without a fit check'} ({res.evaluated} memory evaluations, the "
               f"rest pruned by a step-time bound): "
               f"{describe(b)}, {step:.3g} s/step at {100 * best.mfu:.1f}% MFU, "
               f"{gib(exact(best))} of {gib(usable_bytes(capacity, sm.backend))} usable per GPU "
               f"({100 * backends.fit_headroom(sm.backend):.0f}% of {gib(capacity)})")
    top = sorted(((k, v) for k, v in br.items() if v > 0), key=lambda kv: -kv[1])[:4]
    out.append("step time: " + ", ".join(f"{k} {100 * v / step:.0f}%" for k, v in top))
    # (a ZeRO-1 pin runs as the ZeRO-2 of FSDP2 backends, zero_stages: the line names what the plan runs)
    pinned = [f"{k}={v}" + (f" (runs as {b.zero_stage})" if k == "zero_stage" and v != b.zero_stage else "")
              for k, v in pins_set(pins).items()]
    if pinned:
        out.append("fixed: " + ", ".join(pinned) + " (pinned by the spec, or a dimension the backend does not run)")
    for dim in ("tp", "pp", "cp", "ep", "dp_shard", "zero_stage", "pp_schedule", "activation_checkpointing",
                "micro_batch"):
        chosen = getattr(b, dim)
        shown = b.ac_label if dim == "activation_checkpointing" else chosen
        values = sorted({k[1] for k in list(best_by) + list(nofit_by) + list(struct_by) if k[0] == dim} - {chosen},
                        key=_value_order)
        if dim == "cp" and cp_off:  # (no other value: none was tried)
            out.append(f"CP 1: context parallelism is not searched below {CP_MIN_SEQ:,} tokens (Llama 3 used it "
                       "for long context only, arXiv:2407.21783 Table 4; llmc's CP cost at shorter sequences is not "
                       "validated): pin parallelism.cp to compare")
        if not values:
            continue
        texts: dict[str, list] = {}  # same verdict for several values -> one entry ("1, 2, 4: ...")
        for val in values:
            alt = best_by.get((dim, val))
            if alt is not None:
                pct = _pct(alt.step_seconds, step)
                text = "tie" if _tied(alt.step_seconds, step) else f"{'+' if pct > 0 else '-'}{abs(pct):.1f}%"
                if dim in _MEMORY_TRADE_DIMS:  # what the other value would hold: the speed bought with memory
                    text += f" at {gib(exact(alt))}"
                texts.setdefault(text, []).append(val)
            elif (dim, val) in pruned_by:  # some failed the fit check, others were not evaluated
                texts.setdefault(f"pruned by the step-time bound (>= {_pct(pruned_by[(dim, val)], step):+.1f}%; "
                                 f"those evaluated do not fit, >= {gib(nofit_by[(dim, val)])})", []).append(val)
            elif (dim, val) in nofit_by:
                texts.setdefault(f"does not fit (>= {gib(nofit_by[(dim, val)])})", []).append(val)
            elif (dim, val) in struct_by:
                texts.setdefault(struct_by[(dim, val)], []).append(val)
        bits = [f"{', '.join(str(v) for v in vals)}: {text}" for text, vals in texts.items()]
        if bits:
            found = "" if dim in REQUIRED_DIMS else " (best found)"
            verdict = _verdict(dim, chosen, values, best_by, nofit_by, best, pick, exact, cp_off, pruned_by)
            out.append(f"{_DIM_LABEL[dim]} {shown}{verdict}; others{found}: " + "; ".join(bits[:6])
                       + (f"; ... {len(bits) - 6} more" if len(bits) > 6 else ""))
    if b.pp > 1:
        bubble = br["pp_bubble"] / step
        out.append(f"pipeline bubble {100 * bubble:.1f}% of the step ({b.grad_accum} micro-batches over {b.pp} "
                   f"stages{', v=' + str(b.pp_virtual_stages) if b.pp_schedule == 'Interleaved1F1B' else ''})")
    if res.alternatives:
        a = res.alternatives[0]
        out.append(f"runner-up layout: {describe(a.plan)} ({a.reason}, {gib(a.per_gpu_bytes)})")
    return out
