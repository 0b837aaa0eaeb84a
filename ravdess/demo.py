"""A small raw-RAVDESS tree for `--demo` and the tests: correct file names, audible emotions, real face photos.

Audio (`03-01-EE-…-AA.wav`): a voiced tone whose pitch, harmonic richness, tremolo rate and loudness contour are set
by the emotion (and shifted a little per actor), plus breath noise — the emotion can be heard in it.
Video (`01-01-EE-…-AA.mp4`): one real face photo per actor from scikit-image (the astronaut for actor 1, the LFW
subset's faces for the others) on a plain background, tinted, tilted and zoomed over time by the emotion.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import soundfile as sf

# per emotion 1..8: f0 (Hz), harmonics, tremolo (Hz), loudness slope, tint (B, G, R), tilt (deg), zoom swing
F0 = [110, 125, 220, 95, 180, 240, 105, 280]
HARMONICS = [2, 2, 5, 1, 8, 4, 6, 3]
TREMOLO = [0.0, 1.0, 6.0, 1.5, 9.0, 12.0, 3.0, 5.0]
SLOPE = [0.0, -0.3, 0.4, -0.6, 0.8, 0.2, -0.2, 1.0]
TINT = [(0, 0, 0), (40, 20, 0), (0, 30, 60), (60, 0, 0), (0, 0, 80), (50, 50, 0), (0, 60, 0), (30, 0, 50)]
TILT = [0, -4, 6, -8, 10, -12, 4, 14]
ZOOM = [0.0, 0.02, 0.08, 0.01, 0.12, 0.05, 0.04, 0.15]


def face_photos(n: int) -> list[np.ndarray]:
    """n distinct RGB uint8 face photos from scikit-image (astronaut first, then LFW faces)."""
    from skimage import data as sk
    faces = [np.ascontiguousarray(sk.astronaut()[10:230, 150:320])]
    lfw = sk.lfw_subset()
    for i in range(n - 1):
        g = (lfw[(7 * i) % len(lfw)] * 255).astype(np.uint8)
        faces.append(np.repeat(g[..., None], 3, axis=2))
    return faces[:n]


def synth_audio(emotion: int, actor: int, seconds: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    e = emotion - 1
    t = np.arange(int(seconds * sr)) / sr
    f0 = F0[e] * (1.0 + 0.06 * ((actor - 1) % 4)) * (1.0 + 0.01 * np.sin(2 * np.pi * 5 * t))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voice = sum(np.sin(k * phase) / k for k in range(1, HARMONICS[e] + 1))
    env = np.clip(1.0 + SLOPE[e] * (t / seconds - 0.5), 0.1, None)
    if TREMOLO[e] > 0:
        env = env * (0.6 + 0.4 * np.sin(2 * np.pi * TREMOLO[e] * t))
    ramp = np.minimum(1.0, np.minimum(t, seconds - t) / 0.05)
    y = 0.3 * voice * env * ramp + 0.01 * rng.standard_normal(t.size)
    return (y / max(1.0, np.abs(y).max())).astype(np.float32)


def synth_video(path: Path, face_rgb: np.ndarray, emotion: int, frames: int, size: int, fps: int,
                rng: np.random.Generator) -> None:
    e = emotion - 1
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (size, size))
    if not writer.isOpened():
        raise RuntimeError(f"{path}: OpenCV cannot write mp4 (mp4v codec missing)")
    face = cv2.cvtColor(face_rgb, cv2.COLOR_RGB2BGR)
    side = int(size * 0.6)
    face = cv2.resize(face, (side, int(side * face.shape[0] / face.shape[1])), interpolation=cv2.INTER_CUBIC)
    tint = np.array(TINT[e], np.float32)
    for k in range(frames):
        canvas = np.full((size, size, 3), 110, np.uint8)
        fh, fw = min(face.shape[0], size), face.shape[1]
        y0, x0 = (size - fh) // 2, (size - fw) // 2
        canvas[y0:y0 + fh, x0:x0 + fw] = face[:fh]
        s = 1.0 + ZOOM[e] * np.sin(2 * np.pi * k / max(frames, 1))
        m = cv2.getRotationMatrix2D((size / 2, size / 2), TILT[e] * np.sin(np.pi * k / max(frames - 1, 1)), s)
        img = cv2.warpAffine(canvas, m, (size, size), borderValue=(110, 110, 110)).astype(np.float32)
        img = img * 0.8 + tint + rng.normal(0, 2.0, img.shape)
        writer.write(np.clip(img, 0, 255).astype(np.uint8))
    writer.release()


def make_raw_tree(root: str | Path, actors=(1, 2, 3), emotions=range(1, 9), repetitions=(1,), seconds: float = 1.2,
                  sr: int = 16000, frames: int = 8, size: int = 160, fps: int = 8, seed: int = 0) -> list[Path]:
    """Write Actor_XX/03-01-EE-II-01-RR-XX.wav and 01-01-EE-II-01-RR-XX.mp4 files; returns the written paths."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    faces = face_photos(max(actors))
    written = []
    for a in actors:
        folder = root / f"Actor_{a:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for e in emotions:
            intensity = 1 if e == 1 else 2  # neutral has normal intensity only, as in RAVDESS
            for r in repetitions:
                stem = f"01-{e:02d}-{intensity:02d}-01-{r:02d}-{a:02d}"
                wav, mp4 = folder / f"03-{stem}.wav", folder / f"01-{stem}.mp4"
                sf.write(wav, synth_audio(e, a, seconds, sr, rng), sr)
                synth_video(mp4, faces[a - 1], e, frames, size, fps, rng)
                written += [wav, mp4]
    return written
