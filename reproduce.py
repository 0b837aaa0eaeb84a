"""`make reproduce`: run every experiment's short reproduction and write results/REPORT.md with tables and plots.

Each experiment folder that has a `report.py` with `reproduce(results_dir, device) -> markdown` takes part; they run
in the order below (the synthetic suites first), then any other folder alphabetically.
    python reproduce.py [--only gauss,mnist] [--results results] [--device auto] [--workers N]

`--workers` (default: every CPU core) goes to the experiments whose `reproduce` takes it (the synthetic sweeps,
whose runs it splits over processes on CPU).

The last section is the NTD advisor's check: every experiment whose reproduction wrote
`results/<exp>/advisor_records.json` (`common.ntd.save_check_records`: per configuration trained, where its
pre-distillation teacher and probe logits are, and the Delta its distilled student measured) is scored by the advisor
from the logits alone, and the scores are set against the measured Deltas (Spearman ρ with a bootstrap interval,
per experiment and pooled, and a plot).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
ORDER = ["gauss", "sklearn_exp", "mnist", "ravdess", "m2pkd", "semantic_kitti", "nyu_ssc"]


def experiments() -> list[str]:
    found = sorted(p.parent.name for p in ROOT.glob("*/report.py"))
    return [e for e in ORDER if e in found] + [e for e in found if e not in ORDER]


def advisor_section(results: Path, names: list[str]) -> str:
    """REPORT.md's NTD-advisor section, from the records the experiments' reproductions wrote in this run."""
    from common import ntd

    head = ["## NTD advisor: predicted from pre-distillation logits vs measured Delta", ""]
    exp_dirs = {n: results / n for n in names if (results / n / ntd.CHECK_RECORDS).is_file()}
    try:
        check, rows = ntd.check_from_records(exp_dirs, plot=results / "advisor_check.png")
    except Exception as e:  # a broken record must not cost the rest of the report
        traceback.print_exc()
        return "\n".join(head + [f"The advisor check failed: {e}", ""])
    if check is None:
        return "\n".join(head + ["No experiment wrote advisor records in this run.", ""])
    lacking = [n for n in names if n not in exp_dirs]
    lines = head + [
        "Each configuration's teacher and no-KD probe logits on the selection split are scored by "
        "`python -m common.ntd` (score = −divergence: textbook non-target JS, or the target-mass JS for two classes) "
        "before looking at the distilled student; the table asks whether that score ranks the measured Deltas "
        "(distilled − no-KD). A ρ near zero or negative means the divergence did not predict there.", "",
        ntd.check_markdown(check, plot_link="advisor_check.png"), "",
        "| experiment | configuration | quantity | divergence | verdict | measured Delta |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['experiment']} | {r['label']} | {r['quantity']} | {r['divergence']:.4f} | "
                     f"{r['verdict']} | {r['delta']:+.2f} |")
    if lacking:
        lines += ["", f"No advisor records from: {', '.join(lacking)} (regression targets, or the reproduction "
                      f"trains no distilled student to compare)."]
    (results / "advisor_check.json").write_text(json.dumps({"check": check, "rows": rows}, indent=2, default=str))
    return "\n".join(lines + [""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="comma-separated experiment folders (default: all)")
    p.add_argument("--results", default=str(ROOT / "results"))
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes for the synthetic sweeps' runs (CPU; default: every core)")
    args = p.parse_args(argv)
    names = experiments() if not args.only else [s.strip() for s in args.only.split(",")]
    unknown = [n for n in names if n not in experiments()]
    if unknown:
        print(f"error: --only: no report.py in {unknown}; available: {', '.join(experiments())}", file=sys.stderr)
        return 2
    results = Path(args.results).resolve()
    results.mkdir(parents=True, exist_ok=True)
    sections, failed = [], []
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        started = time.perf_counter()
        try:
            entry = importlib.import_module(f"{name}.report").reproduce
            extra = {"workers": args.workers} if "workers" in inspect.signature(entry).parameters else {}
            sections.append(entry(results, args.device, **extra))
        except Exception:  # one broken experiment must not hide the others' results
            traceback.print_exc()
            failed.append(name)
            sections.append(f"## {name}\n\nThe reproduction failed; see the console output of `make reproduce`.\n")
        print(f"=== {name}: {time.perf_counter() - started:.1f} s ===", flush=True)
    sections.append(advisor_section(results, names))
    report = ["# Reproduction report", "",
              f"Generated by `make reproduce` on {datetime.now():%Y-%m-%d %H:%M}. Every number and plot below comes "
              f"from this run; the run directories beside this file hold the CSV/JSON results, logs and configs.", ""]
    (results / "REPORT.md").write_text("\n".join(report + sections) + "\n")
    print(f"\nwrote {results / 'REPORT.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
