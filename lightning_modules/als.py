"""Amortized Latent Steering (ALS): one offline vector instead of per-query latent optimisation.

Egbuna et al., "Amortized Latent Steering: Low-Cost Alternative to Test-Time Optimization",
arXiv 2509.18116. ``fit`` is the calibration, one pass with no optimizer: greedy-decode the
calibration problems, average the hidden states that produced each answer's tokens at the
steering layer, label each answer good or bad against the exact answer, and save
v = mean(good) − mean(bad) (``als_vector.safetensors`` in the run directory; a
``lantern.models.steering.Direction``, so an evaluation-awareness probe loads in its place).
Decoding then adds α·v̂ to the last position wherever cos(h, v̂) < τ, the nudge never reaching the
KV cache (``ALSSteer``).

Choices where the notes are silent: the states averaged are the ones the gate later looks at
(the inputs to the steering layer at the positions that *produced* each answer token, the
prompt's last included); the steering layer is the input of block ``layer`` (default -1: the
penultimate layer's output, the paper's; the paper's code uses the final post-norm state);
self-consistency samples at temperature 0.7 and votes on the extracted answer; the
LatentSeek-style baseline (arXiv 2505.13308) optimises, per problem, an offset to the same
layer at every answer position with Adam (lr 0.03, 10 rounds) by REINFORCE on the model's own
judgement of its answer (p(Yes) to "Is the proposed solution correct?", centred at 0.5), and
keeps the answer it judged best: no ground truth at test time, as in that paper.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass

import lightning as L
import torch
import torch.distributed as dist

from lantern import reporting
from lantern.datamodules.instruction import collate_pairs
from lantern.datamodules.tasks import Example
from lantern.errors import ConfigError, LanternError, require
from lantern.models import completion_logprobs, get_adapter, load_model
from lantern.models.generation import Generated, Sampling, Step, encode_prompts, generate
from lantern.models.loading import load_tokenizer
from lantern.models.steering import ALSSteer, Direction, mean_hidden, tokens_containing

METHODS = ("greedy", "self_consistency", "als", "latent_seek")


class AmortizedLatentSteering(L.LightningModule):
    def __init__(
        self,
        model_name: str = "smollm2-135m-instruct",
        layer: int = -1,
        tau: float = 0.1,
        alphas: list[float] = (0.0, 0.1, 0.3, 0.6),
        gate: list[str] | None = None,
        vector_path: str | None = None,
        methods: list[str] = METHODS,
        max_new_tokens: int = 128,
        generation_batch_size: int = 32,
        self_consistency: int = 5,
        sc_temperature: float = 0.7,
        latent_steps: int = 10,
        latent_lr: float = 0.03,
        seed: int = 0,
    ):
        """
        Args:
            model_name: model to steer (see ``lantern.models.load_model``).
            layer: steer the residual stream entering this decoder block (-1: the last block's input).
            tau: the gate: steer where cos(h, v̂) < τ (the paper's 0.1 fires on ~30% of tokens).
            alphas: steering strengths evaluated; 0 is always run as the control.
            gate: the gated variant for structured answers, ``[open, close]`` (``["{", "}"]`` for JSON
                answers): no nudge from a token containing ``open`` until one containing ``close``.
            vector_path: a direction file to steer with instead of calibrating (``validate`` alone).
            methods: what ``validate`` compares: greedy, self_consistency, als, latent_seek.
            max_new_tokens: answer length limit, every method.
            generation_batch_size: prompts decoded together.
            self_consistency: k samples voted on.
            sc_temperature: their sampling temperature.
            latent_steps: rounds of the LatentSeek-style baseline.
            latent_lr: its Adam learning rate on the latent offset.
            seed: sampling seed.
        """
        super().__init__()
        alphas = [float(a) for a in alphas]
        require(all(a >= 0 for a in alphas), self, "alphas", alphas, "strengths ≥ 0")
        if 0.0 not in alphas:
            alphas = [0.0, *alphas]  # the control: same path, no nudge (the paper's own ablation ties at α = 0)
        require(-2 <= tau <= 2, self, "tau", tau, "a cosine threshold (≤ -1 never fires, > 1 always fires)")
        methods = [methods] if isinstance(methods, str) else list(methods)
        require(len(methods) > 0 and set(methods) <= set(METHODS), self, "methods", methods, f"a list of {', '.join(METHODS)}")
        for name, value, low in (("max_new_tokens", max_new_tokens, 1), ("generation_batch_size", generation_batch_size, 1),
                                 ("self_consistency", self_consistency, 1), ("latent_steps", latent_steps, 1)):
            require(isinstance(value, int) and value >= low, self, name, value, f"an integer ≥ {low}")
        require(latent_lr > 0, self, "latent_lr", latent_lr, "> 0")
        require(gate is None or (isinstance(gate, (list, tuple)) and len(gate) == 2 and all(isinstance(g, str) and g for g in gate)),
                self, "gate", gate, "two non-empty strings [open, close], e.g. ['{', '}'], or null")
        self.save_hyperparameters()
        self.hparams["alphas"] = alphas
        self.tokenizer_name = model_name
        self.tokenizer = load_tokenizer(model_name)
        self.model = load_model(model_name, seed=seed)
        for p in self.model.parameters():
            p.requires_grad_(False)
        n = get_adapter(self.model).num_layers(self.model)
        require(isinstance(layer, int) and -n <= layer < n, self, "layer", layer,
                f"a decoder block whose input is steered: -{n}..{n - 1} (-1: the last block's input)")
        self.layer = layer % n
        width = self.model.get_input_embeddings().weight.shape[1]
        # the calibrated vector travels in checkpoints (the frozen model does not: it is rebuilt from model_name)
        self.register_buffer("vector", torch.zeros(width))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        if vector_path is not None:
            direction = Direction.load(vector_path, self, "vector_path")
            direction.metadata.setdefault("path", vector_path)
            direction.check_fits(self.model, self, "vector_path")
            require(direction.layer == self.layer, self, "layer", layer,
                    f"the layer the vector was made at ({direction.layer}), or another vector_path")
            self.vector.copy_(direction.vector)
            self.calibrated.fill_(True)
            self._metadata = direction.metadata
        self.gate_tokens = tuple(tokens_containing(self.tokenizer, g) for g in gate) if gate else None
        self._reset_calibration()

    # ------------------------------------------------------------------ checkpoint: the vector only
    def state_dict(self, *args, **kwargs):
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        return type(full)((k, v) for k, v in full.items() if k[len(prefix):] in ("vector", "calibrated"))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        missing = {"vector", "calibrated"} - set(state_dict)
        if strict and missing:
            raise ConfigError(self, "checkpoint", sorted(missing)[0], "a checkpoint of an ALS calibration")
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["als_vector_metadata"] = dict(getattr(self, "_metadata", {}))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._metadata = checkpoint.get("als_vector_metadata", {})

    def setup(self, stage: str) -> None:
        # Nothing trains, so DDP cannot wrap the module; calibration is one cheap pass anyway.
        require(stage != "fit" or self.trainer.world_size == 1, "trainer", "devices", self.trainer.world_size,
                "1 device for fit (the calibration); validate runs on several")

    def configure_optimizers(self):
        return None  # calibration is one pass: nothing is trained

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # prompts and answers: nothing to move

    @property
    def direction(self) -> Direction:
        return Direction(self.vector.detach().cpu(), self.layer, dict(getattr(self, "_metadata", {})))

    # ------------------------------------------------------------------ calibration (fit)
    def _reset_calibration(self) -> None:
        self._sums = torch.zeros(2, self.vector.numel(), dtype=torch.float64)  # bad, good
        self._counts = torch.zeros(2, dtype=torch.float64)
        self._norm_sum = 0.0

    def _sampling(self, **kw) -> Sampling:
        return Sampling(max_new_tokens=self.hparams.max_new_tokens, **kw)

    def _generate(self, prompts, sampling: Sampling, **kw) -> Generated:
        dm = self.trainer.datamodule
        return generate(self.model, self.tokenizer, prompts, sampling, chat=dm.hparams.chat, system=dm.hparams.system,
                        batch_size=self.hparams.generation_batch_size, **kw)

    def on_train_epoch_start(self) -> None:
        self._reset_calibration()

    def training_step(self, batch: dict, batch_idx: int) -> None:
        out = self._generate(batch["prompts"], self._sampling())
        correct = torch.tensor(self.trainer.datamodule.scorer.score(batch["examples"], out.text).correct).bool()
        dm = self.trainer.datamodule
        states = answer_states(self.model, self.tokenizer, batch["prompts"], out.tokens, self.layer, dm.hparams.chat,
                               dm.hparams.system, self.hparams.generation_batch_size).double().cpu()
        self._norm_sum += float(states.norm(dim=-1).sum())
        self._sums[1] += states[correct].sum(0)
        self._sums[0] += states[~correct].sum(0)
        self._counts += torch.stack([(~correct).sum(), correct.sum()]).double()
        return None

    def on_validation_epoch_start(self) -> None:
        if self.trainer.state.fn == "fit" and self._counts.sum() > 0:
            self._finish_calibration()  # validation runs before on_train_epoch_end
        self._tally: dict[tuple, dict] = defaultdict(lambda: defaultdict(float))
        self._answers: dict[tuple, list] = defaultdict(list)

    def on_train_epoch_end(self) -> None:
        if self._counts.sum() > 0:
            self._finish_calibration()

    def _finish_calibration(self) -> None:
        sums, counts = self._sums, self._counts
        bad, good = int(counts[0]), int(counts[1])
        if good == 0 or bad == 0:
            raise LanternError(f"ALS calibration: {good} of {good + bad} greedy answers were right; the vector needs "
                               "both right and wrong ones (choose problems the model solves 20–80% of the time)")
        vector = (sums[1] / counts[1] - sums[0] / counts[0]).float()
        state_norm = self._norm_sum / float(counts.sum())  # mean ‖mean answer state‖: α is in these units
        self.vector.copy_(vector)
        self.calibrated.fill_(True)
        dm = self.trainer.datamodule
        self._metadata = {"model": self.hparams.model_name, "layer": self.layer, "method": "als",
                          "data": dm.calibration, "good": good, "bad": bad, "seed": self.hparams.seed,
                          "shots": dm.hparams.shots, "answer_format": dm.hparams.answer_format,
                          "vector_norm": float(vector.norm()), "answer_state_norm": state_norm}
        self.log_dict({"als/calibration_accuracy": 100.0 * good / (good + bad), "als/vector_norm": float(vector.norm()),
                       "als/answer_state_norm": state_norm})
        self.direction.save(reporting.run_dir(self.trainer) / "als_vector.safetensors")
        self._reset_calibration()

    # ------------------------------------------------------------------ evaluation (validate)
    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.trainer.sanity_checking:
            return  # decoding a whole comparison to check the loop runs would cost as much as the run
        hp, prompts, examples = self.hparams, batch["prompts"], batch["examples"]
        if "greedy" in hp.methods:
            self._record(("greedy CoT", None), examples, self._generate(prompts, self._sampling()))
        if "self_consistency" in hp.methods:
            self._self_consistency(prompts, examples)
        if "als" in hp.methods:
            if not bool(self.calibrated):
                raise LanternError("ALS: no steering vector; run fit (the calibration) first, or set model.vector_path")
            unit = self.direction.unit
            for alpha in hp.alphas:
                steer = ALSSteer(unit, alpha, hp.tau, *(self.gate_tokens or ()))
                out = self._generate(prompts, self._sampling(), hook=steer, hook_layer=self.layer, transient=True)
                self._record((f"ALS α={alpha:g}", alpha), examples, out, steer)
        if "latent_seek" in hp.methods:
            found = self._latent_seek(prompts, examples)
            self._record(("LatentSeek-style", None), examples, None, texts=found.texts, seconds=found.seconds,
                         tokens=found.tokens)

    def _record(self, key: tuple, examples: list[Example], out: Generated | None, steer: ALSSteer | None = None, *,
                texts=None, seconds=None, tokens=None) -> None:
        t = self._tally[key]
        t["seconds"] += out.seconds if out is not None else seconds
        t["tokens"] += out.num_tokens if out is not None else tokens
        if steer is not None and steer.fired is not None:
            t["fired"] += float(steer.fired)
            t["steps"] += float(steer.steps)
        self._answers[key] += list(zip(examples, out.text if out is not None else texts))

    def _self_consistency(self, prompts, examples: list[Example]) -> None:
        hp, k = self.hparams, self.hparams.self_consistency
        out = self._generate([p for p in prompts for _ in range(k)],
                             self._sampling(temperature=hp.sc_temperature, seed=hp.seed))
        scorer = self.trainer.datamodule.scorer
        texts = []
        for i in range(len(prompts)):
            samples = out.text[i * k:(i + 1) * k]
            answers = [scorer.predicted(s) for s in samples]
            votes = Counter(a for a in answers if a is not None)
            winner = votes.most_common(1)[0][0] if votes else None
            texts.append(samples[answers.index(winner)] if winner is not None else samples[0])
        self._record((f"self-consistency k={k}", None), examples, None, texts=texts, seconds=out.seconds,
                     tokens=out.num_tokens)

    def _latent_seek(self, prompts, examples: list[Example]) -> LatentSeekResult:
        dm = self.trainer.datamodule
        with torch.inference_mode(False), torch.enable_grad():  # validation runs under inference mode
            return latent_seek(self.model, self.tokenizer, prompts, [e.prompt for e in examples], self._sampling(),
                                 layer=self.layer, steps=self.hparams.latent_steps, lr=self.hparams.latent_lr,
                                 chat=dm.hparams.chat, system=dm.hparams.system,
                                 batch_size=self.hparams.generation_batch_size)

    def on_validation_epoch_end(self) -> None:
        tally, answers = dict(self._tally), dict(self._answers)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, ({k: dict(v) for k, v in tally.items()}, answers))
            tally, answers = defaultdict(lambda: defaultdict(float)), defaultdict(list)
            for part_tally, part_answers in gathered:
                for k, v in part_tally.items():
                    for name, x in v.items():
                        tally[k][name] += x
                for k, v in part_answers.items():
                    answers[k] += v
        if not answers:
            return
        scorer = self.trainer.datamodule.scorer
        rows = []
        for key, pairs in answers.items():
            unique = {e.id: (e, t) for e, t in pairs}  # a distributed sampler pads with repeats
            examples, texts = zip(*unique.values())
            score = scorer.score(list(examples), list(texts))
            t = tally[key]
            row = {"method": key[0], "accuracy": score.metrics["score"], "answered": score.metrics["answered"],
                   "seconds_per_problem": t["seconds"] / len(examples),
                   "tokens_per_second": t["tokens"] / max(t["seconds"], 1e-9)}
            row["firing_rate"] = t["fired"] / t["steps"] if t.get("steps") else ""
            rows.append(row)
        slowest = max(r["seconds_per_problem"] for r in rows)
        for r in rows:  # the paper's trade-off: time normalised so the slowest method is 100
            r["tradeoff"] = (r["accuracy"] + 100 - 100 * r["seconds_per_problem"] / slowest) / 2
        self.results = rows
        for r in rows:
            tag = r["method"].replace(" ", "_").replace("=", "")
            self.log(f"als/{tag}/accuracy", r["accuracy"])
            if r["firing_rate"] != "":
                self.log(f"als/{tag}/firing_rate", r["firing_rate"])
        if not self.trainer.sanity_checking:
            payload = {"rows": rows, "n_problems": len(examples), "settings": dict(self.hparams),
                       "vector": self.direction.metadata}
            reporting.write_table(self.trainer, rows, "als", "als/table", payload=payload)


# ----------------------------------------------------------------------------- algorithm pieces
def _answer_batch(tokenizer, prompts, completions: list[list[int]], chat: bool, system: str | None, device):
    """Right-padded prompt + completion, and the mask of the positions that produced each completion token."""
    pairs = [(p + c, [-100] * len(p) + c) for p, c in zip(encode_prompts(tokenizer, prompts, system, chat), completions)]
    batch = {k: v.to(device) for k, v in collate_pairs(pairs, tokenizer.eos_token_id).items()}
    produced = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    produced[:, :-1] = batch["labels"][:, 1:] != -100
    return batch, produced


def _chunks(n: int, size: int):
    return (slice(lo, lo + size) for lo in range(0, n, size))


@torch.no_grad()
def answer_states(model, tokenizer, prompts, completions: list[list[int]], layer: int, chat: bool,
                  system: str | None, batch_size: int = 32) -> torch.Tensor:
    """[N, d]: per answer, the mean state entering block ``layer`` at the positions that produced its tokens."""
    device = model.get_input_embeddings().weight.device
    parts = []
    for part in _chunks(len(prompts), batch_size):
        batch, produced = _answer_batch(tokenizer, prompts[part], completions[part], chat, system, device)
        parts.append(mean_hidden(model, batch["input_ids"], batch["attention_mask"], produced, [layer])[:, 0])
    return torch.cat(parts)


def self_reward(model, tokenizer, questions: list[str], answers: list[str], chat: bool, system: str | None,
                batch_size: int = 32) -> torch.Tensor:
    """[N] the model's own p(Yes) / (p(Yes) + p(No)) that the answer is correct: LatentSeek's self-reward."""
    asks = [f"{q}\n\nProposed solution: {a.strip()}\n\nIs the proposed solution correct? Answer Yes or No."
            for q, a in zip(questions, answers)]
    yes, no = (tokenizer.encode_batch([w])[0][:1] for w in ("Yes", "No"))
    rows = [r for r in encode_prompts(tokenizer, asks, system, chat) for r in (r + yes, r + no)]
    device = model.get_input_embeddings().weight.device
    scores = []
    for part in _chunks(len(rows), 2 * batch_size):
        pairs = [(r, [-100] * (len(r) - 1) + r[-1:]) for r in rows[part]]
        batch = {k: v.to(device) for k, v in collate_pairs(pairs, tokenizer.eos_token_id).items()}
        with torch.no_grad():
            scores.append(completion_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"] != -100).sum)
    return torch.cat(scores).view(-1, 2).softmax(-1)[:, 0].float().cpu()


def offset_logprobs(model, tokenizer, prompts, completions: list[list[int]], delta: torch.Tensor, layer: int,
                    chat: bool, system: str | None) -> torch.Tensor:
    """[N] log p(completion | prompt) with ``delta`` [N, d] added to the stream entering block ``layer`` at
    every position that produced a completion token; differentiable in ``delta``."""
    device = model.get_input_embeddings().weight.device
    batch, produced = _answer_batch(tokenizer, prompts, completions, chat, system, device)

    def add(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        new = hidden + delta[:, None, :].to(hidden.dtype) * produced[..., None].to(hidden.dtype)
        return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

    handle = get_adapter(model).blocks(model)[layer].register_forward_pre_hook(add, with_kwargs=True)
    try:
        return completion_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"] != -100).sum
    finally:
        handle.remove()


@dataclass
class LatentSeekResult:
    texts: list[str]  # per problem, the answer its own judgement rated best
    seconds: float
    tokens: int  # generated over all rounds
    delta: torch.Tensor  # [N, d] the final offsets
    rewards: torch.Tensor  # [N] the kept answers' self-reward


def latent_seek(model, tokenizer, prompts, questions: list[str], sampling: Sampling, *, layer: int, steps: int = 10,
                lr: float = 0.03, chat: bool = True, system: str | None = None, batch_size: int = 32) -> LatentSeekResult:
    """Per-problem latent optimisation, the iterative baseline ALS amortises.

    Each problem gets an offset δ to the stream entering block ``layer`` at every answer position;
    each round decodes with δ, scores the answer with ``self_reward``, and takes an Adam step on δ
    along (r − 0.5)·∇ log p(answer | δ). The answer with the highest reward over all rounds is kept.
    """
    start = time.perf_counter()
    device = model.get_input_embeddings().weight.device
    width = model.get_input_embeddings().weight.shape[1]
    delta = torch.zeros(len(prompts), width, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=lr)
    best_text, best_reward = [""] * len(prompts), torch.full((len(prompts),), -1.0)
    tokens, rows = 0, None

    def during_decode(hidden: torch.Tensor, step: Step) -> torch.Tensor:
        nonlocal rows
        if step.index == 0:  # one index copy per batch, not per step
            rows = torch.tensor(step.rows, device=hidden.device)
        out = hidden.clone()
        out[:, -1] += delta.detach()[rows].to(hidden.dtype)
        return out

    for round_ in range(steps + 1):
        out = generate(model, tokenizer, prompts, sampling, chat=chat, system=system, batch_size=batch_size,
                       hook=during_decode, hook_layer=layer)
        tokens += out.num_tokens
        reward = self_reward(model, tokenizer, questions, out.text, chat, system, batch_size)
        better = reward > best_reward
        best_reward = torch.where(better, reward, best_reward)
        best_text = [t if b else old for t, b, old in zip(out.text, better.tolist(), best_text)]
        if round_ == steps:
            break
        optimizer.zero_grad()
        for part in _chunks(len(prompts), batch_size):  # gradients of the parts add up in delta.grad
            logp = offset_logprobs(model, tokenizer, prompts[part], out.tokens[part], delta[part], layer, chat, system)
            (-((reward[part].to(device) - 0.5) * logp).sum()).backward()
        optimizer.step()
    return LatentSeekResult(best_text, time.perf_counter() - start, tokens, delta.detach(), best_reward)
