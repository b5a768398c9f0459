"""Privacy auditing with designed canaries (arXiv 2503.06808): the one-run ε bound, ROC, canary
designs, the secret-only loss, new tokens at logit 0, the schedule, DP-SGD and the CLI run."""

import json
import math
from pathlib import Path

import numpy as np
import lightning as L
import pytest
import torch

from lantern.cli import cli_main
from lantern.datamodules.canaries import CanaryDataModule, collate_rows, eligible_tokens, make_canaries
from lantern.lightning_modules.canary import Audit, CanaryFineTuning, add_new_tokens, audit_report, roc_figure
from lantern.metrics import audit_p_value, auroc, epsilon_lower_bound, roc_curve, tpr_at_fpr
from lantern.models import completion_logprobs, load_model, load_tokenizer
from lantern.reporting import pyplot

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/canary/tiny.yaml")


# ----------------------------------------------------------------------------- the one-run bound
def test_no_right_guess_gives_zero():
    for k in (1, 10, 100, 1000):
        assert epsilon_lower_bound(1000, k, 0, 1e-5) == 0.0


def test_the_bound_never_falls_as_right_guesses_grow():
    bounds = [epsilon_lower_bound(1000, 100, v, 1e-5) for v in range(0, 101, 5)]
    assert all(b2 >= b1 for b1, b2 in zip(bounds, bounds[1:]))
    assert bounds[0] == 0 and bounds[-1] > 3


def test_the_papers_reference_values():
    assert epsilon_lower_bound(1000, 100, 100, 1e-5, 0.05) == pytest.approx(3.47, abs=0.01)
    assert epsilon_lower_bound(1000, 100, 100, 1e-5, 0.01) == pytest.approx(2.99, abs=0.01)


@pytest.mark.parametrize("conf, k", [(0.05, 100), (0.01, 100), (0.05, 20)])
def test_without_delta_the_bound_is_the_log_odds_of_conf_to_the_one_over_k(conf, k):
    p = conf ** (1 / k)
    assert epsilon_lower_bound(1000, k, k, 0.0, conf) == pytest.approx(math.log(p / (1 - p)), abs=1e-6)


def test_the_p_value_equals_the_binomial_sums_written_out():
    m, k, v, eps, delta = 50, 12, 9, 0.7, 1e-3
    q = math.exp(eps) / (1 + math.exp(eps))
    pmf = [math.comb(k, i) * q**i * (1 - q) ** (k - i) for i in range(k + 1)]
    alpha = max(sum(pmf[v - i: v]) / i for i in range(1, v + 1))
    assert audit_p_value(m, k, v, eps, delta) == pytest.approx(sum(pmf[v:]) + 2 * m * delta * alpha, rel=1e-9)


def test_identical_member_and_non_member_scores_audit_to_nothing():
    """Same distribution for both: TPR@1%FPR ≈ 1% and, with k and sign fixed in advance, ε_lb > 0
    in at most a ``confidence`` share of seeds."""
    audit, tprs, positive = Audit(k=100), [], 0
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        loss = torch.randn(1000, generator=g)
        member = torch.zeros(1000, dtype=torch.bool)
        member[torch.randperm(1000, generator=g)[:500]] = True
        report = audit_report(loss, torch.randn(1000, generator=g), member, audit)
        tprs.append(report["loss"]["tpr_at_1pct_fpr"])
        positive += report["audit"]["epsilon_lb"] > 0
    assert sum(tprs) / len(tprs) == pytest.approx(0.01, abs=0.006)
    assert positive / 200 <= audit.confidence + 0.03  # 3 binomial standard deviations of slack


def test_every_right_guess_of_separated_scores_is_counted():
    member = torch.arange(1000) % 2 == 0
    loss = torch.where(member, 0.0, 1.0) + torch.linspace(0, 0.1, 1000)
    report = audit_report(loss, torch.zeros(1000), member, Audit(k=100))
    assert report["audit"]["correct"] == 100 and report["loss"]["auc"] == 1.0 and report["loss"]["tpr_at_1pct_fpr"] == 1.0
    assert report["audit"]["epsilon_lb"] == pytest.approx(3.47, abs=0.01)
    flipped = audit_report(loss, torch.zeros(1000), member, Audit(k=100, member_when="higher"))
    assert flipped["audit"]["correct"] == 0 and flipped["audit"]["epsilon_lb"] == 0


# ----------------------------------------------------------------------------- ROC
def _reference_roc(scores, labels):
    pts = [(0.0, 0.0)]
    for t in sorted(set(scores), reverse=True):
        tp = sum(1 for s, y in zip(scores, labels) if s >= t and y)
        fp = sum(1 for s, y in zip(scores, labels) if s >= t and not y)
        pts.append((fp / labels.count(0), tp / labels.count(1)))
    return pts


def test_roc_equals_a_threshold_by_threshold_count_ties_included():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 12, (60,), generator=g).float().tolist()
    labels = torch.randint(0, 2, (60,), generator=g).tolist()
    fpr, tpr = roc_curve(scores, labels)
    assert np.allclose(torch.stack([fpr, tpr], 1).numpy(), np.array(_reference_roc(scores, labels)))
    area = float(torch.trapezoid(tpr, fpr))
    assert area == pytest.approx(float(auroc(scores, labels)))
    assert tpr_at_fpr(fpr, tpr, 0.0) == max(t for f, t in _reference_roc(scores, labels) if f == 0)


def test_the_roc_figure_draws_the_computed_curves():
    g = torch.Generator().manual_seed(1)
    member = torch.arange(200) % 2 == 0
    loss, moved = torch.randn(200, generator=g) - member * 0.5, torch.rand(200, generator=g)
    fig = roc_figure(loss, moved, member, "t")
    floor = 0.5 / 100
    for line, s in zip(fig.axes[0].lines, (-loss, moved)):
        fpr, tpr = roc_curve(s, member)
        assert np.allclose(line.get_xdata(), fpr.clamp(min=floor).numpy())
        assert np.allclose(line.get_ydata(), tpr.clamp(min=floor).numpy())
    pyplot().close(fig)  # later tests count the open figures


# ----------------------------------------------------------------------------- canaries
STREAM = np.random.RandomState(0).randint(0, 120, 4000)


@pytest.mark.parametrize("design", ["random", "unigram", "bigram", "new"])
def test_canaries_have_one_shape_half_members_and_membership_shared_by_designs(tok, design):
    c = make_canaries(design, 40, tok, prefix_len=6, secret_len=2, train_tokens=STREAM, seed=3)
    assert c.ids.shape == (40, 1 + 6 + 2 + 1) and c.member.sum() == 20
    assert c.secret_mask.sum(1).tolist() == [2] * 40 and c.secret_mask[:, 7:9].all()
    assert (c.ids[:, 0] == tok.eos_token_id).all() and (c.ids[:, -1] == tok.eos_token_id).all()  # no BOS: eos
    other = make_canaries("unigram", 40, tok, prefix_len=6, secret_len=2, train_tokens=STREAM, seed=3)
    assert torch.equal(c.member, other.member)
    again = make_canaries(design, 40, tok, prefix_len=6, secret_len=2, train_tokens=STREAM, seed=3)
    assert c.digest == again.digest
    assert make_canaries(design, 40, tok, prefix_len=6, secret_len=2, train_tokens=STREAM, seed=4).digest != c.digest


def test_unigram_secrets_are_the_rarest_tokens_each_used_once(tok):
    c = make_canaries("unigram", 30, tok, prefix_len=4, train_tokens=STREAM)
    counts = np.bincount(STREAM, minlength=257)
    secrets = c.secret_ids.flatten()
    assert len(set(secrets.tolist())) == 30
    unused = [t for t in eligible_tokens(tok, 257).tolist() if t not in set(secrets.tolist())]
    assert counts[secrets.numpy()].max() <= counts[unused].min()


def test_bigram_secrets_never_follow_their_frequent_context(tok):
    c = make_canaries("bigram", 30, tok, prefix_len=4, secret_len=2, train_tokens=STREAM)
    seen = set(zip(STREAM[:-1].tolist(), STREAM[1:].tolist()))
    counts = np.bincount(STREAM, minlength=257)
    x = c.ids[:, 4]  # the prefix's last token
    assert counts[x.numpy()].min() >= np.sort(counts)[-30]  # the 30 most frequent tokens
    chain = torch.cat([x[:, None], c.secret_ids], 1)
    assert not any((a, b) in seen for row in chain.tolist() for a, b in zip(row, row[1:]))
    assert len(set(c.secret_ids.flatten().tolist())) == 60


def test_rare_secrets_are_the_reference_models_least_likely_unused_continuations(tok):
    model = load_model("tiny-llama", seed=0)
    c = make_canaries("rare", 8, tok, prefix_len=5, reference=model, seed=1)
    logits = model(input_ids=c.ids[:, :6]).logits[:, -1]
    allowed = torch.zeros(logits.shape[-1], dtype=torch.bool)
    allowed[eligible_tokens(tok, 257)] = True
    first = logits[0].masked_fill(~allowed, float("inf")).argmin()
    assert c.secret_ids[0, 0] == first
    assert len(set(c.secret_ids.flatten().tolist())) == 8


def test_heldout_prefixes_are_windows_of_the_heldout_text(tok):
    held = np.arange(1000) % 200
    c = make_canaries("random", 10, tok, prefix_len=7, prefix="heldout", heldout_tokens=held, train_tokens=STREAM)
    for row in c.ids[:, 1:8].tolist():
        start = int(np.flatnonzero(held == row[0])[0])
        assert row == held[start: start + 7].tolist()


def test_too_little_heldout_text_is_a_one_line_error(tok):
    from lantern.errors import DataError

    with pytest.raises(DataError, match="10 canaries need 70"):
        make_canaries("random", 10, tok, prefix_len=7, prefix="heldout", heldout_tokens=np.arange(20))


@pytest.mark.parametrize("tied", [True, False])
def test_new_tokens_start_at_logit_exactly_zero(tied):
    model = load_model("tiny-llama", seed=0)
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    add_new_tokens(model, 257, 5)
    logits = model(input_ids=torch.randint(0, 257, (3, 9))).logits
    assert logits.shape[-1] >= 262 and (logits[..., 257:262] == 0).all()
    assert logits[..., :257].abs().sum() > 0


# ----------------------------------------------------------------------------- the loss
def _batch(tok):
    c = make_canaries("unigram", 4, tok, prefix_len=6, train_tokens=STREAM)
    text = torch.randint(0, 256, (12,))
    rows = [(text, torch.arange(12) > 0), *zip(c.ids, c.secret_mask)]
    return c, collate_rows(rows, tok.eos_token_id)


def test_the_loss_is_the_mean_over_rows_of_each_rows_mean_token_loss(tok):
    model = load_model("tiny-llama", seed=0)
    _, batch = _batch(tok)
    scored = completion_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    logp = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
    per_row = []
    for r in range(batch["input_ids"].shape[0]):
        pos = batch["completion_mask"][r].nonzero().flatten().tolist()
        per_row.append(-sum(logp[r, p - 1, batch["input_ids"][r, p]] for p in pos) / len(pos))
    assert float(-scored.mean.mean()) == pytest.approx(float(sum(per_row) / len(per_row)), rel=1e-4)


def test_prefix_tokens_get_no_gradient(tok):
    """Only the position that predicts the secret sends gradient into the final hidden states."""
    model = load_model("tiny-llama", seed=0)
    c = make_canaries("unigram", 2, tok, prefix_len=6, train_tokens=STREAM)
    kept = {}

    def keep(module, args, out):
        out.retain_grad()
        kept["h"] = out

    handle = model.model.norm.register_forward_hook(keep)
    loss = -completion_logprobs(model, c.ids, torch.ones_like(c.ids), c.secret_mask).mean.mean()
    loss.backward()
    handle.remove()
    grad = kept["h"].grad.norm(dim=-1)  # [2, L]
    predicts_secret = 1 + 6 - 1  # the secret sits at position 7 and is predicted from position 6
    assert (grad[:, predicts_secret] > 0).all()
    others = torch.ones(grad.shape[1], dtype=torch.bool)
    others[predicts_secret] = False
    assert (grad[:, others] == 0).all()


# ----------------------------------------------------------------------------- the schedule
def _dm(tmp_path, corpus, **kw):
    dm = CanaryDataModule(source=str(corpus), tokenizer="byte", canaries=20, prefix_len=6, block_size=16, batch_size=3,
                          val_fraction=0.25, cache_dir=str(tmp_path / "cache"), **kw)

    class Trainer:
        max_steps, world_size, global_rank, global_step = 50, 1, 0, 0

    dm.trainer = Trainer()
    dm.setup("fit")
    return dm


def test_members_and_only_members_enter_training_about_once(tmp_path, corpus):
    dm = _dm(tmp_path, corpus)
    n_text = len(dm.text_index)
    seen = torch.zeros(20, dtype=torch.long)
    for step in range(50):
        rows = dm.step_rows(step)
        assert len([r for r in rows if r < n_text]) == 3
        for r in rows:
            if r >= n_text:
                seen[dm.members[r - n_text]] += 1
    assert seen[~dm.canaries.member].sum() == 0
    assert 5 <= seen.sum() <= 20  # 10 members at rate 1/50 over 50 steps: about 10 sightings
    assert dm.step_rows(7) == dm.step_rows(7)


def test_dp_sampling_is_poisson_over_every_row(tmp_path, corpus):
    dm = _dm(tmp_path, corpus, text_rows=30)
    dm.poisson = 0.2
    sizes = [len(dm.step_rows(s)) for s in range(50)]
    assert len(set(sizes)) > 3 and sum(sizes) / 50 == pytest.approx(0.2 * dm.train_rows, rel=0.3)
    assert dm.train_rows == 30 + 10


def test_a_resumed_loader_continues_with_the_batches_of_the_uninterrupted_run(tmp_path, corpus):
    dm = _dm(tmp_path, corpus)
    full = [b["input_ids"] for b in dm.train_dataloader()]
    dm.trainer.global_step = 20
    resumed = [b["input_ids"] for b in dm.train_dataloader()]
    assert len(full) == 50 and len(resumed) == 30
    assert all(torch.equal(a, b) for a, b in zip(full[20:], resumed))


# ----------------------------------------------------------------------------- through the CLI
def _fit(tmp_path, *args):
    cli = cli_main(["fit", "--config", TINY, "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), *args])
    return Path(cli.trainer.log_dir)


@pytest.mark.slow
def test_fit_audits_and_validate_on_the_checkpoint_gives_the_same_audit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = _fit(tmp_path)
    report = json.loads((run / "audit.json").read_text())
    assert report["canaries"] == 40 and report["members"] == 20 and report["audit"]["k"] == 10
    assert report["loss"]["auc"] > 0.75 and report["audit"]["epsilon_lb"] > 0  # a tiny model at lr 1e-3 memorises
    assert (run / "roc.png").is_file()
    saved = json.loads((run / "canaries.json").read_text())
    assert sum(saved["member"]) == 20 and saved["digest"] == report["canaries_digest"]
    cli = cli_main(["validate", "--config", TINY, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
                    "--trainer.logger.init_args.save_dir", str(tmp_path / "again")])
    again = json.loads((Path(cli.trainer.log_dir) / "audit.json").read_text())
    assert again["loss"] == pytest.approx(report["loss"]) and again["audit"] == report["audit"]
    assert again["step"] == report["step"] == 6
    with pytest.raises(SystemExit, match="other canaries"):
        cli_main(["validate", "--config", TINY, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
                  "--data.init_args.seed", "5", "--trainer.logger.init_args.save_dir", str(tmp_path / "other")])


class _StopAt(L.Callback):
    """Interrupt a run part-way, as a crash would (same max_steps, same schedule)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.should_stop = True


@pytest.mark.slow
@pytest.mark.parametrize("dp", [False, True])
def test_training_resumes_exactly(tmp_path, corpus, dp):
    from lantern.lightning_modules import DPSGD, LoRA
    from lantern.lightning_modules.optim import AdamW

    def module():
        return CanaryFineTuning("tiny-llama", optim=AdamW(lr=1e-3, min_lr_ratio=1.0), audit=Audit(k=5),
                                lora=LoRA(rank=4) if dp else None, dp=DPSGD() if dp else None)

    def data():
        return CanaryDataModule(source=str(corpus), canaries=20, prefix_len=6, block_size=16, batch_size=3,
                                val_fraction=0.25, text_rows=20, cache_dir=str(tmp_path / "cache"))

    def trainer(root, *callbacks):
        return L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=root, callbacks=list(callbacks),
                         gradient_clip_val=None if dp else 1.0)

    whole = module()
    trainer(tmp_path / "a").fit(whole, data())
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=3, save_top_k=-1, filename="{step}")
    trainer(tmp_path / "b", ckpt, _StopAt(3)).fit(module(), data())
    resumed, steps = module(), []
    recorder = L.Callback()
    recorder.on_train_batch_start = lambda trainer, *_: steps.append(trainer.global_step)
    trainer(tmp_path / "c", recorder).fit(resumed, data(), ckpt_path=tmp_path / "ck" / "step=3.ckpt")
    assert steps == [3, 4, 5, 6, 7]  # before the halfway point too: each remaining step once
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = module().state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a)  # it trained


@pytest.mark.slow
def test_dp_sgd_with_lora_clips_per_example_adds_noise_and_reports_its_epsilon(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--model.init_args.dp", "{epsilon: 4}", "--trainer.gradient_clip_val", "null",
            "--model.init_args.lora", "{rank: 4, alpha: 8}", "--data.init_args.text_rows", "20",
            "--data.init_args.design", "random"]
    run = _fit(tmp_path, *args)
    report = json.loads((run / "audit.json").read_text())
    dp = report["dp"]
    assert report["fine_tuning"] == "lora" and dp["noise_multiplier"] > 0 and dp["sampling_rate"] == pytest.approx(4 / 40)
    assert dp["epsilon"] == pytest.approx(4.0, abs=0.05)  # the accountant's ε after every step: the target
    again = json.loads((_fit(tmp_path / "again", *args) / "audit.json").read_text())
    assert again["loss"] == report["loss"]  # the noise is seeded per step
    cli = cli_main(["validate", "--config", TINY, *args, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
                    "--trainer.logger.init_args.save_dir", str(tmp_path / "validated")])
    checked = json.loads((Path(cli.trainer.log_dir) / "audit.json").read_text())
    assert checked["dp"] == report["dp"] and checked["step"] == 6 and checked["loss"] == pytest.approx(report["loss"])


def test_dp_sgd_gradients_are_the_clipped_per_example_sum_plus_noise(tmp_path, corpus):
    """Opacus's step against a hand computation: each example's gradient clipped to C, summed."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    model = load_model("tiny-llama", seed=0).train()
    GradSampleModule(model, batch_first=True, loss_reduction="mean")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = DPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=0.01, expected_batch_size=3)
    batch = collate_rows([(torch.randint(0, 256, (10,)), torch.arange(10) > 0) for _ in range(3)], 256)
    hand = [torch.zeros_like(p) for p in params]
    for r in range(3):
        model.zero_grad()
        one = {k: v[r: r + 1] for k, v in batch.items()}
        (-completion_logprobs(model, one["input_ids"], one["attention_mask"], one["completion_mask"], per_sample=True).mean.mean()).backward()
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in params))
        for h, p in zip(hand, params):
            h += p.grad * min(1.0, 0.01 / float(norm))
    opt.zero_grad()
    for p in params:
        p.grad = None
    (-completion_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], per_sample=True).mean.mean()).backward()
    before = [p.detach().clone() for p in params]
    opt.step()
    for b, p, h in zip(before, params, hand):
        assert torch.allclose(b - p.detach(), h / 3, atol=1e-6)


@pytest.mark.parametrize("args, expected", [
    (["--data.init_args.design", "secret"], 'Parser key "design"'),
    (["--data.init_args.canaries", "41"], "data.init_args.canaries=41: expected an even number"),
    (["--model.init_args.audit.k", "50"], "audit.k=50: expected at most the 40 canaries"),
    (["--data.init_args.design", "new", "--model.init_args.lora", "{rank: 4}"], "only full fine-tuning trains it"),
    (["--model.init_args.dp", "{epsilon: 4}"], "trainer.gradient_clip_val=1.0: expected null with DP-SGD"),
    (["--model.init_args.dp", "{epsilon: -1}", "--trainer.gradient_clip_val", "null"], "dp.epsilon=-1"),
    (["--model.init_args.audit.confidence", "2"], "audit.confidence=2"),
    (["--model.init_args.dp", "{epsilon: 4}", "--trainer.gradient_clip_val", "null", "--data.init_args.canary_rate", "0.1"],
     "canary_rate=0.1: expected null with DP-SGD"),
    (["--data.init_args.tokenizer", "smollm2-135m-instruct"], "expected the model's tokenizer"),
    (["--data.init_args.prefix", "text"], 'Parser key "prefix"'),
    (["--data.init_args.prefix", "heldout", "--data.init_args.prefix_len", "5000"], "add documents, raise val_fraction or use prefix: random"),
    (["--trainer.max_steps", "-1", "--trainer.max_epochs", "1"], "trainer.max_steps=-1: expected the number of fine-tuning steps"),
    (["--data", "lantern.datamodules.TextDataModule", "--data.init_args.tokenizer", "byte"], "expected a CanaryDataModule"),
])
def test_bad_settings_end_in_one_line(args, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--config", TINY, *args])
    said = exit_.value.code
    assert isinstance(said, str) and said.startswith("lantern: error: ") and "\n" not in said, said
    assert expected in said, said


@pytest.mark.slow
def test_the_embedded_model_scores_canaries_and_new_tokens_start_at_zero():
    tok = load_tokenizer("smollm2-135m-instruct")
    model = load_model("smollm2-135m-instruct")
    c = make_canaries("new", 4, tok, prefix_len=10, seed=0)
    add_new_tokens(model, tok.vocab_size, c.new_tokens)
    logits = model(input_ids=c.ids[:, :11]).logits
    assert (logits[..., tok.vocab_size:] == 0).all()
    loss = -completion_logprobs(model, c.ids, torch.ones_like(c.ids), c.secret_mask).mean
    # logit 0 against the model's own logits: a new secret starts far less likely than uniform
    assert (loss > math.log(tok.vocab_size)).all()
    r = make_canaries("rare", 4, tok, prefix_len=10, reference=model, seed=0)
    assert (-completion_logprobs(model, r.ids, torch.ones_like(r.ids), r.secret_mask).mean > 20).all()
