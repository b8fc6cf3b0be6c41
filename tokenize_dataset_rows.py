"""The 2023 InstructGLM command line, kept verbatim: `python tokenize_dataset_rows.py ...` = `instructglm tokenize ...`."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from instructglm.cli import run_command  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_command("tokenize", sys.argv[1:]))
