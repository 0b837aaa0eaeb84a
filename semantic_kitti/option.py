"""The typed, validated view of the YAML (the reference's `Option`): `Option(cfg)` checks every value the trainers
rely on and raises a one-line ConfigError naming the key; the full dict stays available as `.config`."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from common.config import ConfigError
from common.kd import available_losses
from common.kd.base import loss_class

HERE = Path(__file__).resolve().parent
STAGES = ("teacher", "student", "both")
TEACHER_NETS = ("CameraNet", "PMFNet")
STUDENT_NETS = ("LidarNet",)
OPTIMIZERS = ("sgd", "adamw")


def _pair(cfg, key, *, multiple: int = 1, positive: bool = True) -> tuple[int, int]:
    v = cfg
    for k in key.split("."):
        v = v[k]
    if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
        raise ConfigError(f"{key}: expected two integers [h, w], got {v!r}")
    if positive and min(v) <= 0 or any(x % multiple for x in v):
        raise ConfigError(f"{key}: expected positive sizes divisible by {multiple}, got {v}")
    return int(v[0]), int(v[1])


def parse_gpus(gpu) -> list[int] | None:
    """"0,1" → [0, 1]; "cpu" → None."""
    text = str(gpu).strip().lower()
    if text == "cpu":
        return None
    try:
        ids = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"gpu: expected a comma-separated list of GPU ids (e.g. \"0,1\") or \"cpu\", got {gpu!r}") \
            from None
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
        raise ConfigError(f"gpu: expected distinct non-negative GPU ids or \"cpu\", got {gpu!r}")
    return ids


@dataclass
class Option:
    config: dict
    stage: str = field(init=False)
    gpus: list[int] | None = field(init=False)
    train_crop: tuple[int, int] = field(init=False)
    val_size: tuple[int, int] = field(init=False)
    label_config: Path = field(init=False)

    def __post_init__(self):
        c = self.config
        if c["stage"] not in STAGES:
            raise ConfigError(f"stage: expected one of {', '.join(STAGES)}, got {c['stage']!r}")
        self.stage = c["stage"]
        self.gpus = parse_gpus(c["gpu"])
        self.train_crop = _pair(c, "data.train_crop", multiple=16)
        self.val_size = _pair(c, "data.val_size", multiple=16)
        pad = _pair(c, "data.pad", positive=False)
        if min(pad) < 0 or 2 * pad[0] >= min(self.train_crop[0], self.val_size[0]) or \
                2 * pad[1] >= min(self.train_crop[1], self.val_size[1]):
            raise ConfigError(f"data.pad: expected 0 ≤ 2·pad < the crop sizes, got {list(pad)}")
        for key in ("mean", "std"):
            v = c["data"][key]
            if len(v) != 5 or not all(isinstance(x, (int, float)) for x in v):
                raise ConfigError(f"data.{key}: expected 5 numbers (depth, x, y, z, intensity), got {v!r}")
        if any(s <= 0 for s in c["data"]["std"]):
            raise ConfigError(f"data.std: expected positive values, got {c['data']['std']}")
        if not 0 <= c["data"]["hflip"] <= 1:
            raise ConfigError(f"data.hflip: expected a probability in [0, 1], got {c['data']['hflip']}")
        if len(c["data"]["color_jitter"]) != 3:
            raise ConfigError("data.color_jitter: expected [brightness, contrast, saturation]")
        bs = c["batch_size"]
        if not (isinstance(bs, list) and len(bs) == 2 and all(isinstance(b, int) and b > 0 for b in bs)):
            raise ConfigError(f"batch_size: expected [train, val] positive integers, got {bs!r}")
        for key in ("n_epochs", "val_frequency", "log_every", "print_frequency"):
            if c[key] < 1:
                raise ConfigError(f"{key}: expected ≥ 1, got {c[key]}")
        for key in ("iters_per_epoch", "val_iters", "n_threads", "threads"):
            if c[key] < 0:
                raise ConfigError(f"{key}: expected ≥ 0, got {c[key]}")
        if c["nclasses"] < 2:
            raise ConfigError(f"nclasses: expected ≥ 2, got {c['nclasses']}")
        if not c["train_sequences"] or not c["val_sequences"]:
            raise ConfigError("train_sequences / val_sequences: expected non-empty lists of sequence numbers")
        if c["teacher"]["net"] not in TEACHER_NETS:
            raise ConfigError(f"teacher.net: expected one of {', '.join(TEACHER_NETS)}, got {c['teacher']['net']!r}")
        if c["student"]["net"] not in STUDENT_NETS:
            raise ConfigError(f"student.net: expected one of {', '.join(STUDENT_NETS)}, got {c['student']['net']!r}")
        for role in ("teacher", "student"):
            r = c[role]
            if r["optimizer"] not in OPTIMIZERS:
                raise ConfigError(f"{role}.optimizer: expected one of {', '.join(OPTIMIZERS)}, got {r['optimizer']!r}")
            if r["lr"] <= 0:
                raise ConfigError(f"{role}.lr: expected > 0, got {r['lr']}")
        if c["student"]["base_channels"] < 4 or c["teacher"]["base_channels"] < 4:
            raise ConfigError("base_channels: expected ≥ 4")
        kd = c["kd"]
        if kd["kd_loss"] not in available_losses():
            raise ConfigError(f"kd.kd_loss: unknown loss {kd['kd_loss']!r}; available: {', '.join(available_losses())}")
        if not getattr(loss_class(kd["kd_loss"]), "per_sample", False) or kd["kd_loss"] in ("ce", "fitnet"):
            raise ConfigError(f"kd.kd_loss: {kd['kd_loss']!r} is not a per-pixel distillation term "
                              f"(use kl, dkd, js, mse or cosine)")
        if kd["kd_weight"] < 0:
            raise ConfigError(f"kd.kd_weight: expected ≥ 0, got {kd['kd_weight']}")
        if kd["mask"] not in ("none", "omega"):
            raise ConfigError(f"kd.mask: expected none or omega, got {kd['mask']!r}")
        if kd["omega"].get("space", "probs") not in ("logits", "probs"):
            raise ConfigError(f"kd.omega.space: expected logits or probs, got {kd['omega']['space']!r}")
        if kd["teacher_output"] not in ("camera", "lidar"):
            raise ConfigError(f"kd.teacher_output: expected camera or lidar, got {kd['teacher_output']!r}")
        if c["train"]["grad_clip"] < 0 or c["train"]["warmup_epochs"] < 0:
            raise ConfigError("train.grad_clip / train.warmup_epochs: expected ≥ 0")
        self.label_config = Path(c["label_config"]) if c["label_config"] else HERE / "semantic-kitti.yaml"

    def __getattr__(self, key):  # flat read access to the top-level YAML keys (opt.n_epochs, opt.data_root, ...)
        config = self.__dict__.get("config", {})
        if key in config:
            return config[key]
        raise AttributeError(key)

    @property
    def parity(self) -> bool:
        return bool(self.config["parity"])

    def experiment_dir(self, role: str, world_size: int) -> Path:
        """<save_path>/log_<dataset>_<net>_bs<B·world>-lr<lr>_<id>, as the reference's Option."""
        c, r = self.config, self.config[role]
        net = f"{r['net']}-{c['teacher']['image_backbone']}" if role == "teacher" else f"{r['net']}-b{r['base_channels']}"
        eid = datetime.now().strftime("%Y%m%d-%H%M%S") if c["experiment_id"] == "timestamp" else c["experiment_id"]
        return Path(c["save_path"]) / f"log_{c['dataset']}_{net}_bs{c['batch_size'][0] * world_size}-lr{r['lr']}_{eid}"
