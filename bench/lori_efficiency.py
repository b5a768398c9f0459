"""What LoRI saves over peft LoRA: trainable parameters, optimizer state, step time — one run.

Prints one JSON line per figure:
  lori_params:          trainable parameters of LoRI-D and LoRI-S over peft LoRA, measured and by
                        the paper's formulas (LoRI-S: (1−s)·Σd_out / Σ(d_in+d_out), ≈ 0.051 on SmolLM2).
  lori_optimizer_state: bytes of AdamW state after one real step; LoRI-S keeps state for the kept
                        entries only (the authors' gradient mask keeps it for all of B).
  lori_step_time:       forward + backward + AdamW step on the same batch, median over steps after
                        warm-up, the three models interleaved (target: ratio to LoRA ≤ 1.05).

The LoRI-S mask is a global top-(1−s) mask of a random B: which entries are kept does not change
the cost.

    python bench/lori_efficiency.py [--model tiny-llama] [--device cuda] [--steps 7] [--batch 4] [--seq 64]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from lantern.models import load_model
from lantern.models.lori import SEVEN, add_lori, count_trainable, magnitude_masks, projection_shapes, trainable_counts


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--alpha", type=float, default=64)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=7)
    args = ap.parse_args()
    from peft import LoraConfig, get_peft_model

    dev, r, s = args.device, args.rank, args.sparsity
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    base = load_model(args.model, seed=0)
    shapes = projection_shapes(base, SEVEN)
    gen = torch.Generator().manual_seed(0)
    masks = magnitude_masks({n: torch.randn(d_out, r, generator=gen) for n, (d_out, _) in shapes.items()}, s)

    models = {"lora": get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=args.alpha, lora_dropout=0.0,
                                                                      target_modules=list(SEVEN)))}
    models["lori_d"] = copy.deepcopy(base)
    add_lori(models["lori_d"], rank=r, alpha=args.alpha, target_modules=SEVEN)
    models["lori_s"] = copy.deepcopy(base)
    add_lori(models["lori_s"], rank=r, alpha=args.alpha, target_modules=SEVEN, masks=masks)
    del base

    counts = {k: count_trainable(m) for k, m in models.items()}
    formula = {k: trainable_counts(shapes, k.replace("_", "-"), r, s) for k in models}
    sum_out = sum(o for o, _ in shapes.values())
    sum_all = sum(o + i for o, i in shapes.values())
    print(json.dumps({"benchmark": "lori_params", "model": args.model, "rank": r, "alpha": args.alpha, "sparsity": s,
                      "modules": len(shapes), **{f"{k}_params": v for k, v in counts.items()},
                      "counts_equal_formulas": counts == formula,
                      "lori_d_ratio": round(counts["lori_d"] / counts["lora"], 4),
                      "lori_d_ratio_formula": round(sum_out / sum_all, 4),
                      "lori_s_ratio": round(counts["lori_s"] / counts["lora"], 4),
                      "lori_s_ratio_formula": round((1 - s) * sum_out / sum_all, 4)}), flush=True)

    ids = torch.randint(0, 256, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)).to(dev)
    steps, opts = {}, {}
    for k, m in models.items():
        m.to(dev).train()
        opts[k] = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)

        def step(m=m, opt=opts[k]):
            with torch.autocast(device_type=dev.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
                loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        steps[k] = step
        step()  # one real step: AdamW's state now exists
    state = {k: _state_bytes(o) for k, o in opts.items()}
    print(json.dumps({"benchmark": "lori_optimizer_state", "model": args.model,
                      **{f"{k}_bytes": v for k, v in state.items()},
                      "lori_d_ratio": round(state["lori_d"] / state["lora"], 4),
                      "lori_s_ratio": round(state["lori_s"] / state["lora"], 4)}), flush=True)

    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times = {k: [] for k in steps}
    for _ in range(args.steps):  # interleaved, so drift hits all three alike
        for k, step in steps.items():
            _sync(dev)
            start = time.perf_counter()
            step()
            _sync(dev)
            times[k].append((time.perf_counter() - start) * 1e3)
    ms = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"benchmark": "lori_step_time", "model": args.model, "device": dev, "batch": args.batch,
                      "seq": args.seq, "steps": args.steps, **{f"{k}_ms": round(v, 2) for k, v in ms.items()},
                      "lori_d_ratio": round(ms["lori_d"] / ms["lora"], 3),
                      "lori_s_ratio": round(ms["lori_s"] / ms["lora"], 3), "target_ratio_max": 1.05}), flush=True)


if __name__ == "__main__":
    main()
