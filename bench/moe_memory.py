"""Activation memory of the MoE transformer vs a dense transformer with the same active parameters.

Prints one JSON line per figure:
  saved_bytes_per_token:  bytes autograd keeps for backward, per token, over one training forward
                          (the model and its loss) of the MoE transformer (Default routing; TopK
                          alongside) and of the dense reference: the same architecture with every FFN
                          a dense SwiGLU of width K·d_expert (``MoETransformer(n_dense_layers=n_layers,
                          d_dense=K·d_expert)``), i.e. the same active parameters per token less the
                          router (a recipe's dense first layers are widened to K·d_expert there too).
                          ratio = MoE / dense.
  saved_bytes_per_token_checkpointed:
                          the same with activation checkpointing (``--activation-checkpointing``).
  peak_memory_train_step: ``--size paper``: torch.cuda.max_memory_allocated over a full training
                          step (forward with the chunked loss, backward, AdamW, commit of Ê; measured
                          after a first step, so AdamW's state exists) at the paper's sizes, bf16
                          autocast, micro-batch 16 × 2048 (``--batch``), for K = 2 and K = 1 (and each
                          with checkpointing under ``--activation-checkpointing``): GiB and whether it
                          fits in 80 GiB. states_gib is the part that does not scale with the batch
                          (fp32 weights, gradients and AdamW's two moments: 16 bytes a parameter),
                          the part data parallelism with sharding (FSDP) would divide.

How bytes are counted: a ``torch.autograd.graph.saved_tensors_hooks`` pack hook sees every tensor
autograd saves (checkpointing's saved block inputs included); each distinct storage, keyed by
``untyped_storage().data_ptr()``, counts once at ``untyped_storage().nbytes()`` (what memory
holds: a saved view counts its whole storage); the parameters' and buffers' own storages are left
out. Per token = the slope between batch B/2 and B: (bytes(B) − bytes(B/2)) / (tokens(B) −
tokens(B/2)), so what a step saves once whatever its batch (the bf16 copies of the weights under
autocast, the concatenated gate|up matrix) lands in ``*_fixed_mib`` instead. On CUDA the caching
allocator's growth over the same forward is reported alongside (``*_cuda_bytes_per_token``, same
slope), a cross-check of the hook's count.

Sizes as in bench/moe_overhead.py: ``tiny`` (the CPU recipe, default), ``medium``, ``paper`` (CUDA
only; shrink it with --layers, --d-model, ... to run its code path on CPU, where the peak is null).

    python bench/moe_memory.py [--size tiny|medium|paper] [--device cuda] [--batch 16] [--activation-checkpointing]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json

import torch
from moe_overhead import GIB, add_size_args, autocast, build_model, resolve_size, train_step, training_loss

COUNT = "untyped_storage().nbytes() per distinct storage data_ptr, parameters/buffers excluded; slope over batch"


def _free(dev: str) -> None:
    gc.collect()
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()


def saved_bytes(model: torch.nn.Module, ids: torch.Tensor, dev: str) -> tuple[int, int | None]:
    """(bytes saved for backward over one training forward, the CUDA allocator's growth or None)."""
    exclude = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    storages: dict = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            key, n = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError, TypeError):  # no plain storage (a tensor subclass)
            key, n = ("tensor", id(t)), t.numel() * t.element_size()
        if key not in exclude:
            storages[key] = n
        # Not t itself: a node holding its own output (softmax's) would form a reference cycle
        # through C++ that the garbage collector cannot see, and keep the model alive.
        return t.detach()

    cuda = dev.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(dev):
        loss = training_loss(model, ids)
    grew = None
    if cuda:
        torch.cuda.synchronize()
        grew = torch.cuda.memory_allocated() - before
    del loss  # drops the graph and what it saved
    return sum(storages.values()), grew


def per_token(model: torch.nn.Module, vocab: int, batch: int, seq: int, dev: str) -> dict:
    """Saved bytes per token (slope between two batch sizes) and the fixed part, in MiB."""
    lo, hi = (1, 2)  # the slope is the same at any batch, and the paper size fits without checkpointing
    got = {}
    for b in (lo, hi):
        torch.manual_seed(0)
        ids = torch.randint(0, vocab, (b, seq + 1), device=dev)
        got[b] = saved_bytes(model, ids, dev)
        del ids
        _free(dev)
    span = (hi - lo) * seq
    slope = (got[hi][0] - got[lo][0]) / span
    out = {"bytes_per_token": round(slope), "fixed_mib": round((got[hi][0] - slope * hi * seq) / 2**20, 2),
           "saved_gib": round(got[hi][0] / GIB, 3)}
    if got[hi][1] is not None:
        out["cuda_bytes_per_token"] = round((got[hi][1] - got[lo][1]) / span)
    return out


def saved_figure(size: dict, dev: str, args, checkpointing: bool) -> None:
    cfg, batch, seq = size["model"], size["batch"], size["seq"]
    row = {"benchmark": "saved_bytes_per_token" + ("_checkpointed" if checkpointing else ""), "size": args.size,
           "model_source": size["source"], "device": dev, "dtype": "bf16 autocast" if dev.startswith("cuda") else "float32",
           "batch": batch, "seq": seq, "top_k": cfg["top_k"], "activation_checkpointing": checkpointing, "count": COUNT}
    figures = {}
    for key, mode, dense in (("moe", "default", False), ("topk", "topk", False), ("dense", "default", True)):
        torch.manual_seed(0)
        model, how = build_model(cfg, dev, mode, dense=dense, activation_checkpointing=checkpointing)
        if how:
            row["dense_reference"] = how
        figures[key] = per_token(model, cfg["vocab_size"], batch, seq, dev)
        del model
        _free(dev)
    for key, fig in figures.items():
        row.update({f"{key}_{k}": v for k, v in fig.items()})
    row["ratio"] = round(figures["moe"]["bytes_per_token"] / figures["dense"]["bytes_per_token"], 3)
    print(json.dumps(row), flush=True)


def peak_figure(size: dict, top_k: int, dev: str, args, checkpointing: bool) -> None:
    """Peak allocated memory of full training steps (after a first one), or null off CUDA."""
    cfg, batch, seq = dict(size["model"], top_k=top_k), size["batch"], size["seq"]
    cuda = dev.startswith("cuda")
    row = {"benchmark": "peak_memory_train_step", "size": args.size, "model_source": size["source"], "device": dev,
           "batch": batch, "seq": seq, "top_k": top_k, "activation_checkpointing": checkpointing}
    torch.manual_seed(0)
    model, _ = build_model(cfg, dev, "default", activation_checkpointing=checkpointing)
    n = sum(p.numel() for p in model.parameters())
    row.update(params=n, states_gib=round(16 * n / GIB, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = train_step(model, opt, torch.randint(0, cfg["vocab_size"], (batch, seq + 1), device=dev), dev)
    oom = False
    try:
        step()  # AdamW's moments are created here
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(max(1, args.steps)):
            step()
        if cuda:
            torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError:
        oom = True
    if cuda:
        allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        row.update(max_allocated_gib=round(allocated / GIB, 2), max_reserved_gib=round(reserved / GIB, 2),
                   fits_80gib=not oom and allocated <= 80 * GIB, oom=oom,
                   device_gib=round(torch.cuda.get_device_properties(dev).total_memory / GIB, 1))
    else:
        row.update(max_allocated_gib=None, fits_80gib=None, note="the peak needs CUDA; this ran the code path only")
    del step, opt, model
    _free(dev)
    print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_size_args(ap)
    ap.add_argument("--activation-checkpointing", action="store_true",
                    help="also report every figure with activation checkpointing")
    ap.add_argument("--steps", type=int, default=1, help="training steps the peak is taken over (after a first)")
    args = ap.parse_args()
    size = resolve_size(ap, args)
    dev = args.device
    modes = [False, True] if args.activation_checkpointing else [False]
    for checkpointing in modes:
        saved_figure(size, dev, args, checkpointing)
    if args.size == "paper":
        for top_k in sorted({size["model"]["top_k"], 1}, reverse=True):
            for checkpointing in modes:
                peak_figure(size, top_k, dev, args, checkpointing)


if __name__ == "__main__":
    main()
