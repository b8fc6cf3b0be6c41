"""Names of the files one command writes and a later one reads back, defined once.

- `convert` writes `<jsonl>.meta.json` beside its jsonl (template, format, source, counts);
  `tokenize` and `train` read it.
- `tokenize` writes `instructglm_data.json` in the dataset directory; `train` reads it.
- `train` writes `instructglm_train.json`, `chatglm-lora.pt` and `loss.png` in the run directory;
  inference reads the template from the first, `merge` copies it, a `.pt` adapter's alpha comes from it.
- `predict` writes `<output>.predict.json` beside its predictions jsonl (the model, adapter, template,
  generation settings and input fingerprint its rows were made with); a resume reads it back and refuses
  other settings. (Not `.meta.json`: that is convert's sidecar, which tokenize reads.)
"""

from __future__ import annotations

import os

DATA_META = "instructglm_data.json"
RUN_CONFIG = "instructglm_train.json"
SEED_ADAPTER_FILE = "chatglm-lora.pt"
LOSS_PLOT_FILE = "loss.png"


def jsonl_meta_path(jsonl_path: str | os.PathLike) -> str:
    """Where convert puts the sidecar of a jsonl (tokenize and train read it from there)."""
    return f"{jsonl_path}.meta.json"


def predictions_meta_path(output_path: str | os.PathLike) -> str:
    """Where predict records the settings of the rows in its `--output` (a resume checks them)."""
    return f"{output_path}.predict.json"
