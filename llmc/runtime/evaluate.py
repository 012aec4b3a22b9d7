"""Benchmark evals of a Hugging Face model directory with EleutherAI lm-evaluation-harness (``hf`` backend).

API::

    from llmc.runtime.evaluate import EvalConfig, run_eval

    summary = run_eval(EvalConfig(model_dir="out/hf", tasks=("hellaswag", "evals/my_mc.yaml")), "out/eval")
    summary.metrics["my_mc"]["acc"]     # float
    summary.samples["my_mc"]           # documents evaluated
    summary.results_path               # out/eval/eval_results.json (lm_eval's results dict)

``tasks`` mixes registered lm_eval task names and paths to local task YAML files; a YAML file's
directory is added to lm_eval's ``include_path`` and its ``task:`` name is evaluated. A local
multiple-choice task needs no hub access when its dataset is a local file, e.g.::

    task: my_mc
    dataset_path: json
    dataset_kwargs: {data_files: {test: /data/my_mc.jsonl}}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "Question: {{question}}\\nAnswer:"
    doc_to_choice: "{{choices}}"
    doc_to_target: "{{answer}}"
    metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]

(lm-evaluation-harness task guide:
https://github.com/EleutherAI/lm-evaluation-harness/blob/main/docs/new_task_guide.md.) With
``offline=True`` (default) ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` are set before lm_eval is
imported, so nothing is downloaded. Metric names drop lm_eval's ``,none`` filter suffix
(``acc,none`` -> ``acc``); other filters keep it (``exact_match,strict-match``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and how."""

    model_dir: str
    """A ``save_pretrained`` directory (config.json, weights, tokenizer files)."""
    tasks: tuple[str, ...]
    """lm_eval task names and/or local task YAML paths."""
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "float32"
    num_fewshot: int | None = None
    limit: int | None = None
    """At most this many documents per task (None = all)."""
    seed: int = 1234
    offline: bool = True
    model_args: dict[str, Any] = field(default_factory=dict)
    """Extra ``HFLM`` arguments (e.g. ``max_length``, ``trust_remote_code``)."""


@dataclass(frozen=True)
class EvalSummary:
    results_path: Path
    metrics: dict[str, dict[str, float]]
    """task -> metric -> value (lm_eval's stderr entries appear as ``<metric>_stderr``)."""
    samples: dict[str, int]
    """task -> documents evaluated."""
    lm_eval_version: str


_TASK_LINE = re.compile(r"^task:\s*['\"]?([^'\"#\s]+)", re.MULTILINE)


def resolve_tasks(tasks: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(task names, include paths): YAML files become their ``task:`` name plus their directory."""
    names: list[str] = []
    include: list[str] = []
    for t in tasks:
        p = Path(t)
        if p.suffix in (".yaml", ".yml"):
            if not p.is_file():
                raise FileNotFoundError(f"eval task file {t} does not exist")
            m = _TASK_LINE.search(p.read_text(encoding="utf-8"))
            if m is None:
                raise ValueError(f"{t}: no top-level 'task:' name")
            names.append(m.group(1))
            d = str(p.resolve().parent)
            if d not in include:
                include.append(d)
        else:
            names.append(t)
    return names, include


def _metric_name(key: str) -> str:
    return key[: -len(",none")] if key.endswith(",none") else key


def run_eval(config: EvalConfig, out_dir: str | Path) -> EvalSummary:
    """Evaluate ``config.model_dir`` on ``config.tasks``; write ``<out_dir>/eval_results.json``."""
    if config.offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    if not (Path(config.model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{config.model_dir}: not a Hugging Face model directory (no config.json)")
    names, include = resolve_tasks(config.tasks)
    tm = TaskManager(include_path=include or None)
    model_args = {"pretrained": str(config.model_dir), "dtype": config.dtype, **config.model_args}
    results = lm_eval.simple_evaluate(
        model="hf", model_args=model_args, tasks=names, num_fewshot=config.num_fewshot,
        batch_size=config.batch_size, device=config.device, limit=config.limit, task_manager=tm,
        log_samples=False, random_seed=config.seed, numpy_random_seed=config.seed,
        torch_random_seed=config.seed, fewshot_random_seed=config.seed)
    if results is None:  # non-zero ranks under a distributed launch
        raise RuntimeError("lm_eval returned no results on this rank")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "eval_results.json"
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(results, indent=2, default=handle_non_serializable, sort_keys=True) + "\n")
    os.replace(tmp, path)

    metrics: dict[str, dict[str, float]] = {}
    for task, vals in results["results"].items():
        metrics[task] = {}
        for k, v in vals.items():
            if isinstance(v, bool) or not isinstance(v, int | float):
                continue
            metrics[task][_metric_name(k)] = float(v)
    samples: dict[str, int] = {}
    for task, n in results.get("n-samples", {}).items():
        samples[task] = int(n.get("effective", n.get("original", 0)) if isinstance(n, dict) else n)
    return EvalSummary(path, metrics, samples, getattr(lm_eval, "__version__", "unknown"))
