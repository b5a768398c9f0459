"""Reusable Lightning callbacks that work on any supported Hugging Face model (and Lantern's own)."""

from callbacks.activation_cache import ActivationCache
from callbacks.head_ablation import HeadAblation
from callbacks.sinks import SinkMeasurement
from callbacks.vdit_attention import VDiTAttention

__all__ = ["ActivationCache", "HeadAblation", "SinkMeasurement", "VDiTAttention"]
