"""LightningDataModules; importing this package registers them with the CLI."""

from datamodules.eval_tasks import EvalTasksDataModule
from datamodules.text import DataError, TextDataModule

__all__ = ["DataError", "EvalTasksDataModule", "TextDataModule"]
