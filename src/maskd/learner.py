"""Stage 1: learn receptive tokens on a frozen teacher from its own task loss."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from torch import Tensor, nn

from maskd.errors import UserRuntimeError, UserTypeError, UserValueError
from maskd.losses import dice_diversity
from maskd.taps import FeatureTaps, probe_levels
from maskd.tokens import ReceptiveTokens

__all__ = ["TEACHER_MODES", "TokenLearner", "freeze", "keep_normalization_eval"]

TeacherMode = Literal["eval", "train"]
TEACHER_MODES: tuple[str, ...] = ("eval", "train")

# Modules whose training flag changes what they compute from the batch.
_STATEFUL = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)


def freeze(model: nn.Module) -> nn.Module:
    """Turn off ``requires_grad`` on every parameter of ``model`` (in place); return it."""
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def keep_normalization_eval(model: nn.Module) -> nn.Module:
    """Put every BatchNorm/InstanceNorm and Dropout module of ``model`` in eval mode.

    The rest of the model keeps its mode, so a torchvision detector in training mode still
    returns its losses while its running statistics stay untouched.
    """
    for module in model.modules():
        if isinstance(module, _STATEFUL):
            module.eval()
    return model


def _check_positive(value: object, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserValueError(f"{name} must be a positive int, got {value!r}")


class TokenLearner(nn.Module):
    """Stage 1 of MasKD: receptive tokens trained through a frozen teacher.

    Each level of each tapped teacher layer gets one :class:`~maskd.tokens.ReceptiveTokens`;
    during the forward the level's output ``x [N, C, H, W]`` is replaced by
    ``mask_features(x) = Σ_t w_t · m_t ⊙ x`` and the teacher's forward continues with it, so
    the teacher's task loss trains the tokens. The Dice diversity of each level's masks
    ``[N, T, H, W]`` is summed over levels, scaled by ``dice_weight`` and returned as
    ``loss_dice``.

    The teacher is frozen in place: no parameter requires grad, none is ever handed to an
    optimizer, so its parameters stay bit-identical. ``teacher_mode`` decides what its
    BatchNorm and Dropout modules do while the learner trains:

    - ``"eval"`` (default; the authors' detection hook, ``mmdetection/maskd_hook.py``, puts
      every BatchNorm in eval before each iteration): BatchNorm and Dropout stay in eval mode
      whatever ``.train()`` is called with; the rest of the teacher follows the learner's
      mode, so in training mode a detector still computes its losses.
    - ``"train"`` (the authors' segmentation script, ``segmentation/train_mask_module.py``,
      calls ``model.train()`` on the teacher): the whole teacher follows the learner's mode,
      so in training BatchNorm normalises with the batch's statistics and Dropout is active.
      BatchNorm's running statistics of this teacher copy *do* update during stage 1, as in
      the authors' script; they are only read by an eval-mode forward (validation). What the
      stage produces are the tokens: stage 2 rebuilds the teacher from its own weights file.

    In eval mode (``.eval()``) the whole teacher is in eval mode either way.

    Channels are inferred by one dry run at construction: the teacher in eval mode under
    ``torch.no_grad()``, on ``example_input`` (default: one black ``[1, 3, 128, 128]`` image,
    which torchvision detectors resize with their own transform), stopped right after the
    last tapped layer. Tokens exist from construction on, so an optimizer can be built at once.

    Args:
        teacher: a task model (``forward(images, targets)`` → losses in training mode).
        layers: dotted teacher layer paths (``["backbone.fpn"]``).
        num_tokens: ``T``, tokens per level.
        weighted: add the token-weighting head to every level.
        dice_weight: scale of the summed Dice diversity.
        example_input: dry-run input; a tuple is unpacked into positional arguments.
        teacher_mode: ``"eval"`` or ``"train"``: the mode of the teacher's BatchNorm and
            Dropout modules while the learner trains (see above).
    """

    def __init__(
        self,
        teacher: nn.Module,
        layers: Sequence[str],
        num_tokens: int = 6,
        weighted: bool = True,
        dice_weight: float = 1.0,
        example_input: Any = None,
        teacher_mode: TeacherMode = "eval",
    ) -> None:
        super().__init__()
        if not isinstance(teacher, nn.Module):
            raise UserTypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        if teacher_mode not in TEACHER_MODES:
            raise UserValueError(
                f"teacher_mode must be one of {list(TEACHER_MODES)}, got {teacher_mode!r}"
            )
        self.teacher_mode: TeacherMode = teacher_mode
        _check_positive(num_tokens, "num_tokens")
        if not isinstance(dice_weight, int | float) or dice_weight < 0:
            raise UserValueError(f"dice_weight must be a number >= 0, got {dice_weight!r}")
        self.teacher = teacher
        self.num_tokens = num_tokens
        self.weighted = bool(weighted)
        self.dice_weight = float(dice_weight)

        features, levels = probe_levels(teacher, layers, example_input)
        freeze(teacher)
        self.layers: list[str] = list(levels)
        self.level_names: dict[str, list[str]] = levels
        self.level_tokens = nn.ModuleList(
            nn.ModuleList(
                ReceptiveTokens(features[name].shape[1], num_tokens, self.weighted).to(
                    features[name].device
                )
                for name in levels[path]
            )
            for path in self.layers
        )
        self._by_level: dict[str, ReceptiveTokens] = {
            name: tokens
            for path, group in zip(self.layers, self.level_tokens, strict=True)
            for name, tokens in zip(levels[path], group, strict=True)
        }
        self._taps = FeatureTaps(teacher, self.layers, replace=self._mask_level)
        self._dice: dict[str, Tensor] = {}
        self.train(self.training)

    def train(self, mode: bool = True) -> TokenLearner:
        """Set the mode; with ``teacher_mode="eval"`` the teacher's norms/dropout stay in eval."""
        super().train(mode)
        if self.teacher_mode == "eval":
            keep_normalization_eval(self.teacher)
        return self

    def tokens(self) -> dict[str, list[ReceptiveTokens]]:
        """The learned tokens: ``{layer path: [ReceptiveTokens per level, in output order]}``."""
        return {
            path: list(group) for path, group in zip(self.layers, self.level_tokens, strict=True)
        }

    def _mask_level(self, name: str, x: Tensor) -> Tensor:
        tokens = self._by_level.get(name)
        if tokens is None:
            raise UserValueError(
                f"teacher level {name!r} did not exist in the dry run (levels: "
                f"{list(self._by_level)}); the layer's output structure changed"
            )
        masked, masks = tokens.mask_features(x, return_masks=True)
        self._dice[name] = dice_diversity(masks)
        return masked

    def forward(self, images: Any, targets: Any = None) -> Any:
        """Run the teacher on masked features.

        Training mode: returns the teacher's task losses plus ``loss_dice`` (a dict of scalars
        to be summed). Eval mode: returns the teacher's predictions on masked features.
        """
        self._dice = {}
        try:
            with self._taps:
                if self.training:
                    out = self.teacher(images, targets)
                else:
                    out = self.teacher(images) if targets is None else self.teacher(images, targets)
            missing = [n for n in self._by_level if n not in self._dice]
            if missing:
                raise UserRuntimeError(f"teacher levels {missing} were not produced by the forward")
            if not self.training:
                return out
            if not isinstance(out, dict):
                raise UserTypeError(
                    "in training mode the teacher must return a dict of losses, got "
                    f"{type(out).__name__}; wrap segmenters in maskd.SegmentationTask"
                )
            if "loss_dice" in out:
                raise UserValueError("the teacher's losses already contain a 'loss_dice' entry")
            losses = dict(out)
            losses["loss_dice"] = self.dice_weight * sum(self._dice.values())
            return losses
        finally:
            self._dice = {}
            self._taps.clear()
