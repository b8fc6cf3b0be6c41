"""ChatGLM2-6B / ChatGLM3-6B tokenizer, written for current transformers from the behaviour of THUDM's.

Reference: THUDM `chatglm3-6b` and `chatglm2-6b` `tokenization_chatglm.py` (ChatGLMTokenizer + SPTokenizer)
as they ran under transformers 4.33. Their observable behaviour, pinned by
`fixtures/chatglm3/tokenizer_golden.json`, is:

- `tokenizer.model` is a sentencepiece BPE model (64789 pieces; 0 `<unk>` is also the pad, 2 `</s>` the eos,
  byte fallback). The GLM specials come after it: `[MASK] [gMASK] [sMASK] sop eop` (64789..64793), and in
  ChatGLM3 only the role tokens `<|system|> <|user|> <|assistant|> <|observation|>` (64794..64797).
- Text goes to sentencepiece as is (no rewriting); literal special strings in text are ordinary text.
  ChatGLM3's `encode_special_tokens=True` turns the four literal role strings into their ids, every other
  stretch of text encoded on its own (so it gets its own dummy-prefix "▁").
- `encode(a)` = [gMASK, sop] + A (the prefix comes FIRST, unlike ChatGLM-6B); `encode(a, b)` = [gMASK, sop] + A
  + B + [eos].
- `decode` maps eos, `<s>`, `<unk>`/pad and ids past the vocabulary to nothing, the special ids to their names
  in ChatGLM3 (`[gMASK]sop 你好`) and to nothing in ChatGLM2 (`你好`), then joins the pieces with
  sentencepiece's `DecodePieces`; no clean-up of spaces.
- ChatGLM3's `build_chat_input(query, history, role)`: [gMASK, sop] + for each message [<|role|>] +
  sp(metadata + "\\n") + sp(content) (a system message's `tools` appended as indented JSON) + the query as
  `role` + [<|assistant|>]. ChatGLM2's chat prompt is text: `[Round 1]\\n\\n问：…\\n\\n答：…` (`build_prompt`).

Deliberate differences from THUDM's classes:

- One class for both versions: `chatglm_version` (2 or 3) decides the role tokens and how special ids decode.
  It is the override (a `tokenizer_config.json` field or `from_pretrained` keyword; `save_pretrained` writes
  it); without it, the checkpoint tells (`detect_chatglm_version`): role tokens or a role-token chat template
  in `tokenizer_config.json` mean 3, else the checkpoint name (`THUDM/chatglm2-6b`) in `tokenizer_config.json`,
  beside it in `config.json`, or in the path; else 3, with a warning.
- Outputs are `input_ids` and the standard 2-D `attention_mask` (1 = real token), LEFT padding by default
  (right padding on request, for training collators). THUDM's tokenizer also returned `position_ids`
  (0 on pads, then 0..n-1); the model derives exactly these from the mask, so tokenizer outputs work with any
  collator and with `generate`.
- `decode(..., skip_special_tokens=True)` drops the GLM special ids (THUDM's ignored the flag: its special
  tokens were invisible to transformers).
- The vocabulary is fixed: adding tokens that are not in it is refused (THUDM's decode could not show them).
- A list of texts is encoded with one sentencepiece call; it returns exactly what encoding each text alone does.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import AddedToken, BatchEncoding
from transformers.utils import logging

from instructglm.errors import BadValue, MissingFile
from instructglm.models.chatglm3.versions import chatglm_version_from_name, parse_chatglm_version
from instructglm.models.spm import SentencePieceTokenizer, import_sentencepiece

logger = logging.get_logger(__name__)

VOCAB_FILE = "tokenizer.model"
GLM_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
ROLES = ("system", "user", "assistant", "observation")
ROLE_TOKENS = tuple(f"<|{role}|>" for role in ROLES)
_ROLE_PATTERN = re.compile("(" + "|".join(map(re.escape, ROLE_TOKENS)) + ")")


# ---- which version a checkpoint's tokenizer is ---------------------------------------------------------------------


def _mentions_role_tokens(tokenizer_config: Mapping[str, Any]) -> bool:
    """ChatGLM3's later tokenizer_config.json lists role tokens (added tokens, a chat template using them)."""
    added = tokenizer_config.get("added_tokens_decoder") or {}
    contents = [str(t.get("content") if isinstance(t, Mapping) else t) for t in added.values()]
    for key in ("additional_special_tokens", "extra_special_tokens"):
        value = tokenizer_config.get(key) or []
        contents += [str(v.get("content") if isinstance(v, Mapping) else v) for v in (value.values() if isinstance(value, Mapping) else value)]
    template = tokenizer_config.get("chat_template") or ""
    templates = [template] if isinstance(template, str) else [str(t) for t in template]
    return any(token in contents for token in ROLE_TOKENS) or any(
        "<|assistant|>" in text or "<|user|>" in text for text in templates
    )


def detect_chatglm_version(
    tokenizer_config: Mapping[str, Any], model_config: Mapping[str, Any] | None = None, location: str | None = None
) -> tuple[int, str]:
    """(2 or 3, why) for a ChatGLM2/3 tokenizer whose config does not set `chatglm_version`.

    Args:
        tokenizer_config: its tokenizer_config.json as written (`name_or_path` not yet replaced by the path).
        model_config: the config.json beside it, if any.
        location: the directory or hub name it was loaded from.
    """
    if _mentions_role_tokens(tokenizer_config):
        return 3, "tokenizer_config.json uses ChatGLM3's role tokens"
    if model_config is not None:
        explicit = parse_chatglm_version(model_config.get("chatglm_version"), "config.json")
        if explicit in (2, 3):
            return explicit, f"config.json says chatglm_version={explicit}"
    names = [
        ("tokenizer_config.json's name_or_path", tokenizer_config.get("name_or_path") or tokenizer_config.get("_name_or_path")),
        ("config.json's _name_or_path", (model_config or {}).get("_name_or_path")),
        ("its path", location),
    ]
    for what, name in names:
        version = chatglm_version_from_name(name)
        if version in (2, 3):
            return version, f"{what} is {name!r}"
    return 3, "nothing in the checkpoint tells ChatGLM2 from ChatGLM3"


def _json_beside(name_or_path: str, filename: str, hub_kwargs: Mapping[str, Any]) -> dict | None:
    """`filename` (JSON) of a local dir or hub repo, or None when it has none or it cannot be read."""
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, filename)
    else:
        from transformers.utils import cached_file

        wanted = ("cache_dir", "token", "revision", "local_files_only", "subfolder", "_commit_hash")
        try:
            path = cached_file(
                name_or_path,
                filename,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
                **{key: value for key, value in hub_kwargs.items() if key in wanted and value is not None},
            )
        except (OSError, ValueError):
            return None
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            loaded = json.load(handle)
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def tokenizer_architecture(name_or_path: str, **kwargs: Any) -> int:
    """1 for a ChatGLM-6B tokenizer (`ice_text.model`), 2 for a ChatGLM2/3 one (`tokenizer.model`).

    An explicit `chatglm_version` (keyword, else tokenizer_config.json) decides; else the vocabulary file that
    is there. Used by the `ChatGLMTokenizer` name that THUDM's tokenizer_config.json files of every version
    give as `tokenizer_class`.

    Raises:
        BadValue: a bad `chatglm_version`, or both vocabulary files without one.
    """
    explicit = parse_chatglm_version(kwargs.get("chatglm_version"), "chatglm_version")
    if explicit is None:
        config = _json_beside(str(name_or_path), "tokenizer_config.json", kwargs) or {}
        explicit = parse_chatglm_version(config.get("chatglm_version"), f"{name_or_path}/tokenizer_config.json")
    if explicit is not None:
        return 1 if explicit == 1 else 2
    name = str(name_or_path)
    if os.path.isfile(name):  # a vocabulary file given directly
        return 2 if os.path.basename(name) == VOCAB_FILE else 1
    has_v1, has_v2 = (_has_file(name, file, kwargs) for file in ("ice_text.model", VOCAB_FILE))
    if has_v1 and has_v2:
        raise BadValue(
            f"{name} holds both ice_text.model (ChatGLM-6B) and tokenizer.model (ChatGLM2/3); say which with "
            '"chatglm_version": 1, 2 or 3 in its tokenizer_config.json'
        )
    return 2 if has_v2 else 1


def _has_file(name_or_path: str, filename: str, hub_kwargs: Mapping[str, Any]) -> bool:
    if os.path.isdir(name_or_path):
        return os.path.isfile(os.path.join(name_or_path, filename))
    from transformers.utils import cached_file

    wanted = ("cache_dir", "token", "revision", "local_files_only", "subfolder", "_commit_hash")
    try:
        found = cached_file(
            name_or_path,
            filename,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **{key: value for key, value in hub_kwargs.items() if key in wanted and value is not None},
        )
    except (OSError, ValueError):
        return False
    return bool(found)


# ---- the tokenizer -------------------------------------------------------------------------------------------------


class ChatGLM3Tokenizer(SentencePieceTokenizer):
    """The ChatGLM2-6B / ChatGLM3-6B tokenizer: `tokenizer.model` (sentencepiece) plus the GLM special ids.

    Loads from a directory in the hub layout (`tokenizer.model` + `tokenizer_config.json`); after
    `import instructglm`, `AutoTokenizer.from_pretrained(dir)` returns this class without
    `trust_remote_code` (THUDM's `tokenizer_class: "ChatGLMTokenizer"` resolves to it by the vocabulary file).

    Args:
        vocab_file: path of the sentencepiece model (`tokenizer.model`).
        chatglm_version: 2 (ChatGLM2-6B: no role tokens, special ids decode to nothing) or 3 (ChatGLM3-6B);
            None: detected from the checkpoint (see the module docstring).
        encode_special_tokens: ChatGLM3's option: literal `<|system|>`, `<|user|>`, `<|assistant|>` and
            `<|observation|>` in text become their ids (it can also be set on the instance).
        padding_side: "left" (THUDM's only side, for generation) or "right" (training batches).
        clean_up_tokenization_spaces: False, as THUDM's.
    """

    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]
    splits_special_tokens_in_text = False  # role tokens are split out by `encode_special_tokens` alone
    padding_side = "left"

    def __init__(
        self,
        vocab_file: str,
        chatglm_version: int | str | None = None,
        encode_special_tokens: bool = False,
        padding_side: str = "left",
        clean_up_tokenization_spaces: bool = False,
        eos_token: str | AddedToken = "</s>",
        pad_token: str | AddedToken = "<unk>",
        unk_token: str | AddedToken = "<unk>",
        **kwargs: Any,
    ) -> None:
        if not vocab_file or not os.path.isfile(vocab_file):
            raise MissingFile(
                f"ChatGLM3Tokenizer needs the sentencepiece model `tokenizer.model`; {vocab_file!r} is not a file. "
                "Pass the directory that holds it (hub layout: tokenizer.model + tokenizer_config.json)."
            )
        version = parse_chatglm_version(chatglm_version, "ChatGLM3Tokenizer chatglm_version")
        if version == 1:
            raise BadValue(
                "chatglm_version=1 is ChatGLM-6B, whose tokenizer is ChatGLMTokenizer (ice_text.model); "
                "use 2 or 3 with tokenizer.model"
            )
        if version is None:
            version, reason = detect_chatglm_version(kwargs, None, os.path.dirname(os.path.abspath(vocab_file)))
            _report_detection(version, reason, vocab_file)
        self.chatglm_version = version
        self.vocab_file = vocab_file
        self.sp_model = import_sentencepiece(type(self).__name__).SentencePieceProcessor(model_file=vocab_file)
        self.encode_special_tokens = bool(encode_special_tokens)
        self._sp_size = self.sp_model.get_piece_size()
        names = GLM_TOKENS + (ROLE_TOKENS if version == 3 else ())
        self._special_ids = {name: self._sp_size + i for i, name in enumerate(names)}
        self._special_names = {i: name for name, i in self._special_ids.items()}
        # decoded to nothing by THUDM's convert_id_to_token
        self._silent_ids = {self.sp_model.bos_id(), self.sp_model.eos_id(), self.sp_model.unk_id()}
        self._vocab: dict[str, int] | None = None
        super().__init__(
            chatglm_version=version,
            encode_special_tokens=self.encode_special_tokens,
            padding_side=padding_side,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            eos_token=eos_token,
            pad_token=pad_token,
            unk_token=unk_token,
            **kwargs,
        )
        # THUDM's `auto_map` is dropped: a saved directory has no tokenization_chatglm.py for it to point at.
        self.init_kwargs.pop("auto_map", None)

    @classmethod
    def _from_pretrained(cls, resolved_vocab_files, pretrained_model_name_or_path, init_configuration, *init_inputs, **kwargs):
        """Settle `chatglm_version` while the checkpoint's own files can still be read.

        transformers replaces tokenizer_config.json's `name_or_path` by the loading path before `__init__`,
        so the detection (`detect_chatglm_version`) runs here on the file as written.
        """
        if resolved_vocab_files.get("vocab_file") is None and not init_inputs and "vocab_file" not in kwargs:
            # (transformers would turn the constructor's own error into a bare "Unable to load vocabulary")
            has_v1 = _has_file(str(pretrained_model_name_or_path), "ice_text.model", kwargs)
            raise MissingFile(
                f"{pretrained_model_name_or_path} has no tokenizer.model, the ChatGLM2/3 vocabulary"
                + (" (it holds ice_text.model: a ChatGLM-6B tokenizer, loaded by AutoTokenizer or ChatGLMTokenizer)" if has_v1 else "")
                + "; copy tokenizer.model from the model's hub repo into it"
            )
        if parse_chatglm_version(kwargs.get("chatglm_version"), "chatglm_version") is None:
            kwargs.pop("chatglm_version", None)
            config_file = resolved_vocab_files.get("tokenizer_config_file")
            tokenizer_config = {}
            if config_file is not None:
                with open(config_file, encoding="utf-8") as handle:
                    tokenizer_config = json.load(handle)
            if parse_chatglm_version(tokenizer_config.get("chatglm_version"), f"{config_file}") is None:
                name = str(pretrained_model_name_or_path)
                model_config = _json_beside(name, "config.json", kwargs)
                version, reason = detect_chatglm_version(tokenizer_config, model_config, name)
                _report_detection(version, reason, name)
                kwargs["chatglm_version"] = version
        return super()._from_pretrained(
            resolved_vocab_files, pretrained_model_name_or_path, init_configuration, *init_inputs, **kwargs
        )

    # ---- vocabulary ---------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._sp_size + len(self._special_ids)

    def get_vocab(self) -> dict[str, int]:
        if self._vocab is None:
            # Built once: transformers calls get_vocab() repeatedly while setting up special tokens.
            vocab = {self.sp_model.id_to_piece(i): i for i in range(self._sp_size)}
            vocab.update(self._special_ids)
            self._vocab = vocab
        return dict(self._vocab)

    def _convert_token_to_id(self, token: str) -> int:
        if token in self._special_ids:
            return self._special_ids[token]
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        if index in self._special_names:
            return self._special_names[index]
        if 0 <= index < self._sp_size:
            return self.sp_model.id_to_piece(index)
        # The model's output layer (65024 rows) is larger than the vocabulary: those ids have no piece.
        return str(self.unk_token)

    def _add_tokens(self, new_tokens, special_tokens: bool = False) -> int:
        unknown = [str(t) for t in new_tokens or [] if str(t) and str(t) not in self.get_vocab()]
        if unknown:
            raise BadValue(
                f"ChatGLM{self.chatglm_version}'s vocabulary is fixed (its model has no rows for new tokens); "
                f"cannot add {', '.join(map(repr, unknown))}"
            )
        return super()._add_tokens(new_tokens, special_tokens=special_tokens)

    def get_command(self, token: str) -> int:
        """THUDM's id lookup of a special token: `<bos>`, `<eos>`, `<pad>` or a GLM/role token by name.

        Raises:
            KeyError: a name this version does not have (ChatGLM2 has no role tokens).
        """
        sentencepiece = {"<bos>": self.sp_model.bos_id(), "<eos>": self.sp_model.eos_id(), "<pad>": self.sp_model.unk_id()}
        if token in sentencepiece:
            return sentencepiece[token]
        if token not in self._special_ids:
            raise KeyError(f"{token!r} is not a special token of ChatGLM{self.chatglm_version}; it has {sorted(self._special_ids)}")
        return self._special_ids[token]

    def get_prefix_tokens(self) -> list[int]:
        """[gMASK, sop], which starts every encoded text."""
        return [self._special_ids["[gMASK]"], self._special_ids["sop"]]

    @property
    def chat_stop_token_ids(self) -> list[int]:
        """The ids THUDM's chat() stops at: eos, and in ChatGLM3 the next `<|user|>` or `<|observation|>` turn."""
        stops = [self.sp_model.eos_id()]
        if self.chatglm_version == 3:
            stops += [self._special_ids["<|user|>"], self._special_ids["<|observation|>"]]
        return stops

    # ---- encoding -----------------------------------------------------------------------------------------------

    def _segments(self, text: str) -> list[tuple[str, bool]]:
        """[(part, is_role_token)] of `text`: split around literal role tokens (ChatGLM3 with
        encode_special_tokens), empty parts dropped."""
        if not (self.encode_special_tokens and self.chatglm_version == 3 and "<|" in text):
            return [(text, False)] if text else []
        return [(part, i % 2 == 1) for i, part in enumerate(_ROLE_PATTERN.split(text)) if part]

    def _encode_texts(self, texts: Sequence[str], as_pieces: bool = False, split_special_tokens: bool = False) -> list[list]:
        """Ids (or pieces) of each text, with one sentencepiece call for the whole batch (`split_special_tokens`
        does not apply: only `encode_special_tokens` splits role tokens out of text)."""
        plans = [self._segments(text) for text in texts]
        if all(len(plan) <= 1 and not (plan and plan[0][1]) for plan in plans):  # the usual case: no role tokens
            return self.sp_model.encode(list(texts), out_type=str if as_pieces else int) if texts else []
        pieces = [part for plan in plans for part, is_token in plan if not is_token]
        encoded = iter(self.sp_model.encode(pieces, out_type=str if as_pieces else int) if pieces else [])
        results = []
        for plan in plans:
            row: list = []
            for part, is_token in plan:
                if is_token:
                    row.append(part if as_pieces else self._special_ids[part])
                else:
                    row.extend(next(encoded))
            results.append(row)
        return results

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        """Sentencepiece pieces of `text`; no added or special token is split out (as in THUDM's)."""
        text, _ = self.prepare_for_tokenization(text, **kwargs)
        return self._encode_texts([text], as_pieces=True)[0]

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self._encode_texts([text], as_pieces=True)[0]

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None) -> list[int]:
        """[gMASK, sop] + A, or for a pair [gMASK, sop] + A + B + [eos]."""
        ids = self.get_prefix_tokens() + list(token_ids_0)
        if token_ids_1 is not None:
            ids = ids + list(token_ids_1) + [self.sp_model.eos_id()]
        return ids

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            specials = set(self._special_names) | {self.sp_model.eos_id()}
            return [int(i in specials) for i in token_ids_0 + (token_ids_1 or [])]
        mask = [1, 1] + [0] * len(token_ids_0)
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def create_token_type_ids_from_sequences(self, token_ids_0: list[int], token_ids_1: list[int] | None = None) -> list[int]:
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    # ---- chat inputs --------------------------------------------------------------------------------------------

    def build_single_message(self, role: str, metadata: str, message: str) -> list[int]:
        """ChatGLM3's ids of one message: [<|role|>] + sp(metadata + "\\n") + sp(message).

        Raises:
            BadValue: ChatGLM2 (no role tokens), or a role other than system/user/assistant/observation.
        """
        self._require_roles("build_single_message")
        if role not in ROLES:
            raise BadValue(f"ChatGLM3 message role {role!r} is not one of {', '.join(ROLES)}")
        role_ids, message_ids = self.sp_model.encode([f"{metadata}\n", message])
        return [self._special_ids[f"<|{role}|>"]] + role_ids + message_ids

    def build_chat_input(
        self, query: str, history: list[Mapping[str, Any]] | None = None, role: str = "user", return_tensors: Any = "pt"
    ) -> BatchEncoding:
        """ChatGLM3's prompt ids for `query` (said by `role`) after `history`, ending in `<|assistant|>`.

        Args:
            history: messages `{"role", "content"}`, optionally `"metadata"` (an assistant tool call's tool name)
                and, on a system message, `"tools"` (appended to its content as indented JSON, as THUDM did).

        Returns:
            `input_ids` and `attention_mask` (all ones), a batch of one, as `return_tensors`.
        """
        self._require_roles("build_chat_input")
        ids = self.get_prefix_tokens()
        for index, item in enumerate(history or []):
            if not isinstance(item, Mapping) or "role" not in item or "content" not in item:
                raise BadValue(
                    f"history[{index}] = {item!r}: ChatGLM3 history entries are dicts with 'role' and 'content' "
                    "(ChatGLM2-style (query, response) pairs go to build_prompt)"
                )
            content = item["content"]
            if item["role"] == "system" and "tools" in item:
                content = content + "\n" + json.dumps(item["tools"], indent=4, ensure_ascii=False)
            ids += self.build_single_message(item["role"], item.get("metadata", ""), content)
        ids += self.build_single_message(role, "", query) + [self._special_ids["<|assistant|>"]]
        return BatchEncoding({"input_ids": [ids], "attention_mask": [[1] * len(ids)]}, tensor_type=return_tensors)

    def _require_roles(self, what: str) -> None:
        if self.chatglm_version != 3:
            raise BadValue(
                f"{what} needs ChatGLM3's role tokens; this is a ChatGLM2 tokenizer (chatglm_version=2), whose chat "
                "prompt is the text of build_prompt(query, history)"
            )

    @staticmethod
    def build_prompt(query: str, history: Sequence[tuple[str, str]] | None = None) -> str:
        """ChatGLM2's round prompt: "[Round 1]\\n\\n问：q\\n\\n答：a\\n\\n" per past turn, then the open round."""
        rounds = [f"[Round {i}]\n\n问：{q}\n\n答：{a}\n\n" for i, (q, a) in enumerate(history or (), start=1)]
        return "".join(rounds) + f"[Round {len(rounds) + 1}]\n\n问：{query}\n\n答："

    def build_stream_inputs(
        self, query: str, history: Sequence[tuple[str, str]] | None = None, return_tensors: Any = "pt"
    ) -> BatchEncoding:
        """ChatGLM2's ids for continuing a conversation whose earlier rounds are already in a KV cache.

        With history, the new round only: encode("\\n\\n[Round N]\\n\\n问：q\\n\\n答：") without prefix and without its
        leading "▁" (THUDM's `build_stream_inputs`); the attention mask covers only these ids, so prepend ones for
        the cached tokens. Without history, the whole first-round prompt.
        """
        if not history:
            return self([self.build_prompt(query)], return_tensors=return_tensors)
        text = f"\n\n[Round {len(history) + 1}]\n\n问：{query}\n\n答："
        ids = self.sp_model.encode(text)[1:]
        return BatchEncoding({"input_ids": [ids], "attention_mask": [[1] * len(ids)]}, tensor_type=return_tensors)

    # ---- decoding -----------------------------------------------------------------------------------------------

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        pieces = []
        for index in ids:
            if index in self._special_names:
                if self.chatglm_version == 3 and not skip_special_tokens:
                    pieces.append(self._special_names[index])
            elif 0 <= index < self._sp_size and index not in self._silent_ids:
                pieces.append(self.sp_model.id_to_piece(index))
        text = self.sp_model.decode_pieces(pieces)
        if clean_up_tokenization_spaces if clean_up_tokenization_spaces is not None else self.clean_up_tokenization_spaces:
            text = self.clean_up_tokenization(text)
        return text

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp_model.decode_pieces(list(tokens))

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        if not os.path.isdir(save_directory):
            raise MissingFile(f"save_vocabulary needs an existing directory; {save_directory!r} is not one.")
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE
        path = os.path.join(save_directory, name)
        temporary = path + ".tmp"
        with open(temporary, "wb") as handle:
            handle.write(self.sp_model.serialized_model_proto())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        return (path,)


def _report_detection(version: int, reason: str, where: str) -> None:
    if reason.startswith("nothing"):
        logger.warning(
            f"{where}: {reason}; using ChatGLM3's tokenizer. For a ChatGLM2-6B checkpoint set "
            '"chatglm_version": 2 in its tokenizer_config.json (or pass chatglm_version=2).'
        )
    else:
        logger.info(f"{where}: ChatGLM{version} tokenizer ({reason})")


__all__ = [
    "ChatGLM3Tokenizer",
    "GLM_TOKENS",
    "ROLES",
    "ROLE_TOKENS",
    "detect_chatglm_version",
    "tokenizer_architecture",
]
