import pytest
import torch
from torch.nn.utils import parametrize

from lightning_dino import DINOHead


@pytest.mark.parametrize("n_layers", [1, 2, 3])
@pytest.mark.parametrize("use_bn", [False, True])
def test_shapes_and_layers(n_layers, use_bn):
    head = DINOHead(in_dim=12, out_dim=40, hidden_dim=16, bottleneck_dim=8, n_layers=n_layers, use_bn=use_bn)
    assert head(torch.randn(5, 12)).shape == (5, 40)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert len(linears) == n_layers
    assert linears[-1].out_features == 8
    assert sum(isinstance(m, torch.nn.GELU) for m in head.mlp) == n_layers - 1
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in head.mlp) == (n_layers - 1 if use_bn else 0)
    assert head.last_layer.bias is None


def test_bottleneck_is_unit_norm_and_logits_are_cosines():
    torch.manual_seed(0)
    head = DINOHead(in_dim=12, out_dim=40, hidden_dim=16, bottleneck_dim=8)
    x = torch.randn(5, 12) * 10
    # The bottleneck by hand: Linear-GELU-Linear-GELU-Linear from the layers' own weights.
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    h = x
    for i, linear in enumerate(linears):
        h = h @ linear.weight.T + linear.bias
        if i < len(linears) - 1:
            h = 0.5 * h * (1 + torch.erf(h / 2**0.5))  # exact GELU
    raw_norms = h.norm(dim=-1, keepdim=True)
    assert (raw_norms - 1).abs().min() > 0.1  # not unit norm before the head normalises it
    bottleneck = h / raw_norms

    seen = []
    head.last_layer.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    logits = head(x)
    # What the head feeds its last layer is the L2-normalised bottleneck.
    [fed] = seen
    torch.testing.assert_close(fed, bottleneck, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fed.norm(dim=-1), torch.ones(5), rtol=0, atol=1e-6)
    # The last layer's weight is magnitude (frozen at 1) x direction / |direction| per prototype,
    # so each prototype has unit norm and the logits are cosine similarities.
    magnitude = head.last_layer.parametrizations.weight.original0
    direction = head.last_layer.parametrizations.weight.original1
    assert torch.all(magnitude == 1)
    prototypes = direction / direction.norm(dim=1, keepdim=True)
    assert (direction.norm(dim=1) - 1).abs().min() > 0.1  # the normalisation does something
    torch.testing.assert_close(logits, bottleneck @ prototypes.T, rtol=1e-5, atol=1e-6)
    assert logits.abs().max() <= 1 + 1e-5


def test_weight_norm_parametrization_and_frozen_magnitude():
    head = DINOHead(in_dim=4, out_dim=10, hidden_dim=8, bottleneck_dim=6, norm_last_layer=True)
    assert parametrize.is_parametrized(head.last_layer, "weight")
    magnitude = head.last_layer.parametrizations.weight.original0
    assert torch.all(magnitude == 1) and not magnitude.requires_grad
    trainable = DINOHead(in_dim=4, out_dim=10, hidden_dim=8, bottleneck_dim=6, norm_last_layer=False)
    assert trainable.last_layer.parametrizations.weight.original0.requires_grad


def test_frozen_magnitude_stays_one_after_training_steps():
    head = DINOHead(in_dim=4, out_dim=10, hidden_dim=8, bottleneck_dim=6)
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        head(torch.randn(7, 4)).pow(2).sum().backward()
        opt.step()
    assert torch.all(head.last_layer.parametrizations.weight.original0 == 1)
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(10), atol=1e-5)
