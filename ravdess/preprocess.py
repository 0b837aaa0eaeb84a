"""Raw RAVDESS (`Actor_01 … Actor_24/`, files `MM-VV-EE-II-SS-RR-AA.wav|.mp4`) → the MFH feature layout.

Audio: librosa, a `n_mels`-row MFCC or log-mel × `frames` frames, padded / cropped (all parameters in
`preprocess.audio`). Video: frames read with OpenCV, `rows·cols` frames sampled evenly over the clip, the most
confident face of each found by facenet-pytorch's MTCNN (weights ship in its wheel), cropped with a margin, resized
to `tile`×`tile` and tiled row-major into a (rows·tile) × (cols·tile) image (2×4 tiles of 128 → 256×512).
An audio file and a video file are paired by every field but the modality. Splits are by actor
(speaker-independent). A file that cannot be read, or a clip in which no face is found, is reported by name and
skipped; a clip whose two output files exist already is not recomputed.

These features are this repository's, not the ones MFH distributes (whose extraction is not published), so MFH's
normalisation constants do not apply to them: the training split's statistics are estimated here and stored beside
the features (`normalization.json`, read by `data.normalization`), and results on them are not comparable with
MFH's published numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from tqdm.auto import tqdm

from common.config import ConfigError, DataError
from common.run import atomic_write_json, generator_dir
from ravdess import data as D


@dataclass
class Pair:
    audio: Path
    video: Path
    name: D.ClipName   # of the audio file

    @property
    def audio_out(self) -> str:
        return self.audio.stem + ".npy"

    def video_out(self, ext: str) -> str:
        return self.video.stem + "." + ext


def check_geometry(cfg: dict) -> None:
    v, d = cfg["preprocess"]["video"], cfg["data"]
    h, w = v["tile_rows"] * v["tile_size"], v["tile_cols"] * v["tile_size"]
    if (h, w) != (d["image_height"], d["image_width"]):
        raise ConfigError(f"preprocess.video: tile_rows×tile_size, tile_cols×tile_size = {h}×{w} must equal "
                          f"data.image_height×image_width = {d['image_height']}×{d['image_width']}")


def scan(raw_dir: Path, cfg: dict, report: Callable[[str], None] = print) -> list[Pair]:
    """Audio/video pairs under `raw_dir/Actor_*/`; badly named or unpaired files are reported and left out."""
    raw_dir = Path(raw_dir)
    actors = sorted(p for p in raw_dir.glob("Actor_*") if p.is_dir())
    if not actors:
        raise DataError(f"{raw_dir}: no Actor_XX/ folders (expected the raw RAVDESS layout)")
    v = cfg["preprocess"]["video"]
    audio, video = {}, {}
    for actor in actors:
        for f in sorted(actor.iterdir()):
            if f.suffix.lower() not in (".wav", ".mp4"):
                continue
            try:
                n = D.parse_name(f.name)
            except ValueError as e:
                report(f"skipped {f}: {e}")
                continue
            if n.ext == "wav" and n.modality == v["audio_modality"]:
                audio[n.key] = (f, n)
            elif n.ext == "mp4" and n.modality == v["video_modality"]:
                video[n.key] = f
    pairs = []
    for key, (f, n) in sorted(audio.items()):
        if key in video:
            pairs.append(Pair(f, video[key], n))
        else:
            report(f"skipped {f}: no {v['video_modality']}-… video of the same take")
    for key, f in sorted(video.items()):
        if key not in audio:
            report(f"skipped {f}: no {v['audio_modality']}-… audio of the same take")
    return pairs


def split_of(actor: int, cfg: dict) -> str:
    s = cfg["preprocess"]["splits"]
    if actor in s["test_actors"]:
        return "test"
    if actor in s["val_actors"]:
        return "val"
    return "train"


# ----------------------------------------------------------------------------------------------------------------------
# Audio

def audio_features(path: Path, cfg: dict) -> np.ndarray:
    """(n_mels, frames) float32 MFCC or log-mel of a wav file."""
    import librosa
    a, n_rows, frames = cfg["preprocess"]["audio"], cfg["data"]["n_mels"], cfg["data"]["frames"]
    try:
        y, sr = librosa.load(str(path), sr=a["sample_rate"], mono=True)
    except Exception as e:  # soundfile / audioread raise many types
        raise DataError(f"{path}: cannot read audio ({type(e).__name__}: {e})") from None
    if y.size < a["n_fft"] // 4:
        raise DataError(f"{path}: audio too short ({y.size} samples)")
    if a["feature"] == "mfcc":
        f = librosa.feature.mfcc(y=y, sr=sr, n_mfcc=n_rows, n_fft=a["n_fft"], hop_length=a["hop_length"],
                                 n_mels=a["mel_bands"])
    else:  # logmel (the choices are declared in config.yaml's _checks)
        m = librosa.feature.melspectrogram(y=y, sr=sr, n_fft=a["n_fft"], hop_length=a["hop_length"], n_mels=n_rows)
        f = librosa.power_to_db(m, ref=1.0, top_db=a["top_db"])
    return fit_frames(f.astype(np.float32), frames, a["crop"], a["pad"])


def fit_frames(f: np.ndarray, frames: int, crop: str, pad: str) -> np.ndarray:
    """Crop (start | center) or pad (zero | edge) the time axis to `frames`."""
    t = f.shape[1]
    if t > frames:
        start = (t - frames) // 2 if crop == "center" else 0
        return np.ascontiguousarray(f[:, start:start + frames])
    if t < frames:
        mode = "edge" if pad == "edge" else "constant"
        return np.pad(f, ((0, 0), (0, frames - t)), mode=mode)
    return f


# ----------------------------------------------------------------------------------------------------------------------
# Video

class FaceTiler:
    """Sample frames, find one face per frame with MTCNN, tile the crops."""

    def __init__(self, cfg: dict, device: str = "cpu"):
        from facenet_pytorch import MTCNN
        v = cfg["preprocess"]["video"]
        self.v = v
        self.mtcnn = MTCNN(keep_all=False, min_face_size=v["min_face_size"], thresholds=v["mtcnn_thresholds"],
                           device=device)

    def frames(self, path: Path) -> list[np.ndarray]:
        """rows·cols RGB frames sampled evenly over the clip."""
        cap = cv2.VideoCapture(str(path))
        if not cap.isOpened():
            raise DataError(f"{path}: OpenCV cannot open this video")
        frames = []
        try:
            while True:
                ok, frame = cap.read()
                if not ok:
                    break
                frames.append(frame)
        finally:
            cap.release()
        if not frames:
            raise DataError(f"{path}: no frames could be decoded")
        n = self.v["tile_rows"] * self.v["tile_cols"]
        pick = np.linspace(0, len(frames) - 1, n).round().astype(int)
        return [cv2.cvtColor(frames[i], cv2.COLOR_BGR2RGB) for i in pick]

    def crop(self, rgb: np.ndarray, box) -> np.ndarray:
        h, w = rgb.shape[:2]
        x0, y0, x1, y1 = box
        mx, my = (x1 - x0) * self.v["margin"], (y1 - y0) * self.v["margin"]
        x0, y0 = int(max(0, np.floor(x0 - mx))), int(max(0, np.floor(y0 - my)))
        x1, y1 = int(min(w, np.ceil(x1 + mx))), int(min(h, np.ceil(y1 + my)))
        s = self.v["tile_size"]
        return cv2.resize(rgb[y0:y1, x0:x1], (s, s), interpolation=cv2.INTER_AREA)

    def __call__(self, path: Path) -> tuple[np.ndarray, int]:
        """(tiled BGR image, number of frames with a face). DataError when no frame has a face."""
        frames = self.frames(path)
        shapes = {f.shape for f in frames}
        batch = [np.stack(frames)] if len(shapes) == 1 else [f[None] for f in frames]
        boxes = []
        for b in batch:
            bx, pr = self.mtcnn.detect(b)
            for one_box, one_prob in zip(bx, pr):
                ok = one_box is not None and one_prob[0] is not None and one_prob[0] >= self.v["min_prob"]
                boxes.append(one_box[0] if ok else None)
        found = [i for i, b in enumerate(boxes) if b is not None]
        if not found:
            raise DataError(f"{path}: no face found in any of the {len(frames)} sampled frames")
        tiles = []
        for i, f in enumerate(frames):
            j = i if boxes[i] is not None else min(found, key=lambda k: abs(k - i))  # nearest frame with a face
            tiles.append(self.crop(frames[j], boxes[j]))
        r, c = self.v["tile_rows"], self.v["tile_cols"]
        grid = np.concatenate([np.concatenate(tiles[k * c:(k + 1) * c], axis=1) for k in range(r)], axis=0)
        return cv2.cvtColor(grid, cv2.COLOR_RGB2BGR), len(found)


# ----------------------------------------------------------------------------------------------------------------------

def preprocess(raw_dir: str | Path, dest: str | Path, cfg: dict, log: Callable[[str], None] = print,
               progress: bool = True) -> dict:
    """Write the feature layout for every pair under raw_dir into dest; returns counts and the skipped files."""
    check_geometry(cfg)
    raw_dir, dest = Path(raw_dir), Path(dest)
    skipped: list[str] = []

    def report(msg):
        skipped.append(msg)
        log(msg)

    pairs = scan(raw_dir, cfg, report)
    generator_dir(dest, "preprocessed RAVDESS features")  # never into a folder holding files it did not write
    ext = cfg["preprocess"]["video"]["image_ext"]
    (dest / "aud_features").mkdir(parents=True, exist_ok=True)
    (dest / "vid_features").mkdir(parents=True, exist_ok=True)
    tiler = None
    rows = {s: [] for s in D.SPLITS}
    done = reused = 0
    for p in tqdm(pairs, desc="preprocess", disable=not progress):
        a_out, v_out = dest / "aud_features" / p.audio_out, dest / "vid_features" / p.video_out(ext)
        if a_out.is_file() and v_out.is_file():
            reused += 1
        else:
            try:
                feat = audio_features(p.audio, cfg)
                if tiler is None:
                    tiler = FaceTiler(cfg)
                img, n_faces = tiler(p.video)
            except DataError as e:
                report(f"skipped {p.audio.name} / {p.video.name}: {e}")
                continue
            tmp_a, tmp_v = a_out.with_name(".tmp-" + a_out.name), v_out.with_name(".tmp-" + v_out.name)
            np.save(tmp_a, feat)
            if not cv2.imwrite(str(tmp_v), img):
                raise DataError(f"{v_out}: OpenCV could not write the image")
            tmp_v.replace(v_out)
            tmp_a.replace(a_out)  # the audio file last: both exist only when both are complete
            done += 1
        rows[split_of(p.name.actor, cfg)].append((p.audio_out, p.video_out(ext), p.name.label))
    for s in D.SPLITS:
        if not rows[s]:
            raise DataError(f"{raw_dir}: no usable clip lands in the {s} split (preprocess.splits: "
                            f"val_actors {cfg['preprocess']['splits']['val_actors']}, test_actors "
                            f"{cfg['preprocess']['splits']['test_actors']})")
        D.write_split(dest, cfg, s, rows[s])
    norm = write_normalization(dest, cfg, rows["train"])
    log(f"preprocess: training-split normalisation audio mean {norm['audio']['mean']:.4g} std "
        f"{norm['audio']['std']:.4g}, image mean {np.round(norm['image']['mean'], 4).tolist()} std "
        f"{np.round(norm['image']['std'], 4).tolist()} → {dest / D.NORM_FILE}")
    log(f"preprocess: {done} clips written, {reused} already done, {len(skipped)} skipped; "
        f"train/val/test = {len(rows['train'])}/{len(rows['val'])}/{len(rows['test'])} → {dest}")
    return {"written": done, "reused": reused, "skipped": skipped, "counts": {s: len(r) for s, r in rows.items()},
            "normalization": norm}


def write_normalization(dest: Path, cfg: dict, train_rows: list[tuple[str, str, int]]) -> dict:
    """Mean and std of the training split's audio features (over every value) and images (per RGB channel, after
    /255), written to dest/normalization.json: the normalisation of features this module made (MFH's constants are
    for MFH's own features)."""
    a_sum = a_sq = 0.0
    a_n = im_n = 0
    im_sum, im_sq = np.zeros(3), np.zeros(3)
    for aud, img, _ in train_rows:
        a = D.load_audio_array(dest / "aud_features" / aud, cfg).astype(np.float64)
        a_sum, a_sq, a_n = a_sum + a.sum(), a_sq + np.square(a).sum(), a_n + a.size
        rgb = D.load_image_array(dest / "vid_features" / img, cfg)[..., ::-1].reshape(-1, 3) / 255.0
        im_sum, im_sq, im_n = im_sum + rgb.sum(0), im_sq + np.square(rgb).sum(0), im_n + rgb.shape[0]
    a_mean, im_mean = a_sum / a_n, im_sum / im_n
    a_std = float(np.sqrt(max(a_sq / a_n - a_mean ** 2, 0.0)))
    im_std = np.sqrt(np.clip(im_sq / im_n - im_mean ** 2, 0.0, None))
    if a_std == 0 or (im_std == 0).any():
        raise DataError(f"{dest}: the training split's features are constant (audio std {a_std:.3g}, image std "
                        f"{im_std.tolist()}); cannot normalise")
    stats = {"audio": {"mean": float(a_mean), "std": a_std},
             "image": {"mean": im_mean.tolist(), "std": im_std.tolist()},
             "split": "train", "clips": len(train_rows), "written_by": "ravdess/preprocess.py"}
    atomic_write_json(dest / D.NORM_FILE, stats)
    return stats


def load_raw_sample(wav: Path, mp4: Path, cfg: dict, norm: dict, tiler: FaceTiler | None = None) -> dict:
    """One clip straight from the raw files, as AudioImageDataset would give it after preprocessing
    (label and index aside): {"audio", "image"}; norm = data.normalization(...)."""
    tiler = tiler or FaceTiler(cfg)
    img, _ = tiler(Path(mp4))
    # the image goes through the same lossless encode/decode as the feature layout's PNG
    ok, buf = cv2.imencode("." + cfg["preprocess"]["video"]["image_ext"], img)
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return {"audio": D.audio_tensor(audio_features(Path(wav), cfg), norm["audio"], cfg["parity"]),
            "image": D.image_tensor(img, norm["image"])}
