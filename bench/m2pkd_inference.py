"""Stateful whole-recording inference of the M2PKD teacher: ours (CNN features in large frame batches, audio
features once per distinct spectrogram, then the GRU over 5-frame chunks with the state carried) vs the reference's
loop (each 5-frame chunk pushed through both CNNs — one spectrogram per frame — and the GRU in turn).
Prints "ratio = ours / baseline" (wall-clock time, < 1 means ours is faster), measured in one run.

On CUDA it runs the full-size model (112 px, VGG19-BN, ResNet18 on 112 px spectrogram images) on 1500 frames;
without a GPU it says so and measures CPU at a reduced size (the demo's model sizes, 150 frames).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from common.config import load_yaml, merge  # noqa: E402
from m2pkd import data as D, models as M, trainer as T  # noqa: E402
from m2pkd.pipeline import CONFIG, DEMO_CONFIG  # noqa: E402


@torch.no_grad()
def reference_loop(model, rec, chunk, device):
    h, outs = None, []
    for s in range(0, len(rec), chunk):
        fr = rec.frames[s:s + chunk].to(device).float()[None] / 255.0
        idx = rec.spec_index[s:s + chunk].to(device)
        specs = rec.specs.to(device)[idx]                        # one spectrogram per frame
        o = model.temporal(model.visual_features(fr), model.audio(specs)[None], h)
        h = o["h"]
        outs.append(o["out"][0])
    return torch.cat(outs).cpu()


def main():
    defaults = load_yaml(CONFIG)
    cuda = torch.cuda.is_available()
    cfg = merge(defaults, {} if cuda else load_yaml(DEMO_CONFIG), "bench")
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        print("no GPU available: measuring CPU at a reduced size (demo model sizes, 150 frames)")
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    n = 1500 if cuda else 150
    m, s = cfg["model"], cfg["model"]["input_size"]
    torch.manual_seed(0)
    # the audio input of audio.format: the spectrogram picture (3 x input_size^2) or the dB matrix (1 x mels x frames)
    jpg = cfg["audio"]["format"] == "jpg"
    spec_shape = (3, s, s) if jpg else (1, cfg["audio"]["n_mels"], D.full_segment_frames(cfg))
    rec = D.Recording("bench", torch.randint(0, 255, (n, 3, s, s), dtype=torch.uint8), torch.arange(n) // 25,
                      torch.rand((n + 24) // 25, *spec_shape), torch.rand(n))
    model = M.TeacherModel(m).to(device).eval()
    chunk = cfg["train"]["eval_chunk"]

    def timed(fn):
        fn()  # warm-up
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    t_ours, ours = timed(lambda: torch.from_numpy(T.predict(model, rec, cfg, device)).float())
    t_ref, ref = timed(lambda: reference_loop(model, rec, chunk, device))
    err = (ours - ref).abs().max().item()
    print(f"device {device}, {n} frames, chunks of {chunk}: ours {t_ours:.3f} s, reference loop {t_ref:.3f} s, "
          f"max |difference| {err:.2e}")
    print(f"ratio = ours / baseline = {t_ours / t_ref:.3f}")


if __name__ == "__main__":
    main()
