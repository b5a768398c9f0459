"""End-to-end properties of MoE pretraining: exact resume, DDP equivalence, NaN handling."""

import os

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lantern.datamodules import TextDataModule
from lantern.callbacks import FiniteCheckpoint, NonFiniteGuard
from lantern.errors import NonFiniteError
from lantern.lightning_modules import AdamW, MoEPretraining
from lantern.models import MoETransformer


def _module(mode="default", seed=0, **kw):
    torch.manual_seed(seed)
    net = MoETransformer(vocab_size=257, d_model=32, n_layers=2, n_heads=4, n_experts=4, top_k=2, d_expert=32,
                         router_mode=mode, max_seq_len=32)
    return MoEPretraining(net, optim=AdamW(lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), warmup_steps=2), **kw)


class StopAt(Callback):
    """Interrupt a run part-way, as a crash or a pre-empted job would (same max_steps, same schedule)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.should_stop = True


class LossRecorder(Callback):
    def __init__(self):
        self.losses = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = outputs["loss"].item()


def _trainer(tmp_path, max_steps, callbacks):
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, callbacks=callbacks, default_root_dir=tmp_path,
                     gradient_clip_val=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["default", "topk"])
def test_resume_continues_the_same_loss_curve(corpus, tmp_path, mode):
    data = dict(source=str(corpus), block_size=32, batch_size=4, val_fraction=0.2, cache_dir=str(tmp_path / "c"))
    L.seed_everything(0)
    full = LossRecorder()
    trainer = _trainer(tmp_path / "a", 14, [full])
    trainer.fit(_module(mode), TextDataModule(**data))
    assert len(full.losses) == 14 and trainer.current_epoch >= 1  # the resumed part crosses an epoch

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=4, save_top_k=-1, filename="{step}")
    L.seed_everything(0)
    first = LossRecorder()
    _trainer(tmp_path / "b", 14, [first, ckpt, StopAt(4)]).fit(_module(mode), TextDataModule(**data))
    assert sorted(first.losses) == [1, 2, 3, 4]
    L.seed_everything(123)  # a resumed run must not depend on the seed it was restarted with
    resumed = LossRecorder()
    module = _module(mode, seed=99)
    _trainer(tmp_path / "b", 14, [resumed]).fit(module, TextDataModule(**data), ckpt_path=tmp_path / "ck" / "step=4.ckpt")
    assert sorted(resumed.losses) == list(range(5, 15))
    for step, loss in resumed.losses.items():
        assert abs(loss - full.losses[step]) < 1e-6, (step, loss, full.losses[step])
    if mode == "default":
        assert module.model.blocks[0].mlp.default_outputs.abs().sum() > 0


def test_defaults_move_once_per_optimizer_step_under_accumulation(corpus, tmp_path):
    data = dict(source=str(corpus), block_size=32, batch_size=4, val_fraction=0.2, cache_dir=str(tmp_path / "c"))
    module = _module("default")
    moves = []
    module.model.commit_defaults = lambda commit=module.model.commit_defaults: moves.append(commit())
    forwards = []
    module.model.moe_layers[0].register_forward_hook(lambda *a: forwards.append(1))
    trainer = L.Trainer(max_steps=3, accumulate_grad_batches=4, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(module, TextDataModule(**data))
    assert len(forwards) == 12 and len(moves) == 3  # 4 micro-batches per step, one move of Ê per step
    assert module.model.moe_layers[0].default_outputs.abs().sum() > 0
    assert not module.model.moe_layers[0].pending.any()  # nothing left over between steps


def _ddp_worker(rank, world, port, batch, state, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    module = _module()
    module.model.load_state_dict(state)
    module.model.train()
    half = {k: v.chunk(world)[rank] for k, v in batch.items()}
    lm, out = module._lm_loss(half)
    loss = lm + module.hparams.aux_loss_coef * out.aux_loss
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in module.model.parameters()])
    dist.all_reduce(grads)
    dist.all_reduce(loss.detach())
    if rank == 0:
        torch.save({"loss": loss.detach() / world, "grads": grads / world,
                    "defaults": module.model.blocks[1].mlp.default_outputs.clone()}, out_path)
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_on_the_global_batch(tmp_path):
    module = _module()
    module.model.train()
    batch = {"input_ids": torch.randint(0, 257, (4, 32)), "labels": torch.randint(0, 257, (4, 32))}
    state = {k: v.clone() for k, v in module.model.state_dict().items()}
    lm, out = module._lm_loss(batch)
    loss = lm + module.hparams.aux_loss_coef * out.aux_loss
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in module.model.parameters()])

    out_path = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, 29500 + os.getpid() % 1000, batch, state, out_path), nprocs=2, join=True)
    ddp = torch.load(out_path, weights_only=True)
    torch.testing.assert_close(ddp["loss"], loss.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ddp["grads"], grads, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ddp["defaults"], module.model.blocks[1].mlp.default_outputs, atol=1e-6, rtol=1e-5)


class Poison(Callback):
    """Make every gradient NaN from one step on, as a diverging run does one step before its loss."""

    def __init__(self, step, until=None):
        self.step, self.until = step, until

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.active = self.step <= trainer.global_step < (self.until or 10**9)

    def on_after_backward(self, trainer, pl_module):
        if self.active:
            for p in pl_module.parameters():
                p.grad.fill_(float("nan"))


def _finite(state):
    tensors = list(state["state_dict"].values())
    tensors += [v for opt in state["optimizer_states"] for s in opt["state"].values() for v in s.values()]
    return all(torch.isfinite(t).all() for t in tensors if torch.is_tensor(t) and t.is_floating_point())


def test_non_finite_gradients_stop_before_the_weights_and_name_a_finite_checkpoint(corpus, tmp_path):
    data = TextDataModule(source=str(corpus), block_size=32, batch_size=4, val_fraction=0.2, cache_dir=str(tmp_path / "c"))
    ckpt = FiniteCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=2, save_last=True, filename="{step}")
    module = _module()
    with pytest.raises(NonFiniteError, match="non-finite gradients at step 3") as err:
        _trainer(tmp_path, 10, [Poison(3), NonFiniteGuard(), ckpt]).fit(module, data)
    named = str(err.value).rsplit("the last finite checkpoint is ", 1)[1]
    kept = torch.load(named, weights_only=True)
    assert kept["global_step"] == 2 and _finite(kept)
    assert all(torch.isfinite(p).all() for p in module.parameters())  # the NaN update never happened


def test_skip_leaves_the_weights_untouched_and_training_goes_on(corpus, tmp_path):
    data = TextDataModule(source=str(corpus), block_size=32, batch_size=4, val_fraction=0.2, cache_dir=str(tmp_path / "c"))

    class Snapshot(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                self.before = {k: v.clone() for k, v in pl_module.state_dict().items()}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:  # step 2's update was skipped
                self.after = {k: v.clone() for k, v in pl_module.state_dict().items() if "default_outputs" not in k}

    guard, snap, module = NonFiniteGuard(action="skip"), Snapshot(), _module()
    _trainer(tmp_path, 6, [Poison(2, until=3), guard, snap]).fit(module, data)
    assert guard.skipped_total == 1 and guard.skipped == 0
    assert all(torch.equal(snap.before[k], v) for k, v in snap.after.items())
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_skip_gives_up_after_max_skips_in_a_row(corpus, tmp_path):
    data = TextDataModule(source=str(corpus), block_size=32, batch_size=4, val_fraction=0.2, cache_dir=str(tmp_path / "c"))
    with pytest.raises(NonFiniteError, match="3 updates in a row were skipped.*no checkpoint was written"):
        _trainer(tmp_path, 10, [Poison(0), NonFiniteGuard(action="skip", max_skips=3)]).fit(_module(), data)


def test_a_non_finite_state_is_never_written(corpus, tmp_path):
    class Corrupt(Callback):  # weights go bad without a NaN gradient (e.g. an overflowing update)
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                with torch.no_grad():
                    pl_module.model.lm_head.weight[0, 0] = float("inf")

    data = TextDataModule(source=str(corpus), block_size=32, batch_size=4, val_fraction=0.2, cache_dir=str(tmp_path / "c"))
    ckpt = FiniteCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=2, save_last=True, filename="{step}")
    with pytest.raises(NonFiniteError, match="step=4.ckpt was not written") as err:
        _trainer(tmp_path, 10, [Corrupt(), ckpt]).fit(_module(), data)
    assert "the last finite checkpoint is" in str(err.value)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["last.ckpt", "step=2.ckpt"]
    assert _finite(torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True))
