"""Where each supported architecture keeps its layers, attention, ``o_proj`` and MLP.

Callbacks (activation caching, head ablation, sink measurement) address modules through an
adapter instead of hard-coding one family's attribute names.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lantern.errors import LanternError


class UnsupportedArchitecture(LanternError, ValueError):
    """No adapter for this model family; the message lists the supported ones."""


@dataclass(frozen=True)
class ArchAdapter:
    family: str
    layers: str  # dotted path from the model to the ModuleList of decoder blocks
    attn: str  # attention module, relative to a block
    o_proj: str  # the attention output projection, relative to a block; its input is [B, S, H·D]
    mlp: str  # feed-forward module, relative to a block
    n_heads_attr: tuple[str, ...] = ("num_attention_heads",)
    # Module whose output is the [B, H, S, S] attention weights under eager attention, relative
    # to a block; empty: the attention module's second output (Hugging Face eager attention).
    probs: str = ""
    # The norm applied to a block's input before attention, where the block is exactly
    # ``attn(norm(x), **block kwargs)`` plus the rest: lets generation refresh a block's KV cache
    # without its MLP. Empty: unknown or different (post-norm OLMo-2, Gemma-3's layer-type ropes).
    attn_norm: str = ""

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return _get(model, self.layers)

    def attention(self, model: nn.Module, layer: int) -> nn.Module:
        return _get(self.blocks(model)[layer], self.attn)

    def out_proj(self, model: nn.Module, layer: int) -> nn.Module:
        return _get(self.blocks(model)[layer], self.o_proj)

    def feed_forward(self, model: nn.Module, layer: int) -> nn.Module:
        return _get(self.blocks(model)[layer], self.mlp)

    def probs_site(self, model: nn.Module, layer: int) -> tuple[nn.Module, bool]:
        """(module to hook, whether the weights are the second element of its output)."""
        if self.probs:
            return _get(self.blocks(model)[layer], self.probs), False
        return self.attention(model, layer), True

    def num_layers(self, model: nn.Module) -> int:
        return len(self.blocks(model))

    def num_heads(self, model: nn.Module) -> int:
        config = getattr(model, "config", None)
        for attr in self.n_heads_attr:
            for owner in (config, getattr(config, "text_config", None), self.attention(model, 0)):
                if owner is not None and isinstance(getattr(owner, attr, None), int):
                    return getattr(owner, attr)
        raise UnsupportedArchitecture(f"{self.family}: cannot find the number of attention heads ({self.n_heads_attr})")

    def head_dim(self, model: nn.Module) -> int:
        proj = self.out_proj(model, 0)
        width = proj.in_features if isinstance(proj, nn.Linear) else proj.weight.shape[0]  # GPT-2's Conv1D
        return width // self.num_heads(model)


def attn_implementation(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) or getattr(model, "attn_implementation", None)


def _get(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


_LLAMA_LIKE = dict(layers="model.layers", attn="self_attn", o_proj="self_attn.o_proj", mlp="mlp")
ADAPTERS: dict[str, ArchAdapter] = {
    **{f: ArchAdapter(f, **_LLAMA_LIKE, attn_norm="input_layernorm") for f in ("llama", "mistral", "qwen2", "qwen3", "phi3")},
    **{f: ArchAdapter(f, **_LLAMA_LIKE) for f in ("gemma3_text", "olmo2")},
    "gpt2": ArchAdapter("gpt2", "transformer.h", "attn", "attn.c_proj", "mlp", ("n_head", "num_heads")),
    "lantern_moe": ArchAdapter("lantern_moe", "blocks", "attn", "attn.o_proj", "mlp", ("n_heads",), "attn.attn_probs"),
}


def get_adapter(model: nn.Module) -> ArchAdapter:
    """The adapter for ``model`` (a Hugging Face model or Lantern's MoETransformer)."""
    family = getattr(getattr(model, "config", None), "model_type", None) or getattr(model, "model_type", None)
    if family not in ADAPTERS:
        raise UnsupportedArchitecture(
            f"no architecture adapter for model_type={family!r} ({type(model).__name__}); "
            f"supported: {', '.join(sorted(ADAPTERS))}. Add an ArchAdapter to models/adapters.py."
        )
    return ADAPTERS[family]
