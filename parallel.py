"""Fully sharded data parallelism (FSDP2, ``torch.distributed.fsdp.fully_shard``) for Lightning.

``configs/strategy/fsdp.yaml`` selects ``FSDP2Strategy``; a LightningModule's ``configure_model``
then calls ``shard_blocks``. Lightning's ``ModelParallelStrategy`` clips gradients by norm on
DTensors (its older ``FSDPStrategy`` refuses to), writes sharded checkpoints that ``--ckpt_path``
resumes, and runs ``precision: bf16-mixed`` as plain autocast over the sharded fp32 weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from lantern.errors import ConfigError


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` as plain FSDP2: every process is a data-parallel rank.

    Its ``"auto"`` sizes make the GPUs of a node one tensor-parallel group, which would feed them
    all the same batches; a model that is only sharded needs the data-parallel size to be the
    world size, whatever ``trainer.devices`` and ``trainer.num_nodes`` make it.
    """

    def __init__(
        self,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ):
        """
        Args:
            save_distributed_checkpoint: each rank writes its own shard into a checkpoint folder
                (False: rank 0 gathers one full ``.ckpt`` file, which must fit its memory).
            process_group_backend: ``nccl`` on GPUs, ``gloo`` on CPUs unless set.
            timeout: how long a collective waits for the other ranks.
        """
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def data_parallel_mesh(mesh):
    """The 1-D mesh FSDP2 shards over, from ``ModelParallelStrategy``'s 2-D one."""
    tp = mesh["tensor_parallel"].size()
    if tp != 1:
        raise ConfigError("ModelParallelStrategy", "tensor_parallel_size", tp,
                          "1: this model is sharded with FSDP2 alone (use lantern.parallel.FSDP2Strategy)")
    return mesh["data_parallel"]


def shard_blocks(
    model: nn.Module,
    mesh,
    blocks: Iterable[nn.Module],
    fp32_modules: Iterable[nn.Module] = (),
    mp_policy=None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard ``model`` with FSDP2: each of ``blocks`` one unit, the rest (embeddings, head) the root's.

    ``mp_policy`` (a ``MixedPrecisionPolicy``) is the dtype units gather their weights in; None
    keeps them as stored. Under a lower ``param_dtype`` each of ``fp32_modules`` is a unit of its
    own gathered in fp32: FSDP2 gathers a unit in that unit's forward, so list modules whose
    forward runs (an MoE layer, not a router whose weight the layer reads). Buffers are neither
    sharded nor cast. A model already sharded is returned as it is.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if isinstance(model, FSDPModule):
        return model
    policy = mp_policy or MixedPrecisionPolicy()
    if policy.param_dtype not in (None, torch.float32):
        # Its output goes back to the surrounding dtype, as the next unit's weights expect.
        fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, output_dtype=policy.param_dtype)
        for module in fp32_modules:
            fully_shard(module, mesh=mesh, mp_policy=fp32, reshard_after_forward=reshard_after_forward)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model
