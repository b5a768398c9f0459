"""LightningDataModules; importing this package registers them with the CLI."""

from lantern.datamodules.canaries import CanaryDataModule
from lantern.datamodules.em_icl import ManyShotPrompts
from lantern.datamodules.eval_awareness import EvalAwarenessData
from lantern.datamodules.eval_tasks import EvalTasksDataModule
from lantern.datamodules.guardian import GuardianData
from lantern.datamodules.instruction import InstructionDataModule
from lantern.datamodules.preference import PreferenceDataModule
from lantern.datamodules.problems import ReasoningProblems
from lantern.datamodules.text import DataError, TextDataModule
from lantern.datamodules.vdit_prompts import VDiTPromptPairs

__all__ = ["CanaryDataModule", "DataError", "EvalAwarenessData", "EvalTasksDataModule", "GuardianData", "InstructionDataModule", "ManyShotPrompts", "PreferenceDataModule", "ReasoningProblems", "TextDataModule", "VDiTPromptPairs"]
