"""Sharded training: a method's networks split across the data-parallel ranks with FSDP2.

Under Lightning's ``ModelParallelStrategy`` (or :class:`FSDP2Strategy`, the same with tensor
parallelism off and the data-parallel size defaulting to every device, ``strategy="fsdp2"``),
each rank holds a slice of every weight, gradient and optimizer state instead of all of them:
the memory of the model shrinks with the number of ranks, while the activations do not (see
``activation_checkpointing``). :func:`shard_method` runs from the method's ``configure_model``:
the student, its teacher (EMA, frozen or Gram) are sharded alike, block by block, so the teacher
EMA and every per-tensor operation work on matching local shards.

What stays exact against DDP (each tested on two CPU ranks): the EMA on local shards, the
centres and the batch statistics of the loss terms (all-reduced over the data-parallel ranks as
under DDP), the per-tensor gradient clip on each tensor's full norm, the last-layer freeze, the
layer-wise learning rates and weight-decay groups (by parameter name, which sharding keeps).

Checkpoints are PyTorch distributed checkpoints: a folder per checkpoint, each rank writing its
own shards (``DINOCheckpoint`` writes it under a temporary name and renames it). They resume on
any number of ranks; ``lightning-dino consolidate`` turns one into a single file that
``export``, ``knn``, ``embed`` and ``load_from_checkpoint`` read (they also read the folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn

from lightning_dino.io.sharded_checkpoints import METADATA_FILE
from lightning_dino.networks.sharding import is_sharded, shard_network


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` for sharded data parallelism: FSDP2 over every device.

    Lightning's strategy builds a 2-D mesh (data parallel x tensor parallel) whose default puts
    the devices of a node on the tensor-parallel axis; DINO shards data-parallel only, so here
    ``data_parallel_size`` defaults to every device and ``tensor_parallel_size`` to 1. A resume
    also checks the checkpoint's settings against the model before any shard is read.

    Args:
        data_parallel_size: Ranks that split the batch and shard the weights ("auto": all).
        save_distributed_checkpoint: Each rank writes its own shards (True) or rank 0 a full
            single file (False: the model gathered on one rank).
        **kwargs: ``ModelParallelStrategy``'s other arguments (``process_group_backend``,
            ``timeout``).

    Examples:
        >>> trainer = pl.Trainer(strategy=FSDP2Strategy(), devices=8)  # doctest: +SKIP
    """

    def __init__(self, data_parallel_size: int | str = "auto",
                 save_distributed_checkpoint: bool = True, **kwargs: Any) -> None:
        kwargs.pop("tensor_parallel_size", None)
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)

    def setup_environment(self) -> None:
        """Every device on the data-parallel axis unless a size was given."""
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def load_checkpoint(
        self, checkpoint_path: Any, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Check the checkpoint's settings against the module, then read the shards."""
        path = Path(self.broadcast(checkpoint_path))
        if (path / METADATA_FILE).is_file():
            module = self.lightning_module
            metadata = torch.load(path / METADATA_FILE, map_location="cpu", weights_only=True)
            if hasattr(module, "check_resume_before_load"):
                module.check_resume_before_load(metadata)
        return super().load_checkpoint(checkpoint_path, weights_only)


if "fsdp2" not in StrategyRegistry:
    StrategyRegistry.register(
        "fsdp2", FSDP2Strategy, description="FSDP2 data parallelism (lightning_dino)"
    )


def data_parallel_mesh(mesh: Any, owner: object = "model") -> Any:
    """The data-parallel axis of Lightning's device mesh; refuses tensor parallelism.

    Raises:
        ValueError: When the mesh has a tensor-parallel axis of more than one device.
    """
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"{type(owner).__name__} shards data-parallel only; this ModelParallelStrategy splits "
            f"{mesh['tensor_parallel'].size()} devices for tensor parallelism. Use "
            "strategy='fsdp2' (--trainer.strategy fsdp2), or "
            "ModelParallelStrategy(data_parallel_size=<all devices>, tensor_parallel_size=1)"
        )
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def shard_method(module: pl.LightningModule, networks: list[nn.Module]) -> None:
    """Shard ``networks`` of ``module`` over its data-parallel ranks (once; a second fit skips).

    Args:
        module: The method under a ``ModelParallelStrategy`` (its ``device_mesh`` is set).
        networks: Its networks, each sharded block by block (student, teachers).
    """
    if is_sharded(module):
        return
    mesh = data_parallel_mesh(module.device_mesh, module)
    precision = str(module.trainer.precision) if module._trainer is not None else ""
    dtype = torch.bfloat16 if precision.startswith("bf16") else None
    for network in networks:
        shard_network(network, mesh, dtype)
