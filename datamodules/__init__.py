"""LightningDataModules; importing this package registers them with the CLI."""

from lantern.datamodules.eval_tasks import EvalTasksDataModule
from lantern.datamodules.instruction import InstructionDataModule
from lantern.datamodules.text import DataError, TextDataModule
from lantern.datamodules.vdit_prompts import VDiTPromptPairs

__all__ = ["DataError", "EvalTasksDataModule", "InstructionDataModule", "TextDataModule", "VDiTPromptPairs"]
