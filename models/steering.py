"""Directions in a model's residual stream: reading activations, saving and loading directions.

ALS (arXiv 2509.18116) calibrates a steering vector and the evaluation-awareness probes
(arXiv 2509.13333) fit one direction per layer; both write the same safetensors file, so a probe
direction loads as a steering vector and the other way round.

Layer convention everywhere: ``layer`` L is the residual stream *entering* decoder block L, which
is ``output_hidden_states[L]``; L = n_blocks is the final (post-norm) state. A negative L counts
blocks from the end, so -1 is the input of the last block: the penultimate layer's output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lantern.errors import ConfigError, DataError, require
from lantern.models.adapters import get_adapter
from lantern.models.scoring import decoder_body, position_ids

FORMAT = "lantern-direction-v1"


@dataclass
class Direction:
    """A residual-stream direction and where it came from (model, layer, data, counts, seed, ...)."""

    vector: torch.Tensor  # [d], float32, not normalised (ALS's α is a multiple of the unit vector)
    layer: int  # non-negative block index whose input it lives in (module docstring)
    metadata: dict = field(default_factory=dict)

    @property
    def unit(self) -> torch.Tensor:
        """v / ‖v‖, or zeros for ‖v‖ = 0 (identical good and bad sets): steering with it is a no-op."""
        norm = self.vector.norm()
        return self.vector / norm if norm > 0 else torch.zeros_like(self.vector)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "layer": str(self.layer), "metadata": json.dumps(self.metadata, sort_keys=True)}
        save_file({"vector": self.vector.detach().float().cpu().contiguous()}, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path, owner: object = "direction", field_name: str = "path") -> "Direction":
        """Read a direction file; anything else fails in one line naming the setting and the file."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise ConfigError(owner, field_name, str(path), "an existing direction file (.safetensors written by fit)")
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise DataError(f"{path}: not a safetensors file ({err})") from None
        try:
            ok = meta.get("format") == FORMAT and tensors["vector"].dim() == 1
            layer, metadata = int(meta["layer"]), json.loads(meta.get("metadata", "{}"))
        except (KeyError, ValueError):
            ok = False
        if not ok:
            raise DataError(f"{path}: not a direction file (expected format {FORMAT} with a 1-D 'vector' and its layer)")
        return cls(tensors["vector"].float(), layer, metadata)

    def check_fits(self, model, owner: object = "direction", field_name: str = "path") -> None:
        """The direction's width and layer must exist in ``model``."""
        width = model.get_input_embeddings().weight.shape[1]
        n = get_adapter(model).num_layers(model)
        require(self.vector.numel() == width and 0 <= self.layer <= n, owner, field_name,
                self.metadata.get("path", "the direction"),
                f"a direction of width {width} at a layer in 0..{n} for this model "
                f"(this one is width {self.vector.numel()} at layer {self.layer}, from {self.metadata.get('model', '?')})")


def mean_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, select: torch.Tensor,
                layers: list[int] | None = None) -> torch.Tensor:
    """Mean residual stream over the ``select``ed positions of each row: [B, len(layers), d], float32.

    One forward with ``output_hidden_states``; ``hidden_states[L]`` is the input of block L. A row
    with no selected position gives zeros. ``layers`` None: all n + 1 states. The output layer is
    skipped where the model has a separate decoder: a 262k-word head costs Gemma-3-270M more than
    all its blocks.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = decoder_body(base) or model
    out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
               output_hidden_states=True, use_cache=False)
    states = out.hidden_states if layers is None else [out.hidden_states[i] for i in layers]
    weight = (select & attention_mask.bool()).float()
    count = weight.sum(1).clamp(min=1)[:, None]
    return torch.stack([(h.float() * weight[..., None]).sum(1) / count for h in states], dim=1)


class ALSSteer:
    """ALS's decode-time nudge, a ``generate`` hook: where cos(h, v̂) < τ, add α·v̂ at the last position.

    Use with ``generate(..., hook=steer, hook_layer=direction.layer, transient=True)`` so the nudge
    never reaches the cached keys and values (arXiv 2509.18116, notes §5). The gated variant for
    structured answers: ``gate_open``/``gate_close`` are token ids (e.g. every token holding ``{`` /
    ``}``); from a step whose input token opened the structure until one that closes it, α = 0, so
    steering never edits the tokens that must keep the answer's syntax. The firing rate is counted
    on device over rows still generating.
    """

    def __init__(self, unit: torch.Tensor, alpha: float, tau: float, gate_open: torch.Tensor | None = None,
                 gate_close: torch.Tensor | None = None):
        self.unit, self.alpha, self.tau = unit.float(), float(alpha), float(tau)
        self.gate = None if gate_open is None else (gate_open, gate_close if gate_close is not None else gate_open[:0])
        self.fired = self.steps = None
        self._inside: torch.Tensor | None = None

    def _on(self, device: torch.device) -> None:
        """Move the vector and gate ids once: a per-step host→device copy would stall a GPU."""
        if self.unit.device != device:
            self.unit = self.unit.to(device)
            self.gate = None if self.gate is None else tuple(t.to(device) for t in self.gate)

    def __call__(self, hidden: torch.Tensor, step) -> torch.Tensor:
        self._on(hidden.device)
        h = hidden[:, -1].float()
        cos = (h @ self.unit) / h.norm(dim=-1).clamp(min=1e-12)
        fire = cos < self.tau
        if self.gate is not None:
            if step.index == 0:
                self._inside = torch.zeros_like(fire)
            else:  # the token fed now was emitted last step: it may open or close the structure
                opened, closed = (torch.isin(step.last_tokens, ids) for ids in self.gate)
                self._inside = torch.where(closed, False, self._inside | opened)
            fire = fire & ~self._inside
        counted = fire & step.alive
        if self.fired is None:
            self.fired, self.steps = counted.sum(), step.alive.sum()
        else:
            self.fired, self.steps = self.fired + counted.sum(), self.steps + step.alive.sum()
        out = hidden.clone()
        out[:, -1] += (self.alpha * fire[:, None].float() * self.unit).to(hidden.dtype)
        return out

    @property
    def firing_rate(self) -> float:
        """Share of generated tokens whose step fired (one host sync: call after generating)."""
        return float(self.fired) / max(int(self.steps), 1) if self.fired is not None else 0.0


def tokens_containing(tokenizer, text: str) -> torch.Tensor:
    """Ids of every token whose decoded text contains ``text`` (ALS's gate for structured answers)."""
    ids = list(range(tokenizer.vocab_size))
    hf = getattr(tokenizer, "tokenizer", None)
    pieces = hf.batch_decode([[i] for i in ids]) if hf is not None else [tokenizer.decode([i]) for i in ids]
    return torch.tensor([i for i, piece in zip(ids, pieces) if text in piece], dtype=torch.long)
