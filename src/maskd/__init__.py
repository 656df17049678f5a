"""maskd: Masked Distillation with Receptive Tokens (MasKD) for any PyTorch model."""

from maskd.distiller import Distiller
from maskd.learner import TokenLearner
from maskd.losses import MasKDLoss, dice_diversity, masked_distillation_loss
from maskd.taps import FeatureTaps
from maskd.tasks import SegmentationTask
from maskd.terms import MaskdTerm, total_loss
from maskd.token_io import load_official_tokens, load_tokens, save_tokens
from maskd.tokens import ReceptiveTokens

__version__ = "0.1.0"

__all__ = [
    "Distiller",
    "FeatureTaps",
    "MasKDLoss",
    "MaskdTerm",
    "ReceptiveTokens",
    "SegmentationTask",
    "TokenLearner",
    "__version__",
    "dice_diversity",
    "load_official_tokens",
    "load_tokens",
    "masked_distillation_loss",
    "save_tokens",
    "total_loss",
]
