"""The training loop of both networks and the camera teacher's step (the reference's semanticKITTI/trainer.py; the
LiDAR student's step is in trainer_student.py), on the shared mechanics of common.train:

  - the training state (model, optimiser, scheduler, loader generator, selector, epoch log, RNG states) written
    atomically every `checkpoint_every` epochs; `--resume` continues a killed run from it;
  - a NaN / inf loss stops the run with one line naming epoch, step and term, the last checkpoint intact;
  - selection on the held-out val sequence (08, SemanticKITTI's validation split): the best epoch's weights are
    kept (`checkpoint/best_IOU_model.pth`), and at the end they are evaluated once more on it, for the summary and
    the NTD advisor's logits; best and last epoch are both logged and reported;
  - per-term losses and, for the ω-masked student, ω statistics per epoch (`<role>_log.csv`, TensorBoard).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from common import ddp, ntd
from common.config import ConfigError, DataError, save_yaml
from common.metrics import ConfusionMatrix
from common.run import copy_code, load_checkpoint
from common.schedules import warmup_cosine
from common.train import Checkpoint, EpochLog, Selector, check_finite, due
from semantic_kitti import data as D
from semantic_kitti import engine as E
from semantic_kitti import models
from semantic_kitti.losses import SegmentationLoss, perception_aware_loss
from semantic_kitti.option import HERE, Option

# what a run is: a resume that changes any of these is refused (common.train.check_resume_config)
IDENTITY_KEYS = ("teacher.net", "teacher.image_backbone", "teacher.base_channels", "teacher.imagenet_weights",
                 "student.net", "student.base_channels", "student.dropout", "data", "data_root", "train_sequences",
                 "val_sequences", "nclasses", "label_config", "has_label", "batch_size", "kd", "train.lambda",
                 "train.focal_gamma", "parity", "seed", "teacher_checkpoint")
NTD_ROWS = 200_000  # labelled pixels kept for the NTD advisor's logits, spread evenly over the val frames


def build_teacher(cfg: dict, log=print, weights: str | None = None) -> torch.nn.Module:
    """CameraNet on the RGB channels, or the PMFNet fusion; `weights` overrides teacher.imagenet_weights."""
    t = cfg["teacher"]
    w = t["imagenet_weights"] if weights is None else weights
    if t["net"] == "PMFNet":
        return models.PMFNet(5, 3, cfg["nclasses"], t["base_channels"], t["image_backbone"], w, log=log)
    return models.CameraNet(3, cfg["nclasses"], t["image_backbone"], w, log=log)


def teacher_logits(model, features, cfg: dict):
    """The teacher's logits used for metrics / distillation: CameraNet's map, or PMFNet's head named by
    kd.teacher_output. Returns (logits, all heads)."""
    if cfg["teacher"]["net"] == "PMFNet":
        lidar, camera = model(features[:, 0:5], features[:, 5:8])
        return (camera if cfg["kd"]["teacher_output"] == "camera" else lidar), (lidar, camera)
    out = model(features[:, 5:8])
    return out, (out,)


class Trainer:
    role = "student"          # the config section holding net / optimiser settings
    ntd_role: str | None = None

    def __init__(self, opt: Option, device: torch.device, log_prefix: str = "", resume: Path | None = None):
        self.opt, self.cfg, self.device = opt, opt.config, device
        self.world, self.cuda, self.prefix = ddp.world_size(), device.type == "cuda", log_prefix
        c = self.cfg
        self.labels = D.load_label_config(opt.label_config)
        if self.labels.nclasses != c["nclasses"]:
            raise ConfigError(f"nclasses: {c['nclasses']} but {opt.label_config} defines "
                              f"{self.labels.nclasses} learning classes")
        self.eval_classes = [k for k in range(self.labels.nclasses) if k not in self.labels.ignore]
        self.rd = E.open_run_dir(resume or opt.experiment_dir(self.role, self.world), resume is not None,
                                 ddp.is_main())
        if ddp.is_main() and resume is None:
            copy_code(HERE, self.rd.code_dir)
            save_yaml({**c, "stage": self.role}, self.rd.log_dir / "config.yaml")  # this run dir's own stage
        self.log = self.rd.log
        self.log(f"{self.prefix}experiment directory {self.rd.path} ({self.world} process(es), device {device})")
        try:
            self._setup(resume is not None)
        except BaseException:
            # a new run that failed before training leaves no empty directory; a resumed one is only closed
            (self.rd.close if resume is not None else self.rd.discard)()
            raise

    def _setup(self, resume: bool) -> None:
        c, device, opt = self.cfg, self.device, self.opt
        self.loaders = E.build_loaders(c, self.labels, self.world, self.cuda, opt.parity)
        self.rgb_norm = E.rgb_normalisation(c)
        self.model = self.build_model().to(device)
        if c["pretrained_model"]:
            self._load_pretrained(c["pretrained_model"])
        if self.cuda and c["train"]["channels_last"]:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.net = ddp.wrap_model(self.model, device, sync_bn=c["train"]["sync_bn"] and self.cuda)
        self.optimizer = E.make_optimizer(c[self.role], self.parameters())
        iters = self.loaders.iters
        total = iters * max(1, c["n_epochs"] - (1 if opt.parity else 0))
        self.scheduler = warmup_cosine(self.optimizer, int(c["train"]["warmup_epochs"] * iters), total,
                                       c["train"]["min_lr_ratio"])
        self.selector = Selector("max", path=self.rd.checkpoint_dir / "best_IOU_model.pth")
        self.elog = EpochLog(self.rd, self.role)
        self.ckpt = Checkpoint(self.rd.checkpoint_dir / "training_state.pth", model=self.net,
                               optimizer=self.optimizer, scheduler=self.scheduler, generator=self.loaders.generator,
                               selector=self.selector, log=self.elog, **self.extra_state())
        self.start_epoch, self.val_history = 0, []
        if resume:
            seen = ddp.all_gather_object(self.ckpt.exists())
            if any(seen) and not all(seen):
                raise DataError(f"{self.ckpt.path}: not visible from every node; resuming on several nodes needs "
                                f"save_path on a file system they share")
            state = self.ckpt.load(device) if all(seen) else {"epoch": 0}
            self.start_epoch, self.val_history = state["epoch"], list(state.get("val_history", []))
            self.log(f"{self.prefix}resumed {self.rd.path} after epoch {self.start_epoch}")
        if not self.cuda and (c["train"]["amp"] or c["train"]["channels_last"]):
            self.log(f"{self.prefix}CPU run: bf16 autocast and channels_last are GPU switches, left off")

    # -- what a subclass provides -----------------------------------------------------------------------------
    model_name = "model"

    def build_model(self) -> torch.nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def step(self, batch, train: bool):  # pragma: no cover - abstract
        """(loss, {term: detached value}, logits used for the metrics)."""
        raise NotImplementedError

    def parameters(self):
        return list(self.model.parameters())

    def extra_state(self) -> dict:
        return {}

    def omega(self):
        """The last step's ω (per pixel) when a term uses it, else None."""
        return None

    # -- setup ------------------------------------------------------------------------------------------------
    def _load_pretrained(self, path):
        state = load_checkpoint(path, self.device)
        state = state.get("model", state) if isinstance(state, dict) else state
        own = self.model.state_dict()
        keep = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        self.model.load_state_dict(keep, strict=False)
        self.log(f"{self.prefix}pretrained_model {path}: {len(keep)} of {len(own)} tensors loaded (key and size match)")

    def to_device(self, batch):
        features, mask, label = (t.to(self.device, non_blocking=True) for t in batch)
        if self.cuda and self.cfg["train"]["channels_last"]:
            features = features.contiguous(memory_format=torch.channels_last)
        return features, mask, label

    def autocast(self):
        return E.autocast(self.cuda, self.cfg["train"]["amp"])

    # -- the loop ---------------------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict:
        self.net.train()
        L, c = self.loaders, self.cfg
        ddp.set_epoch(L.train_sampler, epoch)
        L.train_set.set_epoch(epoch)  # per-epoch augmentation, seen by the loader's workers too
        cm = ConfusionMatrix(self.labels.nclasses, self.labels.ignore, self.device)
        started = time.perf_counter()
        for i, batch in enumerate(L.train, 1):
            if i > L.iters:
                break
            features, mask, label = self.to_device(batch)
            with self.autocast():
                loss, parts, logits = self.step((features, mask, label), train=True)
            check_finite(loss, parts, epoch=epoch, step=i, where=f"{self.role} training")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if c["train"]["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(self.parameters(), c["train"]["grad_clip"])
            self.optimizer.step()
            self.scheduler.step()
            valid = label > 0
            cm.update(logits.detach().argmax(1)[valid], label[valid])
            self.elog.add({"Loss": loss.detach(), **parts})
            self.elog.add_omega(self.omega())
            if i % c["log_every"] == 0 or i == L.iters:
                left = (time.perf_counter() - started) / i * (L.iters - i)
                self.log(f"{self.prefix}>>> Train E[{epoch}|{c['n_epochs']}] I[{i}|{L.iters}] "
                         f"LR {self.scheduler.get_last_lr()[0]:.3e} Loss {float(loss.detach()):.4f} "
                         + " ".join(f"{k} {float(v):.4f}" for k, v in parts.items()) + f" RT {left:.1f}s")
        cm.all_reduce()
        return {"train_IOU": E.kitti_scores(cm, self.eval_classes, self.labels.names)["IOU"],
                "lr": self.scheduler.get_last_lr()[0]}

    @torch.no_grad()
    def validate(self, epoch: int, collect: bool = False) -> dict:
        """Scores on the val sequence(s), all-reduced over ranks on the process group's device (common.ddp);
        collect: also the logits of the labelled pixels (rows for the NTD advisor, gathered on rank 0)."""
        self.net.eval()
        L, c = self.loaders, self.cfg
        cm = ConfusionMatrix(self.labels.nclasses, self.labels.ignore, self.device)
        sums: dict[str, torch.Tensor] = {}
        n, first, rows = 0, None, []
        per_frame = math.ceil(NTD_ROWS / max(len(L.val_set), 1))
        for b, batch in enumerate(L.val):
            if c["val_iters"] and b >= c["val_iters"]:
                break
            features, mask, label = self.to_device(batch)
            with self.autocast():
                loss, parts, logits = self.step((features, mask, label), train=False)
            valid = label > 0
            cm.update(logits.argmax(1)[valid], label[valid])
            for k, v in {"Loss": loss, **parts}.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            n += 1
            if collect:
                frames = L.val_indices[b * L.val.batch_size:(b + 1) * L.val.batch_size]
                rows += self._ntd_rows(frames, logits, label, per_frame)
            if first is None:
                first = (features[0].float().cpu(), logits[0].argmax(0).cpu(), label[0].cpu())
        names = sorted(sums)
        packed = torch.stack([sums[k] for k in names] + [torch.tensor(float(n), device=self.device)])
        packed = ddp.all_reduce_sum(packed).cpu().double()
        local_pixels = int(cm.mat.sum())
        cm.all_reduce()
        out = {k: float(packed[i]) / max(float(packed[-1]), 1.0) for i, k in enumerate(names)}
        out.update(E.kitti_scores(cm, self.eval_classes, self.labels.names))
        out["pixels"] = int(cm.mat.sum())
        out["pixels_per_rank"] = ddp.all_gather_object(local_pixels)
        out["confusion"] = cm.mat.cpu().tolist()
        if collect:
            out["ntd_rows"] = sorted((r for part in ddp.all_gather_object(rows) for r in part), key=lambda r: r[0])
        if first is not None and not collect and epoch % c["print_frequency"] == 0:
            E.write_images(self.rd, self.prefix.strip(" []") or "val", epoch, *first, self.labels.colors,
                           self.rgb_norm)
        return out

    def _ntd_rows(self, frames, logits, label, per_frame: int) -> list:
        """(frame, logits rows, labels) of each frame's labelled pixels, at most per_frame of them chosen by a
        generator seeded with (seed, frame): teacher and no-KD student keep the same pixels."""
        out = []
        for k, f in enumerate(frames):
            valid = label[k] > 0
            z = logits[k].float().permute(1, 2, 0)[valid].cpu().numpy()
            y = label[k][valid].cpu().numpy()
            if len(y) > per_frame:
                keep = np.sort(np.random.default_rng([self.cfg["seed"], f]).choice(len(y), per_frame, replace=False))
                z, y = z[keep], y[keep]
            out.append((f, z, y))
        return out

    def fit(self) -> dict:
        """Train (or only validate with val_only) and return the summary of the run; the run directory is closed
        (log flushed, lock released) however it ends."""
        try:
            return self._fit()
        finally:
            self.rd.close()

    def _fit(self) -> dict:
        started = time.perf_counter()
        c = self.cfg
        if c["val_only"]:
            r = self.validate(0, collect=True)
            self._log_val("Val", r, 0)
            return self._summary(r, None, time.perf_counter() - started)
        for epoch in range(self.start_epoch + 1, c["n_epochs"] + 1):
            metrics = self.train_epoch(epoch)
            if epoch % c["val_frequency"] == 0 or epoch == c["n_epochs"]:
                val = self.validate(epoch)
                best = self.selector.update(val["IOU"], epoch, self.net)
                self._log_val(f"Val E[{epoch}|{c['n_epochs']}]", val, epoch, " new best IOU" if best else "")
                self.val_history.append({"epoch": epoch, **{k: val[k] for k in val if isinstance(val[k], float)}})
                metrics.update({f"val_{k}": v for k, v in self.val_history[-1].items() if k != "epoch"})
            record = self.elog.end_epoch(epoch, **metrics)
            self.log(f"{self.prefix}>>> Train E[{epoch}|{c['n_epochs']}] "
                     + " ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith(("train_", "omega_"))))
            if due(epoch, c["checkpoint_every"]) or epoch == c["n_epochs"]:
                self.ckpt.save(epoch=epoch, val_history=self.val_history)
        self.selector.restore(self.net)
        selected = self.validate(self.selector.best_epoch or 0, collect=True)
        self._log_val(f"Selected (epoch {self.selector.best_epoch}, best val IOU)", selected, None)
        seconds = time.perf_counter() - started
        last = self.val_history[-1] if self.val_history else {"epoch": None, "IOU": float("nan")}
        self.log(f"{self.prefix}>>> best epoch {self.selector.best_epoch}: val IOU {selected['IOU']:.4f}; last epoch "
                 f"{last['epoch']}: val IOU {last['IOU']:.4f}; total cost time {seconds:.1f} s")
        return self._summary(selected, self.val_history[-1] if self.val_history else None, seconds)

    def _log_val(self, what: str, r: dict, epoch: int | None, note: str = "") -> None:
        """The val line and per-class table; per-class TensorBoard scalars for an epoch's validation."""
        self.log(f"{self.prefix}>>> {what} Loss {r['Loss']:.4f} IOU {r['IOU']:.4f} Precision {r['Precision']:.4f} "
                 f"Recall {r['Recall']:.4f} ({r['pixels']} pixels, all ranks){note}\n{E.per_class_table(r)}")
        for name, v in ([] if epoch is None else r["per_class"].items()):
            self.rd.scalar(f"{self.role}_val_class/{name}_IOU", v["IOU"], epoch)

    def _summary(self, selected: dict, last: dict | None, seconds: float) -> dict:
        rows = selected.pop("ntd_rows", [])
        if self.ntd_role and rows and ddp.is_main():
            z, y = np.concatenate([r[1] for r in rows]), np.concatenate([r[2] for r in rows])
            ntd.save_logits(self.rd.path, self.ntd_role, z, y, split="val",
                            source=f"semantic_kitti {self.role} {self.model_name}, selected epoch, labelled pixels")
        s = {"role": self.role, "net": self.model_name, "experiment_dir": str(self.rd.path), "world_size": self.world,
             "best_epoch": self.selector.best_epoch, "best": selected, "last": last, "val_history": self.val_history,
             "history": self.elog.history, **self.elog.omega_summary(), "seconds": seconds,
             "iters_per_epoch": self.loaders.iters, "best_checkpoint": str(self.selector.path)}
        self.rd.write_summary(s)
        return s


class TeacherTrainer(Trainer):
    """The camera teacher: focal + λ·Lovász on CameraNet's map (PMFNet: on both heads, optionally with PMF's
    perception-aware loss)."""
    role = "teacher"
    ntd_role = "teacher"

    @property
    def model_name(self):
        return self.cfg["teacher"]["net"]

    def build_model(self):
        c = self.cfg
        self.seg = SegmentationLoss(D.focal_alpha(self.labels), c["train"]["focal_gamma"], c["train"]["lambda"]
                                    ).to(self.device)
        return build_teacher(c, self.log)

    def step(self, batch, train: bool):
        features, mask, label = batch
        t = self.cfg["teacher"]
        if t["net"] == "PMFNet":
            lidar, camera = self.net(features[:, 0:5], features[:, 5:8])
            loss_l, f_l, lv_l = self.seg(lidar, label)
            loss_c, f_c, lv_c = self.seg(camera, label)
            loss = loss_l + loss_c
            parts = {"LossFocal": f_l + f_c, "LossLovasz": lv_l + lv_c}
            if t["perception_loss"]:
                pa = perception_aware_loss(lidar, camera, label > 0, t["tau"])
                loss = loss + t["perception_weight"] * pa
                parts["LossPerception"] = pa
            return loss, {k: v.detach() for k, v in parts.items()}, lidar
        logits = self.net(features[:, 5:8])
        loss, f, lv = self.seg(logits, label)
        return loss, {"LossFocal": f.detach(), "LossLovasz": lv.detach()}, logits
