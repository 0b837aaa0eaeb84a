"""A small synthetic SemanticKITTI sequence in the exact on-disk format, from one consistent 3-D scene per frame.

Each frame is a street: ground (road with a lane marking, sidewalks, terrain), buildings, parked and moving cars,
poles and trees (trunk + crown). A 360° LiDAR (beams × azimuth steps, sensor at the origin, 1.73 m above the road)
is ray-cast against it to give the points, their intensities and their labels (raw SemanticKITTI ids, instance ids
in the upper 16 bits); the left colour camera image is ray-cast through the inverse of P2·Tr from calib.txt, so every
LiDAR point projects onto a pixel of its own object.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# raw SemanticKITTI ids
ROAD, LANE, SIDEWALK, TERRAIN, BUILDING, CAR, MOVING_CAR, POLE, VEGETATION, TRUNK = 40, 60, 48, 72, 50, 10, 252, 80, \
    70, 71
GROUND_Z = -1.73
COLORS = {ROAD: (90, 90, 95), LANE: (235, 235, 235), SIDEWALK: (170, 150, 150), TERRAIN: (120, 160, 70),
          BUILDING: (190, 130, 80), CAR: (40, 60, 200), MOVING_CAR: (200, 40, 40), POLE: (230, 230, 120),
          VEGETATION: (40, 140, 40), TRUNK: (110, 70, 30)}
INTENSITY = {ROAD: 0.25, LANE: 0.8, SIDEWALK: 0.35, TERRAIN: 0.3, BUILDING: 0.45, CAR: 0.6, MOVING_CAR: 0.6,
             POLE: 0.5, VEGETATION: 0.2, TRUNK: 0.3}


def kitti_calib(height: int, width: int, hfov_deg: float = 80.0) -> dict[str, np.ndarray]:
    """KITTI-like calibration for an image of the given size: P0..P3 (3×4) and Tr (velodyne → camera, 3×4)."""
    f = (width / 2) / np.tan(np.radians(hfov_deg / 2))
    K = np.array([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]])
    P = {f"P{i}": np.hstack([K, K @ np.array([[b], [0.0], [0.0]])]) for i, b in enumerate([0.0, -0.54, 0.06, -0.48])}
    R = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
    rot = np.array([[np.cos(0.01), 0, np.sin(0.01)], [0, 1, 0], [-np.sin(0.01), 0, np.cos(0.01)]])  # slight tilt
    Tr = np.hstack([rot @ R, np.array([[-0.004], [-0.076], [-0.27]])])
    return {**P, "Tr": Tr}


def write_calib(path: Path, calib: dict[str, np.ndarray]) -> None:
    lines = [f"{k}: " + " ".join(f"{v:.12e}" for v in calib[k].ravel()) for k in ("P0", "P1", "P2", "P3", "Tr")]
    path.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Scene

def make_scene(rng: np.random.Generator) -> list[dict]:
    """Objects: boxes {"kind": "box", "lo", "hi", "label", "inst"} and vertical cylinders {"kind": "cyl", ...}."""
    objs = []
    inst = 1
    for side in (-1, 1):  # buildings behind the sidewalks on both sides, front and back
        x = -40.0
        while x < 45:
            length = rng.uniform(8, 16)
            y0 = side * rng.uniform(10, 13)
            depth = rng.uniform(6, 10)
            lo = [x, min(y0, y0 + side * depth), GROUND_Z]
            hi = [x + length, max(y0, y0 + side * depth), GROUND_Z + rng.uniform(5, 12)]
            objs.append({"kind": "box", "lo": np.array(lo), "hi": np.array(hi), "label": BUILDING, "inst": 0})
            x += length + rng.uniform(2, 6)
    for _ in range(int(rng.integers(4, 8))):  # cars on the road, a few moving
        cx, cy = rng.uniform(-30, 35), rng.choice([-2.0, 2.0]) + rng.uniform(-0.4, 0.4)
        if abs(cx) < 5 and abs(cy) < 3:
            cx += 8
        label = MOVING_CAR if rng.random() < 0.3 else CAR
        lo = np.array([cx - 2.1, cy - 0.9, GROUND_Z])
        hi = np.array([cx + 2.1, cy + 0.9, GROUND_Z + rng.uniform(1.4, 1.7)])
        objs.append({"kind": "box", "lo": lo, "hi": hi, "label": label, "inst": inst})
        inst += 1
    for side in (-1, 1):  # poles on the sidewalk edge, trees on the terrain strip
        for x in np.arange(-30, 40, rng.uniform(9, 14)):
            objs.append({"kind": "cyl", "c": np.array([x + rng.uniform(-1, 1), side * 6.2]), "r": 0.15,
                         "z": (GROUND_Z, GROUND_Z + 6.0), "label": POLE, "inst": 0})
        for x in np.arange(-25, 40, rng.uniform(8, 12)):
            c = np.array([x + rng.uniform(-2, 2), side * rng.uniform(7.5, 8.8)])
            objs.append({"kind": "cyl", "c": c, "r": 0.25, "z": (GROUND_Z, GROUND_Z + 2.5), "label": TRUNK, "inst": 0})
            objs.append({"kind": "cyl", "c": c, "r": rng.uniform(1.0, 1.6), "z": (GROUND_Z + 2.3, GROUND_Z + 5.5),
                         "label": VEGETATION, "inst": 0})
    return objs


def ground_label(p: np.ndarray) -> np.ndarray:
    ay = np.abs(p[:, 1])
    lab = np.where(ay < 4.0, ROAD, np.where(ay < 6.5, SIDEWALK, TERRAIN))
    lane = (ay < 0.12) & ((np.floor(p[:, 0] / 3.0) % 2) == 0)
    return np.where(lane, LANE, lab)


def ray_cast(origin: np.ndarray, dirs: np.ndarray, objs: list[dict], max_range: float):
    """Nearest hit per ray: (t, raw label, instance, normal); t = inf where nothing is hit."""
    m = len(dirs)
    t_best = np.full(m, np.inf)
    label = np.zeros(m, dtype=np.int64)
    inst = np.zeros(m, dtype=np.int64)
    normal = np.zeros((m, 3))
    with np.errstate(divide="ignore", invalid="ignore"):
        tg = (GROUND_Z - origin[2]) / dirs[:, 2]
        hit = (dirs[:, 2] < 0) & (tg > 0)
        t_best = np.where(hit, tg, t_best)
        normal[hit] = [0, 0, 1]
        label[hit] = ground_label(origin + tg[hit, None] * dirs[hit])
        for o in objs:
            if o["kind"] == "box":
                t1, t2 = (o["lo"] - origin) / dirs, (o["hi"] - origin) / dirs
                tmin_ax, tmax_ax = np.minimum(t1, t2), np.maximum(t1, t2)
                tmin_ax = np.nan_to_num(tmin_ax, nan=-np.inf)
                tmax_ax = np.nan_to_num(tmax_ax, nan=np.inf)
                tmin, tmax = tmin_ax.max(1), tmax_ax.min(1)
                h = (tmax >= tmin) & (tmin > 1e-6)
                t = np.where(h, tmin, np.inf)
                axis = tmin_ax.argmax(1)
                n = np.zeros((m, 3))
                n[np.arange(m), axis] = -np.sign(dirs[np.arange(m), axis])
            else:
                d2, o2 = dirs[:, :2], origin[:2] - o["c"]
                a = (d2 ** 2).sum(1)
                b = 2 * (d2 @ o2)
                c = o2 @ o2 - o["r"] ** 2
                disc = b ** 2 - 4 * a * c
                t = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)
                z = origin[2] + t * dirs[:, 2]
                h = (disc >= 0) & (t > 1e-6) & (z >= o["z"][0]) & (z <= o["z"][1])
                t = np.where(h, t, np.inf)
                n = np.zeros((m, 3))
                p = origin[:2] + t[:, None] * d2
                n[:, :2] = np.nan_to_num((p - o["c"]) / o["r"])
            closer = t < t_best
            t_best = np.where(closer, t, t_best)
            label[closer], inst[closer], normal[closer] = o["label"], o["inst"], n[closer]
    far = t_best > max_range
    t_best[far] = np.inf
    return t_best, label, inst, normal


def lidar_scan(objs, rng, beams: int, azimuths: int, max_range: float = 70.0):
    """(N, 4) float32 points and (N,) uint32 labels (instance << 16 | semantic)."""
    elev = np.radians(np.linspace(-24.8, 2.0, beams))
    az = np.linspace(-np.pi, np.pi, azimuths, endpoint=False) + rng.uniform(0, 2 * np.pi / azimuths)
    E, A = np.meshgrid(elev, az, indexing="ij")
    dirs = np.stack([np.cos(E) * np.cos(A), np.cos(E) * np.sin(A), np.sin(E)], -1).reshape(-1, 3)
    t, lab, inst, _ = ray_cast(np.zeros(3), dirs, objs, max_range)
    hit = np.isfinite(t)
    t = t[hit] + rng.normal(0, 0.01, hit.sum())
    xyz = dirs[hit] * t[:, None]
    inten = np.array([INTENSITY[int(v)] for v in lab[hit]]) + rng.normal(0, 0.03, hit.sum())
    pts = np.concatenate([xyz, np.clip(inten, 0, 1)[:, None]], 1).astype(np.float32)
    raw = (inst[hit].astype(np.uint32) << 16) | lab[hit].astype(np.uint32)
    return pts, raw


def render_image(objs, calib: dict, height: int, width: int, rng) -> np.ndarray:
    """(H, W, 3) uint8: each pixel's ray through inv(P2·Tr) coloured by the object it hits, shaded, sky above."""
    M = calib["P2"] @ np.vstack([calib["Tr"], [0, 0, 0, 1]])
    A, b = M[:, :3], M[:, 3]
    centre = -np.linalg.solve(A, b)
    v, u = np.mgrid[0:height, 0:width]
    pix = np.stack([u.ravel() + 0.5, v.ravel() + 0.5, np.ones(u.size)], 0)
    dirs = np.linalg.solve(A, pix).T
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    t, lab, _, n = ray_cast(centre, dirs, objs, 200.0)
    light = np.array([0.4, 0.3, 0.85])
    light /= np.linalg.norm(light)
    shade = 0.55 + 0.45 * np.abs(n @ light)
    img = np.zeros((dirs.shape[0], 3))
    hit = np.isfinite(t)
    palette = np.array([COLORS.get(int(k), (0, 0, 0)) for k in lab[hit]], dtype=np.float64)
    fog = np.exp(-t[hit] / 120.0)[:, None]
    img[hit] = palette * shade[hit, None] * fog + (1 - fog) * 200
    sky = np.clip(dirs[~hit, 2], 0, 1)[:, None]
    img[~hit] = (1 - sky) * np.array([200, 215, 235]) + sky * np.array([90, 140, 220])
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8).reshape(height, width, 3)


def write_sequence(root: str | Path, seq: int, frames: int, *, seed: int = 0, image_size=(96, 320), beams: int = 32,
                   azimuths: int = 720) -> Path:
    """<root>/<seq:02d>/{velodyne/*.bin, labels/*.label, image_2/*.png, calib.txt}; returns the sequence folder."""
    d = Path(root) / f"{int(seq):02d}"
    for sub in ("velodyne", "labels", "image_2"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    h, w = image_size
    calib = kitti_calib(h, w)
    write_calib(d / "calib.txt", calib)
    for i in range(frames):
        rng = np.random.default_rng([seed, seq, i])
        objs = make_scene(rng)
        pts, raw = lidar_scan(objs, rng, beams, azimuths)
        pts.tofile(d / "velodyne" / f"{i:06d}.bin")
        raw.astype(np.uint32).tofile(d / "labels" / f"{i:06d}.label")
        Image.fromarray(render_image(objs, calib, h, w, rng)).save(d / "image_2" / f"{i:06d}.png")
    return d


def write_demo(root: str | Path, train_sequences, val_sequences, frames: dict, *, seed: int = 0, image_size=(96, 320),
               beams: int = 32, azimuths: int = 720) -> Path:
    """The demo dataset: `frames["train"]` frames per train sequence, `frames["val"]` per val sequence."""
    root = Path(root)
    for split, seqs in (("train", train_sequences), ("val", val_sequences)):
        for s in seqs:
            write_sequence(root, s, frames[split], seed=seed, image_size=image_size, beams=beams, azimuths=azimuths)
    return root
