"""Evaluate a trained SSC model on the test split (the seed's test.py): dataset-level and per-sample scores.

    python test.py --model=ddrnet --dataset=nyucad --batch_size=4 --resume=runs/<run>/checkpoint/cpBest_ddrnet.pth
    python test.py --demo --model=ddrnet --resume=...            # on the demo's synthetic test scenes
Accepts our checkpoints and the reference's {'state_dict': ...} files ('module.' prefixes are stripped).
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from common import config as C  # noqa: E402
from common.run import RunDir, cli  # noqa: E402
from nyu_ssc import engine, outputs  # noqa: E402
from nyu_ssc import main as ssc_main  # noqa: E402
from nyu_ssc.metrics import format_result  # noqa: E402


def parse_args(argv=None):
    p = ssc_main.add_common_flags(C.base_parser(__doc__.splitlines()[0]))
    p.add_argument("--resume", required=True, help="checkpoint to evaluate")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    ckpt = args.resume
    args.resume = None  # a checkpoint to load, not a run to continue
    cfg = ssc_main.resolve_config(args)
    dev = C.resolve_device(args.device)
    ssc_main.set_threads(cfg)
    rd = RunDir.create(args.out, f"{cfg['name']}_test", config=cfg, code_from=HERE)
    name = cfg["model"]["name"]
    model = engine.build(cfg, name, dev)
    engine.load_weights(model, ckpt)
    rd.log(f"evaluating {name} from {ckpt} on the {cfg['data']['dataset']} test split ({dev})")
    test_set = engine.datasets(cfg, engine.data_dirs(cfg, rd.path, log=rd.log), splits=("test",))["test"]
    res, kept = engine.evaluate(model, engine.eval_loader(cfg, test_set), cfg, dev, keep=cfg["eval"]["viz_samples"])
    for agg in outputs.AGGS:
        rd.log("Validate with TSDF: " + format_result(res[agg], agg))
    if kept:
        outputs.slice_plot(rd.file(f"slices_{name}.png"), kept,
                           f"{name}: prediction vs ground truth ({Path(ckpt).name})")
    results = {name: {"test": res}}
    rows = [r for r in outputs.class_rows({name: {"val": res, "test": res}}) if r["split"] == "test"]
    rd.write_csv("results.csv", rows, ["model", "split", "aggregation", "class", "iou"])
    rd.write_summary({"experiment": "nyu_ssc", "checkpoint": str(ckpt), "split": "test",
                      "headline": "per_sample" if cfg["parity"] else "dataset", "results": results, "config": cfg})
    rd.log("per-class IoU (%), dataset-level:\n" + outputs.markdown_table(results, "dataset"))
    rd.close()
    return res


if __name__ == "__main__":
    cli(main)
