"""What one `instructglm eval` run found, and its two data files: `metrics.json`, `predictions.jsonl`.

`metrics.json` has one entry per evaluated model, keyed by its label (`base`, or the adapter's
directory name), each self-contained:

    {"base": {"model": BASE, "adapter": null, "template": T, "generation": {...},
              "data": {"path": ..., "sha256": ..., "rows": N, "format": ...},
              "bleu-4": ..., "rouge-1": ..., "rouge-2": ..., "rouge-l": ..., "exact_match": ...,
              "loss": ..., "perplexity": ..., "rows": N, "empty_predictions": ..., "answer_chars": ...,
              "answer_tokens": ..., "loss_tokens": ..., ..., "benchmark": {...}}, "adapter": {...}}

BLEU/ROUGE/exact match and benchmark accuracies are on a 0-100 scale; loss is in nats per token.
Values that do not exist (a loss when no row could be scored) are null.

`predictions.jsonl` has one line per evaluated row, in data order:

    {"row": i, "context": ..., "target": ..., "predictions": {label: answer},
     "scores": {label: {"bleu-4", "rouge-1", "rouge-2", "rouge-l", "exact_match", "loss"}}}

Answers are the generated text stripped of surrounding whitespace, which is what is scored.
Both files are written atomically (temp file beside the target, then renamed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instructglm.data.io import write_json, write_jsonl

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"
REPORT_FILE = "report.html"
OUTPUT_FILES = (METRICS_FILE, PREDICTIONS_FILE, REPORT_FILE)
# The headline numbers, in the order the table and the chart show them.
HEADLINE = ("bleu-4", "rouge-1", "rouge-2", "rouge-l", "exact_match", "loss", "perplexity")


@dataclass
class EvalData:
    """The evaluated rows and where they came from."""

    path: str
    sha256: str  # of the file's bytes
    format: str  # "converted" (a context/target jsonl) or the convert format it was read as
    template: str | None  # the template its prompts were rendered with, when known
    rows: list[dict[str, Any]]  # {"row" (0-based index in the file), "context", "target"}
    total_rows: int = 0  # rows in the file (more than `rows` under --max_rows)
    skipped: list[int] = field(default_factory=list)  # rows left out: prompt past the model's context

    def describe(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "format": self.format,
            "rows": len(self.rows),
            "file_rows": self.total_rows,
            "skipped_over_context": len(self.skipped),
            "skipped_rows": self.skipped[:100],
        }


@dataclass
class ModelResult:
    """One evaluated model: its corpus metrics, answers and per-row scores."""

    label: str
    model: str
    adapter: str | None
    metrics: dict[str, Any]
    answers: list[str]
    row_scores: list[dict[str, float | None]]
    benchmark: dict[str, Any] | None = None


@dataclass
class EvalResults:
    data: EvalData
    generation: dict[str, Any]
    models: list[ModelResult] = field(default_factory=list)

    def model(self, label: str) -> ModelResult:
        return next(m for m in self.models if m.label == label)


def finite_or_none(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return value


def metrics_document(results: EvalResults) -> dict[str, Any]:
    """The content of `metrics.json`."""
    document = {}
    for m in results.models:
        entry = {
            "model": m.model,
            "adapter": m.adapter,
            "template": results.data.template,
            "generation": results.generation,
            "data": results.data.describe(),
            **m.metrics,
        }
        if m.benchmark is not None:
            entry["benchmark"] = m.benchmark
        document[m.label] = entry
    return finite_or_none(document)


def prediction_lines(results: EvalResults):
    """The lines of `predictions.jsonl`, one dict per row."""
    for i, row in enumerate(results.data.rows):
        yield finite_or_none(
            {
                "row": row.get("row", i),
                "context": row["context"],
                "target": row["target"],
                "predictions": {m.label: m.answers[i] for m in results.models},
                "scores": {m.label: m.row_scores[i] for m in results.models},
            }
        )


def write_predictions(output_dir: str | Path, results: EvalResults) -> Path:
    """Write `predictions.jsonl` into `output_dir` atomically; return its path."""
    path = Path(output_dir) / PREDICTIONS_FILE
    write_jsonl(path, prediction_lines(results))
    return path


def write_metrics(output_dir: str | Path, results: EvalResults) -> Path:
    """Write `metrics.json` into `output_dir` atomically; return its path."""
    path = Path(output_dir) / METRICS_FILE
    write_json(path, metrics_document(results))
    return path


def write_results(output_dir: str | Path, results: EvalResults) -> tuple[Path, Path]:
    """Write `metrics.json` and `predictions.jsonl` (predictions first); return their paths."""
    predictions = write_predictions(output_dir, results)
    return write_metrics(output_dir, results), predictions
