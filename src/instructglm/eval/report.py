"""`report.html`: one self-contained page comparing every evaluated model on the same rows.

The page needs nothing from the network: styles are inline and the charts are PNGs drawn with
matplotlib's object-oriented API on the Agg canvas (no pyplot, so no global figure state) and
embedded as base64 `data:` URLs. Every text that came from data or flags is HTML-escaped.

Sections: the run (data file, hash, rows, template, generation settings); the metrics table (one
column per model, the best value of each row in bold) and a bar chart of every metric per model;
the benchmark accuracies when one was scored; then the examples: each row's prompt, reference and
every model's answer side by side, with its per-row scores.

Example order. With the base and at least one adapter, rows are sorted by the first adapter's
ROUGE-L minus the base's (BLEU-4's difference breaks ties): the most improved rows first, then
the most hurt (worst first), then the rows where the two agree, in data order. With one kind of
model only, by the first model's ROUGE-L: best rows first, then the worst. At most `max_rows`
examples are shown, half from each end; predictions.jsonl has every row.
"""

from __future__ import annotations

import base64
import html
import io
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

from instructglm.data.io import atomic_write
from instructglm.eval.results import HEADLINE, REPORT_FILE, EvalResults

SORT_METRIC, TIE_METRIC = "rouge-l", "bleu-4"
LOWER_IS_BETTER = {"loss", "perplexity"}
COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", "Noto Sans", "Noto Sans CJK SC", sans-serif;
       margin: 24px; color: #222; background: #fff; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 28px; }
.meta { color: #555; font-size: 13px; margin: 2px 0; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best, td.summary { font-weight: bold; }
table.examples { table-layout: fixed; width: 100%; }
table.examples td { word-wrap: break-word; overflow-wrap: anywhere; }
pre { white-space: pre-wrap; margin: 0; font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12px; }
.scores { color: #666; font-size: 11px; margin-top: 4px; }
.up { color: #1a7f37; } .down { color: #b42318; }
img.chart { max-width: 100%; border: 1px solid #eee; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


# ---------------------------------------------------------------- charts


def _png(figure) -> str:
    """A figure as a base64 PNG, drawn on the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # labels in scripts the default font lacks (CJK adapter names) draw as boxes; say nothing
        warnings.filterwarnings("ignore", message="Glyph .* missing from")
        figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def bar_chart(labels: Sequence[str], series: dict[str, Sequence[float | None]], title: str = "") -> str:
    """Small multiples: one panel per entry of `series` (name -> one value per label), one bar per label.

    Returns the base64 PNG. A missing value draws no bar.
    """
    from matplotlib.figure import Figure

    panels = list(series.items())
    figure = Figure(figsize=(max(2.3 * len(panels), 4), 3.0))
    if title:
        figure.suptitle(title, fontsize=11)
    colors = [COLORS[i % len(COLORS)] for i in range(len(labels))]
    for index, (name, values) in enumerate(panels, 1):
        axes = figure.add_subplot(1, len(panels), index)
        heights = [v if v is not None and math.isfinite(v) else 0.0 for v in values]
        bars = axes.bar(range(len(labels)), heights, color=colors)
        for bar, value in zip(bars, values):
            axes.annotate(_number(value), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                          ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
        axes.set_title(name, fontsize=10)
        axes.set_xticks(range(len(labels)), [str(label)[:14] for label in labels], rotation=30, ha="right", fontsize=8)
        axes.tick_params(axis="y", labelsize=7)
        axes.margins(y=0.18)
        axes.set_ylim(bottom=0, top=None if any(heights) else 1)
        for side in ("top", "right"):
            axes.spines[side].set_visible(False)
    figure.tight_layout()
    return _png(figure)


# ---------------------------------------------------------------- example order


def order_rows(results: EvalResults, max_rows: int) -> tuple[str, list[tuple[str, list[int]]]]:
    """(how the rows are sorted, in words; the example sections and their row indices).

    See the module docstring for the order.
    """
    models = results.models
    n = len(results.data.rows)
    if not models or not n:
        return "", []
    base = next((m for m in models if m.adapter is None), None)
    adapter = next((m for m in models if m.adapter is not None), None)

    def score(m, i, metric):
        value = m.row_scores[i].get(metric)
        return value if value is not None else 0.0

    if base is not None and adapter is not None:
        keys = [(score(adapter, i, SORT_METRIC) - score(base, i, SORT_METRIC), score(adapter, i, TIE_METRIC) - score(base, i, TIE_METRIC)) for i in range(n)]
        names = (f"Most improved by {adapter.label} over {base.label}", f"Most hurt by {adapter.label}", "No change")
        note = (
            f"Rows are sorted by {adapter.label}'s {SORT_METRIC} minus {base.label}'s ({TIE_METRIC}'s difference breaks ties): "
            "the most improved first, then the most hurt (worst first), then the rows where they agree, in data order."
        )
        better = sorted((i for i in range(n) if keys[i] > (0, 0)), key=lambda i: keys[i], reverse=True)
        worse = sorted((i for i in range(n) if keys[i] < (0, 0)), key=lambda i: keys[i])
        same = [i for i in range(n) if keys[i] == (0, 0)]
    else:
        first = models[0]
        keys = [(score(first, i, SORT_METRIC), score(first, i, TIE_METRIC)) for i in range(n)]
        names = (f"Best rows of {first.label}", f"Worst rows of {first.label}", "Middle rows")
        note = f"Rows are sorted by {first.label}'s {SORT_METRIC} ({TIE_METRIC} breaks ties): the best first, then the worst (worst first)."
        ranked = sorted(range(n), key=lambda i: keys[i], reverse=True)
        half = (n + 1) // 2
        better, worse, same = ranked[:half], ranked[half:][::-1], []
    if n > max_rows:
        top = (max_rows + 1) // 2
        better, worse = better[:top], worse[: max_rows - min(top, len(better))]
        same = same[: max(0, max_rows - len(better) - len(worse))]
    return note, [(name, rows) for name, rows in zip(names, (better, worse, same)) if rows]


# ---------------------------------------------------------------- sections


def _metrics_table(results: EvalResults) -> str:
    labels = [m.label for m in results.models]
    rows = []
    for metric in HEADLINE + ("rows", "empty_predictions", "answer_chars", "answer_tokens", "loss_tokens"):
        values = [m.metrics.get(metric) for m in results.models]
        numeric = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        best = None
        if metric in HEADLINE and len(numeric) > 1:
            best = min(numeric) if metric in LOWER_IS_BETTER else max(numeric)
        cells = "".join(
            f'<td class="num{" best" if best is not None and v == best else ""}">{_e(_number(v))}</td>' for v in values
        )
        rows.append(f"<tr><th>{_e(metric)}</th>{cells}</tr>")
    head = "".join(f"<th>{_e(label)}</th>" for label in labels)
    models = "".join(
        f"<tr><th>{_e(m.label)}</th><td>{_e(m.model)}</td><td>{_e(m.adapter or '(none: the base model)')}</td></tr>"
        for m in results.models
    )
    return (
        f'<table class="metrics" id="metrics"><tr><th>metric</th>{head}</tr>{"".join(rows)}</table>'
        f'<p class="meta">BLEU-4 (characters), ROUGE-1/2/L (jieba words, F) and exact match are 0-100, averaged over rows '
        f"as THUDM's ptuning/main.py does; loss is the teacher-forced mean NLL per target token (nats), perplexity its exp. "
        f"Bold: the best model on that metric.</p>"
        f'<table class="models"><tr><th>label</th><th>model</th><th>adapter</th></tr>{models}</table>'
    )


def _benchmark_section(results: EvalResults) -> str:
    scored = [m for m in results.models if m.benchmark]
    if not scored:
        return ""
    first = scored[0].benchmark
    shot_keys = [k for k in first if k.endswith("-shot")]
    columns = [(m, k) for m in scored for k in shot_keys]
    head = "".join(f"<th>{_e(m.label)} {_e(k)}</th>" for m, k in columns)
    subjects = list(first[shot_keys[0]]["subjects"]) if shot_keys else []
    body = []
    for subject in subjects:
        cells = "".join(f'<td class="num">{_number(m.benchmark[k]["subjects"][subject]["accuracy"])}</td>' for m, k in columns)
        count = first[shot_keys[0]]["subjects"][subject]["questions"]
        body.append(f"<tr><th>{_e(subject)} <small>({count})</small></th>{cells}</tr>")
    for summary in ("average", "overall"):
        cells = "".join(f'<td class="num summary">{_number(m.benchmark[k][summary])}</td>' for m, k in columns)
        body.append(f"<tr><th>{summary}</th>{cells}</tr>")
    chart = bar_chart(
        [m.label for m in scored], {f"{k} average": [m.benchmark[k]["average"] for m in scored] for k in shot_keys}, "benchmark accuracy (%)"
    )
    dropped = [f"{m.label} {k}: {m.benchmark[k]['shots_dropped']}" for m, k in columns if m.benchmark[k]["shots_dropped"]]
    note = f'<p class="meta">Questions whose shots did not all fit the context (shots dropped from the end): {_e(", ".join(dropped))}</p>' if dropped else ""
    return (
        f"<h2>Benchmark: {_e(first['benchmark'])}</h2>"
        f'<p class="meta">{_e(first["path"])}, {_e(first["split"])} split; accuracy % by the log-likelihood of each option letter '
        f"(average: mean over subjects; overall: over all questions).</p>"
        f'<table class="benchmark" id="benchmark"><tr><th>subject</th>{head}</tr>{"".join(body)}</table>{note}'
        f'<img class="chart" alt="benchmark accuracy per model" src="data:image/png;base64,{chart}">'
    )


def _scores_line(scores: dict[str, Any]) -> str:
    parts = [f"{name} {_number(scores.get(name), 1)}" for name in ("bleu-4", "rouge-l", "exact_match")]
    parts.append(f"loss {_number(scores.get('loss'), 3)}")
    return " · ".join(parts)


def _examples_section(results: EvalResults, max_rows: int) -> str:
    note, sections = order_rows(results, max_rows)
    shown = sum(len(rows) for _, rows in sections)
    total = len(results.data.rows)
    base = next((m for m in results.models if m.adapter is None), None)
    head = "".join(f"<th>{_e(m.label)}</th>" for m in results.models)
    width = max(10, 70 // (2 + len(results.models)))
    parts = [
        "<h2>Examples</h2>",
        f'<p class="meta" id="order">{_e(note)} '
        f"Showing {shown} of {total} rows; predictions.jsonl has all of them.</p>",
    ]
    for name, rows in sections:
        body = []
        for i in rows:
            row = results.data.rows[i]
            answers = []
            for m in results.models:
                scores = m.row_scores[i]
                delta = ""
                if base is not None and m is not base:
                    change = (scores.get(SORT_METRIC) or 0.0) - (base.row_scores[i].get(SORT_METRIC) or 0.0)
                    if change:
                        delta = f' <span class="{"up" if change > 0 else "down"}">{SORT_METRIC} {change:+.1f}</span>'
                answers.append(f'<td><pre>{_e(m.answers[i])}</pre><div class="scores">{_e(_scores_line(scores))}{delta}</div></td>')
            body.append(
                f'<tr class="example" data-row="{i}"><td class="num">{i}</td><td><pre>{_e(row["context"])}</pre></td>'
                f'<td><pre>{_e(row["target"])}</pre></td>{"".join(answers)}</tr>'
            )
        parts.append(
            f"<h3>{_e(name)} ({len(rows)})</h3>"
            f'<table class="examples"><colgroup><col style="width:3em"><col style="width:{width + 8}%">'
            f'<col style="width:{width}%"></colgroup>'
            f"<tr><th>row</th><th>prompt</th><th>reference</th>{head}</tr>{''.join(body)}</table>"
        )
    return "".join(parts)


def render_report(results: EvalResults, max_rows: int = 100) -> str:
    """The whole page as a string."""
    data, generation = results.data, results.generation
    labels = [m.label for m in results.models]
    chart = bar_chart(labels, {metric: [m.metrics.get(metric) for m in results.models] for metric in HEADLINE}, "metrics per model")
    decoding = "sampled" if generation.get("do_sample") and generation.get("temperature", 0) > 0 else "greedy"
    settings = ", ".join(f"{k}={v}" for k, v in generation.items())
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>InstructGLM eval: {_e(', '.join(labels))}</title><style>{STYLE}</style></head><body>"
        f"<h1>Evaluation: {_e(' vs '.join(labels))}</h1>"
        f'<p class="meta">data: {_e(data.path)} ({len(data.rows)} rows evaluated of {data.total_rows}; read as {_e(data.format)}; '
        f"template {_e(data.template or 'unknown')}; sha256 {_e(data.sha256)})</p>"
        f'<p class="meta">generation: {decoding}, {_e(settings)}</p>'
        f"<h2>Metrics</h2>{_metrics_table(results)}"
        f'<img class="chart" id="chart" alt="every metric per model" src="data:image/png;base64,{chart}">'
        f"{_benchmark_section(results)}{_examples_section(results, max_rows)}"
        "</body></html>\n"
    )


def write_report(output_dir: str | Path, results: EvalResults, max_rows: int = 100) -> Path:
    """Write `report.html` into `output_dir` (atomically) and return its path."""
    path = Path(output_dir) / REPORT_FILE
    with atomic_write(path) as f:
        f.write(render_report(results, max_rows))
    return path
