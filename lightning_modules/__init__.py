"""LightningModules, one per method; importing this package registers them with the CLI."""

from lantern.lightning_modules.adapters import AdapterFineTuning, AdapterMerge
from lantern.lightning_modules.als import AmortizedLatentSteering
from lantern.lightning_modules.canary import Audit, CanaryFineTuning, DPSGD
from lantern.lightning_modules.dormant_heads import DormantHeadsStudy
from lantern.lightning_modules.dpo import DPO, LoRA
from lantern.lightning_modules.em_icl import EmergentMisalignment
from lantern.lightning_modules.eval_awareness import EvalAwarenessProbes
from lantern.lightning_modules.frit import FRIT
from lantern.lightning_modules.guardian import GRPO, Guardian, GuardianJudge
from lantern.lightning_modules.moe_pretraining import MoEPretraining
from lantern.lightning_modules.optim import AdamW
from lantern.lightning_modules.vdit_attention import VDiTAttentionStudy

__all__ = ["AdamW", "AdapterFineTuning", "AdapterMerge", "AmortizedLatentSteering", "Audit", "CanaryFineTuning", "DPSGD", "DPO", "DormantHeadsStudy", "EmergentMisalignment", "EvalAwarenessProbes", "FRIT", "GRPO", "Guardian", "GuardianJudge", "LoRA", "MoEPretraining", "VDiTAttentionStudy"]
