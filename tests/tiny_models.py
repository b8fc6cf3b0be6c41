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
