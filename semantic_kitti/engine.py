"""What the teacher and student trainers share (the reference's `Experiment` + `Recorder`): the experiment directory,
data loaders with DDP samplers, optimiser + per-iteration warm-up/cosine schedule, AMP / channels_last, the epoch loop
with resume, validation with an all-reduced confusion matrix, best checkpoints per metric and TensorBoard logs.

A trainer subclass provides `build_model()`, `model_name` and `step(batch, train)` → (loss, {part: value}, logits).
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from common import ddp
from common.config import ConfigError, DataError
from common.metrics import ConfusionMatrix
from common.run import RunDir, copy_code, load_checkpoint, load_training_state, save_training_state
from common.schedules import warmup_cosine
from semantic_kitti import data as D
from semantic_kitti.option import HERE, Option

METRICS = ("IOU", "Precision", "Recall")


class ShardSampler(Sampler):
    """Rank r takes items r, r + W, r + 2W, ...: every val frame counted exactly once (DistributedSampler pads with
    duplicates, spec §12 bug 69)."""

    def __init__(self, n: int, rank: int, world: int):
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def make_run_dir(path: Path, resume: bool, main: bool) -> RunDir:
    """Rank 0 creates `path` (`_1`, `_2`, ... if taken) or reopens it to resume; the others get a disabled RunDir."""
    if main and not resume:
        base, i = path, 0
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                path.mkdir()
                break
            except FileExistsError:
                i += 1
                path = base.with_name(f"{base.name}_{i}")
    path = Path(ddp.broadcast_object(str(path)))
    if not main:
        return RunDir(path, enabled=False)
    return RunDir.open(path) if resume else RunDir(path)


def colorize(labels: np.ndarray, colors: np.ndarray) -> np.ndarray:
    return colors[np.clip(labels, 0, len(colors) - 1)]


class Trainer:
    role = "student"          # the config section holding net / optimiser settings

    def __init__(self, opt: Option, device: torch.device, log_prefix: str = ""):
        self.opt, self.cfg, self.device = opt, opt.config, device
        self.env = ddp.dist_env()
        self.world = ddp.world_size()
        self.cuda = device.type == "cuda"
        self.prefix = log_prefix
        self.labels = D.load_label_config(opt.label_config)
        if self.labels.nclasses != self.cfg["nclasses"]:
            raise ConfigError(f"nclasses: {self.cfg['nclasses']} but {opt.label_config} defines "
                              f"{self.labels.nclasses} learning classes")
        self.eval_classes = [c for c in range(self.labels.nclasses) if c not in self.labels.ignore]
        resume = bool(self.cfg["checkpoint"])
        path = Path(self.cfg["checkpoint"]).resolve().parent.parent if resume else \
            opt.experiment_dir(self.role, self.world)
        if resume and not Path(self.cfg["checkpoint"]).is_file():
            raise DataError(f"{self.cfg['checkpoint']}: checkpoint (to resume from) not found")
        self.rd = make_run_dir(path, resume, ddp.is_main())
        if ddp.is_main():
            copy_code(HERE, self.rd.code_dir)
            from common.config import save_yaml
            save_yaml(self.cfg, self.rd.log_dir / "config.yaml")
        self.log = self.rd.log
        self.log(f"{self.prefix}experiment directory {self.rd.path} ({self.world} process(es), device {device})")
        self._build_data()
        self.model = self.build_model().to(device)
        if self.cfg["pretrained_model"]:
            self._load_pretrained(self.cfg["pretrained_model"])
        if self.cuda and self.cfg["train"]["channels_last"]:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.net = ddp.wrap_model(self.model, device, find_unused_parameters=False,
                                  sync_bn=self.cfg["train"]["sync_bn"] and self.cuda)
        self.optimizer = self._optimizer(self.parameters())
        total = self.iters * max(1, self.cfg["n_epochs"] - (1 if opt.parity else 0))
        self.scheduler = warmup_cosine(self.optimizer, int(self.cfg["train"]["warmup_epochs"] * self.iters), total,
                                       self.cfg["train"]["min_lr_ratio"])
        self.start_epoch, self.best = 0, {m: -1.0 for m in METRICS}
        self.history: list[dict] = []
        if resume:
            ckpt = load_training_state(self.cfg["checkpoint"], model=self.model, optimizer=self.optimizer,
                                       scheduler=self.scheduler, map_location=device)
            self.start_epoch = int(ckpt["epoch"]) + 1
            self.best = dict(ckpt.get("best", self.best))
            self.history = list(ckpt.get("history", []))
            self.log(f"{self.prefix}resumed from {self.cfg['checkpoint']} at epoch {self.start_epoch + 1}")
        if not self.cuda and (self.cfg["train"]["amp"] or self.cfg["train"]["channels_last"]):
            self.log(f"{self.prefix}CPU run: bf16 autocast and channels_last are GPU switches, left off")

    # -- pieces a subclass provides ---------------------------------------------------------------------------
    model_name = "model"

    def build_model(self) -> torch.nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def parameters(self):
        return list(self.model.parameters())

    def step(self, batch, train: bool):  # pragma: no cover - abstract
        raise NotImplementedError

    # -- setup ------------------------------------------------------------------------------------------------
    def _build_data(self):
        c = self.cfg
        zbuf = c["data"]["zbuffer"] and not self.opt.parity
        self.train_set = D.PerspectiveViewDataset(c["data_root"], c["train_sequences"], self.labels, c["data"], True,
                                                  seed=c["seed"], zbuffer=zbuf, has_label=c["has_label"])
        self.val_set = D.PerspectiveViewDataset(c["data_root"], c["val_sequences"], self.labels, c["data"], False,
                                                seed=c["seed"], zbuffer=zbuf, has_label=c["has_label"])
        bs_train, bs_val = c["batch_size"]
        self.train_sampler = ddp.make_sampler(self.train_set, shuffle=True, drop_last=True, seed=c["seed"])
        val_sampler = ShardSampler(len(self.val_set), ddp.rank(), self.world) if self.world > 1 else None
        common = dict(num_workers=c["n_threads"], pin_memory=self.cuda, persistent_workers=c["n_threads"] > 0)
        g = torch.Generator().manual_seed(c["seed"])
        self.train_loader = DataLoader(self.train_set, bs_train, shuffle=self.train_sampler is None,
                                       sampler=self.train_sampler, drop_last=True, generator=g, **common)
        self.val_loader = DataLoader(self.val_set, bs_val, shuffle=False, sampler=val_sampler, **common)
        if len(self.train_loader) == 0:
            raise DataError(f"{c['data_root']}: {len(self.train_set)} training frames give no full batch of "
                            f"{bs_train} per process ({self.world} process(es))")
        self.iters = len(self.train_loader)
        if c["iters_per_epoch"]:
            self.iters = min(self.iters, c["iters_per_epoch"])

    def _optimizer(self, params):
        r = self.cfg[self.role]
        if r["optimizer"] == "sgd":
            return torch.optim.SGD(params, lr=r["lr"], momentum=r["momentum"], nesterov=r["nesterov"],
                                   weight_decay=r["weight_decay"])
        return torch.optim.AdamW(params, lr=r["lr"], weight_decay=r["weight_decay"])

    def _load_pretrained(self, path):
        state = load_checkpoint(path, self.device)
        state = state.get("model", state) if isinstance(state, dict) else state
        own = self.model.state_dict()
        keep = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        self.model.load_state_dict(keep, strict=False)
        self.log(f"{self.prefix}pretrained_model {path}: {len(keep)} of {len(own)} tensors loaded (key and size match)")

    def autocast(self):
        if self.cuda and self.cfg["train"]["amp"]:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def to_device(self, batch):
        features, mask, label = (t.to(self.device, non_blocking=True) for t in batch)
        if self.cuda and self.cfg["train"]["channels_last"]:
            features = features.contiguous(memory_format=torch.channels_last)
        return features, mask, label

    # -- loops ------------------------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict:
        self.net.train()
        ddp.set_epoch(self.train_sampler, epoch)
        self.train_set.set_epoch(epoch)
        cm = ConfusionMatrix(self.labels.nclasses, self.labels.ignore, self.device)
        sums: dict[str, float] = {}
        n, started = 0, time.perf_counter()
        clip = self.cfg["train"]["grad_clip"]
        for i, batch in enumerate(self.train_loader):
            if i >= self.iters:
                break
            features, mask, label = self.to_device(batch)
            with self.autocast():
                loss, parts, logits = self.step((features, mask, label), train=True)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(self.parameters(), clip)
            self.optimizer.step()
            self.scheduler.step()
            valid = label > 0
            cm.update(logits.detach().argmax(1)[valid], label[valid])
            parts = {"Loss": float(loss.detach()), **{k: float(v) for k, v in parts.items()}}
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
            if (i + 1) % self.cfg["log_every"] == 0 or i + 1 == self.iters:
                rate = (time.perf_counter() - started) / n
                self.log(f"{self.prefix}>>> Train E[{epoch + 1}|{self.cfg['n_epochs']}] I[{i + 1}|{self.iters}] "
                         f"LR {self.scheduler.get_last_lr()[0]:.3e} "
                         + " ".join(f"{k} {v:.4f}" for k, v in parts.items())
                         + f" RT {rate * (self.iters - i - 1):.1f}s")
        cm.all_reduce()
        out = {k: float(ddp.all_reduce_mean(torch.tensor(v / max(n, 1)))) for k, v in sums.items()}
        out.update(self._scores(cm))
        out["lr"] = self.scheduler.get_last_lr()[0]
        return out

    @torch.no_grad()
    def validate(self, epoch: int) -> dict:
        self.net.eval()
        cm = ConfusionMatrix(self.labels.nclasses, self.labels.ignore, self.device)
        sums: dict[str, float] = {}
        n, first = 0, None
        for i, batch in enumerate(self.val_loader):
            if self.cfg["val_iters"] and i >= self.cfg["val_iters"]:
                break
            features, mask, label = self.to_device(batch)
            with self.autocast():
                loss, parts, logits = self.step((features, mask, label), train=False)
            valid = label > 0
            pred = logits.argmax(1)
            cm.update(pred[valid], label[valid])
            for k, v in {"Loss": float(loss), **{k: float(v) for k, v in parts.items()}}.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
            if first is None:
                first = (features[0].float().cpu(), pred[0].cpu(), label[0].cpu())
        local_pixels = int(cm.mat.sum())
        cm.all_reduce()
        counts = torch.tensor([float(n)], device=self.device)
        total_batches = float(ddp.all_reduce_sum(counts))
        out = {k: float(ddp.all_reduce_sum(torch.tensor([v], device=self.device))) / max(total_batches, 1)
               for k, v in sums.items()}
        out.update(self._scores(cm))
        out["pixels"] = int(cm.mat.sum())
        out["pixels_per_rank"] = ddp.all_gather_object(local_pixels)
        out["confusion"] = cm.mat.cpu().tolist()
        if first is not None and epoch % self.cfg["print_frequency"] == 0:
            self._images(epoch, *first)
        return out

    def _scores(self, cm: ConfusionMatrix) -> dict:
        cls = self.eval_classes
        iou, prec, rec = cm.iou()[cls], cm.precision()[cls], cm.recall()[cls]
        return {"IOU": cm.mean_iou(cls), "Precision": float(torch.nanmean(prec)), "Recall": float(torch.nanmean(rec)),
                "PixelAcc": cm.pixel_accuracy(),
                "per_class": {self.labels.names[c]: {"IOU": float(iou[k]), "Precision": float(prec[k]),
                                                     "Recall": float(rec[k])} for k, c in enumerate(cls)}}

    def _images(self, epoch, features, pred, label):
        if not self.rd.enabled:
            return
        colors = self.labels.colors
        w = self.rd.writer
        w.add_image(f"{self.prefix.strip() or 'val'}/rgb", features[5:8].clamp(0, 1), epoch)
        w.add_image(f"{self.prefix.strip() or 'val'}/pcd_depth", (features[0:1] - features[0].min()) /
                    (features[0].max() - features[0].min() + 1e-6), epoch)
        w.add_image(f"{self.prefix.strip() or 'val'}/prediction",
                    torch.from_numpy(colorize(pred.numpy() * (label.numpy() > 0), colors)).permute(2, 0, 1), epoch)
        w.add_image(f"{self.prefix.strip() or 'val'}/label",
                    torch.from_numpy(colorize(label.numpy(), colors)).permute(2, 0, 1), epoch)

    def per_class_table(self, r: dict) -> str:
        lines = [f"{'class':<14} {'IoU':>7} {'Precision':>10} {'Recall':>7}"]
        for name, v in r["per_class"].items():
            lines.append(f"{name:<14} {v['IOU']:7.4f} {v['Precision']:10.4f} {v['Recall']:7.4f}")
        lines.append(f"{'mean':<14} {r['IOU']:7.4f} {r['Precision']:10.4f} {r['Recall']:7.4f}")
        return "\n".join(lines)

    def _scalars(self, mode: str, r: dict, epoch: int):
        for k in ("Loss", "LossFocal", "LossLovasz", "LossKD", "LossPerception", "lr"):
            if k in r:
                self.rd.scalar(f"{mode}_{k}", r[k], epoch)
        for m in METRICS:
            self.rd.scalar(f"{mode}_mean{m}", r[m], epoch)
        for i, (name, v) in enumerate(r["per_class"].items()):
            for m in METRICS:
                if np.isfinite(v[m]):
                    self.rd.scalar(f"{mode}_{self.eval_classes[i]:02d}_{name}_{m}", v[m], epoch)

    def save_best(self, r: dict) -> list[str]:
        saved = []
        for m in METRICS:
            value = r[m] if np.isfinite(r[m]) else -1.0
            if value >= self.best[m]:
                self.best[m] = value
                self.rd.save_checkpoint(ddp.unwrap(self.net).state_dict(), f"best_{m}_model.pth")
                saved.append(m)
        return saved

    def run(self) -> dict:
        """Train (or only validate with val_only) and return the summary of the run."""
        started = time.perf_counter()
        c = self.cfg
        if c["val_only"]:
            r = self.validate(0)
            self.log(f"{self.prefix}>>> Val Loss {r['Loss']:.4f} IOU {r['IOU']:.4f} Precision {r['Precision']:.4f} "
                     f"Recall {r['Recall']:.4f}\n{self.per_class_table(r)}")
            return self._summary([], r, time.perf_counter() - started)
        last_val = None
        for epoch in range(self.start_epoch, c["n_epochs"]):
            tr = self.train_epoch(epoch)
            self._scalars("Train", tr, epoch)
            self.log(f"{self.prefix}>>> Train E[{epoch + 1}|{c['n_epochs']}] Loss {tr['Loss']:.4f} IOU {tr['IOU']:.4f} "
                     f"Precision {tr['Precision']:.4f} Recall {tr['Recall']:.4f}")
            row = {"epoch": epoch + 1, "train_loss": tr["Loss"], "train_iou": tr["IOU"], "lr": tr["lr"],
                   **{f"train_{k}": tr[k] for k in tr if k.startswith("Loss") and k != "Loss"}}
            if (epoch + 1) % c["val_frequency"] == 0 or epoch + 1 == c["n_epochs"]:
                last_val = self.validate(epoch)
                self._scalars("Val", last_val, epoch)
                saved = self.save_best(last_val)
                self.log(f"{self.prefix}>>> Val E[{epoch + 1}|{c['n_epochs']}] Loss {last_val['Loss']:.4f} "
                         f"IOU {last_val['IOU']:.4f} Precision {last_val['Precision']:.4f} Recall "
                         f"{last_val['Recall']:.4f} ({last_val['pixels']} pixels, all ranks)"
                         f"{' new best ' + ', '.join(saved) if saved else ''}\n{self.per_class_table(last_val)}")
                row.update({"val_loss": last_val["Loss"], "val_iou": last_val["IOU"],
                            "val_precision": last_val["Precision"], "val_recall": last_val["Recall"],
                            **{f"val_{k}": last_val[k] for k in last_val if k.startswith("Loss") and k != "Loss"}})
            self.history.append(row)
            if ddp.is_main():
                save_training_state(self.rd.checkpoint_dir / "checkpoint.pth", model=self.net,
                                    optimizer=self.optimizer, scheduler=self.scheduler, epoch=epoch, best=self.best,
                                    history=self.history)
            self.log(f"{self.prefix}>>> Best Result: " + " ".join(f"{m} {v:.4f}" for m, v in self.best.items()))
        ddp.barrier()
        seconds = time.perf_counter() - started
        self.log(f"{self.prefix}total cost time {seconds:.1f} s")
        return self._summary(self.history, last_val, seconds)

    def _summary(self, history, last_val, seconds) -> dict:
        s = {"role": self.role, "net": self.model_name, "experiment_dir": str(self.rd.path), "world_size": self.world,
             "best": self.best, "history": history, "seconds": seconds, "last_val": last_val,
             "iters_per_epoch": self.iters,
             "best_checkpoint": str(self.rd.checkpoint_dir / "best_IOU_model.pth")}
        self.rd.write_summary(s)
        self.rd.close()
        return s
