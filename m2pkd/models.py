"""The networks of MMPKD models_kd.py: VGG19-BN visual CNN + fc → GRU → linear head (`CNN_LSTM_s`: student and
baseline); the teacher (`CNN_LSTM_Teacher`) adds a ResNet18 on the spectrogram image, concatenated per frame after
the GRU. Heads have no activations, as the reference's.

Both models return {"out": (B, T), "embed": (B, T, embed_dim), "h": final GRU state}.
"""
from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.models.vgg import cfgs as VGG_CFGS, make_layers

from pathlib import Path

from common.config import ConfigError, DataError
from common.run import load_checkpoint


def vgg19_bn_features(width_div: int = 1) -> nn.Sequential:
    """torchvision's vgg19_bn `features` (conv-BN-ReLU ×16, 5 max-pools); width_div > 1 divides every channel count
    (same layout, for the CPU demo). With width_div = 1 the state dict keys match torchvision and the FER2013 VGG19."""
    cfg = [v if v == "M" else max(v // width_div, 4) for v in VGG_CFGS["E"]]
    return make_layers(cfg, batch_norm=True)


class VisualCNN(nn.Module):
    """Per-frame 512-d (visual_dim) feature: VGG19-BN features → AvgPool(1) → flatten → dropout → fc → dropout."""

    def __init__(self, m: dict):
        super().__init__()
        self.features = vgg19_bn_features(m["vgg_width_div"])
        with torch.no_grad():
            n = self.features(torch.zeros(1, 3, m["input_size"], m["input_size"])).numel()
        self.drop1 = nn.Dropout(m["dropout"])
        self.fc = nn.Linear(n, m["visual_dim"])
        self.drop2 = nn.Dropout(m["dropout"])

    def forward(self, x):  # (N, 3, S, S) → (N, visual_dim)
        return self.drop2(self.fc(self.drop1(self.features(x).flatten(1))))


class AudioCNN(nn.Module):
    """torchvision ResNet18 without its fc: 512-d per spectrogram. A 1-channel dB matrix is repeated to 3 channels
    (so ImageNet conv1 weights apply unchanged)."""

    def __init__(self, m: dict):
        super().__init__()
        self.net = torchvision.models.resnet18(weights=None)
        self.net.fc = nn.Identity()
        self.out_dim = 512

    def forward(self, x):
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net(x)


def _linear_chain(dims: list[int]) -> nn.ModuleList:
    return nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))


def _embed_index(head: list[int], embed_dim: int, key: str) -> int:
    if embed_dim not in head:
        raise ConfigError(f"model.{key}: expected a layer of width model.embed_dim={embed_dim}, got {head}")
    return head.index(embed_dim)


class VisualModel(nn.Module):
    """Visual-only model (baseline and student, `CNN_LSTM_s`)."""

    def __init__(self, m: dict):
        super().__init__()
        self.cnn = VisualCNN(m)
        self.gru = nn.GRU(m["visual_dim"], m["gru_hidden"], num_layers=1, batch_first=True)
        self.head = _linear_chain([m["gru_hidden"], *m["student_head"], 1])
        self.embed_at = _embed_index(list(m["student_head"]), m["embed_dim"], "student_head")

    def visual_features(self, frames):  # (B, T, 3, S, S) → (B, T, D)
        b, t = frames.shape[:2]
        return self.cnn(frames.flatten(0, 1)).view(b, t, -1)

    def temporal(self, feats, h=None):
        seq, h = self.gru(feats, h)
        x, embed = seq, None
        for i, layer in enumerate(self.head):
            x = layer(x)
            if i == self.embed_at:
                embed = x
        return {"out": x.squeeze(-1), "embed": embed, "h": h}

    def forward(self, frames, h=None, **_):
        return self.temporal(self.visual_features(frames), h)


class TeacherModel(nn.Module):
    """Audio + visual teacher (`CNN_LSTM_Teacher`): GRU(visual) → Linear(→1024) ‖ ResNet18(spec) → head."""

    def __init__(self, m: dict):
        super().__init__()
        self.cnn = VisualCNN(m)
        self.gru = nn.GRU(m["visual_dim"], m["gru_hidden"], num_layers=1, batch_first=True)
        self.vproj = nn.Linear(m["gru_hidden"], m["teacher_visual_dim"])
        self.audio = AudioCNN(m)
        self.head = _linear_chain([m["teacher_visual_dim"] + self.audio.out_dim, *m["teacher_head"], 1])
        self.embed_at = _embed_index(list(m["teacher_head"]), m["embed_dim"], "teacher_head")
        self.dedupe = m["audio_dedupe"]

    def visual_features(self, frames):
        b, t = frames.shape[:2]
        return self.cnn(frames.flatten(0, 1)).view(b, t, -1)

    def audio_features(self, specs, spec_idx):
        """specs (M, C, H, W) distinct spectrograms; spec_idx (B, T) → (B, T, 512). Without dedupe every frame's
        spectrogram goes through the CNN (the reference; changes BatchNorm batch statistics in training mode)."""
        if self.dedupe:
            return self.audio(specs)[spec_idx]
        return self.audio(specs[spec_idx.flatten()]).view(*spec_idx.shape, -1)

    def temporal(self, feats, afeats, h=None):
        seq, h = self.gru(feats, h)
        x = torch.cat([self.vproj(seq), afeats], -1)
        embed = None
        for i, layer in enumerate(self.head):
            x = layer(x)
            if i == self.embed_at:
                embed = x
        return {"out": x.squeeze(-1), "embed": embed, "h": h}

    def forward(self, frames, specs=None, spec_idx=None, h=None):
        return self.temporal(self.visual_features(frames), self.audio_features(specs, spec_idx), h)


def param_groups(model: nn.Module, t: dict) -> list[dict]:
    """Adam groups with the reference's three learning rates: visual CNN, GRU + heads, audio CNN."""
    groups = {"cnn": [], "rnn": [], "spec": []}
    for name, p in model.named_parameters():
        key = "cnn" if name.startswith("cnn.") else "spec" if name.startswith("audio.") else "rnn"
        groups[key].append(p)
    lrs = {"cnn": t["cnn_lr"], "rnn": t["rnn_lr"], "spec": t["cnn_spec_lr"]}
    return [{"params": v, "lr": lrs[k], "name": k} for k, v in groups.items() if v]


# ----------------------------------------------------------------------------------------------------------------
# local pretrained weights

IMAGENET = {"resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
            "vgg19_bn": (torchvision.models.vgg19_bn, torchvision.models.VGG19_BN_Weights.IMAGENET1K_V1)}


def imagenet_state_dict(arch: str) -> dict:
    """torchvision's ImageNet weights through its weights= API (downloaded once into the torch hub cache)."""
    build, weights = IMAGENET[arch]
    try:
        return build(weights=weights).state_dict()
    except Exception as e:  # no network, a damaged cache file: urllib / torch raise many types
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise DataError(f"{cache}: torchvision's {arch} ImageNet weights could neither be loaded nor downloaded "
                        f"({type(e).__name__}); put {weights.url} there, give a local checkpoint, or pass "
                        f"--allow-random-init") from None


def _state_dict(obj, path, key=None):
    if key and isinstance(obj, dict) and key in obj:
        obj = obj[key]
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict) or not any(torch.is_tensor(v) for v in obj.values()):
        raise DataError(f"{path}: expected a state dict{f' (or a dict with key {key!r})' if key else ''}")
    return {k.removeprefix("module."): v for k, v in obj.items() if torch.is_tensor(v)}


def load_visual_weights(cnn: VisualCNN, source) -> tuple[int, int]:
    """Copy VGG19-BN conv / BN weights into `cnn.features`; the classifier is dropped and fc stays random (as the
    reference, models_kd.py CNN_Backbone with strict=False). `source` is "imagenet" (torchvision's vgg19_bn) or
    the FER2013 VGG19 of WuJie1010/Facial-Expression-Recognition.Pytorch: a torch.save dict whose key 'net' holds
    the state dict (its `features.*` layout is vgg19_bn's; the reference's file is named PrivateTest_model.t7
    but is a torch.save file). Returns (loaded, total)."""
    if source == "imagenet":
        sd = imagenet_state_dict("vgg19_bn")
    else:
        try:
            obj = load_checkpoint(source)
        except DataError as e:
            raise DataError(f"{e} (expected a torch.save checkpoint: a dict with key 'net', as "
                            f"Facial-Expression-Recognition.Pytorch's PrivateTest_model.t7)") from None
        sd = _state_dict(obj, source, "net")
    sd = {k: v for k, v in sd.items() if k.startswith("features.")}
    own = cnn.state_dict()
    match = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    if not match:
        raise DataError(f"{source}: no 'features.*' tensor matches the VGG19-BN features (model.vgg_width_div must "
                        f"be 1)")
    cnn.load_state_dict(match, strict=False)
    return len(match), sum(1 for k in own if k.startswith("features."))


def load_audio_weights(audio: AudioCNN, source) -> tuple[int, int]:
    """ResNet18 weights (fc.* dropped): "imagenet" (torchvision's, as the reference's CNN_Spec_Backbone) or a
    local torchvision ResNet18 state dict."""
    raw = imagenet_state_dict("resnet18") if source == "imagenet" else load_checkpoint(source)
    sd = {k: v for k, v in _state_dict(raw, source, "state_dict").items() if not k.startswith("fc.")}
    own = audio.net.state_dict()
    bad = [k for k, v in sd.items() if k not in own or own[k].shape != v.shape]
    if bad or not sd:
        raise DataError(f"{source}: expected a torchvision ResNet18 state dict; unexpected or mismatched keys "
                        f"{bad[:5] or '(none found)'}")
    audio.net.load_state_dict(sd, strict=False)
    return len(sd), len([k for k in own if not k.startswith("fc.")])
