"""Evaluation: did the fine-tune help, and what did it cost? (`instructglm eval`)

- `metrics`: BLEU-4 / ROUGE-1/2/L / exact match as THUDM's ptuning/main.py computes them
  (`score_pair`, `score_predictions`).
- `perplexity`: teacher-forced loss and perplexity of the targets by training's label rule
  (`teacher_forced_loss`), and the log-likelihood helpers the benchmark scorer uses.
- `benchmark`: C-Eval / CMMLU / MMLU directories scored by the log-likelihood of each option
  letter (`load_benchmark`, `evaluate_benchmark`, `format_benchmark_table`).
- `results`: `metrics.json` and `predictions.jsonl` (`write_results`).
- `report`: the self-contained `report.html` (`write_report`).
- `evaluate`: the command, and `evaluate_generation` / `evaluate_models` / `load_eval_rows`.

Importing this package imports nothing heavy; each module imports torch and the `eval` extra
(jieba, rouge-chinese, nltk) only when its functions run.
"""
