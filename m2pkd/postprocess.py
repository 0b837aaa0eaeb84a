"""Step 6: CCC of predictions per recording, mean over recordings, CCC of the concatenation, and the two
post-processing chains: the authors' fixed one (plot_ccc.py: ×scale, circular shift, box filter) and the AVEC one
(bias / scale / median filter / shift, each step kept only if it improves CCC on the recordings it is fitted on)."""
from __future__ import annotations

import numpy as np
from scipy.signal import medfilt

from common.config import ConfigError
from common.metrics import ccc_np


def box_filter(y: np.ndarray, width: int) -> np.ndarray:
    """Moving average of `width` samples, np.convolve mode 'same' (zero-padded edges, as the reference)."""
    if width <= 1:
        return y.copy()
    return np.convolve(y, np.ones(width) / width, mode="same")


def circular_shift(y: np.ndarray, k: int) -> np.ndarray:
    """Delay by k samples with wrap-around (deque.rotate(k))."""
    return np.roll(y, k)


def edge_shift(y: np.ndarray, k: int) -> np.ndarray:
    """Delay by k ≥ 0 samples, padding the start with the first value (AVEC practice)."""
    if k <= 0:
        return y.copy()
    if k >= len(y):
        return np.full_like(y, y[0])
    return np.concatenate([np.full(k, y[0]), y[:-k]])


def authors_chain(y: np.ndarray, scale: float, shift: int, box: int) -> np.ndarray:
    return box_filter(circular_shift(scale * np.asarray(y, dtype=np.float64), shift), box)


def _mean_ccc(pairs) -> float:
    return float(np.mean([ccc_np(p, g) for p, g in pairs]))


def apply_avec(y: np.ndarray, params: dict) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64)
    if params.get("median", 1) > 1:
        y = medfilt(y, params["median"])
    y = y + params.get("bias", 0.0)
    if params.get("scale", 1.0) != 1.0:
        mu = y.mean()
        y = mu + params["scale"] * (y - mu)
    return edge_shift(y, params.get("shift", 0))


def fit_avec(pairs, medians, shifts) -> dict:
    """Fit the AVEC chain on [(pred, gold), ...]: median filter size, bias b = mean(gold) − mean(pred),
    scale s = std(gold) / std(pred), delay — in that order, each kept only if it raises the mean CCC."""
    bad = [m for m in medians if m < 1 or m % 2 == 0]
    if bad:
        raise ConfigError(f"postprocess.avec.median: expected odd sizes ≥ 1, got {bad}")
    if any(s < 0 for s in shifts):
        raise ConfigError(f"postprocess.avec.shifts: expected delays ≥ 0, got {list(shifts)}")
    params: dict = {}
    score = lambda p: _mean_ccc([(apply_avec(x, p), g) for x, g in pairs])
    best = score(params)
    cand = max(((score({"median": m}), m) for m in medians), key=lambda t: t[0])
    if cand[0] > best:
        best, params["median"] = cand[0], cand[1]
    filtered = [(apply_avec(x, params), g) for x, g in pairs]
    p_all, g_all = np.concatenate([x for x, _ in filtered]), np.concatenate([g for _, g in filtered])
    for key, value in (("bias", float(g_all.mean() - p_all.mean())),
                       ("scale", float(g_all.std() / p_all.std()) if p_all.std() > 0 else 1.0)):
        trial = {**params, key: value}
        s = score(trial)
        if s > best:
            best, params = s, trial
    cand = max(((score({**params, "shift": k}), k) for k in shifts), key=lambda t: t[0])
    if cand[0] > best:
        best, params["shift"] = cand[0], cand[1]
    params["fitted_ccc"] = best
    return params


def ccc_table(preds: dict, cfg: dict) -> dict:
    """preds {"selection": {rec: (pred, gold)}, "dev": {...}} → CCC rows for raw / authors / avec on dev, with the
    per-recording values, the mean over recordings and the CCC of the concatenation."""
    pp = cfg["postprocess"]
    a = pp["authors"]
    avec = fit_avec(list(preds["selection"].values()), pp["avec"]["median"], pp["avec"]["shifts"])
    chains = {"raw": lambda y: np.asarray(y, dtype=np.float64),
              "authors": lambda y: authors_chain(y, a["scale"], a["shift"], a["box"]),
              "avec": lambda y: apply_avec(y, avec)}
    out = {}
    for name, f in chains.items():
        processed = {r: (f(p), g) for r, (p, g) in preds["dev"].items()}
        per = {r: ccc_np(p, g) for r, (p, g) in processed.items()}
        out[name] = {"per_recording": per, "mean": float(np.mean(list(per.values()))),
                     "concat": ccc_np(np.concatenate([p for p, _ in processed.values()]),
                                      np.concatenate([g for _, g in processed.values()])),
                     "series": processed}
    out["avec_params"] = avec
    return out
