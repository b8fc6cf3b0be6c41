"""Trainer callbacks: the loss plot and the non-finite loss guard."""

from __future__ import annotations

import math
import os

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from instructglm.layout import LOSS_PLOT_FILE


class LossPlotCallback(TrainerCallback):
    """Draw `loss.png` (training loss, and eval loss when there is an eval set) in `--output_dir`.

    The curve is read from `state.log_history`, which a resumed run restores from its checkpoint, so
    the plot of a resumed run covers the whole training. It is redrawn at every save and at the end.
    """

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_loss(state.log_history, os.path.join(args.output_dir, LOSS_PLOT_FILE))

    on_train_end = on_save


def plot_loss(log_history: list[dict], path: str) -> None:
    """Write a PNG of the `loss` and `eval_loss` entries of a Trainer log history."""
    # The object-oriented Agg API touches no pyplot global state (no backend switch, no open figures).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry]
        if points:
            steps, values = zip(*points)
            axes.plot(steps, values, marker="." if len(points) < 50 else None, label=label)
    if axes.lines:
        axes.legend()
    else:
        axes.text(0.5, 0.5, "no loss logged yet (--logging_steps > steps run)", ha="center", transform=axes.transAxes)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    figure.savefig(path)


class NonFiniteLossGuard(TrainerCallback):
    """Stop training at the first NaN/inf training loss, before it reaches the weights.

    The Trainer averages logged losses (and by default filters NaN out of them), so a diverged run
    can log plausible numbers while its weights turn to NaN and get checkpointed. This guard checks
    the loss of every forward pass in training mode and raises `FloatingPointError` at once: the
    optimizer never steps on it, nothing is saved after it, and the last checkpoint stays good.
    """

    def __init__(self) -> None:
        self._handle = None
        self._state = None
        self._output_dir = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._state, self._output_dir = state, args.output_dir
        if model is not None and self._handle is None:
            self._handle = model.register_forward_hook(self._check)

    def on_train_end(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _check(self, module, inputs, output) -> None:
        loss = getattr(output, "loss", None)
        if not module.training or loss is None or bool(torch.isfinite(loss.detach()).all()):
            return
        step = self._state.global_step + 1 if self._state is not None else "?"
        last = get_last_checkpoint(self._output_dir) if self._output_dir and os.path.isdir(self._output_dir) else None
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved before it"
        value = loss.detach().float().item() if loss.numel() == 1 else float("nan")
        raise FloatingPointError(
            f"training loss is {'nan' if math.isnan(value) else value} at step {step}: stopping before the optimizer "
            f"applies it; {kept} (resume with --resume_from_checkpoint). Likely causes: --learning_rate too high, "
            "fp16 overflow (try --bf16 or a lower --learning_rate), or a broken batch."
        )
