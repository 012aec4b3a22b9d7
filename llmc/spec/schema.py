"""The run spec: one YAML file describing model, data, hardware, budget, training, stages, serving.

Declarations only (pydantic v2, frozen, unknown keys forbidden). ``None`` on a field means
"llmc derives it" (size-aware defaults, the parallelism search); derived values live in the
compiler's outputs, never written back here.
"""

from __future__ import annotations

import re
import typing
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from llmc.spec.model import Architecture, Float, Int, Label, SpecModel, refuse_bool
from llmc.spec.numbers import HumanFloat

#: Run, stage and data-source names become job names, file names and folder names: no spaces,
#: slashes or leading dots (so never ``..``, an absolute path or a hidden file).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
_NAME_RE = re.compile(NAME_PATTERN)
#: Longest name: a path component is limited to 255 bytes on common filesystems (POSIX NAME_MAX).
MAX_NAME_LEN = 128
#: Largest world size llmc plans for (the largest published runs use ~10^5 GPUs); bounds the search.
MAX_GPUS = 2**20
#: Most tokens a run or a source may name: 10^17, thousands of times the largest published pre-training runs
#: (Llama 3: 15.6T, Qwen3: 36T). Larger values are typos, and their FLOP counts overflow a double.
MAX_TOKENS = 1e17
#: Most tokens per optimizer step: 10^15, millions of times the largest published batches (tens of millions).
MAX_BATCH_TOKENS = 1e15
#: Most completions per GRPO prompt: one group is sampled and scored in one batch (DeepSeekMath-RL: 64).
MAX_GRPO_GROUP = 4096

#: Ranges of the hardware figures a spec may set (``hardware.gpu_overrides`` and ``hardware``): from a thousandth
#: of a unit up to far past any part built (B200: 2,250 dense BF16 TFLOPS, 180 GiB at 8 TB/s, 1,000 W; NVLink 5:
#: 900 GB/s per GPU). Values outside are typos, and at the extremes (1e-300, 1e300) the time and memory math
#: divides by zero or overflows.
MIN_HW, MAX_TFLOPS, MAX_HBM_GIB, MAX_HBM_TBPS, MAX_POWER_W, MAX_LINK_GBPS = 1e-3, 1e6, 1e6, 1e4, 1e6, 1e6
#: Most US dollars per GPU-hour a spec may set (list prices are a few dollars).
MAX_USD_PER_GPU_HOUR = 1e6

#: Largest mixture weight: weights are relative, and a million to one is far past any published mixture; 1e300
#: overflowed the token share (tokens x weight) to infinity.
MAX_MIX_WEIGHT = 1e6
#: What a data source holds: packed text (:data:`TEXT_SOURCE_KINDS`, streamed as documents joined with EOS) or
#: structured records (:data:`RECORD_SOURCE_KINDS`: chat turns, preference pairs, prompts, read by post-training).
SourceKind = Literal["general", "domain", "code", "math", "multilingual", "chat", "preference", "prompts"]
TEXT_SOURCE_KINDS: tuple[str, ...] = ("general", "domain", "code", "math", "multilingual")
RECORD_SOURCE_KINDS: tuple[str, ...] = ("chat", "preference", "prompts")
#: The text corpora ``format: builtin`` generates offline (named by the source's name; :mod:`llmc.runtime.corpus`).
#: A builtin record source (chat / preference / prompts) is generated at stage time, whatever its name.
BUILTIN_CORPORA: tuple[str, ...] = ("python-docs",)
#: Most MinHash permutations: the largest published setting is 9,000 (Lee et al. 2022, arXiv:2107.06499); choosing
#: bands and rows for 16,384 takes ~2 s and the work grows with the count.
MAX_NUM_PERM = 16384
#: Most words per n-gram (dedup uses 5, decontamination 8-13: GPT-3 arXiv:2005.14165 App. C).
MAX_NGRAM = 1024
#: Most data-preparation worker processes on one machine.
MAX_WORKERS = 4096

#: A simple name (see :data:`NAME_PATTERN`), at most :data:`MAX_NAME_LEN` characters.
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=MAX_NAME_LEN)]
#: Adam beta: the decay of a moving average, in [0, 1) (Kingma & Ba 2015, arXiv:1412.6980 Algorithm 1).
Beta = Annotated[Float, Field(ge=0, lt=1)]


def relative_folder(value: str) -> str:
    """A folder under the job's output directory: relative, ``/``-separated simple names, no ``..``."""
    parts = value.split("/")
    if not value or value.startswith("/") or len(value) > 256 or "" in parts[:-1] or any(
            not _NAME_RE.match(p) or len(p) > MAX_NAME_LEN for p in parts if p != ""):
        raise ValueError(f"must be a relative folder of simple names (letters, digits, '.', '_', '-'; "
                         f"no '..', no leading '/' or '.'; at most 256 characters) (got {value[:80]!r})")
    return value.rstrip("/")


class ModelRef(BaseModel):
    """``model:`` as a mapping: a preset (with optional overrides), an HF config.json, or explicit fields.

    The loader resolves this to :class:`Architecture`; exactly one of ``preset``/``hf_config``
    may be given, and with neither the remaining keys must form a full architecture.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    preset: str | None = None
    """Name of a built-in preset (``llmc presets`` lists them), e.g. ``llama3-8b``."""
    hf_config: str | None = None
    """Path to a Hugging Face ``config.json`` (relative to the spec file)."""


class Source(SpecModel):
    """One data source of the mixture."""

    name: Name
    """Short name used in reports, logs and file names (letters, digits, ``.``, ``_``, ``-``)."""
    path: str | None = None
    """Local file, directory or glob (text, .jsonl with a text field, or .parquet). None = planning only."""
    format: Literal["text", "jsonl", "parquet", "builtin"] = "jsonl"
    """File format; ``builtin`` = a corpus llmc generates offline (``python-docs``)."""
    text_field: str = "text"
    """Field holding the document text (jsonl/parquet)."""
    weight: Float = Field(default=1.0, gt=0, le=MAX_MIX_WEIGHT)
    """Mixture weight (normalised over sources), at most 10**6."""
    tokens: HumanFloat | None = Field(default=None, gt=0, le=MAX_TOKENS)
    """Unique tokens available in this source; used to warn about repeated epochs."""
    kind: SourceKind = "general"
    """What the source is, for the forgetting / mixture checks."""

    @model_validator(mode="after")
    def _builtin_known(self) -> Source:
        # (prepare refuses it at launch otherwise, after the plan called the spec valid)
        if self.format == "builtin" and self.kind not in RECORD_SOURCE_KINDS and self.name not in BUILTIN_CORPORA:
            raise ValueError(f"format: builtin generates a corpus named by the source's name, and llmc has no "
                             f"corpus {self.name!r} (known: {', '.join(BUILTIN_CORPORA)}); name it one of those, or "
                             "give the source a path and format: jsonl / text / parquet")
        return self


class Tokenizer(SpecModel):
    """Tokenizer: a local HF ``tokenizer.json`` directory, or one trained locally."""

    path: str | None = None
    """Directory with ``tokenizer.json`` (HF format). None with ``train`` = train one locally."""
    train: bool = False
    """Train a byte-level BPE with the ``tokenizers`` library on the data sources (offline)."""
    vocab_size: Int | None = Field(default=None, gt=0)
    """Vocabulary size; at most the model's vocab_size (a padded embedding has unused rows). None = the model's."""
    chat_template: Name | None = None
    """Chat template name (``llama3``, ``chatml``, ``phi3``, ``phi4``, ``gemma``: llmc.spec.chat) for SFT/DPO/GRPO
    stages, or ``tokenizer``: the tokenizer folder's own Jinja template (chat_template.jinja or tokenizer_config.json),
    rendered by transformers. None = the named template whose special tokens the tokenizer has, else the tokenizer's
    own when it has one, else llama3."""


class NearDup(SpecModel):
    """MinHash near-duplicate removal (``llmc.quality.NearDupConfig``; defaults: datatrove / FineWeb)."""

    threshold: Float = Field(default=0.75, gt=0, lt=1)
    """Jaccard similarity of word n-gram sets above which two documents count as near-duplicates: the LSH bands
    pick the pairs compared, and a pair is removed only when its MinHash estimate reaches this."""
    num_perm: Int = Field(default=112, ge=2, le=MAX_NUM_PERM)
    """MinHash permutations per document (at most 16384)."""
    ngram: Int = Field(default=5, gt=0, le=MAX_NGRAM)
    """Words per shingle."""
    bands: Int | None = Field(default=14, gt=0)
    """LSH bands b. Default 14 (x 8 rows: tuned for threshold 0.75): which pairs are compared (a pair no band
    catches is never removed); set bands and rows both to None for the b x r minimising FP + FN at ``threshold``
    (datasketch's rule)."""
    rows: Int | None = Field(default=8, gt=0)
    """Rows per band r (b x r <= num_perm). Default 8; None together with ``bands`` None: fitted to ``threshold``."""
    seed: Int = 1
    """MinHash permutation seed."""


class Decontaminate(SpecModel):
    """Remove training documents sharing an n-gram with a benchmark item (GPT-3, arXiv:2005.14165 App. C)."""

    ngram: Int = Field(default=13, gt=0, le=MAX_NGRAM)
    """Words per n-gram (13 as in GPT-3)."""
    benchmarks: list[str] = Field(default_factory=list)
    """Benchmark files (``.jsonl`` items or text lines), relative to the spec file."""
    text_fields: list[str] | None = None
    """jsonl fields to match: a key or a dotted path into nested items (``question.stem``, ``choices.text``).
    None = every string in the item, nested ones included (ARC-style items). An item's strings are joined in
    order, so an n-gram may run from its question into its answer; ids and labels in the join only break the
    n-grams that cross them. With None, a multiple-choice item naming its gold choice (``answerKey``) is also
    matched as its question followed by the gold answer."""
    min_words: Int = Field(default=8, gt=0, le=MAX_NGRAM)
    """An item (joined) shorter than ``ngram`` words but of at least this many is matched whole: a document
    holding its entire word sequence is contaminated; shorter items are never matched (counted as
    ``skipped_short`` in the report). 8 as GPT-3's minimum N on non-synthetic tasks, set against spurious
    collisions (arXiv:2005.14165 App. C)."""


class Quality(SpecModel):
    """Data quality before tokenization: exact dedup, MinHash near-dedup, n-gram decontamination."""

    exact: bool = True
    """Drop exact duplicates (normalised text hash)."""
    near_dup: NearDup | None = Field(default_factory=NearDup)
    """MinHash near-duplicate removal: on by default (these defaults) whenever ``data.quality`` is given. None =
    off."""
    decontaminate: Decontaminate | None = None
    """Benchmark decontamination. None = off."""
    workers: Int = Field(default=1, gt=0, le=MAX_WORKERS)
    """Worker processes (the cleaned output and its order do not depend on it)."""
    expected_removal_fraction: Float | None = Field(default=None, ge=0, lt=1)
    """Expected share of tokens removed (from an earlier run's report), for the plan's tokens-left figure.
    None = unknown."""


class Data(SpecModel):
    """Training data for the (pre-)training stage."""

    sources: list[Source] = Field(default_factory=list)
    """Mixture sources; weights are normalised."""
    tokenizer: Tokenizer = Field(default_factory=Tokenizer)
    """Tokenizer to use."""
    seq_len: Int = Field(gt=0)
    """Sequence length in tokens: pre-training and continued training pack documents joined with EOS into
    sequences of exactly this length; SFT / DPO / GRPO stages train one conversation (pair, prompt + completion) per
    sequence, truncated to it and padded to the longest of its micro-batch, not packed."""
    tokens: HumanFloat = Field(gt=0, le=MAX_TOKENS)
    """Total training tokens (D), e.g. ``15.6e12`` or ``15.6T``. For SFT / DPO / GRPO stages: sequence slots,
    steps = tokens / (global batch x seq_len); each step draws a global batch of examples, every example once per
    epoch in a fresh order, so a dataset shorter than seq_len per example trains fewer tokens than this (the
    plan times full-length sequences: an upper bound)."""
    quality: Quality | None = None
    """Data-quality pass run by ``prepare`` before tokenization. None = none."""


class GpuOverrides(SpecModel):
    """Per-field overrides of the hardware table's GPU, or a custom GPU (unknown ``hardware.gpu`` key with
    ``base`` or at least bf16_tflops, hbm_gib and hbm_tbps). None = the table's value."""

    base: str | None = None
    """Table key to start from (for a custom key)."""
    name: Label | None = None
    """Display name."""
    bf16_tflops: Float | None = Field(default=None, ge=MIN_HW, le=MAX_TFLOPS)
    """Dense BF16 tensor peak in TFLOPS (not the 2:4 sparsity figure)."""
    fp8_tflops: Float | None = Field(default=None, ge=MIN_HW, le=MAX_TFLOPS)
    """Dense FP8 tensor peak in TFLOPS."""
    fp4_tflops: Float | None = Field(default=None, ge=MIN_HW, le=MAX_TFLOPS)
    """Dense FP4 (NVFP4) tensor peak in TFLOPS (Blackwell). Needed for ``training.precision: nvfp4``."""
    fp32_tflops: Float | None = Field(default=None, ge=MIN_HW, le=MAX_TFLOPS)
    """Plain FP32 peak in TFLOPS."""
    hbm_gib: Float | None = Field(default=None, ge=MIN_HW, le=MAX_HBM_GIB)
    """Device memory in GiB as the device reports it (``torch.cuda.get_device_properties(0).total_memory / 2**30``,
    e.g. 79.1 for an H100 "80GB"), not the marketed decimal GB."""
    hbm_tbps: Float | None = Field(default=None, ge=MIN_HW, le=MAX_HBM_TBPS)
    """Memory bandwidth in TB/s."""
    power_w: Float | None = Field(default=None, ge=MIN_HW, le=MAX_POWER_W)
    """Board power limit in W. Below the part's rated board power (its table entry's), the sustained tensor clocks,
    and with them the table's peaks, scale by (power_w / rated)^(1/3) (``llmc.compiler.hardware.clock_factor``).
    Peaks given here (``*_tflops``) are taken as the part's at this power: not scaled."""
    nvlink_gbps: Float | None = Field(default=None, ge=0, le=MAX_LINK_GBPS)
    """Scale-up bandwidth per GPU per direction in GB/s (0 = none)."""
    pcie_gbps: Float | None = Field(default=None, ge=0, le=MAX_LINK_GBPS)
    """Host-link (PCIe) bandwidth per GPU per direction in GB/s; used inside a node when there is no NVLink."""
    nvlink_domain: Int | None = Field(default=None, gt=0, le=MAX_GPUS)
    """GPUs sharing one NVLink domain (GB200 NVL72: 72). None = gpus_per_node."""
    mx_block_scaling: bool | None = None
    """Tensor cores run OCP MX block-scaled formats (MXFP8; Blackwell). Needed for ``fp8_recipe: mxfp8``."""
    vendor: Literal["nvidia", "amd"] | None = None
    """GPU vendor: the Kubernetes resource of ``kubeflow/trainjob.yaml`` (nvidia.com/gpu or amd.com/gpu). None = the
    base's, else nvidia."""
    skypilot_name: Label | None = None
    """SkyPilot accelerator name (``sky show-gpus -a``, or the label of a Kubernetes / SSH node pool) for the
    multi-node ``skypilot/task.yaml``. None = the base's; without one that file is not written (X111)."""


class Hardware(SpecModel):
    """The cluster."""

    gpu: str
    """GPU type, a key of the hardware table (``llmc gpus``), e.g. ``h100-sxm``; ``cpu`` for local runs."""
    count: Int = Field(gt=0, le=MAX_GPUS)
    """Total accelerators (world size), at most 2**20."""
    gpus_per_node: Int | None = Field(default=None, gt=0, le=1024)
    """Accelerators per node. None = the hardware table's default (8 for HGX)."""
    usd_per_gpu_hour: Float | None = Field(default=None, ge=0, le=MAX_USD_PER_GPU_HOUR)
    """Price per GPU-hour. None = the hardware table's reference price."""
    inter_node_gbps: Float | None = Field(default=None, ge=MIN_HW, le=8 * MAX_LINK_GBPS)  # Gbit/s: 8 x GB/s
    """Network bandwidth per GPU in Gbit/s. None = the table's value for the part (``net_gbps`` in
    ``llmc/compiler/hardware.py``: 400 for HGX H100 / H200 / B200, 200 for A100, 800 for B300 / GB300)."""
    host_memory_gib: Float | None = Field(default=None, ge=MIN_HW, le=MAX_HBM_GIB)
    """Host (CPU) memory per node in GiB, which optimizer and parameter offload fill (P016). None = the hardware
    table's reference node where it gives one (``host_gib``: ``llmc gpus``; its source in
    ``llmc/compiler/hardware.py``)."""
    gpu_overrides: GpuOverrides | None = None
    """Override table fields of ``gpu`` (peaks, HBM, power, NVLink) or define a custom GPU."""
    interruptions_per_gpu_day: Float | None = Field(default=None, ge=0, le=1)
    """Unexpected job interruptions per GPU-day on this fleet, for the interruptions the plan expects (its
    ``interruptions`` line and B005). None = Llama 3's published rate (419 in 54 days on 16,384 H100, 4.7e-4);
    0 = none expected."""


class Budget(SpecModel):
    """Limits the plan must respect; each that binds is reported."""

    max_days: Float | None = Field(default=None, gt=0)
    """Wall-clock limit in days."""
    max_usd: HumanFloat | None = Field(default=None, gt=0)
    """Compute spend limit in US dollars."""
    max_gpu_hours: HumanFloat | None = Field(default=None, gt=0)
    """Compute limit in GPU-hours (an allocation grant: GPUs x wall-clock hours, checkpoint saves included), judged
    like ``max_usd`` but independent of the price per GPU-hour."""


class Optimizer(SpecModel):
    """AdamW settings; None = size-aware default (reported as a default)."""

    name: Literal["adamw"] = "adamw"
    """Only AdamW is supported by every backend llmc emits."""
    lr: Float | None = Field(default=None, gt=0)
    """Peak learning rate. None = size-aware default (3e-4 at 1B -> 1e-4 at 70B, log-interpolated)."""
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    """Adam betas, each in [0, 1) (LLM pre-training uses beta2 = 0.95); every stage's, post-training's too."""
    eps: Float = Field(default=1e-8, gt=0)
    """Adam epsilon."""
    weight_decay: Float = Field(default=0.1, ge=0)
    """Decoupled weight decay (PyTorch AdamW: theta -= lr * wd * theta), of pre-training and continued training;
    SFT / DPO / GRPO decay no weights (TRL's default; the stage plan's ``hyper.optimizer``)."""
    no_decay: Literal["embeddings_and_1d", "1d", "none"] = "embeddings_and_1d"
    """Which parameters ``weight_decay`` leaves out (AdamW decays every other one), on every backend, for
    pre-training and the continued-training stages (SFT / DPO / GRPO decay no weights at all):

    - ``embeddings_and_1d``: the 1-D parameters (norm gains, biases, the MoE expert bias; gpt-oss's stacked expert
      biases and attention sinks too) and the token embeddings (a tied output head is that matrix): OLMo 2
      (arXiv:2501.00656, among its training-stability changes: no weight decay on embeddings).
    - ``1d``: only the 1-D parameters (and biases); the token embeddings are decayed like every matrix: Megatron-LM's
      default ``no_weight_decay_cond`` (megatron/core/optimizer/__init__.py: bias or 1-D) and nanoGPT
      (model.py ``configure_optimizers``: every tensor of 2 or more dims decayed).
    - ``none``: every parameter decayed, in one group: torchtitan 0.3.0's ``default_adamw``
      (torchtitan/components/optimizer/optimizer.py, one ``.*`` group at weight_decay 0.1)."""


class Schedule(SpecModel):
    """Learning-rate schedule."""

    kind: Literal["cosine", "wsd", "linear", "constant"] = "cosine"
    """After the warmup: ``cosine`` decay; ``wsd`` (warmup-stable-decay: the peak LR until the last
    ``decay_fraction`` of the steps, then a 1-sqrt cooldown, LR factor min + (1 - min)(1 - sqrt(progress)): Hägele et
    al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations", arXiv:2405.18392, sec. 3;
    torchtitan's ``decay_type: sqrt``); ``linear`` decay; or ``constant`` (no decay). Every backend trains
    torchtitan's ``linear_warmup_stable_decay``, step for step."""
    warmup_steps: Int | None = Field(default=None, ge=0)
    """Linear warmup steps: step k (1-based) of an N-step warmup runs at k/N of peak, so 1 is no warmup (step 1 at
    peak). None = 1% of steps, rounded, at most 2000 and at least 2 where 2 is at most 10% of the steps (else 1; 0
    for a single step); a stage other than pre-training warms up at most a tenth of its own steps."""
    min_lr_ratio: Float = Field(default=0.1, ge=0, le=1)
    """The LR the decay approaches, as a fraction of peak (~10%). The decay reaches it one step after the last
    (torchtitan's schedule, which llmc's runtime matches), so the last step runs a little above it (the plan says at
    what LR); unused by ``constant``."""
    decay_fraction: Float = Field(default=0.2, gt=0, le=1)
    """wsd only: fraction of steps spent in the 1-sqrt cooldown at the end (rounded to whole steps, at most the
    steps after the warmup)."""


class Checkpoint(SpecModel):
    """Checkpointing."""

    interval_steps: Int | None = Field(default=None, gt=0)
    """Steps between checkpoints. None = about every 30 minutes of predicted wall time, within [50, 1000]."""
    async_mode: bool | None = None
    """Asynchronous checkpointing. None = on when the state is larger than 100 GB."""
    write_gbps: Float | None = Field(default=None, ge=MIN_HW, le=MAX_LINK_GBPS)
    """Sustained write bandwidth per node to the checkpoint storage, in GB/s, for the predicted save stalls in the
    run's time and cost. None = the hardware table's ``storage_write_gbps`` (a conservative 1 GB/s per node: its
    source in ``llmc/compiler/hardware.py``)."""
    restart_minutes: Float | None = Field(default=None, ge=0, le=24 * 60)
    """Minutes a restart after an interruption takes besides reading the checkpoint back (rescheduling, start-up,
    collectives, compile), for the interruptions the plan expects. None = an estimate of 10 minutes."""
    keep_latest: Int = Field(default=3, gt=0)
    """How many checkpoints to keep."""
    folder: str = "checkpoints"
    """Folder under the job's output directory (relative; simple names separated by ``/``)."""

    @field_validator("folder")
    @classmethod
    def _relative(cls, value: str) -> str:
        return relative_folder(value)


class LossSpike(SpecModel):
    """Loss-spike detection with rewind-and-skip."""

    enabled: bool = False
    """Watch the loss for spikes."""
    threshold: Float = Field(default=3.0, gt=0)
    """A spike is loss > mean + threshold * std over the window."""
    window: Int = Field(default=50, gt=1)
    """Steps in the running window."""
    skip_batches: Int = Field(default=1, ge=0)
    """On a spike: rewind to the last checkpoint and skip this many batches past the spike."""
    max_rewinds: Int = Field(default=3, ge=0)
    """Give up (stop with an error) after this many rewinds."""


#: Default share of the final decoder blocks an nvfp4 run keeps in bf16 (``Training.nvfp4_bf16_tail``: its sources).
NVFP4_BF16_TAIL = 0.15
#: Training precisions whose weights and unconverted matmuls are bf16: llmc's own trainers (native, DeepSpeed) run
#: such a run's stages in bf16 (they convert no linears to fp8 / NVFP4; the torchtitan job does).
BF16_PRECISIONS = ("bf16", "fp8", "nvfp4")


class Training(SpecModel):
    """How the (pre-)training stage is run."""

    precision: Literal["bf16", "fp8", "nvfp4", "fp32"] = "bf16"
    """Compute precision of matmuls. fp8 needs Hopper or newer; nvfp4 (4-bit E2M1 with an E4M3 scale per 16
    elements, NVIDIA's NVFP4 training recipe) needs Blackwell FP4 tensor cores and the torchtitan backend, and
    converts the decoder blocks' linears except the last ``nvfp4_bf16_tail`` of them (the output head stays bf16)."""
    global_batch_tokens: HumanFloat | None = Field(default=None, ge=1, le=MAX_BATCH_TOKENS)
    """Tokens per optimizer step. None = size-aware default (2M-16M tokens; small for tiny runs)."""
    optimizer: Optimizer = Field(default_factory=Optimizer)
    """Optimizer."""
    schedule: Schedule = Field(default_factory=Schedule)
    """LR schedule."""
    grad_clip: Float | None = Field(default=1.0, gt=0)
    """Global grad-norm clip. None = no clipping (warned)."""
    z_loss: Float = Field(default=0.0, ge=0)
    """Output z-loss coefficient (1e-4 .. 1e-5 for large runs)."""
    checkpoint: Checkpoint = Field(default_factory=Checkpoint)
    """Checkpointing."""
    loss_spike: LossSpike = Field(default_factory=LossSpike)
    """Loss-spike handling."""
    init_hf: str | None = None
    """Start pre-training (a run without ``stages``) from a Hugging Face checkpoint: a local directory or a
    Hub id in the local HF cache, as ``stages[].init_hf`` (continued pre-training of an existing model)."""
    seed: Int = 0
    """Random seed of the model's initialisation, the mixture's draw of each window's source, LoRA's initialisation,
    GRPO's sampling and SFT / DPO's order of records per epoch. Not the data order of a single source: pre-training
    streams documents in file order, unshuffled (shuffle the corpus beforehand); not the held-out split
    (``eval.validation.seed``) nor llmc's builtin post-training records (a fixed seed)."""
    steps: Int | None = Field(default=None, gt=0)
    """Optimizer steps. None = data.tokens / global_batch_tokens."""
    log_every: Int = Field(default=10, gt=0)
    """Steps between metric lines."""
    backend: Literal["auto", "torchtitan", "deepspeed", "native"] = "auto"
    """Backend the plan is computed for (its memory layout and overlap); ``auto`` = llmc picks one and says why."""
    compile: bool | None = None
    """torch.compile. None = the backend's default (on for torchtitan, off for native and DeepSpeed)."""
    fp8_recipe: Literal["tensorwise", "rowwise", "mxfp8"] | None = None
    """fp8 scaling recipe when ``precision`` is fp8: ``tensorwise`` (one scale per tensor), ``rowwise`` (one per
    row) or ``mxfp8`` (OCP MX: one power-of-two scale per 32 elements; Blackwell only). None = the backend's
    default (torchtitan: rowwise). Timed and sized per recipe; torchtitan 0.3.0 runs rowwise and mxfp8."""
    nvfp4_bf16_tail: Float = Field(default=NVFP4_BF16_TAIL, ge=0, lt=1)
    """With ``precision: nvfp4``: the fraction of the final decoder blocks kept in bf16; the last
    ceil(n_layers x fraction) blocks stay bf16, as torchtitan's ``nvfp4_bf16_tail_fqns(n_layers, fraction)``
    counts them. 0.15 = torchtitan 0.3.0's ``*_first_85_pct_layers_nvfp4`` configs and the ~15 % of linear layers,
    mostly at the end of the network, that "Pretraining Large Language Models with NVFP4" (NVIDIA,
    arXiv:2509.25149) keeps in BF16; 0 converts every block (the paper reports divergence without a
    high-precision share)."""


ACMode = Literal["none", "selective", "full", "partial"]
#: every activation-checkpointing mode; the one list the compiler, measurement tables and runtime import
AC_MODES: tuple[str, ...] = typing.get_args(ACMode)


def ac_label(mode: str, layers: int = 0) -> str:
    """An activation-checkpointing mode as plans, logs and records print it: ``partial(K)`` with its block count,
    else the mode's name (the compiler's ``ParallelPlan.ac_label`` and the runtime's logs)."""
    return f"partial({layers})" if mode == "partial" else mode


class Parallelism(SpecModel):
    """Optional pins for the parallelism search; None = let llmc search."""

    dp_replicate: Int | None = Field(default=None, gt=0)
    """Data-parallel replicas (DDP / the replicate dim of HSDP)."""
    dp_shard: Int | None = Field(default=None, gt=0)
    """FSDP / ZeRO-3 shard degree."""
    tp: Int | None = Field(default=None, gt=0)
    """Tensor parallel degree (within a node)."""
    pp: Int | None = Field(default=None, gt=0)
    """Pipeline parallel degree."""
    pp_schedule: Literal["1F1B", "Interleaved1F1B", "GPipe", "ZBVZeroBubble"] | None = None
    """Pipeline schedule."""
    pp_virtual_stages: Int | None = Field(default=None, gt=0)
    """Model chunks per pipeline rank: 1 for 1F1B / GPipe, 2 for ZBVZeroBubble, any for Interleaved1F1B (Megatron-LM's
    ``--num-virtual-stages-per-pipeline-rank``). Up to n_layers + 2 chunks in all: the first may hold only the
    embedding, the last only the norm and head. None = searched (2, 4 or 8 when interleaved)."""
    cp: Int | None = Field(default=None, gt=0)
    """Context parallel degree."""
    ep: Int | None = Field(default=None, gt=0)
    """Expert parallel degree (MoE only)."""
    micro_batch: Int | None = Field(default=None, gt=0)
    """Sequences per GPU per micro-step."""
    activation_checkpointing: ACMode | None = None
    """Activation recomputation: ``selective`` (the backend's per-op or attention-core recompute), ``full`` (every
    block recomputed whole) or ``partial`` (the first ``ac_layers`` blocks of every pipeline model chunk
    recomputed whole, the rest not at all)."""
    ac_layers: Int | None = Field(default=None, gt=0)
    """With ``activation_checkpointing: partial``: blocks per pipeline model chunk (the whole model without
    pipelining) recomputed whole. None = the fewest that fit."""
    zero_stage: Annotated[Literal[0, 1, 2, 3] | None, BeforeValidator(refuse_bool)] = None
    """ZeRO stage. DeepSpeed runs it as its ZeRO optimizer; torchtitan and the native trainer shard with FSDP2, 3 as
    FSDP2 resharding after forward, 1 and 2 keeping the gathered parameters through the step
    (``reshard_after_forward=False``). None = the search's choice."""
    offload_optimizer: bool = False
    """Offload optimizer states to CPU (DeepSpeed)."""
    offload_params: bool = False
    """Offload the parameters to CPU too (DeepSpeed ZeRO-3 ``offload_param``, ZeRO-Infinity): each layer is fetched
    to the GPU only while it runs. Needs ``offload_optimizer`` and ZeRO stage 3."""


# ----------------------------------------------------------------------------- stages

StageKind = Literal["pretrain", "midtrain", "long_context", "sft", "dpo", "grpo"]
#: every stage kind, in pipeline order; the one list the compiler, emitters and runtime import
STAGE_KINDS: tuple[str, ...] = typing.get_args(StageKind)
#: kinds trained with the next-token loss on packed text (same objective as pre-training)
LM_KINDS: tuple[str, ...] = ("pretrain", "midtrain", "long_context")
#: continued training: LM stages after pre-training; llmc's trainers run them data parallel over every GPU, without
#: TP, PP or CP (the compiler sizes them so, G006 checks their batch split, ``TrainJob.from_lock`` runs them so)
CONTINUED_KINDS: tuple[str, ...] = tuple(k for k in LM_KINDS if k != "pretrain")
#: post-training kinds: chat-formatted data, a chat template and a base model to start from
CHAT_KINDS: tuple[str, ...] = ("sft", "dpo", "grpo")
POSTTRAIN_KINDS = CHAT_KINDS
#: preference / RL kinds: trained against a reference model, usually starting from an SFT stage
PREFERENCE_KINDS: tuple[str, ...] = ("dpo", "grpo")


#: the linear layers an adapter can wrap (torchtitan / llmc names)
LoRATarget = Literal["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
LORA_TARGETS: tuple[str, ...] = typing.get_args(LoRATarget)
#: the same linears by their Hugging Face module names (PEFT's ``LoraConfig.target_modules`` for Llama-style
#: models), accepted in ``lora.targets`` for llmc's; PEFT's ``all-linear`` is every one of them
#: (https://huggingface.co/docs/peft/package_reference/lora, ``target_modules``)
LORA_HF_NAMES: dict[str, str] = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo",
                                 "gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
LORA_ALL_LINEAR = "all-linear"
#: the NF4 format of ``quantize_base: nf4`` (QLoRA, Dettmers et al. 2023, arXiv:2305.14314 §3): one absmax per block
#: of 64 weights; double quantisation stores those absmax values in 8 bits with one fp32 scale per 256 of them
NF4_BLOCK = 64
NF4_DQ_BLOCK = 256
#: llmc's trainer builds a model of more parameters than this on the meta device when it shards it over several
#: ranks (``llmc.runtime.train._setup_model``), then loads each rank's shards; QLoRA's NF4 codes are made from whole
#: weights, so a QLoRA stage of such a model runs on one GPU only
META_INIT_PARAMS = 2e9


def _lora_target(v: typing.Any) -> typing.Any:
    """One ``lora.targets`` entry: a Hugging Face / PEFT name read as llmc's; an unknown name refused with every name
    accepted (llmc's, the Hugging Face ones, ``all-linear``)."""
    if not isinstance(v, str):
        return v  # (the Literal says what it must be)
    v = LORA_HF_NAMES.get(v, v)
    if v not in LORA_TARGETS:
        ours, hf = (", ".join(repr(x) for x in names) for names in (LORA_TARGETS[:-1], tuple(LORA_HF_NAMES)[:-1]))
        raise ValueError(f"must be one of {ours} or {LORA_TARGETS[-1]!r}, or their Hugging Face names {hf} or "
                         f"{tuple(LORA_HF_NAMES)[-1]!r}; or {LORA_ALL_LINEAR!r} for all of them (got {v!r})")
    return v


class LoRA(SpecModel):
    """LoRA / QLoRA adapters."""

    rank: Int = Field(default=16, gt=0)
    """Adapter rank r (typical 4-64)."""
    alpha: Float = Field(default=32.0, gt=0)
    """Scaling alpha; the update is (alpha / r) * B @ A."""
    dropout: Float = Field(default=0.05, ge=0, lt=1)
    """Dropout on the adapter input."""
    targets: list[Annotated[LoRATarget, BeforeValidator(_lora_target)]] = Field(
        default_factory=lambda: list(LORA_TARGETS))
    """Adapted linear layers (torchtitan names; Hugging Face / PEFT names such as ``q_proj`` and ``all-linear`` are
    read as theirs)."""
    quantize_base: Literal["none", "nf4"] = "none"
    """QLoRA: keep the frozen base in 4-bit NF4."""

    @field_validator("targets", mode="before")
    @classmethod
    def _peft_names(cls, v):
        if v == LORA_ALL_LINEAR or (isinstance(v, list) and LORA_ALL_LINEAR in v):
            return list(LORA_TARGETS)  # (with other names too: every linear all the same)
        if not isinstance(v, list):
            return v
        out = []
        for x in v:
            x = LORA_HF_NAMES.get(x, x) if isinstance(x, str) else x
            if x not in out:
                out.append(x)
        return out


class StageBase(SpecModel):
    """Fields every stage kind has; stages consume each other's checkpoints."""

    name: Name
    """Unique stage name (letters, digits, ``.``, ``_``, ``-``; used in folder names)."""
    kind: StageKind
    """What the stage does."""
    init_from: Name | None = None
    """Name of the stage whose final checkpoint initialises this one. None = ``init_hf`` or random init."""
    init_hf: str | None = None
    """Start from a Hugging Face checkpoint: a local directory (config.json + safetensors; relative to the
    spec file) or a Hub id resolved in the local HF cache (never downloaded). Names and shapes are checked
    against the spec's model. Not together with ``init_from``."""
    data: Data | None = None
    """Stage data. None = the top-level data (pretrain/midtrain only)."""
    lr: Float | None = Field(default=None, gt=0)
    """Peak LR. None = size-aware default for the stage kind."""
    steps: Int | None = Field(default=None, gt=0)
    """Optimizer steps. None = data.tokens / batch."""
    global_batch_tokens: HumanFloat | None = Field(default=None, ge=1, le=MAX_BATCH_TOKENS)
    """Tokens per step. None = default for the stage kind."""
    lora: LoRA | None = None
    """Train LoRA/QLoRA adapters instead of all weights."""
    general_data_fraction: Float | None = Field(default=None, ge=0, le=1)
    """Share of general data the stage is meant to mix in against forgetting (warned below 10%): a declaration,
    checked against the stage's own sources (G010), which the runners mix by their weights."""
    seq_len: Int | None = Field(default=None, gt=0)
    """Training sequence length. None = data.seq_len. A GRPO stage's sequences are max_prompt_tokens +
    max_new_tokens whatever this says (its trainer reads no seq_len; G015)."""

    @model_validator(mode="after")
    def _one_init(self) -> StageBase:
        if self.init_from is not None and self.init_hf is not None:
            raise ValueError("give init_from (a stage) or init_hf (a Hugging Face checkpoint), not both")
        return self


class PretrainStage(StageBase):
    """Pre-training on the top-level (or the stage's) data."""

    kind: Literal["pretrain"]
    """``pretrain``."""


class MidtrainStage(StageBase):
    """Continued pre-training (domain adaptation) from a trained base."""

    kind: Literal["midtrain"]
    """``midtrain``."""


class LongContextStage(StageBase):
    """Context extension: train at a longer ``seq_len`` with a new RoPE base or scaling."""

    kind: Literal["long_context"]
    """``long_context``."""
    rope_theta: Float | None = Field(default=None, gt=0)
    """New RoPE base (theta scaling)."""
    rope_scaling: dict | None = None
    """RoPE scaling, as in Architecture.rope_scaling (e.g. {type: yarn, factor: 4})."""


class SFTStage(StageBase):
    """Supervised fine-tuning on chat data."""

    kind: Literal["sft"]
    """``sft``."""
    loss_mask: Literal["assistant", "last_assistant", "none"] | None = None
    """Which tokens carry loss. None = all assistant turns."""


class DPOStage(StageBase):
    """Direct preference optimisation (Rafailov et al. 2023, arXiv:2305.18290)."""

    kind: Literal["dpo"]
    """``dpo``."""
    dpo_beta: Float | None = Field(default=None, gt=0)
    """Beta of the DPO loss (default 0.1)."""


class GRPOStage(StageBase):
    """Group relative policy optimisation (DeepSeekMath, Shao et al. 2024, arXiv:2402.03300 §4)."""

    kind: Literal["grpo"]
    """``grpo``."""
    grpo_group_size: Int | None = Field(default=None, gt=0, le=MAX_GRPO_GROUP)
    """Completions per prompt G (default 8; DeepSeekMath-RL samples 64)."""
    grpo_kl_coef: Float | None = Field(default=None, ge=0)
    """KL coefficient against the reference (default 0.04)."""
    grpo_clip: Float = Field(default=0.2, gt=0)
    """PPO ratio clip epsilon."""
    grpo_iterations: Int | None = Field(default=None, gt=0)
    """Policy updates (optimizer steps) per batch of samples, GRPO's mu (Shao et al. 2024, Algorithm 1; TRL
    ``num_iterations``). None = 1, on-policy: DeepSeekMath-RL "only has a single update following each
    exploration stage" (sec. 4.2)."""
    max_new_tokens: Int | None = Field(default=None, gt=0)
    """Generation length per completion (default 256)."""
    prompts_per_step: Int | None = Field(default=None, gt=0)
    """Prompts per optimizer step (each sampled G times). None = 1024 // G (DeepSeekMath batch 1024)."""
    max_prompt_tokens: Int | None = Field(default=None, gt=0)
    """Prompt length budget for the rollout cost / KV cache (default 512)."""
    reward: Literal["arithmetic", "none"] | None = None
    """Verifier (``arithmetic`` checks the answer exactly with sympy)."""


#: kind -> the stage model for that kind
STAGE_TYPES: dict[str, type[StageBase]] = {
    "pretrain": PretrainStage, "midtrain": MidtrainStage, "long_context": LongContextStage,
    "sft": SFTStage, "dpo": DPOStage, "grpo": GRPOStage,
}
assert tuple(STAGE_TYPES) == STAGE_KINDS

#: one stage of a pipeline, chosen by ``kind``
Stage = Annotated[
    PretrainStage | MidtrainStage | LongContextStage | SFTStage | DPOStage | GRPOStage,
    Field(discriminator="kind"),
]


def make_stage(**fields: typing.Any) -> StageBase:
    """Build the stage model for ``fields["kind"]`` (``make_stage(name="sft", kind="sft", ...)``)."""
    return STAGE_TYPES[fields["kind"]].model_validate(fields)


# ----------------------------------------------------------------------------- serving


#: A served model name: simple names (:data:`NAME_PATTERN`) joined by ``/``, as Hugging Face ids are.
SERVED_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$"
_SERVED_NAME_RE = re.compile(SERVED_NAME_PATTERN)
ServedName = Annotated[str, Field(json_schema_extra={"pattern": SERVED_NAME_PATTERN, "maxLength": MAX_NAME_LEN})]
#: One label of a host name (RFC 1123 sec. 2.1, RFC 952): letters, digits and inner hyphens, at most 63 characters.
_HOST_LABEL_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def serving_host(value: str) -> str:
    """A serving target's ``host``: an IPv4 / IPv6 literal (``ipaddress.ip_address``) or a host name of dot-separated
    RFC 1123 labels, at most 253 characters (RFC 1035 sec. 2.3.4)."""
    import ipaddress  # noqa: PLC0415

    try:  # (an IPv6 zone, "fe80::1%eth0", must be an interface name too: ipaddress takes any text after the %)
        zone = value.partition("%")[2]
        if not zone or _HOST_LABEL_RE.fullmatch(zone.replace(".", "-").replace("_", "-")):
            return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    labels = value.split(".")
    # an all-digit last label is an IP address written wrong (010.0.0.1, 1.2.3), not a name (RFC 3696 sec. 2)
    if len(value) <= 253 and all(_HOST_LABEL_RE.fullmatch(x) for x in labels) and not labels[-1].isdigit():
        return value
    raise ValueError(f"must be an IP address (127.0.0.1, 0.0.0.0, ::) or a host name of letters, digits, '-' and "
                     f"'.' (got {value[:80]!r})")


class Serving(SpecModel):
    """A serving target (vLLM or SGLang)."""

    engine: Literal["vllm", "sglang"] = "vllm"
    """Inference engine."""
    gpu: str | None = None
    """GPU type. None = the training GPU."""
    gpus: Int | None = Field(default=None, gt=0)
    """GPUs per replica. None = the fewest that fit (tensor parallel within a node)."""
    max_model_len: Int | None = Field(default=None, gt=0)
    """Context length to serve. None = the training seq_len (or the long-context stage's)."""
    concurrency: Int = Field(default=64, gt=0)
    """Concurrent sequences at max_model_len that must fit in the KV cache."""
    quantization: Literal["none", "fp8", "awq", "gptq"] = "none"
    """Weight quantization: none (the export's 16-bit weights) or fp8 (quantized by the engine on load: vLLM 0.33's
    ``--quantization fp8_per_tensor``, SGLang's ``fp8``; vLLM's ``fp8`` reads fp8 checkpoints only). awq and
    gptq are refused (V009): they serve a pre-quantized checkpoint (the engines read its quantization config), and
    the export llmc serves is its own 16-bit one."""
    kv_cache_dtype: Literal["auto", "fp8"] = "auto"
    """KV cache dtype (auto = the model dtype)."""
    gpu_memory_utilization: Float = Field(default=0.90, gt=0, le=0.99)
    """Fraction of GPU memory the engine may use."""
    prefix_caching: bool = True
    """Automatic prefix caching."""
    expert_parallel: bool = False
    """MoE models: split the experts over the replica's GPUs instead of each expert over the tensor-parallel ranks
    (vLLM ``--enable-expert-parallel``: "use expert parallelism instead of tensor parallelism for MoE layers",
    vllm/config/parallel.py; the bytes per GPU are the same). vLLM only: refused (V010) for SGLang, whose expert
    parallelism llmc does not emit, and for a dense model."""
    stage: Name | None = None
    """Serve this stage's checkpoint. None = the last stage."""
    host: str | None = None
    """Address the engine's HTTP server binds: an IP address (``127.0.0.1``, ``0.0.0.0`` for every IPv4 interface,
    ``::``) or a host name. None = the engine's own default (vLLM: every interface; SGLang: 127.0.0.1). Neither
    engine authenticates requests unless told to (vLLM ``--api-key``): bind every interface only behind a firewall
    or an authenticating proxy."""
    served_model_name: ServedName | None = None
    """Model name the OpenAI-compatible API serves (the requests' ``model`` field): letters, digits, ``.``, ``_``,
    ``-``, in ``/``-separated parts (``org/model``). None = ``<spec name>-<stage>``."""

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        return None if value is None else serving_host(value)

    @field_validator("served_model_name")
    @classmethod
    def _served_name(cls, value: str | None) -> str | None:
        if value is None or (len(value) <= MAX_NAME_LEN and _SERVED_NAME_RE.fullmatch(value)):
            return value
        raise ValueError(f"must be simple names (letters, digits, '.', '_', '-', not starting with a symbol), "
                         f"optionally joined by '/' (org/model), at most {MAX_NAME_LEN} characters (got {value[:80]!r})")


# ----------------------------------------------------------------------------- evaluation


class Validation(SpecModel):
    """Held-out validation loss, measured every ``every_steps`` on every backend."""

    fraction: Float = Field(default=0.005, gt=0, lt=1)
    """Share of each text source's documents held out (by a hash of document index and seed)."""
    seed: Int = 0
    """Seed of the held-out split."""
    files: list[str] | None = None
    """Validation files instead of a split, relative to the spec file: JSON lines with a ``text`` field (``.jsonl`` /
    ``.json``) or text files, one document each (``.txt`` / ``.md``)."""
    every_steps: Int = Field(default=500, gt=0)
    """Optimizer steps between validations (and once at the end)."""
    max_batches: Int = Field(default=20, gt=0)
    """Global batches per validation (each the stage's batch of ``seq_len`` sequences, read in micro-batches), so
    the validation set is the same on every layout."""


#: An lm-evaluation-harness task, group or tag name as ``lm_eval --tasks`` takes it: the names its registry holds
#: (lm_eval 0.4.13 ``TaskManager().all_tasks``, 14,683 names) use letters, digits and ``_ - . ( )``; ``--tasks`` splits
#: at ``,`` and matches each entry against the registry with ``fnmatch`` (lm_eval/config/evaluate_config.py
#: ``process_tasks``, lm_eval/utils.py ``pattern_match``), so the glob characters ``* ? [ ] !`` are part of a name
#: too. Never a leading ``-``: the build passes the names as one ``--tasks`` argument, where argparse would take it for
#: an option.
EVAL_TASK_NAME = re.compile(r"[A-Za-z0-9_.()*?\[][A-Za-z0-9_.()*?\[\]!-]*")


def eval_task_name(value: str) -> str:
    """An ``eval.tasks`` entry: a local task file (``.yaml`` / ``.yml``, read and checked by ``llmc.spec.facts``) or
    a name lm-evaluation-harness could know (:data:`EVAL_TASK_NAME`); anything else would plan and build, and only
    ``lm_eval`` would refuse it, after the stages it evaluates have trained."""
    if value.endswith((".yaml", ".yml")) or EVAL_TASK_NAME.fullmatch(value):
        return value
    bad = next((c for c in value if not EVAL_TASK_NAME.fullmatch("a" + c)), value[:1])
    raise ValueError(f"{value[:80]!r} is not an lm-evaluation-harness task name (it holds {bad!r}): names are "
                     "letters, digits, _ - . ( ) and the globs * ? [ ] !, not starting with '-' (`lm-eval ls tasks` "
                     "lists them); a local task file ends in .yaml")


class Eval(SpecModel):
    """Evaluation: held-out loss during training and benchmark tasks after stages."""

    validation: Validation | None = None
    """Held-out validation loss. None = none."""
    tasks: list[Annotated[Label, Field(min_length=1), AfterValidator(eval_task_name)]] = Field(default_factory=list)
    """lm-evaluation-harness task names (letters, digits, ``_ - . ( )`` and the glob characters ``* ? [ ] !``) or
    local task / group YAML files (relative to the spec file). When every entry is a local file that lists no other
    task, lm-evaluation-harness indexes only those files' folders."""
    task_stages: list[str] | None = None
    """Stages whose final HF export is evaluated on ``tasks``. None = the last stage."""
    backend: Literal["hf", "vllm"] = "hf"
    """lm-evaluation-harness model backend."""
    batch_size: Int = Field(default=8, gt=0)
    """Evaluation batch size."""
    limit: Int | None = Field(default=None, gt=0)
    """At most this many documents per task. None = all."""
    every_checkpoints: Int | None = Field(default=None, gt=0)
    """Also score every K-th checkpoint of each evaluated stage on ``tasks`` (same suite, per step). None = off."""
    apply_chat_template: bool | None = None
    """Score ``tasks`` through the export's chat template (lm-evaluation-harness ``--apply_chat_template``, with
    few-shot examples as turns, ``--fewshot_as_multiturn``). None = exactly the stages whose export carries one
    (sft / dpo / grpo), so a chat model is scored on prompts laid out as it was trained and a pre-trained one on raw
    text; true / false = every evaluated stage."""


# ----------------------------------------------------------------------------- cluster site

#: Names the build's launchers set themselves (``llmc/templates``: launch/, slurm/, torchtitan/, deepspeed/), the
#: variables torchrun gives its workers (torch/distributed/run.py, "Environment variables"), the Kubeflow Trainer
#: torch plugin's ``PET_*`` and Slurm's / SkyPilot's own: ``cluster.env`` may not set them (the scripts would
#: overwrite or misread them).
RESERVED_ENV: frozenset[str] = frozenset({
    # the launch scripts'
    "BACKEND", "BUILD_DIR", "CDPATH", "CLAIM_BEAT_PID", "CLAIM_BEAT_S", "CLAIM_POLL_S", "CLAIM_STALE_S", "DS",
    "DS_ACCELERATOR", "DS_CONFIG", "DS_ENV_FILE", "DS_ENV_NAME", "DS_ENV_OUT", "DS_ENV_USER", "HEAD_NODE", "HERE",
    "HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HOSTFILE", "KEY", "LOCK", "LOG_NODE", "LOG_START", "MASTER_ADDR",
    "MASTER_PORT", "MULTI", "NATIVE", "NGPU", "NNODES", "NPROC", "NPROC_PER_NODE", "PREEMPTED", "PREPARE",
    "PREPARE_LOG", "PYTHONPATH", "RDZV", "RDZV_ID", "RDZV_JOIN_TIMEOUT", "RUN_DIR", "RUN_ID", "STAGE", "STAGE_LOG",
    "STEP_PID", "STOP", "TORCHRUN", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "WANDB_MODE",
    # torchrun's, to its workers; the device plugin's / Slurm's GPU list
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
    "ROLE_NAME", "ROLE_WORLD_SIZE", "CUDA_VISIBLE_DEVICES",
})
#: Prefixes of reserved names: llmc's own (``LLMC_*``), the Kubeflow Trainer torch plugin's (``PET_*``: torchrun's
#: options), torchelastic's (``TORCHELASTIC_*``), Slurm's (``SLURM_*``) and SkyPilot's (``SKYPILOT_*``).
RESERVED_ENV_PREFIXES: tuple[str, ...] = ("LLMC_", "PET_", "TORCHELASTIC_", "SLURM_", "SKYPILOT_")
_ENV_NAME_RE = re.compile(r"[A-Z_][A-Z0-9_]*")
# Kubernetes object names and label syntax (k8s.io/apimachinery/pkg/util/validation/validation.go;
# https://kubernetes.io/docs/concepts/overview/working-with-objects/names/ and .../labels/#syntax-and-character-set)
_DNS1123_LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_QUALIFIED_NAME_RE = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
# A container image reference as the kubelet's runtime parses it (github.com/distribution/reference, regexp.go and
# reference.go ``Parse``): [domain[:port]/]path[:tag][@digest], ASCII only (the grammar's classes are ASCII: Python's
# ``\w`` is not, hence re.ASCII), the name (domain and path) at most ``NameTotalLengthMax`` = 255 characters, and the
# digest one ``digest.Parse`` takes (github.com/opencontainers/go-digest algorithm.go: sha256 / sha384 / sha512, in
# lower-case hex of exactly 64 / 96 / 128 digits; any other algorithm is ErrDigestUnsupported)
_IMAGE_RE = re.compile(
    r"(?P<name>(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
    r"(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*(?::[0-9]+)?/)?"
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?::\w[\w.-]{0,127})?"
    r"(?:@(?:sha256:[a-f0-9]{64}|sha384:[a-f0-9]{96}|sha512:[a-f0-9]{128}))?", re.ASCII)
#: Most characters of an image reference's name, registry and repository path (distribution/reference
#: ``NameTotalLengthMax``).
MAX_IMAGE_NAME_LEN = 255
#: Most characters of the TrainJob's image (Kubeflow Trainer 2.3.0 CRD: ``spec.trainer.image`` maxLength 500).
MAX_IMAGE_LEN = 500
#: Most entries of the TrainJob's ``spec.trainer.env`` (Kubeflow Trainer 2.3.0 CRD: maxItems 128).
MAX_TRAINJOB_ENV = 128
#: The variables ``kubeflow/trainjob.yaml`` sets itself in ``spec.trainer.env``, before the site's.
TRAINJOB_OWN_ENV: tuple[str, ...] = ("LLMC_BUILD_DIR", "LLMC_RUN_DIR", "RUN_ID")
#: The most ``cluster.env`` may hold: the TrainJob's env less llmc's own entries.
MAX_SITE_ENV = MAX_TRAINJOB_ENV - len(TRAINJOB_OWN_ENV)
#: Most bytes of a pod's annotations, keys and values together (k8s.io/apimachinery, pkg/api/validation/objectmeta.go
#: ``TotalAnnotationSizeLimitB`` = 256 * 1024, summed over ``len(key) + len(value)``: UTF-8 bytes).
MAX_ANNOTATIONS_BYTES = 256 * 1024
#: Most tolerations of a pod the TrainJob may patch in (Kubeflow Trainer 2.3.0 CRD: maxItems 128).
MAX_TOLERATIONS = 128
#: The Kubernetes extended resource of each GPU vendor's device plugin (NVIDIA's, AMD's): what
#: ``kubeflow/trainjob.yaml`` asks for per node (``GpuOverrides.vendor``; the vendor is hardware data, in the lock).
K8S_GPU_RESOURCE: dict[str, str] = {"nvidia": "nvidia.com/gpu", "amd": "amd.com/gpu"}
#: SkyPilot 0.14.1's clouds (sky/skylet/constants.py ``ALL_CLOUDS``), the first part of a task's ``infra``.
SKYPILOT_CLOUDS: tuple[str, ...] = (
    "aws", "azure", "gcp", "ibm", "lambda", "scp", "oci", "kubernetes", "runpod", "vast", "vsphere", "cudo",
    "fluidstack", "paperspace", "primeintellect", "do", "nebius", "ssh", "slurm", "hyperbolic", "seeweb", "shadeform",
    "yotta", "mithril", "verda")
SkyPilotCloud = Literal[
    "aws", "azure", "gcp", "ibm", "lambda", "scp", "oci", "kubernetes", "runpod", "vast", "vsphere", "cudo",
    "fluidstack", "paperspace", "primeintellect", "do", "nebius", "ssh", "slurm", "hyperbolic", "seeweb", "shadeform",
    "yotta", "mithril", "verda"]
assert typing.get_args(SkyPilotCloud) == SKYPILOT_CLOUDS
#: Most GiB of memory-backed /dev/shm a pod may ask for (past any node's host memory).
MAX_SHM_GIB = MAX_HBM_GIB
#: Most devices of one extended resource per node (a device plugin advertises a few to a few hundred).
MAX_DEVICES_PER_NODE = 4096


def _shown(value: str) -> str:
    return repr(value[:80])


def env_name(value: str) -> str:
    """A ``cluster.env`` name: ``[A-Z_][A-Z0-9_]*`` (POSIX's portable environment names, upper-case as NCCL_* /
    FI_* / UCX_* are; XBD 8.1), not one llmc's launchers or launchers' launchers set (:data:`RESERVED_ENV`)."""
    if not _ENV_NAME_RE.fullmatch(value) or len(value) > 256:
        raise ValueError(f"environment variable name {_shown(value)} must be upper-case letters, digits and '_', "
                         "not starting with a digit (e.g. NCCL_IB_HCA)")
    if value in RESERVED_ENV or value.startswith(RESERVED_ENV_PREFIXES):
        raise ValueError(f"{value} is set by llmc's launchers (or by torchrun, Slurm, SkyPilot, Kubeflow Trainer) "
                         "themselves; set it when launching, or choose another variable")
    return value


def env_value(value: str) -> str:
    """An environment value: any text, newlines and tabs included, but no other control character (NUL cannot be
    in an environment at all; the rest would garble the scripts' and manifests' comments and logs)."""
    bad = next((c for c in value if not c.isprintable() and c not in "\n\t"), None)
    if bad is not None:
        raise ValueError(f"must be text without control characters other than newline and tab (found U+{ord(bad):04X})")
    if len(value) > 32768:
        raise ValueError("must be at most 32768 characters long")
    return value


def _matching(value: str, limit: int, pattern: re.Pattern, what: str, empty_ok: bool = False) -> str:
    """``value`` when it is at most ``limit`` characters and matches ``pattern`` whole (or is empty and
    ``empty_ok``), else ValueError "must be <what> (got ...)"."""
    if len(value) > limit or not (empty_ok and not value) and not pattern.fullmatch(value):
        raise ValueError(f"must be {what} (got {_shown(value)})")
    return value


def k8s_dns_label(value: str) -> str:
    """An RFC 1123 label, as Kubernetes names a namespace: lower-case letters, digits, '-', at most 63."""
    return _matching(value, 63, _DNS1123_LABEL_RE, "an RFC 1123 label: at most 63 lower-case letters, digits or "
                     "'-', starting and ending with a letter or digit")


def k8s_subdomain(value: str) -> str:
    """A DNS-1123 subdomain, as Kubernetes names most objects (a service account): at most 253 characters."""
    return _matching(value, 253, _DNS1123_SUBDOMAIN_RE, "a DNS-1123 subdomain: at most 253 lower-case letters, "
                     "digits, '-' or '.', each '.'-separated part starting and ending with a letter or digit")


def k8s_qualified_name(value: str, *, need_prefix: bool = False) -> str:
    """A Kubernetes label key / extended resource name: ``[prefix/]name``, the prefix a DNS-1123 subdomain, the name
    at most 63 letters, digits, '-', '_' or '.' starting and ending with a letter or digit."""
    prefix, slash, name = value.partition("/") if "/" in value else ("", "", value)
    ok = len(name) <= 63 and _QUALIFIED_NAME_RE.fullmatch(name) is not None
    if slash:
        ok = ok and len(prefix) <= 253 and _DNS1123_SUBDOMAIN_RE.fullmatch(prefix) is not None
    elif need_prefix:
        ok = False
    if not ok:
        form = "domain/name" if need_prefix else "[domain/]name"
        raise ValueError(f"must be a Kubernetes qualified name, {form}: the domain a DNS-1123 subdomain, the name at "
                         f"most 63 letters, digits, '-', '_' or '.' starting and ending with a letter or digit "
                         f"(got {_shown(value)})")
    return value


def k8s_label_value(value: str) -> str:
    """A Kubernetes label value (also a toleration's value): empty, or at most 63 letters, digits, '-', '_' or '.'
    starting and ending with a letter or digit."""
    return _matching(value, 63, _QUALIFIED_NAME_RE, "a Kubernetes label value: at most 63 letters, digits, '-', "
                     "'_' or '.', starting and ending with a letter or digit", empty_ok=True)


def k8s_extended_resource(value: str) -> str:
    """An extended resource name (a device plugin's, e.g. ``rdma/rdma_shared_device_a``, ``nvidia.com/hostdev``):
    a qualified name with a domain outside ``kubernetes.io`` (https://kubernetes.io/docs/concepts/configuration/
    manage-resources-containers/#extended-resources)."""
    k8s_qualified_name(value, need_prefix=True)
    domain = value.rpartition("/")[0]
    if domain == "kubernetes.io" or domain.endswith(".kubernetes.io") or domain.startswith("requests."):
        raise ValueError(f"an extended resource's domain may not be kubernetes.io nor start with 'requests.' (got "
                         f"{_shown(value)})")
    return value


def rdma_resource(value: str) -> str:
    """An extended resource of ``cluster.kubernetes.rdma_resources``: not a GPU's own (:data:`K8S_GPU_RESOURCE`),
    which the TrainJob already asks for, the plan's GPUs per node (``numProcPerNode`` is that figure too)."""
    k8s_extended_resource(value)
    if value in K8S_GPU_RESOURCE.values():
        raise ValueError(f"{value} is a GPU's own resource, which kubeflow/trainjob.yaml asks for itself (the plan's "
                         "GPUs per node, hardware.gpus_per_node): list only the RDMA devices here, e.g. "
                         "rdma/rdma_shared_device_a or nvidia.com/hostdev")
    return value


def image_reference(value: str) -> str:
    """A container image reference, ``[registry[:port]/]repository[:tag][@digest]`` (distribution/reference), at most
    :data:`MAX_IMAGE_LEN` characters (the TrainJob's) and its name at most :data:`MAX_IMAGE_NAME_LEN`."""
    _matching(value, MAX_IMAGE_LEN, _IMAGE_RE, f"a container image reference of at most {MAX_IMAGE_LEN} characters "
              "(the TrainJob's), [registry[:port]/]repository[:tag][@sha256:<64 lower-case hex digits>], ASCII, the "
              "repository in lower case")
    name = _IMAGE_RE.fullmatch(value)["name"]
    if len(name) > MAX_IMAGE_NAME_LEN:
        raise ValueError(f"must be a container image reference whose registry and repository are at most "
                         f"{MAX_IMAGE_NAME_LEN} characters (got {len(name)}: {_shown(value)})")
    return value


def site_word(value: str) -> str:
    """A region, zone or image id: printable text without spaces."""
    if not value or len(value) > 1024 or any(not c.isprintable() or c.isspace() for c in value):
        raise ValueError(f"must be printable text without spaces (got {_shown(value)})")
    return value


EnvName = Annotated[str, AfterValidator(env_name)]
EnvValue = Annotated[str, AfterValidator(env_value)]
K8sQualifiedName = Annotated[str, AfterValidator(k8s_qualified_name)]
K8sLabelValue = Annotated[str, AfterValidator(k8s_label_value)]
K8sResourceName = Annotated[str, AfterValidator(k8s_extended_resource)]
RdmaResourceName = Annotated[str, AfterValidator(rdma_resource)]
SiteWord = Annotated[str, AfterValidator(site_word)]


class Toleration(SpecModel):
    """A Kubernetes Toleration (core/v1), its fields spelled as Kubernetes spells them, so one is pasted as is
    (https://kubernetes.io/docs/concepts/scheduling-eviction/taint-and-toleration/)."""

    key: K8sQualifiedName | None = None
    """The taint key it matches. None = every key (then ``operator`` must be Exists)."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """Equal: the taint's value must be ``value``; Exists: any value (Kubernetes' default is Equal)."""
    value: K8sLabelValue | None = None
    """The taint value (a label value); only with ``operator: Equal``."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """The taint effect it matches. None = every effect."""
    tolerationSeconds: Int | None = Field(default=None, ge=0)  # Kubernetes' spelling
    """How long the pod stays bound after a NoExecute taint appears; only with ``effect: NoExecute``. None = for
    ever."""

    @model_validator(mode="after")
    def _as_kubernetes(self) -> Toleration:
        # the API server's rules (ValidateTolerations, pkg/apis/core/validation/validation.go)
        if self.key is None and self.operator != "Exists":
            raise ValueError("a toleration without a key must have operator: Exists")
        if self.operator == "Exists" and self.value:
            raise ValueError("a toleration with operator: Exists takes no value")
        if self.tolerationSeconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds needs effect: NoExecute")
        return self


class KubernetesSite(SpecModel):
    """The Kubernetes site of ``kubeflow/trainjob.yaml`` (a Kubeflow Trainer v2 TrainJob)."""

    image: str | None = None
    """The trainer container image (llmc with its runtime extras and the build at /workspace/build). None = a
    placeholder under registry.invalid, which never resolves."""
    namespace: str | None = None
    """The TrainJob's namespace (an RFC 1123 label). None = kubectl's current one."""
    shm_gib: Float | None = Field(default=None, gt=0, le=MAX_SHM_GIB)
    """GiB of memory-backed ``/dev/shm`` per pod (an emptyDir of medium Memory and that sizeLimit): a container's is
    64 MiB, too small for NCCL's shared-memory transport and DataLoader workers (NCCL, "Troubleshooting",
    Docker/shared memory). Counts against the pod's memory. None = the container's (warning X114 when the spec has this section)."""
    rdma_resources: dict[RdmaResourceName, Annotated[Int, Field(gt=0, le=MAX_DEVICES_PER_NODE)]] = Field(
        default_factory=dict)
    """Extended resources per node for the RDMA NICs, requested and limited alike, e.g.
    ``{rdma/rdma_shared_device_a: 1}`` (k8s-rdma-shared-dev-plugin) or ``{nvidia.com/hostdev: 8}``; not the GPU's own
    (``nvidia.com/gpu``, ``amd.com/gpu``: the TrainJob asks for the plan's GPUs per node itself)."""
    node_selector: dict[K8sQualifiedName, K8sLabelValue] = Field(default_factory=dict)
    """Node labels every pod's node must carry (the pod's nodeSelector)."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=MAX_TOLERATIONS)
    """Taints the pods tolerate (e.g. a GPU pool's ``nvidia.com/gpu: NoSchedule``)."""
    priority_class: str | None = None
    """Kueue WorkloadPriorityClass of the job (the TrainJob's ``kueue.x-k8s.io/priority-class`` label): the TrainJob
    v1alpha1 API patches no pod priorityClassName (a pod's PriorityClass is the training runtime's)."""
    queue: str | None = None
    """Kueue LocalQueue the job is submitted to (the ``kueue.x-k8s.io/queue-name`` label). None = none."""
    service_account: str | None = None
    """The pods' service account (a DNS-1123 subdomain). None = the namespace's default."""
    labels: dict[K8sQualifiedName, K8sLabelValue] = Field(default_factory=dict)
    """Labels of the pods (monitoring, network policies)."""
    annotations: dict[K8sQualifiedName, EnvValue] = Field(default_factory=dict)
    """Annotations of the pods, e.g. Multus' ``k8s.v1.cni.cncf.io/networks`` for the RDMA network; at most 256 KiB,
    keys and values together (the API server's limit)."""

    @field_validator("image")
    @classmethod
    def _image(cls, v: str | None) -> str | None:
        return None if v is None else image_reference(v)

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str | None) -> str | None:
        return None if v is None else k8s_dns_label(v)

    @field_validator("service_account")
    @classmethod
    def _service_account(cls, v: str | None) -> str | None:
        return None if v is None else k8s_subdomain(v)

    @field_validator("priority_class", "queue")
    @classmethod
    def _kueue_name(cls, v: str | None) -> str | None:
        # an object name carried as a label value: both rules
        return None if v is None else k8s_label_value(k8s_subdomain(v))

    @field_validator("annotations")
    @classmethod
    def _annotations_size(cls, v: dict[str, str]) -> dict[str, str]:
        size = sum(len(k.encode()) + len(x.encode()) for k, x in v.items())
        if size > MAX_ANNOTATIONS_BYTES:
            raise ValueError(f"must be at most {MAX_ANNOTATIONS_BYTES} bytes in all, keys and values (the API server's "
                             f"limit, 256 KiB; got {size}): keep large data in a ConfigMap")
        return v

    @field_validator("labels")
    @classmethod
    def _own_labels(cls, v: dict[str, str]) -> dict[str, str]:
        own = sorted(k for k in v if k == "app.kubernetes.io/managed-by" or k.startswith("kueue.x-k8s.io/"))
        if own:
            raise ValueError(f"label {own[0]} is llmc's (managed-by) or Kueue's (use priority_class / queue)")
        return v


class SkyPilotSite(SpecModel):
    """Where ``skypilot/task.yaml`` runs: the task's ``resources`` (SkyPilot 0.14.1,
    https://docs.skypilot.co/en/latest/reference/yaml-spec.html)."""

    network_tier: Literal["standard", "best"] | None = None
    """``best``: the cloud's high-performance interconnect where SkyPilot supports one (InfiniBand, GPUDirect-TCPX,
    EFA); SkyPilot's ``resources.network_tier`` (sky/utils/resources_utils.py ``NetworkTier``). None = standard."""
    use_spot: bool | None = None
    """Spot (preemptible) instances. None = SkyPilot's default (on-demand)."""
    cloud: SkyPilotCloud | None = None
    """The cloud (SkyPilot's names). With ``region`` and ``zone``, the task's ``infra`` (cloud/region/zone)."""
    region: SiteWord | None = None
    """Region (for ``kubernetes`` / ``ssh``: the context / node pool). None = any."""
    zone: SiteWord | None = None
    """Zone, within ``region``. None = any."""
    image_id: SiteWord | None = None
    """The machine image (an AMI, a GCP image, ``docker:<image>``). None = SkyPilot's."""

    @field_validator("region", "zone")
    @classmethod
    def _infra_part(cls, v: str | None, info: ValidationInfo) -> str | None:
        # cloud/region/zone become SkyPilot's infra string, '/'-separated (sky/utils/infra_utils.py), whose
        # kubernetes / ssh region (a context, a node pool) is the rest of the string and takes no zone
        one_part = info.data.get("cloud") in ("kubernetes", "ssh")
        if v is None:
            return v
        if v == "*" or "/" in v and not (info.field_name == "region" and one_part):
            raise ValueError(f"may not be '*' nor hold '/' (SkyPilot's infra separator) (got {_shown(v)})")
        if info.field_name == "zone" and (info.data.get("region") is None or one_part):
            raise ValueError("a zone needs a region (and a cloud other than kubernetes / ssh)")
        return v


class Cluster(SpecModel):
    """The site: what the cluster artifacts and launchers need to know about where they run."""

    kubernetes: KubernetesSite | None = None
    """``kubeflow/trainjob.yaml``'s image, namespace, /dev/shm, RDMA devices and scheduling."""
    skypilot: SkyPilotSite | None = None
    """``skypilot/task.yaml``'s network tier, spot, cloud / region / zone and image."""
    env: dict[EnvName, EnvValue] = Field(default_factory=dict)
    """Environment every launcher exports (a value already in the launch's environment wins) and the TrainJob and
    SkyPilot task set: the site's NCCL_* / FI_* / UCX_* / TORCH_NCCL_* settings, e.g. ``NCCL_IB_HCA: mlx5``,
    ``NCCL_SOCKET_IFNAME: eth0`` (https://docs.nvidia.com/deeplearning/nccl/user-guide/docs/env.html). At most 125
    entries (the TrainJob's ``env`` holds 128, 3 of them llmc's)."""

    @field_validator("env")
    @classmethod
    def _env_count(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > MAX_SITE_ENV:
            raise ValueError(f"must have at most {MAX_SITE_ENV} entries (got {len(v)}): the TrainJob's env holds "
                             f"{MAX_TRAINJOB_ENV} (Kubeflow Trainer's CRD), {len(TRAINJOB_OWN_ENV)} of them llmc's; "
                             "set the rest in the image")
        return v


class RunSpec(SpecModel):
    """A whole llmc run."""

    name: Name
    """Run name; used for job names and output folders (letters, digits, ``.``, ``_``, ``-``)."""
    model: Architecture
    """The resolved model architecture (the YAML may give a preset name, overrides or hf_config)."""
    data: Data
    """Pre-training data."""
    hardware: Hardware
    """Cluster."""
    budget: Budget = Field(default_factory=Budget)
    """Time and money limits."""
    training: Training = Field(default_factory=Training)
    """Training settings."""
    parallelism: Parallelism = Field(default_factory=Parallelism)
    """Parallelism pins (None = search)."""
    stages: list[Stage] = Field(default_factory=list)
    """Post-training / continued-training pipeline after (or instead of) the main pre-training."""
    serving: list[Serving] = Field(default_factory=list)
    """Serving targets."""
    eval: Eval | None = None
    """Validation loss and benchmark evals. None = none."""
    calibration: str | None = None
    """Path of a calibration JSON (``llmc calibrate``), relative to the spec file; its factors adjust time and memory."""
    cluster: Cluster | None = None
    """Site options of the cluster artifacts and launchers (image, /dev/shm, RDMA, scheduling, NCCL environment).
    None = none."""

    @property
    def pretrains(self) -> bool:
        """True when the run pre-trains on the top-level ``data``: no stages, or a ``pretrain`` stage (a pipeline of
        other stages starts from a trained base, and ``data`` / ``training`` then describe no run of their own)."""
        return not self.stages or any(st.kind == "pretrain" for st in self.stages)


__all__ = [
    "NAME_PATTERN", "MAX_NAME_LEN", "MAX_GPUS", "Name", "relative_folder", "ModelRef", "SourceKind", "TEXT_SOURCE_KINDS", "RECORD_SOURCE_KINDS", "BUILTIN_CORPORA", "Source", "Tokenizer", "Data", "Hardware", "Budget", "Optimizer", "Schedule",
    "Checkpoint", "LossSpike", "Training", "Parallelism", "StageKind", "STAGE_KINDS", "LM_KINDS", "CHAT_KINDS",
    "CONTINUED_KINDS", "POSTTRAIN_KINDS", "PREFERENCE_KINDS", "LoRA", "StageBase", "PretrainStage", "MidtrainStage", "LongContextStage", "SFTStage",
    "DPOStage", "GRPOStage", "STAGE_TYPES", "Stage", "make_stage", "Serving", "GpuOverrides", "RunSpec",
    "NearDup", "Decontaminate", "Quality", "Validation", "Eval", "Cluster", "KubernetesSite", "SkyPilotSite",
    "Toleration", "RESERVED_ENV", "RESERVED_ENV_PREFIXES", "SKYPILOT_CLOUDS", "K8S_GPU_RESOURCE",
]
