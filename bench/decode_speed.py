"""Decode speed of the native ChatGLM-6B architecture: plain model vs LoRA unmerged vs merged.

    python bench/decode_speed.py                                   # CPU, a small random model
    python bench/decode_speed.py --device cuda --real-shape        # the 6B shape, fp16, on a GPU
    python bench/decode_speed.py --attn sdpa,eager                 # each variant under both attention backends
    python bench/decode_speed.py --family chatglm3                 # the ChatGLM2/3 architecture instead

For batch sizes 1 and 8 it times `model.generate` (greedy, KV cache, exactly --new_tokens new
tokens per row) on: the plain base model ("generate baseline", no peft), the same model wrapped
by peft with a LoRA adapter on `query_key_value` (r=8, unmerged: every step runs the extra
low-rank matmuls), and that adapter merged into the weights (`merge_and_unload`: the base's cost
again); and the base model through the batching engine (`instructglm.infer.engine`, dynamic KV
cache, the batch's prompts submitted at once). Weights are random; speed does not depend on them.
Prints a markdown table of decode tokens/s (new tokens x batch / wall time, prefill included),
`--out FILE` also writes it.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

SMALL = {"hidden_size": 256, "num_layers": 4, "num_attention_heads": 8, "inner_hidden_size": 1024, "vocab_size": 4096}
REAL_6B = {"hidden_size": 4096, "num_layers": 28, "num_attention_heads": 32, "inner_hidden_size": 16384, "vocab_size": 130528}
# ChatGLM2/3: the same small width, and THUDM/chatglm3-6b's config.json
SMALL_V3 = {"hidden_size": 256, "num_layers": 4, "num_attention_heads": 8, "kv_channels": 32, "ffn_hidden_size": 688,
            "multi_query_attention": True, "multi_query_group_num": 2, "padded_vocab_size": 4096}
REAL_V3 = {"hidden_size": 4096, "num_layers": 28, "num_attention_heads": 32, "kv_channels": 128, "ffn_hidden_size": 13696,
           "multi_query_attention": True, "multi_query_group_num": 2, "padded_vocab_size": 65024}


def build(family: str, real_shape: bool, device: str, dtype: torch.dtype, attn: str = "sdpa"):
    import instructglm  # noqa: F401  (registers ChatGLM)

    if family == "chatglm3":
        from instructglm.models.chatglm3 import ChatGLM3Config, ChatGLM3ForConditionalGeneration

        config = ChatGLM3Config(**(REAL_V3 if real_shape else SMALL_V3), seq_length=2048, pad_token_id=0, eos_token_id=2)
        model_class = ChatGLM3ForConditionalGeneration
    else:
        from instructglm.models.chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration

        shape = REAL_6B if real_shape else SMALL
        config = ChatGLMConfig(**shape, max_sequence_length=2048, bos_token_id=shape["vocab_size"] - 2, eos_token_id=shape["vocab_size"] - 1,
                               pad_token_id=3, mask_token_id=shape["vocab_size"] - 4, gmask_token_id=shape["vocab_size"] - 3)
        model_class = ChatGLMForConditionalGeneration
    config._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class(config).to(dtype)
    return model.eval()


def prompts(config, batch: int, length: int, device: str) -> torch.Tensor:
    """Random ids; for ChatGLM-6B ending in its `[gMASK] <sop>`, as the tokenizer would produce."""
    g = torch.Generator().manual_seed(batch)
    vocab = getattr(config, "padded_vocab_size", None) or config.vocab_size
    ids = torch.randint(10, vocab - 10, (batch, length), generator=g)
    if hasattr(config, "gmask_token_id"):
        ids[:, -2], ids[:, -1] = config.gmask_token_id, config.bos_token_id
    return ids.to(device)


class EngineVariant:
    """The model served by the batching engine (dynamic cache), timed like `generate`: the rows submitted at once."""

    def __init__(self, model):
        from instructglm.infer.engine import BatchEngine

        self.engine = BatchEngine(model, None, max_batch_size=64, stop_ids=[], decode="dynamic")


def _timed_generate(model, ids: torch.Tensor, new_tokens: int, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    if isinstance(model, EngineVariant):
        from instructglm.infer.engine import GenerationRequest, generate_requests

        handles = generate_requests(model.engine, [GenerationRequest(row.tolist(), new_tokens) for row in ids])
        assert all(len(handle.token_ids) == new_tokens for handle in handles)
    else:
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=model.config.pad_token_id)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        assert out.shape[1] == ids.shape[1] + new_tokens
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(variants: dict, ids: torch.Tensor, new_tokens: int, repeats: int, device: str) -> dict:
    """Best tokens/s of each variant; the variants take turns every repeat, so drift in machine
    load (other processes on a shared CPU) hits them alike."""
    for model in variants.values():
        _timed_generate(model, ids, 2, device)  # warm-up
    best = {name: float("inf") for name in variants}
    for _ in range(repeats):
        for name, model in variants.items():
            best[name] = min(best[name], _timed_generate(model, ids, new_tokens, device))
    return {name: ids.shape[0] * new_tokens / seconds for name, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--real-shape", action="store_true", help="the 6B shape (28 x 4096) instead of the small one")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or float16/bfloat16 (GPU default float16)")
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch_sizes", default="1,8")
    parser.add_argument("--attn", default="sdpa", help="comma-separated attn_implementation values (sdpa, eager)")
    parser.add_argument("--family", default="chatglm", choices=["chatglm", "chatglm3"], help="ChatGLM-6B, or ChatGLM2/3")
    parser.add_argument("--variants", default="baseline,unmerged,merged,engine", help="comma-separated: which rows to time")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args()
    from peft import LoraConfig, get_peft_model

    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "float16"))
    wanted = set(args.variants.split(","))
    lora = LoraConfig(r=8, lora_alpha=32, target_modules=["query_key_value"], init_lora_weights=False)
    attns = args.attn.split(",")
    variants = {}
    for attn in attns:
        base = build(args.family, args.real_shape, args.device, dtype, attn)
        tag = f" [{attn}]" if len(attns) > 1 else ""
        # Separate copies, so merging one never alters another (6B in fp16 is ~12 GB: three fit an H100).
        if "baseline" in wanted:
            variants[f"generate baseline (no peft){tag}"] = base
        if "unmerged" in wanted:
            variants[f"LoRA unmerged{tag}"] = get_peft_model(copy.deepcopy(base), lora).eval()
        if "merged" in wanted:
            variants[f"LoRA merged{tag}"] = get_peft_model(copy.deepcopy(base), lora).merge_and_unload().eval()
        if "engine" in wanted:
            variants[f"engine (no peft){tag}"] = EngineVariant(base)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    rows = {name: [] for name in variants}
    for b in batches:
        for name, speed in measure(variants, prompts(base.config, b, args.prompt_len, args.device), args.new_tokens, args.repeats, args.device).items():
            rows[name].append(speed)

    cfg = base.config
    title = (f"decode tokens/s — {'ChatGLM2/3' if args.family == 'chatglm3' else 'ChatGLM-6B'} {cfg.num_layers}x{cfg.hidden_size}, {dtype}, {args.device}, "
             f"prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, best of {args.repeats}, attention {args.attn}")
    lines = [title, "", "| variant | " + " | ".join(f"batch {b}" for b in batches) + " |", "|---|" + "---:|" * len(batches)]
    lines += [f"| {name} | " + " | ".join(f"{v:.1f}" for v in speeds) + " |" for name, speeds in rows.items()]
    if {"sdpa", "eager"} <= set(attns) and "baseline" in wanted:
        sdpa, eager = rows["generate baseline (no peft) [sdpa]"], rows["generate baseline (no peft) [eager]"]
        lines += ["", "sdpa vs eager (no peft): " + ", ".join(f"batch {b} {s / e:.2f}x" for b, s, e in zip(batches, sdpa, eager))]
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
