"""What both GLM tokenizers share: sentencepiece, imported only when a tokenizer is built, and the batched
encode path over `_encode_texts`."""

from __future__ import annotations

from typing import Any

from transformers import BatchEncoding, PreTrainedTokenizer
from transformers.tokenization_utils_base import TruncationStrategy
from transformers.utils import PaddingStrategy

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


class SentencePieceTokenizer(PreTrainedTokenizer):
    """A slow tokenizer over a sentencepiece model whose `_encode_texts(texts, as_pieces, split_special_tokens)`
    encodes a whole batch at once (each subclass: its own special tokens and preprocessing)."""

    # whether `split_special_tokens` applies to the text (ChatGLM-6B's added tokens); ChatGLM2/3 split nothing out
    splits_special_tokens_in_text = True

    def _encode_texts(self, texts, as_pieces: bool, split_special_tokens: bool) -> list[list]:
        raise NotImplementedError

    def _encode_plus(
        self,
        text: Any,
        text_pair: Any = None,
        add_special_tokens: bool = True,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        truncation_strategy: TruncationStrategy = TruncationStrategy.DO_NOT_TRUNCATE,
        max_length: int | None = None,
        stride: int = 0,
        is_split_into_words: bool = False,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: Any = None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
        return_overflowing_tokens: bool = False,
        return_special_tokens_mask: bool = False,
        return_length: bool = False,
        verbose: bool = True,
        **kwargs: Any,
    ) -> BatchEncoding:
        """A list of plain strings (and pairs) takes the batched path: one sentencepiece call for the batch, and
        no per-row padding pass when nothing is padded; everything else transformers' path."""
        options = dict(
            add_special_tokens=add_special_tokens,
            truncation_strategy=truncation_strategy,
            max_length=max_length,
            stride=stride,
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side,
            return_tensors=return_tensors,
            return_token_type_ids=return_token_type_ids,
            return_attention_mask=return_attention_mask,
            return_overflowing_tokens=return_overflowing_tokens,
            return_special_tokens_mask=return_special_tokens_mask,
            return_length=return_length,
            verbose=verbose,
        )
        split_special_tokens = kwargs.pop("split_special_tokens", self.split_special_tokens)
        if not kwargs.get("return_offsets_mapping"):
            kwargs.pop("return_offsets_mapping", None)  # any other extra option takes the base path
        if is_split_into_words or kwargs or not _all_str(text) or not (text_pair is None or _all_str(text_pair)):
            if self.splits_special_tokens_in_text:
                kwargs["split_special_tokens"] = split_special_tokens
            return super()._encode_plus(
                text,
                text_pair,
                padding_strategy=padding_strategy,
                is_split_into_words=is_split_into_words,
                **options,
                **kwargs,
            )
        if text_pair is not None and len(text_pair) != len(text):
            raise ValueError(
                f"`text` has {len(text)} texts but `text_pair` has {len(text_pair)}; give one pair per text."
            )
        everything = list(text) + list(text_pair or [])
        ids = self._encode_texts(everything, as_pieces=False, split_special_tokens=split_special_tokens)
        firsts, seconds = ids[: len(text)], ids[len(text) :] or [None] * len(text)

        simple = (
            truncation_strategy == TruncationStrategy.DO_NOT_TRUNCATE
            and not (return_token_type_ids or return_overflowing_tokens or return_special_tokens_mask or return_length)
        )
        if simple:
            if add_special_tokens:
                input_ids = [self.build_inputs_with_special_tokens(a, b) for a, b in zip(firsts, seconds)]
            else:
                input_ids = [a + b if b is not None else a for a, b in zip(firsts, seconds)]
            for row in input_ids:
                self._eventual_warn_about_too_long_sequence(row, max_length, verbose)
            outputs: dict[str, list] = {"input_ids": input_ids}
            if padding_strategy == PaddingStrategy.DO_NOT_PAD:
                # Nothing to pad: the mask is all ones (what `pad` would build, without its per-row cost).
                if return_attention_mask is not False:
                    outputs["attention_mask"] = [[1] * len(row) for row in input_ids]
                return BatchEncoding(outputs, tensor_type=return_tensors)
        else:
            outputs = {}
            for first, second in zip(firsts, seconds):
                row = self.prepare_for_model(
                    first,
                    pair_ids=second,
                    add_special_tokens=add_special_tokens,
                    truncation=truncation_strategy.value,
                    max_length=max_length,
                    stride=stride,
                    return_token_type_ids=return_token_type_ids,
                    return_attention_mask=False,
                    return_overflowing_tokens=return_overflowing_tokens,
                    return_special_tokens_mask=return_special_tokens_mask,
                    return_length=return_length,
                    verbose=verbose,
                )
                for key, value in row.items():
                    outputs.setdefault(key, []).append(value)
            if return_tensors and return_overflowing_tokens:
                outputs.pop("overflowing_tokens", None)
                outputs.pop("num_truncated_tokens", None)
        padded = self.pad(
            outputs,
            padding=padding_strategy.value,
            max_length=max_length,
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side,
            return_attention_mask=return_attention_mask,
        )
        return BatchEncoding(dict(padded), tensor_type=return_tensors)


def _all_str(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
