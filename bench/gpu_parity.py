"""GPU parity of the native ChatGLM-6B against THUDM's goldens (part of bench/gpu_check.sh).

For each fixture layout and attention path: fp32 logits on the GPU vs the CPU goldens (TF32 off),
greedy generations batched with the 2-D padding mask, and bf16 agreement with fp32 (max |Δlogit|
and greedy-token agreement). Every logit of the padded forward, padding rows included, must be finite:
fully masked padding queries go through the GPU's fused sdpa kernels here. Prints a markdown table; exits non-zero if an fp32 check fails.
Needs the goldens: INSTRUCTGLM_SHARED (default ../shared) holding fixtures/chatglm6b.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

from tests.models.chatglm_helpers import ATTENTION, LAYOUTS, PAD, goldens  # noqa: E402


def check(fixtures: Path, layout: str, attn: str, device: str) -> tuple[str, bool]:
    import instructglm  # noqa: F401
    from transformers import AutoModelForCausalLM

    _, tensors = goldens(fixtures)
    ids = tensors["forward.input_ids"].to(device)
    mask2d = (ids != PAD).long()
    valid = tensors["forward.valid"].to(device)
    rows = []
    logits = {}
    finite = True
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(fixtures / layout, attn_implementation=attn, dtype=dtype).to(device).eval()
        with torch.no_grad():
            logits[dtype] = model(input_ids=ids, attention_mask=mask2d).logits.float()
            finite &= bool(torch.isfinite(logits[dtype]).all())
            generated = model.generate(input_ids=ids, attention_mask=mask2d, max_new_tokens=20, do_sample=False)
        rows.append(generated.cpu())
    golden = tensors["forward.logits"].to(device)
    fp32_err = (logits[torch.float32] - golden)[valid].abs().max().item()
    bf16_err = (logits[torch.bfloat16] - golden)[valid].abs().max().item()
    want = tensors["generate.sequences"]
    fp32_same = torch.equal(rows[0], want)
    bf16_agree = (rows[1] == want).float().mean().item()
    ok = fp32_err < 1e-4 and fp32_same and finite
    line = (f"| {layout} | {attn} | {fp32_err:.2e} | {'yes' if fp32_same else 'NO'} | {bf16_err:.3f} | {bf16_agree:.1%} "
            f"| {'yes' if finite else 'NO'} |")
    return line, ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # this process only: compare true fp32
    torch.backends.cudnn.allow_tf32 = False
    fixtures = Path(os.environ.get("INSTRUCTGLM_SHARED", REPO.parent / "shared")) / "fixtures" / "chatglm6b"
    print(f"device: {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}\n")
    print("| layout | attention | fp32 max abs Δlogit | fp32 greedy = golden | bf16 max abs Δlogit | bf16 greedy tokens = golden | all logits finite |")
    print("| --- | --- | ---: | :---: | ---: | ---: | :---: |")
    all_ok = True
    for layout in LAYOUTS:
        for attn in ATTENTION:
            line, ok = check(fixtures, layout, attn, args.device)
            print(line)
            all_ok &= ok
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
