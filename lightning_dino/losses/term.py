"""The interface of an optional loss term of :class:`~lightning_dino.DINO`.

A term is one object: it says what it needs from the forward, computes its loss from the step's
outputs, names its log key and keeps its own state (a centre, a Gram teacher) with the hooks that
move it. ``DINO`` adds the weighted sum of its active terms to the DINO loss; adding a term means
writing its class beside its loss and adding it to ``DINO``'s list of terms.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from lightning_dino.networks.backbones import MultiCropNetwork
from lightning_dino.networks.forward import StepOutputs


class LossTerm(nn.Module):
    """Base of an optional, weighted loss term.

    Subclasses set :attr:`name` and :attr:`needs` and implement :meth:`forward`; the hooks are
    no-ops unless the term has state to move.

    Attributes:
        name: The term's name: ``DINO``'s child-module name (so checkpoint keys read
            ``<name>.*``) and its log key ``train/<name>_loss``.
        needs: What the term reads from the forward:
            :data:`~lightning_dino.networks.forward.FEATURES`,
            :data:`~lightning_dino.networks.forward.TOKENS` or
            :data:`~lightning_dino.networks.forward.MASKS`.
        weight: The term's weight in the total loss.
    """

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = weight

    @classmethod
    def from_hparams(cls, hparams: Any, teacher: MultiCropNetwork) -> LossTerm | None:
        """The term a ``DINO`` with these hyperparameters trains with, or None when it is off.

        Args:
            hparams: ``DINO``'s hyperparameters (its ``<name>_loss_weight`` and the term's own).
            teacher: The EMA teacher as built (before any training).
        """
        raise NotImplementedError

    @property
    def log_key(self) -> str:
        """The key the term's loss is logged under."""
        return f"train/{self.name}_loss"

    def active(self, step: int) -> bool:
        """Whether the term contributes at optimizer step ``step`` (always, by default)."""
        return True

    def forward(self, outputs: StepOutputs, teacher_temp: float) -> Tensor:
        """The term's unweighted loss for one step.

        Args:
            outputs: What the networks produced for the batch.
            teacher_temp: The teacher temperature of this step.

        Returns:
            A scalar fp32 loss.
        """
        raise NotImplementedError

    def start_run(self) -> None:
        """A run starts at step 0: drop any state left by an earlier run (e.g. a centre)."""

    def before_batch(self, step: int, teacher: MultiCropNetwork) -> None:
        """Called before each training batch, with the EMA teacher as it is now."""

    def before_optimizer_step(self) -> None:
        """Called once per optimizer step, after the gradients are final (e.g. to move a centre)."""
