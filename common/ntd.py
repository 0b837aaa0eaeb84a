"""The NTD advisor: will distillation from this teacher help this student? Answered from logits, before distilling.

NTDH (Chen et al., "Non-target Divergence Hypothesis: Toward Understanding Domain Gaps in Cross-Modal Knowledge
Distillation", arXiv 2409.02438, abstract and Sec. I) claims that a cross-modal domain gap shows up as a difference
between the teacher's and the student's distributions over the *non-target* classes, and that the smaller that
difference, the better cross-modal KD works. If the claim holds, it can be used before any distillation run: train
a cheap no-KD model of the student modality (the *probe*: the no-KD baseline, a few epochs of it, or a linear probe),
compare its logits with the teacher's on the same samples, and predict. This module computes that comparison, turns
it into a verdict with its evidence, ranks candidate teachers, and measures how well the predictions ranked the
measured gains (`advisor_check`).

Method (per sample i, then averaged; p = softmax(z / T), T = 1 as the reference's `js_divergence`)
--------------------------------------------------------------------------------------------------
- target y_i: the label, or the teacher's argmax when no labels are given (said in the output);
- non-target distribution p̂_c = p_c / (1 − p_y) over c ≠ y (common.divergence.split_log_probs);
- ncjsd, the non-target JS between teacher and probe, in two variants (issue 18's naming):
    textbook   ½[KL(P̂_t ‖ M̂) + KL(P̂_p ‖ M̂)],  M̂ = ½(P̂_t + P̂_p), bounded by ln 2;
    reference  ½[KL(M̂ ‖ P̂_t) + KL(M̂ ‖ P̂_p)], unbounded: what the NTDH repository's
               `sklearn/distances/jsd.py: js_divergence` computes (through the argument order of F.kl_div);
- target_mass_js: the same two variants between the binary masses [p_y, 1 − p_y];
- ω, NTDH's per-sample distillation weight (the repository's `sklearn/utils/functions.py: pd_diff`; here
  common.mask.omega): 1 where the teacher is right, 1[cos ≥ τ]·(cos + 1)/2 where it is wrong, cos the cosine
  between the teacher's and the student's logits, τ = `threshold` (0.996). Before distillation there is no
  student, so the probe stands in for it. Reported: the share of samples ω drops (ω = 0), down-weights
  (0 < ω < 1) and masks (ω < 1), its mean, the teacher's error rate, and the divergences on the samples ω keeps;
- argmax agreement of teacher and probe; accuracy of each (with labels);
- all of it per class (grouped by target).
For C = 2 the non-target distribution is a single point, so ncjsd is undefined (reported as null, and said); the
advice then rests on target_mass_js, which is a target quantity. A one-column (or 1-D) input is a regression output
(M2PKD's arousal / valence): there is no class distribution, hence no target / non-target split, and `advise` refuses
it with a one-line error. No analog is offered: a distance between two regressors' outputs would not be NTDH's
quantity, and calling it one would mislead.

The verdict (`VerdictRule`; the thresholds are parameters and CLI flags)
------------------------------------------------------------------------
d = the divergence the advice rests on (ncjsd for C ≥ 3, target_mass_js for C = 2; textbook variant unless
`variant` says otherwise), as a fraction of ln 2.
    hurt       if d ≥ hurt_above (0.20), or, with labels, the teacher is less accurate than the probe by more than
               accuracy_margin (0) + accuracy_z (2) standard errors of the paired accuracy difference;
    help       else if d ≤ help_below (0.05);
    uncertain  otherwise.
The text adds the share of samples the ω mask would drop, and suggests the mask when that share is ≥ omega_share
(0.10) and the verdict is not "help". The thresholds were set before any measurement and are not fitted to measured
Deltas. The accuracy guard is not NTDH's: a teacher that is wrong more often than the student modality's own model
offers targets worse than the labels the student already has.

Ranking: `rank` orders candidates (teachers, modality pairs, Algorithm-1 removal modes) for the same student by
score = −d, best first; every entry carries d, the quantity and variant it is, and the verdict.

Assumptions and limits
----------------------
- The probe stands for what the student modality can express; a badly under-trained probe inflates d. Compare
  candidates with the same probe.
- Logits come from the selection (validation) split: on the training split an over-fitted teacher's outputs are
  nearly one-hot and its non-target part carries little.
- Dense outputs (segmentation, scene completion) count each labelled position as a sample; positions are correlated,
  so n overstates the evidence. At most 200,000 rows are kept (seeded subsample, the same rows for every role).
- The verdict is a heuristic on top of a hypothesis. How well the score ranks measured gains is an empirical
  question per experiment, which `advisor_check` answers; where ρ is near zero or negative the hypothesis does not
  predict there, and the report should say so.

File format
-----------
Every experiment writes, on its selection (validation) split, the logits of the teacher and of the probe (its no-KD
baseline) with `save_logits(run_dir, role, logits, labels, tag=None)`:

    <run_dir>/ntd/<role>[_<tag>].npz      role: teacher | probe;  tag: e.g. a removal mode or a teacher choice
        logits  (N, C) float32            one row per sample (dense outputs: one row per labelled position,
                                          `dense_rows` flattens them and drops the ignore index)
        labels  (N,)   int64              in [0, C)
        meta    0-d str                   JSON: format, generator, role, tag, split, source, classes, rows,
                                          rows_total, subsample_seed

Rows are aligned: row i of the teacher file and row i of the probe file are the same sample. More than `MAX_ROWS`
rows are subsampled without replacement by a generator seeded with `SUBSAMPLE_SEED`, so two roles saved with the
same number of rows keep the same rows. Write on one process only (DDP rank 0). Both writing and reading check the
shape, finite values and label range, with one-line errors naming the file. A tagged teacher without a probe of the
same tag is paired with the untagged probe (one no-KD baseline for several teachers).

Command line
------------
    python -m common.ntd advise RUN_DIR                       # RUN_DIR/ntd/teacher.npz vs probe.npz -> advice.json
    python -m common.ntd advise RUN_DIR --tag mode1           # ntd/teacher_mode1.npz (probe_mode1.npz or probe.npz)
    python -m common.ntd advise --teacher t.npy --probe p.pt --labels y.npy --names cat dog bird --out advice.json
    python -m common.ntd rank RUN_DIR                         # every ntd/teacher*.npz of the run, best first
    python -m common.ntd rank a=t_a.npz,p.npz b=t_b.npz,p.npz,y.npy --out ranking.json
Files are .npy (the array), .npz (`logits` [+ `labels`], or one array) or .pt (a tensor, or a dict with `logits`
[+ `labels`]). Options: --threshold (ω's τ), --temperature, --omega-space logits|probs, --variant, --help-below,
--hurt-above, --accuracy-margin, --omega-share. Bad input (shape mismatch, NaN logits, labels out of range, a missing
or unreadable file, a regression output) is one line `error: ...` and exit status 2. JSON is written to --out, or
for a run directory to its ntd/advice[_<tag>].json; a file the advisor did not write is never replaced.

How its accuracy is measured
----------------------------
`advisor_check(records)` takes, for every configuration an experiment trains, (experiment, configuration label,
predicted score from pre-distillation logits, measured Delta = distilled student − no-KD baseline) and returns
Spearman's ρ (scipy.stats.spearmanr) between score and Delta per experiment, with a 95 % percentile bootstrap
interval (scipy.stats.bootstrap, configurations resampled in pairs, 2000 resamples, seeded). ρ is undefined, and
reported as such, for n < 3 or constant values; resamples without a defined ρ are left out of the interval and
counted. "pooled" ranks score and Delta within each experiment (rank / (n + 1)) and correlates those over all
experiments with n ≥ 3, so experiments with different scales mix fairly; "pooled_raw" correlates the raw values.
`plot_check` draws score vs Delta per experiment (plus the pooled ranks) and `check_markdown` the table for the
reproduce report.

Python API
----------
    save_logits(run_dir, role, logits, labels, tag=None, *, split, source, max_rows)   -> Path      (experiments)
    load_logits(path_or_run_dir, role, tag=None) -> Logits(logits, labels, meta);  dense_rows(...) -> (rows, labels)
    advise(teacher_logits, probe_logits, labels=None, threshold=0.996, names=None, *, rule, temperature,
           omega_space) -> dict;  advise_files(teacher, probe=None, labels=None, *, tag, **advise_kw) -> dict
    rank({name: (teacher_logits, probe_logits, labels)}) -> [entry, ...] best first
    advisor_check([(experiment, label, score, delta), ...], plot=None) -> dict;  plot_check;  check_markdown
"""
from __future__ import annotations

import argparse
import json
import math
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from common.config import ConfigError, DataError, atomic_write
from common.divergence import JS_VARIANTS, kl_from_log, split_log_probs
from common.mask import omega

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


def check_logits(logits: Any, where: str, dtype=np.float32) -> np.ndarray:
    """(N, C) finite float logits with C ≥ 2 → array of `dtype` (float32, the file format); otherwise a one-line
    DataError naming `where`.

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
    return a.astype(dtype, copy=False)


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
        raise DataError(f"{path}: not a readable {suffix} file ({type(e).__name__}: {_short(e)})") from None
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


def _check_magic(path: Path, suffix: str) -> None:
    """numpy's own message for a non-numpy file talks about pickles; say what the file is not instead."""
    with open(path, "rb") as f:
        head = f.read(6)
    if suffix == ".npy" and head != b"\x93NUMPY":
        raise DataError(f"{path}: not a .npy file (no NumPy header)")
    if suffix == ".npz" and head[:2] != b"PK":
        raise DataError(f"{path}: not a .npz file (not a zip archive)")


def _read_raw(path: Path, suffix: str):
    _check_magic(path, suffix)
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
        _check_magic(path, suffix)
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
        raise DataError(f"{path}: not a readable {suffix} file ({type(e).__name__}: {_short(e)})") from None
    return check_labels(y, n, classes, f"{path}: labels")


def resolve_logits(path_or_run_dir: str | Path, role: str = "teacher", tag: str | None = None) -> Path:
    """The file `load_logits` reads: a file path as is, else the run directory's `ntd/<role>[_<tag>].npz` (or that
    name inside the directory, when the directory is the `ntd` folder itself)."""
    p = Path(path_or_run_dir)
    if not p.is_dir():
        return p
    inside = logits_path(p, role, tag)
    direct = p / inside.name
    p = direct if not inside.exists() and direct.exists() else inside
    if not p.is_file():
        raise DataError(f"{inside}: {role} logits not found (a run directory needs ntd/{inside.name}, written by "
                        f"common.ntd.save_logits)")
    return p


def load_logits(path_or_run_dir: str | Path, role: str = "teacher", tag: str | None = None) -> Logits:
    """Read a logits file, or a run directory's `ntd/<role>[_<tag>].npz` (see `resolve_logits`). Validated on read
    (shape, finite values, labels in range); one-line DataErrors name the file."""
    return read_scores(resolve_logits(path_or_run_dir, role, tag), f"{role} logits")


# ----------------------------------------------------------------------------------------------------------------
# The advice

LN2 = math.log(2.0)


@dataclass(frozen=True)
class VerdictRule:
    """The verdict's thresholds (see "The verdict" in the module docstring). They were set before any measurement
    and are not fitted to measured Deltas; `advisor_check` measures the ranking, which does not depend on them.

    help_below / hurt_above: the divergence the advice rests on (ncjsd, or target_mass_js for C = 2) as a fraction
        of ln 2 (the textbook JS's maximum); at or below help_below KD is expected to help, at or above hurt_above
        to hurt.
    accuracy_margin, accuracy_z: with labels, a teacher less accurate than the probe by more than accuracy_margin
        (a fraction) plus accuracy_z standard errors of the paired difference (so that one sample cannot flip it) is
        expected to hurt whatever the divergence, and cannot get "help".
    omega_share: a share of samples the ω mask would drop at or above which the verdict suggests the mask.
    variant: the JS variant the verdict and the ranking rest on (textbook | reference; both are reported).
    """
    help_below: float = 0.05
    hurt_above: float = 0.20
    accuracy_margin: float = 0.0
    accuracy_z: float = 2.0
    omega_share: float = 0.10
    variant: str = "textbook"

    def check(self) -> "VerdictRule":
        if self.variant not in JS_VARIANTS:
            raise ConfigError(f"verdict variant: expected one of {list(JS_VARIANTS)}, got {self.variant!r}")
        if not 0 <= self.help_below <= self.hurt_above:
            raise ConfigError(f"verdict thresholds: expected 0 <= help_below <= hurt_above, got "
                              f"{self.help_below} and {self.hurt_above}")
        for key in ("accuracy_margin", "omega_share"):
            value = getattr(self, key)
            if not (math.isfinite(value) and 0 <= value <= 1):
                raise ConfigError(f"verdict {key}: expected a fraction in [0, 1], got {value}")
        if not (math.isfinite(self.accuracy_z) and self.accuracy_z >= 0):
            raise ConfigError(f"verdict accuracy_z: expected a number >= 0, got {self.accuracy_z}")
        return self


def _check_pair(teacher_logits, probe_logits, labels, sources: dict | None):
    src = {"teacher": "teacher logits", "probe": "probe logits", "labels": "labels", **(sources or {})}
    t = check_logits(teacher_logits, src["teacher"], np.float64)
    p = check_logits(probe_logits, src["probe"], np.float64)
    if t.shape != p.shape:
        raise DataError(f"{src['probe']}: shape {tuple(p.shape)} does not match {src['teacher']} {tuple(t.shape)} "
                        f"(the same samples and classes, row by row)")
    y = None if labels is None else check_labels(labels, t.shape[0], t.shape[1], src["labels"])
    return t, p, y


def _js(log_p: torch.Tensor, log_q: torch.Tensor, variant: str, support=None) -> torch.Tensor:
    """Per-row JS of two distributions given as log-probabilities, the formulas of common.divergence (textbook
    ½[KL(P‖M) + KL(Q‖M)], reference ½[KL(M‖P) + KL(M‖Q)]); taking the decomposition of each model once here, not
    once per quantity and variant, made `advise` on 200k × 20 rows take 4.9 s instead of 8.2 s (one busy core);
    a test checks both give the same numbers."""
    log_m = torch.logaddexp(log_p, log_q) - LN2
    a, b = ((log_p, log_m), (log_q, log_m)) if variant == "textbook" else ((log_m, log_p), (log_m, log_q))
    total = sum(kl_from_log(x, z, -1, support) for x, z in (a, b))
    return 0.5 * total


def _per_sample(t: np.ndarray, p: np.ndarray, targets: np.ndarray, with_omega: bool, threshold: float,
                space: str, temperature: float) -> dict:
    """Per-sample divergences (probe vs teacher), argmaxes and ω, as float64 numpy arrays."""
    zt, zp = torch.from_numpy(t), torch.from_numpy(p)
    y = torch.from_numpy(targets)
    bin_t, non_t, support = split_log_probs(zt, y, temperature)
    bin_p, non_p, _ = split_log_probs(zp, y, temperature)
    out = {"teacher_pred": t.argmax(1), "probe_pred": p.argmax(1)}
    for variant in JS_VARIANTS:
        out[f"target_mass_js_{variant}"] = _js(bin_p, bin_t, variant).numpy()
        if t.shape[1] >= 3:
            out[f"ncjsd_{variant}"] = _js(non_p, non_t, variant, support).numpy()
    if with_omega:
        out["omega"] = omega(zt, y, zp, threshold=threshold, space=space, class_dim=1).numpy()
    return out


def _paired_se(a: np.ndarray, b: np.ndarray) -> float:
    """Standard error of mean(a) − mean(b) for paired 0/1 outcomes (per-sample differences, n − 1 dof); 0 for n = 1.
    Samples are taken as independent, which dense outputs (correlated positions) are not: there it is too small."""
    d = a.astype(float) - b.astype(float)
    return float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else 0.0


def _mean(x: np.ndarray, keep: np.ndarray | None = None) -> float | None:
    x = x if keep is None else x[keep]
    return float(x.mean()) if x.size else None


def _omega_stats(w: np.ndarray, per: dict, threshold: float, space: str) -> dict:
    kept = w > 0
    stats = {"threshold": threshold, "space": space, "mean": _mean(w), "dropped_share": _mean(w == 0),
             "downweighted_share": _mean((w > 0) & (w < 1)), "masked_share": _mean(w < 1),
             "kept_samples": int(kept.sum())}
    # The divergence on the samples ω keeps (ω > 0): does the mask select samples with a smaller divergence?
    for key in [k for k in per if k.startswith(("ncjsd_", "target_mass_js_"))]:
        stats[f"{key}_kept"] = _mean(per[key], kept)
    return stats


def _per_class(per: dict, targets: np.ndarray, labels: np.ndarray | None, classes: int, names) -> list[dict]:
    rows = []
    for c in range(classes):
        sel = targets == c
        row = {"class": c, "name": names[c] if names else str(c), "samples": int(sel.sum()),
               "agreement": _mean(per["teacher_pred"] == per["probe_pred"], sel)}
        for key in [k for k in per if k.startswith(("ncjsd_", "target_mass_js_"))]:
            row[key] = _mean(per[key], sel)
        if labels is not None:
            row["teacher_accuracy"] = _mean(per["teacher_pred"] == labels, sel)
            row["probe_accuracy"] = _mean(per["probe_pred"] == labels, sel)
            row["omega_dropped_share"] = _mean(per["omega"] == 0, sel)
            row["omega_masked_share"] = _mean(per["omega"] < 1, sel)
        rows.append(row)
    return rows


def advise(teacher_logits, probe_logits, labels=None, threshold: float = 0.996, names=None, *,
           rule: VerdictRule | None = None, temperature: float = 1.0, omega_space: str = "logits",
           sources: dict | None = None) -> dict:
    """Diagnostics and a verdict for distilling `teacher_logits` into the student modality that `probe_logits` (a
    no-KD model of that modality) represents. Both (N, C), row i the same sample; labels (N,) or None (then the
    teacher's argmax is the target). `names`: C class names for the per-class breakdown. `sources` renames the
    inputs in error messages ({"teacher": file, "probe": file, "labels": file}). Returns a JSON-ready dict."""
    rule = (rule or VerdictRule()).check()
    if not (math.isfinite(threshold) and -1 <= threshold <= 1):
        raise ConfigError(f"omega threshold: expected a cosine in [-1, 1], got {threshold}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"temperature: expected a number > 0, got {temperature}")
    if omega_space not in ("logits", "probs"):
        raise ConfigError(f"omega space: expected logits or probs, got {omega_space!r}")
    t, p, y = _check_pair(teacher_logits, probe_logits, labels, sources)
    n, classes = t.shape
    names = None if names is None else [str(x) for x in names]
    if names is not None and len(names) != classes:
        raise DataError(f"class names (--names): expected {classes} names (one per logit column), got {len(names)}")
    targets = y if y is not None else t.argmax(1)
    per = _per_sample(t, p, targets, y is not None, threshold, omega_space, temperature)
    quantity = "ncjsd" if classes >= 3 else "target_mass_js"
    value = float(per[f"{quantity}_{rule.variant}"].mean())
    result = {"generator": GENERATOR, "format": FORMAT_VERSION, "samples": n, "classes": classes,
              "class_names": names,
              "targets": "labels" if y is not None else "teacher_argmax", "temperature": temperature,
              "quantity": quantity, "variant": rule.variant, "divergence": value,
              "divergence_normalised": value / LN2, "score": -value,
              "agreement": _mean(per["teacher_pred"] == per["probe_pred"]),
              "teacher_accuracy": _mean(per["teacher_pred"] == y) if y is not None else None,
              "probe_accuracy": _mean(per["probe_pred"] == y) if y is not None else None,
              "accuracy_difference_se": _paired_se(per["teacher_pred"] == y, per["probe_pred"] == y)
              if y is not None else None}
    for variant in JS_VARIANTS:
        result[f"ncjsd_{variant}"] = _mean(per[f"ncjsd_{variant}"]) if classes >= 3 else None
        result[f"target_mass_js_{variant}"] = _mean(per[f"target_mass_js_{variant}"])
    result["omega"] = _omega_stats(per["omega"], per, threshold, omega_space) if y is not None else None
    if y is not None:
        result["omega"]["teacher_wrong_share"] = _mean(per["teacher_pred"] != y)
    result["per_class"] = _per_class(per, targets, y, classes, names)
    result["notes"] = _notes(classes, y is not None)
    result["verdict"] = _verdict(result, rule)
    return result


def _notes(classes: int, has_labels: bool) -> list[str]:
    notes = []
    if classes == 2:
        notes.append("ncjsd is undefined for C = 2 (the non-target distribution of a binary problem is a single "
                     "point); the advice rests on target_mass_js, the JS of [p_y, 1 - p_y], a target quantity")
    if not has_labels:
        notes.append("no labels: the teacher's argmax is the target, so the teacher is right by construction, "
                     "accuracies are not reported and the omega mask (which needs the teacher's errors) is undefined")
    return notes


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _verdict(r: dict, rule: VerdictRule) -> dict:
    """help / hurt / uncertain with its evidence, by the rule in the module docstring ("The verdict")."""
    d, q = r["divergence_normalised"], r["quantity"]
    what = ("the teacher's non-target distribution" if q == "ncjsd"
            else "the teacher's target mass (ncjsd is undefined for two classes)")
    evidence = [f"{q} ({r['variant']}) = {r['divergence']:.4f}, {_pct(d)} of ln 2 "
                f"(help at or below {_pct(rule.help_below)}, hurt at or above {_pct(rule.hurt_above)})"]
    ta, pa = r["teacher_accuracy"], r["probe_accuracy"]
    gap = None if ta is None else pa - ta - rule.accuracy_margin - rule.accuracy_z * r["accuracy_difference_se"]
    weaker = gap is not None and gap > 0
    if ta is not None:
        evidence.append(f"teacher accuracy {ta:.3f} vs probe accuracy {pa:.3f}"
                        + (f": the teacher is weaker by more than {rule.accuracy_margin:.3f} + {rule.accuracy_z} "
                           f"standard errors ({r['accuracy_difference_se']:.4f})" if weaker else ""))
    evidence.append(f"argmax agreement {r['agreement']:.3f}")
    if d >= rule.hurt_above or weaker:
        label = "hurt"
        reason = (f"{what} is far from what this modality can express" if d >= rule.hurt_above
                  else "the teacher is less accurate than the probe")
        text = f"expect KD to hurt: {reason}"
    elif d <= rule.help_below:
        label, text = "help", f"expect KD to help: {what} is close to what this modality can express"
    else:
        label = "uncertain"
        text = f"no clear prediction: {what} is neither close to nor far from what this modality can express"
    w = r["omega"]
    if w is not None:
        evidence.append(f"omega (cosine threshold {w['threshold']}) drops {_pct(w['dropped_share'])} of samples "
                        f"and down-weights {_pct(w['downweighted_share'])}")
        text += f"; the omega mask would drop {_pct(w['dropped_share'])} of samples"
        if label != "help" and w["dropped_share"] >= rule.omega_share:
            text += " (worth trying: loss.mask = omega)"
    else:
        text += "; omega undefined without labels"
    return {"label": label, "text": text, "evidence": evidence, "rule": asdict(rule)}


def rank(candidates: dict, threshold: float = 0.996, *, rule: VerdictRule | None = None,
         temperature: float = 1.0, omega_space: str = "logits") -> list[dict]:
    """Candidates (name -> (teacher_logits, probe_logits, labels or None)) for the same student, best first.

    The predicted benefit is `score` = minus the divergence the advice rests on (ncjsd for C >= 3, target_mass_js
    for C = 2; NTDH's claim: the smaller it is, the better KD works); ties keep the given order. Each entry holds
    that quantity, the verdict and the full advice."""
    if not candidates:
        raise DataError("rank: no candidates")
    entries = []
    for name, (t, p, y) in candidates.items():
        srcs = {"teacher": f"{name}: teacher logits", "probe": f"{name}: probe logits", "labels": f"{name}: labels"}
        a = advise(t, p, y, threshold, rule=rule, temperature=temperature, omega_space=omega_space, sources=srcs)
        entries.append({"name": name, "quantity": a["quantity"], "variant": a["variant"],
                        "divergence": a["divergence"], "divergence_normalised": a["divergence_normalised"],
                        "score": a["score"], "verdict": a["verdict"]["label"], "advice": a})
    quantities = {e["quantity"] for e in entries}
    if len(quantities) > 1:
        raise DataError(f"rank: candidates mix class counts ({', '.join(sorted(quantities))}); the scores of "
                        f"different quantities are not comparable")
    entries.sort(key=lambda e: -e["score"])  # stable: ties keep the given order
    for i, e in enumerate(entries, 1):
        e["rank"] = i
    return entries



# ----------------------------------------------------------------------------------------------------------------
# How good is the advice? Predicted scores against measured Deltas

def _spearman_stat(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman's ρ along `axis` (vectorised over bootstrap resamples); NaN where a resample is constant."""
    from scipy.stats import rankdata

    rx, ry = rankdata(x, axis=axis), rankdata(y, axis=axis)
    rx = rx - rx.mean(axis, keepdims=True)
    ry = ry - ry.mean(axis, keepdims=True)
    den = np.sqrt((rx * rx).sum(axis) * (ry * ry).sum(axis))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(axis) / np.where(den > 0, den, 1.0), np.nan)


def correlation(x, y, *, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Spearman ρ (scipy.stats.spearmanr) of paired values with a percentile bootstrap interval
    (scipy.stats.bootstrap, paired resampling, seeded). Undefined (None, with a note) for n < 3 or constant input;
    resamples that are constant have no ρ and are left out of the interval (`resamples_defined` says how many)."""
    from scipy.stats import bootstrap, spearmanr

    x, y = np.asarray(x, float), np.asarray(y, float)
    out = {"n": int(x.size), "rho": None, "p": None, "ci": None, "resamples_defined": None, "note": None}
    if x.size < 3:
        out["note"] = f"undefined: n = {x.size} < 3 configurations"
        return out
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        out["note"] = "undefined: the " + ("predicted scores" if np.ptp(x) == 0 else "measured Deltas") + \
                      " are all equal"
        return out
    rho, p = spearmanr(x, y)
    out["rho"], out["p"] = float(rho), float(p)
    with warnings.catch_warnings():  # constant resamples are expected at small n; they are counted below
        warnings.simplefilter("ignore")
        boot = bootstrap((x, y), _spearman_stat, paired=True, vectorized=True, n_resamples=n_resamples,
                         confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed))
    dist = boot.bootstrap_distribution
    ok = np.isfinite(dist)
    tail = 100 * (1 - confidence) / 2
    out["ci"] = [float(v) for v in np.percentile(dist[ok], [tail, 100 - tail])]
    out["resamples_defined"] = float(ok.mean())
    if x.size < 10:
        out["note"] = f"small n ({x.size}): few distinct resamples, the interval is coarse"
    return out


def _check_records(records) -> list[tuple]:
    out = []
    for i, r in enumerate(records):
        if isinstance(r, dict):
            r = tuple(r.get(k) for k in ("experiment", "label", "predicted", "delta"))
        if len(r) != 4:
            raise DataError(f"advisor_check record {i}: expected (experiment, label, predicted, delta), got {r!r}")
        exp, label, pred, delta = r
        try:
            pred, delta = float(pred), float(delta)
        except (TypeError, ValueError):
            raise DataError(f"advisor_check record {i} ({exp}, {label}): predicted score and Delta must be "
                            f"numbers, got {pred!r} and {delta!r}") from None
        if not (math.isfinite(pred) and math.isfinite(delta)):
            raise DataError(f"advisor_check record {i} ({exp}, {label}): non-finite predicted score or Delta")
        out.append((str(exp), str(label), pred, delta))
    return out


def _within_ranks(values: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(values) / (values.size + 1)


def advisor_check(records, *, plot: str | Path | None = None, n_resamples: int = 2000, confidence: float = 0.95,
                  seed: int = 0) -> dict:
    """How well the predicted scores rank the measured Deltas of distilled students.

    records: (experiment, config label, predicted score, measured Delta) tuples (or dicts with those keys); the
    predicted score is the advisor's `score` from pre-distillation logits, Delta the distilled student's gain over
    the no-KD baseline. Returns Spearman ρ with a bootstrap interval per experiment and pooled. "pooled" ranks each
    experiment's scores and Deltas within the experiment (rank / (n + 1)), so experiments with different scales mix
    fairly, over the experiments with n >= 3; "pooled_raw" is ρ over the raw values of every record, which mixes
    scales and is shown for completeness. `plot`: PNG path for the scatter (see `plot_check`)."""
    recs = _check_records(records)
    by_exp: dict[str, list] = {}
    for r in recs:
        by_exp.setdefault(r[0], []).append(r)
    kw = {"n_resamples": n_resamples, "confidence": confidence, "seed": seed}
    out = {"generator": GENERATOR, "confidence": confidence, "n_resamples": n_resamples, "seed": seed,
           "experiments": {}}
    px, py, used = [], [], []
    for exp, rs in by_exp.items():
        x, y = np.array([r[2] for r in rs]), np.array([r[3] for r in rs])
        out["experiments"][exp] = correlation(x, y, **kw)
        out["experiments"][exp]["labels"] = [r[1] for r in rs]
        if len(rs) >= 3:
            px.append(_within_ranks(x))
            py.append(_within_ranks(y))
            used.append(exp)
    pooled = correlation(np.concatenate(px) if px else [], np.concatenate(py) if py else [], **kw)
    out["pooled"] = {**pooled, "experiments": used}
    out["pooled_raw"] = correlation([r[2] for r in recs], [r[3] for r in recs], **kw)
    if plot is not None:
        out["plot"] = str(plot_check(recs, out, plot))
    return out


def _fmt_rho(c: dict) -> str:
    if c["rho"] is None:
        return "rho undefined"
    return f"rho = {c['rho']:+.2f} [{c['ci'][0]:+.2f}, {c['ci'][1]:+.2f}]"


def plot_check(records, check: dict, path: str | Path) -> Path:
    """Predicted score vs measured Delta, one panel per experiment (each point labelled with its configuration),
    plus the pooled within-experiment ranks; ρ and its interval in each title. Object-oriented matplotlib (Agg)."""
    from common.plots import figure

    recs = _check_records(records)
    exps = list(check["experiments"])
    panels = len(exps) + 1
    cols = min(3, panels)
    rows = -(-panels // cols)
    fig, axes = figure(rows, cols, figsize=(4.4 * cols, 3.6 * rows), squeeze=False)
    for i, exp in enumerate(exps):
        ax = axes[i // cols, i % cols]
        pts = [r for r in recs if r[0] == exp]
        ax.scatter([r[2] for r in pts], [r[3] for r in pts], s=18, color=f"C{i % 10}")
        for r in pts:
            ax.annotate(r[1], (r[2], r[3]), fontsize=6, alpha=0.7, xytext=(2, 2), textcoords="offset points")
        ax.axhline(0, color="grey", lw=0.8, ls="--")
        c = check["experiments"][exp]
        ax.set(xlabel="predicted score (-divergence)", ylabel="measured Delta", title=f"{exp}: {_fmt_rho(c)}")
        ax.title.set_fontsize(8)
        ax.grid(alpha=0.3)
    ax = axes[(panels - 1) // cols, (panels - 1) % cols]
    for i, exp in enumerate(exps):
        pts = [r for r in recs if r[0] == exp]
        if exp in check["pooled"]["experiments"]:
            ax.scatter(_within_ranks(np.array([r[2] for r in pts])), _within_ranks(np.array([r[3] for r in pts])),
                       s=14, color=f"C{i % 10}", label=exp)
    ax.set(xlabel="predicted score, rank within experiment", ylabel="Delta, rank within experiment",
           title=f"pooled: {_fmt_rho(check['pooled'])}", xlim=(0, 1), ylim=(0, 1))
    ax.title.set_fontsize(8)
    ax.grid(alpha=0.3)
    if check["pooled"]["experiments"]:
        ax.legend(fontsize=6)
    for j in range(panels, rows * cols):
        axes[j // cols, j % cols].set_visible(False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def check_markdown(check: dict, plot_link: str | None = None) -> str:
    """The advisor check as a markdown table (for the reproduce report); undefined ρ is shown as such."""
    pct = round(100 * check["confidence"])
    lines = [f"| experiment | n | Spearman rho | {pct} % bootstrap interval | p | note |", "|---|---|---|---|---|---|"]
    rows = list(check["experiments"].items()) + [("pooled (within-experiment ranks)", check["pooled"]),
                                                 ("pooled (raw values, mixes scales)", check["pooled_raw"])]
    for name, c in rows:
        if c["rho"] is None:
            lines.append(f"| {name} | {c['n']} | undefined | - | - | {c['note']} |")
        else:
            lines.append(f"| {name} | {c['n']} | {c['rho']:+.3f} | [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] | "
                         f"{c['p']:.3g} | {c['note'] or ''} |")
    if plot_link:
        lines += ["", f"![predicted score vs measured Delta]({plot_link})"]
    return "\n".join(lines)

# ----------------------------------------------------------------------------------------------------------------
# Readable summaries

def format_advice(r: dict) -> str:
    """The advice as a few lines of text (what the CLI prints)."""
    lines = [f"NTD advisor: {r['samples']} samples, {r['classes']} classes, targets = {r['targets']}"]
    if r["teacher_accuracy"] is not None:
        lines.append(f"  accuracy: teacher {r['teacher_accuracy']:.4f}, probe {r['probe_accuracy']:.4f}; "
                     f"argmax agreement {r['agreement']:.4f}")
    else:
        lines.append(f"  argmax agreement {r['agreement']:.4f}")
    nc = ("undefined for C = 2" if r["ncjsd_textbook"] is None
          else f"textbook {r['ncjsd_textbook']:.4f}, reference {r['ncjsd_reference']:.4f}")
    lines.append(f"  non-target JS (ncjsd): {nc}")
    lines.append(f"  target-mass JS:        textbook {r['target_mass_js_textbook']:.4f}, "
                 f"reference {r['target_mass_js_reference']:.4f}")
    w = r["omega"]
    if w is not None:
        lines.append(f"  omega (cosine >= {w['threshold']}, {w['space']}): drops {_pct(w['dropped_share'])}, "
                     f"down-weights {_pct(w['downweighted_share'])}, mean {w['mean']:.4f}")
    lines.append(_class_table(r))
    lines += [f"  note: {n}" for n in r["notes"]]
    lines.append(f"verdict: {r['verdict']['label'].upper()}: {r['verdict']['text']}")
    lines += [f"  - {e}" for e in r["verdict"]["evidence"]]
    return "\n".join(lines)


def _num(x, fmt: str = ".4f") -> str:
    return "-" if x is None else format(x, fmt)


def _class_table(r: dict) -> str:
    q = f"{r['quantity']}_{r['variant']}"
    labelled = r["teacher_accuracy"] is not None
    head = f"  {'class':<14}{'n':>8}{r['quantity']:>16}{'agree':>8}"
    head += f"{'t acc':>8}{'p acc':>8}{'w drop':>8}" if labelled else ""
    rows = [head]
    for c in r["per_class"]:
        row = f"  {c['name'][:13]:<14}{c['samples']:>8}{_num(c[q]):>16}{_num(c['agreement'], '.3f'):>8}"
        if labelled:
            row += (f"{_num(c['teacher_accuracy'], '.3f'):>8}{_num(c['probe_accuracy'], '.3f'):>8}"
                    f"{_num(c['omega_dropped_share'], '.3f'):>8}")
        rows.append(row)
    return "\n".join(rows)


def format_ranking(entries: list[dict]) -> str:
    """The ranking as a table: rank, candidate, the quantity it rests on, verdict."""
    q = f"{entries[0]['quantity']} ({entries[0]['variant']})"
    width = max(9, *(len(e["name"]) for e in entries)) + 2
    lines = [f"{'rank':<6}{'candidate':<{width}}{q:>24}{'of ln 2':>9}  verdict"]
    for e in entries:
        lines.append(f"{e['rank']:<6}{e['name']:<{width}}{e['divergence']:>24.4f}"
                     f"{_pct(e['divergence_normalised']):>9}  {e['verdict']}")
    lines.append("predicted benefit = -divergence (smaller non-target divergence, better KD: NTDH, arXiv 2409.02438)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Command line

def write_json(path: str | Path, obj: Any) -> Path:
    """Write the advisor's JSON; an existing file is replaced only if the advisor wrote it."""
    path = Path(path)
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            old = None
        if not (isinstance(old, dict) and old.get("generator") == GENERATOR):
            raise DataError(f"{path}: exists and was not written by the NTD advisor; refusing to overwrite it")
    from common.run import atomic_write_json
    return atomic_write_json(path, obj)


def _scores(arg: str, role: str, tag: str | None) -> tuple[Logits, Path]:
    """A role's logits from a file or a run directory; a tagged teacher shares the untagged probe when the run
    directory has no probe of that tag (one no-KD baseline for several teachers)."""
    if role == "probe" and tag and Path(arg).is_dir():
        tagged = [d / f"probe_{tag}.npz" for d in (Path(arg) / "ntd", Path(arg))]
        tag = tag if any(f.exists() for f in tagged) else None
    path = resolve_logits(arg, role, tag)
    return read_scores(path, f"{role} logits"), path


def _labels(teacher: tuple, probe: tuple, labels_arg: str | None):
    """Labels from --labels or from the logits files; every source given must agree."""
    (t, tp), (p, pp) = teacher, probe
    found = [(y, f"{path}") for y, path in ((t.labels, tp), (p.labels, pp)) if y is not None]
    if labels_arg is not None:
        found.insert(0, (read_labels(labels_arg, *t.logits.shape), labels_arg))
    for y, where in found[1:]:
        if y.shape == found[0][0].shape and not np.array_equal(y, found[0][0]):
            raise DataError(f"{where}: its labels differ from those in {found[0][1]} (are the rows aligned?)")
    return (found[0][0], found[0][1]) if found else (None, None)


def _names(items: list[str] | None) -> list[str] | None:
    if not items:
        return None
    return [n for item in items for n in item.split(",") if n] if len(items) == 1 else items


def _rule(args) -> VerdictRule:
    return VerdictRule(args.help_below, args.hurt_above, args.accuracy_margin, args.accuracy_z, args.omega_share,
                       args.variant)


CHECK_RECORDS = "advisor_records.json"


def save_check_records(out_dir: str | Path, records: list[dict]) -> Path:
    """For `make reproduce`'s advisor section: an experiment's reproduction lists, per configuration it trained, where
    the pre-distillation logits are and the Delta it measured. Each record: {"label", "teacher" (a run directory or
    logits file, relative to out_dir or absolute), optional "probe" and "tag", "delta" (KD − no-KD, in points)}.
    Written to `<out_dir>/advisor_records.json`."""
    out_dir = Path(out_dir)
    clean = []
    for i, r in enumerate(records):
        missing = [k for k in ("label", "teacher", "delta") if k not in r]
        if missing:
            raise ValueError(f"advisor record {i}: missing {', '.join(missing)}")
        rec = {k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()}
        rec["delta"] = float(rec["delta"])
        clean.append(rec)
    return write_json(out_dir / CHECK_RECORDS, clean)


def check_from_records(exp_dirs: dict, *, plot: str | Path | None = None, **kw) -> tuple[dict | None, list[dict]]:
    """The advisor check over experiments' saved records ({experiment: its results directory}): every record's
    score is computed from its logits with `advise_files`, then `advisor_check`. Returns (check or None when no
    experiment has records, the scored rows)."""
    rows = []
    for exp, d in exp_dirs.items():
        path = Path(d) / CHECK_RECORDS
        if not path.is_file():
            continue
        for r in json.loads(path.read_text()):
            teacher = Path(r["teacher"]) if Path(r["teacher"]).is_absolute() else Path(d) / r["teacher"]
            probe = r.get("probe")
            probe = None if probe is None else (Path(probe) if Path(probe).is_absolute() else Path(d) / probe)
            a = advise_files(teacher, probe, tag=r.get("tag"))
            rows.append({"experiment": exp, "label": r["label"], "predicted": a["score"], "delta": r["delta"],
                         "quantity": a["quantity"], "divergence": a["divergence"], "verdict": a["verdict"]["label"]})
    if not rows:
        return None, rows
    return advisor_check(rows, plot=plot, **kw), rows


def advise_files(teacher: str | Path, probe: str | Path | None = None, labels: str | Path | None = None, *,
                 tag: str | None = None, **kw) -> dict:
    """`advise` on files or run directories, resolved as the CLI does: `teacher` / `probe` are .npy/.npz/.pt files
    or run directories (`probe` defaults to `teacher`'s run directory; a tagged teacher falls back to the untagged
    probe); labels from `labels`, else from the files (which must agree). The result carries an "inputs" entry."""
    t = _scores(str(teacher), "teacher", tag)
    p = _scores(str(probe if probe is not None else teacher), "probe", tag)
    y, y_src = _labels(t, p, None if labels is None else str(labels))
    srcs = {"teacher": f"{t[1]}", "probe": f"{p[1]}", "labels": f"{y_src}"}
    r = advise(t[0].logits, p[0].logits, y, sources=srcs, **kw)
    r["inputs"] = {"teacher": str(t[1]), "probe": str(p[1]), "labels": y_src, "teacher_meta": t[0].meta,
                   "probe_meta": p[0].meta}
    return r


def _cmd_advise(args) -> dict:
    t_arg, p_arg = args.teacher or args.run, args.probe or args.run
    if t_arg is None or p_arg is None:
        raise ConfigError("advise: give a run directory, or both --teacher and --probe")
    r = advise_files(t_arg, p_arg, args.labels, tag=args.tag, threshold=args.threshold, names=_names(args.names),
                     rule=_rule(args), temperature=args.temperature, omega_space=args.omega_space)
    print(format_advice(r))
    out = args.out or (logits_path(args.run, "teacher", args.tag).with_name(
        f"advice_{args.tag}.json" if args.tag else "advice.json") if args.run else None)
    if out is not None:
        print(f"written: {write_json(out, r)}")
    return r


def _candidates(specs: list[str]) -> dict:
    """`name=teacher,probe[,labels]` files, or run directories (each ntd/teacher[_<tag>].npz is one candidate,
    paired with ntd/probe_<tag>.npz when present, else ntd/probe.npz)."""
    out: dict = {}
    for spec in specs:
        found = _run_candidates(Path(spec)) if "=" not in spec else [_file_candidate(spec)]
        for name, value in found:
            if name in out:
                raise ConfigError(f"rank: candidate name {name!r} given twice")
            out[name] = value
    return out


def _file_candidate(spec: str):
    name, _, files = spec.partition("=")
    parts = files.split(",")
    if not name or len(parts) not in (2, 3) or not all(parts):
        raise ConfigError(f"rank: {spec!r}: expected NAME=TEACHER,PROBE[,LABELS] or a run directory")
    t, p = (read_scores(parts[0], "teacher logits"), Path(parts[0])), (read_scores(parts[1], "probe logits"),
                                                                          Path(parts[1]))
    y, _ = _labels(t, p, parts[2] if len(parts) == 3 else None)
    return name, (t[0].logits, p[0].logits, y)


def _run_candidates(run: Path):
    if not run.is_dir():
        raise DataError(f"{run}: not a run directory (and not NAME=TEACHER,PROBE)")
    teachers = sorted((run / "ntd").glob("teacher*.npz"))
    if not teachers:
        raise DataError(f"{run}: no ntd/teacher*.npz (written by common.ntd.save_logits)")
    found = []
    for f in teachers:
        tag = f.stem[len("teacher_"):] if f.stem.startswith("teacher_") else None
        probe = run / "ntd" / (f"probe_{tag}.npz" if tag and (run / "ntd" / f"probe_{tag}.npz").exists()
                               else "probe.npz")
        if not probe.exists():
            raise DataError(f"{probe}: probe logits not found (needed for {f.name})")
        t, p = (read_scores(f, "teacher logits"), f), (read_scores(probe, "probe logits"), probe)
        y, _ = _labels(t, p, None)
        found.append((f"{run.name}:{tag}" if tag else run.name, (t[0].logits, p[0].logits, y)))
    return found


def _cmd_rank(args) -> list:
    entries = rank(_candidates(args.candidates), args.threshold, rule=_rule(args),
                   temperature=args.temperature, omega_space=args.omega_space)
    print(format_ranking(entries))
    if args.out:
        print(f"written: {write_json(args.out, {'generator': GENERATOR, 'ranking': entries})}")
    return entries


def _parser() -> argparse.ArgumentParser:
    common_opts = argparse.ArgumentParser(add_help=False)
    rule = VerdictRule()
    common_opts.add_argument("--threshold", type=float, default=0.996, help="omega's cosine threshold (0.996)")
    common_opts.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the JS (1)")
    common_opts.add_argument("--omega-space", choices=("logits", "probs"), default="logits")
    common_opts.add_argument("--variant", choices=JS_VARIANTS, default=rule.variant)
    common_opts.add_argument("--help-below", type=float, default=rule.help_below)
    common_opts.add_argument("--hurt-above", type=float, default=rule.hurt_above)
    common_opts.add_argument("--accuracy-margin", type=float, default=rule.accuracy_margin)
    common_opts.add_argument("--accuracy-z", type=float, default=rule.accuracy_z)
    common_opts.add_argument("--omega-share", type=float, default=rule.omega_share)
    common_opts.add_argument("--out", help="JSON file to write")
    p = argparse.ArgumentParser(prog="python -m common.ntd", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("advise", parents=[common_opts], help="diagnose one teacher / probe pair")
    a.add_argument("run", nargs="?", help="run directory with ntd/teacher.npz and ntd/probe.npz")
    a.add_argument("--teacher", help=".npy/.npz/.pt teacher logits, or a run directory")
    a.add_argument("--probe", help=".npy/.npz/.pt probe logits, or a run directory")
    a.add_argument("--labels", help=".npy/.npz/.pt labels (else the files' labels, else the teacher's argmax)")
    a.add_argument("--names", nargs="+", help="class names (space- or comma-separated)")
    a.add_argument("--tag", help="read ntd/<role>_<tag>.npz from run directories")
    r = sub.add_parser("rank", parents=[common_opts], help="rank candidate teachers for the same student")
    r.add_argument("candidates", nargs="+", help="run directories, or NAME=TEACHER,PROBE[,LABELS]")
    return p


def main(argv: list[str] | None = None):
    args = _parser().parse_args(argv)
    return _cmd_advise(args) if args.command == "advise" else _cmd_rank(args)


if __name__ == "__main__":
    from common.run import cli
    cli(main)
