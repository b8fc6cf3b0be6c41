"""sentencepiece, which both GLM tokenizers are built on, imported only when a tokenizer is built."""

from __future__ import annotations

from instructglm.errors import MissingDependency


def import_sentencepiece(needed_by: str):
    """The `sentencepiece` module, imported on first use so that the tokenizer modules (which `import instructglm`
    registers with transformers' Auto classes) import without it, e.g. for model-only scripts.

    Raises:
        MissingDependency: sentencepiece is not installed, naming what needs it and the pip command.
    """
    try:
        import sentencepiece
    except ImportError as error:
        raise MissingDependency(
            f"{needed_by} needs the sentencepiece package, which is not installed: run pip install 'sentencepiece>=0.2'"
        ) from error
    return sentencepiece
