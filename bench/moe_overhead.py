"""Cost of Default MoE routing and of MoE dispatch, measured in one run.

Prints one JSON line per figure:
  default_vs_topk_step: full training step (forward, backward, AdamW) of the MoE transformer
                        with Default vs TopK routing; the paper claims no significant overhead
                        (our target: ratio ≤ 1.05).
  moe_vs_dense_layer:   forward+backward of one MoE layer vs a dense SwiGLU FFN with the same
                        active parameters (hidden = K·d_expert): the price of routing + dispatch.

    python bench/moe_overhead.py [--device cuda] [--repeats 5] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from lantern.models.moe import DenseFeedForward, MoEFeedForward, MoETransformer

SIZES = {  # the tiny recipe, and a GPU-sized one
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, n_experts=8, top_k=2, d_expert=256, batch=16, seq=256),
    "medium": dict(d_model=1024, n_layers=8, n_heads=16, n_experts=8, top_k=2, d_expert=2816, batch=8, seq=2048),
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, steps: int, device: str) -> float:
    fn()  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / steps * 1e3


def _interleaved(fns: dict, steps: int, repeats: int, device: str) -> dict[str, float]:
    """Median over repeats, alternating the candidates so drift hits both alike."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(_time(fn, steps, device))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    cfg = dict(SIZES[args.size])
    batch, seq = cfg.pop("batch"), cfg.pop("seq")
    dev = args.device
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    ids = torch.randint(0, 257, (batch, seq + 1), device=dev)

    def train_step(model, opt):
        def step():
            with torch.autocast(device_type=dev.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
                out = model(ids[:, :-1])
                loss = F.cross_entropy(out.logits.flatten(0, 1).float(), ids[:, 1:].flatten()) + 0.01 * out.aux_loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    steps = {}
    for mode in ("default", "topk"):
        torch.manual_seed(0)
        model = MoETransformer(vocab_size=257, router_mode=mode, max_seq_len=seq, **cfg).to(dev).train()
        steps[mode] = train_step(model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    t = _interleaved(steps, args.steps, args.repeats, dev)
    print(json.dumps({"benchmark": "default_vs_topk_step", "size": args.size, "device": dev,
                      "default_ms": round(t["default"], 2), "topk_ms": round(t["topk"], 2),
                      "ratio": round(t["default"] / t["topk"], 3), "target_ratio_max": 1.05}))

    d, k, f = cfg["d_model"], cfg["top_k"], cfg["d_expert"]
    torch.manual_seed(0)
    moe = MoEFeedForward(d, f, cfg["n_experts"], k, "default").to(dev).train()
    dense = DenseFeedForward(d, k * f).to(dev).train()
    x = torch.randn(batch * seq, d, device=dev, requires_grad=True)

    def layer_step(layer, is_moe):
        def step():
            with torch.autocast(device_type=dev.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
                y = layer(x)[0] if is_moe else layer(x)
            y.float().pow(2).mean().backward()
        return step

    t = _interleaved({"moe": layer_step(moe, True), "dense": layer_step(dense, False)}, args.steps, args.repeats, dev)
    print(json.dumps({"benchmark": "moe_vs_dense_layer", "size": args.size, "device": dev,
                      "tokens": batch * seq, "active_params_equal": True,
                      "moe_ms": round(t["moe"], 2), "dense_ms": round(t["dense"], 2),
                      "ratio": round(t["moe"] / t["dense"], 3)}))


if __name__ == "__main__":
    main()
