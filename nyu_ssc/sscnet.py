"""Reader of the SSCNet release (depth PNG + RGB PNG + .bin) and its converter to the npz layout (`data.py`).

SSCNet files per scene `<stem>` (e.g. NYU0003_0000):
    <stem>.png   uint16 depth; metres = ((d >> 3) | (d << 13)) / 1000 as 16-bit (SSCNet's bit rotation, `rotate`),
                 which equals d / 8000 (the reference's `divide`) whenever the low 3 bits are 0
    <stem>.bin   float32 voxel origin (3), float32 camera pose (4×4, camera → world, row major), then uint32
                 run-length pairs (value, count) of the NYU-37 labels of the 240×144×240 grid (255 = outside),
                 in C order over (x, y = height, z = depth): index = (x·144 + y)·240 + z (`rle_order: xyz`, what
                 waterljwant/SSC `dataloaders/dataloader.py` `NYUDataset._rle2voxel` does with
                 `reshape(voxel_size)`; the same order as `position`). `zyx` reads x and z swapped: on a real SSCNet
                 scene it puts ~4 % of the depth pixels on an occupied voxel instead of ~65 %.
    RGB          found with the patterns of `convert.rgb_patterns` (`{stem}`, `{scene}` = the part before '_')
`alignment_share` measures that agreement per scene (the share of the depth map's surface voxels whose label is
occupied); the converter reports it and refuses a folder whose median share is below `convert.min_alignment`.
The converter maps 37 → 12 classes, downsamples labels 4× (geometry.downsample_labels), back-projects the depth
with the configured intrinsics into the position index, builds the projective TSDF and its 4× downsampling.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from common.config import DataError
from common.run import atomic_write_json
from nyu_ssc import config as C
from nyu_ssc import data, geometry


def decode_rle(pairs: np.ndarray, n: int, path="rle") -> np.ndarray:
    """(value, count) uint32 pairs → flat uint32 labels of length n."""
    pairs = np.asarray(pairs, dtype=np.uint32).reshape(-1, 2)
    total = int(pairs[:, 1].astype(np.int64).sum())
    if total != n:
        raise DataError(f"{path}: run-length counts sum to {total}, expected {n} voxels")
    return np.repeat(pairs[:, 0], pairs[:, 1].astype(np.int64))


def encode_rle(flat: np.ndarray) -> np.ndarray:
    """Flat labels → (value, count) uint32 pairs (the inverse of decode_rle)."""
    flat = np.asarray(flat).ravel()
    change = np.flatnonzero(np.diff(flat)) + 1
    starts = np.r_[0, change]
    counts = np.diff(np.r_[starts, flat.size])
    return np.stack([flat[starts], counts], 1).astype(np.uint32)


def _grid_order(flat: np.ndarray, grid, order: str) -> np.ndarray:
    w, h, d = grid
    if order == "zyx":
        return flat.reshape(d, h, w).transpose(2, 1, 0)
    if order == "xyz":
        return flat.reshape(w, h, d)
    raise ValueError(f"convert.rle_order must be zyx or xyz, got {order!r}")


def write_bin(path, origin, cam_pose, labels37: np.ndarray, order: str = "xyz") -> Path:
    """Write an SSCNet .bin from (W, H, D) NYU-37 labels (used by the tests and the demo of the converter)."""
    lab = np.asarray(labels37)
    flat = lab.transpose(2, 1, 0).ravel() if order == "zyx" else lab.ravel()
    path = Path(path)
    with open(path, "wb") as f:
        np.asarray(origin, np.float32).tofile(f)
        np.asarray(cam_pose, np.float32).reshape(16).tofile(f)
        encode_rle(flat).tofile(f)
    return path


def read_bin(path, grid=(240, 144, 240), order: str = "xyz"):
    """→ (origin (3,), cam_pose (4, 4), labels (W, H, D) uint8 in the 12 SSC classes, 255 kept)."""
    path = Path(path)
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size < 19 * 4 or (raw.size - 19 * 4) % 8:
        raise DataError(f"{path}: {raw.size} bytes; expected 76 header bytes + 8-byte (value, count) pairs")
    head = raw[:76].view(np.float32)
    origin, pose = head[:3].astype(np.float64), head[3:].reshape(4, 4).astype(np.float64)
    if not np.all(np.isfinite(head)):
        raise DataError(f"{path}: voxel origin / camera pose hold non-finite values")
    flat = decode_rle(raw[76:].view(np.uint32), int(np.prod(grid)), path)
    bad = (flat >= len(C.SEG_CLASS_MAP)) & (flat != 255)
    if bad.any():
        raise DataError(f"{path}: labels {np.unique(flat[bad])[:5].tolist()} are not NYU-37 ids (0..36) or 255")
    mapped = np.where(flat == 255, 255, C.SEG_CLASS_MAP[np.minimum(flat, len(C.SEG_CLASS_MAP) - 1)]).astype(np.uint8)
    return origin, pose, _grid_order(mapped, grid, order)


def read_depth(path, decode: str = "rotate") -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None or img.dtype != np.uint16 or img.ndim != 2:
        got = "unreadable" if img is None else f"{img.dtype} {img.shape}"
        raise DataError(f"{path}: expected a single-channel uint16 depth PNG, got {got}")
    if decode == "rotate":
        d = ((img >> 3) | (img << 13)).astype(np.float32) / 1000.0
    elif decode == "divide":
        d = img.astype(np.float32) / 8000.0
    else:
        raise ValueError(f"convert.depth_decode must be rotate or divide, got {decode!r}")
    return d


def encode_depth(depth_m: np.ndarray) -> np.ndarray:
    """Metres → SSCNet uint16 (inverse of the `rotate` decode)."""
    d = np.rint(np.asarray(depth_m) * 1000).astype(np.uint16)
    return ((d << 3) | (d >> 13)).astype(np.uint16)


def read_rgb(path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"{path}: not a readable colour image")
    rgb = img[..., ::-1].astype(np.float32) / 255.0
    return ((rgb - C.IMAGENET_MEAN) / C.IMAGENET_STD).transpose(2, 0, 1)


def find_rgb(depth_path: Path, patterns) -> Path:
    stem = depth_path.stem
    scene = stem.split("_")[0]
    tried = []
    for pat in patterns:
        p = depth_path.parent / pat.format(stem=stem, scene=scene)
        if p.is_file():
            return p
        tried.append(str(p))
    raise DataError(f"{depth_path}: no RGB image found (tried {', '.join(tried)})")


def alignment_share(labels: np.ndarray, position: np.ndarray) -> float:
    """Share of the surface voxels seen by the depth map (the distinct voxels of `position`, 0 = invalid) whose
    label is occupied (1..11). Labels read in the wrong voxel order give a share near the occupied fraction of the
    whole volume (a few %), aligned ones most of the surface."""
    surface = np.unique(position[position > 0])
    if surface.size == 0:
        return 0.0
    lab = labels.reshape(-1)[surface]
    return float(((lab > 0) & (lab != C.IGNORE)).mean())


def scene_alignment(depth_path, cfg: dict) -> float:
    """`alignment_share` of one SSCNet scene from its .bin and depth PNG alone (no TSDF: cheap)."""
    g, cv = cfg["grid"], cfg["convert"]
    depth_path = Path(depth_path)
    origin, pose, labels = read_bin(depth_path.with_suffix(".bin"), tuple(g["hr"]), cv["rle_order"])
    depth = read_depth(depth_path, cv["depth_decode"])
    depth = np.where(depth > cv["max_depth"], 0, depth)
    k = geometry.intrinsics_matrix(*g["intrinsics"])
    return alignment_share(labels, geometry.depth_to_position(depth, pose, origin, k, g["voxel_size"],
                                                               tuple(g["hr"])))


def convert_scene(depth_path, cfg: dict) -> dict:
    """One SSCNet scene → the npz layout's arrays, with the config's grid, camera and conversion settings."""
    g, cv = cfg["grid"], cfg["convert"]
    depth_path = Path(depth_path)
    hr, (h, w) = tuple(g["hr"]), tuple(g["image"])
    scale = hr[0] // g["lr"][0]
    origin, pose, labels = read_bin(depth_path.with_suffix(".bin"), hr, cv["rle_order"])
    depth = read_depth(depth_path, cv["depth_decode"])
    if depth.shape != (h, w):
        raise DataError(f"{depth_path}: depth is {depth.shape}, expected {(h, w)} (grid.image)")
    rgb = read_rgb(find_rgb(depth_path, cv["rgb_patterns"]))
    if rgb.shape[1:] != (h, w):
        raise DataError(f"{depth_path}: RGB image is {rgb.shape[1:]}, expected {(h, w)} (grid.image)")
    depth = np.where(depth > cv["max_depth"], 0, depth).astype(np.float32)
    k = geometry.intrinsics_matrix(*g["intrinsics"])
    pos = geometry.depth_to_position(depth, pose, origin, k, g["voxel_size"], hr)
    tsdf_hr = geometry.projective_tsdf(depth, pos, pose, origin, k, g["voxel_size"], hr, cv["tsdf_trunc"])
    return dict(rgb=rgb, depth=depth[None], tsdf_hr=tsdf_hr,
                tsdf_lr=geometry.downsample_tsdf(tsdf_hr, scale, cv["tsdf_surface_min"]),
                target_hr=labels, target_lr=geometry.downsample_labels(labels, scale, cv["empty_ratio"]),
                position=pos)


def _scene_paths(src: Path) -> list[Path]:
    if not src.is_dir():
        raise DataError(f"{src}: SSCNet source folder not found")
    depths = sorted(p for p in src.glob("*.png") if p.with_suffix(".bin").is_file())
    if not depths:
        raise DataError(f"{src}: no <stem>.png depth images with a matching <stem>.bin")
    return depths


def alignment_report(depths: list[Path], cfg: dict, log=print) -> dict:
    """Per scene and overall (median) alignment share; scenes that cannot be read are listed as skipped."""
    shares, skipped = {}, {}
    for p in depths:
        try:
            shares[p.stem] = scene_alignment(p, cfg)
        except DataError as e:
            skipped[p.stem] = str(e)
            log(f"skipped: {e}")
            continue
        log(f"{p.stem}: alignment share {shares[p.stem]:.3f}")
    threshold = cfg["convert"]["min_alignment"]
    median = float(np.median(list(shares.values()))) if shares else 0.0
    log(f"alignment share over {len(shares)} scene(s): median {median:.3f}, min "
        f"{min(shares.values(), default=0.0):.3f} (convert.min_alignment {threshold}, rle_order "
        f"{cfg['convert']['rle_order']})")
    return {"rle_order": cfg["convert"]["rle_order"], "min_alignment": threshold, "median": median,
            "below": sorted(k for k, v in shares.items() if v < threshold), "scenes": shares, "skipped": skipped}


def check_alignment(report: dict, report_path: Path) -> None:
    """Stop (DataError, exit 2) when the median alignment share is below the threshold, naming the worst scenes."""
    if not report["scenes"]:
        first = next(iter(report["skipped"].values()), "")
        raise DataError(f"no scene could be read, nothing to convert (first: {first})")
    if report["median"] >= report["min_alignment"]:
        return
    worst = sorted(report["scenes"].items(), key=lambda kv: kv[1])[:5]
    names = ", ".join(f"{k} {v:.3f}" for k, v in worst)
    raise DataError(f"{report_path}: median alignment share {report['median']:.3f} is below convert.min_alignment "
                    f"{report['min_alignment']} (lowest: {names}): the labels do not lie where the depth map "
                    f"puts the surfaces; check convert.rle_order, or pass --force to convert anyway")


def convert_folder(src, dst, cfg: dict, log=print, force: bool = False) -> tuple[int, list[str]]:
    """Convert every `<stem>.png` with a matching `.bin` under `src` into `dst/<stem>.npz`, after checking that labels
    and depth agree (`alignment_report`, written to `dst/convert_report.json`; below the threshold nothing is
    converted unless `force`). Unreadable or inconsistent scenes are named in the log and skipped; returns
    (converted, skipped messages)."""
    src, dst = Path(src), Path(dst)
    depths = _scene_paths(src)
    report = alignment_report(depths, cfg, log)
    dst.mkdir(parents=True, exist_ok=True)
    report_path = dst / "convert_report.json"
    atomic_write_json(report_path, report)
    if not force:
        check_alignment(report, report_path)
    done, skipped = 0, []
    for p in depths:
        try:
            arrays = convert_scene(p, cfg)
        except DataError as e:
            skipped.append(str(e))
            log(f"skipped: {e}")
            continue
        target_hr = arrays.pop("target_hr")
        data.write_npz(dst / f"{p.stem}.npz", **arrays,
                       target_hr=target_hr if cfg["convert"]["keep_target_hr"] else None)
        done += 1
    log(f"converted {done} scene(s) from {src} into {dst}; skipped {len(skipped)}; report {report_path}")
    return done, skipped
