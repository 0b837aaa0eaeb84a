"""Shared helpers of the nyu_ssc tests (a unique module name: other test folders have their own conftest)."""
from pathlib import Path

SSC = Path(__file__).resolve().parents[2] / "nyu_ssc"

# A grid small enough for CPU tests: 16×8×16 → 4×2×4 voxels, 24×32 images, over the --demo preset.
TINY = ["grid.hr=[16,8,16]", "grid.lr=[4,2,4]", "grid.image=[24,32]", "grid.voxel_size=0.25",
        "grid.intrinsics=[25.94,25.94,16.0,12.0]", "convert.tsdf_trunc=0.75", "data.demo.train=3",
        "data.demo.test=2", "train.batch_size=2", "train.epochs=1", "eval.viz_samples=1", "progress=false",
        "kd.teacher_epochs=1"]


def set_args() -> list[str]:
    out = []
    for item in TINY:
        out += ["--set", item]
    return out


def tiny_cfg() -> dict:
    from nyu_ssc import main as ssc_main
    return ssc_main.resolve_config(ssc_main.parse_args(["--demo", *set_args()]))
