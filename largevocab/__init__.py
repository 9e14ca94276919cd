"""largevocab: memory-efficient losses for huge output vocabularies (LLMs and recommenders).

The N x V logits of the output layer are never materialised: see :func:`linear_cross_entropy`.
"""

from .cross_entropy import LinearCrossEntropyLoss, linear_cross_entropy, linear_cross_entropy_with_lse
from .distillation import linear_distillation_loss
from .log_probs import linear_argmax, linear_log_probs
from .mlet import FactorizedEmbedding
from .sampled import SampledCrossEntropyLoss, sample_negatives, sampled_cross_entropy
from .scalable import ScalableCrossEntropyLoss, scalable_cross_entropy

__version__ = "0.1.0"

__all__ = [
    "FactorizedEmbedding",
    "LinearCrossEntropyLoss",
    "SampledCrossEntropyLoss",
    "ScalableCrossEntropyLoss",
    "linear_argmax",
    "linear_cross_entropy",
    "linear_cross_entropy_with_lse",
    "linear_distillation_loss",
    "linear_log_probs",
    "sample_negatives",
    "sampled_cross_entropy",
    "scalable_cross_entropy",
]
