"""Prompt pairs for the video-DiT attention study (arXiv 2504.10317).

Each item is a (source, target) pair: the study compares the attention maps of the two
generations (cross-prompt similarity) and transfers the source's maps into the target's
generation (editing), so a pair differs in one attribute and shares the scene.
"""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

DEFAULT_PAIRS = [
    ["a red car drives along a coastal road at sunset", "a blue car drives along a coastal road at sunset"],
    ["a cat walks across a snowy garden", "a dog walks across a snowy garden"],
    ["waves crash against a lighthouse in a storm", "waves crash against a lighthouse on a calm morning"],
    ["a chef slices vegetables in a busy kitchen", "a robot slices vegetables in a busy kitchen"],
]


def _as_list(items: list[dict[str, str]]) -> list[dict[str, str]]:
    return items


class VDiTPromptPairs(L.LightningDataModule):
    def __init__(self, pairs: list[list[str]] | None = None, limit: int | None = None, batch_size: int = 1):
        """
        Args:
            pairs: [source, target] prompt pairs; the built-in four (one attribute changed each) if None.
            limit: keep only the first ``limit`` pairs.
            batch_size: pairs per validation batch (the study runs each pair on its own).
        """
        super().__init__()
        pairs = DEFAULT_PAIRS if pairs is None else pairs
        for i, pair in enumerate(pairs):
            if len(pair) != 2 or not all(isinstance(p, str) and p.strip() for p in pair):
                raise ValueError(f"data.pairs[{i}]={pair!r} must be two non-empty prompts [source, target]")
        if not pairs:
            raise ValueError("data.pairs is empty")
        if limit is not None and limit < 1:
            raise ValueError(f"data.limit={limit} must be ≥ 1")
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be ≥ 1")
        self.pairs = [{"source": s, "target": t} for s, t in pairs[:limit]]
        self.batch_size = batch_size

    def _loader(self) -> DataLoader:
        return DataLoader(self.pairs, batch_size=self.batch_size, shuffle=False, collate_fn=_as_list)

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()
