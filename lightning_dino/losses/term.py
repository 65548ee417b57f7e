"""The interface of an optional loss term of :class:`~lightning_dino.DINO`, and the step's use.

A term is one object that owns everything about itself: its arguments and their checks, whether
it is on, what the networks must have for it (a mask token, a separate head, a ViT), what it
needs from the forward, its early problems (a batch too small, a start step beyond the run), its
loss, its log key, and its state (a centre, a Gram teacher) with the hooks that move it. The
method's training step only asks the active terms what to run (:func:`forward_request`) and adds
their weighted losses (:func:`add_term_losses`); it names no term.

Adding a term: a class here in ``losses/`` (one file), one entry in ``DINO``'s list of terms, and
its arguments (``<name>_loss_weight`` and its own) in ``DINO.__init__``'s signature, which keeps
the flat ``--model.*`` keys; the term's docstring documents them.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from lightning_dino.networks.backbones import MultiCropNetwork
from lightning_dino.networks.forward import MASKS, MaskDrawer, StepOutputs

# One check of a term's argument: (holds, the argument's name, how to fix it).
Check = tuple[bool, str, str]


class LossTerm(nn.Module):
    """Base of an optional, weighted loss term.

    Subclasses set :attr:`name` and :attr:`needs`, implement :meth:`from_hparams` and
    :meth:`forward`, and override the checks and hooks that concern them; the defaults check
    nothing and move nothing.

    Attributes:
        name: The term's name: the method's child-module name (checkpoint keys ``<name>.*``), its
            weight argument ``<name>_loss_weight`` and its log key ``train/<name>_loss``.
        needs: What the term reads from the forward:
            :data:`~lightning_dino.networks.forward.FEATURES`,
            :data:`~lightning_dino.networks.forward.TOKENS` or
            :data:`~lightning_dino.networks.forward.MASKS` (a term that needs masks draws them:
            :meth:`draw_masks`).
        weight: The term's weight in the total loss.
    """

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = weight

    # The term's arguments, before anything is built ---------------------------------------

    @classmethod
    def weight_key(cls) -> str:
        """The argument that weighs the term (``<name>_loss_weight``; 0 turns it off)."""
        return f"{cls.name}_loss_weight"

    @classmethod
    def enabled(cls, hparams: Any) -> bool:
        """Whether a method with these hyperparameters trains with the term (weight > 0)."""
        return hparams[cls.weight_key()] > 0

    @classmethod
    def argument_checks(cls, hparams: Any) -> list[Check]:
        """The checks of the term's arguments: its weight here; a term adds its own rows.

        Args:
            hparams: The method's hyperparameters.

        Returns:
            ``(holds, argument, fix)`` rows, checked whether or not the term is on (a bad value
            in a config fails now, not when the term is switched on later).
        """
        return [(hparams[cls.weight_key()] >= 0, cls.weight_key(), "use 0 (off) or a weight")]

    @classmethod
    def network_options(cls, hparams: Any) -> dict[str, Any]:
        """What the student and teacher networks must have for the term, when it is on.

        Returns:
            Keyword arguments of :func:`~lightning_dino.networks.backbones.assemble_networks`
            (``mask_token``, ``patch_head_kwargs``); empty by default.
        """
        return {}

    @classmethod
    def check_backbone(cls, backbone: nn.Module, feature_dim: int, owner: object) -> None:
        """Raise when the term cannot work with this backbone; any backbone by default.

        Args:
            backbone: The student backbone, built.
            feature_dim: Its pooled feature width D.
            owner: The method, for the name in the message.
        """

    @classmethod
    def from_hparams(cls, hparams: Any, teacher: MultiCropNetwork) -> LossTerm:
        """The term a method with these hyperparameters trains with (called when it is on).

        Args:
            hparams: The method's hyperparameters (its ``<name>_loss_weight`` and the term's own).
            teacher: The EMA teacher as built (before any training).
        """
        raise NotImplementedError

    @classmethod
    def resume_warnings(cls, saved: dict[str, Any], hparams: Any) -> list[str]:
        """Warnings for resuming a checkpoint whose term settings meant something else then.

        Args:
            saved: The checkpoint's hyperparameters.
            hparams: The resuming module's.
        """
        return []

    # Checks once the data and the run are known --------------------------------------------

    def check_batch_size(self, batch_size: int, owner: object) -> None:
        """Raise when the term cannot work with ``batch_size`` images per device; any by default.

        Args:
            batch_size: Images per device in a training batch.
            owner: The method, for the name in the message.
        """

    def check_data(self, data: dict[str, Any], owner: object) -> None:
        """Raise on data-module settings the term cannot use; any by default.

        Args:
            data: The data module's hyperparameters (``MultiCropDataModule``'s arguments).
            owner: The method, for the names in messages.
        """

    def schedule_warnings(self, total_steps: int, owner: object) -> list[str]:
        """Messages for settings of the term that do not fit in a run of ``total_steps``."""
        return []

    # The step --------------------------------------------------------------------------------

    @property
    def log_key(self) -> str:
        """The key the term's loss is logged under."""
        return f"train/{self.name}_loss"

    def active(self, step: int) -> bool:
        """Whether the term contributes at optimizer step ``step`` (always, by default)."""
        return True

    def weight_at(self, step: int) -> float:
        """The term's weight at optimizer step ``step`` (constant, by default)."""
        return self.weight

    def draw_masks(self, n_images: int, rows: int, columns: int) -> Tensor:
        """Patch masks of the student's global crops, for a term that needs ``MASKS``.

        Returns:
            Boolean (n_images, rows * columns).
        """
        raise NotImplementedError(f"the {self.name} term does not mask the student's input")

    def forward(self, outputs: StepOutputs, teacher_temp: float) -> Tensor:
        """The term's unweighted loss for one step.

        Args:
            outputs: What the networks produced for the batch.
            teacher_temp: The teacher temperature of this step.

        Returns:
            A scalar fp32 loss.
        """
        raise NotImplementedError

    def networks(self) -> list[nn.Module]:
        """Networks the term keeps beside the method's (a Gram teacher), sharded alike."""
        return []

    def start_run(self) -> None:
        """A run starts at step 0: drop any state left by an earlier run (e.g. a centre)."""

    def before_batch(self, step: int, teacher: MultiCropNetwork) -> None:
        """Called before each training batch, with the EMA teacher as it is now."""

    def before_optimizer_step(self) -> None:
        """Called once per optimizer step, after the gradients are final (e.g. to move a centre)."""


def forward_request(terms: list[LossTerm]) -> tuple[frozenset[str], MaskDrawer | None]:
    """What the forward must produce for these active terms, and who draws the masks.

    Args:
        terms: The terms active this step.

    Returns:
        ``(needs, draw_masks)``: the union of the terms' needs, and the mask drawer of the term
        that masks the student's input (None when no term does).
    """
    needs = frozenset().union(*(term.needs for term in terms))
    masker = next((term for term in terms if MASKS in term.needs), None)
    return needs, None if masker is None else masker.draw_masks


def add_term_losses(
    loss: Tensor, terms: list[LossTerm], outputs: StepOutputs, teacher_temp: float, step: int = 0
) -> tuple[Tensor, dict[str, Tensor]]:
    """Add the weighted losses of the active terms to the method's own loss.

    Args:
        loss: The method's own loss (scalar).
        terms: The terms active this step.
        outputs: What the networks produced for the batch.
        teacher_temp: The teacher temperature of this step.
        step: The optimizer step, for terms whose weight follows a schedule.

    Returns:
        ``(total loss, each term's unweighted loss by its log key)``.
    """
    logged = {}
    for term in terms:
        logged[term.log_key] = term(outputs, teacher_temp)
        loss = loss + term.weight_at(step) * logged[term.log_key]
    return loss, logged
