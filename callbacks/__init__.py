"""Reusable Lightning callbacks that work on any supported Hugging Face model (and Lantern's own)."""

from lantern.callbacks.activation_cache import ActivationCache
from lantern.callbacks.head_ablation import HeadAblation
from lantern.callbacks.nonfinite import FiniteCheckpoint, NonFiniteGuard
from lantern.callbacks.sinks import SinkMeasurement
from lantern.callbacks.vdit_attention import VDiTAttention

__all__ = ["ActivationCache", "FiniteCheckpoint", "HeadAblation", "NonFiniteGuard", "SinkMeasurement", "VDiTAttention"]
