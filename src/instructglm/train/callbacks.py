"""Trainer callbacks: the loss plot, the non-finite guard, and the run record in every checkpoint."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from instructglm.data.io import release, temp_sibling, write_json
from instructglm.errors import UserError
from instructglm.layout import LOSS_PLOT_FILE, RUN_CONFIG


class LossPlotCallback(TrainerCallback):
    """Draw `loss.png` (training loss, and eval loss when there is an eval set) in `--output_dir`.

    The curve is read from `state.log_history`, which a resumed run restores from its checkpoint, so
    the plot of a resumed run covers the whole training. It is redrawn at every save and at the end.
    """

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_loss(state.log_history, os.path.join(args.output_dir, LOSS_PLOT_FILE))

    on_train_end = on_save


GENERATION_CURVES = (("eval_bleu-4", "eval BLEU-4"), ("eval_rouge-l", "eval ROUGE-L"))


def plot_loss(log_history: list[dict], path: str) -> None:
    """Write a PNG of the `loss` and `eval_loss` entries of a Trainer log history, and beside them the
    eval BLEU-4 / ROUGE-L of `--eval_generate` when the history has them."""
    # The object-oriented Agg API touches no pyplot global state (no backend switch, no open figures).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def curve(key: str):
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry]
        return tuple(zip(*points)) if points else None

    generated = [(label, curve(key)) for key, label in GENERATION_CURVES if curve(key)]
    figure = Figure(figsize=(12 if generated else 7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 2 if generated else 1, 1)
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        if points := curve(key):
            axes.plot(*points, marker="." if len(points[0]) < 50 else None, label=label)
    if axes.lines:
        axes.legend()
    else:
        axes.text(0.5, 0.5, "no loss logged yet (--logging_steps > steps run)", ha="center", transform=axes.transAxes)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    if generated:
        scores = figure.add_subplot(1, 2, 2)
        for label, points in generated:
            scores.plot(*points, marker=".", label=label)
        scores.set_xlabel("step")
        scores.set_ylabel("score (0-100)")
        scores.legend()
        scores.grid(alpha=0.3)
    figure.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # Drawn beside and renamed: a kill while drawing never leaves a cut-off picture.
    # The temp name is io's, so a run killed while drawing leaves one the next run recognises and removes.
    tmp = temp_sibling(path)
    try:
        figure.savefig(str(tmp), format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        release(tmp)


class TrainingDiverged(UserError, FloatingPointError):
    """The loss or the gradients turned NaN/inf: the run stops before the optimizer applies them."""


class NonFiniteGuard(TrainerCallback):
    """Stop training at the first NaN/inf training loss or gradient, before it reaches the weights.

    The Trainer averages logged losses (and by default filters NaN out of them) and steps the
    optimizer on whatever gradient it has, so a diverged run can log plausible numbers while its
    weights turn to NaN or grow without bound (lr 1e9: an inf gradient norm at every step) and get
    checkpointed. This guard records a non-finite loss at every training forward pass, and before
    each optimizer step checks the gradients of the trainable (LoRA) tensors and their norm before
    clipping (clipping by an inf norm zeroes finite gradients, which would then pass). Under DDP, FSDP or
    DeepSpeed the two findings are summed over all processes, so every process stops at the same
    step (none is left waiting in a collective for one that stopped). It raises `TrainingDiverged`
    (a user error: one line, naming the step and the last checkpoint whose weights are finite).

    `check_grads=False` leaves gradients to a loss scaler (fp16), which skips the steps whose scaled
    gradients overflow and lowers the scale: inf gradients are routine there.
    """

    def __init__(self, check_grads: bool = True) -> None:
        self.check_grads = check_grads
        self._handle = None
        self._bad_loss: float | None = None
        self._grad_norm: float | None = None  # the step's pre-clip norm, from `InstructGLMTrainer`

    def record_grad_norm(self, grad_norm) -> None:
        """Take the gradient norm of the step about to be applied (global over processes, before clipping)."""
        self._grad_norm = None if grad_norm is None else float(grad_norm)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._bad_loss = None
        if model is not None and self._handle is None:
            self._handle = model.register_forward_hook(self._record_loss)

    def on_train_end(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _record_loss(self, module, inputs, output) -> None:
        loss = getattr(output, "loss", None)
        if module.training and loss is not None and not bool(torch.isfinite(loss.detach()).all()):
            self._bad_loss = loss.detach().float().item() if loss.numel() == 1 else float("nan")

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        bad_norm = self._grad_norm is not None and not math.isfinite(self._grad_norm)
        bad_grads = self.check_grads and (bad_norm or (model is not None and not _grads_finite(model)))
        self._grad_norm = None
        found = torch.tensor([self._bad_loss is not None, bad_grads], dtype=torch.float32, device=args.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and args.world_size > 1:
            torch.distributed.all_reduce(found)  # sum: on how many processes each was seen
        losses, grads = (int(n) for n in found.tolist())
        if losses or grads:
            raise TrainingDiverged(self._message(args, state, losses, grads))
        self._bad_loss = None

    def _message(self, args, state, losses: int, grads: int) -> str:
        from instructglm.train.run_dir import last_good_checkpoint

        step = state.global_step + 1
        if self._bad_loss is not None:
            value = "nan" if math.isnan(self._bad_loss) else self._bad_loss
            what = f"training loss is {value} at step {step}"
        elif losses:
            what = f"training loss is not finite at step {step} (on {losses} of {args.world_size} processes)"
        else:
            what = f"the gradients are not finite (gradient norm inf/nan) at step {step}, with a finite loss"
        good, broken = last_good_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else (None, [])
        skipped = f" (newer {', '.join(p.name for p in broken)} hold non-finite weights)" if broken else ""
        if good is not None:
            kept = f"the last good checkpoint is {good}{skipped} (resume with --resume_from_checkpoint {good} and a lower --learning_rate)"
        else:
            kept = f"no checkpoint with finite weights was saved before it{skipped}"
        return (
            f"{what}: stopping before the optimizer applies it; {kept}. Likely causes: --learning_rate too high, "
            "fp16 overflow (try --bf16 or a lower --learning_rate), or a broken batch."
        )


def _grads_finite(model) -> bool:
    """Whether every gradient this process holds for a trainable tensor is finite (one sync for all of them)."""
    checks = []
    for param in model.parameters():
        grad = param.grad
        if not param.requires_grad or grad is None:
            continue
        local = grad.to_local() if hasattr(grad, "to_local") else grad  # an FSDP2 DTensor: this process's shard
        if local.numel():
            checks.append(torch.isfinite(local).all())
    return bool(torch.stack(checks).all()) if checks else True


class RunRecordCallback(TrainerCallback):
    """Put the run's record (`instructglm_train.json`: template, LoRA, data, fingerprint) in every checkpoint.

    It is written as soon as the Trainer decides to save, before the Trainer writes the checkpoint's
    own files (trainer_state.json last): a checkpoint that looks whole always says whose run it is,
    and inference on a checkpoint finds its template. Saves decided later (the best-metric strategy)
    get it right after the Trainer's files.
    """

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record

    def _write(self, args, state) -> None:
        if not state.is_world_process_zero:
            return
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / RUN_CONFIG
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, {**self.record, "global_step": state.global_step}, default=str)

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            self._write(args, state)

    on_epoch_end = on_step_end

    def on_save(self, args, state, control, **kwargs):
        self._write(args, state)
