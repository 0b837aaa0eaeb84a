"""The mnist section of results/REPORT.md: the short default (offline stand-in, few epochs, modes 0/1/2 side by side
with the no-KD baseline), numbers and plots from the run."""
from __future__ import annotations

from pathlib import Path

from common import plots

HERE = Path(__file__).resolve().parent
SHORT = HERE / "configs" / "short.yaml"


def run_short(out: Path, device: str = "auto"):
    from mnist import main as M
    args = M.parse_args(["--config", str(SHORT), "--out", str(out), "--device", device])
    cfg, _ = M.resolve_config(args)
    return M.run(cfg, ["cal_tag", "eval_tag", "base_line", "heat_map"], out, device) + (cfg,)


def section(results: dict, cfg: dict, run_dir: Path, rel_to: Path) -> str:
    rel = lambda name: (Path(run_dir) / name).relative_to(rel_to).as_posix()
    cal, ev = results["cal_tag"], results["eval_tag"]
    bl = ev.get("baseline") or results["base_line"]
    modes = ev["modes"]
    names = {"0": "mode 0 (random)", "1": "mode 1 (remove least salient)", "2": "mode 2 (remove most salient)"}
    groups = [names.get(m, f"mode {m}") for m in modes] + ["no KD (CE only)"]
    val = [modes[m]["val_mean"] for m in modes] + [bl["val_mean"]]
    test = [modes[m]["test_mean"] for m in modes] + [bl["test_mean"]]
    test_std = [modes[m]["test_std"] for m in modes] + [bl["test_std"]]
    bars = plots.grouped_bars(Path(run_dir) / "modes.png", groups, {"val": (val,), "test": (test, test_std)},
                              ylabel="student accuracy", title="MNIST-M student by teacher channel removal")
    n_runs = cfg["train"]["num_runs"]
    tc, dc = cfg["train"], cfg["distill"]
    note = f" **{results['data_note']}**" if results.get("data_note") else ""
    lines = ["## NTDH MNIST → MNIST-M with Algorithm-1 channel removal (`mnist`)", "",
             f"Data: {results['data_source']}{note} (train {results['sizes']['train']}, val {results['sizes']['val']} "
             f"carved from train, test {results['sizes']['test']}). Short default `mnist/configs/short.yaml`: MLP "
             f"in-{cfg['model']['hidden'][0]}-{cfg['model']['hidden'][1]}-10, joint training {cfg['cal']['epochs']} "
             f"epochs, students {tc['epochs']} epochs (SGD lr {tc['lr']}, momentum {tc['momentum']}, batch "
             f"{tc['batch_size']}), {n_runs} run(s) per row, KD `{dc['method']}` (CE ×{dc['gt_weight']} + terms "
             f"×{dc['pl_weight']}), {int(cfg['eval']['ratio'] * 100)} % of the place-{cfg['place']} channels removed. "
             f"Run directory: `{Path(run_dir).relative_to(rel_to.parent).as_posix()}`.", "",
             "| teacher / student | val acc | test acc (mean ± std) | teacher test acc after removal |",
             "|---|---|---|---|"]
    for m in modes:
        r = modes[m]
        lines.append(f"| {names.get(m, m)} | {r['val_mean']:.4f} | {r['test_mean']:.4f} ± {r['test_std']:.4f} | "
                     f"{r['teacher_acc']['test']:.4f} |")
    lines.append(f"| no KD (CE only) | {bl['val_mean']:.4f} | {bl['test_mean']:.4f} ± {bl['test_std']:.4f} | – |")
    lines += ["", f"Test accuracy of the KD teacher ({cfg['teacher']}, on "
              f"{cfg['stu_type'] == 0 and 'MNIST' or 'MNIST-M'}) {cal['teacher_acc']['test']:.4f} and of the joint "
              f"(Algorithm-1) student {cal['student_acc']['test']:.4f}; the unmodified saliency teacher has test "
              f"accuracy {ev['teacher_acc']['test']:.4f}.", "",
              f"![student accuracy by mode]({rel(bars.name)})", ""]
    best = max(modes, key=lambda m: modes[m]["test_mean"])
    spread = max(modes[m]["test_std"] for m in modes)
    order = sorted(modes, key=lambda m: -modes[m]["test_mean"])
    gap = 100 * (modes[order[0]]["test_mean"] - modes[order[-1]]["test_mean"])
    t_order = sorted(modes, key=lambda m: -modes[m]["teacher_acc"]["test"])
    lines.append("**Student accuracy by mode.** On the test split the KD students reach "
                 + ", ".join(f"{modes[m]['test_mean']:.3f} ({names.get(m, m)})" for m in modes)
                 + f" against {bl['test_mean']:.3f} without KD; the best is {names.get(best, best)}, "
                 f"{gap:.1f} points above the worst, with a largest per-mode std of {100 * spread:.1f} points over "
                 f"{n_runs} run(s). MFH/NTDH predict mode 1 (keeping the modality-general channels) ≥ mode 0 ≥ "
                 f"mode 2. The channel-removed teachers rank "
                 + " > ".join(f"{names.get(m, m)} ({modes[m]['teacher_acc']['test']:.3f})" for m in t_order)
                 + " in their own test accuracy, and KD "
                 + ("beats" if max(modes[m]['test_mean'] for m in modes) > bl['test_mean'] else "does not beat")
                 + " the CE-only student here.")
    lines.append("")
    sal = cal["saliency"]
    for name in cal["plots"]:
        mode = name.rsplit("mode", 1)[1].split(".")[0]
        lines += [f"![saliency, mode {mode}]({rel(name)})", ""]
        removed = modes.get(mode, {}).get("removed", [])
        kept = [sal[c] for c in range(len(sal)) if c not in set(removed)]
        mean_removed = sum(sal[c] for c in removed) / max(len(removed), 1)
        took = "" if cal["saliency_seconds"] is None else f" in {cal['saliency_seconds']:.1f} s"
        over = "the first {} batches".format(cfg["cal"]["max_batches"]) if cfg["cal"]["max_batches"] else \
            "the whole train split"
        lines.append(f"**Saliency vector, mode {mode}.** {len(sal)} channels at place {cfg['place']}, min-max "
                     f"normalised (computed{took} over {over}); mode "
                     f"{mode} removes {len(removed)} of them (red), whose mean saliency is {mean_removed:.3f} "
                     f"against {sum(kept) / max(len(kept), 1):.3f} for the {len(kept)} kept.")
        lines.append("")
    lines += [f"![heat maps]({rel(results['heat_map']['plot'])})", "",
              f"**Heat maps.** |∂ logit_y / ∂ x| of the saliency teacher for {cfg['heat_map']['num_images']} noisy "
              f"test inputs: the unmodified teacher, then the teacher with each mode's channels removed.", ""]
    return "\n".join(lines)


def reproduce(results_dir: Path, device: str = "auto") -> str:
    results_dir = Path(results_dir)
    rd, results, cfg = run_short(results_dir / "mnist", device)
    advisor_records(results, rd.path, results_dir / "mnist")
    return section(results, cfg, rd.path, results_dir)


def advisor_records(results: dict, run_dir: Path, out_dir: Path) -> None:
    """For the NTD advisor's check: per removal mode, the teacher after removal (ntd/teacher_mode<m>.npz) against the
    CE-only probe, and the measured Delta = KD student − CE-only baseline (test accuracy, points)."""
    from common import ntd

    ev = results["eval_tag"]
    base = ev.get("baseline") or results.get("base_line")
    if not base:
        return
    records = [{"label": f"mode {m}", "teacher": Path(run_dir), "tag": f"mode{m}",
                "delta": 100 * (r["test_mean"] - base["test_mean"])}
               for m, r in ev["modes"].items() if ntd.logits_path(run_dir, "teacher", f"mode{m}").is_file()]
    if records:
        ntd.save_check_records(out_dir, records)
