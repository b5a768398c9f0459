"""LoRA with reduced interference (LoRI, arXiv 2504.07448) in plain PyTorch.

ΔW = (α/r)·B·A on the attention and MLP projections. A is a random projection that never
trains, so it is a *buffer*: no optimizer, weight decay, ``requires_grad_`` call or adapter
enable/disable round trip can move it, and it is drawn from a generator seeded by (seed, module
name), so every process and every module order draws the same A. LoRI-D trains a dense B;
LoRI-S trains only the entries a magnitude mask keeps — those entries alone are the Parameter,
so the optimizer holds state for k numbers, not d_out·r, and every other entry is its base
value (0, or an earlier adapter's B in continual learning) under any optimizer setting.

Module names are the base model's own (``model.layers.0.self_attn.q_proj``) wherever the
adapter lives: in a LoRI model, in a peft model, or in a file written by ``export_peft``,
which is a standard peft LoRA adapter directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Iterable, Iterator, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lantern.errors import CheckpointError, require

SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VARIANTS = ("lora", "lori-d", "lori-s")
MASK_FILE = "lori_mask.safetensors"
META_FILE = "lori.json"
_PEFT_WEIGHTS = "adapter_model.safetensors"
_PEFT_CONFIG = "adapter_config.json"


class Factors(NamedTuple):
    """One module's adapter: ΔW = scale · B @ A, A [r, d_in], B [d_out, r]."""

    A: Tensor
    B: Tensor
    scale: float

    def delta(self) -> Tensor:
        return self.scale * (self.B @ self.A)


# ----------------------------------------------------------------------------- the layer
def seeded_A(seed: int, name: str, rank: int, d_in: int) -> Tensor:
    """LoRA's A init, U(−1/√d_in, 1/√d_in) (Kaiming-uniform, a=√5), from a (seed, name) generator.

    The seed comes from a hash of the name, not from the global RNG or the module's position,
    so a fresh process, another rank, or a model wrapped differently draws the same A. Drawn in
    float32 on the CPU so the values do not depend on the device either.
    """
    digest = hashlib.sha256(f"lori-A/{int(seed)}/{name}".encode()).digest()
    gen = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    bound = 1.0 / math.sqrt(d_in)
    return torch.empty(rank, d_in, dtype=torch.float32).uniform_(-bound, bound, generator=gen)


class LoRILinear(nn.Module):
    """A frozen ``nn.Linear`` plus (α/r)·B·A with A a buffer and B dense or sparse.

    Dense (LoRI-D): ``lora_B`` [d_out, r] is the Parameter. Sparse (LoRI-S): ``lora_B_values``
    [k] is the Parameter, ``lora_B_index`` [k] the flat positions it fills and ``lora_B_base``
    [d_out, r] the frozen value of every other entry; B is rebuilt each forward (one copy of
    d_out·r numbers, small beside the matmuls).
    """

    def __init__(self, base: nn.Linear, name: str, rank: int = 32, alpha: float = 64, seed: int = 0,
                 mask: Tensor | None = None, A: Tensor | None = None, B: Tensor | None = None,
                 dropout: float = 0.0, dtype: torch.dtype | None = None):
        super().__init__()
        require(isinstance(base, nn.Linear), "LoRILinear", "base", type(base).__name__, "an nn.Linear")
        require(isinstance(rank, int) and rank >= 1, "LoRILinear", "rank", rank, "an integer ≥ 1")
        require(0.0 <= dropout < 1.0, "LoRILinear", "dropout", dropout, "a number in [0, 1)")
        d_out, d_in = base.out_features, base.in_features
        weight = base.weight
        if dtype is None:  # train low-precision bases with float32 adapters, as peft does
            dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        base.requires_grad_(False)
        self.base = base
        self.name, self.rank, self.alpha, self.seed = name, rank, float(alpha), seed
        self.scale = float(alpha) / rank
        self.enabled = True
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        if A is None:
            A = seeded_A(seed, name, rank, d_in)
        else:
            self.seed = None  # A came from elsewhere (an earlier adapter), not from the seed
            _check_shape(A, (rank, d_in), name, "A")
        self.register_buffer("lora_A", A.detach().to(device=weight.device, dtype=dtype).clone())
        if B is not None:
            _check_shape(B, (d_out, rank), name, "B")
        B0 = (torch.zeros(d_out, rank) if B is None else B.detach()).to(device=weight.device, dtype=dtype)

        if mask is None:
            self.lora_B = nn.Parameter(B0.clone())
        else:
            _check_shape(mask, (d_out, rank), name, "mask")
            index = mask.detach().to(device=weight.device, dtype=torch.bool).flatten().nonzero().squeeze(1)
            self.register_buffer("lora_B_index", index)
            self.register_buffer("lora_B_base", B0.clone())
            self.lora_B_values = nn.Parameter(B0.flatten()[index].clone())

    @property
    def sparse(self) -> bool:
        return "lora_B_index" in self._buffers

    @property
    def A(self) -> Tensor:
        return self.lora_A

    @property
    def B(self) -> Tensor:
        """The effective B [d_out, r]; differentiable with respect to the trained entries."""
        if not self.sparse:
            return self.lora_B
        flat = self.lora_B_base.flatten().index_put((self.lora_B_index,), self.lora_B_values)
        return flat.view_as(self.lora_B_base)

    @property
    def mask(self) -> Tensor:
        """Which entries of B train (all of them for LoRI-D)."""
        if not self.sparse:
            return torch.ones_like(self.lora_B, dtype=torch.bool)
        flat = torch.zeros(self.lora_B_base.numel(), dtype=torch.bool, device=self.lora_B_base.device)
        return flat.index_fill_(0, self.lora_B_index, True).view_as(self.lora_B_base)

    def factors(self) -> Factors:
        with torch.no_grad():
            return Factors(self.lora_A.clone(), self.B.detach().clone(), self.scale)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        A = self.lora_A
        h = F.linear(self.dropout(x.to(A.dtype)), A) * self.scale  # scale the r-wide tensor, not d_out
        return out + F.linear(h, self.B).to(out.dtype)

    def extra_repr(self) -> str:
        kind = f"sparse k={self.lora_B_index.numel()}" if self.sparse else "dense"
        return f"name={self.name!r}, rank={self.rank}, alpha={self.alpha:g}, B={kind}"


def _check_shape(t, shape: tuple[int, ...], name: str, what: str) -> None:
    ok = isinstance(t, Tensor) and tuple(t.shape) == tuple(shape)
    got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
    require(ok, "add_lori", f"{what}[{name}]", str(got), f"a tensor of shape {tuple(shape)}")


def _matches(name: str, targets: Iterable[str]) -> bool:
    """peft's rule for a list of targets: the full name, or its dotted suffix."""
    return any(name == t or name.endswith("." + t) for t in targets)


def add_lori(model: nn.Module, rank: int = 32, alpha: float = 64, target_modules: Sequence[str] = SEVEN,
             seed: int = 0, masks: Mapping[str, Tensor] | None = None,
             init: Mapping[str, Sequence[Tensor | None]] | None = None, dropout: float = 0.0,
             dtype: torch.dtype | None = None) -> dict[str, LoRILinear]:
    """Wrap the targeted Linears of ``model`` in place and freeze every base parameter.

    ``masks`` {name: bool [d_out, r]} makes every layer sparse (LoRI-S); ``init`` {name: (A, B)}
    (a ``Factors`` works too; B may be None) takes A, and B as the starting/base value, from an
    earlier adapter. With the same seed, a LoRI-S run draws LoRI-D's A again, so ``init`` is
    only needed when A came from elsewhere (continual learning on a safety adapter).
    """
    require(not any(isinstance(m, LoRILinear) for m in model.modules()), "add_lori", "model", type(model).__name__,
            "a model without LoRI layers (call remove_lori first)")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, target_modules)]
    require(bool(names), "add_lori", "target_modules", list(target_modules), "names of nn.Linear modules in the model")
    for what, given in (("masks", masks), ("init", init)):
        if given is not None:
            missing, extra = sorted(set(names) - set(given)), sorted(set(given) - set(names))
            require(not missing and not extra, "add_lori", what, f"missing {missing[:3]}, unknown {extra[:3]}",
                    "one entry per targeted module")
    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        A, B = (tuple(init[name])[:2] if init is not None else (None, None))
        layer = LoRILinear(getattr(parent, leaf), name, rank, alpha, seed,
                           mask=None if masks is None else masks[name], A=A, B=B, dropout=dropout, dtype=dtype)
        setattr(parent, leaf, layer)
        layers[name] = layer
    return layers


def remove_lori(model: nn.Module) -> nn.Module:
    """Put the plain Linears back (the adapter is dropped, not merged; base stays frozen)."""
    for full, module in list(model.named_modules()):
        if isinstance(module, LoRILinear):
            parent_name, _, leaf = full.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module.base)
    return model


def lori_layers(model: nn.Module) -> dict[str, LoRILinear]:
    return {m.name: m for m in model.modules() if isinstance(m, LoRILinear)}


@contextlib.contextmanager
def lori_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The base model's outputs (e.g. reference log-probs) without touching any adapter tensor."""
    layers = list(lori_layers(model).values())
    before = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, state in zip(layers, before):
            layer.enabled = state


# ----------------------------------------------------------------------------- reading adapters
def _peft_wrappers(model: nn.Module):
    """(prefixes to strip, LoraLayer class) when peft is in play; peft is imported only if loaded."""
    import sys

    if "peft" not in sys.modules:
        return [], None
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTuner

    prefixes = [f"{n}.model." if n else "model." for n, m in model.named_modules() if isinstance(m, BaseTuner)]
    return sorted(prefixes, key=len, reverse=True), LoraLayer


def _strip(name: str, prefixes: list[str]) -> str:
    for p in prefixes:
        if name.startswith(p):
            return name[len(p):]
    return name


def _modules(model: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    """(base-model name, kind, module) for LoRI layers, peft LoRA layers and plain Linears.

    The Linears inside a wrapper (its base and peft's lora_A/lora_B) are not listed again.
    """
    prefixes, lora_layer = _peft_wrappers(model)
    inside: list[str] = []
    for full, m in model.named_modules():
        if any(full.startswith(w) for w in inside):
            continue
        if isinstance(m, LoRILinear):
            inside.append(full + ".")
            yield m.name, "lori", m
        elif lora_layer is not None and isinstance(m, lora_layer):
            inside.append(full + ".")
            yield _strip(full, prefixes), "peft", m
        elif isinstance(m, nn.Linear):
            yield _strip(full, prefixes), "linear", m


def lora_factors(model: nn.Module, adapter: str | None = None) -> dict[str, Factors]:
    """Every adapter module's (A, B, scale), copied, from LoRI layers or a peft LoRA model."""
    out = {}
    for name, kind, m in _modules(model):
        if kind == "lori":
            out[name] = m.factors()
        elif kind == "peft":
            key = adapter or m.active_adapters[0]
            if key not in m.lora_A:
                continue
            require(not m.use_dora.get(key, False), "lora_factors", "model", "DoRA", "plain LoRA adapters")
            with torch.no_grad():
                out[name] = Factors(m.lora_A[key].weight.detach().clone(), m.lora_B[key].weight.detach().clone(),
                                    float(m.scaling[key]))
    return out


def projection_shapes(model: nn.Module, target_modules: Sequence[str] = SEVEN) -> dict[str, tuple[int, int]]:
    """{name: (d_out, d_in)} of the targeted projections, whether or not an adapter wraps them."""
    shapes = {}
    for name, kind, m in _modules(model):
        base = m.base if kind == "lori" else m.get_base_layer() if kind == "peft" else m
        if isinstance(base, nn.Linear) and _matches(name, target_modules):
            shapes[name] = (base.out_features, base.in_features)
    return shapes


# ----------------------------------------------------------------------------- masks
def _layer_key(name: str) -> str:
    """The decoder block a module belongs to: the name up to its first numeric part."""
    m = re.match(r"^(.*?\.\d+)(?:\.|$)", name)
    return m.group(1) if m else name.rpartition(".")[0]


def magnitude_masks(Bs: Mapping[str, Tensor | Factors], sparsity: float, scope: str = "global") -> dict[str, Tensor]:
    """Keep the round((1−s)·n) entries of largest |B| among n (all modules, one block, or one module).

    Ties go to the earlier entry (modules in sorted-name order, then row-major), so the mask is
    the same whatever the dict order or device.
    """
    require(0.0 <= sparsity <= 1.0, "magnitude_masks", "sparsity", sparsity, "a number in [0, 1]")
    require(scope in ("global", "layer", "module"), "magnitude_masks", "scope", scope, "global, layer or module")
    require(len(Bs) > 0, "magnitude_masks", "Bs", "{}", "at least one B")
    mags = {n: (b.B if isinstance(b, Factors) else b).detach().abs().float() for n, b in Bs.items()}
    groups: dict[str, list[str]] = {}
    for n in sorted(mags):
        groups.setdefault({"global": "", "layer": _layer_key(n), "module": n}[scope], []).append(n)
    masks = {}
    for names in groups.values():
        flat = torch.cat([mags[n].flatten().to(mags[names[0]].device) for n in names])
        k = round((1.0 - sparsity) * flat.numel())
        order = torch.sort(flat, descending=True, stable=True).indices[:k]
        keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device).index_fill_(0, order, True)
        start = 0
        for n in names:
            size = mags[n].numel()
            masks[n] = keep[start:start + size].view(mags[n].shape).to(mags[n].device)
            start += size
    return {n: masks[n] for n in Bs}


# ----------------------------------------------------------------------------- merging
def _check_weights(adapters: Sequence, weights: Sequence[float], who: str) -> None:
    require(len(adapters) >= 1, who, "adapters", len(adapters), "at least one adapter")
    require(len(weights) == len(adapters), who, "weights", list(weights), f"{len(adapters)} weights, one per adapter")


def merge_concat(adapters: Sequence[Mapping[str, Factors]], weights: Sequence[float]) -> dict[str, Tensor]:
    """ΔW = Σ_t w_t·s_t·B_t·A_t (peft ``cat``: no cross terms); a module missing from an adapter adds 0."""
    return {n: f.delta() for n, f in concat_factors(adapters, weights).items()}


def concat_factors(adapters: Sequence[Mapping[str, Factors]], weights: Sequence[float]) -> dict[str, Factors]:
    """The concatenated merge as one adapter of rank Σr, laid out as peft's ``cat`` (weights on A, scale 1)."""
    _check_weights(adapters, weights, "merge_concat")
    names = list(dict.fromkeys(n for a in adapters for n in a))
    out = {}
    for n in names:
        parts = [(a[n], w) for a, w in zip(adapters, weights) if n in a]
        A = torch.cat([w * f.scale * f.A for f, w in parts], dim=0)
        B = torch.cat([f.B for f, _ in parts], dim=1)
        out[n] = Factors(A, B, 1.0)
    return out


def linear_factors(adapters: Sequence[Mapping[str, Factors]], weights: Sequence[float]) -> dict[str, Factors]:
    """peft ``linear``: A = Σ sign·√|w s| A_t, B = Σ √|w s| B_t (equal ranks), scale 1."""
    _check_weights(adapters, weights, "merge_linear")
    names = list(dict.fromkeys(n for a in adapters for n in a))
    out = {}
    for n in names:
        parts = [(a[n], w) for a, w in zip(adapters, weights) if n in a]
        ranks = {f.A.shape[0] for f, _ in parts}
        require(len(ranks) == 1, "merge_linear", "adapters", f"ranks {sorted(ranks)} at {n}", "adapters of one rank")
        A = sum(math.copysign(math.sqrt(abs(w * f.scale)), w * f.scale) * f.A for f, w in parts)
        B = sum(math.sqrt(abs(w * f.scale)) * f.B for f, w in parts)
        out[n] = Factors(A, B, 1.0)
    return out


def merge_linear(adapters: Sequence[Mapping[str, Factors]], weights: Sequence[float]) -> dict[str, Tensor]:
    """ΔW = (Σ_t √(w_t s_t) B_t)(Σ_t √(w_t s_t) A_t), cross terms B_s·A_t included."""
    return {n: f.delta() for n, f in linear_factors(adapters, weights).items()}


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    out = {}
    for name, kind, m in _modules(model):
        out[name] = m.base if kind == "lori" else m.get_base_layer() if kind == "peft" else m
    return out


@torch.no_grad()
def apply_deltas(model: nn.Module, deltas: Mapping[str, Tensor]) -> nn.Module:
    """Add each ΔW into its base Linear's weight, in place (pass a copy to keep the original)."""
    linears = _linears(model)
    unknown = sorted(set(deltas) - set(linears))
    require(not unknown, "apply_deltas", "deltas", unknown[:3], "names of Linear modules of the model")
    for name, delta in deltas.items():
        w = linears[name].weight
        require(tuple(delta.shape) == tuple(w.shape), "apply_deltas", f"deltas[{name}]", str(tuple(delta.shape)),
                f"shape {tuple(w.shape)}")
        w.add_(delta.to(device=w.device, dtype=w.dtype))
    return model


def merged_model(base_model: nn.Module, factors: Mapping[str, Factors]) -> nn.Module:
    """``base_model`` with every scale·B·A folded into its weights, in place (peft's merge_and_unload)."""
    return apply_deltas(base_model, {n: f.delta() for n, f in factors.items()})


# ----------------------------------------------------------------------------- interference
def _left_basis(d: Tensor | Factors, k: int | None) -> Tensor:
    """Top-k left singular vectors of ΔW; from factors via a QR of Aᵀ, never forming d_out×d_in."""
    if isinstance(d, Factors):
        Q, R = torch.linalg.qr(d.A.detach().double().T)  # A = Rᵀ Qᵀ, so ΔW = s·B Rᵀ Qᵀ
        M, eps = d.scale * d.B.detach().double() @ R.T, torch.finfo(d.B.dtype).eps
        size = max(d.B.shape[0], d.A.shape[1])
    else:
        M, eps, size = d.detach().double(), torch.finfo(d.dtype).eps, max(d.shape)
    U, S, _ = torch.linalg.svd(M, full_matrices=False)
    if k is None:  # numerical rank at the input's precision, as matrix_rank counts it
        k = int((S > S.max() * size * eps).sum()) if S.numel() else 0
    return U[:, :k]


def subspace_overlap(d1: Tensor | Factors, d2: Tensor | Factors, k: int | None = None) -> float:
    """Mean cos² of the principal angles between the top-k column spaces of two ΔW's.

    1 for the same subspace, about k/d_out for unrelated ones; NaN when a ΔW is 0. k defaults
    to the smaller numerical rank.
    """
    U1, U2 = _left_basis(d1, k), _left_basis(d2, k)
    kk = min(U1.shape[1], U2.shape[1])
    if kk == 0:
        return float("nan")
    return float(torch.linalg.matrix_norm(U1[:, :kk].T @ U2[:, :kk]) ** 2 / kk)


def adapter_overlap(a1: Mapping[str, Factors | Tensor], a2: Mapping[str, Factors | Tensor], k: int | None = None) -> float:
    """``subspace_overlap`` averaged over the modules both adapters change (NaN if none)."""
    values = [subspace_overlap(a1[n], a2[n], k) for n in a1 if n in a2]
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


# ----------------------------------------------------------------------------- export / import
def export_peft(factors: Mapping[str, Factors], out_dir: str | Path, base_model_name_or_path: str,
                rank: int | None = None, alpha: float | None = None, target_modules: Sequence[str] | None = None,
                masks: Mapping[str, Tensor] | None = None, *, variant: str | None = None, seed: int | None = None,
                sparsity: float | None = None, meta: Mapping | None = None) -> Path:
    """Write a standard peft LoRA adapter directory, plus the masks and a small ``lori.json``.

    ``rank``/``alpha`` default to the factors' own (every module must share them: peft's
    config holds one scale). B is written as the model uses it, so masked entries hold their
    base value (0 for LoRI-S). ``meta`` (JSON values) goes into ``lori.json`` over the
    computed fields.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    from lantern.models.loading import writable_dir

    require(len(factors) > 0, "export_peft", "factors", "{}", "at least one module")
    first = next(iter(factors.values()))
    rank = int(first.A.shape[0]) if rank is None else int(rank)
    alpha = first.scale * rank if alpha is None else float(alpha)
    alpha = int(alpha) if float(alpha).is_integer() else alpha
    for n, f in factors.items():
        require(f.A.shape[0] == rank and f.B.shape[1] == rank and math.isclose(f.scale, alpha / rank, rel_tol=1e-6),
                "export_peft", f"factors[{n}]", f"rank {f.A.shape[0]}, scale {f.scale:g}",
                f"rank {rank} and scale alpha/rank = {alpha / rank:g}")
    if target_modules is None:
        target_modules = sorted({n.rpartition(".")[2] for n in factors})
    if masks is not None:
        require(set(masks) == set(factors), "export_peft", "masks", sorted(set(masks) ^ set(factors))[:3],
                "one mask per module of factors")
        kept = sum(int(m.sum()) for m in masks.values())
        sparsity = 1.0 - kept / sum(m.numel() for m in masks.values()) if sparsity is None else sparsity
    variant = (variant or ("lori-s" if masks is not None else "lori-d")).replace("_", "-")
    require(variant in VARIANTS, "export_peft", "variant", variant, ", ".join(VARIANTS))

    out = writable_dir(Path(out_dir), "export_peft", "out_dir")
    LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0, bias="none",
               task_type="CAUSAL_LM", base_model_name_or_path=str(base_model_name_or_path)).save_pretrained(str(out))
    tensors = {}
    for n, f in factors.items():
        tensors[f"base_model.model.{n}.lora_A.weight"] = f.A.detach().contiguous().cpu()
        tensors[f"base_model.model.{n}.lora_B.weight"] = f.B.detach().contiguous().cpu()
    save_file(tensors, str(out / _PEFT_WEIGHTS), metadata={"format": "pt"})
    if masks is not None:
        save_file({n: m.detach().to(torch.bool).contiguous().cpu() for n, m in masks.items()}, str(out / MASK_FILE))
    meta = {"variant": variant, "seed": seed, "sparsity": sparsity, "rank": rank, "alpha": alpha,
            "target_modules": list(target_modules), "base_model_name_or_path": str(base_model_name_or_path),
            **dict(meta or {})}
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


def load_factors(path: str | Path) -> tuple[dict[str, Factors], dict[str, Tensor] | None, dict]:
    """(factors, masks or None, meta) from a peft LoRA directory; safetensors only, never pickle."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"adapter {path} is not a directory (expected a peft LoRA adapter folder)")
    weights = path / _PEFT_WEIGHTS
    if not weights.is_file():
        other = "; it holds adapter_model.bin, which is not read (pickle): save it with safetensors" \
            if (path / "adapter_model.bin").exists() else ""
        raise CheckpointError(f"adapter {path} has no {_PEFT_WEIGHTS}{other}")
    try:
        config = json.loads((path / _PEFT_CONFIG).read_text())
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
    except FileNotFoundError:
        raise CheckpointError(f"adapter {path} has no {_PEFT_CONFIG}") from None
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path / _PEFT_CONFIG} is not a LoRA adapter config: {type(err).__name__}: {err}") from None
    if config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise CheckpointError(f"{path} uses DoRA or per-module ranks/alphas, which load_factors does not read")
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights} is not a readable safetensors file: {err}") from None
    parts: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise CheckpointError(f"{weights}: unexpected tensor {key!r} (only lora_A/lora_B weights are read)")
        parts.setdefault(m.group(1), {})[m.group(2)] = t
    factors = {}
    for name, ab in parts.items():
        A, B = ab.get("A"), ab.get("B")
        if A is None or B is None or A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1] or A.shape[0] != rank:
            raise CheckpointError(f"{weights}: {name} lacks a matching lora_A [{rank}, d_in] / lora_B [d_out, {rank}] pair")
        factors[name] = Factors(A, B, scale)
    if not factors:
        raise CheckpointError(f"{weights} holds no LoRA weights")
    masks = None
    if (path / MASK_FILE).exists():
        try:
            masks = load_file(str(path / MASK_FILE))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path / MASK_FILE} is not a readable safetensors file: {err}") from None
        bad = [n for n in factors if n not in masks or tuple(masks[n].shape) != tuple(factors[n].B.shape)]
        if bad or masks.keys() - factors.keys():
            raise CheckpointError(f"{path / MASK_FILE} does not match the adapter's modules (e.g. {(bad or sorted(masks))[0]})")
        masks = {n: m.to(torch.bool) for n, m in masks.items()}
    meta = {"variant": "lora", "rank": rank, "alpha": alpha, "target_modules": config.get("target_modules"),
            "base_model_name_or_path": config.get("base_model_name_or_path")}
    if (path / META_FILE).exists():
        try:
            extra = json.loads((path / META_FILE).read_text())
            if not isinstance(extra, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            raise CheckpointError(f"{path / META_FILE} is not valid: {err}") from None
        meta.update(extra)
    return factors, masks, meta


# ----------------------------------------------------------------------------- counts, clipping
def trainable_counts(model_or_shapes: nn.Module | Mapping[str, tuple[int, int]], variant: str, rank: int = 32,
                     sparsity: float = 0.9, target_modules: Sequence[str] = SEVEN) -> int:
    """The paper's formulas: LoRA Σ r(d_in+d_out), LoRI-D Σ d_out·r, LoRI-S round((1−s)·Σ d_out·r).

    The LoRI-S count is what a global mask keeps; per-layer or per-module masks round per group.
    """
    variant = variant.replace("_", "-")  # lori_d and lori-d alike
    require(variant in VARIANTS, "trainable_counts", "variant", variant, ", ".join(VARIANTS))
    shapes = projection_shapes(model_or_shapes, target_modules) if isinstance(model_or_shapes, nn.Module) \
        else dict(model_or_shapes)
    if variant == "lora":
        return sum(rank * (d_out + d_in) for d_out, d_in in shapes.values())
    dense = sum(rank * d_out for d_out, _ in shapes.values())
    return dense if variant == "lori-d" else round((1.0 - sparsity) * dense)


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@torch.no_grad()
def clip_per_tensor_(params: Iterable[Tensor], max_norm: float = 1.0) -> list[Tensor]:
    """Clip each gradient to L2 norm ≤ max_norm on its own (the authors' setting), without a host sync.

    Returns the norms before clipping (device tensors, for logging). A gradient already within
    the bound is multiplied by exactly 1.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return []
    norms = torch._foreach_norm(grads)
    coefs = torch._foreach_add(norms, 1e-6)
    torch._foreach_reciprocal_(coefs)
    torch._foreach_mul_(coefs, float(max_norm))
    torch._foreach_clamp_max_(coefs, 1.0)
    torch._foreach_mul_(grads, coefs)
    return norms
