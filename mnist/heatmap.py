"""Input-gradient heat maps of the saliency teacher (`--heat_map`): the NTDH repository's MNIST/main.py heat_map
branch, here for any batch size and with the channel removal of each mode actually applied."""
from __future__ import annotations

import copy

import numpy as np
import torch

from common import plots
from common import saliency as alg1
from mnist import data as D
from mnist.experiment import Setup, load_saliency_teacher, read_tag


def input_gradients(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|∂ logit_y / ∂ x| per sample (any batch size); the model's parameters get no gradient."""
    was = model.training
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        x = x.detach().clone().requires_grad_(True)
        logits = model(x)
        logits.gather(1, y.view(-1, 1)).sum().backward()
        return x.grad.abs()
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was)


def _as_image(v: torch.Tensor) -> np.ndarray:
    """A flattened 784 / 2352 input (or gradient) as an HxW or HxWx3 array."""
    v = v.detach().cpu()
    return v.view(28, 28).numpy() if v.numel() == 784 else v.view(3, 28, 28).permute(1, 2, 0).numpy()


def heat_map(s: Setup, rd) -> dict:
    """Input-gradient saliency maps of the saliency teacher, without and with each mode's channel removal."""
    cfg, ec = s.cfg, s.cfg["eval"]
    base_teacher, teacher_path, tag_path = load_saliency_teacher(s, rd)
    place_name = base_teacher.place_name(cfg["place"])
    sal = read_tag(tag_path, base_teacher, cfg["place"], s.log)
    n = cfg["heat_map"]["num_images"]
    batch = s.prepare(next(iter(D.BatchLoader(s.splits["test"].subset(np.arange(min(n, len(s.splits["test"])))),
                                             n, s.device, shuffle=False, noise_seed=cfg["data"]["eval_noise_seed"]))))
    x, y = batch["teacher"], batch["label"]
    rows = [("input", x, "gray")]
    rows.append(("teacher", input_gradients(base_teacher, x, y), "hot"))
    for mode in ec["modes"]:
        teacher = copy.deepcopy(base_teacher)
        removed = alg1.removal_indices(sal, mode, ec["ratio"], generator=torch.Generator().manual_seed(cfg["seed"] + 3))
        handle = alg1.remove_channels(teacher, place_name, removed, fill=ec["fill"])
        rows.append((f"mode {mode}", input_gradients(teacher, x, y), "hot"))
        handle.remove()
    fig, axes = plots.figure(len(rows), len(y), figsize=(1.3 * len(y) + 0.6, 1.35 * len(rows)), squeeze=False)
    for r, (label, values, cmap) in enumerate(rows):
        for c in range(len(y)):
            img = _as_image(values[c])
            if img.ndim == 3:
                img = img.max(-1) if cmap == "hot" else (img + 1) / 2
            elif cmap == "gray":
                img = (img + 1) / 2
            ax = axes[r, c]
            ax.imshow(img, cmap=cmap if img.ndim == 2 else None, vmin=0 if cmap == "gray" else None,
                      vmax=1 if cmap == "gray" else None)
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
            if r == 0:
                ax.set_title(f"y={int(y[c])}", fontsize=8)
    fig.suptitle(f"teacher ({s.prepare.tea_key}) input-gradient maps |d logit_y / d x|", fontsize=9)
    fig.tight_layout()
    path = rd.path / "heat_maps.png"
    fig.savefig(path, dpi=110)
    s.log(f"heat maps of {len(y)} test images -> {path}")
    return {"plot": path.name, "teacher": str(teacher_path), "tag": str(tag_path)}
