"""Tiny random-init models in the hub layout, for tests of every command.

- `tiny_chatglm_dir`: a native ChatGLM-6B-architecture model (2 layers, hidden 64) with the demo's
  tokenizer (`instructglm/demo/assets/tokenizer`, the ChatGLM-6B sentencepiece layout, ~530 pieces),
  its special ids read from that tokenizer by name.
- `tiny_llama_dir`: a `LlamaConfig` model with a word-level `tokenizers` tokenizer, for the
  "any causal LM" paths.

Both write `config.json` + `model.safetensors` + tokenizer files with `save_pretrained`, so
`AutoTokenizer.from_pretrained(path)` and `AutoModelForCausalLM.from_pretrained(path)` load them
(after `import instructglm` for ChatGLM). Same seed, same weights.
"""

from __future__ import annotations

from pathlib import Path

TINY_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


def tiny_chatglm_dir(path, seed: int = 0, **config_overrides) -> Path:
    """Save a random-init tiny native ChatGLM + the demo tokenizer at `path`; return the path.

    The demo's own model (2 layers, hidden 64, 4 heads, vocab and special ids read from the
    tokenizer); `config_overrides` are `ChatGLMConfig` fields, e.g. `hidden_size=32`.
    """
    from instructglm.demo.pipeline import build_tiny_chatglm

    return build_tiny_chatglm(path, seed=seed, **config_overrides)


def tiny_llama_dir(path, seed: int = 0) -> Path:
    """Save a random-init tiny Llama + a word-level fast tokenizer (bos/eos/pad) at `path`."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
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
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    config = LlamaConfig(
        **TINY_LLAMA,
        vocab_size=-(-len(tokenizer) // 64) * 64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
