"""Data quality before tokenization: exact dedup, MinHash near-dedup, benchmark decontamination (no torch).

API::

    from llmc.quality import QualityConfig, NearDupConfig, DecontamConfig, QualitySource, run_quality

    result = run_quality(
        [QualitySource("web", "/data/web", format="jsonl", text_field="text")],
        QualityConfig(exact=True, near_dup=NearDupConfig(), decontaminate=DecontamConfig(benchmarks=("mmlu.jsonl",)),
                      workers=8),
        "/data/clean",
    )
    result.outputs["web"]      # /data/clean/web: part-00000.jsonl ... ({"id", "text"} per line)
    result.report_path         # /data/clean/quality_report.json
    result.sources["web"].removed["near_dup"].documents

The cleaned outputs are ordinary llmc sources (``format: jsonl``, ``text_field: text``). See
:mod:`llmc.quality.pipeline` for the phases, resumability and the report layout,
:mod:`llmc.quality.config` for the defaults and their sources, and
:mod:`llmc.compiler.quality_math` for the LSH banding and cost math.
"""

from llmc.quality.config import DecontamConfig, NearDupConfig, QualityConfig, QualitySource
from llmc.quality.pipeline import QualityResult, Removal, SourceReport, WorkCount, run_quality

__all__ = ["DecontamConfig", "NearDupConfig", "QualityConfig", "QualityResult", "QualitySource", "Removal",
           "SourceReport", "WorkCount", "run_quality"]
