"""Fast unit tests: gold-standard readers (ARFF, ';' CSV, annotation CSV), CCC against numpy, post-processing on
known signals, KD weightings, declared config checks, stateful inference, models' shapes, pretrained weights."""
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import DataError
from common.metrics import ccc_loss, ccc_np
from m2pkd import data as D
from m2pkd import models as M
from m2pkd import pipeline as PL
from m2pkd import postprocess as PP
from m2pkd import trainer as T

ROOT = Path(__file__).resolve().parents[2]


def demo_cfg(*sets):
    return PL.resolve(PL.parser("t", flags=("train",)).parse_args(["--demo", *sum((["--set", s] for s in sets), [])]))


def test_arff_roundtrip_and_errors(tmp_path):
    t = np.arange(11) * 0.04
    v = np.sin(t)
    p = D.write_arff(tmp_path / "a.arff", "train_1", t, v)
    tt, vv = D.read_arff(p)
    assert np.allclose(tt, t) and np.allclose(vv, v, atol=1e-6)
    cases = {"noattr.arff": ("@attribute Instance_name string\n@attribute frameTime numeric\n@data\n'x',0.0\n",
                             "noattr.arff.*GoldStandard"),
             "long.arff": (p.read_text() + "'train_1',0.44,0.1,7\n", "long.arff: expected 3 comma-separated"),
             "word.arff": (p.read_text() + "'train_1',0.44,high\n", "word.arff: expected a number in GoldStandard "
                                                                       "of @data row 12"),
             "nodata.arff": ("@relation x\n@attribute frameTime numeric\n", "nodata.arff: expected an ARFF file "
                                                                             "with an @data section"),
             "latin.arff": (None, "latin.arff: cannot read")}
    for name, (text, match) in cases.items():
        if text is None:
            (tmp_path / name).write_bytes(p.read_bytes() + "'é',0.48,0.1\n".encode("latin-1"))
        else:
            (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=match):
            D.read_arff(tmp_path / name)
    # '?' (ARFF's missing value) and a short row read as NaN; the csv step then refuses or drops them
    (tmp_path / "gaps.arff").write_text(p.read_text() + "'train_1',0.44,?\n'train_1',0.48\n")
    _, g = D.read_arff(tmp_path / "gaps.arff")
    assert len(g) == 13 and np.isnan(g[-2:]).all() and np.isfinite(g[:-2]).all()


def test_gold_and_annotation_csv_readers(tmp_path):
    p = tmp_path / "dev_1.csv"
    p.write_text("0.1;0.2\n-0.3;0.4\n")
    assert np.allclose(D.read_gold_csv(p), [[0.1, 0.2], [-0.3, 0.4]])
    p.write_text("0.1,0.2\n")
    with pytest.raises(DataError, match="dev_1.csv: expected 'arousal;valence'"):
        D.read_gold_csv(p)
    p.write_text("0.1;0.2\n0.3;x\n")
    with pytest.raises(DataError, match="dev_1.csv: expected numeric arousal;valence in row 2"):
        D.read_gold_csv(p)
    p.write_text("0.1;0.2\nnan;0.4\n")
    assert np.isnan(D.read_gold_csv(p)[1, 0])
    rows = [{"image_name": f"image{j}.jpg", "spec_name": "1_dev_1.jpg", "arousal": 0.1 * j, "valence": -0.1}
            for j in range(3)]
    a = D.write_annotation_csv(tmp_path / "Val_Set" / "dev_1.csv", rows)
    images, specs, y = D.read_annotation_csv(a, "arousal")
    assert images == ["image0.jpg", "image1.jpg", "image2.jpg"] and np.allclose(y, [0, 0.1, 0.2])
    bad = {"cols.csv": ("image_name,arousal\nimage0.jpg,0.1\n", "cols.csv: expected columns.*missing.*spec_name"),
           "value.csv": ("image_name,spec_name,arousal\nimage0.jpg,1_x.jpg,0.1\nimage1.jpg,1_x.jpg,nan\n",
                         "value.csv: expected a finite arousal value in row 2"),
           "empty.csv": ("", "empty.csv: expected annotation CSV rows, found none"),
           "binary.csv": (None, "binary.csv: expected UTF-8")}
    for name, (text, match) in bad.items():
        if text is None:
            (tmp_path / name).write_bytes(b"image_name,spec_name,arousal\n\xff\xfe,1,0.1\n")
        else:
            (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=match):
            D.read_annotation_csv(tmp_path / name, "arousal")


def test_ccc_and_loss_against_numpy():
    rng = np.random.RandomState(0)
    g = rng.normal(size=500)
    p = 0.7 * g + 0.3 + rng.normal(scale=0.5, size=500)
    r = np.corrcoef(p, g)[0, 1]
    ref = 2 * r * p.std() * g.std() / (p.var() + g.var() + (p.mean() - g.mean()) ** 2)
    assert ccc_np(p, g) == pytest.approx(ref, rel=1e-10)
    loss = ccc_loss(torch.tensor(p).view(20, 25), torch.tensor(g).view(20, 25))
    assert loss.item() == pytest.approx(1 - ref, rel=1e-6)
    gc = g - g.mean()
    assert ccc_np(gc, gc) == pytest.approx(1.0) and ccc_np(-gc, gc) == pytest.approx(-1.0)


def test_postprocessing_on_known_signals():
    t = np.arange(600)
    g = np.sin(2 * np.pi * t / 150)
    # a prediction that leads the gold standard by 12 frames, at half scale and offset: the AVEC chain finds
    # the delay, the bias and the scale on one recording and applies them to another
    lead = lambda x, k: np.concatenate([x[k:], np.full(k, x[-1])])
    pred = 0.5 * lead(g, 12) + 0.4
    params = PP.fit_avec([(pred, g)], medians=[1, 3], shifts=[0, 4, 8, 12, 16])
    assert params["shift"] == 12 and params["bias"] == pytest.approx(-0.4, abs=0.05)
    assert params["scale"] == pytest.approx(2.0, rel=0.05)
    assert ccc_np(PP.apply_avec(pred, params), g) > 0.99 > ccc_np(pred, g)
    # authors' chain pieces
    assert np.array_equal(PP.circular_shift(np.arange(5.0), 2), [3, 4, 0, 1, 2])
    assert np.allclose(PP.box_filter(np.ones(7), 3), [2 / 3, 1, 1, 1, 1, 1, 2 / 3])
    y = PP.authors_chain(np.arange(10.0), 2.0, 1, 1)
    assert np.allclose(y, 2 * np.roll(np.arange(10.0), 1))
    with pytest.raises(Exception, match="odd"):
        PP.fit_avec([(pred, g)], medians=[2], shifts=[0])


def test_kd_weights_paper_exact_and_sane():
    cfg = demo_cfg()
    assert cfg["kd"]["weighting"] == "paper"                         # the default is the method
    assert T.kd_weights(0.1, cfg) == pytest.approx((0.7, 0.3))     # good teacher: β = 0.2 + γ
    assert T.kd_weights(0.5, cfg) == (0.0, 1.0)                    # mediocre: KD only
    assert T.kd_weights(1.3, cfg) == (1.0, 0.0)                    # anti-correlated: the ground truth alone
    exact = demo_cfg("parity=true")                                 # the reference's rule, negative GT weight
    a, b = T.kd_weights(1.3, exact)
    assert b == pytest.approx(1.5) and a == pytest.approx(-0.5)
    assert T.kd_weights(0.1, exact) == T.kd_weights(0.1, cfg) and T.kd_weights(0.5, exact) == (0.0, 1.0)
    cfg = demo_cfg("kd.weighting=sane")
    for g in (0.0, 0.1, 0.5, 1.3, 2.0):
        a, b = T.kd_weights(g, cfg)
        assert a == 1.0 and 0.0 <= b <= 1.0
    assert T.kd_weights(0.1, cfg)[1] > T.kd_weights(0.5, cfg)[1]
    assert T.kd_weights(0.4, demo_cfg("kd.weighting=fixed")) == (1.0, 1.0)


@pytest.mark.parametrize("setting, needle", [
    ("kd.weighting=faithful", "kd.weighting' must be one of paper, sane, fixed"),
    ("train.cnn_lr=0", "train.cnn_lr' expects a value in (0, 1]"),
    ("train.rnn_lr=.nan", "train.rnn_lr' must be a finite number"),
    ("train.clip_length=0", "train.clip_length' expects a value in [1, inf)"),
    ("train.val_every=0", "train.val_every' expects a value in [1, inf)"),
    ("train.batch_size=-1", "train.batch_size"),
    ("loss.terms.kd.temperature=0", "loss.terms.kd.temperature' expects a value in (0, inf)"),
    ("data.gold_nan=keep", "data.gold_nan' must be one of refuse, drop"),
    ("audio.format=png", "audio.format' must be one of jpg, npy"),
    ("loss.mask=omega", "loss.mask' must be one of none"),
    ("demo.weightings=[paper,bogus]", "demo.weightings' must be one of paper, sane, fixed"),
])
def test_config_checks_are_one_line(setting, needle):
    with pytest.raises(PL.C.ConfigError) as e:
        demo_cfg(setting)
    assert needle in str(e.value) and "--set" in str(e.value) and "\n" not in str(e.value)


def test_unknown_loss_and_option_are_config_errors(tmp_path):
    cfg = demo_cfg()
    for terms, needle in (({"kd": {"loss": "nosuch"}}, "nosuch"), ({"kd": {"loss": "cosine", "bogus": 1}}, "bogus")):
        c = {**cfg, "loss": {**cfg["loss"], "terms": terms}, "kd": {**cfg["kd"], "teacher": str(tmp_path)}}
        with pytest.raises(PL.C.ConfigError, match=f"loss.terms.*{needle}"):
            T.objective_for(c)


def test_stateful_inference_equals_one_pass_and_models_shapes():
    cfg = demo_cfg()
    torch.manual_seed(0)
    m = cfg["model"]
    teacher = M.TeacherModel(m).eval()
    n = 23
    rec = D.Recording("x", torch.randint(0, 255, (n, 3, 32, 32), dtype=torch.uint8),
                      torch.arange(n) // 10, torch.rand(3, 1, 32, 44), torch.rand(n))
    pred = T.predict(teacher, rec, cfg, "cpu")
    with torch.no_grad():
        full = teacher(rec.frames[None].float() / 255, specs=rec.specs, spec_idx=rec.spec_index[None])
    assert pred.shape == (n,) and np.allclose(pred, full["out"][0].numpy(), atol=1e-5)
    assert full["embed"].shape == (1, n, m["embed_dim"])
    student = M.VisualModel(m)
    out = student(torch.rand(2, 5, 3, 32, 32))
    assert out["out"].shape == (2, 5) and out["embed"].shape == (2, 5, 128)
    # full-size visual path: 112 px gives the reference's 4608-d flattened VGG feature
    full_m = PL.C.merge(PL.C.load_yaml(PL.CONFIG), {}, "x")["model"]
    assert M.VisualCNN(full_m).fc.in_features == 4608


def test_local_weights_loading(tmp_path):
    cfg = demo_cfg()
    m = {**cfg["model"], "vgg_width_div": 1}
    cnn = M.VisualCNN(m)
    src = M.VisualCNN(m)
    torch.save({"net": {**{k: v for k, v in src.state_dict().items() if k.startswith("features.")},
                        "classifier.weight": torch.zeros(7, 512)}, "acc": 70.0}, tmp_path / "fer.t7")
    n, total = M.load_visual_weights(cnn, tmp_path / "fer.t7")
    assert n == total and torch.equal(cnn.features[0].weight, src.features[0].weight)
    audio, ref = M.AudioCNN(m), M.AudioCNN(m)
    torch.save(ref.net.state_dict(), tmp_path / "r18.pth")
    M.load_audio_weights(audio, tmp_path / "r18.pth")
    assert torch.equal(audio.net.conv1.weight, ref.net.conv1.weight)
    (tmp_path / "junk.t7").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="junk.t7.*torch.save checkpoint: a dict with key 'net'"):
        M.load_visual_weights(cnn, tmp_path / "junk.t7")


def test_imagenet_weights_through_torchvision_weights_api(tmp_path, monkeypatch):
    """`imagenet` goes through torchvision's weights= API, which reads the torch hub cache (no download here: the
    file is put in a temporary cache first)."""
    import torchvision
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ref = torchvision.models.resnet18(weights=None)
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(ref.state_dict(), tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1])
    audio = M.AudioCNN(demo_cfg()["model"])
    n, total = M.load_audio_weights(audio, "imagenet")
    assert n == total and torch.equal(audio.net.conv1.weight, ref.conv1.weight)


def test_cli_errors_are_one_line(capsys, tmp_path):
    from common.run import cli
    from m2pkd import mmpkd
    out = ["--out", str(tmp_path / "runs")]
    for argv, needle in ((["teacher", "--demo", "--set", "bogus=1"], "bogus"), (["teacher"], "data.root"),
                         (["baseline", "--demo", "--data", str(tmp_path / "nowhere")], "nowhere: data.root does not"),
                         (["student", "--demo", "--data", str(tmp_path), *out], "kd.teacher"),
                         (["teacher", "--data", str(tmp_path), *out], "model.visual_weights: no pretrained visual"),
                         (["baseline", "--data", str(tmp_path), "--visual-weights", "imagenet", "--set",
                           "model.vgg_width_div=8", *out], "need model.vgg_width_div 1, got 8"),
                         (["teacher", "--demo", "--data", str(tmp_path), "--resume", *out], "--resume: no run")):
        with pytest.raises(SystemExit) as e:
            cli(lambda: mmpkd.main(argv))
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error:") and needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())   # no run dir left behind


def test_baseline_and_student_draw_the_same_clips():
    cfg = demo_cfg()
    recs = [D.Recording(f"r{i}", torch.randint(0, 255, (40, 3, 32, 32), dtype=torch.uint8), torch.arange(40) // 25,
                        torch.rand(2, 3, 32, 32), torch.rand(40)) for i in range(3)]

    def clips(role, seed=0):
        gen, order = T.clip_generator({**cfg, "seed": seed}, role), []
        torch.manual_seed(123)   # whatever ran before (e.g. another model's initialisation) does not matter
        return [D.sample_clips(recs, 4, 5, gen, order)[3] for _ in range(5)]

    base, student = clips("baseline"), clips("student")
    assert all(torch.equal(a, b) for a, b in zip(base, student))
    assert not all(torch.equal(a, b) for a, b in zip(base, clips("baseline", seed=1)))
