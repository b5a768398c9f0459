"""LightningDataModules; importing this package registers them with the CLI."""

from datamodules.text import DataError, TextDataModule

__all__ = ["DataError", "TextDataModule"]
