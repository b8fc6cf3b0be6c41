"""Decode speed of the native ChatGLM-6B architecture: plain model vs LoRA unmerged vs merged.

    python bench/decode_speed.py                                   # CPU, a small random model
    python bench/decode_speed.py --device cuda --real-shape        # the 6B shape, fp16, on a GPU
    python bench/decode_speed.py --attn sdpa,eager                 # each variant under both attention backends

For batch sizes 1 and 8 it times `model.generate` (greedy, KV cache, exactly --new_tokens new
tokens per row) on: the plain base model ("generate baseline", no peft), the same model wrapped
by peft with a LoRA adapter on `query_key_value` (r=8, unmerged: every step runs the extra
low-rank matmuls), and that adapter merged into the weights (`merge_and_unload`: the base's cost
again). Weights are random; speed does not depend on them. Prints a markdown table of decode
tokens/s (new tokens x batch / wall time, prefill included), `--out FILE` also writes it.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

SMALL = {"hidden_size": 256, "num_layers": 4, "num_attention_heads": 8, "inner_hidden_size": 1024, "vocab_size": 4096}
REAL_6B = {"hidden_size": 4096, "num_layers": 28, "num_attention_heads": 32, "inner_hidden_size": 16384, "vocab_size": 130528}


def build(shape: dict, device: str, dtype: torch.dtype, attn: str = "sdpa"):
    import instructglm  # noqa: F401  (registers ChatGLM)
    from instructglm.models.chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration

    config = ChatGLMConfig(**shape, max_sequence_length=2048, bos_token_id=shape["vocab_size"] - 2, eos_token_id=shape["vocab_size"] - 1,
                           pad_token_id=3, mask_token_id=shape["vocab_size"] - 4, gmask_token_id=shape["vocab_size"] - 3)
    config._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        model = ChatGLMForConditionalGeneration(config).to(dtype)
    return model.eval()


def prompts(config, batch: int, length: int, device: str) -> torch.Tensor:
    """Random ids ending in ChatGLM's `[gMASK] <sop>`, as the tokenizer would produce."""
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(10, config.vocab_size - 10, (batch, length), generator=g)
    ids[:, -2], ids[:, -1] = config.gmask_token_id, config.bos_token_id
    return ids.to(device)


def _timed_generate(model, ids: torch.Tensor, new_tokens: int, device: str) -> float:
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=3)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    assert out.shape[1] == ids.shape[1] + new_tokens
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
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args()
    from peft import LoraConfig, get_peft_model

    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "float16"))
    shape = REAL_6B if args.real_shape else SMALL
    lora = LoraConfig(r=8, lora_alpha=32, target_modules=["query_key_value"], init_lora_weights=False)
    attns = args.attn.split(",")
    variants = {}
    for attn in attns:
        base = build(shape, args.device, dtype, attn)
        tag = f" [{attn}]" if len(attns) > 1 else ""
        # Separate copies, so merging one never alters another (6B in fp16 is ~12 GB: three fit an H100).
        variants[f"generate baseline (no peft){tag}"] = base
        variants[f"LoRA unmerged{tag}"] = get_peft_model(copy.deepcopy(base), lora).eval()
        variants[f"LoRA merged{tag}"] = get_peft_model(copy.deepcopy(base), lora).merge_and_unload().eval()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    rows = {name: [] for name in variants}
    for b in batches:
        for name, speed in measure(variants, prompts(base.config, b, args.prompt_len, args.device), args.new_tokens, args.repeats, args.device).items():
            rows[name].append(speed)

    cfg = base.config
    title = (f"decode tokens/s — ChatGLM {cfg.num_layers}x{cfg.hidden_size}, {dtype}, {args.device}, "
             f"prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, best of {args.repeats}, attention {args.attn}")
    lines = [title, "", "| variant | " + " | ".join(f"batch {b}" for b in batches) + " |", "|---|" + "---:|" * len(batches)]
    lines += [f"| {name} | " + " | ".join(f"{v:.1f}" for v in speeds) + " |" for name, speeds in rows.items()]
    if {"sdpa", "eager"} <= set(attns):
        sdpa, eager = rows["generate baseline (no peft) [sdpa]"], rows["generate baseline (no peft) [eager]"]
        lines += ["", "sdpa vs eager (no peft): " + ", ".join(f"batch {b} {s / e:.2f}x" for b, s, e in zip(batches, sdpa, eager))]
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
