"""Cost of Default MoE routing and of MoE dispatch, measured in one run.

Prints one JSON line per figure:
  default_vs_topk_step:  full training step (forward with the loss, backward, AdamW, commit of Ê)
                         of the MoE transformer with Default vs TopK routing, the two interleaved:
                         ms/step, tokens/s and MFU for each. ``ratio`` = Default/TopK and
                         ``default_extra_share`` = ratio − 1 is what the EMA statistics and the π·Ê
                         term add to a step; the paper claims no significant overhead (our target:
                         ratio ≤ 1.05).
  moe_vs_dense_layer:    forward+backward of one MoE layer (Default routing) vs a dense SwiGLU FFN
                         with the same active parameters (hidden = K·d_expert): the price of
                         routing + dispatch (target: ratio ≤ 1.3).
  moe_layer_vs_mixtral_eager, moe_layer_vs_mixtral_grouped_mm:
                         the same MoE layer vs transformers' MixtralSparseMoeBlock (TopK routing,
                         renormalised gates) on the same input, with its eager expert loop and with
                         its grouped_mm experts (target: ratio < 1). Each line says which experts
                         implementation and which kernel actually ran (an older transformers
                         without grouped_mm runs eager and says so).

MFU = tokens/s · flops_per_token / peak, flops_per_token = 6·N_active + 6·n_layers·d_model·seq
(causal attention, forward and backward), N_active = the parameters a token runs through except
the input embedding: attention, the K experts' weights and the router of each MoE layer, dense
FFNs, norms and the LM head. Peak: 989 TFLOP/s (H100/H200 dense bf16) on CUDA, ``--peak-tflops``
to change it; no MFU on CPU unless given.

Sizes: ``tiny`` is the CPU recipe's model (configs/default_moe/tiny.yaml; micro-batch 16 × 256);
``medium`` a 1-GPU size; ``paper`` the paper's model (configs/default_moe/paper_8c2_gpu.yaml: 24
layers, the first dense, d_model 1024, 16 heads, 8 experts × 2816, K 2, vocabulary 128256, sequence
2048; micro-batch 8 here), CUDA only: on CPU shrink it with the overrides (--layers, --d-model, ...)
to try the code path. A size's recipe sets the model; routing and activation checkpointing are the
benchmark's (--activation-checkpointing). Training steps run
under bf16 autocast on CUDA (fp32 weights, like the recipes' bf16-mixed), fp32 on CPU; the layer
figures run bf16 weights and inputs on CUDA (grouped matmuls are not autocast ops), fp32 on CPU.
Layer sizes: tiny 8192 tokens × d_model 256, 8 experts × 704, K 2; otherwise the model's layer on
batch·seq tokens.

    python bench/moe_overhead.py [--size tiny|medium|paper] [--device cuda] [--repeats 5] [--steps 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
import yaml
from torch import nn

from lantern.models.moe import DenseFeedForward, MoEFeedForward, MoETransformer

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "default_moe"
GIB = 1 << 30

# Each size: the recipe whose model, sequence and micro-batch it takes, or those given here.
_SIZES = {
    "tiny": "tiny.yaml",
    "medium": (dict(vocab_size=257, d_model=1024, n_layers=8, n_heads=16, n_experts=8, top_k=2, d_expert=2816,
                    max_seq_len=2048), 2048, 8),
    "paper": "paper_8c2_gpu.yaml",
}


def size_config(name: str) -> dict:
    """{model: MoETransformer kwargs, source, seq, batch, layer: the layer benchmarks' sizes or None (= the model's)}.

    tiny and paper take the model, sequence and micro-batch from their recipe (so the figures follow
    it), less the choices a benchmark makes itself: routing and activation checkpointing.
    """
    spec = _SIZES[name]
    if isinstance(spec, str):
        cfg = yaml.safe_load((RECIPES / spec).read_text())
        model, data = cfg["model"]["init_args"]["model"]["init_args"], cfg["data"]["init_args"]
        source, seq, batch = f"configs/default_moe/{spec}", int(data["block_size"]), int(data["batch_size"])
    else:
        (model, seq, batch), source = spec, "built-in"
    model = {k: v for k, v in model.items() if k not in ("router_mode", "activation_checkpointing")}
    layer = dict(tokens=8192, d_model=256, n_experts=8, d_expert=704, top_k=2) if name == "tiny" else None
    return dict(model=model, source=source, seq=seq, batch=batch, layer=layer)


def add_size_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--size", choices=("tiny", "medium", "paper"), default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="micro-batch (default: the size's)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default: the size's)")
    shrink = ap.add_argument_group("overrides of the size's model (e.g. to run --size paper's code path on CPU)")
    for flag, key in (("--layers", "n_layers"), ("--d-model", "d_model"), ("--heads", "n_heads"),
                      ("--experts", "n_experts"), ("--top-k", "top_k"), ("--d-expert", "d_expert"),
                      ("--vocab", "vocab_size")):
        shrink.add_argument(flag, dest=key, type=int, default=None)


def resolve_size(ap: argparse.ArgumentParser, args: argparse.Namespace, batch: int | None = None) -> dict:
    """The size with the command line's overrides applied; refuses the paper's 2B model on CPU."""
    size = size_config(args.size)
    model = size["model"]
    for key in ("n_layers", "d_model", "n_heads", "n_experts", "top_k", "d_expert", "vocab_size"):
        if getattr(args, key) is not None:
            model[key] = getattr(args, key)
    model["n_dense_layers"] = min(model.get("n_dense_layers", 0), model["n_layers"])
    size["seq"] = args.seq or size["seq"]
    size["batch"] = args.batch or batch or size["batch"]
    model["max_seq_len"] = max(model.get("max_seq_len", 0), size["seq"])
    if size["layer"] is None:
        size["layer"] = dict(tokens=size["batch"] * size["seq"], d_model=model["d_model"], n_experts=model["n_experts"],
                             d_expert=model["d_expert"], top_k=model["top_k"])
    with torch.device("meta"):  # counted, not allocated
        n = sum(p.numel() for p in MoETransformer(**model).parameters())
    if args.size == "paper" and not args.device.startswith("cuda") and n > 300e6:
        ap.error(f"--size paper is a {n / 1e9:.2f}B-parameter model, meant for a GPU: pass --device cuda, or shrink "
                 "it to try the code path on CPU (e.g. --layers 2 --d-model 128 --heads 4 --d-expert 256 --vocab 1024)")
    return size


def build_model(model_cfg: dict, dev: str, router_mode: str = "default", *, dense: bool = False,
                activation_checkpointing: bool = False) -> tuple[nn.Module, str | None]:
    """MoETransformer on ``dev``, or (``dense``) the same architecture with every FFN dense of width K·d_expert.

    Returns the model and how the dense reference was built.
    """
    kwargs = dict(model_cfg, router_mode=router_mode, activation_checkpointing=activation_checkpointing)
    width = model_cfg["top_k"] * model_cfg["d_expert"]
    how = None
    if dense:
        kwargs.update(n_dense_layers=model_cfg["n_layers"], d_dense=width)
        how = f"MoETransformer(n_dense_layers={model_cfg['n_layers']}, d_dense=K·d_expert={width})"
    with torch.device(dev):  # built in place: the paper's 2B parameters never pass through the CPU
        model = MoETransformer(**kwargs)
    return model.train(), how


def autocast(dev: str):
    return torch.autocast(device_type=dev.split(":")[0], dtype=torch.bfloat16, enabled=dev.startswith("cuda"))


def training_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy (chunked, from ``labels``) + 0.01·load-balancing loss."""
    out = model(ids[:, :-1], labels=ids[:, 1:])
    return out.loss + 0.01 * out.aux_loss


def train_step(model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor, dev: str):
    def step():
        with autocast(dev):
            loss = training_loss(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.commit_defaults()  # Ê moves once per optimizer step
    return step


def active_params(model: nn.Module) -> int:
    """Parameters a token runs through, less the input embedding: K/E of each MoE layer's experts."""
    scale = {}
    for m in model.modules():
        if isinstance(m, MoEFeedForward):
            for p in m.experts.parameters():
                scale[id(p)] = m.top_k / m.n_experts
    seen, n = set(), 0.0
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            continue  # a tied LM head still counts, through the Linear that shares it
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel() * scale.get(id(p), 1.0)
    return round(n)


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
    """Median over repeats, alternating the candidates so drift hits all alike."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(_time(fn, steps, device))
    return {k: statistics.median(v) for k, v in times.items()}


def mixtral_block(spec: dict, implementation: str, dev: str, dtype: torch.dtype) -> tuple[nn.Module | None, dict]:
    """transformers' MixtralSparseMoeBlock at ``spec``'s sizes, with the experts implementation asked
    for where this transformers has it (``experts_implementation=`` of the config, the public switch),
    else eager. Returns the block (None if unavailable) and what ran."""
    info = {"experts_implementation_requested": implementation}
    try:
        import transformers
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError as e:
        return None, {**info, "skipped": f"no MixtralSparseMoeBlock: {e}"}
    info["transformers"] = transformers.__version__
    available = {"eager"}
    with contextlib.suppress(ImportError):
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        available |= set(ALL_EXPERTS_FUNCTIONS.keys())
    ran = implementation if implementation in available else "eager"
    config = MixtralConfig(hidden_size=spec["d_model"], intermediate_size=spec["d_expert"],
                           num_local_experts=spec["n_experts"], num_experts_per_tok=spec["top_k"],
                           experts_implementation=ran)
    if getattr(config, "_experts_implementation", None) != ran:
        ran = "eager"  # a transformers that ignores the argument runs the experts' own forward
    with torch.device(dev):
        block = MixtralSparseMoeBlock(config)
    for p in block.parameters():  # created empty: the model's init would fill them
        nn.init.normal_(p, std=0.02)
    block.to(dtype).train()
    info["experts_implementation"] = ran
    if ran == "grouped_mm":
        try:
            from transformers.integrations.moe import _can_use_grouped_mm

            w = block.experts.gate_up_proj.transpose(-2, -1)
            probe = torch.zeros(spec["n_experts"], spec["d_model"], device=dev, dtype=dtype)
            offs = torch.arange(1, spec["n_experts"] + 1, device=dev, dtype=torch.int32)
            info["kernel"] = ("torch grouped_mm" if _can_use_grouped_mm(probe, w, offs)
                              else "transformers' per-expert loop (grouped_mm fallback)")
        except Exception:  # a private helper: its absence only costs the detail
            info["kernel"] = "unknown"
    elif ran == "eager":
        info["kernel"] = "loop over experts (index_add_)"
    return block, info


def layer_figures(spec: dict, dev: str, steps: int, repeats: int, size: str) -> None:
    """moe_vs_dense_layer and the two Mixtral lines, timed in one interleaved run."""
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    d, f, E, K, T = spec["d_model"], spec["d_expert"], spec["n_experts"], spec["top_k"], spec["tokens"]
    torch.manual_seed(0)
    with torch.device(dev):
        moe = MoEFeedForward(d, f, E, K, "default").to(dtype).train()
        dense = DenseFeedForward(d, K * f).to(dtype).train()
    x = torch.randn(1, T, d, device=dev, dtype=dtype, requires_grad=True)

    def fwd_bwd(fn, after=None):
        def step():
            fn().float().pow(2).mean().backward()
            if after is not None:
                after()
        return step

    fns = {"moe": fwd_bwd(lambda: moe(x)[0], moe.commit_defaults),
           "dense": fwd_bwd(lambda: dense(x))}
    peers = {}
    for impl in ("eager", "grouped_mm"):
        block, info = mixtral_block(spec, impl, dev, dtype)
        if block is not None:
            step = fwd_bwd(lambda block=block: block(x))
            try:
                step()  # fail here, not inside the timing
            except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
                info, block = {**info, "skipped": f"{type(e).__name__}: {e}"[:300]}, None
        if block is not None:
            fns[f"mixtral_{impl}"] = step
        peers[impl] = info
    t = _interleaved(fns, steps, repeats, dev)
    common = {"size": size, "device": dev, "dtype": str(dtype).removeprefix("torch."), "tokens": T, "d_model": d,
              "n_experts": E, "d_expert": f, "top_k": K}
    print(json.dumps({"benchmark": "moe_vs_dense_layer", **common, "active_params_equal": True,
                      "moe_ms": round(t["moe"], 2), "dense_ms": round(t["dense"], 2),
                      "ratio": round(t["moe"] / t["dense"], 3), "target_ratio_max": 1.3}), flush=True)
    for impl, info in peers.items():
        row = {"benchmark": f"moe_layer_vs_mixtral_{impl}", **common, **info, "ours_ms": round(t["moe"], 2)}
        if f"mixtral_{impl}" in t:
            row.update(mixtral_ms=round(t[f"mixtral_{impl}"], 2), ratio=round(t["moe"] / t[f"mixtral_{impl}"], 3))
        row["target_ratio_max"] = 1.0
        print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_size_args(ap)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak for MFU (default 989, H100/H200 dense bf16, on CUDA; none on CPU)")
    ap.add_argument("--activation-checkpointing", action="store_true", help="train steps recompute each block")
    args = ap.parse_args()
    size = resolve_size(ap, args, batch=8 if args.size == "paper" else None)
    cfg, batch, seq, dev = size["model"], size["batch"], size["seq"], args.device
    peak = args.peak_tflops or (989.0 if dev.startswith("cuda") else None)
    torch.manual_seed(0)
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq + 1), device=dev)

    steps = {}
    for mode in ("default", "topk"):
        torch.manual_seed(0)
        model, _ = build_model(cfg, dev, mode, activation_checkpointing=args.activation_checkpointing)
        steps[mode] = train_step(model, torch.optim.AdamW(model.parameters(), lr=1e-4), ids, dev)
    n_active = active_params(model)
    flops = 6 * n_active + 6 * cfg["n_layers"] * cfg["d_model"] * seq
    t = _interleaved(steps, args.steps, args.repeats, dev)
    tokens = batch * seq
    row = {"benchmark": "default_vs_topk_step", "size": args.size, "model_source": size["source"], "device": dev,
           "batch": batch, "seq": seq, "activation_checkpointing": args.activation_checkpointing,
           "default_ms": round(t["default"], 2), "topk_ms": round(t["topk"], 2),
           "ratio": round(t["default"] / t["topk"], 3), "target_ratio_max": 1.05,
           "default_extra_share": round(t["default"] / t["topk"] - 1, 3), "n_active_params": n_active,
           "flops_per_token": flops, "peak_tflops": peak}
    for mode in ("default", "topk"):
        per_s = tokens / (t[mode] / 1e3)
        row[f"{mode}_tokens_per_s"] = round(per_s)
        row[f"{mode}_mfu"] = round(per_s * flops / (peak * 1e12), 4) if peak else None
    print(json.dumps(row), flush=True)
    del steps, model
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()

    layer_figures(size["layer"], dev, args.steps, args.repeats, args.size)


if __name__ == "__main__":
    main()
