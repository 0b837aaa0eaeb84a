"""The NTD advisor: will distillation from this teacher help this student? Answered from logits, before distilling.

(The full method description is written below in stages; this part holds the on-disk format.)

File format
-----------
Every experiment writes, on its selection (validation) split, the logits of the teacher and of the "probe" (the no-KD
baseline of the student modality) with `save_logits(run_dir, role, logits, labels, tag=None)`:

    <run_dir>/ntd/<role>[_<tag>].npz      role: teacher | probe;  tag: e.g. a removal mode or a teacher choice
        logits  (N, C) float32            one row per sample (dense outputs: one row per labelled position)
        labels  (N,)   int64              in [0, C)
        meta    0-d str                   JSON: format, role, tag, split, source, classes, rows, rows_total,
                                          subsample_seed

Rows are aligned: row i of the teacher file and row i of the probe file are the same sample. More than
`MAX_ROWS` rows are subsampled without replacement by a generator seeded with `SUBSAMPLE_SEED`, so two roles saved
with the same number of rows keep the same rows. Call it on one process only (DDP rank 0).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from common.config import DataError, atomic_write

FORMAT_VERSION = 1
ROLES = ("teacher", "probe")
MAX_ROWS = 200_000
SUBSAMPLE_SEED = 0
GENERATOR = "common.ntd"
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class Logits(NamedTuple):
    """One logits file: (N, C) float32 logits, (N,) int64 labels (None when the file has none), its meta dict."""
    logits: np.ndarray
    labels: np.ndarray | None
    meta: dict


def _short(e: BaseException, limit: int = 160) -> str:
    text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.is_floating_point() else x).numpy()
    return np.asarray(x)


def check_logits(logits: Any, where: str) -> np.ndarray:
    """(N, C) finite float logits with C ≥ 2 → float32 array; otherwise a one-line DataError naming `where`.

    One column (or a 1-D array) is a regression output (M2PKD's arousal / valence): there is no class distribution,
    so no target or non-target part, and the advisor refuses it rather than inventing an analog."""
    a = _as_numpy(logits)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise DataError(f"{where}: expected numeric logits, got dtype {a.dtype}")
    if a.ndim == 1 or (a.ndim == 2 and a.shape[1] == 1):
        raise DataError(f"{where}: one score per sample (shape {tuple(a.shape)}) is a regression output; the "
                        f"non-target divergence needs class logits (N, C) with C >= 2")
    if a.ndim != 2:
        raise DataError(f"{where}: expected logits of shape (N, C), got shape {tuple(a.shape)} "
                        f"(flatten dense outputs with common.ntd.dense_rows)")
    if a.shape[0] == 0:
        raise DataError(f"{where}: no rows")
    bad = ~np.isfinite(a)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise DataError(f"{where}: {int(bad.sum())} non-finite logits (NaN/inf), first in row {row}")
    return a.astype(np.float32, copy=False)


def check_labels(labels: Any, n: int, classes: int, where: str) -> np.ndarray:
    """(n,) integer labels in [0, classes) → int64 array; otherwise a one-line DataError naming `where`."""
    y = _as_numpy(labels)
    if y.ndim != 1 or y.shape[0] != n:
        raise DataError(f"{where}: expected {n} labels of shape ({n},), got shape {tuple(y.shape)}")
    if np.issubdtype(y.dtype, np.floating):
        if not np.isfinite(y).all() or (y != np.round(y)).any():
            raise DataError(f"{where}: labels must be integers, got non-integer values")
    elif not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: expected integer labels, got dtype {y.dtype}")
    y = y.astype(np.int64)
    out = (y < 0) | (y >= classes)
    if out.any():
        raise DataError(f"{where}: {int(out.sum())} labels outside [0, {classes}) (e.g. {int(y[out][0])}); "
                        f"drop ignored positions before saving")
    return y


def dense_rows(logits: Any, labels: Any, class_dim: int = 1, ignore_index: int | None = None):
    """Dense outputs (B, C, *spatial) and labels (B, *spatial) → (rows (M, C), labels (M,)) as numpy arrays, one row
    per position whose label is not `ignore_index` (segmentation, scene completion)."""
    z, y = _as_numpy(logits), _as_numpy(labels)
    z = np.moveaxis(z, class_dim, -1).reshape(-1, z.shape[class_dim])
    y = y.reshape(-1)
    if y.shape[0] != z.shape[0]:
        raise DataError(f"dense logits have {z.shape[0]} positions but labels have {y.shape[0]}")
    keep = np.ones(y.shape[0], bool) if ignore_index is None else y != ignore_index
    return z[keep], y[keep].astype(np.int64)


def logits_path(run_dir: str | Path, role: str, tag: str | None = None) -> Path:
    """`<run_dir>/ntd/<role>[_<tag>].npz`."""
    if role not in ROLES:
        raise DataError(f"logits role must be one of {ROLES}, got {role!r}")
    if tag is not None and not _TAG.match(str(tag)):
        raise DataError(f"logits tag {tag!r}: expected letters, digits, '.', '_' or '-'")
    return Path(run_dir) / "ntd" / (f"{role}_{tag}.npz" if tag is not None else f"{role}.npz")


def subsample_rows(n: int, max_rows: int = MAX_ROWS) -> np.ndarray | None:
    """The rows kept when n > max_rows (sorted, seeded with SUBSAMPLE_SEED, so the same for every role), else None."""
    if n <= max_rows:
        return None
    return np.sort(np.random.default_rng(SUBSAMPLE_SEED).choice(n, max_rows, replace=False))


def save_logits(run_dir: str | Path, role: str, logits: Any, labels: Any, tag: str | None = None, *,
                split: str = "val", source: str = "", max_rows: int = MAX_ROWS) -> Path:
    """Write `<run_dir>/ntd/<role>[_<tag>].npz` (format in the module docstring), atomically; returns its path.

    logits (N, C) and labels (N,) as numpy arrays or torch tensors, on the selection split; `source` says what
    produced them (e.g. "mnist teacher, mode 1"). Refuses to replace a file that this function did not write."""
    path = logits_path(run_dir, role, tag)
    if not Path(run_dir).is_dir():
        raise DataError(f"{run_dir}: run directory not found (save_logits writes into an existing run directory)")
    z = check_logits(logits, f"{path}: {role} logits")
    y = check_labels(labels, z.shape[0], z.shape[1], f"{path}: {role} labels")
    rows_total = z.shape[0]
    keep = subsample_rows(rows_total, max_rows)
    if keep is not None:
        z, y = z[keep], y[keep]
    if path.exists() and _read_meta(path) is None:
        raise DataError(f"{path}: exists and was not written by save_logits; refusing to overwrite it")
    meta = {"format": FORMAT_VERSION, "generator": GENERATOR, "role": role, "tag": tag, "split": split,
            "source": source, "classes": int(z.shape[1]), "rows": int(z.shape[0]), "rows_total": int(rows_total),
            "subsample_seed": SUBSAMPLE_SEED if keep is not None else None}
    atomic_write(path, lambda f: np.savez(f, logits=z, labels=y, meta=np.array(json.dumps(meta))), "wb")
    return path


def _read_meta(path: Path) -> dict | None:
    """The meta dict of a file save_logits wrote, or None for anything else."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"])) if "meta" in data.files else None
    except Exception:
        return None
    return meta if isinstance(meta, dict) and meta.get("generator") == GENERATOR else None


def read_scores(path: str | Path, what: str = "logits") -> Logits:
    """Logits (and labels, when the file holds them) from a `.npy`, `.npz` or `.pt`/`.pth` file.

    .npy: the (N, C) array.  .npz: arrays `logits` (+ `labels`, `meta`), or a single array.  .pt: a tensor, or a
    dict with `logits` (+ `labels`). Validated: one-line DataErrors name the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} file not found")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz", ".pt", ".pth"):
        raise DataError(f"{path}: expected a .npy, .npz or .pt {what} file (or a run directory)")
    try:
        z, y, meta = _read_raw(path, suffix)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: not a readable {suffix} file ({_short(e)})") from None
    z = check_logits(z, f"{path}: {what}")
    if y is not None:
        y = check_labels(y, z.shape[0], z.shape[1], f"{path}: labels")
    return Logits(z, y, meta)


def _pick(arrays: dict, path: Path, key: str) -> Any:
    if key in arrays:
        return arrays[key]
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    raise DataError(f"{path}: expected an array named {key!r}, found {sorted(arrays)}")


def _read_raw(path: Path, suffix: str):
    if suffix == ".npy":
        return np.load(path, allow_pickle=False), None, {}
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        meta = json.loads(str(arrays.pop("meta"))) if "meta" in arrays else {}
        labels = arrays.pop("labels", None) if "logits" in arrays else None
        return _pick(arrays, path, "logits"), labels, meta
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        return _pick(obj, path, "logits"), obj.get("labels"), {}
    if isinstance(obj, torch.Tensor):
        return obj, None, {}
    raise DataError(f"{path}: expected a tensor or a dict with 'logits', got {type(obj).__name__}")


def read_labels(path: str | Path, n: int, classes: int) -> np.ndarray:
    """Labels from a `.npy`, `.npz` (array `labels` or a single array) or `.pt` file, checked against (n, classes)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: labels file not found")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz", ".pt", ".pth"):
        raise DataError(f"{path}: expected a .npy, .npz or .pt labels file")
    try:
        if suffix == ".npy":
            y = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                y = _pick({k: data[k] for k in data.files if k != "meta"}, path, "labels")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            y = _pick(obj, path, "labels") if isinstance(obj, dict) else obj
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: not a readable {suffix} file ({_short(e)})") from None
    return check_labels(y, n, classes, f"{path}: labels")


def load_logits(path_or_run_dir: str | Path, role: str = "teacher", tag: str | None = None) -> Logits:
    """Read a logits file: a file path as is, or a run directory's `ntd/<role>[_<tag>].npz` (also accepted: the
    `ntd` folder itself). Validated on read (shape, finite values, labels in range)."""
    p = Path(path_or_run_dir)
    if p.is_dir():
        inside = logits_path(p, role, tag)
        direct = p / inside.name
        p = direct if not inside.exists() and direct.exists() else inside
        if not p.is_file():
            raise DataError(f"{p}: {role} logits not found (expected {inside.relative_to(path_or_run_dir)} "
                            f"written by common.ntd.save_logits)")
    return read_scores(p, f"{role} logits")
