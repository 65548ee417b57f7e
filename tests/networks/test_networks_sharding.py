"""The sharding helpers on two gloo CPU ranks, each against the unsharded computation: which modules
shard on their own, full weights into shards and back, the per-tensor clip's full norms, gradients
and buffers of the parts no shard holds."""

import pytest
import timm
import torch
from torch import nn

from lightning_dino import DINO
from lightning_dino.networks.sharding import shard_blocks
from tests.conftest import TINY_VIT, run_on_gloo


def test_blocks_of_a_vit_and_stages_of_a_resnet_shard_on_their_own():
    vit = timm.create_model("vit_tiny_patch16_224", **TINY_VIT["backbone_kwargs"])
    assert list(shard_blocks(vit)) == list(vit.blocks)
    resnet = timm.create_model("test_resnet")
    assert list(shard_blocks(resnet)) == [resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4]
    assert list(shard_blocks(nn.Linear(2, 2))) == []


def _round_trip(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from lightning_dino.networks.sharding import (
        all_reduce_unsharded_gradients,
        broadcast_buffers,
        full_state_dict,
        is_sharded,
        load_full_state_,
        shard_network,
        unsharded_parameters,
    )
    from lightning_dino.training.optimization import clip_gradients_per_tensor

    torch.manual_seed(0)
    model = DINO(**TINY_VIT, ibot_loss_weight=1.0)
    plain = {k: v.clone() for k, v in model.student.state_dict().items()}
    mesh = init_device_mesh("cpu", (2,))
    shard_network(model.student, mesh, None)
    assert is_sharded(model.student) and isinstance(model.student.backbone.blocks[0].attn.qkv.weight, DTensor)
    whole = {id(p) for p in unsharded_parameters(model.student)}
    assert [n for n, p in model.student.named_parameters() if id(p) in whole] == ["mask_token"]
    gathered = full_state_dict(model.student)
    same = all(torch.equal(gathered[k], plain[k]) for k in plain)
    # Full weights in: each rank keeps its slice, and gathering gives them back.
    torch.manual_seed(1)  # the same on both ranks
    new = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in plain.items()}
    load_full_state_(model.student, new)
    loaded = all(torch.equal(full_state_dict(model.student)[k], new[k]) for k in new)
    # Per-tensor clip on full norms: rank 1 holds 0 rows of a 1-row tensor, the norms are whole.
    grads = {n: torch.full_like(p.full_tensor() if isinstance(p, DTensor) else p, 0.5)
             for n, p in model.student.named_parameters()}
    for name, param in model.student.named_parameters():
        full = grads[name]
        param.grad = (torch.distributed.tensor.distribute_tensor(full, param.device_mesh, param.placements)
                      if isinstance(param, DTensor) else full.clone() * (rank + 1))
    all_reduce_unsharded_gradients(model.student)
    mask_grad = model.student.mask_token.grad.clone()
    clip_gradients_per_tensor(list(model.student.parameters()), 1.0)
    norms = {n: (p.grad.full_tensor() if isinstance(p, DTensor) else p.grad).norm().item()
             for n, p in model.student.named_parameters()}
    # Buffers: rank 1 takes rank 0's.
    buffer = torch.full((3,), float(rank))
    holder = nn.Module()
    holder.register_buffer("stat", buffer)
    broadcast_buffers(holder)
    return same, loaded, mask_grad, norms, holder.stat.clone()


@pytest.mark.tier2  # two ranks: the second tier (make test-tier2)
def test_sharded_weights_gradients_and_buffers_match_the_unsharded_computation(tmp_path):
    results = run_on_gloo(_round_trip, tmp_path)
    for same, loaded, mask_grad, norms, stat in results:
        assert same and loaded
        torch.testing.assert_close(mask_grad, torch.full_like(mask_grad, 0.75))  # mean of 0.5 and 1.0
        assert all(abs(norm - 1.0) < 1e-5 for name, norm in norms.items() if "mask_token" not in name)
        assert torch.equal(stat, torch.zeros(3))
