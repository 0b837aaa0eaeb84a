"""Issue 15 for mnist: the saliency carries its teacher's identity (item 5), hyper-parameters and loss names are
validated when the config is resolved (items 4, 9), input files with NaN/inf are refused naming the first bad index
(item 4). (Item 7, the explicit data root, is in test_data.py.)"""
import shutil

import numpy as np
import pytest
import torch

from common.config import ConfigError, DataError
from mnist import main as M
from mnist.models import MLP, state_hash
from tests.mnist.helpers import run


def test_saliency_refuses_another_runs_teacher(dataset, tmp_path):
    """Two Algorithm-1 runs; the second's teacher paired with the first's saliency is refused, and a teacher without
    a saliency beside it (an interrupted run) no longer borrows the newest saliency of another run."""
    out = tmp_path / "runs"
    a, _, _ = run(dataset, out, "--cal_tag", "--first-time", "--set", "seed=1", "--set", "cal.epochs=1")
    b, _, _ = run(dataset, out, "--cal_tag", "--first-time", "--set", "seed=2", "--set", "cal.epochs=1")
    saved = np.load(a / "saliency_teacher_place1.npz")
    from mnist.models import load_model
    assert str(saved["teacher_sha256"]) == state_hash(load_model(a / "checkpoint" / "teacher_overlap.pth", "cpu")[0])
    with pytest.raises(DataError, match="computed from another teacher"):
        run(dataset, out, "--eval_tag", "--teacher", str(b / "checkpoint" / "teacher_overlap.pth"),
            "--tag", str(a / "saliency_teacher_place1.npz"))
    (b / "saliency_teacher_place1.npz").unlink()  # b as if killed before its saliency was written
    with pytest.raises(DataError, match="no saliency vector was computed from the teacher"):
        run(dataset, out, "--eval_tag", "--teacher", str(b / "checkpoint" / "teacher_overlap.pth"))


def test_state_hash_is_the_weights_identity():
    torch.manual_seed(0)
    m = MLP(12, [6, 4])
    twin = MLP(12, [6, 4])
    twin.load_state_dict(m.state_dict())
    assert state_hash(m) == state_hash(twin)
    with torch.no_grad():
        twin.fc2.bias[1] += 1e-6
    assert state_hash(m) != state_hash(twin)


@pytest.mark.parametrize("setting, message", [
    ("train.lr=.nan", "train.lr' must be a finite number"),
    ("train.lr=.inf", "train.lr' must be a finite number"),
    ("train.lr=-0.1", "train.lr' expects a value in (0, 10]"),
    ("train.lr=1e6", "train.lr' expects a value in (0, 10]"),
    ("cal.lr=0", "cal.lr' expects a value in (0, 10]"),
    ("train.epochs=-1", "train.epochs' expects a value in [1, inf)"),
    ("train.batch_size=0", "train.batch_size' expects a value in [1, inf)"),
    ("distill.methods.kl.kl.temperature=0", "temperature' expects a value in (0, inf)"),
    ("distill.methods.similarity.kl.temperature=0", "temperature' expects a value in (0, inf)"),
    ("distill.mask=omgea", "distill.mask' must be one of none, omega"),
    ("distill.methods.kl.kl.tempreature=2", "unexpected keyword argument 'tempreature'"),
    ("distill.methods.kl={kll: {weight: 1}}", "kll"),
    ("data.source=web", "data.source' must be one of"),
    ("eval.modes=[3]", "eval.modes' must be one of -1, 0, 1, 2"),
    ("teacher=both", "teacher' must be one of joint, independent"),
])
def test_bad_settings_are_refused_at_config_time(setting, message):
    """Each is a ConfigError from resolve_config, before any data is read or a run directory created."""
    with pytest.raises(ConfigError) as e:
        M.resolve_config(M.parse_args(["--eval_tag", "--distill", "kl", "--set", setting]))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_nonfinite_input_files_name_the_first_bad_index(dataset, tmp_path):
    out = tmp_path / "runs"
    a, _, _ = run(dataset, out, "--cal_tag", "--first-time", "--set", "cal.epochs=1")
    tag_file = a / "saliency_teacher_place1.npz"
    arrays = dict(np.load(tag_file))
    arrays["saliency"][[5, 9]] = [np.nan, np.inf]
    np.savez(tag_file, **arrays)
    with pytest.raises(DataError, match=r"saliency_teacher_place1.npz: the saliency vector holds a non-finite value "
                                        r"\(NaN/inf\), first at index 5"):
        run(dataset, out, "--eval_tag", "--teacher", str(a / "checkpoint" / "teacher_overlap.pth"))
    ckpt_path = tmp_path / "bad_teacher.pth"
    shutil.copy(a / "checkpoint" / "teacher_overlap.pth", ckpt_path)
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["state_dict"]["fc2.weight"][3, 4] = float("nan")
    torch.save(ckpt, ckpt_path)
    with pytest.raises(DataError, match=r"bad_teacher.pth: state_dict\['fc2.weight'\] holds a non-finite value "
                                        r"\(NaN/inf\), first at index \(3, 4\)"):
        run(dataset, out, "--eval_tag", "--teacher", str(ckpt_path), "--tag", str(tag_file))
