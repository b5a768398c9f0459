"""What ALS costs over plain greedy decoding, and what the iterative baseline costs over ALS — one run.

Prints one JSON line per claim:
  als_time_per_token:          ALS decoding (α = 0.3, τ = 0.1, the nudge kept out of the KV cache)
                               over greedy, seconds per generated token, the two interleaved, median
                               over repeats (target ≤ 1.05).
  latent_seek_time_per_problem: the LatentSeek-style per-problem optimisation (10 rounds) over ALS,
                               seconds per problem on the same problems (target ≥ 3).

The prompts are the ALS recipe's: held-out arithmetic problems with two worked examples. The
steering vector is a fixed random unit vector unless ``--vector`` names a calibrated one: what the
gate decides changes the text, not the cost per token.

    python bench/als_speed.py [--model smollm2-135m-instruct] [--device cuda] [--problems 32] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lantern.datamodules import ReasoningProblems
from lantern.lightning_modules.als import latent_seek
from lantern.models import get_adapter, load_model, load_tokenizer
from lantern.models.generation import Sampling, generate
from lantern.models.steering import ALSSteer, Direction


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--vector", default=None, help="a direction file (als_vector.safetensors); default: random")
    ap.add_argument("--problems", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="interleaved repeats of greedy and ALS")
    ap.add_argument("--latent-steps", type=int, default=10)
    args = ap.parse_args()

    dev = args.device
    model = load_model(args.model, dtype=torch.bfloat16 if dev.startswith("cuda") else torch.float32, seed=0).to(dev)
    tok = load_tokenizer(args.model)
    n_blocks = get_adapter(model).num_layers(model)
    tiny = args.model.startswith("tiny-")  # byte tokens, no chat template: prompts without worked examples fit
    dm = ReasoningProblems(n_calibration=2, n_eval=args.problems, shots=0 if tiny else 2)
    dm.setup()
    prompts = [dm.messages(e) for e in dm.sets["evaluation"]]
    chat = not tiny
    if args.vector:
        direction = Direction.load(args.vector, "als_speed", "--vector")
        direction.check_fits(model, "als_speed", "--vector")
    else:
        width = model.get_input_embeddings().weight.shape[1]
        direction = Direction(torch.randn(width, generator=torch.Generator().manual_seed(0)), n_blocks - 1)
    sampling = Sampling(max_new_tokens=args.max_new_tokens)
    common = dict(chat=chat, batch_size=len(prompts))

    def greedy():
        return generate(model, tok, prompts, sampling, **common)

    steers = []

    def als():
        steers.append(ALSSteer(direction.unit, 0.3, 0.1))
        return generate(model, tok, prompts, sampling, hook=steers[-1], hook_layer=direction.layer, transient=True,
                        **common)

    runs = {"greedy": greedy, "als": als}
    for run in runs.values():  # warm-up
        run()
    per_token = {k: [] for k in runs}
    per_problem = {k: [] for k in runs}
    for _ in range(args.steps):  # interleaved, so drift hits both alike
        for k, run in runs.items():
            _sync(dev)
            start = time.perf_counter()
            out = run()
            _sync(dev)
            seconds = time.perf_counter() - start
            per_token[k].append(seconds / out.num_tokens)
            per_problem[k].append(seconds / len(prompts))
    tpt = {k: statistics.median(v) for k, v in per_token.items()}
    print(json.dumps({"benchmark": "als_time_per_token", "model": args.model, "device": dev, "problems": len(prompts),
                      "steps": args.steps, "greedy_ms_per_token": round(1e3 * tpt["greedy"], 3),
                      "als_ms_per_token": round(1e3 * tpt["als"], 3), "firing_rate": round(statistics.median(s.firing_rate for s in steers), 3),
                      "ratio": round(tpt["als"] / tpt["greedy"], 3), "target_ratio_max": 1.05}), flush=True)

    _sync(dev)
    start = time.perf_counter()
    with torch.enable_grad():
        latent_seek(model, tok, prompts, [e.prompt for e in dm.sets["evaluation"]], sampling, layer=direction.layer,
                    steps=args.latent_steps, chat=chat, batch_size=len(prompts))
    _sync(dev)
    seek = (time.perf_counter() - start) / len(prompts)
    als_problem = statistics.median(per_problem["als"])
    print(json.dumps({"benchmark": "latent_seek_time_per_problem", "model": args.model, "device": dev,
                      "latent_steps": args.latent_steps, "als_s_per_problem": round(als_problem, 4),
                      "latent_seek_s_per_problem": round(seek, 4), "ratio": round(seek / als_problem, 3),
                      "target_ratio_min": 3.0}), flush=True)


if __name__ == "__main__":
    main()
