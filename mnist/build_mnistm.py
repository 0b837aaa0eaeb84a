"""Build MNIST-M (as the NTDH repository's MNIST/dataloader/create_mnistm.py) and write the reference's pickle layout:
`python build_mnistm.py --backgrounds BSR_bsds500.tgz`.

    python build_mnistm.py --mnist dataset --backgrounds BSR_bsds500.tgz --out dataset   # real MNIST IDX + BSDS500
    python build_mnistm.py --mnist dataset --backgrounds my_photos/ --out dataset       # any folder of images
    python build_mnistm.py --standin --out /tmp/standin                                  # offline stand-in, same layout

Writes <out>/MNIST/mnist_data.pkl and <out>/MNIST_M/mnist_m_data.pkl (keys train, train_label, val, val_label).
Each digit goes onto a random 28×28 crop of a random background as |crop − 255·1[digit > 0]|, from one seeded RNG.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

from common.config import DataError  # noqa: E402
from common.run import cli  # noqa: E402
from mnist import data as D  # noqa: E402


def build(mnist_root: Path | None, backgrounds: Path | None, out: Path, seed: int = 42, standin: bool = False,
          standin_test_fraction: float = 0.2, log=print) -> tuple[Path, Path]:
    if standin:
        train, test = D.standin_pair(seed, standin_test_fraction)
        log(f"stand-in: {len(train)} train / {len(test)} test sklearn digits on sklearn sample photos")
    else:
        if mnist_root is None or backgrounds is None:
            raise DataError("build_mnistm: --mnist and --backgrounds are required (or use --standin)")
        files = D.find_idx(mnist_root)
        if files is None:
            raise DataError(f"{mnist_root}: no MNIST IDX files ({', '.join(D.IDX_FILES.values())}[.gz])")
        (tr_x, tr_y), (te_x, te_y) = D.read_mnist_idx(files)
        bgs = D.load_backgrounds(backgrounds)
        log(f"{len(bgs)} background images from {backgrounds}; composing {len(tr_y)} + {len(te_y)} digits")
        train = D.Split(tr_x, D.compose_mnistm(tr_x, bgs, seed), tr_y)
        test = D.Split(te_x, D.compose_mnistm(te_x, bgs, seed + 1), te_y)
    paths = D.write_pickle_layout(out, train, test)
    for split, s in (("train", train), ("val", test)):
        log(f"{split}: MNIST {s.mnist.shape} MNIST-M {s.mnist_m.shape} labels {s.labels.shape}")
    log(f"pixel mean: MNIST {np.mean([train.mnist.mean(), test.mnist.mean()]):.2f}, "
        f"MNIST-M {np.mean([train.mnist_m.mean(), test.mnist_m.mean()]):.2f}")
    log(f"wrote {paths[0]} and {paths[1]}")
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mnist", type=Path, help="folder holding the MNIST IDX files (or MNIST/raw/ under it)")
    p.add_argument("--backgrounds", type=Path, help="BSR_bsds500.tgz (train images used) or a folder of images")
    p.add_argument("--out", type=Path, required=True, help="data root to write MNIST/ and MNIST_M/ into")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--standin", action="store_true", help="build from scikit-learn's digits and sample photos")
    args = p.parse_args(argv)
    build(args.mnist, args.backgrounds, args.out, args.seed, args.standin)


if __name__ == "__main__":
    cli(main)
