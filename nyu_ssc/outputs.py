"""A run's outputs: results.csv, summary.json, the prediction-vs-truth slices and the val mIoU curves."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common import plots  # noqa: E402
from nyu_ssc import config as SC  # noqa: E402
from nyu_ssc.metrics import format_result  # noqa: E402

AGGS = ("dataset", "per_sample")
SPLITS = ("val", "test")


def top_view(vol: np.ndarray) -> np.ndarray:
    """(D, H, W) labels → (D, W): the label of the highest non-empty voxel of each column below the ceiling
    (ceiling voxels are skipped so that the room is visible; 0 if none; 255 where the whole column is ignored)."""
    occ = (vol > 1) & (vol != SC.IGNORE)
    h = vol.shape[1]
    top = h - 1 - np.argmax(occ[:, ::-1, :], axis=1)
    out = np.take_along_axis(vol, top[:, None, :], 1)[:, 0, :]
    out = np.where(occ.any(1), out, 0)
    return np.where((vol == SC.IGNORE).all(1), SC.IGNORE, out)


def slice_plot(path, kept, title: str, height_frac: float = 0.3) -> Path:
    """Per scene: ground truth and prediction on a horizontal slice and seen from above (seed colour map);
    predictions are shown wherever the ground truth is not ignored (grey)."""
    n = max(1, len(kept))
    fig, axes = plt.subplots(n, 4, figsize=(11, 2.9 * n), squeeze=False)
    for r, (pred, tgt, nonempty, name) in enumerate(kept):
        y = int(round(height_frac * (tgt.shape[1] - 1)))
        shown = np.where(tgt == SC.IGNORE, SC.IGNORE, pred)
        panels = [(tgt[:, y, :], f"{name}: truth, slice y={y}"), (shown[:, y, :], "prediction, same slice"),
                  (top_view(tgt), "truth, top view"), (top_view(shown), "prediction, top view")]
        for c, (img, label) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(SC.colorize(img), origin="lower", interpolation="nearest")
            ax.set_title(label, fontsize=8)
            ax.set_xlabel("x (W)", fontsize=7)
            ax.set_ylabel("z (D, depth)", fontsize=7)
            ax.tick_params(labelsize=6)
    handles = [plt.Rectangle((0, 0), 1, 1, color=SC.COLOR_MAP[i] / 255) for i in range(SC.NUM_CLASSES + 1)]
    fig.legend(handles, SC.CLASS_NAMES + ["ignore"], loc="lower center", ncol=7, fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def class_rows(results: dict) -> list[dict]:
    """One row per (model, split, aggregation, class) for results.csv."""
    rows = []
    for tag, r in results.items():
        for split in SPLITS:
            for agg in AGGS:
                res = r[split][agg]
                for cls, v in res["iou"].items():
                    rows.append({"model": tag, "split": split, "aggregation": agg, "class": cls, "iou": v})
                for key in ("precision", "recall", "sc_iou", "miou", "pixel_acc"):
                    rows.append({"model": tag, "split": split, "aggregation": agg, "class": f"[{key}]",
                                 "iou": res[key]})
    return rows


def markdown_table(results: dict, agg: str, split: str = "test") -> str:
    """Per model: completion precision / recall / SC IoU, per-class IoU and mIoU (%), on `split`."""
    names = SC.CLASS_NAMES[1:]
    head = ("| model | prec. | recall | SC IoU | " + " | ".join(names) + " | mIoU |\n|---|---|---|---|"
            + "---|" * len(names) + "---|")
    body = []
    for tag, r in results.items():
        res = r[split][agg] if split in r else r[agg]
        cells = [f"{res['iou'][n] * 100:.1f}" if res["iou"][n] is not None else "–" for n in names]
        body.append(f"| {tag} | {res['precision'] * 100:.1f} | {res['recall'] * 100:.1f} | {res['sc_iou'] * 100:.1f} | "
                    + " | ".join(cells) + f" | {res['miou'] * 100:.1f} |")
    return "\n".join([head, *body])


def finish(cfg: dict, rd, trained: dict) -> dict:
    """From each trained model (selected on the validation scenes, then tested once): results.csv (val and test),
    the slice plots (test scenes), the val mIoU curves and summary.json (with the ω statistics of the students)."""
    results, plot_files = {}, []
    for tag, t in trained.items():
        results[tag] = {"val": t["val"], "test": t["test"], "model": t["model"].__class__.__name__,
                        "best_epoch": t["best_epoch"], "checkpoint": t["best_path"].name, **t["omega"]}
        for split in SPLITS:
            for agg in AGGS:
                rd.log(f"{tag} {split} (best epoch {t['best_epoch']}): " + format_result(t[split][agg], agg))
        if t["kept"]:
            plot_files.append(slice_plot(rd.file(f"slices_{tag}.png"), t["kept"],
                                         f"{tag}: prediction vs ground truth, test (best epoch {t['best_epoch']})"))
    epochs = list(range(1, 1 + max(len(t["history"]) for t in trained.values())))
    curves = {}
    for tag, t in trained.items():
        vals = [h.get("val_miou", np.nan) for h in t["history"]]
        curves[tag] = ([*vals, *[np.nan] * (len(epochs) - len(vals))],)
    plot_files.append(plots.line_plot(rd.file("val_miou.png"), epochs, curves, xlabel="epoch",
                                      ylabel=f"val mIoU ({'per-sample' if cfg['parity'] else 'dataset'})",
                                      title="Validation (held-out training scenes) mIoU per epoch"))
    rd.write_csv("results.csv", class_rows(results), ["model", "split", "aggregation", "class", "iou"])
    summary = {"experiment": "nyu_ssc", "headline": "per_sample" if cfg["parity"] else "dataset",
               "selection": f"best val {cfg['eval']['select']} on {cfg['data']['val_fraction']:g} of the training "
                            f"scenes (seed {cfg['seed']}); test evaluated once with the selected weights",
               "dataset": cfg["data"]["dataset"], "seed": cfg["seed"], "grid": cfg["grid"], "results": results,
               "history": {tag: t["history"] for tag, t in trained.items()},
               "plots": [p.name for p in plot_files], "config": cfg}
    rd.write_summary(summary)
    rd.log("per-class IoU (%), test, dataset-level:\n" + markdown_table(results, "dataset"))
    rd.log(f"summary.json, results.csv and plots in {rd.path}")
    return summary
