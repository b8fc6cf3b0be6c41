"""Tiny random-init models in the hub layout, for tests of every command: the one place they are built.

- `tiny_chatglm_dir`: a native ChatGLM-6B-architecture model (2 layers, hidden 64) with the demo's
  tokenizer (`instructglm/demo/assets/tokenizer`, the ChatGLM-6B sentencepiece layout, ~530 pieces),
  its special ids read from that tokenizer by name.
- `tiny_llama_dir`: a `LlamaConfig` model (2 layers, hidden 64) with a `tokenizers` fast tokenizer,
  for the "any causal LM" paths: word-level (readable decodes, for inference tests) or
  character-level (every string of `ALPHABET` tokenizes exactly, for the training tests' task).

Both write `config.json` + `model.safetensors` + tokenizer files with `save_pretrained`, so
`AutoTokenizer.from_pretrained(path)` and `AutoModelForCausalLM.from_pretrained(path)` load them
(after `import instructglm` for ChatGLM). Same seed and options, same weights; torch's global RNG is
left as it was. Keyword overrides are config fields, so a caller can shrink or reshape either model.
"""

from __future__ import annotations

import string
from pathlib import Path

TINY_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
# The character-level tokenizer's vocabulary (after its specials).
ALPHABET = string.ascii_lowercase + string.digits + " :.,?!-"


def padded_vocab_size(tokenizer, multiple: int) -> int:
    """`len(tokenizer)` rounded up to a multiple of `multiple` (1: exactly the tokenizer's size)."""
    return -(-len(tokenizer) // multiple) * multiple


def tiny_chatglm_dir(path, seed: int = 0, vocab_multiple: int = 64, **config_overrides) -> Path:
    """Save a random-init tiny native ChatGLM + the demo tokenizer at `path`; return the path.

    The demo's own model (2 layers, hidden 64, 4 heads, special ids read from the tokenizer);
    the embedding has the tokenizer's size rounded up to `vocab_multiple` rows. `config_overrides`
    are `ChatGLMConfig` fields, e.g. `hidden_size=32`.
    """
    from transformers import AutoTokenizer

    import instructglm  # noqa: F401  (registers ChatGLM's tokenizer with AutoTokenizer)
    from instructglm.demo.pipeline import DEMO_TOKENIZER_DIR, build_tiny_chatglm

    if "vocab_size" not in config_overrides:
        tokenizer = AutoTokenizer.from_pretrained(str(DEMO_TOKENIZER_DIR))
        config_overrides["vocab_size"] = padded_vocab_size(tokenizer, vocab_multiple)
    return build_tiny_chatglm(path, seed=seed, **config_overrides)


def word_tokenizer():
    """A word-level fast tokenizer (<unk> <s> </s> <pad>, then words, then single characters)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    # Words and characters the tests' instructions use, so most text maps to real ids.
    words = (
        "instruction input answer response the a an of to in is what write number numbers letters words "
        "english reverse add one after comes hello world you are how ok yes no please say thanks"
    ).split()
    chars = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"-#()[]") + list(
        "你好世界中文数字问答一二三四五六七八九十零"
    )
    vocab = {token: i for i, token in enumerate(specials + words + [c for c in chars if c not in words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    # Words, else single characters; a space-joined decode gives readable text.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"[a-z]+|[^a-z]"), behavior="isolated")]
    )
    backend.decoder = decoders.WordPiece(prefix="##")
    # Llama's convention: <s> opens every sequence; </s> is left to the data pipeline.
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def char_tokenizer():
    """A character-level fast tokenizer over `ALPHABET` (<pad> <unk> <s> </s> first) that prepends <s>, like Llama's."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + list(ALPHABET))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


LLAMA_TOKENIZERS = {"word": word_tokenizer, "char": char_tokenizer}


def tiny_llama_dir(path, seed: int = 0, tokenizer: str = "word", vocab_multiple: int = 64, **config_overrides) -> Path:
    """Save a random-init tiny Llama + a fast tokenizer (bos/eos/pad) at `path`; return the path.

    `tokenizer` is "word" or "char" (see the module docstring); the embedding has the tokenizer's
    size rounded up to `vocab_multiple` rows; `config_overrides` are `LlamaConfig` fields replacing
    `TINY_LLAMA`'s, e.g. `hidden_size=32, initializer_range=0.3`.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if tokenizer not in LLAMA_TOKENIZERS:
        raise ValueError(f"tiny_llama_dir: tokenizer={tokenizer!r}; choose one of {sorted(LLAMA_TOKENIZERS)}")
    path = Path(path)
    fast = LLAMA_TOKENIZERS[tokenizer]()
    fields = {
        **TINY_LLAMA,
        "vocab_size": padded_vocab_size(fast, vocab_multiple),
        "bos_token_id": fast.bos_token_id,
        "eos_token_id": fast.eos_token_id,
        "pad_token_id": fast.pad_token_id,
        "tie_word_embeddings": False,
    }
    fields.update(config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**fields))
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


# ---- the other families: ChatGLM2/3 (native), GLM-4 (transformers' Glm/Glm4), a Llama with a chat template ----------

TINY_CHATGLM3 = {
    "hidden_size": 64,
    "num_layers": 2,
    "num_attention_heads": 4,
    "kv_channels": 16,
    "multi_query_group_num": 2,
    "ffn_hidden_size": 128,
    "seq_length": 512,
}


def tiny_chatglm3_dir(path, tokenizer_dir, version: int = 3, seed: int = 0, **config_overrides) -> Path:
    """Save a random-init tiny native ChatGLM2-6B (`version=2`) or ChatGLM3-6B model at `path`; return the path.

    The tokenizer is the real `tokenizer.model` of `tokenizer_dir` (the shared chatglm3-6b dir, which
    ChatGLM2 shares), saved with `chatglm_version`; the embedding and output layer have its 64798 ids
    padded to a multiple of 64 (THUDM padded to 65024). `config_overrides` are `ChatGLM3Config` fields.
    """
    import torch

    import instructglm  # noqa: F401
    from instructglm.models.chatglm3 import ChatGLM3Config, ChatGLM3ForConditionalGeneration, ChatGLM3Tokenizer

    path = Path(path)
    tokenizer = ChatGLM3Tokenizer.from_pretrained(str(tokenizer_dir), chatglm_version=version)
    fields = {**TINY_CHATGLM3, "padded_vocab_size": padded_vocab_size(tokenizer, 64), "chatglm_version": version}
    fields.update(config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ChatGLM3ForConditionalGeneration(ChatGLM3Config(**fields))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# GLM-4's chat template in the shape of THUDM's GLM-4-0414 / glm-4-9b-chat-hf tokenizer_config.json: `[gMASK]<sop>`,
# the tools as a system message listing each function as indented JSON, system messages first, then
# `<|user|>\n…`, `<|assistant|>\n…` (a tool call: `<|assistant|>{tool name}\n{JSON arguments}`), `<|observation|>\n…`,
# and `<|assistant|>` as the generation prompt; no end-of-turn token (the model stops at the next role token).
# Written after GLM-4-Z1-Rumination-32B-0414's template as its GGUF conversion log prints it and the GLM-Z1-0414
# template quoted in a project's constants.py (both found with the code search tools); the hf repo's own
# tokenizer_config.json could not be read here, so this is faithful to GLM-4's documented format rather than a copy.
GLM4_CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- if tools -%}<|system|>\n你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具"
    "{%- for tool in tools %}{%- set function = tool.function if tool.get('function') else tool %}\n\n"
    "## {{ function.name }}\n\n{{ function | tojson(indent=4, ensure_ascii=False) }}\n"
    "在调用上述函数时，请使用 Json 格式表示调用的参数。{%- endfor %}{%- endif -%}"
    "{%- for msg in messages %}{%- if msg.role == 'system' %}<|system|>\n{{ msg.content }}{%- endif %}{%- endfor %}"
    "{%- for message in messages if message.role != 'system' %}"
    "{%- set role = message['role'] %}{%- set content = message['content'] %}{%- set meta = message.get('metadata', '') %}"
    "{%- if role == 'user' %}<|user|>\n{{ content }}"
    "{%- elif role == 'assistant' and not meta %}<|assistant|>\n{{ content }}"
    "{%- elif role == 'assistant' and meta %}<|assistant|>{{ meta }}\n{{ content }}"
    "{%- elif role == 'observation' %}<|observation|>\n{{ content }}"
    "{%- endif %}{%- endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
GLM4_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
# Characters the tests' conversations and GLM-4's tools prompt use.
CHAT_CHARS = sorted(
    set(ALPHABET + string.ascii_uppercase + "\n\"'{}[]_()=`#/*+<>|°")
    | set("你是一个名为的人工智能助手。基于智谱公司训练语言模型开发，任务针对用户问题和要求提供适当答复支持可用工具在调用上述函数时请使用格式表示参数")
)


def _char_fast_tokenizer(specials: list[str], chat_template: str, prefix: list[str], **tokens):
    """A character-level fast tokenizer: `specials` first (matched whole in text), then `CHAT_CHARS`; `prefix`
    specials open every encoded text (as GLM-4's `[gMASK]<sop>`, a Llama's `<s>`)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(specials + ["<unk>"] * ("<unk>" not in specials) + CHAT_CHARS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    if prefix:
        single = " ".join(prefix) + " $A"
        backend.post_processor = processors.TemplateProcessing(single=single, special_tokens=[(t, vocab[t]) for t in prefix])
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=chat_template, unk_token="<unk>", **tokens)


def glm4_tokenizer():
    """GLM-4's special tokens (at its own relative positions), `[gMASK]<sop>` before every text, its chat template."""
    return _char_fast_tokenizer(
        GLM4_SPECIALS, GLM4_CHAT_TEMPLATE, ["[gMASK]", "<sop>"], eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def tiny_glm4_dir(path, model_type: str = "glm", seed: int = 0, **config_overrides) -> Path:
    """Save a random-init tiny GLM-4 at `path`: `model_type` "glm" (GlmForCausalLM, glm-4-9b-chat-hf) or "glm4"
    (Glm4ForCausalLM, GLM-4-0414), with `glm4_tokenizer()` and a generation config whose eos ids are GLM-4's
    (`<|endoftext|>`, `<|user|>`, `<|observation|>`)."""
    import torch
    from transformers import GenerationConfig, Glm4Config, Glm4ForCausalLM, GlmConfig, GlmForCausalLM

    classes = {"glm": (GlmConfig, GlmForCausalLM), "glm4": (Glm4Config, Glm4ForCausalLM)}
    config_class, model_class = classes[model_type]
    path = Path(path)
    tokenizer = glm4_tokenizer()
    eos = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|user|>", "<|observation|>"])
    fields = {
        **TINY_LLAMA,
        "head_dim": 16,
        "vocab_size": padded_vocab_size(tokenizer, 64),
        "eos_token_id": eos,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }
    fields.update(config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config_class(**fields))
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# A small chat template in the OpenAI shape (tool_calls on assistant messages, `tool` results), each turn ended by eos
# and a newline, as Qwen's <|im_end|>\n does.
LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{%- if tools %}<|system|>\n{{ tools | tojson }}</s>{{ '\\n' }}{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}<|assistant|>\n{{ m.content }}"
    "{%- for c in m.tool_calls or [] %}<call>{{ c.function | tojson }}</call>{%- endfor %}</s>{{ '\\n' }}"
    "{%- elif m.role == 'tool' %}<|tool|>\n{{ m.content }}</s>{{ '\\n' }}"
    "{%- else %}<|{{ m.role }}|>\n{{ m.content }}</s>{{ '\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tiny_chat_llama_dir(path, seed: int = 0, **config_overrides) -> Path:
    """Save a random-init tiny Llama whose character-level tokenizer has `LLAMA_CHAT_TEMPLATE` at `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = _char_fast_tokenizer(
        ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"],
        LLAMA_CHAT_TEMPLATE,
        ["<s>"],
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fields = {
        **TINY_LLAMA,
        "vocab_size": padded_vocab_size(tokenizer, 64),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }
    fields.update(config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**fields))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
