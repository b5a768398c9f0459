"""Forward-pass cost of the interpretability hooks, against the plain forward, in one run.

Prints one JSON line per hook: ActivationCache (residual stream of every layer, last
position) and HeadAblation (10% of heads zeroed), each as a ratio to the same model's plain
forward (target ≤ 1.05). SinkMeasurement is not here: it needs eager attention by design.

    python bench/hook_overhead.py [--model smollm2-135m-instruct] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext

import torch

from lantern.callbacks import ActivationCache, HeadAblation
from lantern.models import get_adapter, load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    model = load_model(args.model, seed=0).to(args.device)
    adapter = get_adapter(model)
    n_layers, n_heads = adapter.num_layers(model), adapter.num_heads(model)
    ids = torch.randint(0, min(model.config.vocab_size, 256), (args.batch, args.seq), device=args.device)
    g = torch.Generator().manual_seed(0)
    picked = torch.randperm(n_layers * n_heads, generator=g)[: max(1, n_layers * n_heads // 10)].tolist()
    heads = [(i // n_heads, i % n_heads) for i in picked]

    variants = {
        "plain": lambda: nullcontext(),
        "activation_cache": lambda: ActivationCache(sites=["resid_post"], positions="last").applied(model),
        "head_ablation": lambda: HeadAblation(heads).applied(model),
    }

    def run(make_ctx) -> float:
        with torch.inference_mode(), make_ctx():
            model(ids)  # warm-up
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                model(ids)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            return (time.perf_counter() - start) / args.steps * 1e3

    times = {k: [] for k in variants}
    for _ in range(args.repeats):  # interleaved, so drift hits every variant alike
        for k, make in variants.items():
            times[k].append(run(make))
    plain = statistics.median(times["plain"])
    for k in ("activation_cache", "head_ablation"):
        t = statistics.median(times[k])
        print(json.dumps({"benchmark": f"{k}_forward", "model": args.model, "device": args.device,
                          "tokens": args.batch * args.seq, "plain_ms": round(plain, 2), "hooked_ms": round(t, 2),
                          "ratio": round(t / plain, 3), "target_ratio_max": 1.05}))


if __name__ == "__main__":
    main()
