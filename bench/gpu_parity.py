"""GPU parity of the native ChatGLM-6B and ChatGLM3-6B against THUDM's goldens (part of bench/gpu_check.sh).

For each model, fixture layout and attention path (eager, sdpa; FlexAttention on the `tiny` layout):
fp32 logits on the GPU vs the CPU goldens (TF32 off), greedy generations batched with the 2-D
padding mask, and bf16 agreement with the goldens (max |Δlogit| and greedy-token agreement);
every logit of the padded forward, padding rows included, must be finite (fully masked padding
queries go through the GPU's fused kernels here). FlexAttention runs compiled, as in training:
its rows check the logits only (each new KV length of a generation would compile anew).
Then training in fp32: the goldens' loss and `query_key_value` gradients under every attention
path (FlexAttention's backward exists on GPUs only), and packed rows: each row's loss and
gradients in a pack against the row alone, under sdpa and flex_attention (<= 1e-5).
Prints markdown tables; exits non-zero if an fp32 check fails.
Needs the goldens: INSTRUCTGLM_SHARED (default ../shared) holding fixtures/chatglm6b and fixtures/chatglm3.

    python bench/gpu_parity.py                  # on the GPU
    python bench/gpu_parity.py --device cpu     # the dry run: FlexAttention forward compiled on the CPU, no flex backward
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

from tests.models.chatglm_helpers import EOP, GMASK, LAYOUTS, PAD, SOP, goldens  # noqa: E402

FAMILIES = {"chatglm-6b": ("chatglm6b", LAYOUTS), "chatglm3-6b": ("chatglm3", ("tiny", "tiny_safetensors"))}
ATTENTION = ("eager", "sdpa", "flex_attention")
IGNORE = -100


def worst(values) -> float:
    """The largest of `values`, infinity if any is NaN or infinite (Python's max would skip a NaN)."""
    values = list(values)
    return float("inf") if any(not math.isfinite(v) for v in values) else max(values, default=0.0)


def load(path: Path, attn: str, dtype, device):
    import instructglm  # noqa: F401  (registers the native classes)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=dtype).to(device)


def family_goldens(family: str, fixtures: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if family == "chatglm-6b":
        return goldens(fixtures)
    from safetensors.torch import load_file

    tiny = fixtures / "tiny"
    return json.loads((tiny / "goldens.json").read_text()), load_file(tiny / "goldens.safetensors")


def forward_inputs(family: str, g: dict) -> tuple[dict, torch.Tensor]:
    """The padded forward's inputs (the 2-D mask form) and the positions its logits are compared at."""
    if family == "chatglm-6b":
        ids = g["forward.input_ids"]
        return {"input_ids": ids, "attention_mask": (ids != PAD).long()}, g["forward.valid"]
    # ChatGLM3: pads follow THUDM's rule (a pad query sees everything) in every path, so every position compares
    return {"input_ids": g["forward.input_ids"], "attention_mask": g["forward.attention_mask"]}, None


def check_forward(family: str, fixtures: Path, layout: str, attn: str, device: str) -> tuple[str, bool]:
    _, g = family_goldens(family, fixtures)
    inputs, valid = forward_inputs(family, g)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    golden = g["forward.logits"].to(device)
    if valid is None:
        valid = torch.ones(golden.shape[:2], dtype=torch.bool)
    valid = valid.to(device)
    generate_ids = g["generate.input_ids" if family == "chatglm3-6b" else "forward.input_ids"].to(device)
    generate_mask = (g["generate.attention_mask"] if family == "chatglm3-6b" else (g["forward.input_ids"] != PAD).long()).to(device)
    want = g["generate.sequences"]
    generates = attn != "flex_attention"
    errors, finite, sequences = {}, True, {}
    for dtype in (torch.float32, torch.bfloat16):
        if attn == "flex_attention" and dtype == torch.bfloat16:
            continue  # one compile less; bf16 FlexAttention is what gpu_train.py trains with
        model = load(fixtures / layout, attn, dtype, device).eval()
        with torch.no_grad():
            logits = model(**inputs).logits.float()
            finite &= bool(torch.isfinite(logits).all())
            errors[dtype] = (logits - golden)[valid].abs().max().item()
            if generates:
                sequences[dtype] = model.generate(
                    input_ids=generate_ids, attention_mask=generate_mask, max_new_tokens=20, do_sample=False
                ).cpu()
    fp32_same = torch.equal(sequences[torch.float32], want) if generates else None
    ok = errors[torch.float32] < 1e-4 and finite and fp32_same is not False

    def show(value, pattern):
        return "n/a" if value is None else format(value, pattern)

    bf16_agree = (sequences[torch.bfloat16] == want).float().mean().item() if generates else None
    same = "n/a" if fp32_same is None else ("yes" if fp32_same else "NO")
    line = (f"| {family} | {layout} | {attn} | {errors[torch.float32]:.2e} | {same} | "
            f"{show(errors.get(torch.bfloat16), '.3f')} | {show(bf16_agree, '.1%')} | {'yes' if finite else 'NO'} |")
    return line, ok


def check_training(family: str, fixtures: Path, attn: str, device: str) -> tuple[str, bool]:
    """fp32 loss and query_key_value gradients of the goldens' training batch under `attn`."""
    meta, g = family_goldens(family, fixtures)
    model = load(fixtures / "tiny", attn, torch.float32, device).train()
    if family == "chatglm-6b":
        inputs = {"input_ids": g["train.input_ids"], "labels": g["train.labels"]}
    else:
        inputs = {k: g[f"train.{k}"] for k in ("input_ids", "attention_mask", "position_ids", "labels")}
    out = model(**{k: v.to(device) for k, v in inputs.items()})
    out.loss.backward()
    loss_error = worst([abs(out.loss.item() - g["train.loss"][0].item())])
    parameters = dict(model.named_parameters())
    names = [n.removeprefix("train.grad.") for n in g if n.startswith("train.grad.")]
    grad_error = worst((parameters[n].grad.cpu() - g[f"train.grad.{n}"]).abs().max().item() for n in names)
    norms = meta.get("train_grad_norms_query_key_value", {})
    norm_error = worst(abs(parameters[n].grad.norm().item() / norm - 1) for n, norm in norms.items())
    ok = loss_error < 1e-5 and grad_error < 1e-5 and norm_error < 1e-4
    return f"| {family} | golden batch | {attn} | {loss_error:.2e} | {grad_error:.2e} | {norm_error:.1e} |", ok


def packed_rows(family: str, config, count: int = 3) -> list[dict]:
    """Training rows in each family's layout (random ids, the tiny fixtures' special ids)."""
    generator = torch.Generator().manual_seed(7)
    rows = []
    for prompt, answer in [(5, 9), (17, 4), (9, 7)][:count]:
        body = torch.randint(5, 999, (prompt + answer,), generator=generator).tolist()
        if family == "chatglm-6b":
            ids = body[:prompt] + [GMASK, SOP] + body[prompt:] + [EOP]
            rows.append({"input_ids": ids, "seq_len": prompt + 2})
        else:
            ids = [1001, 1003] + body + [config.eos_token_id]
            rows.append({"input_ids": ids, "seq_len": prompt + 2})
    return rows


def check_packing(family: str, fixtures: Path, attn: str, device: str) -> tuple[str, bool]:
    """Each packed row's loss and gradients against the row alone, in fp32 under `attn`."""
    from instructglm.train.collator import CausalLMCollator
    from instructglm.train.packing import PackedCollator

    model = load(fixtures / "tiny", attn, torch.float32, device).train()
    model.config.use_cache = False
    tail = 1 if family == "chatglm-6b" else 0
    pad = model.config.pad_token_id
    rows = packed_rows(family, model.config)
    batch = PackedCollator(pad_token_id=pad, labelled_prompt_tail=tail, attention="segment_ids", pad_to_multiple_of=64)(
        [{"rows": rows}]
    )
    batch = {k: v.to(device) for k, v in batch.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shifted = F.pad(batch["labels"], (0, 1), value=IGNORE)[:, 1:]
    losses = F.cross_entropy(logits.float().transpose(1, 2), shifted, ignore_index=IGNORE, reduction="none")
    trained = [p for p in model.parameters() if p.requires_grad]
    alone = CausalLMCollator(pad_token_id=pad, labelled_prompt_tail=tail)
    loss_errors, grad_errors = [], []
    for k in range(len(rows)):
        in_row = (batch["attention_mask"] == k + 1) & (shifted != IGNORE)
        row_loss = losses[in_row].sum() / in_row.sum()
        reference = model(**{n: v.to(device) for n, v in alone([rows[k]]).items()}).loss
        loss_errors.append(abs(row_loss.item() - reference.item()))
        got = torch.autograd.grad(row_loss, trained, retain_graph=True, allow_unused=True)
        want = torch.autograd.grad(reference, trained, allow_unused=True)
        grad_errors += [(a - b).abs().max().item() for a, b in zip(got, want) if a is not None and b is not None]
    loss_error, grad_error = worst(loss_errors), worst(grad_errors)
    ok = loss_error <= 1e-5 and grad_error <= 1e-5
    return f"| {family} | {len(rows)} rows packed vs alone | {attn} | {loss_error:.2e} | {grad_error:.2e} | |", ok


def guarded(check, family: str, *args) -> tuple[str, bool]:
    """`check(family, *args)`, or a failed row naming the exception (one broken check must not hide the others)."""
    try:
        return check(family, *args)
    except Exception as error:  # noqa: BLE001
        traceback.print_exc()
        message = str(error).splitlines()[0][:160] if str(error) else ""
        names = " | ".join(str(a) for a in args[1:-1])
        return f"| {family} | {names} | ERROR {type(error).__name__}: {message} |", False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--attention", default=",".join(ATTENTION), help="comma-separated attn_implementation values")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # this process only: compare true fp32
    torch.backends.cudnn.allow_tf32 = False
    shared = Path(os.environ.get("INSTRUCTGLM_SHARED", REPO.parent / "shared")) / "fixtures"
    attentions = [a for a in args.attention.split(",") if a]
    cuda = args.device.startswith("cuda")
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}\n")
    print("| model | layout | attention | fp32 max abs Δlogit | fp32 greedy = golden | bf16 max abs Δlogit "
          "| bf16 greedy tokens = golden | all logits finite |")
    print("| --- | --- | --- | ---: | :---: | ---: | ---: | :---: |")
    all_ok = True
    # eval-mode checks first: transformers compiles FlexAttention anew whenever training mode flips
    for family, (fixture_dir, layouts) in FAMILIES.items():
        for layout in layouts:
            for attn in attentions:
                if attn == "flex_attention" and layout != "tiny":
                    continue
                line, ok = guarded(check_forward, family, shared / fixture_dir, layout, attn, args.device)
                if not ok and not cuda and attn == "flex_attention" and "InductorError" in line:
                    # the CPU dry run: torch's CPU FlexAttention compiler failed, not our code
                    line, ok = line.replace("ERROR", "n/a on the CPU: torch's FlexAttention compile failed,"), True
                print(line, flush=True)
                all_ok &= ok
    print("\n| model | batch | attention | fp32 max abs Δloss | fp32 max abs Δgrad | qkv grad norm rel. Δ |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for family, (fixture_dir, _) in FAMILIES.items():
        for attn in attentions:
            if attn == "flex_attention" and not cuda:
                print(f"| {family} | golden batch, packed rows | flex_attention | n/a: no FlexAttention backward on the CPU | | |")
                continue
            for check in (check_training, check_packing):
                if check is check_packing and attn == "eager":
                    continue
                line, ok = guarded(check, family, shared / fixture_dir, attn, args.device)
                print(line, flush=True)
                all_ok &= ok
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
