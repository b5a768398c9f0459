"""What a DPO step costs with pre-computed reference log-probs against a live reference forward — one run.

Prints one JSON line:
  dpo_step: seconds per optimizer step (forward on [chosen; rejected], backward, AdamW) with the
            reference log-probs read from the batch, over the same step with the reference
            computed by a forward of the frozen copy (full fine-tuning) or of the adapter-disabled
            model (``--lora``); median over steps (target ≤ 0.7). Peak memory of each: CUDA
            ``max_memory_allocated``, or on CPU the process's peak resident set.

Each setting runs in its own process so that its peak is its own; batches are the recipe's:
5 pairs, a prompt of ``--prompt`` tokens and replies of ``--reply`` tokens (random ids).

    python bench/dpo_step.py [--model smollm2-135m-instruct] [--device cuda] [--steps 3] [--lora]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(args) -> dict:
    """One setting, in this process: median step seconds and the peak memory."""
    from lantern.datamodules.preference import Pair, collate_preference, reference_logprobs
    from lantern.lightning_modules.dpo import DPO, LoRA

    torch.manual_seed(0)
    dev = args.device
    module = DPO(args.model, reference=args.reference, lora=LoRA() if args.lora else None).to(dev)
    vocab = module.model.get_input_embeddings().weight.shape[0]
    ids = lambda n: torch.randint(0, vocab, (n,)).tolist()  # noqa: E731
    pairs = [Pair(ids(args.prompt), ids(args.reply), ids(args.reply)) for _ in range(args.batch)]
    if args.reference == "precomputed":  # as the pair builder stores them: computed once, beforehand
        refs = reference_logprobs(module.model, pairs, 0, batch_size=args.batch)
        pairs = [p._replace(ref=r) for p, r in zip(pairs, refs)]
    batch = {k: v.to(dev) for k, v in collate_preference(pairs, 0).items()}
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-7)
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    module.train()

    def step():
        with torch.autocast(device_type=dev.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            terms, _ = module.terms(batch)
        terms.loss.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # AdamW's state exists from here on
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        _sync(dev)
        start = time.perf_counter()
        step()
        _sync(dev)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if dev.startswith("cuda") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": statistics.median(times), "peak_bytes": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=5, help="pairs per step (the recipe's 5)")
    ap.add_argument("--prompt", type=int, default=320, help="prompt tokens (FRIT's two worked examples and a problem)")
    ap.add_argument("--reply", type=int, default=60, help="tokens per reply")
    ap.add_argument("--lora", action="store_true", help="train a LoRA adapter; the live reference disables it")
    ap.add_argument("--reference", choices=("precomputed", "live"), help=argparse.SUPPRESS)  # one setting (a child)
    args = ap.parse_args()
    if args.reference:
        print(json.dumps(measure(args)), flush=True)
        return

    results = {}
    for reference in ("live", "precomputed"):
        cmd = [sys.executable, __file__, "--reference", reference, *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()
        results[reference] = json.loads(out[-1])
    live, pre = results["live"], results["precomputed"]
    print(json.dumps({"benchmark": "dpo_step", "model": args.model, "device": args.device,
                      "training": "lora" if args.lora else "full", "pairs": args.batch, "prompt": args.prompt,
                      "reply": args.reply, "steps": args.steps,
                      "precomputed_s": round(pre["seconds"], 4), "live_s": round(live["seconds"], 4),
                      "ratio": round(pre["seconds"] / live["seconds"], 3), "target_ratio_max": 0.7,
                      "precomputed_peak_mib": round(pre["peak_bytes"] / 2**20, 1),
                      "live_peak_mib": round(live["peak_bytes"] / 2**20, 1),
                      "peak_ratio": round(pre["peak_bytes"] / live["peak_bytes"], 3),
                      "peak": "cuda max_memory_allocated" if args.device.startswith("cuda") else "process peak RSS"}),
          flush=True)


if __name__ == "__main__":
    main()
