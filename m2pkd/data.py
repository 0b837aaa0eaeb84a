"""RECOLA / AVEC-2016 data: gold-standard readers (ARFF and the ';' CSV), the derived-file layout, the per-recording
CSVs, in-memory recordings for training, and a generator of a small tree in the real layout (demo and tests).

Raw layout (the AVEC 2016 package, as the End2You RECOLA notebook lists it)::

    <root>/recordings_video/<rec>.mp4
    <root>/recordings_audio/<rec>.wav
    <root>/ratings_gold_standard/arousal/<rec>.arff     AVEC: Instance_name, frameTime, GoldStandard (40 ms grid)
    <root>/ratings_gold_standard/valence/<rec>.arff
    <root>/ratings_gold_standard/<rec>.csv              the MMPKD variant: ';', no header, arousal;valence

Derived layout (under `data.work`)::

    Cropped_Aligned/<rec>/image<j>.jpg                  face crop of frame j (j from 0)
    audio_segments/<rec>/<n>_<rec>.wav                  1-s segments (n from 1)
    specs/<rec>/<n>_<rec>.npy  (or .jpg with audio.format=jpg)
    Annotations/Train_Set/<rec>.csv, Annotations/Val_Set/<rec>.csv   image_name,spec_name,arousal,valence
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.config import ConfigError, DataError

DIMS = ("arousal", "valence")
CSV_COLUMNS = ["image_name", "spec_name", "arousal", "valence"]


# ----------------------------------------------------------------------------------------------------------------
# paths

def root_dir(cfg) -> Path:
    if not cfg["data"]["root"]:
        raise ConfigError("data.root: expected the RECOLA directory (recordings_video/, recordings_audio/, "
                          "ratings_gold_standard/), got nothing; pass --data DIR or --demo")
    root = Path(cfg["data"]["root"])
    if not root.is_dir():
        raise DataError(f"{root}: data.root does not exist or is not a directory")
    return root


def work_dir(cfg) -> Path:
    return Path(cfg["data"]["work"]) if cfg["data"]["work"] else root_dir(cfg) / "processed"


def recordings(cfg) -> list[str]:
    return list(cfg["data"]["train"]) + list(cfg["data"]["dev"])


def video_path(cfg, rec): return root_dir(cfg) / "recordings_video" / f"{rec}.mp4"
def audio_path(cfg, rec): return root_dir(cfg) / "recordings_audio" / f"{rec}.wav"
def faces_dir(cfg, rec): return work_dir(cfg) / "Cropped_Aligned" / rec
def segments_dir(cfg, rec): return work_dir(cfg) / "audio_segments" / rec
def specs_dir(cfg, rec): return work_dir(cfg) / "specs" / rec


def annotation_path(cfg, rec) -> Path:
    split = "Val_Set" if rec in cfg["data"]["dev"] else "Train_Set"
    return work_dir(cfg) / "Annotations" / split / f"{rec}.csv"


def spec_ext(cfg) -> str:
    return cfg["audio"]["format"]


# ----------------------------------------------------------------------------------------------------------------
# gold standards

def _arff_attributes(lines: list[str], path: Path) -> tuple[list[str], int]:
    """ARFF header → (attribute names, index of the line after @data)."""
    attrs = []
    for no, line in enumerate(lines):
        low = line.strip().lower()
        if low.startswith("@attribute"):
            parts = line.split(None, 2)
            if len(parts) < 3:
                raise DataError(f"{path}:{no + 1}: expected '@attribute NAME TYPE', got {line.strip()!r}")
            attrs.append(parts[1].strip("'\""))
        elif low.startswith("@data"):
            return attrs, no + 1
    raise DataError(f"{path}: expected an ARFF file with an @data section, found none")


def read_arff(path) -> tuple[np.ndarray, np.ndarray]:
    """AVEC gold-standard ARFF → (frameTime seconds, GoldStandard), float64; a missing value ('?') is NaN.

    scipy.io.arff.loadarff refuses ARFF string attributes ("String attributes not supported yet") and the AVEC
    gold standard's Instance_name is one, so the header's attribute names are read here and the @data rows (quoted,
    comma-separated, '?' for missing) by pandas.read_csv."""
    import pandas as pd
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read gold standard ({e})") from None
    attrs, start = _arff_attributes(lines, path)
    for need in ("frameTime", "GoldStandard"):
        if need not in attrs:
            raise DataError(f"{path}: expected an ARFF with attribute {need!r}; attributes: {attrs}")
    body = "\n".join(lines[start:])
    try:
        df = pd.read_csv(io.StringIO(body), header=None, quotechar="'", skipinitialspace=True, comment="%",
                         na_values=["?"], keep_default_na=True, skip_blank_lines=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        reason = " ".join(str(e).split()) or "no rows"
        raise DataError(f"{path}: expected {len(attrs)} comma-separated values per @data row ({reason})") from None
    if df.shape[1] != len(attrs):
        raise DataError(f"{path}: expected {len(attrs)} comma-separated values per @data row, got {df.shape[1]}")
    df.columns = attrs
    cols = {}
    for name in ("frameTime", "GoldStandard"):
        col = pd.to_numeric(df[name], errors="coerce")
        bad = col.isna() & df[name].notna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"{path}: expected a number in {name} of @data row {row + 1}, got {df[name].iloc[row]!r}")
        cols[name] = col.to_numpy(np.float64)
    gaps = np.flatnonzero(np.isnan(cols["frameTime"]))
    if len(gaps):
        raise DataError(f"{path}: frameTime missing in @data row {int(gaps[0]) + 1}")
    return cols["frameTime"], cols["GoldStandard"]


def write_arff(path, rec: str, times, values) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["@relation GoldStandard", "", "@attribute Instance_name string", "@attribute frameTime numeric",
             "@attribute GoldStandard numeric", "", "@data", ""]
    lines += [f"'{rec}',{t:.2f},{v:.6f}" for t, v in zip(times, values)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _read_csv(path, what: str, **kw):
    """pandas.read_csv with the one-line DataError for a file that is missing, not UTF-8 or not CSV."""
    import pandas as pd
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    try:
        return pd.read_csv(path, encoding="utf-8", **kw)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: expected UTF-8 text ({e.reason} at byte {e.start})") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: expected {what} rows, found none") from None
    except (pd.errors.ParserError, ValueError, OSError) as e:
        raise DataError(f"{path}: not a readable {what} ({' '.join(str(e).split())[:160]})") from None


def _numeric(df, column, path, what: str) -> np.ndarray:
    """Column as float64 (empty cells and 'nan' are NaN); a non-numeric cell is a DataError naming its row."""
    import pandas as pd
    col = pd.to_numeric(df[column], errors="coerce")
    bad = col.isna() & df[column].notna() & (df[column].astype(str).str.strip().str.lower() != "nan")
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{path}: expected numeric {what} in row {row + 1}, got {df[column].iloc[row]!r}")
    return col.to_numpy(np.float64)


def read_gold_csv(path) -> np.ndarray:
    """The MMPKD ';'-separated gold standard without header → (rows, 2): column 0 arousal, 1 valence (NaN kept)."""
    df = _read_csv(path, "gold standard", sep=";", header=None, skip_blank_lines=True, dtype=str)
    if df.shape[1] < 2:
        raise DataError(f"{path}: expected 'arousal;valence' rows (';'-separated, no header), got {df.shape[1]} "
                        f"column(s)")
    return np.stack([_numeric(df, c, path, "arousal;valence") for c in (0, 1)], 1)


def read_gold(cfg, rec) -> dict[str, np.ndarray]:
    """{'arousal': (rows,), 'valence': (rows,)} on the 40 ms grid, from the configured format."""
    base = root_dir(cfg) / "ratings_gold_standard"
    fmt = cfg["data"]["gold_format"]
    if fmt == "csv":
        a = read_gold_csv(base / f"{rec}.csv")
        return {"arousal": a[:, 0], "valence": a[:, 1]}
    out = {}
    for dim in DIMS:
        path = base / dim / f"{rec}.arff"
        if not path.is_file():
            raise DataError(f"{path}: gold standard not found")
        t, g = read_arff(path)
        step = np.diff(t)
        if len(step) and not np.allclose(step, cfg["data"]["frame_ms"] / 1000, atol=2e-3):
            raise DataError(f"{path}: expected frameTime in {cfg['data']['frame_ms']} ms steps")
        out[dim] = g
    if len(out["arousal"]) != len(out["valence"]):
        raise DataError(f"{base}/*/{rec}.arff: arousal has {len(out['arousal'])} rows, valence {len(out['valence'])}")
    return out


def gold_path(cfg, rec) -> Path:
    base = root_dir(cfg) / "ratings_gold_standard"
    return base / f"{rec}.csv" if cfg["data"]["gold_format"] == "csv" else base / "{arousal,valence}" / f"{rec}.arff"


def finite_gold_rows(cfg, rec, gold: dict[str, np.ndarray]) -> np.ndarray:
    """Boolean mask of the gold-standard rows where both dimensions are finite. data.gold_nan: refuse raises a
    DataError naming the file and the first bad row; drop returns the mask (the caller logs the count)."""
    ok = np.isfinite(gold["arousal"]) & np.isfinite(gold["valence"])
    if not ok.all() and cfg["data"]["gold_nan"] == "refuse":
        raise DataError(f"{gold_path(cfg, rec)}: gold standard row {int(np.flatnonzero(~ok)[0]) + 1} is not a "
                        f"number ({int((~ok).sum())} such rows; data.gold_nan: drop leaves those frames out)")
    return ok


# ----------------------------------------------------------------------------------------------------------------
# per-recording annotation CSVs (step 3)

def segment_of_frame(j: np.ndarray, cfg, n_segments: int) -> np.ndarray:
    """1-based segment number of frame j (csv.mapping floor: the 1-s segment holding the frame's time), clamped to
    the segments that exist. The reference's CSVs need this mapping but MMPKD does not say how it was made."""
    per = cfg["audio"]["segment_seconds"] * 1000.0 / cfg["data"]["frame_ms"]
    return np.minimum(np.floor(np.asarray(j) / per).astype(int) + 1, n_segments)


def write_annotation_csv(path, rows: list[dict]) -> Path:
    import pandas as pd
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    pd.DataFrame(rows, columns=CSV_COLUMNS).to_csv(tmp, index=False, lineterminator="\n")
    tmp.replace(path)
    return path


def read_annotation_csv(path, dim: str) -> tuple[list[str], list[str], np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: annotation CSV not found (run the csv step first)")
    df = _read_csv(path, "annotation CSV", dtype=str, keep_default_na=False)
    missing = [c for c in ("image_name", "spec_name", dim) if c not in df.columns]
    if missing:
        raise DataError(f"{path}: expected columns image_name, spec_name, {dim}; missing {missing}")
    if df.empty:
        raise DataError(f"{path}: no rows")
    y = _numeric(df, dim, path, dim)
    if not np.isfinite(y).all():
        row = int(np.flatnonzero(~np.isfinite(y))[0])
        raise DataError(f"{path}: expected a finite {dim} value in row {row + 1}, got {df[dim].iloc[row]!r}")
    return df["image_name"].tolist(), df["spec_name"].tolist(), y.astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# in-memory recordings (replaces the reference's HDF5 validation cache)

@dataclass
class Recording:
    name: str
    frames: torch.Tensor      # (N, 3, S, S) uint8
    spec_index: torch.Tensor  # (N,) int64 into specs
    specs: torch.Tensor       # (M, C, H, W) float32 in [0, 1]
    labels: torch.Tensor      # (N,) float32

    def __len__(self):
        return len(self.labels)


def load_image(path, size: int) -> np.ndarray:
    import cv2
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"{path}: not a readable image")
    img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA).transpose(2, 0, 1)


def load_spec(path, cfg) -> np.ndarray:
    """A stored spectrogram → (C, H, W) float32 in [0, 1]: the dB matrix as (dB + top_db) / top_db, 1 channel
    (padded with the floor to a full segment's width); a JPEG as RGB resized to input_size."""
    path = Path(path)
    size = cfg["model"]["input_size"]
    if path.suffix == ".jpg":
        return load_image(path, size).astype(np.float32) / 255.0
    try:
        db = np.load(path)
    except Exception as e:
        raise DataError(f"{path}: not a readable .npy spectrogram ({e})") from None
    if db.ndim == 2 and not np.isfinite(db).all():
        bad = np.argwhere(~np.isfinite(db))[0].tolist()
        raise DataError(f"{path}: non-finite value at index {bad}")
    if db.ndim != 2 or db.shape[0] != cfg["audio"]["n_mels"]:
        raise DataError(f"{path}: expected a ({cfg['audio']['n_mels']}, frames) dB matrix, got {db.shape}")
    top = cfg["audio"]["top_db"]
    width = full_segment_frames(cfg)
    if db.shape[1] < width:
        db = np.pad(db, ((0, 0), (0, width - db.shape[1])), constant_values=-top)
    x = np.clip((db[:, :width] + top) / top, 0, 1).astype(np.float32)
    if cfg["model"]["spec_input"] == "resize":
        import cv2
        x = cv2.resize(x, (size, size), interpolation=cv2.INTER_AREA)
    return x[None]


def full_segment_frames(cfg) -> int:
    """STFT frames of a full segment (center=True): 1 + floor(samples / hop)."""
    samples = int(round(cfg["audio"]["segment_seconds"] * cfg["audio"]["sample_rate"]))
    return 1 + samples // cfg["audio"]["hop_length"]


def load_recording(cfg, rec: str, dim: str) -> Recording:
    images, specs, y = read_annotation_csv(annotation_path(cfg, rec), dim)
    size = cfg["model"]["input_size"]
    fdir, sdir = faces_dir(cfg, rec), specs_dir(cfg, rec)
    frames = np.stack([load_image(fdir / name, size) for name in images])
    uniq = list(dict.fromkeys(specs))
    pos = {s: i for i, s in enumerate(uniq)}
    spec_arr = np.stack([load_spec(sdir / s, cfg) for s in uniq])
    return Recording(rec, torch.from_numpy(frames), torch.tensor([pos[s] for s in specs]),
                     torch.from_numpy(spec_arr), torch.from_numpy(y))


def sample_clips(recs: list[Recording], batch: int, length: int, gen: torch.Generator, order: list[int]):
    """One training batch: `batch` clips of `length` consecutive frames, each from the next recording of a shuffled
    cycle over the training recordings (the reference: one random window per video per epoch), start uniform."""
    frames, spec_idx, labels, spec_list, offset = [], [], [], [], 0
    for _ in range(batch):
        if not order:
            order.extend(torch.randperm(len(recs), generator=gen).tolist())
        r = recs[order.pop(0)]
        if len(r) < length:
            raise DataError(f"recording {r.name}: {len(r)} frames, shorter than train.clip_length={length}")
        s = int(torch.randint(0, len(r) - length + 1, (1,), generator=gen))
        frames.append(r.frames[s:s + length])
        labels.append(r.labels[s:s + length])
        idx = r.spec_index[s:s + length]
        u, inv = torch.unique(idx, return_inverse=True)
        spec_list.append(r.specs[u])
        spec_idx.append(inv + offset)
        offset += len(u)
    return (torch.stack(frames), torch.stack(spec_idx), torch.cat(spec_list), torch.stack(labels))


# ----------------------------------------------------------------------------------------------------------------
# the demo tree

def _traces(rng: np.random.RandomState, n: int, fps: float) -> dict[str, np.ndarray]:
    """Smooth arousal / valence traces in [-0.6, 0.6] on the 25 Hz grid: random slow sinusoids."""
    t = np.arange(n) / fps
    out = {}
    for dim in DIMS:
        x = np.zeros(n)
        for _ in range(3):
            f = rng.uniform(0.08, 0.35)
            x += rng.uniform(0.5, 1.0) * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
        x = x - x.mean()
        out[dim] = 0.55 * x / max(np.abs(x).max(), 1e-6) + rng.uniform(-0.05, 0.05)
    return out


def _base_faces():
    """Real face photos shipped by scikit-image: the astronaut portrait and LFW faces (upscaled)."""
    from skimage import data as skd
    import cv2
    faces = [skd.astronaut()[10:230, 130:300]]
    lfw = skd.lfw_subset()[:100]
    for k in (0, 7, 21):
        g = (lfw[k] * 255).astype(np.uint8)
        faces.append(np.stack([cv2.resize(g, (96, 96), interpolation=cv2.INTER_CUBIC)] * 3, -1))
    return faces


def _demo_wav(rng: np.random.RandomState, tr: dict, d: dict, step: float) -> np.ndarray:
    """Audio of one demo recording: a tone whose pitch and loudness follow arousal, a band whose level and pitch
    follow valence, constant noise (the loudness shows as the SNR, since the spectrogram's dB are re its maximum)."""
    sr = d["wav_rate"]
    n = int(round(d["seconds"] * sr))
    t = np.arange(n) / sr
    grid_t = np.arange(len(tr["arousal"])) * step
    a = np.interp(t, grid_t, tr["arousal"])
    v = np.interp(t, grid_t, tr["valence"])
    phase = 2 * np.pi * np.cumsum(500.0 * 2 ** (1.5 * a)) / sr
    y = 0.25 * 10 ** (1.2 * a) * (np.sin(phase) + 0.5 * np.sin(2 * phase) + 0.25 * np.sin(3 * phase))
    y += 0.2 * 10 ** (1.5 * v) * np.sin(2 * np.pi * np.cumsum(3000.0 * 2 ** (1.0 * v)) / sr)
    y += d["audio_noise"] * rng.normal(0, 1, n)
    return (0.9 * y / max(np.abs(y).max(), 1e-6)).astype(np.float32)


def make_demo(root, cfg, seed: int | None = None) -> Path:
    """Write a small RECOLA-layout tree: videos (mp4v) whose faces follow the traces weakly and noisily (brightness
    follows arousal, size valence), wavs whose pitch and loudness follow arousal and whose high band follows valence
    (strongly, as RECOLA's audio carries arousal best), and gold standards in both formats. Recording k of every
    split uses its own traces; the same seed gives the same tree."""
    import cv2
    import soundfile as sf
    root = Path(root)
    d = cfg["demo"]
    rng = np.random.RandomState(cfg["seed"] if seed is None else seed)
    fps, size, sr = d["video_fps"], d["frame_size"], d["wav_rate"]
    step = cfg["data"]["frame_ms"] / 1000.0
    n_grid = int(round(d["seconds"] / step))
    faces = _base_faces()
    for sub in ("recordings_video", "recordings_audio", "ratings_gold_standard/arousal",
                "ratings_gold_standard/valence"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, rec in enumerate(recordings(cfg)):
        tr = _traces(rng, n_grid + 1, 1 / step)   # gold standard: t = 0 .. seconds inclusive
        times = np.arange(n_grid + 1) * step
        for dim in DIMS:
            write_arff(root / "ratings_gold_standard" / dim / f"{rec}.arff", rec, times, tr[dim])
        with open(root / "ratings_gold_standard" / f"{rec}.csv", "w") as f:
            f.writelines(f"{a:.6f};{v:.6f}\n" for a, v in zip(tr["arousal"], tr["valence"]))
        # video
        face = faces[i % len(faces)]
        n_frames = int(round(d["seconds"] * fps))
        vw = cv2.VideoWriter(str(root / "recordings_video" / f"{rec}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), fps,
                             (size, size))
        if not vw.isOpened():
            raise DataError(f"{root}/recordings_video/{rec}.mp4: OpenCV cannot write mp4v video")
        bg = rng.randint(40, 200, 3)
        for k in range(n_frames):
            g = min(int(round(k / fps / step)), n_grid)
            a, v = tr["arousal"][g], tr["valence"][g]
            # the face's brightness follows arousal and its size valence, under per-frame noise (weak but learnable)
            scale = 0.72 + 0.5 * d["face_signal"] * v + rng.normal(0, 0.25 * d["face_noise"])
            side = int(np.clip(size * scale, size * 0.5, size * 0.95))
            img = cv2.resize(face, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32)
            gain = 1.0 + d["face_signal"] * a + rng.normal(0, d["face_noise"])
            img = np.clip(img * gain, 0, 255)
            frame = np.empty((size, size, 3), np.float32)
            frame[:] = bg
            y0 = int(np.clip((size - side) // 2 + rng.randint(-2, 3), 0, size - side))
            x0 = int(np.clip((size - side) // 2 + rng.randint(-2, 3), 0, size - side))
            frame[y0:y0 + side, x0:x0 + side] = img
            frame = np.clip(frame + rng.normal(0, 4, frame.shape), 0, 255).astype(np.uint8)
            vw.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        vw.release()
        y = _demo_wav(rng, tr, d, step)
        sf.write(root / "recordings_audio" / f"{rec}.wav", y, sr)
    return root
