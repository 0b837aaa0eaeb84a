"""Compare a gauss sweep with per-run results of another implementation -- typically the NTDH repository's own
gauss/main.py -- run by run (same data seed) and per setting.

    python gauss/compare_reference.py REFERENCE.csv [REFERENCE.csv ...] RUN_DIR [--tolerance 2.5]

Each REFERENCE.csv holds one row per (method, overlap, run): `mode` (the reference's names: KD_KL, KD_KL_PSSM, dkd,
dkd_PSSM, hint, rkd, pkt, similarity, crd) or `loss` + `mask` (ours); `overlap_dim`; `seed` (the data seed of
`run_mm(seed, ...)`) or `run` (then seed = --reference-seed + run, the reference's `exp(seed=0)`); and the
accuracies `teacher_acc`, `no_kd_acc`, `kd_acc` as fractions. RUN_DIR is a gauss γ-sweep run directory (its
`runs.csv`), usually made with `--parity`.

For every (loss, mask, γ) of the reference that the run trained, on the runs both have: Delta =
(kd_acc − no_kd_acc)·100 of each side, their means, the mean paired difference and its standard error (the runs
share their data seed, so the difference is paired), z = difference / SE, the two-sided p-value of the paired
t-test (with few runs the SE is itself uncertain: at 2 runs |z| = 2.5 is p ≈ 0.24), and how many runs agree exactly
(the same teacher, no-KD and KD test accuracy: the same data, initial weights and training). A row passes when
|z| ≤ tolerance, or -- when every run agrees, so the SE is 0 -- when the difference is 0; a row with one differing
run has no SE and is reported as untestable. (loss, mask) pairs the run did not train are listed and skipped.
Writes `reference_comparison.csv` into RUN_DIR; exit status 1 when a row fails.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402

from common.config import DataError  # noqa: E402
from common.run import cli  # noqa: E402

#: the reference's `mode` names (NTDH gauss/main.py, train_kd) → our (loss, mask)
REFERENCE_MODES = {"KD_KL": ("kl", "none"), "KD_KL_PSSM": ("kl", "omega"), "dkd": ("dkd", "none"),
                   "dkd_PSSM": ("dkd", "omega"), "hint": ("fitnet", "none"), "rkd": ("rkd", "none"),
                   "pkt": ("pkt", "none"), "similarity": ("sp", "none"), "crd": ("crd", "none")}
ACCURACIES = ("teacher_acc", "no_kd_acc", "kd_acc")
#: two accuracies on the same 1000 test samples are "the same" when they differ by less than half a sample
SAME = 5e-4
COLUMNS = ["loss", "mask", "overlap_dim", "gamma", "runs", "identical_runs", "ref_delta_mean", "ours_delta_mean",
           "diff_mean", "diff_se", "z", "p", "pass"]


def _read(path: Path, need: set[str], what: str) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: not found; expected {what}")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a CSV file ({str(e).splitlines()[0]})") from None
    missing = sorted(need - set(df.columns))
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; expected {what}")
    for col in sorted({"overlap_dim", "seed", "run", *ACCURACIES} & set(df.columns)):
        values = pd.to_numeric(df[col], errors="coerce")
        if values.isna().any():
            row = int(values.isna().to_numpy().argmax())
            got = df[col].iloc[row]
            got = "an empty cell" if pd.isna(got) else repr(got)
            raise DataError(f"{path}: column {col}, data row {row + 1}: expected a number, got {got}")
        df[col] = values
    return df


REFERENCE_WHAT = "columns mode (or loss and mask), overlap_dim, seed (or run), " + ", ".join(ACCURACIES)


def load_reference(path: Path, reference_seed: int = 0) -> pd.DataFrame:
    """The reference's per-run CSV with our loss / mask names and a `seed` column."""
    return load_reference_frame(_read(path, {"overlap_dim", *ACCURACIES}, REFERENCE_WHAT), reference_seed, path)


def load_reference_frame(df: pd.DataFrame, reference_seed: int = 0, source: Path | str = "reference") -> pd.DataFrame:
    df = df.copy()
    if "mode" in df.columns:
        unknown = sorted(set(df["mode"]) - set(REFERENCE_MODES))
        if unknown:
            raise DataError(f"{source}: unknown mode(s) {', '.join(map(str, unknown))}; expected one of "
                            f"{', '.join(REFERENCE_MODES)}")
        df["loss"] = [REFERENCE_MODES[m][0] for m in df["mode"]]
        df["mask"] = [REFERENCE_MODES[m][1] for m in df["mode"]]
    elif not {"loss", "mask"} <= set(df.columns):
        raise DataError(f"{source}: missing column(s) mode (or loss and mask); expected {REFERENCE_WHAT}")
    if "seed" not in df.columns:
        if "run" not in df.columns:
            raise DataError(f"{source}: missing column(s) seed (or run); expected {REFERENCE_WHAT}")
        df["seed"] = reference_seed + df["run"]
    return df


def load_ours(run_dir: Path) -> pd.DataFrame:
    return _read(run_dir / "runs.csv", {"loss", "mask", "overlap_dim", "gamma", "seed", *ACCURACIES},
                 "the runs.csv of a gauss γ-sweep run directory (python gauss/main.py ...)")


def trained_only(ref: pd.DataFrame, ours: pd.DataFrame) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """The reference rows of the (loss, mask) pairs the run trained, and the pairs it did not."""
    trained = set(zip(ours["loss"], ours["mask"]))
    pairs = list(dict.fromkeys(zip(ref["loss"], ref["mask"])))
    keep = [pair in trained for pair in zip(ref["loss"], ref["mask"])]
    return ref[keep], [pair for pair in pairs if pair not in trained]


def compare(ref: pd.DataFrame, ours: pd.DataFrame, tolerance: float = 2.5) -> list[dict]:
    """One row per (loss, mask, overlap) of the reference (module doc); `pass` is None for an untestable row."""
    key = ["loss", "mask", "overlap_dim", "seed"]
    if ref.duplicated(key).any():
        first = ref[ref.duplicated(key)].iloc[0]
        raise DataError(f"reference: (loss, mask, overlap_dim, seed) = ({first['loss']}, {first['mask']}, "
                        f"{first['overlap_dim']}, {first['seed']}) appears twice")
    both = ref.drop(columns=["gamma"], errors="ignore").merge(ours, on=key, suffixes=("_ref", "_ours"))
    if both.empty:
        raise DataError("no (loss, mask, overlap_dim, seed) in common between the reference and the run; check that "
                        "the run covers the reference's methods, overlaps and seeds (--reference-seed)")
    rows = []
    for (loss, mask, ov), g in ref.groupby(["loss", "mask", "overlap_dim"], sort=False):
        m = both[(both["loss"] == loss) & (both["mask"] == mask) & (both["overlap_dim"] == ov)]
        row = {"loss": loss, "mask": mask, "overlap_dim": int(ov), "runs": len(m)}
        if not len(m):
            rows.append({**row, "gamma": float("nan"), "identical_runs": 0, "pass": False})
            continue
        d_ref = (m["kd_acc_ref"] - m["no_kd_acc_ref"]).to_numpy() * 100
        d_ours = (m["kd_acc_ours"] - m["no_kd_acc_ours"]).to_numpy() * 100
        diff = d_ours - d_ref
        diff[np.abs(diff) < SAME * 100] = 0.0  # under half a test sample: float rounding of the same count
        diff = diff.round(6)  # float32 accuracies: equal counts' differences are then exactly equal (SE 0, not 1e-15)
        same = np.ones(len(m), bool)
        for a in ACCURACIES:
            same &= (m[f"{a}_ref"] - m[f"{a}_ours"]).abs().to_numpy() < SAME
        se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
        p = float("nan")
        if se > 0:
            z = diff.mean() / se
            p = float(stats.ttest_1samp(diff, 0.0).pvalue)
            ok = bool(abs(z) <= tolerance)
        elif diff.mean() == 0:  # every run agrees
            z, ok = 0.0, True
        elif len(diff) == 1:    # one differing run: no standard error, no test
            z, ok = float("nan"), None
        else:                   # several runs, every one off by the same nonzero amount
            z, ok = float("inf"), False
        rows.append({**row, "gamma": float(m["gamma"].iloc[0]), "identical_runs": int(same.sum()),
                     "ref_delta_mean": d_ref.mean(), "ours_delta_mean": d_ours.mean(), "diff_mean": diff.mean(),
                     "diff_se": se, "z": z, "p": p, "pass": ok})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| loss | mask | γ | runs | identical runs | reference Delta | ours Delta | difference ± SE | z | "
             "paired t-test p | pass |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["runs"]:
            lines.append(f"| {r['loss']} | {r['mask']} | ov {r['overlap_dim']} | 0 | – | – | – | – | – | – | no run "
                         f"in common |")
            continue
        se = "–" if not np.isfinite(r["diff_se"]) else f"{r['diff_se']:.2f}"
        z = "–" if np.isnan(r["z"]) else f"{r['z']:+.2f}"
        p = "–" if np.isnan(r["p"]) else f"{r['p']:.2f}"
        verdict = {True: "yes", False: "NO", None: "untestable (1 run)"}[r["pass"]]
        lines.append(f"| {r['loss']} | {r['mask']} | {r['gamma']:.2f} | {r['runs']} | {r['identical_runs']} | "
                     f"{r['ref_delta_mean']:+.2f} | {r['ours_delta_mean']:+.2f} | {r['diff_mean']:+.2f} ± {se} | "
                     f"{z} | {p} | {verdict} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("reference", type=Path, nargs="+", help="per-run CSV(s) of the other implementation")
    p.add_argument("run_dir", type=Path, help="a gauss γ-sweep run directory (holds runs.csv)")
    p.add_argument("--tolerance", type=float, default=2.5, help="largest |z| that passes (default 2.5)")
    p.add_argument("--reference-seed", type=int, default=0,
                   help="seed of the reference's exp(seed=...) when REFERENCE.csv has run, not seed (default 0)")
    args = p.parse_args(argv)
    ref = pd.concat([load_reference(path, args.reference_seed) for path in args.reference], ignore_index=True)
    ours = load_ours(args.run_dir)
    ref, skipped = trained_only(ref, ours)
    if ref.empty:
        raise DataError(f"{args.run_dir / 'runs.csv'}: the run trained none of the reference's (loss, mask) pairs "
                        f"({', '.join(f'{lo}/{m}' for lo, m in skipped)})")
    rows = compare(ref, ours, args.tolerance)
    out = args.run_dir / "reference_comparison.csv"
    pd.DataFrame(rows, columns=COLUMNS).to_csv(out, index=False)
    print(markdown(rows))
    if skipped:
        print(f"\nnot in this run, skipped: {', '.join(f'{lo}/{m}' for lo, m in skipped)}")
    failed = [r for r in rows if r["pass"] is False]
    untestable = sum(r["pass"] is None for r in rows)
    tested = len(rows) - untestable
    print(f"\n{tested - len(failed)} of {tested} rows within {args.tolerance} standard errors (paired over the runs "
          f"both have)" + (f"; {untestable} untestable (one differing run)" if untestable else "")
          + f"; written to {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(cli(main))
