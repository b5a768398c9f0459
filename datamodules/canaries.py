"""Designed canaries for privacy auditing, and fine-tuning data with the member canaries mixed in.

Panda et al., "Privacy Auditing of Large Language Models", arXiv 2503.06808 (ICLR 2025). A canary
is ``[BOS] + prefix + secret + [EOS]`` with the loss on the secret only; exactly half of the ``m``
canaries, drawn by seed, are members and enter fine-tuning, the rest never do. How detectable a
member is depends on its secret's design:

- ``random``: ordinary tokens, drawn in proportion to their frequency in the fine-tuning data
  (the earlier baseline: a secret that looks like the data).
- ``unigram``: the least frequent tokens of the fine-tuning data, none used twice (ties by seed).
- ``bigram``: a pair (x, y) of minimal add-one-smoothed P(y | x) from the data's bigram counts: x
  is a frequent token that y never follows; x becomes the prefix's last token, y the secret (our
  reading of "pairs minimising P(y|x)": the smoothed estimate is lowest for frequent x). Longer
  secrets continue the chain, each token one its predecessor is never followed by.
- ``rare``: per prefix, the continuation a reference LM (by default the model being audited,
  before fine-tuning) finds least likely, none used twice.
- ``new``: a fresh token per secret position, beyond the tokenizer's vocabulary; the module
  resizes the embeddings and sets the new output rows to zero, so each starts at logit exactly 0.

Without DP every member joins each step's batch independently with probability ``canary_rate``
(1/max_steps by default: seen about once); with DP-SGD every row (text and member canaries) is
Poisson-sampled at one rate, as the privacy accounting assumes. Each step's batch is a function of
(seed, step), so a resumed run sees exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lantern.datamodules.text import TextDataModule
from lantern.errors import ConfigError, DataError, require
from lantern.models.loading import load_model, load_tokenizer

DESIGNS = ("random", "unigram", "bigram", "rare", "new")


@dataclass(frozen=True)
class Canaries:
    """``m`` canaries of one length: token ids, where the secret is, and who is a member."""

    design: str
    ids: torch.Tensor  # [m, L] long: BOS, prefix, secret, EOS
    secret_mask: torch.Tensor  # [m, L] bool: the secret's positions (the only ones with a loss)
    member: torch.Tensor  # [m] bool: exactly half True
    new_tokens: int = 0  # ids from the base vocabulary size upwards that the model must add (design new)

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def secret_ids(self) -> torch.Tensor:
        """[m, s] the secret tokens of each canary."""
        return self.ids[self.secret_mask].view(len(self), -1)

    @property
    def digest(self) -> str:
        """Changes with any token or membership: a checkpoint is audited only with its own canaries."""
        h = hashlib.sha1(self.design.encode())
        for t in (self.ids, self.secret_mask, self.member):
            h.update(t.numpy().tobytes())
        return h.hexdigest()[:16]

    def as_dict(self) -> dict:
        return {"design": self.design, "digest": self.digest, "new_tokens": self.new_tokens,
                "member": self.member.tolist(), "secret_positions": self.secret_mask[0].nonzero().flatten().tolist(),
                "ids": self.ids.tolist()}


def seeded(seed: int, *stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one named stream of random numbers, independent of every other stream."""
    key = hashlib.sha1(repr((seed, *stream)).encode()).digest()[:8]
    return torch.Generator(device=device).manual_seed(int.from_bytes(key, "big") >> 1)


def eligible_tokens(tokenizer, vocab_size: int) -> torch.Tensor:
    """Token ids a canary may contain: the vocabulary without its special tokens."""
    special = set(getattr(getattr(tokenizer, "tokenizer", None), "all_special_ids", None) or [tokenizer.eos_token_id])
    keep = torch.ones(vocab_size, dtype=torch.bool)
    keep[[i for i in special if i < vocab_size]] = False
    return keep.nonzero().flatten()


def bos_id(tokenizer) -> int:
    bos = getattr(getattr(tokenizer, "tokenizer", None), "bos_token_id", None)
    return tokenizer.eos_token_id if bos is None else bos


def make_canaries(design: str, m: int, tokenizer, *, prefix_len: int = 49, secret_len: int = 1,
                  prefix: str = "random", train_tokens: np.ndarray | None = None,
                  heldout_tokens: np.ndarray | None = None, reference=None, batch_size: int = 100,
                  seed: int = 0, where: str = "data") -> Canaries:
    """``m`` canaries of one design. Membership depends on ``seed`` and ``m`` only, so every design
    run with one seed audits the same members.

    ``train_tokens`` (the fine-tuning token stream) feeds the frequency designs; ``heldout_tokens``
    the ``heldout`` prefixes; ``reference`` (a causal LM) the ``rare`` design.
    """
    vocab = tokenizer.vocab_size
    pool = eligible_tokens(tokenizer, vocab)
    if prefix == "random":
        prefixes = pool[torch.randint(len(pool), (m, prefix_len), generator=seeded(seed, 1))]
    else:
        stream = torch.as_tensor(np.asarray(heldout_tokens, dtype=np.int64))
        windows = len(stream) // prefix_len
        if windows < m:
            raise DataError(f"{where}: the held-out text has {len(stream)} tokens, {windows} prefixes of {prefix_len}; "
                            f"{m} canaries need {m * prefix_len}: add documents, raise val_fraction or use prefix: random")
        starts = torch.randperm(windows, generator=seeded(seed, 1))[:m] * prefix_len
        prefixes = stream[starts[:, None] + torch.arange(prefix_len)]
    counts = None
    if design in ("random", "unigram", "bigram"):
        counts = torch.from_numpy(np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab)[:vocab])
    gen = seeded(seed, 2)
    new_tokens = 0
    if design == "random":
        weights = counts[pool].double()
        weights = weights if weights.sum() > 0 else torch.ones_like(weights)
        secrets = pool[torch.multinomial(weights, m * secret_len, replacement=True, generator=gen)].view(m, secret_len)
    elif design == "unigram":
        _need(len(pool), m * secret_len, where, design)
        shuffled = pool[torch.randperm(len(pool), generator=gen)]
        rarest = shuffled[torch.argsort(counts[shuffled], stable=True)]  # ties in random order
        secrets = rarest[: m * secret_len].view(m, secret_len)
    elif design == "bigram":
        prefixes, secrets = _bigram(prefixes, np.asarray(train_tokens, dtype=np.int64), counts, pool, secret_len, gen, where)
    elif design == "rare":
        secrets = _rare(prefixes, tokenizer, reference, pool, secret_len, batch_size, where)
    elif design == "new":
        secrets = vocab + torch.arange(m * secret_len).view(m, secret_len)
        new_tokens = m * secret_len
    else:
        raise ConfigError("CanaryDataModule", "design", design, f"one of {', '.join(DESIGNS)}")
    bos = torch.full((m, 1), bos_id(tokenizer))
    eos = torch.full((m, 1), tokenizer.eos_token_id)
    ids = torch.cat([bos, prefixes, secrets, eos], 1).long()
    secret_mask = torch.zeros_like(ids, dtype=torch.bool)
    secret_mask[:, 1 + prefix_len: 1 + prefix_len + secret_len] = True
    member = torch.zeros(m, dtype=torch.bool)
    member[torch.randperm(m, generator=seeded(seed, 3))[: m // 2]] = True
    return Canaries(design, ids, secret_mask, member, new_tokens)


def _need(have: int, need: int, where: str, design: str) -> None:
    if have < need:
        raise DataError(f"{where}: design {design!r} uses each token once and needs {need} distinct tokens; "
                        f"the vocabulary has {have}: lower canaries or secret_len")


def _bigram(prefixes, stream: np.ndarray, counts, pool, secret_len: int, gen, where: str):
    """Frequent x, then tokens each never seen after its predecessor; no secret token used twice."""
    m = prefixes.shape[0]
    _need(len(pool), m * (secret_len + 1), where, "bigram")
    vocab = len(counts)
    pairs = np.unique(stream[:-1] * vocab + stream[1:]) if len(stream) > 1 else np.zeros(0, dtype=np.int64)
    followers: dict[int, set[int]] = {}
    for key in pairs.tolist():
        followers.setdefault(key // vocab, set()).add(key % vocab)
    by_count = pool[torch.argsort(counts[pool], descending=True, stable=True)]
    xs = by_count[:m]
    candidates = pool[torch.randperm(len(pool), generator=gen)].tolist()
    used, cursor = set(xs.tolist()), 0
    secrets = torch.empty(m, secret_len, dtype=torch.long)
    for i, x in enumerate(xs.tolist()):
        context = x
        for j in range(secret_len):
            seen = followers.get(context, ())
            k = cursor
            while k < len(candidates) and (candidates[k] in used or candidates[k] in seen):
                k += 1  # a seen follower is skipped, never consumed
            if k == len(candidates):
                raise DataError(f"{where}: design 'bigram' ran out of tokens never seen after {context} for "
                                f"{m} canaries; lower canaries or secret_len")
            y = candidates[k]
            candidates[k], candidates[cursor] = candidates[cursor], candidates[k]
            cursor += 1
            used.add(y)
            secrets[i, j] = context = y
    prefixes = prefixes.clone()
    prefixes[:, -1] = xs
    return prefixes, secrets


@torch.no_grad()
def _rare(prefixes, tokenizer, reference, pool, secret_len: int, batch_size: int, where: str):
    """Greedy least-likely continuation under ``reference``, each token used once."""
    m = prefixes.shape[0]
    _need(len(pool), m * secret_len, where, "rare")
    device = next(reference.parameters()).device
    allowed = torch.zeros(reference.get_output_embeddings().weight.shape[0], dtype=torch.bool)
    allowed[pool] = True
    used = torch.zeros_like(allowed)
    rows = torch.cat([torch.full((m, 1), bos_id(tokenizer)), prefixes], 1)
    secrets = torch.empty(m, secret_len, dtype=torch.long)
    depth = min(len(pool), m * secret_len + 1)
    for j in range(secret_len):
        ranked = []
        for chunk in rows.split(batch_size):
            logits = reference(input_ids=chunk.to(device)).logits[:, -1].float().cpu()
            logits[:, ~allowed] = float("inf")
            ranked.append(torch.topk(logits, depth, largest=False).indices)  # least likely first
        ranked = torch.cat(ranked)
        for i in range(m):  # earlier canaries claim their first choice; later ones take the next unused
            choice = ranked[i][~used[ranked[i]]][0]
            used[choice] = True
            secrets[i, j] = choice
        rows = torch.cat([rows, secrets[:, j: j + 1]], 1)
    return secrets


# ----------------------------------------------------------------------------- batches
def collate_rows(rows: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (ids, scored) rows; ``completion_mask`` marks the tokens with a loss. An empty step
    (Poisson sampling drew nothing) becomes one row with no loss, so DP-SGD still adds its noise."""
    if not rows:
        rows = [(torch.tensor([pad_id]), torch.tensor([False]))]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    scored = torch.zeros(len(rows), width, dtype=torch.bool)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    for r, (seq, mask) in enumerate(rows):
        ids[r, : len(seq)], scored[r, : len(seq)], attention[r, : len(seq)] = seq, mask, 1
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": scored}


class StepBatches(Dataset):
    """Item ``t`` is this rank's whole batch of step ``t``: text blocks and member canaries."""

    def __init__(self, dm: "CanaryDataModule", steps: int, world: int, rank: int):
        self.dm, self.steps, self.world, self.rank = dm, steps, world, rank

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        dm = self.dm
        return collate_rows([dm.row(i) for i in dm.step_rows(step, self.world)[self.rank:: self.world]],
                            dm.tokenizer.eos_token_id)


class _FromStep(DistributedSampler):
    """Steps ``start`` … ``steps − 1`` in order. A ``DistributedSampler`` of one replica, so Lightning
    leaves it in place under DDP: every rank walks the same steps and takes its own share of each."""

    def __init__(self, dataset: Dataset, start: int):
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=False)
        self.start = start

    def __iter__(self):
        return iter(range(self.start, len(self.dataset)))

    def __len__(self) -> int:  # the whole run: a resumed Lightning loop counts the restored batches as done
        return len(self.dataset)


class _CanaryRows(Dataset):
    def __init__(self, canaries: Canaries):
        self.canaries = canaries

    def __len__(self) -> int:
        return len(self.canaries)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        c = self.canaries
        return {"index": torch.tensor(i), "input_ids": c.ids[i], "secret_mask": c.secret_mask[i]}


class CanaryDataModule(TextDataModule):
    def __init__(
        self,
        source: str = "stdlib",
        tokenizer: str | None = None,
        design: Literal["random", "unigram", "bigram", "rare", "new"] = "unigram",
        canaries: int = 1000,
        prefix_len: int = 49,
        secret_len: int = 1,
        prefix: Literal["random", "heldout"] = "random",
        reference_model: str | None = None,
        canary_rate: float | None = None,
        text_rows: int | None = None,
        block_size: int = 128,
        batch_size: int = 8,
        eval_batch_size: int = 100,
        val_fraction: float = 0.05,
        text_field: str = "text",
        hf_config: str | None = None,
        hf_split: str = "train",
        max_documents: int | None = None,
        cache_dir: str | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ):
        """
        Args:
            source: the fine-tuning text: ``stdlib``, a ``.txt``/``.jsonl`` file or folder, or ``hf:NAME``.
            tokenizer: the audited model's tokenizer; under the CLI, None takes the module's.
            design: the secret's design (see the module docstring).
            canaries: m, the canary pool; exactly half are members.
            prefix_len: prefix tokens between BOS and the secret.
            secret_len: secret tokens, the only ones with a loss.
            prefix: ``random`` (uniform over the vocabulary) or ``heldout`` (windows of the held-out text).
            reference_model: the LM that ranks continuations for ``rare``; None: the audited model.
            canary_rate: chance that a member joins a given step's batch (without DP); None: 1/max_steps.
            text_rows: fine-tune on this many text blocks (drawn by seed); None: all. DP-SGD samples every
                row at batch_size/n, so a small n is what lets a member be seen at all in a short run.
            block_size: tokens per fine-tuning text row.
            batch_size: text rows per step and device (with DP-SGD: the expected rows per step, canaries included).
            eval_batch_size: canaries per scoring batch.
            val_fraction: share of documents held out (the ``heldout`` prefixes come from them).
            text_field / hf_config / hf_split / max_documents / cache_dir / num_workers: as in ``TextDataModule``.
            seed: canaries, membership and batch order.
        """
        super().__init__(source=source, tokenizer=tokenizer, block_size=block_size, batch_size=batch_size,
                         val_fraction=val_fraction, text_field=text_field, hf_config=hf_config, hf_split=hf_split,
                         max_documents=max_documents, cache_dir=cache_dir, num_workers=num_workers, seed=seed)
        require(design in DESIGNS, self, "design", design, f"one of {', '.join(DESIGNS)}")
        require(isinstance(canaries, int) and canaries >= 2 and canaries % 2 == 0, self, "canaries", canaries,
                "an even number ≥ 2 (exactly half are members)")
        require(prefix_len >= 1, self, "prefix_len", prefix_len, "≥ 1")
        require(secret_len >= 1, self, "secret_len", secret_len, "≥ 1")
        require(prefix in ("random", "heldout"), self, "prefix", prefix, "'random' or 'heldout'")
        require(canary_rate is None or 0 < canary_rate <= 1, self, "canary_rate", canary_rate,
                "a probability in (0, 1], or null for 1/max_steps")
        require(text_rows is None or text_rows >= 1, self, "text_rows", text_rows, "≥ 1, or null for every block")
        require(eval_batch_size >= 1, self, "eval_batch_size", eval_batch_size, "≥ 1")
        self.design, self.m, self.prefix_len, self.secret_len = design, canaries, prefix_len, secret_len
        self.prefix, self.reference_model, self.canary_rate = prefix, reference_model, canary_rate
        self.eval_batch_size, self.text_rows = eval_batch_size, text_rows
        self.text_index: torch.Tensor | None = None
        self.canaries: Canaries | None = None
        self.poisson: float | None = None  # DP-SGD: the module sets the sampling rate of every row

    # ------------------------------------------------------------------ canaries
    def _model_tokenizer(self) -> None:
        module = getattr(self.trainer, "lightning_module", None)
        if self.tokenizer_name is None and module is not None:  # outside the CLI too: the audited model's tokenizer
            self.tokenizer_name = getattr(module, "tokenizer_name", None)

    def prepare_data(self) -> None:
        self._model_tokenizer()
        super().prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self._model_tokenizer()
        if self.train_set is None:
            super().setup(stage)
            n = len(self.train_set)
            self.text_index = (torch.arange(n) if self.text_rows is None or self.text_rows >= n
                               else torch.randperm(n, generator=seeded(self.seed, 0))[: self.text_rows].sort().values)
        if self.canaries is None:
            self.canaries = self.build_canaries()

    def build_canaries(self) -> Canaries:
        reference = None
        if self.design == "rare":
            name = self.reference_model or self.tokenizer_name
            if load_tokenizer(name).fingerprint != self.tokenizer.fingerprint:
                raise ConfigError(self, "reference_model", name, f"a model sharing the tokenizer of {self.tokenizer_name!r}")
            reference = load_model(name, seed=self.seed)
        return make_canaries(
            self.design, self.m, self.tokenizer, prefix_len=self.prefix_len, secret_len=self.secret_len,
            prefix=self.prefix, train_tokens=np.asarray(self.train_set.blocks)[self.text_index.numpy()].ravel(),
            heldout_tokens=np.asarray(self.val_set.blocks).ravel(), reference=reference,
            batch_size=self.eval_batch_size, seed=self.seed, where=f"data.source {self.source!r}",
        )

    # ------------------------------------------------------------------ the fine-tuning schedule
    @property
    def members(self) -> torch.Tensor:
        return self.canaries.member.nonzero().flatten()

    @property
    def train_rows(self) -> int:
        """Rows that may enter training: text blocks and member canaries (n of the DP accounting)."""
        return len(self.text_index) + len(self.members)

    def row(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row ``i``: a text block (loss on every next token) or, past them, a member canary."""
        n_text = len(self.text_index)
        if i < n_text:
            ids = torch.from_numpy(np.asarray(self.train_set.blocks[int(self.text_index[i])], dtype=np.int64))
            scored = torch.ones_like(ids, dtype=torch.bool)
            scored[0] = False
            return ids, scored
        c = int(self.members[i - n_text])
        return self.canaries.ids[c], self.canaries.secret_mask[c]

    def step_rows(self, step: int, world: int = 1) -> list[int]:
        """Every row of step ``step`` across all ranks, from (seed, step) alone."""
        n_text, n_members = len(self.text_index), len(self.members)
        draw = seeded(self.seed, 4, step)
        if self.poisson is not None:
            return (torch.rand(n_text + n_members, generator=draw) < self.poisson).nonzero().flatten().tolist()
        per_step = self.batch_size * world
        first = step * per_step
        text = []
        for epoch in range(first // n_text, (first + per_step - 1) // n_text + 1):
            order = torch.randperm(n_text, generator=seeded(self.seed, 5, epoch))
            lo, hi = max(first - epoch * n_text, 0), min(first + per_step - epoch * n_text, n_text)
            text += order[lo:hi].tolist()
        rate = self.canary_rate or 1.0 / self.steps
        members = (torch.rand(n_members, generator=draw) < rate).nonzero().flatten() + n_text
        return text + members.tolist()

    @property
    def steps(self) -> int:
        steps = self.trainer.max_steps if self.trainer is not None else -1
        if steps is None or steps < 1:
            raise ConfigError("trainer", "max_steps", steps, "the number of fine-tuning steps (canaries are scheduled per step)")
        return steps

    def train_dataloader(self) -> DataLoader:
        if self.canaries is None:
            self.setup("fit")
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        batches = StepBatches(self, self.steps, world, rank)
        start = self.trainer.global_step if self.trainer is not None else 0
        return DataLoader(batches, batch_size=None, sampler=_FromStep(batches, start), num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        """Every canary, members and non-members, for scoring."""
        if self.canaries is None:
            self.setup("validate")
        rows = _CanaryRows(self.canaries)
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        return DataLoader(rows, batch_size=self.eval_batch_size,
                          sampler=DistributedSampler(rows, world, rank, shuffle=False, drop_last=False))

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
