"""The model families: one table of what differs between them in fine-tuning and chat.

Everything else (convert, tokenize, collate, train, generate) is written once against a
`ModelFamily`. Per family the table says how a conversation becomes ids (its chat format, see
`instructglm.data.chat_formats`), which tokens get labels, the stop ids, the LoRA targets and the
default template:

| family | found by | chat format | labels | stop ids | LoRA targets |
|---|---|---|---|---|---|
| `chatglm-6b` | `model_type: chatglm`, v1 config / `ice_text.model` | text, `chatglm` template (`[Round i]\\n问：…\\n答：`, from 0) | the last answer + eos, and `<sop>` (the seed's rule) | eos (`<eop>`) | `query_key_value` |
| `chatglm2-6b` | `chatglm`, v2/3 config, tokenizer `chatglm_version` 2 | text, `chatglm2` template (`[Round i]\\n\\n问：…\\n\\n答：`, from 1) | the last answer + eos | eos | `query_key_value` |
| `chatglm3-6b` | `chatglm`, v2/3 config, tokenizer `chatglm_version` 3 | role tokens (`build_single_message`) | ChatGLM3's finetune demo: tokens after each assistant token | eos, `<|user|>`, `<|observation|>` | `query_key_value` |
| `glm-4` | `model_type: glm` (THUDM/glm-4-9b-chat-hf) | the tokenizer's chat template | every assistant turn + the next `<|user|>`/`<|observation|>` (or an appended `<|user|>`) | generation_config eos, `<|endoftext|>`, `<|user|>`, `<|observation|>` | peft's table, else all-linear |
| `glm-4-0414` | `model_type: glm4` (GLM-4-0414) | as `glm-4` | as `glm-4` | as `glm-4` | as `glm-4` |
| `chat-template` | any other causal LM whose tokenizer has a chat template (Qwen, Llama) | the chat template | every assistant turn + its end-of-turn token | generation_config eos, eos | peft's table, else all-linear |
| `causal-lm` | a causal LM without a chat template | text, `plain` template | the answer + eos | eos | peft's table, else all-linear |

ChatGLM-6B, ChatGLM2-6B and ChatGLM3-6B all say `model_type: "chatglm"`. `family_for` tells them
apart from the config class or dict (v1's fields against v2/3's, `chatglm_version`) and the
tokenizer (the vocabulary file picks the class; ChatGLM3Tokenizer's `chatglm_version` tells 2 from 3),
and refuses a config and tokenizer of different versions, so v1's rules never reach a v3
checkpoint nor the reverse. A bare `"chatglm"` string, with no tokenizer or config to look at, is
ChatGLM-6B, as every run before ChatGLM2/3 support recorded it.

The API the inference side calls (messages are `instructglm.data.messages.Message` records, or dicts
in their jsonl / OpenAI shape):

    family = family_for(model.config, tokenizer)                 # or family_for(name="chatglm3-6b")
    ids = family.prompt_ids(tokenizer, messages, tools=None)     # ids to generate from, ending with the assistant cue
    ids = family.context_prompt_ids(tokenizer, context)          # a (context, target) row's prompt: a text template's output
    input_ids, labels = family.training_ids(tokenizer, messages, tools=None)
    stops = family.stop_token_ids(tokenizer, generation_config=None)
    reply = family.parse_reply(tokenizer.decode(new_ids), tokenizer)   # -> Message (tool calls parsed)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from instructglm.data.chat_formats import ChatGLM3Format, ChatTemplateFormat, TextFormat
from instructglm.errors import BadValue

ChatFormat = TextFormat | ChatGLM3Format | ChatTemplateFormat


@dataclass(frozen=True)
class ModelFamily:
    name: str
    model_types: tuple[str, ...]
    # LoRA target module names; empty means "ask peft's table for this model_type, else all-linear".
    lora_targets: tuple[str, ...]
    chat_format: ChatFormat
    # The template a dialogue is written with by default: a text template name, or "messages" (whole
    # conversations, for the role-token families). Inference falls back to it when a run recorded none.
    chat_template: str
    # How many trailing special tokens of the encoded prompt are already part of the answer and
    # so get labels (text rows only). ChatGLM-6B's prompt ends in `[gMASK] <sop>`, and the official
    # recipe labels `<sop>`; the other families label nothing of the prompt.
    labelled_prompt_tail: int = 0

    @property
    def role_tokens(self) -> bool:
        """Whether conversations keep their roles (tools, observations, every turn trained) or become text."""
        return not isinstance(self.chat_format, TextFormat)

    def prompt_ids(self, tokenizer, messages: Sequence[Any], tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """Ids to generate the next assistant message from: `messages` (ending with a user or observation
        message) in the family's format, ending with its assistant cue (`<|assistant|>`, `答：`, ...).

        Raises:
            BadValue: messages the format cannot show (tool turns in a text prompt, a last assistant message).
        """
        from instructglm.data.messages import conversation_of

        conversation = conversation_of(messages, tools)
        return self.chat_format.prompt_ids(tokenizer, conversation.messages, conversation.tools)

    def context_prompt_ids(self, tokenizer, context: str) -> list[int]:
        """The prompt ids of a (context, target) row, as tokenize builds them: the context with the
        tokenizer's special tokens for a text family, a user message holding it for a role-token family."""
        return self.chat_format.context_prompt_ids(tokenizer, context)

    def training_ids(
        self, tokenizer, messages: Sequence[Any], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of a whole conversation, untruncated; labels are -100 where no loss.

        Raises:
            BadRow: a conversation the family cannot express or learn from (its `reason` says why).
        """
        from instructglm.data.messages import checked, conversation_of

        encoded = self.encode(tokenizer, checked(conversation_of(messages, tools)))
        return encoded.input_ids, encoded.labels

    def encode(self, tokenizer, conversation, stop_ids: Sequence[int] | None = None):
        """`Encoded` ids, labels and labelled spans of a checked `Conversation` (tokenize's per-row step)."""
        from instructglm.data.chat_formats import IGNORE_INDEX, Encoded, spans_of

        if isinstance(self.chat_format, ChatTemplateFormat):
            return self.chat_format.encode(tokenizer, conversation, stop_ids)
        if isinstance(self.chat_format, ChatGLM3Format):
            return self.chat_format.encode(tokenizer, conversation)
        context, target = self.chat_format.context_target(conversation)
        prompt = self.context_prompt_ids(tokenizer, context)
        answer = list(tokenizer.encode(target, add_special_tokens=False)) + [tokenizer.eos_token_id]
        first = len(prompt) - self.labelled_prompt_tail
        ids = prompt + answer
        labels = [IGNORE_INDEX] * first + ids[first:]
        return Encoded(ids, labels, spans_of(labels, {len(ids): 1}))

    def stop_token_ids(self, tokenizer, generation_config: Any = None) -> list[int]:
        """The ids generation stops at (a `GenerationConfig` or dict's `eos_token_id` included)."""
        return self.chat_format.stop_token_ids(tokenizer, generation_config)

    def parse_reply(self, text: str, tokenizer=None):
        """The assistant `Message` a generated reply decodes to (`tokenizer.decode(new_ids)` with special tokens,
        the stop token cut off): ChatGLM3's and GLM-4's tool calls become `tool_calls`, other text is its content."""
        if isinstance(self.chat_format, ChatTemplateFormat):
            return self.chat_format.parse_reply(text, tokenizer)
        return self.chat_format.parse_reply(text)

    def lora_target_modules(self, model_type: str | None) -> list[str] | str:
        """LoRA target modules: the family's, else peft's table for the architecture, else all-linear."""
        if self.lora_targets:
            return list(self.lora_targets)
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

        return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type or "", [])) or "all-linear"


GLM4_STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")

CHATGLM_6B = ModelFamily(
    name="chatglm-6b",
    model_types=("chatglm",),
    lora_targets=("query_key_value",),
    chat_format=TextFormat("chatglm"),
    chat_template="chatglm",
    labelled_prompt_tail=1,
)
CHATGLM2_6B = ModelFamily(
    name="chatglm2-6b",
    model_types=("chatglm",),
    lora_targets=("query_key_value",),
    chat_format=TextFormat("chatglm2"),
    chat_template="chatglm2",
)
CHATGLM3_6B = ModelFamily(
    name="chatglm3-6b",
    model_types=("chatglm",),
    lora_targets=("query_key_value",),
    chat_format=ChatGLM3Format(),
    chat_template="messages",
)
GLM_4 = ModelFamily(
    name="glm-4",
    model_types=("glm",),
    lora_targets=(),
    chat_format=ChatTemplateFormat(end_of_turn="<|user|>", stop_tokens=GLM4_STOP_TOKENS),
    chat_template="messages",
)
GLM_4_0414 = ModelFamily(
    name="glm-4-0414",
    model_types=("glm4",),
    lora_targets=(),
    chat_format=ChatTemplateFormat(end_of_turn="<|user|>", stop_tokens=GLM4_STOP_TOKENS),
    chat_template="messages",
)
CHAT_TEMPLATE = ModelFamily(
    name="chat-template", model_types=(), lora_targets=(), chat_format=ChatTemplateFormat(), chat_template="messages"
)
CAUSAL_LM = ModelFamily(name="causal-lm", model_types=(), lora_targets=(), chat_format=TextFormat("plain"), chat_template="plain")

FAMILIES: dict[str, ModelFamily] = {
    family.name: family for family in (CHATGLM_6B, CHATGLM2_6B, CHATGLM3_6B, GLM_4, GLM_4_0414, CHAT_TEMPLATE, CAUSAL_LM)
}
_BY_MODEL_TYPE: dict[str, ModelFamily] = {}
CHATGLM_VERSIONS = {1: CHATGLM_6B, 2: CHATGLM2_6B, 3: CHATGLM3_6B}


def register_family(family: ModelFamily) -> None:
    """Add a family: by name, and as the one for each of its model types."""
    FAMILIES[family.name] = family
    for model_type in family.model_types:
        _BY_MODEL_TYPE[model_type] = family


def family_for(model: Any = None, tokenizer: Any = None, *, name: str | None = None) -> ModelFamily:
    """The family of a checkpoint.

    Args:
        model: a `config.model_type` string, a config object or config.json dict, or a model (its
            `.config` is read); None with only a tokenizer.
        tokenizer: the checkpoint's tokenizer; it tells ChatGLM-6B from ChatGLM2/3 and 2 from 3, and
            whether a causal LM has a chat template.
        name: a family name as `instructglm_train.json` records it; it decides alone.

    Raises:
        BadValue: an unknown `name`; a ChatGLM config and tokenizer of different versions.
    """
    if name is not None:
        if name not in FAMILIES:
            raise BadValue(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
        return FAMILIES[name]
    config = getattr(model, "config", model) if not isinstance(model, (str, Mapping)) and model is not None else model
    model_type = config if isinstance(config, str) or config is None else _field(config, "model_type")
    if model_type == "chatglm" or (model_type is None and _chatglm_tokenizer_version(tokenizer)):
        return CHATGLM_VERSIONS[_chatglm_version(config, tokenizer)]
    family = _BY_MODEL_TYPE.get(model_type or "")
    has_template = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
    if family is not None and (tokenizer is None or has_template or not family.role_tokens):
        return family
    return CHAT_TEMPLATE if has_template else CAUSAL_LM


def lora_targets_for(model_type: str | None) -> list[str] | str:
    """LoRA target modules of a `config.model_type`: its family's, else peft's table, else all-linear."""
    model_type = getattr(model_type, "model_type", model_type)
    return family_for(model_type).lora_target_modules(model_type)


def _field(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)


def _chatglm_tokenizer_version(tokenizer: Any) -> int | None:
    """1, 2 or 3 for one of the native ChatGLM tokenizers, else None."""
    if tokenizer is None:
        return None
    kind = type(tokenizer).__name__
    if kind == "ChatGLMTokenizer":
        return 1
    if kind == "ChatGLM3Tokenizer":
        return int(tokenizer.chatglm_version)
    return None


def _chatglm_config_version(config: Any) -> tuple[int | None, int | None]:
    """(architecture 1 or 2, explicit version 2/3 or None) of a ChatGLM config object or dict; (None, None) unknown."""
    if config is None or isinstance(config, str):
        return None, None
    if isinstance(config, Mapping):
        from instructglm.models.chatglm3.versions import chatglm_architecture, chatglm_version_from_name, parse_chatglm_version

        architecture = chatglm_architecture(config)
        explicit = parse_chatglm_version(config.get("chatglm_version"), "config.json")
        if architecture == 2 and explicit is None:
            explicit = chatglm_version_from_name(config.get("_name_or_path"))
        return architecture, explicit if architecture == 2 else None
    kind = type(config).__name__
    if kind == "ChatGLMConfig":
        return 1, None
    if kind == "ChatGLM3Config":
        return 2, getattr(config, "chatglm_version", None)
    return None, None


def _chatglm_version(config: Any, tokenizer: Any) -> int:
    """ChatGLM 1, 2 or 3 from the config and the tokenizer, which must agree (see the module docstring)."""
    architecture, explicit = _chatglm_config_version(config)
    from_tokenizer = _chatglm_tokenizer_version(tokenizer)
    if from_tokenizer is not None and architecture is not None:
        if (from_tokenizer == 1) != (architecture == 1):
            model = "ChatGLM-6B (v1)" if architecture == 1 else "ChatGLM2/3-6B"
            vocabulary = "ice_text.model (ChatGLM-6B)" if from_tokenizer == 1 else "tokenizer.model (ChatGLM2/3)"
            raise BadValue(
                f"the model's config.json describes a {model} model but its tokenizer is {vocabulary}: the checkpoint "
                "mixes two ChatGLM versions; use the tokenizer files of the model's own hub repo"
            )
        if explicit in (2, 3) and from_tokenizer != explicit:
            raise BadValue(
                f"config.json says chatglm_version={explicit} but the tokenizer is ChatGLM{from_tokenizer}'s "
                f"(chatglm_version={from_tokenizer}); set the same chatglm_version in config.json and tokenizer_config.json"
            )
    if from_tokenizer is not None:
        return from_tokenizer
    if architecture == 1:
        return 1
    if architecture == 2:
        return explicit or 3  # not told: the tokenizer and model default to ChatGLM3 too
    return 1  # a bare "chatglm": what runs recorded before ChatGLM2/3 support


for _family in (CHATGLM_6B, GLM_4, GLM_4_0414):
    register_family(_family)
for _family in (CHATGLM2_6B, CHATGLM3_6B, CHAT_TEMPLATE, CAUSAL_LM):
    FAMILIES[_family.name] = _family
