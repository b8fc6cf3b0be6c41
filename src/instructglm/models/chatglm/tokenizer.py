"""ChatGLM-6B tokenizer, written for current transformers from the behaviour of THUDM's final one.

Reference: THUDM `chatglm-6b` `tokenization_chatglm.py` (ChatGLMTokenizer + SPTokenizer, 2023-05)
as it ran under transformers 4.33. Its observable behaviour, pinned by
`fixtures/chatglm6b/tokenizer_golden.json`, is:

- Text is rewritten before sentencepiece: "\\n" -> "<n>", "\\t" -> "<|tab|>", and each run of
  2..80 spaces -> "<|blank_n|>" (a run longer than 80 becomes "<|blank_80|>" pieces plus the rest).
  Decoding undoes it.
- The named special tokens (<sop>, <eop>, <unk>, <pad>, [MASK]) found in user text are split out
  as whole tokens and swallow the whitespace on both sides (transformers <= 4.33 did this for
  special tokens given as plain strings); every other segment is encoded on its own, so it gets
  its own sentencepiece dummy prefix "▁". [gMASK], [sMASK] and </s> are *not* split out: in user
  text they are ordinary characters.
- `encode(a)` = A + [gMASK, <sop>]; `encode(a, b)` = A + [gMASK, <sop>] + B + [<eop>].
- `decode` removes <pad>, then sentencepiece-decodes (control pieces such as <sop> decode to
  nothing, <unk> to " ⁇ ") and applies transformers' `clean_up_tokenization` (" ," -> "," ...),
  which 4.33 did by default; this class keeps that default.
- Ids are raw sentencepiece ids plus `num_image_tokens` (0 in the final release).

Deliberate differences from THUDM's class:

- The attention mask is the standard 2-D padding mask ([batch, seq], 1 = real token, 0 = padding,
  LEFT padding with <pad>). THUDM's `_pad` returned a 4-D bool prefix-LM mask [batch, 1, seq, seq]
  plus 2-D `position_ids` [batch, 2, seq]; `ChatGLMForConditionalGeneration` builds both itself
  from `input_ids` and this 2-D mask, so tokenizer outputs work with any collator.
- Every special id is looked up in the sentencepiece model by its piece name, so the same class
  runs a small sentencepiece model trained with the same symbols (`train_glm_sentencepiece`).
- A list of texts is encoded with one batched sentencepiece call (the tokenize stage feeds ~1000
  rows at a time); it returns exactly what encoding each text alone returns.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

from transformers import AddedToken

from instructglm.errors import BadValue, MissingFile
from instructglm.models.spm import SentencePieceTokenizer, import_sentencepiece

# GLM's blank-infilling markers (THUDM's SPTokenizer list): control pieces in ice_text.model, so
# sentencepiece never produces them from text and decodes them to nothing.
GLM_CONTROL_SYMBOLS = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
_TAB = "<|tab|>"
_NEWLINE = "<n>"
_MAX_BLANK = 80


def _blank(length: int) -> str:
    return f"<|blank_{length}|>"


# The whitespace pieces: user-defined in ice_text.model, so sentencepiece always matches them whole.
GLM_USER_SYMBOLS = (_NEWLINE, _TAB, *(_blank(n) for n in range(2, _MAX_BLANK + 1)))
_SPACE_RUN = re.compile(" {2,}")


def encode_whitespace(text: str, max_blank_length: int = _MAX_BLANK) -> str:
    """THUDM's rewriting before sentencepiece: newline -> <n>, tab -> <|tab|>, space runs -> <|blank_n|>.

    Equals THUDM's loop `for n in range(80, 1, -1): text = text.replace(" " * n, blank(n))`: a run
    is cut into full 80-space pieces first, then its remainder (a lone space stays a space).
    """
    text = text.replace("\n", _NEWLINE).replace("\t", _TAB)
    if "  " not in text:
        return text

    def blank_run(match: re.Match[str]) -> str:
        full, rest = divmod(len(match.group()), max_blank_length)
        return _blank(max_blank_length) * full + (_blank(rest) if rest >= 2 else " " * rest)

    return _SPACE_RUN.sub(blank_run, text)


def train_glm_sentencepiece(lines: Iterable[str], vocab_size: int = 1000) -> bytes:
    """Train a small unigram sentencepiece model laid out like `ice_text.model`; returns its bytes.

    Ids 0-3 are <unk> <s> </s> <pad>, then the GLM markers (control) and whitespace pieces
    (user-defined); digits split, unseen characters fall back to bytes, nmt_nfkc normalisation.
    Write the bytes to `<dir>/ice_text.model` and `ChatGLMTokenizer(vocab_file=...)` runs it.

    Args:
        lines: training texts, e.g. a few hundred; whitespace is rewritten as the tokenizer does.
        vocab_size: upper bound; a small corpus yields fewer pieces (the limit is soft).
    """
    spm = import_sentencepiece("train_glm_sentencepiece")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=(encode_whitespace(line) for line in lines),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        split_digits=True,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        control_symbols=list(GLM_CONTROL_SYMBOLS),
        user_defined_symbols=list(GLM_USER_SYMBOLS),
        minloglevel=2,
    )
    return model.getvalue()


class ChatGLMTokenizer(SentencePieceTokenizer):
    """The ChatGLM-6B tokenizer: `ice_text.model` (sentencepiece) plus THUDM's text rewriting.

    Loads from a directory in the hub layout (`ice_text.model` + `tokenizer_config.json`); after
    `import instructglm`, `AutoTokenizer.from_pretrained(dir)` returns this class without
    `trust_remote_code`.

    Attention mask: the standard 2-D padding mask with LEFT padding (pad id from the model's
    `<pad>` piece, 3 in chatglm-6b). THUDM's tokenizer instead returned a 4-D bool mask
    [batch, 1, seq, seq] (True = may not attend) and `position_ids` [batch, 2, seq]; our model
    builds that prefix-LM mask and the 2-D positions itself from `input_ids` and the 2-D mask.

    Args:
        vocab_file: path of the sentencepiece model (`ice_text.model`).
        num_image_tokens: id offset of the text vocabulary (THUDM reserved ids below it for image
            tokens; 0 in the final chatglm-6b release).
        max_blank_length: longest run of spaces written as one `<|blank_n|>` piece.
        remove_space, do_lower_case: THUDM's optional text normalisation (off in chatglm-6b).
        gmask_token, end_token: `[gMASK]` (appended before `<sop>`) and `</s>`.
        clean_up_tokenization_spaces: defaults to True, as transformers 4.33 did for THUDM's class.
    """

    vocab_files_names = {"vocab_file": "ice_text.model"}
    # THUDM's tokenizer_config.json names this class for every ChatGLM version; a directory holds one of these
    # (ChatGLM-6B's, then ChatGLM2/3's, which `from_pretrained` hands to ChatGLM3Tokenizer)
    vocab_file_layouts = ({"vocab_file": "ice_text.model"}, {"vocab_file": "tokenizer.model"})
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"
    # the GLM generation this class is for (ChatGLM3Tokenizer says 2 or 3)
    chatglm_version = 1

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *init_inputs, **kwargs):
        """This tokenizer, or for a ChatGLM2/3 directory (`tokenizer.model`) a `ChatGLM3Tokenizer`.

        THUDM's tokenizer_config.json says `tokenizer_class: "ChatGLMTokenizer"` in all three versions; the
        vocabulary file there, or an explicit `chatglm_version` (keyword or tokenizer_config.json), decides.
        """
        from instructglm.models.chatglm3.tokenizer import tokenizer_architecture

        if cls is ChatGLMTokenizer and tokenizer_architecture(pretrained_model_name_or_path, **kwargs) == 2:
            from instructglm.models.chatglm3.tokenizer import ChatGLM3Tokenizer

            return ChatGLM3Tokenizer.from_pretrained(pretrained_model_name_or_path, *init_inputs, **kwargs)
        kwargs.pop("chatglm_version", None)
        own = os.path.join(str(pretrained_model_name_or_path), cls.vocab_files_names["vocab_file"])
        if os.path.isdir(str(pretrained_model_name_or_path)) and os.path.isfile(own) and not init_inputs:
            # transformers prefers any `tokenizer.model` in the directory to the class's own vocabulary file
            kwargs.setdefault("vocab_file", own)
        return super().from_pretrained(pretrained_model_name_or_path, *init_inputs, **kwargs)

    def __init__(
        self,
        vocab_file: str,
        do_lower_case: bool = False,
        remove_space: bool = False,
        bos_token: str | AddedToken = "<sop>",
        eos_token: str | AddedToken = "<eop>",
        end_token: str = "</s>",
        mask_token: str | AddedToken = "[MASK]",
        gmask_token: str = "[gMASK]",
        padding_side: str = "left",
        pad_token: str | AddedToken = "<pad>",
        unk_token: str | AddedToken = "<unk>",
        num_image_tokens: int = 0,
        max_blank_length: int = _MAX_BLANK,
        clean_up_tokenization_spaces: bool = True,
        **kwargs: Any,
    ) -> None:
        if not vocab_file or not os.path.isfile(vocab_file):
            raise MissingFile(
                f"ChatGLMTokenizer needs the sentencepiece model `ice_text.model`; {vocab_file!r} is not a file. "
                "Pass the directory that holds it (hub layout: ice_text.model + tokenizer_config.json)."
            )
        if num_image_tokens < 0 or max_blank_length < 2:
            raise BadValue(
                f"num_image_tokens must be >= 0 and max_blank_length >= 2, got {num_image_tokens} and "
                f"{max_blank_length}; fix them in tokenizer_config.json."
            )
        # `from_pretrained` moves every non-standard `*_token` key of the config into this dict, which
        # would make them split-out special tokens; ours stay plain attributes.
        specific = dict(kwargs.pop("model_specific_special_tokens", None) or {})
        gmask_token = str(specific.pop("gmask_token", gmask_token))
        end_token = str(specific.pop("end_token", end_token))
        if specific:
            kwargs["model_specific_special_tokens"] = specific
        self.vocab_file = vocab_file
        self.sp_model = import_sentencepiece(type(self).__name__).SentencePieceProcessor(model_file=vocab_file)
        self.num_image_tokens = num_image_tokens
        self.max_blank_length = max_blank_length
        self.do_lower_case = do_lower_case
        self.remove_space = remove_space
        self.gmask_token = gmask_token
        self.end_token = end_token
        self._piece_vocab: dict[str, int] | None = None
        self._split_pattern: re.Pattern[str] | None = None
        self._split_initials: frozenset[str] = frozenset()
        self._decode_pattern = re.compile(r"<n>|<\|tab\|>|<\|blank_(\d+)\|>")

        named = {
            "bos_token": bos_token,
            "eos_token": eos_token,
            "unk_token": unk_token,
            "pad_token": pad_token,
            "mask_token": mask_token,
        }
        wanted = {**named, "gmask_token": gmask_token, "end_token": end_token}
        missing = [f"{name}={str(tok)!r}" for name, tok in wanted.items() if not self._in_model(str(tok))]
        if missing:
            raise BadValue(
                f"{vocab_file}: the sentencepiece model has no piece for {', '.join(missing)}. Fix "
                "tokenizer_config.json, or train the model with ChatGLM's symbols (train_glm_sentencepiece)."
            )
        markers = (*GLM_CONTROL_SYMBOLS, end_token)
        self._marker_ids = {self._convert_token_to_id(p) for p in markers if self._in_model(p)}
        # As under transformers 4.33, the named specials split out of text strip the whitespace around
        # them. A saved config's `added_tokens_decoder` (read by the base class) keeps these flags.
        self._added_tokens_decoder = {
            self._convert_token_to_id(str(tok)): _stripping_special(tok) if isinstance(tok, str) else tok
            for tok in named.values()
        }
        super().__init__(
            do_lower_case=do_lower_case,
            remove_space=remove_space,
            padding_side=padding_side,
            num_image_tokens=num_image_tokens,
            max_blank_length=max_blank_length,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **named,
            **kwargs,
        )
        # Saved to tokenizer_config.json like THUDM's (`save_pretrained` writes init_kwargs). THUDM's
        # `auto_map` is dropped: a saved directory has no tokenization_chatglm.py for it to point at.
        self.init_kwargs.update(gmask_token=gmask_token, end_token=end_token)
        self.init_kwargs.pop("auto_map", None)

    # ---- vocabulary -------------------------------------------------------------------------------

    def _in_model(self, piece: str) -> bool:
        unk = self.sp_model.unk_id()
        return piece == self.sp_model.id_to_piece(unk) or self.sp_model.piece_to_id(piece) != unk

    @property
    def vocab_size(self) -> int:
        return self.num_image_tokens + self.sp_model.get_piece_size()

    @property
    def gmask_token_id(self) -> int:
        return self._convert_token_to_id(self.gmask_token)

    @property
    def end_token_id(self) -> int:
        return self._convert_token_to_id(self.end_token)

    def get_vocab(self) -> dict[str, int]:
        if self._piece_vocab is None:
            # Built once: transformers calls get_vocab() repeatedly while adding tokens.
            self._piece_vocab = {self._convert_id_to_token(i): i for i in range(self.vocab_size)}
        vocab = dict(self._piece_vocab)
        vocab.update(self._added_tokens_encoder)
        return vocab

    def _convert_token_to_id(self, token: str) -> int:
        if self.num_image_tokens and token.startswith("<image_") and token.endswith(">") and token[7:-1].isdigit():
            return int(token[7:-1])
        return self.sp_model.piece_to_id(token) + self.num_image_tokens

    def _convert_id_to_token(self, index: int) -> str:
        if index < self.num_image_tokens:
            return f"<image_{index}>"
        if index >= self.vocab_size:
            # The model's embedding (130528 rows) is larger than the vocabulary (130344): an id
            # sampled from the padding rows has no piece.
            return str(self.unk_token)
        return self.sp_model.id_to_piece(index - self.num_image_tokens)

    # ---- encoding ---------------------------------------------------------------------------------

    def _preprocess(self, text: str) -> str:
        """THUDM's rewriting of one segment: normalisation options, then newlines, tabs, space runs."""
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        return encode_whitespace(text, self.max_blank_length)

    def _update_trie(self, unique_no_split_tokens: list[str] | None = None) -> None:
        # Called whenever added tokens change. Rebuilt eagerly, not lazily, so the pickled state (and
        # with it `datasets`' cache fingerprint of a function using this tokenizer) never changes by use.
        super()._update_trie(unique_no_split_tokens)
        # Longest first, so that at one position the longest token wins (as transformers' Trie).
        tokens = sorted(self._added_tokens_encoder, key=len, reverse=True)
        self._split_pattern = re.compile("(" + "|".join(map(re.escape, tokens)) + ")") if tokens else None
        self._split_initials = frozenset(t[0] for t in tokens)

    def _segments(self, text: str, split_special_tokens: bool) -> list[tuple[str, bool]]:
        """Split `text` on added/special tokens: [(piece, is_token)], empty segments dropped."""
        if split_special_tokens or self._split_pattern is None:
            return [(text, False)] if text else []
        # Most texts hold no token's first character ("<" or "[" for chatglm-6b): skip the regex.
        if self._split_initials.isdisjoint(text):
            return [(text, False)] if text else []
        parts = self._split_pattern.split(text)
        if len(parts) == 1:
            return [(text, False)] if text else []
        # Odd indices are the tokens; strip neighbours in order, as transformers' `tokenize` does.
        for i in range(1, len(parts), 2):
            token = self._added_tokens_decoder[self._added_tokens_encoder[parts[i]]]
            if token.rstrip and parts[i + 1]:
                parts[i + 1] = parts[i + 1].lstrip()
            if token.lstrip and parts[i - 1]:
                parts[i - 1] = parts[i - 1].rstrip()
        return [(part, i % 2 == 1) for i, part in enumerate(parts) if part]

    def _encode_texts(self, texts: Sequence[str], as_pieces: bool, split_special_tokens: bool) -> list[list]:
        """Ids (or pieces) of each text, with one sentencepiece call for every segment of the batch."""
        segments: list[str] = []
        plans: list[int | list[int | str]] = []  # int: the text is one segment; list: segments and tokens
        for text in texts:
            parts = self._segments(text, split_special_tokens)
            if len(parts) == 1 and not parts[0][1]:
                plans.append(len(segments))
                segments.append(self._preprocess(parts[0][0]))
                continue
            plan: list[int | str] = []
            for part, is_token in parts:
                if is_token:
                    plan.append(part)
                else:
                    plan.append(len(segments))
                    segments.append(self._preprocess(part))
            plans.append(plan)

        encoded = self.sp_model.encode(segments, out_type=str if as_pieces else int) if segments else []
        offset = self.num_image_tokens
        if offset and not as_pieces:
            encoded = [[i + offset for i in seg] for seg in encoded]

        results: list[list] = []
        for plan in plans:
            if isinstance(plan, int):
                results.append(encoded[plan])
                continue
            out: list = []
            for item in plan:
                if isinstance(item, int):
                    out.extend(encoded[item])
                else:
                    out.append(item if as_pieces else self._added_tokens_encoder[item])
            results.append(out)
        return results

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        split_special_tokens = kwargs.pop("split_special_tokens", self.split_special_tokens)
        text, kwargs = self.prepare_for_tokenization(text, **kwargs)
        return self._encode_texts([text], as_pieces=True, split_special_tokens=split_special_tokens)[0]

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self._encode_texts([text], as_pieces=True, split_special_tokens=True)[0]

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """A + [gMASK, <sop>], or for a pair A + [gMASK, <sop>] + B + [<eop>]."""
        ids = token_ids_0 + [self.gmask_token_id, self.bos_token_id]
        if token_ids_1 is not None:
            ids = ids + token_ids_1 + [self.eos_token_id]
        return ids

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            specials = set(self.all_special_ids) | {self.gmask_token_id}
            return [int(i in specials) for i in token_ids_0 + (token_ids_1 or [])]
        mask = [0] * len(token_ids_0) + [1, 1]
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def create_token_type_ids_from_sequences(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    # ---- decoding ---------------------------------------------------------------------------------

    def _postprocess(self, text: str) -> str:
        """Undo `_preprocess`: <n>, <|tab|> and <|blank_n|> (2 <= n <= max_blank_length) back to whitespace."""

        def restore(match: re.Match[str]) -> str:
            piece = match.group()
            if piece == _NEWLINE:
                return "\n"
            if piece == _TAB:
                return "\t"
            n = int(match.group(1))
            return " " * n if 2 <= n <= self.max_blank_length else piece

        return self._decode_pattern.sub(restore, text)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        # Tokens added on top of the sentencepiece vocabulary are not pieces: they are kept as text.
        out, run = [], []
        for token in tokens:
            if self._added_tokens_encoder.get(token, -1) >= self.vocab_size:
                out.append(self.sp_model.decode_pieces(run))
                out.append(token)
                run = []
            else:
                run.append(token)
        out.append(self.sp_model.decode_pieces(run))
        return self._postprocess("".join(out))

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        drop = {self.pad_token_id}
        if skip_special_tokens:
            # The sentencepiece control pieces ([gMASK], <sop>, ...) too, in case a model was trained
            # with them as user-defined (printable) symbols.
            drop |= set(self.all_special_ids) | self._marker_ids
        # THUDM dropped ids below the text vocabulary (image tokens) when decoding.
        ids = [i for i in ids if i not in drop and i >= self.num_image_tokens]
        return super()._decode(
            ids, skip_special_tokens=False, clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs
        )

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        if not os.path.isdir(save_directory):
            raise MissingFile(f"save_vocabulary needs an existing directory; {save_directory!r} is not one.")
        name = (filename_prefix + "-" if filename_prefix else "") + self.vocab_files_names["vocab_file"]
        path = os.path.join(save_directory, name)
        with open(path, "wb") as handle:
            handle.write(self.sp_model.serialized_model_proto())
        return (path,)


def _stripping_special(token: str) -> AddedToken:
    return AddedToken(token, lstrip=True, rstrip=True, normalized=False, special=True)


__all__ = [
    "ChatGLMTokenizer",
    "GLM_CONTROL_SYMBOLS",
    "GLM_USER_SYMBOLS",
    "encode_whitespace",
    "train_glm_sentencepiece",
]
