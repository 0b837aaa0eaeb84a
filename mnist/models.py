"""The reference's MLP (NTDH MNIST/network/LR_3.py, `MLP`): in → 1024 → 256 → 10 with LeakyReLU, as named layers
so that Algorithm 1's interventions are forward hooks (common.saliency) rather than a `change_type` argument
threaded through forward.

Places (the reference's `--place`): 0 = the input, 1 = output of the first LeakyReLU (`act1`, 1024-d), 2 = output of
the second (`act2`, 256-d), 3 = the logits (`fc3`, or `act3` when the parity LeakyReLU on the logits is on).
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn

from common.config import ConfigError, DataError
from common.run import load_checkpoint


class MLP(nn.Module):
    def __init__(self, input_dim: int, hidden: tuple[int, ...] | list[int] = (1024, 256), num_classes: int = 10,
                 negative_slope: float = 0.01, logit_activation: bool = False):
        super().__init__()
        if len(hidden) != 2 or min(hidden) < 1:
            raise ConfigError(f"model.hidden: expected two positive layer sizes, got {list(hidden)}")
        self.input_dim, self.hidden, self.num_classes = input_dim, list(hidden), num_classes
        self.fc1 = nn.Linear(input_dim, hidden[0])
        self.act1 = nn.LeakyReLU(negative_slope)
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.act2 = nn.LeakyReLU(negative_slope)
        self.fc3 = nn.Linear(hidden[1], num_classes)
        # LR_3.py applies LeakyReLU to the output logits too; here only with parity.
        self.act3 = nn.LeakyReLU(negative_slope) if logit_activation else nn.Identity()
        self.logit_activation = logit_activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.act3(self.fc3(self.act2(self.fc2(self.act1(self.fc1(x))))))

    def place_name(self, place: int) -> str:
        """The hook point of a reference place number."""
        names = {0: "input", 1: "act1", 2: "act2", 3: "act3" if self.logit_activation else "fc3"}
        if place not in names:
            raise ConfigError(f"place: expected 0 (input), 1, 2 or 3 (logits), got {place}")
        return names[place]

    def feature_dim(self, place: int) -> int:
        """Channels at a place (the reference's get_feature_dim, without its place-0 bug)."""
        self.place_name(place)
        return [self.input_dim, *self.hidden, self.num_classes][place]

    def spec(self) -> dict:
        return {"input_dim": self.input_dim, "hidden": self.hidden, "num_classes": self.num_classes,
                "negative_slope": self.act1.negative_slope, "logit_activation": self.logit_activation}


def state_hash(model: nn.Module) -> str:
    """The identity of a model's weights: sha256 over its state_dict (names, dtypes, shapes and values, in name order).
    Equal for the same weights wherever they were saved or loaded."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        a = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{a.dtype}|{tuple(a.shape)}|".encode())
        h.update(a.numpy().tobytes())
    return h.hexdigest()


def first_nonfinite(array: np.ndarray) -> tuple[int, ...] | None:
    """The index of the first NaN / inf entry of `array` (row-major), or None when all are finite."""
    bad = np.argwhere(~np.isfinite(array))
    return tuple(int(i) for i in bad[0]) if len(bad) else None


def save_model(rd, model: MLP, name: str, **extra):
    return rd.save_checkpoint({"spec": model.spec(), "state_dict": model.state_dict(), **extra}, name)


def load_model(path, device) -> tuple[MLP, dict]:
    """An MLP saved by `save_model`; DataError naming the file when it is not one."""
    ckpt = load_checkpoint(path, map_location="cpu")
    if not isinstance(ckpt, dict) or "spec" not in ckpt or not isinstance(ckpt.get("state_dict"), dict):
        have = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise DataError(f"{path}: expected an mnist MLP checkpoint with keys 'spec' and 'state_dict', got {have}")
    for name, tensor in ckpt["state_dict"].items():
        if torch.is_tensor(tensor) and tensor.is_floating_point():
            where = first_nonfinite(tensor.detach().cpu().float().numpy())
            if where is not None:
                raise DataError(f"{path}: state_dict['{name}'] holds a non-finite value (NaN/inf), first at index "
                                f"{where}")
    model = MLP(**ckpt["spec"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise DataError(f"{path}: state_dict does not match its spec ({str(e).splitlines()[0]})") from None
    return model.to(device), ckpt
