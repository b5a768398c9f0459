"""LightningDataModules; importing this package registers them with the CLI."""

from datamodules.eval_tasks import EvalTasksDataModule
from datamodules.text import DataError, TextDataModule
from datamodules.vdit_prompts import VDiTPromptPairs

__all__ = ["DataError", "EvalTasksDataModule", "TextDataModule", "VDiTPromptPairs"]
