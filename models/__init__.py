"""Plain ``nn.Module`` architectures and model loading, apart from the Lightning glue."""

from lantern.models.generation import Generated, Sampling, generate, render_prompt
from lantern.models.adapters import ArchAdapter, UnsupportedArchitecture, get_adapter
from lantern.models.loading import DEFAULT_MODEL, ByteTokenizer, ModelLoadError, load_model, load_tokenizer
from lantern.models.moe import MoEFeedForward, MoETransformer
from lantern.models.scoring import (
    CompletionLogprobs, MultipleChoice, completion_logprobs, multiple_choice, position_ids, token_logprobs,
)

__all__ = [
    "ArchAdapter", "ByteTokenizer", "DEFAULT_MODEL", "ModelLoadError", "MoEFeedForward", "MoETransformer",
    "UnsupportedArchitecture", "get_adapter", "load_model", "load_tokenizer",
    "CompletionLogprobs", "Generated", "MultipleChoice", "Sampling", "generate", "render_prompt", "completion_logprobs", "multiple_choice", "position_ids", "token_logprobs",
]
