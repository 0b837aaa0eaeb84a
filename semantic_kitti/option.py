"""The typed view of the YAML (the reference's `Option`, semanticKITTI/option.py): `Option(cfg)` checks what the
declared `_checks` cannot (shapes, divisibility, relations) and raises a one-line ConfigError naming the key; the
full dict stays available as `.config`."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from common.config import ConfigError

HERE = Path(__file__).resolve().parent


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
        """What the declared `_checks` of config_server_kitti.yaml cannot say: shapes, divisibility, relations."""
        c = self.config
        self.stage = c["stage"]
        self.gpus = parse_gpus(c["gpu"])
        self.train_crop = _pair(c, "data.train_crop", multiple=16)
        self.val_size = _pair(c, "data.val_size", multiple=16)
        pad = _pair(c, "data.pad", positive=False)
        if 2 * pad[0] >= min(self.train_crop[0], self.val_size[0]) or \
                2 * pad[1] >= min(self.train_crop[1], self.val_size[1]):
            raise ConfigError(f"data.pad: expected 0 ≤ 2·pad < the crop sizes, got {list(pad)}")
        for key in ("mean", "std"):
            v = c["data"][key]
            if len(v) != 5 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
                raise ConfigError(f"data.{key}: expected 5 numbers (depth, x, y, z, intensity), got {v!r}")
        if len(c["data"]["color_jitter"]) != 3:
            raise ConfigError("data.color_jitter: expected [brightness, contrast, saturation]")
        bs = c["batch_size"]
        if not (len(bs) == 2 and all(isinstance(b, int) and not isinstance(b, bool) for b in bs)):
            raise ConfigError(f"batch_size: expected [train, val] positive integers, got {bs!r}")
        if not c["train_sequences"] or not c["val_sequences"]:
            raise ConfigError("train_sequences / val_sequences: expected non-empty lists of sequence numbers")
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
