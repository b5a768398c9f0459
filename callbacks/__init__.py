"""Reusable Lightning callbacks that work on any supported Hugging Face model."""

from callbacks.head_ablation import HeadAblation

__all__ = ["HeadAblation"]
