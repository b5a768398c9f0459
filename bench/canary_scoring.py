"""Canaries scored per second, batched against one at a time — one run.

Prints one JSON line:
  canary_scoring: canaries per second when the audit scores them in batches of ``--batch`` (one
                  forward each, output layer on the secret's positions only: what validation of
                  ``CanaryFineTuning`` runs), over the same scores computed one canary per forward
                  (a loop over the pool, the way a per-example audit script is often written);
                  best of ``--steps`` passes each. Both give the same scores (checked).

    python bench/canary_scoring.py [--model smollm2-135m-instruct] [--canaries 200] [--batch 100] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lantern.datamodules.canaries import make_canaries
from lantern.models import completion_logprobs, load_model, load_tokenizer


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def score(model, ids: torch.Tensor, secret: torch.Tensor, batch: int) -> torch.Tensor:
    """Mean loss on each canary's secret, ``batch`` canaries per forward."""
    out = [-completion_logprobs(model, i, torch.ones_like(i), s).mean for i, s in zip(ids.split(batch), secret.split(batch))]
    return torch.cat(out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--canaries", type=int, default=200)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--prefix-len", type=int, default=49)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3, help="passes over the pool per setting (best taken)")
    args = parser.parse_args(argv)
    tok = load_tokenizer(args.model)
    c = make_canaries("random", args.canaries, tok, prefix_len=args.prefix_len, seed=0,
                      train_tokens=torch.arange(tok.vocab_size).numpy())
    model = load_model(args.model, seed=0).to(args.device)
    ids, secret = c.ids.to(args.device), c.secret_mask.to(args.device)
    times, results = {}, {}
    for name, batch in (("batched", args.batch), ("one_at_a_time", 1)):
        score(model, ids[: 2 * batch], secret[: 2 * batch], batch)  # warm-up
        best = float("inf")
        for _ in range(args.steps):
            _sync(args.device)
            start = time.perf_counter()
            results[name] = score(model, ids, secret, batch)
            _sync(args.device)
            best = min(best, time.perf_counter() - start)
        times[name] = best
    same = torch.allclose(results["batched"], results["one_at_a_time"], atol=1e-3, rtol=1e-4)
    row = {"benchmark": "canary_scoring", "model": args.model, "device": args.device, "canaries": args.canaries,
           "batch": args.batch, "batched_per_s": round(args.canaries / times["batched"], 1),
           "one_at_a_time_per_s": round(args.canaries / times["one_at_a_time"], 1),
           "ratio": round(times["one_at_a_time"] / times["batched"], 2), "same_scores": bool(same)}
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
