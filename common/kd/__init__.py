"""KD losses registered by name. ``build_loss(name, **kwargs)``; ``available_losses()`` lists them."""
from common.kd.base import DistillLoss, available_losses, build_loss, register
from common.kd import logit, feature, relational, crd  # noqa: F401  (registers the losses)
from common.kd.objective import CrossEntropy, Objective, build_objective, method_objective

__all__ = ["DistillLoss", "Objective", "CrossEntropy", "available_losses", "build_loss", "build_objective",
           "method_objective", "register"]
