"""Sharding a network with FSDP2 (``fully_shard``), and tensors that may be shards.

A sharded network's parameters are ``DTensor``s: each data-parallel rank keeps a slice of every
tensor (its first dimension split across the ranks) and the forward of each sharded module
gathers its own parameters just before it runs. :func:`shard_network` shards every transformer
block (a CNN's stages) on its own, then the rest of the network, as DINOv3 does
(``dinov3/fsdp/ac_compile_parallelize.py``), so only one block's full weights are held at a time.

The helpers below let the rest of the package work on local shards without gathering:
:func:`local` is a tensor's own slice, :func:`copy_full_` writes a full tensor into a sharded one
(each rank keeps its slice), and :func:`is_sharded` says whether a module holds shards.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a ``DTensor`` (a shard of a sharded network)."""
    return any(isinstance(p, DTensor) for p in module.parameters())


def local(tensor: Tensor) -> Tensor:
    """This rank's slice of a ``DTensor``; any other tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def copy_full_(target: Tensor, value: Tensor) -> None:
    """Copy the full tensor ``value`` into ``target``, a plain tensor or a ``DTensor`` shard.

    Every rank holds the same ``value`` (weights read from a file); each keeps its own slice.
    """
    if isinstance(target, DTensor):
        sharded = distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements,
                                    src_data_rank=None)
        target.to_local().copy_(sharded.to_local())
    else:
        target.copy_(value)


def load_full_state_(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Load full tensors (a ``state_dict`` of the unsharded module) into ``module``, sharded or not.

    Raises:
        KeyError: When ``state`` lacks one of ``module``'s keys or has one it does not.
    """
    own = module.state_dict()
    if own.keys() != state.keys():
        missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        raise KeyError(f"state does not fit the module: missing {missing[:3]}, unexpected "
                       f"{unexpected[:3]}")
    for key, value in state.items():
        copy_full_(own[key], value)


def reshard(module: nn.Module) -> None:
    """Free the gathered weights of ``module``'s sharded parts (back to this rank's slices).

    FSDP2 keeps a root's weights gathered after a forward that no backward follows (a
    teacher's, an evaluation's); the EMA and the optimizer work on the slices.
    """
    from torch.distributed.fsdp import FSDPModule

    for child in module.modules():
        if isinstance(child, FSDPModule):
            child.reshard()


@torch.no_grad()
def broadcast_buffers(module: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics), as DDP does before each forward.

    A collective call; one broadcast per buffer dtype.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for buffer in module.buffers():
        if buffer.numel():
            by_dtype.setdefault(buffer.dtype, []).append(buffer)
    for buffers in by_dtype.values():
        flat = torch.cat([b.reshape(-1) for b in buffers])
        dist.broadcast(flat, src=0)
        torch._foreach_copy_(buffers, [part.view_as(b) for part, b in
                                       zip(flat.split([b.numel() for b in buffers]), buffers,
                                           strict=True)])


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """A detached copy of ``module.state_dict()``, every shard gathered to its full tensor.

    A collective call when ``module`` is sharded (every rank calls it).
    """
    reshard(module)
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in module.state_dict().items()}


def shard_blocks(backbone: nn.Module) -> Iterator[nn.Module]:
    """The modules sharded on their own: a ViT's (or Eva's) blocks, a ResNet's stages."""
    blocks = getattr(backbone, "blocks", None)
    if isinstance(blocks, nn.Sequential | nn.ModuleList):
        yield from blocks
        return
    stages = [getattr(backbone, f"layer{i}", None) for i in range(1, 5)]
    if all(isinstance(stage, nn.Module) for stage in stages):
        yield from stages
        return
    stages = getattr(backbone, "stages", None)
    if isinstance(stages, nn.Sequential | nn.ModuleList):
        yield from stages


def shard_network(network: nn.Module, mesh: object, param_dtype: torch.dtype | None) -> None:
    """Shard ``network`` in place over ``mesh``: its backbone block by block, each head.

    The backbone and each head are separate roots (the backbone runs alone in evaluation, so it
    must be callable on its own); parameters held by ``network`` itself (an iBOT mask token) stay
    whole on every rank, their gradients averaged by :func:`all_reduce_unsharded_gradients`.

    Args:
        network: A network with a ``backbone`` (and heads), or a bare backbone.
        mesh: The data-parallel ``DeviceMesh``.
        param_dtype: The dtype the gathered weights compute in (``torch.bfloat16`` for bf16
            runs; gradients are still reduced and stored in fp32); None: the parameters' own.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # FSDP2 warns that a root returning a view (the class token, x[:, 0]) loses its backward
    # hook to an in-place op on it; no code of the package modifies features in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for param in network.parameters():  # FSDP2 shards contiguous tensors (not channels-last)
        if not param.is_contiguous():
            param.data = param.data.contiguous()
    backbone = getattr(network, "backbone", network)
    # A backbone compiled whole (``compile=True``) is compiled block by block instead, after the
    # blocks are sharded, as DINOv3 does: each compiled block then runs between its own
    # gather and free. (nn.Module.compile has no public undo; this is the attribute it sets.)
    compiled = getattr(backbone, "_compiled_call_impl", None) is not None
    backbone._compiled_call_impl = None
    for block in shard_blocks(backbone):
        fully_shard(block, mesh=mesh, mp_policy=policy)
        if compiled:
            block.compile(dynamic=False)
    fully_shard(backbone, mesh=mesh, mp_policy=policy)
    if backbone is not network:
        for child in network.children():
            if child is not backbone and any(True for _ in child.parameters()):
                fully_shard(child, mesh=mesh, mp_policy=policy)


def unsharded_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters of a sharded ``module`` that no shard holds (kept whole per rank)."""
    return [p for p in module.parameters() if p.requires_grad and not isinstance(p, DTensor)]


def all_reduce_unsharded_gradients(module: nn.Module) -> None:
    """Average the gradients of ``module``'s unsharded parameters over the ranks (as DDP would).

    A collective call: every rank calls it with the same parameters, gradient or not.
    """
    import torch.distributed as dist

    params = unsharded_parameters(module)
    if not params or not dist.is_initialized():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    present = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device)
    flat = torch.cat([*(g.reshape(-1).float() for g in grads), present])
    dist.all_reduce(flat)
    flat[: -len(params)] /= dist.get_world_size()
    offset = 0
    for param, grad, count in zip(params, grads, flat[-len(params) :].tolist(), strict=True):
        averaged = flat[offset : offset + grad.numel()].view_as(grad).to(grad.dtype)
        param.grad = averaged.clone() if count > 0 else None
        offset += grad.numel()
