"""FSDP2 sharding (``lantern.parallel``, configs/strategy/fsdp.yaml) on CPU, gloo standing in for NCCL.

What only GPUs show (NCCL, bf16 autocast on CUDA, memory and speed at the paper's size) is left
to the GPU commands in the README.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

from lantern.callbacks.nonfinite import _all_finite
from lantern.cli import check_checkpoint_fits, cli_main, read_checkpoint
from lantern.errors import CheckpointError
from lantern.lightning_modules import MoEPretraining
from lantern.models.moe import MoETransformer
from lantern.parallel import shard_blocks

ROOT = Path(__file__).resolve().parents[1]
MAIN = str(ROOT / "configs/default_moe/tiny.yaml")
FSDP = str(ROOT / "configs/strategy/fsdp.yaml")
DEBUG = str(ROOT / "configs/debug/tiny.yaml")
CLIP = 0.05  # below the tiny model's gradient norm, so clipping changes every gradient


def _tiny(seed: int = 0, d_model: int = 32) -> MoETransformer:
    torch.manual_seed(seed)
    # A dense first layer: a block whose mlp has no router must be sharded too.
    return MoETransformer(vocab_size=50, d_model=d_model, n_layers=2, n_heads=4, n_experts=4, top_k=2, d_expert=32,
                          max_seq_len=16, n_dense_layers=1)


def _batch(n: int = 4):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 50, (n, 16), generator=g), torch.randint(0, 50, (n, 16), generator=g)


def _loss(model, ids, labels):
    out = model(ids, labels=labels)
    return out.loss + 0.01 * out.aux_loss


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


@pytest.fixture
def mesh(monkeypatch):
    """A one-process gloo group (conftest destroys it after the test)."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    return init_device_mesh("cpu", (1,))


def test_every_block_is_its_own_unit_and_the_router_and_defaults_stay_fp32(mesh):
    model = _tiny()
    names = [n for n, _ in model.named_parameters()]
    shard_blocks(model, mesh, model.blocks, fp32_modules=model.moe_layers)
    assert isinstance(model, FSDPModule) and all(isinstance(b, FSDPModule) for b in model.blocks)
    assert [n for n, _ in model.named_parameters()] == names  # FSDP2 keeps the names checkpoints use
    assert all(isinstance(p, DTensor) for p in model.parameters())  # nothing left out of the sharding
    for layer in model.moe_layers:
        assert layer.router.weight.dtype == torch.float32
        assert type(layer.default_outputs) is torch.Tensor and layer.default_outputs.dtype == torch.float32
    ids, labels = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what precision: bf16-mixed runs
        _loss(model, ids, labels).backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    model.commit_defaults()  # where Ê moves once per optimizer step
    assert all(layer.default_outputs.dtype == torch.float32 and layer.default_outputs.abs().sum() > 0 for layer in model.moe_layers)
    assert shard_blocks(model, mesh, model.blocks) is model  # again: nothing changes


@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")  # the MoE layer returns a view; the block adds to it out of place
def test_under_a_bf16_policy_the_fp32_modules_are_gathered_in_fp32(mesh):
    model = _tiny()
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    shard_blocks(model, mesh, model.blocks, fp32_modules=model.moe_layers, mp_policy=bf16)
    seen = {}  # the weights as gathered, read inside the forward passes (hooks on modules that are no units)

    def record(name, weight):
        return lambda *_: seen.__setitem__(name, (not isinstance(weight(), DTensor), weight().dtype))

    for i, block in enumerate(model.blocks):
        block.attn.register_forward_hook(record(f"attn{i}", lambda b=block: b.attn.qkv.weight))
        if hasattr(block.mlp, "router"):
            assert isinstance(block.mlp, FSDPModule)
            block.mlp.experts.register_forward_hook(record(f"router{i}", lambda b=block: b.mlp.router.weight))
    ids, labels = _batch()
    _loss(model, ids, labels).backward()
    attn = {k: v for k, v in seen.items() if k.startswith("attn")}
    routers = {k: v for k, v in seen.items() if k.startswith("router")}
    assert len(attn) == len(model.blocks) and set(attn.values()) == {(True, torch.bfloat16)}
    assert len(routers) == len(model.moe_layers) and set(routers.values()) == {(True, torch.float32)}
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())  # the shards


def test_evaluation_before_training_runs_under_no_grad(mesh):
    """`validate --ckpt_path` gathers first in an evaluation loop: under torch.inference_mode FSDP2 would
    keep inference tensors it cannot reuse, so the overlay sets trainer.inference_mode: false."""
    assert yaml.safe_load(Path(FSDP).read_text())["trainer"]["inference_mode"] is False
    model = _tiny()
    shard_blocks(model, mesh, model.blocks)
    ids, labels = _batch()
    model.eval()
    with torch.no_grad():
        _loss(model, ids, labels)
    model.train()
    _loss(model, ids, labels).backward()
    assert all(p.grad is not None for p in model.parameters())


def _two_ranks(rank: int, port: int, folder: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = _tiny()
    shard_blocks(model, init_device_mesh("cpu", (2,)), model.blocks, fp32_modules=model.moe_layers)
    ids, labels = _batch()
    _loss(model, ids.chunk(2)[rank], labels.chunk(2)[rank]).backward()  # each rank its half of the batch
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    Precision().clip_gradients(optimizer, CLIP, GradClipAlgorithmType.NORM)  # what the Trainer calls
    result = {"grads": {n: _full(p.grad) for n, p in model.named_parameters()},
              "local_shards": all(p.to_local().numel() < p.numel() for p in model.parameters() if p.shape[0] >= 2)}
    grads = [p.grad for p in model.parameters()]
    result["finite"] = bool(_all_finite(grads))
    if rank == 1:
        grads[0].to_local().view(-1)[0] = float("nan")  # only rank 1's shard
    result["poisoned"] = bool(_all_finite(grads))
    decision = torch.tensor(int(result["poisoned"]))
    dist.all_reduce(decision, op=dist.ReduceOp.MIN)  # as Strategy.reduce_boolean_decision(all=True)
    result["poisoned_everywhere"] = bool(decision)
    for p in model.parameters():
        p.grad.to_local().nan_to_num_(0.0)
    optimizer.step()
    state = {"state_dict": get_model_state_dict(model)}
    dcp_save(state, checkpoint_id=folder)
    if rank == 0:
        torch.save({"global_step": 1}, Path(folder) / "meta.pt")
    result["saved"] = {n: _full(t).clone() for n, t in state["state_dict"].items()}

    other = _tiny(seed=7)  # different weights, overwritten by the load
    shard_blocks(other, init_device_mesh("cpu", (2,)), other.blocks, fp32_modules=other.moe_layers)
    loaded = {"state_dict": get_model_state_dict(other)}
    dcp_load(loaded, checkpoint_id=folder)
    set_model_state_dict(other, loaded["state_dict"])
    result["loaded"] = {n: _full(t).clone() for n, t in other.state_dict().items()}
    torch.save(result, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """A step on two gloo ranks, each with half the batch, beside the same step unsharded on the whole batch."""
    where = tmp_path_factory.mktemp("fsdp2")
    model = _tiny()
    model.train()
    ids, labels = _batch()
    _loss(model, ids, labels).backward()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    Precision().clip_gradients(optimizer, CLIP, GradClipAlgorithmType.NORM)
    reference = {"grads": {n: p.grad.clone() for n, p in model.named_parameters()}, "norm": norm}
    mp.spawn(_two_ranks, args=(_free_port(), str(where / "ckpt"), str(where / "out.pt")), nprocs=2, join=True)
    ranks = [torch.load(f"{where / 'out.pt'}.{r}", weights_only=True) for r in range(2)]
    return reference, ranks, where / "ckpt"


@pytest.mark.slow
def test_clipping_by_norm_gives_the_unsharded_gradients(two_ranks):
    reference, ranks, _ = two_ranks
    assert reference["norm"] > 2 * CLIP  # the clip is active
    for sharded in ranks:
        assert sharded["local_shards"]  # each rank held only part of every weight
        for name, grad in reference["grads"].items():
            torch.testing.assert_close(sharded["grads"][name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_the_nan_guard_reads_local_shards(two_ranks):
    _, ranks, _ = two_ranks
    assert [r["finite"] for r in ranks] == [True, True]
    assert [r["poisoned"] for r in ranks] == [True, False]  # each rank judges its own shard
    assert [r["poisoned_everywhere"] for r in ranks] == [False, False]  # and the reduced verdict stops both


@pytest.mark.slow
def test_the_state_dict_round_trips_through_the_sharded_format(two_ranks, mesh):
    _, (sharded, _), folder = two_ranks
    assert sharded["saved"].keys() == sharded["loaded"].keys()
    for name, tensor in sharded["saved"].items():
        torch.testing.assert_close(sharded["loaded"][name], tensor, atol=0, rtol=0, msg=name)
    # written by two ranks, read back by one: DCP reshards on load
    model = _tiny(seed=7)
    shard_blocks(model, mesh, model.blocks)
    state = {"state_dict": get_model_state_dict(model)}
    dcp_load(state, checkpoint_id=folder)
    set_model_state_dict(model, state["state_dict"])
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(_full(tensor), sharded["saved"][name], atol=0, rtol=0, msg=name)


@pytest.mark.slow
def test_the_cli_checks_a_sharded_checkpoint_without_loading_it(two_ranks, tmp_path):
    _, (sharded, _), folder = two_ranks
    state = read_checkpoint(str(folder))
    assert state["global_step"] == 1
    assert {n: list(t.shape) for n, t in state["state_dict"].items()} == {n: list(t.shape) for n, t in sharded["saved"].items()}
    check_checkpoint_fits(state, _tiny(), str(folder))  # names and shapes agree
    with pytest.raises(CheckpointError, match="is \\[50, 32\\] in the checkpoint and \\[50, 64\\]"):
        check_checkpoint_fits(state, _tiny(d_model=64), str(folder))
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in folder.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    shard = next(broken.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"the shard {shard.name} is missing or truncated"):
        read_checkpoint(str(broken))
    (broken / "meta.pt").unlink()
    with pytest.raises(CheckpointError, match="a folder, but not a sharded checkpoint"):
        read_checkpoint(str(broken))
    assert FileSystemReader(str(folder)).read_metadata().state_dict_metadata  # the untouched original


@pytest.fixture
def keep_environ():
    """Lightning's launcher leaves its rendezvous variables in os.environ; later tests must not see them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.slow
def test_the_overlay_fits_and_resumes_from_its_sharded_checkpoint_on_cpu(corpus, tmp_path, monkeypatch, keep_environ):
    """configure_model, clipping, FiniteCheckpoint and --ckpt_path through the real CLI, one CPU process."""
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", MAIN, "--config", FSDP, "--config", DEBUG, "--trainer.accelerator", "cpu",
            "--trainer.devices", "1", "--trainer.precision", "32-true", "--data.init_args.source", str(corpus),
            "--data.init_args.block_size", "32", "--data.init_args.batch_size", "4", "--data.init_args.val_fraction", "0.2"]
    first = cli_main(args)
    assert isinstance(first.model.model, FSDPModule) and first.trainer.global_step == 4
    last = tmp_path / first.trainer.log_dir / "checkpoints" / "last.ckpt"
    assert last.is_dir() and (last / "meta.pt").is_file() and list(last.glob("*.distcp"))
    weights = {n: _full(p).detach().clone() for n, p in first.model.named_parameters()}
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.pop("MASTER_PORT", None)  # a fresh rendezvous port for the second run
    starts = []  # (step, weights) as the resumed run begins
    monkeypatch.setattr(MoEPretraining, "on_train_start", lambda self: starts.append(
        (self.global_step, {n: _full(p).detach().clone() for n, p in self.named_parameters()})))
    resumed = cli_main([*args, "--trainer.max_steps", "6", "--ckpt_path", str(last)])
    assert resumed.trainer.global_step == 6
    (step, restored), = starts
    assert step == 4 and restored.keys() == weights.keys()
    for name, tensor in weights.items():
        torch.testing.assert_close(restored[name], tensor, atol=0, rtol=0, msg=name)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without CUDA")
def test_without_cuda_the_overlay_stops_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "fit", "--config", MAIN, "--config", FSDP],
                          cwd=tmp_path, capture_output=True, text=True, timeout=180)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("lantern: error: trainer.strategy=") and "configs/strategy/fsdp.yaml" in lines[0] and "CUDA GPUs" in lines[0]
    assert not (tmp_path / "runs").exists()
