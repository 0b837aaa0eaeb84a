"""Config and start-up checks of semantic_kitti/main.py: declared _checks, ImageNet weights, one-line errors."""
import urllib.error

import pytest
import torch
import torchvision

from common.config import ConfigError, DataError
from common.run import cli
from semantic_kitti import engine as E
from semantic_kitti import main as sk_main
from semantic_kitti import models


def _cfg(*sets, demo=False):
    return sk_main.resolve_config(sk_main.parse_args((["--demo"] if demo else []) + [f"--set={s}" for s in sets]))


@pytest.mark.parametrize("setting, needle", [
    ("batch_size=[0, 4]", "'batch_size' expects a value in [1, inf)"),
    ("n_threads=-1", "'n_threads' expects a value in [0, inf)"),
    ("val_frequency=0", "'val_frequency' expects a value in [1, inf)"),
    ("checkpoint_every=0", "'checkpoint_every' expects a value in [1, inf)"),
    ("student.lr=.nan", "'student.lr' must be a finite number"),
    ("teacher.lr=-0.1", "'teacher.lr' expects a value in (0, 10]"),
    ("kd.params.dkd.temperature=0", "'kd.params.dkd.temperature' expects a value in (0, inf)"),
    ("teacher.net=ResNet", "'teacher.net' must be one of CameraNet, PMFNet"),
])
def test_bad_settings_are_one_line_errors(setting, needle, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli(lambda: sk_main.main(["--demo", f"--set={setting}", f"--set=save_path={tmp_path}"]))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and needle in err, err
    assert not any(tmp_path.iterdir())


def test_random_init_must_be_asked_for_outside_the_demo(tmp_path):
    cfg = _cfg("teacher.imagenet_weights=none", "gpu=cpu", f"save_path={tmp_path}")
    with pytest.raises(ConfigError, match="--allow-random-init"):
        sk_main.run(cfg)
    sk_main.check_weights(_cfg("teacher.imagenet_weights=none", "allow_random_init=true"))
    sk_main.check_weights(_cfg(demo=True))  # the demo says so in configs/demo.yaml and runs offline
    assert E.rgb_normalisation(_cfg(demo=True)) is None
    assert E.rgb_normalisation(_cfg()) == (models.IMAGENET_MEAN, models.IMAGENET_STD)  # default: torchvision


def test_imagenet_weights_from_a_local_file(tmp_path):
    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "resnet18.pth")
    net = models.CameraNet(3, 20, "resnet18", str(tmp_path / "resnet18.pth"), log=lambda *_: None)
    enc = net.camera_stream_encoder
    torch.testing.assert_close(enc.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    torch.testing.assert_close(enc.conv1.weight, ref.conv1.weight)  # copied into the stride-1 stem
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(DataError, match="other.pth: not a torchvision resnet18 state_dict"):
        models.CameraNet(3, 20, "resnet18", str(tmp_path / "other.pth"), log=lambda *_: None)


def test_imagenet_weights_offline_say_how(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)  # what weights= calls
    with pytest.raises(DataError, match=r"could not fetch the resnet18 ImageNet weights \(Name or service not known\); "
                                        r"offline, download https://download.pytorch.org/models/resnet18-f37072fd.pth"):
        models.CameraNet(3, 20, "resnet18", "torchvision", log=lambda *_: None)



def test_what_the_declared_checks_cannot_say():
    from semantic_kitti.option import Option
    cfg = _cfg()
    Option(cfg)
    for key, value, needle in [("data", {**cfg["data"], "train_crop": [250, 1024]}, "divisible by 16"),
                               ("data", {**cfg["data"], "pad": [200, 3]}, "2·pad < the crop sizes"),
                               ("batch_size", [4], r"\[train, val\]"), ("gpu", "0,0", "distinct"),
                               ("val_sequences", [], "non-empty")]:
        with pytest.raises(ConfigError, match=needle):
            Option({**cfg, key: value})
