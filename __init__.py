"""Lantern: PyTorch Lightning recipes for LLM safety, interpretability and efficiency research.

The checkout's root is this package: ``lantern.models``, ``lantern.callbacks``,
``lantern.datamodules``, ``lantern.lightning_modules`` and ``lantern.cli``.
"""
