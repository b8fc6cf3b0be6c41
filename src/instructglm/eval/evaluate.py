"""`instructglm eval`: did the fine-tune help, and what did it cost? Base and adapters on the same rows.

    instructglm eval --model_name_or_path THUDM/chatglm-6b --adapter none output/alpaca \\
        --data data/test.jsonl --output_dir eval/alpaca [--benchmark data/ceval]

For every model — the base (`--adapter none`, or no `--adapter` at all) and each adapter — on the
same rows of `--data`:

- answers, generated in left-padded batches by the `predict` path (greedy by default,
  `--do_sample true` samples; every model starts from the same `--seed`), scored against the
  targets as THUDM's ptuning/main.py scores them: BLEU-4 (characters), ROUGE-1/2/L (jieba
  words), plus exact match and the mean answer length;
- the teacher-forced loss and perplexity of the targets, by training's rows and labels;
- with `--benchmark DIR`, multiple-choice accuracy on a C-Eval / CMMLU / MMLU directory,
  zero- and five-shot (`--benchmark_shots`), printed per subject side by side.

`--data` is a converted jsonl (`{"context", "target"}` per line, the output of `convert`), a
converted conversation jsonl (`convert --template messages`: `{"messages", "tools"}` per line, the
last assistant message the reference and the conversation before it the prompt), or any file
`convert` reads (Alpaca, BELLE, ShareGPT, ...), whose prompts are then rendered with `--template`
(default: the first adapter's training template, else the format's). Every model is prompted in its
family's format with its run's template (`instructglm.infer.prompts.Prompter`, as `chat` and `predict`
prompt it): a context as `tokenize` wrote it (a user message for ChatGLM3 / GLM-4 / chat-template
models), a conversation through the family's role tokens or chat template (a text family's through its
round template); a reply that is a tool call is scored as its text plus each call as a JSON line. The
base is loaded once; each adapter is attached to it and taken off again (peft), and every adapter is
checked against the base before any generation starts.

Written to `--output_dir` (each atomically): `metrics.json` (one entry per model, keyed by
`base` or the adapter's directory name), `predictions.jsonl` (every row with each model's answer
and scores) and `report.html` (tables, charts, examples side by side; opens offline).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

from instructglm.errors import BadValue, MissingFile, OutputExists
from instructglm.eval.metrics import require_eval_deps, score_predictions
from instructglm.eval.results import (
    METRICS_FILE,
    OUTPUT_FILES,
    EvalData,
    EvalResults,
    ModelResult,
    write_metrics,
    write_predictions,
)
from instructglm.infer.generate import BatchGenerationArguments, GenerationArguments
from instructglm.infer.load import DTYPES, LORA_ALPHA_HELP
from instructglm.infer.prompts import MESSAGES

BASE_LABEL = "base"
NO_ADAPTER = "none"
SHOWN_PROBLEMS = 3


@dataclass
class EvalArguments:
    model_name_or_path: str = field(metadata={"help": "Base model: a hub name or a local directory in the hub layout."})
    data: str = field(
        metadata={
            "help": "Rows to evaluate: a converted jsonl of {context, target}, or any file `convert` reads "
            "(its prompts are rendered with --template)."
        }
    )
    output_dir: str = field(metadata={"help": "Directory for metrics.json, predictions.jsonl and report.html."})
    adapter: list[str] = field(
        default_factory=list,
        metadata={
            "help": "LoRA adapters to evaluate (peft dirs or chatglm-lora.pt files), `none` for the base model; "
            "several values, or the flag repeated. Default: the base alone.",
            "action": "extend",
        },
    )
    template: Optional[str] = field(
        default=None,
        metadata={
            "help": "Template for rendering a --data file that is not a converted jsonl. Default: the first "
            "adapter's training template, else the format's default."
        },
    )
    lora_alpha: Optional[int] = field(default=None, metadata={"help": LORA_ALPHA_HELP + " Applies to every .pt --adapter."})
    dtype: str = field(default="auto", metadata={"help": f"Weights dtype: {', '.join(DTYPES)}."})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N, or auto (cuda when available)."})
    batch_size: int = field(default=8, metadata={"help": "Rows per generation and per loss/benchmark forward batch."})
    max_rows: Optional[int] = field(default=None, metadata={"help": "Evaluate only the first N rows of --data."})
    max_seq_length: Optional[int] = field(
        default=None,
        metadata={"help": "Longest row for the loss and the benchmark prompts, in tokens. Default: the model's context length."},
    )
    benchmark: Optional[str] = field(
        default=None, metadata={"help": "A C-Eval, CMMLU or MMLU data directory (per-subject CSV files) to score too."}
    )
    benchmark_split: str = field(
        default="auto", metadata={"help": "Benchmark split to score; auto: val for C-Eval (its test has no answers), else test."}
    )
    benchmark_shots: list[int] = field(
        default_factory=lambda: [0, 5], metadata={"help": "Few-shot counts to score the benchmark with (dev rows as examples)."}
    )
    benchmark_subjects: Optional[list[str]] = field(
        default=None, metadata={"help": "Only these benchmark subjects (file names without the split suffix)."}
    )
    report_rows: int = field(default=100, metadata={"help": "Most examples report.html shows (half most improved, half most hurt)."})
    seed: int = field(default=42, metadata={"help": "Random seed each model's generation starts from (matters with --do_sample)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace the outputs of an earlier eval in --output_dir."})

    def __post_init__(self):
        problems = []
        if self.dtype not in DTYPES:
            problems.append(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        for name in ("batch_size", "report_rows"):
            if getattr(self, name) < 1:
                problems.append(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_rows", "max_seq_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"--{name} must be at least 1, got {value}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            problems.append(f"--lora_alpha must be a positive number, got {self.lora_alpha}")
        if not 0 <= self.seed < 2**32:
            problems.append(f"--seed must be between 0 and 2**32 - 1, got {self.seed}")
        if any(k < 0 for k in self.benchmark_shots) or not self.benchmark_shots:
            problems.append(f"--benchmark_shots must be counts >= 0, got {self.benchmark_shots}")
        if problems:
            raise BadValue("; ".join(problems))


# Scored against references: greedy, bounded answers by default, by the same rule as `predict`.

ARGUMENTS = (EvalArguments, BatchGenerationArguments)


# ---------------------------------------------------------------- data


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _shown(problems: list[str]) -> str:
    more = f"; ... {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
    return "; ".join(problems[:SHOWN_PROBLEMS]) + more


def _saved_template(path: str | None) -> str | None:
    """The `template` a train run (or convert's sidecar) recorded in a JSON file, if any."""
    if not path or not Path(path).is_file():
        return None
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8")).get("template")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def adapter_template(adapter: str | None) -> str | None:
    """The template an adapter was trained with (its run's instructglm_train.json), if recorded."""
    from instructglm.infer.prompts import run_config_path

    found = run_config_path(adapter)
    return _saved_template(str(found)) if found else None


def load_eval_rows(path: str | Path, template: str | None = None, max_rows: int | None = None) -> EvalData:
    """The `{"context", "target"}` rows of `--data`, its hash, format and prompt template.

    A file whose first object has string `context` and `target` is a converted jsonl: used as is
    (its template from convert's sidecar, else recognised from the prompts, else unknown). A file whose
    first object has a `messages` list is a converted conversation jsonl: each row's last assistant
    message is the reference (`target`, its text and tool calls), the conversation before it the prompt
    (`conversation`; `context` shows it as text). Any other file goes through convert's readers and is
    rendered with `template` (default: the format's). Raises `MissingFile` / `BadValue` (`DataError`)
    naming the file, the bad lines and the fix.
    """
    from instructglm.data.convert import render
    from instructglm.data.io import iter_json_rows
    from instructglm.data.readers import FORMATS, describe_formats, detect_format, read_rows
    from instructglm.data.records import BadRow, DataError
    from instructglm.data.templates import detect_template, get_template
    from instructglm.layout import jsonl_meta_path

    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise MissingFile(f"--data {path} {what}: give a converted jsonl (instructglm convert) or a json/jsonl dataset file")
    raw = list(iter_json_rows(path))
    first = next((row for _, row in raw if isinstance(row, dict)), None)
    if first is None:
        raise DataError(f"--data {path}: no JSON object in it; give a converted jsonl or a dataset file convert reads")
    rows: list[dict[str, str]] = []
    problems: list[str] = []
    if isinstance(first.get("messages"), list):
        data_format, used_template = "messages", MESSAGES
        for location, row in raw:
            entry, problem = _conversation_row(row, len(rows))
            if problem:
                problems.append(f"{location}: {problem}")
            else:
                rows.append(entry)
    elif isinstance(first.get("context"), str) and isinstance(first.get("target"), str):
        data_format = "converted"
        for location, row in raw:
            if isinstance(row, BadRow):
                problems.append(f"{location}: {row}")
            elif not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("context", "target")):
                missing = [k for k in ("context", "target") if not isinstance(row, dict) or not isinstance(row.get(k), str)]
                problems.append(f"{location}: no string {' and '.join(missing)}")
            else:
                rows.append({"row": len(rows), "context": row["context"], "target": row["target"]})
        used_template = _saved_template(jsonl_meta_path(path)) or detect_template(r["context"] for r in rows)
        if template and template != used_template:
            print(
                f"eval: warning: --template {template!r} does not apply to {path}: it is a converted jsonl whose prompts "
                f"are already rendered (template {used_template or 'unknown'}); convert the source file again to change them",
                file=sys.stderr,
            )
    elif isinstance(first.get("context"), str):
        location = next(loc for loc, row in raw if row is first)
        raise DataError(
            f"--data {path}: {location} has a `context` but no string `target`: eval scores each answer against its "
            "reference, so every row needs one (to only generate answers, use `instructglm predict`, which needs only `context`)"
        )
    else:
        data_format = detect_format(first)
        if data_format is None:
            raise DataError(
                f"--data {path}: fields {', '.join(sorted(first))} are neither a converted jsonl's context/target nor "
                f"a format convert reads ({describe_formats()}); run `instructglm convert` on it first"
            )
        try:
            chosen = get_template(template or FORMATS[data_format].default_template)
        except ValueError as error:
            raise DataError(str(error)) from None
        used_template = chosen.name
        for location, example in read_rows(raw, data_format):
            if isinstance(example, BadRow):
                problems.append(f"{location}: {example}")
            else:
                rows.append({"row": len(rows), **render(example, chosen)})
    if problems:
        raise DataError(f"--data {path}: {len(problems)} unusable row(s): {_shown(problems)}; fix or drop them (instructglm convert skips and counts bad rows)")
    if not rows:
        raise DataError(f"--data {path}: no rows to evaluate")
    total = len(rows)
    return EvalData(str(path), _sha256(path), data_format, used_template, rows[:max_rows] if max_rows else rows, total)


def _conversation_row(row: Any, index: int) -> tuple[dict | None, str | None]:
    """(eval row, None) of a conversation line, or (None, what is wrong with it)."""
    from instructglm.data.messages import conversation_of
    from instructglm.data.records import BadRow
    from instructglm.infer.prompts import reply_text

    if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
        return None, "no `messages` list"
    try:
        conversation = conversation_of(row["messages"], row.get("tools"))
    except BadRow as bad:
        return None, bad.detail
    *prompt, reference = conversation.messages or (None,)
    if reference is None or reference.role != "assistant" or not prompt:
        return None, "the conversation does not end with an assistant message after the prompt (the reference to score)"
    shown = "\n".join(f"{m.role}: {reply_text(m) if m.role == 'assistant' else m.content}" for m in prompt)
    whole = {"messages": [m.to_dict() for m in conversation.messages], "tools": [dict(t) for t in conversation.tools]}
    return {"row": index, "context": shown, "target": reply_text(reference), "conversation": whole}, None


def row_prompt_ids(prompter: Any, row: dict) -> list[int]:
    """The prompt ids of an eval row: its conversation without the reference, else its context.

    Raises:
        BadValue: the model's format cannot show the conversation (tools for a text model, ...).
    """
    if "conversation" not in row:
        return prompter.context_ids(row["context"])
    from instructglm.data.messages import conversation_of

    conversation = conversation_of(row["conversation"]["messages"][:-1], row["conversation"]["tools"])
    return prompter.prompt_ids(conversation.messages, conversation.tools)


def _loss_conversations(rows: Sequence[dict]) -> list | None:
    """The whole conversations of conversation rows (for the loss), None for context rows."""
    if not rows or "conversation" not in rows[0]:
        return None
    from instructglm.data.messages import Conversation
    from instructglm.data.records import BadRow

    conversations = []
    for row in rows:
        try:
            conversations.append(Conversation.from_dict(row["conversation"]))
        except BadRow:  # nothing training could learn from it: it scores no loss (counted as dropped)
            conversations.append(None)
    return conversations


# ---------------------------------------------------------------- models


def model_labels(adapters: Sequence[str | None]) -> list[str]:
    """`base` for None, else the adapter's directory name (a file: its directory/file name), made unique
    by more of the path, then by a number."""
    paths = [None if a is None else Path(a).resolve() for a in adapters]

    def name(p: Path | None, depth: int) -> str:
        if p is None:
            return BASE_LABEL
        parts = p.parts[-depth:] if p.is_dir() else p.parts[-depth - 1 :]
        return "/".join(parts)

    depths = [1] * len(paths)
    labels = [name(p, d) for p, d in zip(paths, depths)]
    for _ in range(max((len(p.parts) for p in paths if p), default=0)):
        clashes = {label for label in labels if labels.count(label) > 1 or (label == BASE_LABEL)}
        changed = False
        for i, p in enumerate(paths):
            if p is not None and labels[i] in clashes and depths[i] < len(p.parts):
                depths[i] += 1
                labels[i] = name(p, depths[i])
                changed = True
        if not changed:
            break
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return unique


def parse_adapters(values: Sequence[str]) -> list[str | None]:
    """The `--adapter` values as paths, None for `none` (the base); the base alone when none is given."""
    adapters: list[str | None] = [None if v.strip().lower() == NO_ADAPTER else v for v in values] or [None]
    problems = []
    seen = set()
    for value in adapters:
        key = None if value is None else Path(value).resolve()
        if key in seen:
            problems.append(f"{value or NO_ADAPTER} is given twice")
        seen.add(key)
        if value is not None and not Path(value).exists():
            problems.append(f"{value} does not exist")
    if problems:
        raise BadValue(f"--adapter: {'; '.join(problems)} (give peft adapter dirs or chatglm-lora.pt files, and `none` for the base)")
    return adapters


def _one_line(text: Any, shown: int = 2) -> str:
    """A multi-line message (a headline, one line per tensor, a closing hint) as one line: the
    headline, the first `shown` details, how many more, and the hint."""
    lines = [part.strip() for part in str(text).splitlines() if part.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    head, details = lines[0].rstrip(":"), lines[1:]
    hint = details.pop() if details[-1].startswith("(") else ""
    more = f"; ... {len(details) - shown} more" if len(details) > shown else ""
    return f"{head}: {'; '.join(details[:shown])}{more}" + (f" {hint}" if hint else "")


def attach_adapter(base: Any, adapter: str, lora_alpha: int | None = None) -> Any:
    """`base` wrapped with `adapter` for inference (peft); `detach_adapter` gives the base back.

    Raises:
        BadValue: the adapter does not fit the base (missing, unexpected or mis-shaped tensors,
            targets the base lacks), in one line naming the adapter.
        MissingFile: the path holds no adapter.
    """
    import pickle

    from instructglm.infer.load import warn_assumed_alpha
    from instructglm.models.loading import is_unreadable_weights
    from instructglm.models.lora import load_adapter

    if lora_alpha is None:
        warn_assumed_alpha(adapter)
    try:
        model = load_adapter(base, adapter, is_trainable=False, lora_alpha=lora_alpha)
    except FileNotFoundError as error:
        raise MissingFile(f"--adapter {adapter}: {_one_line(error)}") from error
    except ValueError as error:  # load_adapter's documented errors: a refused or broken file, or a mismatch
        cause = error.__cause__
        if isinstance(cause, pickle.UnpicklingError):
            raise BadValue(f"--adapter {adapter} was refused as unsafe: {_one_line(error)}") from error
        if cause is not None and is_unreadable_weights(cause):
            raise BadValue(f"--adapter {adapter} cannot be read: {_one_line(error)}") from error
        raise BadValue(f"--adapter {adapter} does not fit --model_name_or_path: {_one_line(error)}") from error
    model.eval()
    return model


def detach_adapter(model: Any) -> Any:
    """The base model back from a `PeftModel`: LoRA layers replaced by the original ones, weights untouched."""
    return model.unload()


def evaluate_generation(
    model: Any,
    prompter: Any,
    rows: Sequence[dict[str, Any]],
    settings: GenerationArguments,
    batch_size: int = 8,
    loss: bool = True,
    max_seq_length: int | None = None,
    seed: int | None = None,
) -> tuple[dict[str, Any], list[str], list[dict[str, float | None]]]:
    """Generate an answer for every row and score it; optionally the teacher-forced loss too.

    Args:
        model: a loaded model (base or `PeftModel`) in eval mode.
        prompter: its `instructglm.infer.prompts.Prompter` (the family's format, the run's template; its
            tokenizer pads on the left, as `instructglm.infer.load.load_model` sets it up).
        rows: `{"context", "target"}` dicts (with `conversation` for a conversation jsonl's rows).
        settings: decoding settings (`GenerationArguments`).
        batch_size: prompts per generation batch (and rows per loss batch).
        loss: also compute loss/perplexity (`teacher_forced_loss`).
        max_seq_length: longest loss row; default the model's context length.
        seed: reseed before generating (so sampled runs of several models start alike).

    Returns:
        (corpus metrics: `bleu-4`, `rouge-1`, `rouge-2`, `rouge-l`, `exact_match` (0-100),
        `rows`, `empty_predictions`, `empty_references`, `answer_chars`, `reference_chars`,
        `answer_tokens`, `prompts_over_context`, and with `loss` also `loss`, `perplexity`, `loss_tokens`, ...;
        the stripped answers; per-row scores with `loss`).

    Raises:
        BadValue: a row the model's format cannot show (`rows_that_fit` leaves those out).
    """
    from tqdm.auto import tqdm

    from instructglm.eval.perplexity import sequence_limit
    from instructglm.infer.engine import generate_batch
    from instructglm.infer.prompts import reply_text

    require_eval_deps()
    if seed is not None:
        from transformers import set_seed

        set_seed(seed)
    tokenizer = prompter.tokenizer
    prompts = [row_prompt_ids(prompter, row) for row in rows]
    # Batches of similar prompt length waste less on padding; answers go back to data order.
    lengths = [len(ids) for ids in prompts]
    order = sorted(range(len(rows)), key=lambda i: lengths[i])
    limit = sequence_limit(model)
    budget = settings.max_new_tokens or 1
    over = sum(length + budget > limit for length in lengths)
    if over:
        print(
            f"eval: warning: {over} prompt(s) plus --max_new_tokens {budget} exceed the model's {limit} positions; "
            "their answers come from beyond the length it was built for (counted as prompts_over_context)",
            file=sys.stderr,
        )
    answers: list[str] = [""] * len(rows)
    tokens: list[int] = [0] * len(rows)
    with tqdm(total=len(rows), unit="row", desc="generate", disable=None) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            for i, completion in zip(chunk, generate_batch(model, tokenizer, [prompts[i] for i in chunk], settings, prompter)):
                answers[i], tokens[i] = reply_text(prompter.reply(completion.text)).strip(), completion.completion_tokens
            bar.update(len(chunk))
    metrics, scored = score_predictions(answers, [row["target"].strip() for row in rows])
    metrics["answer_tokens"] = sum(tokens) / len(tokens) if tokens else 0.0
    metrics["prompts_over_context"] = over
    row_scores: list[dict[str, float | None]] = [s.as_dict() for s in scored]
    if loss:
        from instructglm.eval.perplexity import teacher_forced_loss

        contexts, targets = [row["context"] for row in rows], [row["target"] for row in rows]
        result = teacher_forced_loss(model, tokenizer, contexts, targets, max_seq_length, batch_size, _loss_conversations(rows))
        metrics.update(result.summary())
        for scores, row_loss in zip(row_scores, result.row_losses):
            scores["loss"] = row_loss
    return metrics, answers, row_scores


def evaluate_models(
    model_name_or_path: str,
    adapters: Sequence[str | None],
    data: EvalData,
    settings: GenerationArguments,
    args: EvalArguments | None = None,
    benchmark: Any = None,
) -> EvalResults:
    """Load the base once and evaluate it (for None) and each adapter on `data` (and `benchmark`).

    Every adapter is attached and detached once up front, so a mismatched one fails before any
    generation; each model is prompted with its own run's template (`prompter_for`). `args` supplies
    dtype, device, batch size, seed, lengths and benchmark shots.
    """
    from instructglm.eval.benchmark import evaluate_benchmark
    from instructglm.infer.load import load_model
    from instructglm.infer.prompts import prompter_for

    args = args or EvalArguments(model_name_or_path=model_name_or_path, data=data.path, output_dir="")
    labels = model_labels(adapters)
    base, tokenizer, _ = load_model(model_name_or_path, None, args.dtype, args.device)
    for adapter in adapters:
        if adapter is not None:
            base = detach_adapter(attach_adapter(base, adapter, args.lora_alpha))
    prompters = [prompter_for(base, tokenizer, adapter, model_name_or_path) for adapter in adapters]
    data = rows_that_fit(data, prompters, base)
    results = EvalResults(data=data, generation={**asdict(settings), "seed": args.seed})
    for label, adapter, prompter in zip(labels, adapters, prompters):
        print(f"eval: {label}: {len(data.rows)} rows" + (f" (adapter {adapter})" if adapter else ""), file=sys.stderr, flush=True)
        model = base if adapter is None else attach_adapter(base, adapter, args.lora_alpha)
        metrics, answers, row_scores = evaluate_generation(
            model, prompter, data.rows, settings, args.batch_size, True, args.max_seq_length, args.seed
        )
        metrics["family"], metrics["prompt_template"] = prompter.family.name, prompter.name
        scores = None
        if benchmark is not None:
            scores = evaluate_benchmark(model, tokenizer, benchmark, args.benchmark_shots, args.batch_size, args.max_seq_length)
        results.models.append(ModelResult(label, model_name_or_path, adapter, metrics, answers, row_scores, scores))
        if adapter is not None:
            base = detach_adapter(model)
    return results


def rows_that_fit(data: EvalData, prompters: Sequence[Any], model: Any) -> EvalData:
    """`data` without the rows some model cannot be asked: a prompt that alone fills the model's context,
    or a conversation a model's format cannot show (tools for a text model).

    Such a prompt cannot be answered within the length the model was built for, and a very long
    one (a 1 MB context) would try to allocate its whole attention at once; these rows are left
    out of every model's scores alike, counted and located (`EvalData.skipped`), with a warning.
    Prompts that fit but leave less room than --max_new_tokens are generated and counted as
    `prompts_over_context` (see `evaluate_generation`).
    """
    from instructglm.eval.perplexity import sequence_limit
    from instructglm.infer.predict import text_problem

    limit = sequence_limit(model)
    kept, skipped, reasons = [], [], set()
    for row in data.rows:
        problem = next((p for k in ("context", "target", "conversation") if (p := text_problem(row.get(k), k))), None)
        if problem is not None:  # a tokenizer cannot encode it (nor UTF-8 write it)
            problem = "they are not valid text (a lone UTF-16 surrogate escape, e.g. \\ud83d)"
        for prompter in prompters if problem is None else ():
            try:
                if len(row_prompt_ids(prompter, row)) >= limit:
                    problem = f"their prompt alone fills the model's context of {limit} tokens"
            except BadValue as error:
                problem = f"a model cannot be prompted with them ({error})"
            if problem:
                break
        if problem:
            skipped.append(row["row"])
            reasons.add(problem)
        else:
            kept.append(row)
    if not skipped:
        return data
    if not kept:
        raise BadValue(f"--data {data.path}: no row can be evaluated: {'; '.join(sorted(reasons))}")
    print(
        f"eval: warning: {len(skipped)} row(s) of {data.path} are left out: {'; '.join(sorted(reasons))} "
        f"(rows {', '.join(map(str, skipped[:5]))}{', ...' if len(skipped) > 5 else ''})",
        file=sys.stderr,
    )
    return replace(data, rows=kept, skipped=skipped)


# ---------------------------------------------------------------- the command


def _check_output_dir(output_dir: Path, overwrite: bool, data_path: str) -> None:
    """Refuse a file, earlier outputs without --overwrite, --data as one of the outputs, an unwritable dir."""
    if output_dir.exists() and not output_dir.is_dir():
        raise BadValue(f"--output_dir {output_dir} is a file; give a directory")
    for name in OUTPUT_FILES:
        target = output_dir / name
        if target.exists() and Path(data_path).exists() and os.path.samefile(target, data_path):
            raise BadValue(f"--data {data_path} is {target}, which this eval would overwrite; choose another --output_dir")
    existing = [name for name in OUTPUT_FILES if (output_dir / name).exists()]
    if existing and not overwrite:
        raise OutputExists(
            f"--output_dir {output_dir} already holds {', '.join(existing)} (from an earlier eval, or other files of "
            "those names); pass --overwrite true to replace them, or choose another --output_dir"
        )
    # find out now, not after every model has generated, that the results cannot be written
    nearest = next(p for p in (output_dir, *output_dir.absolute().parents) if p.exists())
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise BadValue(f"--output_dir {output_dir}: {nearest} is not writable; choose another --output_dir")


def write_outputs(output_dir: Path, results: EvalResults, report_rows: int) -> Path:
    """predictions.jsonl, report.html, then metrics.json, each atomically, earlier outputs removed first.

    metrics.json is written last and removed first, so a directory holding it holds a complete set
    from one run; a kill or a full disk in between leaves no metrics.json rather than a mix.
    """
    from instructglm.eval.report import write_report

    output_dir.mkdir(parents=True, exist_ok=True)
    for name in (METRICS_FILE, *OUTPUT_FILES):
        (output_dir / name).unlink(missing_ok=True)
    write_predictions(output_dir, results)
    report = write_report(output_dir, results, report_rows)
    write_metrics(output_dir, results)
    return report


def _warn_template_mismatch(data: EvalData, adapters: Sequence[str | None]) -> None:
    if data.format == "messages":  # conversations are prompted in each model's own format
        return
    for adapter in adapters:
        trained = adapter_template(adapter)
        if trained and data.template and trained != data.template:
            print(
                f"eval: warning: {adapter} was trained with template {trained!r}, but the --data prompts use "
                f"{data.template!r}; its scores may say more about the prompt than the model",
                file=sys.stderr,
            )


def _summary_table(results: EvalResults) -> str:
    names = ("bleu-4", "rouge-l", "exact_match", "loss", "perplexity")
    width = max(len(m.label) for m in results.models)
    lines = [f"{'model':<{width}}  " + "  ".join(f"{n:>11}" for n in names)]
    for m in results.models:
        cells = []
        for n in names:
            value = m.metrics.get(n)
            cells.append(f"{value:>11.2f}" if isinstance(value, float) else f"{'-':>11}")
        lines.append(f"{m.label:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def main(args: EvalArguments, settings: BatchGenerationArguments) -> int:
    from instructglm.eval.benchmark import format_benchmark_table, load_benchmark

    require_eval_deps()  # before any model loads: a missing extra fails in a second, not after generation
    output_dir = Path(args.output_dir)
    _check_output_dir(output_dir, args.overwrite, args.data)
    adapters = parse_adapters(args.adapter)
    first_adapter = next((a for a in adapters if a is not None), None)
    data = load_eval_rows(args.data, args.template or adapter_template(first_adapter), args.max_rows)
    _warn_template_mismatch(data, adapters)
    benchmark = None
    if args.benchmark:
        benchmark = load_benchmark(args.benchmark, args.benchmark_split, args.benchmark_subjects)
    results = evaluate_models(args.model_name_or_path, adapters, data, settings, args, benchmark)
    report = write_outputs(output_dir, results, args.report_rows)
    print(_summary_table(results))
    if benchmark is not None:
        print()
        print(format_benchmark_table({m.label: m.benchmark for m in results.models}))
    print(f"\neval: {len(data.rows)} rows x {len(results.models)} model(s); wrote {output_dir / 'metrics.json'}, "
          f"{output_dir / 'predictions.jsonl'} and {report}")
    return 0


if __name__ == "__main__":
    from instructglm.cli import COMMANDS, run_command

    COMMANDS.setdefault("eval", ("instructglm.eval.evaluate", "evaluate base and adapters: metrics, loss, benchmarks, report"))
    sys.exit(run_command("eval", sys.argv[1:]))
