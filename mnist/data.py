"""MNIST / MNIST-M data: readers for the real on-disk formats, the MNIST-M composition, the offline stand-in, and a
device-resident batch loader with per-batch noise (the NTDH repository's MNIST/dataloader/create_mnistm.py
and MNIST/dataloader/dataset.py, `CrossModalData`).

On-disk formats read here (under `data.root`):
  * the reference's pickle layout: `MNIST/mnist_data.pkl` and `MNIST_M/mnist_m_data.pkl`, each a dict with `train`
    (N,28,28,3) uint8, `train_label` (N,) int, `val` (M,28,28,3) uint8, `val_label` (M,) int (`val` is the MNIST test
    split); MNIST's three channels are copies of the grayscale digit;
  * the standard IDX files `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`,
    `t10k-labels-idx1-ubyte` (optionally `.gz`), directly under the root, under `MNIST/raw/` (torchvision's layout) or
    `MNIST/`; MNIST-M then comes from its pickle, or is composed in memory from `data.backgrounds`.
When the root holds no MNIST at all and `data.source` is `auto`, the stand-in is used: scikit-learn's bundled 8×8
digits upsampled to 28×28, composed onto scikit-learn's bundled sample photos by the same MNIST-M rule. Everything
after `load_pair` sees the same `Pair` whichever source it came from.
"""
from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from common.config import ConfigError, DataError

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}
PICKLE_MNIST = Path("MNIST") / "mnist_data.pkl"
PICKLE_MNISTM = Path("MNIST_M") / "mnist_m_data.pkl"
PICKLE_KEYS = ("train", "train_label", "val", "val_label")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
BSDS_TRAIN_PREFIX = "BSR/BSDS500/data/images/train/"
SOURCES = ("auto", "pickle", "idx", "standin", "download")
STANDIN_SOURCE = "offline stand-in (sklearn digits + sample photos)"
STANDIN_NOTE = "stand-in: smoke test only"


@dataclass
class Split:
    mnist: np.ndarray     # (N, 28, 28) uint8 grayscale
    mnist_m: np.ndarray   # (N, 28, 28, 3) uint8
    labels: np.ndarray    # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> "Split":
        return Split(self.mnist[idx], self.mnist_m[idx], self.labels[idx])


@dataclass
class Pair:
    train: Split
    test: Split
    source: str           # "pickle", "idx", "standin" and where from, for the log

    @property
    def is_standin(self) -> bool:
        return self.source == STANDIN_SOURCE


# ----------------------------------------------------------------------------------------------------------------------
# IDX


def _open_maybe_gz(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: not a valid gzip file ({e})") from None
    return raw


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (`.gz` or plain) as a numpy array: magic 0x0000 <type> <ndim>, big-endian int32 dims, data."""
    path = Path(path)
    raw = _open_maybe_gz(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: expected an IDX file (magic 0x0000TTDD), got {raw[:4].hex() or 'an empty file'}")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = raw[2], raw[3]
    if code not in dtypes:
        raise DataError(f"{path}: unknown IDX data type 0x{code:02x}; expected one of "
                        f"{', '.join(f'0x{c:02x}' for c in dtypes)}")
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header ({ndim} dimensions announced)")
    dims = struct.unpack(f">{ndim}i", raw[4:4 + 4 * ndim])
    dtype = np.dtype(dtypes[code])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = raw[4 + 4 * ndim:]
    if len(body) != expected:
        raise DataError(f"{path}: expected {expected} data bytes for shape {dims}, got {len(body)}")
    return np.frombuffer(body, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write uint8 `array` as an IDX file (gzip-compressed when the name ends in .gz)."""
    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def find_idx(root: Path) -> dict[str, Path] | None:
    """The four IDX files under root, root/MNIST/raw or root/MNIST (plain or .gz); None if none is there."""
    for folder in (root, root / "MNIST" / "raw", root / "MNIST"):
        found = {}
        for key, name in IDX_FILES.items():
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    found[key] = candidate
                    break
        if len(found) == len(IDX_FILES):
            return found
        if found:
            missing = [IDX_FILES[k] for k in IDX_FILES if k not in found]
            raise DataError(f"{folder}: incomplete MNIST IDX set, missing {', '.join(missing)}[.gz]")
    return None


def read_mnist_idx(files: dict[str, Path]) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    out = []
    for split in ("train", "test"):
        images, labels = read_idx(files[f"{split}_images"]), read_idx(files[f"{split}_labels"])
        if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
            raise DataError(f"{files[f'{split}_images']}: expected uint8 images of shape (N, 28, 28), "
                            f"got {images.dtype} {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(f"{files[f'{split}_labels']}: expected {len(images)} labels, got shape {labels.shape}")
        _check_labels(labels, files[f"{split}_labels"])
        out.append((images, labels.astype(np.int64)))
    return out[0], out[1]


def _check_labels(labels: np.ndarray, where) -> None:
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{where}: expected labels in 0..9, got values in [{labels.min()}, {labels.max()}]")


# ----------------------------------------------------------------------------------------------------------------------
# Pickle layout


def write_pickle_layout(root: str | Path, train: Split, test: Split) -> tuple[Path, Path]:
    """Write `MNIST/mnist_data.pkl` and `MNIST_M/mnist_m_data.pkl` under root (the keys create_mnistm.py writes)."""
    root = Path(root)
    gray3 = lambda a: np.repeat(a[..., None], 3, axis=-1)
    paths = []
    for rel, images in ((PICKLE_MNIST, (gray3(train.mnist), gray3(test.mnist))),
                        (PICKLE_MNISTM, (train.mnist_m, test.mnist_m))):
        payload = {"train": np.ascontiguousarray(images[0], np.uint8), "train_label": train.labels.astype(np.int32),
                   "val": np.ascontiguousarray(images[1], np.uint8), "val_label": test.labels.astype(np.int32)}
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
        paths.append(path)
    return paths[0], paths[1]


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, ImportError) as e:
        raise DataError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or any(k not in data for k in PICKLE_KEYS):
        have = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{path}: expected a dict with keys {', '.join(PICKLE_KEYS)}, got {have}")
    for key in ("train", "val"):
        a = np.asarray(data[key])
        if a.dtype != np.uint8 or a.ndim != 4 or a.shape[1:] != (28, 28, 3):
            raise DataError(f"{path}: key '{key}' must be uint8 (N, 28, 28, 3), got {a.dtype} {a.shape}")
        labels = np.asarray(data[f"{key}_label"])
        if labels.ndim != 1 or len(labels) != len(a):
            raise DataError(f"{path}: key '{key}_label' must hold {len(a)} labels, got shape {labels.shape}")
        _check_labels(labels, f"{path} ('{key}_label')")
    return data


def read_pickle_mnist(root: Path) -> tuple[dict, Path]:
    path = root / PICKLE_MNIST
    return _read_pickle(path), path


def read_pickle_mnistm(root: Path) -> tuple[dict, Path]:
    path = root / PICKLE_MNISTM
    return _read_pickle(path), path


def _paired(mnist: np.ndarray, mnist_m: np.ndarray, labels_a, labels_b, where: str) -> Split:
    if len(mnist) != len(mnist_m) or not np.array_equal(np.asarray(labels_a), np.asarray(labels_b)):
        raise DataError(f"{where}: MNIST and MNIST-M must hold the same digits in the same order "
                        f"({len(mnist)} vs {len(mnist_m)} images, labels equal: "
                        f"{np.array_equal(np.asarray(labels_a), np.asarray(labels_b))})")
    return Split(np.ascontiguousarray(mnist), np.ascontiguousarray(mnist_m), np.asarray(labels_a).astype(np.int64))


# ----------------------------------------------------------------------------------------------------------------------
# MNIST-M composition (NTDH MNIST/dataloader/create_mnistm.py; Ganin & Lempitsky, ICML 2015, Sec. 5)


def compose_mnistm(digits: np.ndarray, backgrounds: list[np.ndarray], seed: int) -> np.ndarray:
    """MNIST-M images: each digit, binarised to 255·1[x > 0], is |crop − digit| over a random 28×28 crop of a random
    background (RGB uint8). One seeded RandomState draws the background and then the crop offsets x ∈ [0, w − 28),
    y ∈ [0, h − 28) of each digit in turn (the reference drew the offsets from the unseeded global RNG)."""
    if not backgrounds:
        raise DataError("compose_mnistm: no background images")
    for i, bg in enumerate(backgrounds):
        if bg.ndim != 3 or bg.shape[2] != 3 or bg.shape[0] <= 28 or bg.shape[1] <= 28:
            raise DataError(f"background {i}: expected an RGB image larger than 28×28, got shape {bg.shape}")
    rand = np.random.RandomState(seed)
    out = np.empty((len(digits), 28, 28, 3), dtype=np.uint8)
    for i, digit in enumerate(digits):
        bg = backgrounds[rand.randint(len(backgrounds))]
        h, w = bg.shape[:2]
        x, y = rand.randint(0, w - 28), rand.randint(0, h - 28)
        crop = bg[y:y + 28, x:x + 28].astype(np.int16)
        d = np.where(digit > 0, 255, 0).astype(np.int16)[..., None]
        out[i] = np.abs(crop - d).astype(np.uint8)
    return out


def _decode_image(raw: bytes) -> np.ndarray | None:
    """RGB uint8 array, or None for something that is not a readable image."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(raw)) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError):
        return None


def load_backgrounds(path: str | Path) -> list[np.ndarray]:
    """Background photos from the BSDS500 tarball (its train images, as the reference) or from a folder of images."""
    path = Path(path)
    images: list[np.ndarray] = []
    if path.is_file() and (path.name.endswith((".tgz", ".tar.gz", ".tar"))):
        try:
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    if member.isfile() and member.name.startswith(BSDS_TRAIN_PREFIX):
                        img = _decode_image(tar.extractfile(member).read())
                        if img is not None:
                            images.append(img)
        except tarfile.TarError as e:
            raise DataError(f"{path}: not a readable tar archive ({e})") from None
        if not images:
            raise DataError(f"{path}: no readable image under {BSDS_TRAIN_PREFIX} (expected the BSDS500 tarball)")
    elif path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            img = _decode_image(file.read_bytes())
            if img is not None:
                images.append(img)
        if not images:
            raise DataError(f"{path}: no readable image ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    else:
        raise DataError(f"{path}: expected the BSDS500 tarball (BSR_bsds500.tgz) or a folder of images")
    small = [i for i, img in enumerate(images) if min(img.shape[:2]) <= 28]
    if small:
        raise DataError(f"{path}: every background must be larger than 28×28; {len(small)} are not")
    return images


# ----------------------------------------------------------------------------------------------------------------------
# Offline stand-in: scikit-learn digits + sample photos


def standin_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 8×8 digits (0..16) as MNIST-like uint8 28×28: bilinear upsampling to 20×20, centred with a
    4-pixel border (MNIST's digits sit in a 20×20 box), scaled to 0..255."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    up = torch.nn.functional.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False)
    up = torch.nn.functional.pad(up, (4, 4, 4, 4)).squeeze(1)
    images = (up.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return images, digits.target.astype(np.int64)


def standin_backgrounds() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images
    return [np.asarray(img, dtype=np.uint8) for img in load_sample_images().images]


def standin_pair(seed: int, test_fraction: float) -> tuple[Split, Split]:
    """The stand-in train / test splits (a seeded stratification-free shuffle, test = the last `test_fraction`)."""
    images, labels = standin_digits()
    composed = compose_mnistm(images, standin_backgrounds(), seed)
    order = np.random.RandomState(seed).permutation(len(labels))
    n_test = int(round(test_fraction * len(labels)))
    if not 0 < n_test < len(labels):
        raise ConfigError(f"data.standin_test_fraction: expected a fraction leaving both splits non-empty, "
                          f"got {test_fraction}")
    full = Split(images, composed, labels)
    return full.subset(np.sort(order[n_test:])), full.subset(np.sort(order[:n_test]))


# ----------------------------------------------------------------------------------------------------------------------
# Choosing the source


def load_pair(data_cfg: dict, base: Path, log: Callable[[str], None] = print, *, explicit_root: bool = True) -> Pair:
    """MNIST / MNIST-M train and test splits from `data.root` by `data.source` (auto | pickle | idx | standin |
    download). Relative paths in data_cfg (`root`, `backgrounds`) are taken relative to `base` (the experiment folder).

    With `auto`, a root that holds no MNIST falls back to the offline stand-in only when it is the default root
    (`explicit_root=False`), announced in the log; a root the user named must exist and hold data."""
    source = data_cfg["source"]
    root = _resolve(base, data_cfg["root"])
    if source not in SOURCES:
        raise ConfigError(f"data.source: expected one of {', '.join(SOURCES)}, got {source!r}")
    if source == "download":
        backgrounds = download(root, data_cfg["bsds_url"], log)
        return _from_idx(find_idx(root), root, {**data_cfg, "backgrounds": str(backgrounds)}, base)
    if source in ("auto", "pickle") and (root / PICKLE_MNIST).is_file():
        return _from_pickle(root)
    if source == "pickle":
        raise DataError(f"{root / PICKLE_MNIST}: missing (data.source is 'pickle')")
    files = find_idx(root) if source in ("auto", "idx") and root.is_dir() else None
    if files is not None:
        return _from_idx(files, root, data_cfg, base)
    if source == "idx":
        raise DataError(f"{root}: no MNIST IDX files ({', '.join(IDX_FILES.values())}[.gz]) (data.source is 'idx')")
    if source == "auto" and explicit_root:
        what = "does not exist" if not root.exists() else "holds no MNIST (neither the pickle layout " \
            f"{PICKLE_MNIST} nor the IDX files {IDX_FILES['train_images']}[.gz])"
        raise DataError(f"{root}: data root {what}; set data.source=standin for the offline stand-in")
    log(f"NOTE: {'no MNIST under ' + str(root) + ' -- using' if source == 'auto' else 'data.source standin:'} the "
        f"OFFLINE STAND-IN (stand-in: smoke test only): scikit-learn's 1797 handwritten digits upsampled to 28x28 "
        f"(MNIST) composed onto scikit-learn's sample photos (MNIST-M). Numbers are not MNIST's.")
    train, test = standin_pair(data_cfg["mnistm_seed"], data_cfg["standin_test_fraction"])
    return Pair(train, test, STANDIN_SOURCE)


def _from_pickle(root: Path) -> Pair:
    mnist, pm = read_pickle_mnist(root)
    if not (root / PICKLE_MNISTM).is_file():
        raise DataError(f"{root / PICKLE_MNISTM}: missing (MNIST-M pickle to pair with {pm}); "
                        f"build it with `python build_mnistm.py`")
    mnist_m, pmm = read_pickle_mnistm(root)
    train = _paired(mnist["train"][..., 0], mnist_m["train"], mnist["train_label"], mnist_m["train_label"],
                    f"{pm} / {pmm} (train)")
    test = _paired(mnist["val"][..., 0], mnist_m["val"], mnist["val_label"], mnist_m["val_label"],
                   f"{pm} / {pmm} (val)")
    return Pair(train, test, f"pickle layout under {root}")


def _from_idx(files: dict[str, Path] | None, root: Path, data_cfg: dict, base: Path) -> Pair:
    if files is None:
        raise DataError(f"{root}: no MNIST IDX files ({', '.join(IDX_FILES.values())}[.gz])")
    (tr_x, tr_y), (te_x, te_y) = read_mnist_idx(files)
    if (root / PICKLE_MNISTM).is_file():
        mnist_m, pmm = read_pickle_mnistm(root)
        train = _paired(tr_x, mnist_m["train"], tr_y, mnist_m["train_label"], f"{files['train_labels']} / {pmm}")
        test = _paired(te_x, mnist_m["val"], te_y, mnist_m["val_label"], f"{files['test_labels']} / {pmm}")
        return Pair(train, test, f"IDX files in {files['train_images'].parent} + {pmm}")
    if not data_cfg["backgrounds"]:
        raise DataError(f"{root / PICKLE_MNISTM}: missing; MNIST IDX files were found but MNIST-M was not. "
                        f"Build it with `python build_mnistm.py --backgrounds BSR_bsds500.tgz` or set "
                        f"data.backgrounds to compose it in memory")
    bgs = load_backgrounds(_resolve(base, data_cfg["backgrounds"]))
    seed = data_cfg["mnistm_seed"]
    train = Split(tr_x, compose_mnistm(tr_x, bgs, seed), tr_y)
    test = Split(te_x, compose_mnistm(te_x, bgs, seed + 1), te_y)
    return Pair(train, test, f"IDX files in {files['train_images'].parent} + MNIST-M composed in memory")


def download(root: Path, bsds_url: str, log: Callable[[str], None] = print) -> Path:
    """`data.source: download`, for machines with internet: torchvision's MNIST download (IDX files under
    root/MNIST/raw, checked against torchvision's md5 sums) and the BSDS500 tarball (root/BSR_bsds500.tgz), whose
    train images MNIST-M is composed onto, as the reference's create_mnistm.py. Files already there are kept."""
    from torchvision.datasets import MNIST
    from torchvision.datasets import utils as tv_utils
    root.mkdir(parents=True, exist_ok=True)
    try:
        for train in (True, False):
            MNIST(str(root), train=train, download=True)
        tarball = root / Path(bsds_url).name
        if not tarball.is_file():
            log(f"downloading {bsds_url} -> {tarball}")
            tv_utils.download_url(bsds_url, str(root), tarball.name)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; torchvision raises RuntimeError on bad files
        raise DataError(f"{root}: data.source download failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
                        f"download MNIST and BSR_bsds500.tgz by hand into it") from None
    if not tarball.is_file():
        raise DataError(f"{tarball}: missing after the download of {bsds_url}")
    return tarball


def _resolve(base: Path, p) -> Path:
    p = Path(p).expanduser()
    return p if p.is_absolute() else base / p


# ----------------------------------------------------------------------------------------------------------------------
# Device-resident loader and per-batch noise


class BatchLoader:
    """Batches of a Split as dicts of device tensors: `mnist` (B,28,28) uint8, `mnist_m` (B,28,28,3) uint8, `label`,
    `index` (dataset index, for CRD) and, when `noise_seed` is set, `noise_seed` (a per-batch int that makes the
    noise of an evaluation split the same at every pass). The whole split is copied to the device once; no PIL,
    no per-sample work."""

    def __init__(self, split: Split, batch_size: int, device, *, shuffle: bool, seed: int = 0,
                 noise_seed: int | None = None):
        if batch_size < 1:
            raise ConfigError(f"train.batch_size: expected a positive integer, got {batch_size}")
        self.mnist = torch.from_numpy(np.ascontiguousarray(split.mnist)).to(device)
        self.mnist_m = torch.from_numpy(np.ascontiguousarray(split.mnist_m)).to(device)
        self.labels = torch.from_numpy(split.labels).to(device)
        self.batch_size, self.shuffle, self.device = batch_size, shuffle, device
        self.generator = torch.Generator().manual_seed(seed)
        self.noise_seed = noise_seed

    def __len__(self) -> int:
        return (len(self.labels) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterable[dict]:
        return self.iterate(self.generator)

    def iterate(self, generator: torch.Generator) -> Iterable[dict]:
        """The batches, shuffled (when `shuffle`) by `generator`: a trainer passes its own per-fit generator."""
        n = len(self.labels)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        order = order.to(self.device)
        for b, start in enumerate(range(0, n, self.batch_size)):
            idx = order[start:start + self.batch_size]
            batch = {"mnist": self.mnist[idx], "mnist_m": self.mnist_m[idx], "label": self.labels[idx], "index": idx}
            if self.noise_seed is not None:
                batch["noise_seed"] = self.noise_seed + b
            yield batch


class Prepare:
    """`prepare(batch)` for mnist.trainer: noisy, normalised, flattened student / teacher inputs, on the device.

    Noise as CrossModalData._add_noise (NTDH MNIST/dataloader/dataset.py):
    v = clip(x/255 + L·U[0,1), 0, 1), quantised to 1/255 steps (the reference's uint8 round trip,
    `quantize`), then normalised to [−1, 1]. MNIST-M gets L = noise_level, MNIST L = mnist_factor·noise_level. The
    MNIST input is the grayscale digit (784; the reference's channel 0 of a replicated image), MNIST-M is 3×28×28
    channel-first (2352). stu_type 0: student MNIST-M, teacher MNIST; 1: the other way round.
    Training batches draw fresh noise from this object's generator; a batch with `noise_seed` gets noise from a
    generator seeded with it (fixed evaluation noise)."""

    def __init__(self, noise_level: float, mnist_factor: float, stu_type: int, device, seed: int,
                 quantize: bool = True):
        if stu_type not in (0, 1):
            raise ConfigError(f"stu_type: expected 0 (student MNIST-M) or 1 (student MNIST), got {stu_type}")
        if noise_level < 0 or mnist_factor < 0:
            raise ConfigError(f"data.noise_level / data.mnist_noise_factor must be ≥ 0, got {noise_level}, "
                              f"{mnist_factor}")
        self.levels = {"mnist": mnist_factor * noise_level, "mnist_m": noise_level}
        self.stu_key, self.tea_key = ("mnist_m", "mnist") if stu_type == 0 else ("mnist", "mnist_m")
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.quantize = quantize

    def image(self, images: torch.Tensor, key: str, generator: torch.Generator) -> torch.Tensor:
        x = images.float() / 255.0
        if key == "mnist_m":
            x = x.permute(0, 3, 1, 2)  # (B, 3, 28, 28), channel-first as ToTensor
        level = self.levels[key]
        if level > 0:
            x = (x + level * torch.rand(x.shape, generator=generator, device=x.device)).clamp_(0.0, 1.0)
            if self.quantize:
                x = torch.floor(x * 255.0) / 255.0
        return ((x - 0.5) / 0.5).flatten(1)

    def __call__(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        """Inputs of one batch; training noise from `generator` (a trainer's per-fit one) or this object's own."""
        gen = self.generator if generator is None else generator
        if "noise_seed" in batch:
            gen = torch.Generator(device=self.device).manual_seed(int(batch["noise_seed"]))
        out = {"label": batch["label"], "index": batch["index"]}
        # Teacher first, then student: one fixed order of draws from the generator.
        out["teacher"] = self.image(batch[self.tea_key], self.tea_key, gen)
        out["student"] = self.image(batch[self.stu_key], self.stu_key, gen)
        return out

    @property
    def dims(self) -> tuple[int, int]:
        """(student input size, teacher input size)."""
        size = {"mnist": 28 * 28, "mnist_m": 3 * 28 * 28}
        return size[self.stu_key], size[self.tea_key]
