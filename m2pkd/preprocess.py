"""Pipeline steps 1-3: face crops (MTCNN), 1-s audio segments, log-mel spectrograms, per-recording CSVs.

Every step skips outputs that are already complete (a `.done` marker per recording for the face and segment folders,
the file itself for spectrograms and CSVs) and names and skips a recording whose video or audio cannot be read.
Each returns {"done": [...], "skipped": [...], "failed": {rec: reason}}.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np

from common.config import DataError
from m2pkd import data as D

DONE = ".done"


def _report():
    return {"done": [], "skipped": [], "failed": {}}


def _pending(cfg, rep: dict, out_dir):
    """(recording, output folder) for every recording whose folder lacks the `.done` marker; the finished ones are
    listed in rep["skipped"]."""
    for rec in D.recordings(cfg):
        out = out_dir(cfg, rec)
        if (out / DONE).exists():
            rep["skipped"].append(rec)
        else:
            yield rec, out


def _progress(it, enabled, desc):
    if not enabled:
        return it
    from tqdm import tqdm
    return tqdm(it, desc=desc, leave=False)


# ----------------------------------------------------------------------------------------------------------------
# step 1: faces

def build_detector(cfg):
    from facenet_pytorch import MTCNN
    f = cfg["faces"]
    return MTCNN(min_face_size=f["min_face_size"], thresholds=list(f["thresholds"]), keep_all=True,
                 post_process=False, device="cpu")


def grid_times_ms(duration_ms: float, frame_ms: float) -> np.ndarray:
    """k·frame_ms for k = 0, 1, ... while < duration (the reference's 40 ms timestamp grid)."""
    return np.arange(int(math.ceil(duration_ms / frame_ms))) * frame_ms


def read_grid_frames(path: Path, frame_ms: float):
    """Yield the BGR frame at each grid timestamp, seeking with CAP_PROP_POS_MSEC."""
    import cv2
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise DataError(f"{path}: OpenCV cannot open the video")
    fps = cap.get(cv2.CAP_PROP_FPS)
    count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
    if not fps or fps <= 0 or not count or count <= 0:
        cap.release()
        raise DataError(f"{path}: no frame rate / frame count (not a readable video)")
    duration = count / fps * 1000.0
    try:
        for t in grid_times_ms(duration, frame_ms):
            cap.set(cv2.CAP_PROP_POS_MSEC, float(t))
            ok, frame = cap.read()
            if not ok:
                break
            yield frame
    finally:
        cap.release()


def crop_first_face(detector, frame_bgr: np.ndarray, bgr: bool):
    """The crop of the most confident MTCNN box (x1, y1, x2, y2, clipped to the frame; no margin, no resize),
    or None. `bgr` hands the detector the BGR frame as the reference does."""
    import cv2
    rgb = frame_bgr if bgr else cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)
    boxes, probs = detector.detect(rgb)
    if boxes is None or len(boxes) == 0:
        return None
    b = boxes[int(np.argmax(probs))]
    h, w = frame_bgr.shape[:2]
    x1, y1 = max(int(b[0]), 0), max(int(b[1]), 0)
    x2, y2 = min(int(math.ceil(b[2])), w), min(int(math.ceil(b[3])), h)
    if x2 - x1 < 2 or y2 - y1 < 2:
        return None
    return frame_bgr[y1:y2, x1:x2]


def extract_faces(cfg, log: Callable[[str], None] = print, detector=None) -> dict:
    import cv2
    f, rep = cfg["faces"], _report()
    bgr = f["bgr"] or cfg["parity"]
    for rec, out in _pending(cfg, rep, D.faces_dir):
        src = D.video_path(cfg, rec)
        if not src.is_file():
            rep["failed"][rec] = f"{src}: missing"
            log(f"faces: skipping {rec}: {src}: missing")
            continue
        detector = detector or build_detector(cfg)
        out.mkdir(parents=True, exist_ok=True)
        last, n, missed = None, 0, 0
        black = np.zeros((f["black_size"], f["black_size"], 3), np.uint8)
        try:
            for j, frame in enumerate(_progress(read_grid_frames(src, cfg["data"]["frame_ms"]), cfg["progress"],
                                                f"faces {rec}")):
                crop = crop_first_face(detector, frame, bgr)
                if crop is None:
                    missed += 1
                    crop = last if (f["frame_retention"] and last is not None) else black
                else:
                    last = crop
                cv2.imwrite(str(out / f"image{j}.jpg"), crop, [cv2.IMWRITE_JPEG_QUALITY, f["jpeg_quality"]])
                n += 1
        except DataError as e:
            rep["failed"][rec] = str(e)
            log(f"faces: skipping {rec}: {e}")
            continue
        if n == 0:
            rep["failed"][rec] = f"{src}: no frame could be decoded"
            log(f"faces: skipping {rec}: {src}: no frame could be decoded")
            continue
        (out / DONE).write_text(f"{n} frames, {missed} without a face\n")
        log(f"faces: {rec}: {n} frames, {missed} without a detected face")
        rep["done"].append(rec)
    return rep


# ----------------------------------------------------------------------------------------------------------------
# step 2: audio segments and spectrograms

def video_seconds(path: Path) -> float | None:
    """Duration of a video from its frame count and rate (None when OpenCV cannot tell)."""
    import cv2
    cap = cv2.VideoCapture(str(path))
    try:
        fps, count = cap.get(cv2.CAP_PROP_FPS), cap.get(cv2.CAP_PROP_FRAME_COUNT)
    finally:
        cap.release()
    return count / fps if fps and fps > 0 and count and count > 0 else None


def expected_seconds(cfg, rec) -> dict[str, float]:
    """What the audio must cover: the video's duration and the gold standard's (rows − 1) × 40 ms, where known."""
    out = {}
    if D.video_path(cfg, rec).is_file():
        v = video_seconds(D.video_path(cfg, rec))
        if v:
            out["video"] = v
    try:
        gold = D.read_gold(cfg, rec)
        out["gold standard"] = (len(gold["arousal"]) - 1) * cfg["data"]["frame_ms"] / 1000.0
    except DataError:
        pass  # a missing or broken gold standard is reported by the csv step
    return out


def check_duration(src: Path, seconds: float, cfg, rec) -> None:
    """Refuse audio that is shorter than the video or the gold standard (a truncated wav would give most frames
    the wrong spectrogram), naming the durations."""
    need = expected_seconds(cfg, rec)
    short = {k: v for k, v in need.items() if seconds < v - cfg["data"]["duration_tolerance"]}
    if short:
        what = ", ".join(f"{k} {v:.2f} s" for k, v in need.items())
        raise DataError(f"{src}: audio lasts {seconds:.2f} s, shorter than the recording ({what}); truncated wav?")


def extract_audio(cfg, log: Callable[[str], None] = print) -> dict:
    import librosa
    import soundfile as sf
    a, rep = cfg["audio"], _report()
    for rec, out in _pending(cfg, rep, D.segments_dir):
        src = D.audio_path(cfg, rec)
        try:
            if not src.is_file():
                raise DataError(f"{src}: missing")
            try:
                y, sr = librosa.load(str(src), sr=a["sample_rate"], mono=True)
            except Exception as e:  # librosa / soundfile raise many types for corrupt files
                reason = " ".join(str(e).split())[:120]
                raise DataError(f"{src}: unreadable audio ({type(e).__name__}: {reason})") from None
            if len(y) == 0:
                raise DataError(f"{src}: empty audio")
            check_duration(src, len(y) / sr, cfg, rec)
        except DataError as e:
            rep["failed"][rec] = str(e)
            log(f"audio: skipping {rec}: {e}")
            continue
        out.mkdir(parents=True, exist_ok=True)
        buf = int(round(a["segment_seconds"] * sr))
        n = 0
        for n, s in enumerate(range(0, len(y), buf), 1):
            sf.write(out / f"{n}_{rec}.wav", y[s:s + buf], sr)
        (out / DONE).write_text(f"{n} segments at {sr} Hz\n")
        log(f"audio: {rec}: {n} segments of {a['segment_seconds']} s at {sr} Hz")
        rep["done"].append(rec)
    return rep


def log_mel_db(y: np.ndarray, cfg) -> np.ndarray:
    import librosa
    a = cfg["audio"]
    S = librosa.feature.melspectrogram(y=y, sr=a["sample_rate"], n_fft=a["n_fft"], hop_length=a["hop_length"],
                                       n_mels=a["n_mels"])
    return librosa.power_to_db(S, ref=np.max, top_db=a["top_db"]).astype(np.float32)


def render_jpg(db: np.ndarray, cfg, path: Path) -> None:
    """The reference's picture of a spectrogram: specshow (magma), no axes, full-bleed, default figure size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import librosa.display
    w, h = cfg["audio"]["jpg_size"]
    fig = plt.figure(figsize=(w / 100, h / 100), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_axis_off()
    librosa.display.specshow(db, sr=cfg["audio"]["sample_rate"], hop_length=cfg["audio"]["hop_length"], ax=ax)
    fig.savefig(path, dpi=100, format="jpg")
    plt.close(fig)


def make_specs(cfg, log: Callable[[str], None] = print) -> dict:
    import soundfile as sf
    rep = _report()
    ext = D.spec_ext(cfg)
    for rec in D.recordings(cfg):
        seg = D.segments_dir(cfg, rec)
        if not (seg / DONE).exists():
            rep["failed"][rec] = f"{seg}: missing (run audio_extract.py first)"
            log(f"melspec: skipping {rec}: {seg}: missing (run audio_extract.py first)")
            continue
        out = D.specs_dir(cfg, rec)
        out.mkdir(parents=True, exist_ok=True)
        wavs = sorted(seg.glob(f"*_{rec}.wav"), key=lambda p: int(p.name.split("_")[0]))
        new = 0
        for w in wavs:
            target = out / f"{w.stem}.{ext}"
            if target.exists():
                continue
            try:
                y, _ = sf.read(w, dtype="float32")
            except Exception as e:
                raise DataError(f"{w}: unreadable audio segment ({type(e).__name__})") from None
            db = log_mel_db(y, cfg)
            if ext == "npy":
                tmp = target.with_suffix(".tmp.npy")
                np.save(tmp, db)
                tmp.replace(target)
            else:
                render_jpg(db, cfg, target)
            new += 1
        (rep["done"] if new else rep["skipped"]).append(rec)
        if new:
            log(f"melspec: {rec}: {new} spectrograms ({ext})")
    return rep


# ----------------------------------------------------------------------------------------------------------------
# step 3: per-recording CSVs

def make_csvs(cfg, log: Callable[[str], None] = print) -> dict:
    rep = _report()
    ext = D.spec_ext(cfg)
    for rec in D.recordings(cfg):
        path = D.annotation_path(cfg, rec)
        if path.exists():
            rep["skipped"].append(rec)
            continue
        fdir, sdir = D.faces_dir(cfg, rec), D.specs_dir(cfg, rec)
        missing = [str(p) for p, ok in ((fdir, (fdir / DONE).exists()), (sdir, sdir.is_dir())) if not ok]
        if missing:
            rep["failed"][rec] = f"{' and '.join(missing)}: missing (run face_detector.py / audio_melspec.py first)"
            log(f"csv: skipping {rec}: {rep['failed'][rec]}")
            continue
        try:
            gold = D.read_gold(cfg, rec)
            keep = D.finite_gold_rows(cfg, rec, gold)
        except DataError as e:
            rep["failed"][rec] = str(e)
            log(f"csv: skipping {rec}: {e}")
            continue
        n_frames = len(list(fdir.glob("image*.jpg")))
        n_specs = len(list(sdir.glob(f"*_{rec}.{ext}")))
        if n_specs == 0:
            rep["failed"][rec] = f"{sdir}: no .{ext} spectrograms"
            log(f"csv: skipping {rec}: {sdir}: no .{ext} spectrograms")
            continue
        # the gold standard has one row more than the frames (t = 0 .. T inclusive): drop the tail rows
        n = min(n_frames, len(gold["arousal"]))
        seg = D.segment_of_frame(np.arange(n), cfg, n_specs)
        rows = [{"image_name": f"image{j}.jpg", "spec_name": f"{seg[j]}_{rec}.{ext}",
                 "arousal": f"{gold['arousal'][j]:.6f}", "valence": f"{gold['valence'][j]:.6f}"}
                for j in range(n) if keep[j]]
        D.write_annotation_csv(path, rows)
        dropped = n - len(rows)
        log(f"csv: {rec}: {len(rows)} rows (gold standard {len(gold['arousal'])} rows, {n_frames} frames, "
            f"{n_specs} specs" + (f"; {dropped} frames dropped: gold standard not a number, data.gold_nan: drop)"
                                  if dropped else ")"))
        rep["done"].append(rec)
    return rep
