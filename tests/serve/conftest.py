"""Tiny checkpoints shared by the serving tests (built once per session; see tests/infer/checkpoints.py)."""

from tests.infer.checkpoints import checkpoints, family, glm_adapter, glm_dir, llama_adapter, llama_dir  # noqa: F401  (fixtures)
