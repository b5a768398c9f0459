"""Reusable Lightning callbacks that work on any supported Hugging Face model."""
