"""`instructglm train` with its save windows held open, for the fault tests (test code; the package never runs it).

    python tests/faults/train_with_slow_saves.py MARKERS DELAY <instructglm train flags>

Before each of these points it appends a line to the file MARKERS and sleeps DELAY seconds, so a test
that watches MARKERS can kill the process inside the window that follows:

- `checkpoint <step>`: inside the Trainer's checkpoint save, after the adapter is written and before
  the optimizer, scheduler, RNG and trainer state (trainer_state.json comes last);
- `final-save`: the final `Trainer.save_model` into the run dir's staging dir;
- `publish <name>`: before each rename of a final file from the staging dir into the run dir;
- `published`: after the last of them (the final adapter is whole; the process is about to end).
"""

from __future__ import annotations

import os
import sys
import time


def main() -> int:
    markers, delay, argv = sys.argv[1], float(sys.argv[2]), sys.argv[3:]

    def mark(event: str) -> None:
        with open(markers, "a", encoding="utf-8") as f:
            f.write(event + "\n")
        time.sleep(delay)

    from transformers import Trainer

    from instructglm.train import run_dir

    save_optimizer = Trainer._save_optimizer_and_scheduler
    save_model = Trainer.save_model

    def slow_save_optimizer(self, output_dir):
        mark(f"checkpoint {self.state.global_step}")
        return save_optimizer(self, output_dir)

    def slow_save_model(self, output_dir=None, _internal_call=False):
        if output_dir is not None and os.path.basename(output_dir) == run_dir.STAGING_DIR:
            mark("final-save")
        return save_model(self, output_dir, _internal_call)

    class SlowRenames:
        """`os` for run_dir, with a marked pause before each rename."""

        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def replace(src, dst):
            mark(f"publish {os.path.basename(dst)}")
            os.replace(src, dst)

    publish = run_dir.publish_staged_run

    def marked_publish(staging, output_dir):
        names = publish(staging, output_dir)
        mark("published")
        return names

    Trainer._save_optimizer_and_scheduler = slow_save_optimizer
    Trainer.save_model = slow_save_model
    run_dir.os = SlowRenames()
    run_dir.publish_staged_run = marked_publish

    from instructglm.cli import run_command

    return run_command("train", argv)


if __name__ == "__main__":
    sys.exit(main())
