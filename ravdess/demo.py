"""A small raw-RAVDESS tree for `--demo` and the tests: correct file names, audible emotions, real face photos.

The two modalities carry the emotion to different degrees, as in the real data (where the voice is the stronger cue):

Audio (`03-01-EE-…-AA.wav`): a voiced tone whose pitch, harmonic richness (spectral envelope), breathiness, tremolo
rate and loudness contour are set by the emotion — all eight emotions sound different — on top of a per-actor voice
(pitch and timbre) and per-take jitter (pitch, tremolo, onset, level, noise).
Video (`01-01-EE-…-AA.mp4`): one real face photo per actor from scikit-image (the astronaut for actor 1, the LFW
subset's faces for the others) on a plain background, tinted, tilted and zoomed over time. The face shows the emotion
only partly: the tint marks one of four groups of two emotions (neutral/calm, happy/surprised, sad/disgust,
angry/fearful); within a group a small shift of the tint and the direction of the head tilt lean towards one of the
two, and every take jitters tint and tilt by more than that, plus its lighting. So an image alone identifies the
group well and the emotion within it only sometimes.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import soundfile as sf

# per emotion 1..8 (neutral, calm, happy, sad, angry, fearful, disgust, surprised)
F0 = [120, 105, 210, 90, 165, 250, 135, 300]             # Hz, before the actor's factor
HARMONICS = [3, 6, 5, 1, 10, 2, 8, 4]                    # partials: spectral envelope (what MFCCs see best)
ROLLOFF = [1.0, 2.0, 1.0, 1.0, 0.5, 1.5, 0.7, 1.0]       # partial k has amplitude k^-ROLLOFF
BREATH = [0.01, 0.08, 0.02, 0.05, 0.03, 0.12, 0.06, 0.02]  # noise / voice
TREMOLO = [0.0, 2.0, 6.0, 1.0, 0.0, 11.0, 4.0, 8.0]      # Hz (0: none)
SLOPE = [0.0, -0.5, 0.5, -0.8, 0.3, 0.0, -0.3, 0.9]      # loudness contour over the take
# video: the group of each emotion (its tint), and within the group the side it leans to: a small shift of the tint's
# blue-green balance and the direction of the head tilt, both smaller than the per-take jitter
GROUP = [0, 0, 1, 2, 3, 3, 2, 1]
TINT = [(0, 0, 0), (45, 35, 0), (0, 10, 55), (0, 45, 10)]  # B, G, R per group
SIDE = [-1, 1, -1, -1, -1, 1, 1, 1]
SHIFT = (6.0, -6.0, 0.0)                                   # B, G, R × SIDE
TILT_DEG, ZOOM = 7.0, 0.05


def actor_voice(actor: int) -> tuple[float, float]:
    """(pitch factor, spectral-tilt offset) of an actor: deterministic, different per actor."""
    r = np.random.default_rng(10_000 + actor)
    return float(r.uniform(0.85, 1.2)), float(r.uniform(-0.25, 0.25))


def face_photos(n: int) -> list[np.ndarray]:
    """n distinct RGB uint8 face photos from scikit-image (astronaut first, then LFW faces)."""
    from skimage import data as sk
    faces = [np.ascontiguousarray(sk.astronaut()[10:230, 150:320])]
    lfw = sk.lfw_subset()[:100]  # the first 100 of lfw_subset are faces, the rest non-faces
    for i in range(n - 1):
        g = (lfw[(7 * i) % len(lfw)] * 255).astype(np.uint8)
        faces.append(np.repeat(g[..., None], 3, axis=2))
    return faces[:n]


def synth_audio(emotion: int, actor: int, seconds: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    e = emotion - 1
    n = int(seconds * sr)
    pitch, tilt = actor_voice(actor)
    start = int(rng.uniform(0.0, 0.08) * sr)  # onset jitter
    t = np.arange(n - start) / sr
    dur = t[-1] if t.size else 1.0
    f0 = F0[e] * pitch * (1.0 + 0.03 * rng.standard_normal()) * (1.0 + 0.01 * np.sin(2 * np.pi * 5 * t))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    nyq = sr / 2
    voice = np.zeros_like(t)
    for k in range(1, HARMONICS[e] + 1):
        if k * f0.max() < nyq:
            voice += np.sin(k * phase + rng.uniform(0, 2 * np.pi)) * k ** -(ROLLOFF[e] + tilt)
    voice /= max(np.abs(voice).max(), 1e-6)
    voice += BREATH[e] * (1.0 + 0.3 * rng.standard_normal()) * 3.0 * rng.standard_normal(t.size)
    env = np.clip(1.0 + (SLOPE[e] + 0.1 * rng.standard_normal()) * (t / dur - 0.5), 0.1, None)
    if TREMOLO[e] > 0:
        rate = TREMOLO[e] * (1.0 + 0.1 * rng.standard_normal())
        env = env * (0.6 + 0.4 * np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi)))
    ramp = np.minimum(1.0, np.minimum(t, dur - t) / 0.03)
    y = np.zeros(n)
    y[start:] = rng.uniform(0.15, 0.3) * voice * env * ramp
    y += rng.uniform(0.002, 0.01) * rng.standard_normal(n)  # room noise
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
    # per take: tint and tilt jitter, lighting (brightness, colour cast), background
    tint = np.array(TINT[GROUP[e]], np.float32) + SIDE[e] * np.array(SHIFT, np.float32) + rng.normal(0, 10.0, 3)
    tilt = TILT_DEG * SIDE[e] + rng.normal(0, 4.0)
    light = rng.uniform(0.75, 0.95)
    cast = rng.normal(0, 6.0, 3)
    bg = int(rng.integers(90, 140))
    for k in range(frames):
        canvas = np.full((size, size, 3), bg, np.uint8)
        fh, fw = min(face.shape[0], size), face.shape[1]
        y0, x0 = (size - fh) // 2, (size - fw) // 2
        canvas[y0:y0 + fh, x0:x0 + fw] = face[:fh]
        s = 1.0 + ZOOM * np.sin(2 * np.pi * k / max(frames, 1))
        m = cv2.getRotationMatrix2D((size / 2, size / 2), tilt * np.sin(np.pi * (k + 1) / (frames + 1)), s)
        img = cv2.warpAffine(canvas, m, (size, size), borderValue=(bg, bg, bg)).astype(np.float32)
        img = img * light + tint + cast + rng.normal(0, 2.0, img.shape)
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
