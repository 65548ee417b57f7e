"""The loss-term interface: what the forward must produce for the active terms, their weighted
sum, and a new term added to DINO with one class, one entry in the list of terms and its argument."""

import pytest
import torch
from torch import Tensor

import lightning_dino.dino as dino_module
from lightning_dino import DINO
from lightning_dino.losses.ibot import iBOTTerm
from lightning_dino.losses.koleo import KoLeoTerm
from lightning_dino.losses.term import LossTerm, add_term_losses, forward_request
from lightning_dino.networks.forward import FEATURES, MASKS, TOKENS, StepOutputs
from tests.conftest import TINY_VIT


class SpreadTerm(LossTerm):
    """A toy term: the mean squared norm of the student's features (its argument spread_loss_weight)."""

    name = "spread"
    needs = frozenset({FEATURES})

    @classmethod
    def from_hparams(cls, hparams, teacher):
        return cls(hparams.spread_loss_weight)

    def forward(self, outputs: StepOutputs, teacher_temp: float) -> Tensor:
        return outputs.features.pow(2).sum(-1).mean()


class SpreadDINO(DINO):
    def __init__(self, spread_loss_weight: float = 0.0, **kwargs):
        super().__init__(**kwargs)


def test_the_forward_request_is_the_union_of_needs_and_the_masking_terms_drawer():
    koleo = KoLeoTerm(0.1)
    ibot = iBOTTerm(1.0, out_dim=8, mask_probability=1.0)
    assert forward_request([]) == (frozenset(), None)
    assert forward_request([koleo]) == (frozenset({FEATURES}), None)
    needs, draw = forward_request([koleo, ibot])
    assert needs == {FEATURES, MASKS, TOKENS}
    assert draw.__self__ is ibot and draw(3, 4, 4).shape == (3, 16)
    with pytest.raises(NotImplementedError, match="koleo term does not mask"):
        koleo.draw_masks(1, 2, 2)


def test_the_terms_add_their_weighted_losses_and_log_them_unweighted():
    outputs = StepOutputs([], 2, torch.zeros(1), torch.zeros(1), features=torch.randn(2, 4, 8))
    first, second = SpreadTerm(0.5), SpreadTerm(2.0)
    second.name = "spread2"
    total, logged = add_term_losses(torch.tensor(1.0), [first, second], outputs, 0.04)
    spread = outputs.features.pow(2).sum(-1).mean()
    torch.testing.assert_close(total, 1.0 + 2.5 * spread)
    assert logged.keys() == {"train/spread_loss", "train/spread2_loss"}
    torch.testing.assert_close(logged["train/spread_loss"], spread)


def test_a_new_term_is_one_class_and_one_entry(monkeypatch):
    monkeypatch.setattr(dino_module, "TERMS", (*dino_module.TERMS, SpreadTerm))
    model = SpreadDINO(spread_loss_weight=0.5, **TINY_VIT, warmup_epochs=0)
    assert [term.name for term in model.terms] == ["spread"]
    with pytest.raises(ValueError, match=r"SpreadDINO\(spread_loss_weight=-1\) is invalid"):
        SpreadDINO(spread_loss_weight=-1, **TINY_VIT)
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    result = model.compute_step(crops, {})
    assert result.losses.keys() == {"train/dino_loss", "train/spread_loss"}
    torch.testing.assert_close(result.loss, result.losses["train/dino_loss"] + 0.5 * result.losses["train/spread_loss"])
    model.eval()  # no stochastic depth: the features below are the step's
    with torch.no_grad():
        again = model.compute_step(crops, {})
        features = torch.stack([model.student.backbone(c) for c in crops])
    torch.testing.assert_close(again.losses["train/spread_loss"], features.pow(2).sum(-1).mean())
