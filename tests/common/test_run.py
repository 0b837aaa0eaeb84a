import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from common.config import ConfigError, DataError, load_yaml
from common.run import (RunDir, atomic_save, atomic_write_json, cli, load_checkpoint, load_training_state,
                        save_training_state, seed_everything)

REPO = Path(__file__).resolve().parents[2]


def _code_tree(root: Path) -> Path:
    for rel in ["main.py", "configs/default.yaml", "configs/other.yml", "scripts/go.sh", "README.md",
                "runs/old/main.py", "__pycache__/x.py", ".venv/lib/site.py", "experiments/big.py", "pkg/mod.py"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("# " + rel)
    return root


def test_rundir_create_layout(tmp_path):
    code = _code_tree(tmp_path / "src")
    run = RunDir.create(tmp_path / "out", "exp", config={"a": 1, "b": {"c": [1, 2]}}, code_from=code,
                        timestamp="20240101-000000")
    try:
        assert run.path == tmp_path / "out" / "exp_20240101-000000"
        for d in (run.checkpoint_dir, run.code_dir, run.log_dir):
            assert d.is_dir() and d.parent == run.path
        copied = sorted(str(p.relative_to(run.code_dir)) for p in run.code_dir.rglob("*") if p.is_file())
        assert copied == ["configs/default.yaml", "configs/other.yml", "main.py", "pkg/mod.py", "scripts/go.sh"]
        assert load_yaml(run.log_dir / "config.yaml") == {"a": 1, "b": {"c": [1, 2]}}

        run.log("hello from the run")
        run.scalar("loss/train", torch.tensor(0.5), 1)
        run.writer.flush()
        assert any(p.name.startswith("events.out.tfevents") for p in run.path.iterdir())
        assert run.file("x.txt") == run.path / "x.txt"
    finally:
        run.close()
    line = (run.log_dir / "console.log").read_text().strip()
    assert line.endswith("hello from the run") and line.startswith("[20")  # timestamped


def test_rundir_never_overwrites(tmp_path):
    runs = [RunDir.create(tmp_path, "exp", timestamp="20240101-000000") for _ in range(3)]
    for r in runs:
        r.close()
    assert [r.path.name for r in runs] == ["exp_20240101-000000", "exp_20240101-000000_1", "exp_20240101-000000_2"]
    assert all(r.path.is_dir() for r in runs)


def test_rundir_code_copy_skips_itself(tmp_path):
    (tmp_path / "main.py").write_text("x = 1")
    run = RunDir.create(tmp_path / "results", "exp", code_from=tmp_path, timestamp="t")
    run.close()
    run2 = RunDir.create(tmp_path / "results", "exp", code_from=tmp_path, timestamp="t")
    run2.close()
    assert sorted(p.name for p in run2.code_dir.rglob("*")) == ["main.py"]


def test_rundir_outputs_and_reopen(tmp_path):
    run = RunDir.create(tmp_path, "exp", timestamp="t")
    run.log("first")
    run.write_summary({"acc": np.float32(0.5), "n": torch.tensor(3), "hist": np.arange(3), "name": "x"})
    run.write_csv("per_class.csv", [{"cls": "a", "iou": 0.5}, {"cls": "b", "iou": torch.tensor(0.25), "extra": 1}])
    run.write_csv("fixed.csv", [{"a": 1, "b": 2}], columns=["b"])
    ckpt = run.save_checkpoint({"w": torch.ones(2)})
    run.close()

    assert json.loads((run.path / "summary.json").read_text()) == {"acc": 0.5, "n": 3, "hist": [0, 1, 2], "name": "x"}
    with open(run.path / "per_class.csv") as f:
        assert list(csv.DictReader(f)) == [{"cls": "a", "iou": "0.5", "extra": ""},
                                           {"cls": "b", "iou": "0.25", "extra": "1"}]
    assert (run.path / "fixed.csv").read_text() == "b\n2\n"
    assert ckpt == run.checkpoint_dir / "checkpoint.pth" and torch.equal(load_checkpoint(ckpt)["w"], torch.ones(2))

    again = RunDir.open(run.path)
    again.log("second")
    again.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp_t"]  # reopened, no new folder
    log = (run.log_dir / "console.log").read_text()
    assert "first" in log and "second" in log
    with pytest.raises(DataError, match="run directory not found"):
        RunDir.open(tmp_path / "missing")


def test_rundir_discard_removes_an_empty_run_but_never_results(tmp_path):
    run = RunDir.create(tmp_path, "exp", config={"a": 1}, timestamp="t")
    run.log("about to fail on bad input")
    run.discard()
    assert not run.path.exists()
    kept = RunDir.create(tmp_path, "exp", timestamp="t2")
    kept.write_summary({"acc": 1.0})
    with pytest.raises(RuntimeError, match="holds results"):
        kept.discard()
    assert (kept.path / "summary.json").exists()


def test_rundir_disabled_creates_nothing(tmp_path):
    run = RunDir.create(tmp_path / "out", "exp", config={"a": 1}, code_from=tmp_path, timestamp="t", enabled=False)
    run.log("x")
    run.scalar("a", 1.0, 0)
    run.writer.add_image("img", torch.zeros(3, 2, 2), 0)
    run.save_checkpoint({"a": 1})
    run.write_summary({"a": 1})
    run.write_csv("a.csv", [{"a": 1}])
    run.close()
    assert run.path == tmp_path / "out" / "exp_t"
    assert not (tmp_path / "out").exists()


def test_atomic_save_round_trip_no_temp_files(tmp_path):
    obj = {"w": torch.randn(3, 3), "step": 7}
    atomic_save(obj, tmp_path / "a.pth")
    atomic_save({"w": obj["w"] * 2, "step": 8}, tmp_path / "a.pth")  # replace in place
    assert [p.name for p in tmp_path.iterdir()] == ["a.pth"]
    back = load_checkpoint(tmp_path / "a.pth")
    assert back["step"] == 8 and torch.equal(back["w"], obj["w"] * 2)


def test_atomic_save_failure_keeps_old_file(tmp_path):
    atomic_save({"v": 1}, tmp_path / "a.pth")
    with pytest.raises(Exception):
        atomic_save({"v": lambda: 0}, tmp_path / "a.pth")  # lambdas cannot be pickled
    assert [p.name for p in tmp_path.iterdir()] == ["a.pth"]
    assert load_checkpoint(tmp_path / "a.pth") == {"v": 1}


def test_atomic_write_json(tmp_path):
    atomic_write_json(tmp_path / "s.json", {"x": np.int64(3), "y": [torch.tensor(1.5)]})
    assert json.loads((tmp_path / "s.json").read_text()) == {"x": 3, "y": [1.5]}
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "t.json", {"x": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(DataError) as e:
        load_checkpoint(tmp_path / "none.pth")
    assert str(e.value) == f"{tmp_path / 'none.pth'}: checkpoint not found"
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint at all")
    with pytest.raises(DataError, match=f"^{bad}: not a readable checkpoint \\(.+\\)$") as e:
        load_checkpoint(bad)
    assert "\n" not in str(e.value)


def test_load_checkpoint_arbitrary_objects(tmp_path):
    # Our own files may hold non-tensor objects (e.g. numpy RNG state); they still load.
    state = {"rng": np.random.get_state(), "py": random.getstate()}
    atomic_save(state, tmp_path / "rng.pth")
    back = load_checkpoint(tmp_path / "rng.pth")
    assert back["py"] == state["py"] and np.array_equal(back["rng"][1], state["rng"][1])


def _make(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    return model, opt, sched


def _step(model, opt, sched, i):
    g = torch.Generator().manual_seed(100 + i)
    x, y = torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    sched.step()


def test_training_state_resume_matches_uninterrupted(tmp_path):
    model, opt, sched = _make(0)
    for i in range(3):
        _step(model, opt, sched, i)

    model2, opt2, sched2 = _make(0)
    for i in range(2):
        _step(model2, opt2, sched2, i)
    save_training_state(tmp_path / "state.pth", model=nn.DataParallel(model2), optimizer=opt2, scheduler=sched2,
                        epoch=1, best=0.75)

    model3, opt3, sched3 = _make(123)  # different init: everything must come from the checkpoint
    state = load_training_state(tmp_path / "state.pth", model=model3, optimizer=opt3, scheduler=sched3)
    assert state["epoch"] == 1 and state["best"] == 0.75
    assert not any(k.startswith("module.") for k in state["model"])  # saved unwrapped
    _step(model3, opt3, sched3, 2)
    for a, b in zip(model.parameters(), model3.parameters()):
        assert torch.equal(a, b)
    assert sched3.get_last_lr() == sched.get_last_lr()


def test_training_state_errors(tmp_path):
    model, opt, _ = _make(0)
    save_training_state(tmp_path / "s.pth", model=model, epoch=0)
    with pytest.raises(DataError, match="no optimizer state"):
        load_training_state(tmp_path / "s.pth", model=model, optimizer=opt)
    with pytest.raises(DataError, match="checkpoint does not match the model"):
        load_training_state(tmp_path / "s.pth", model=nn.Linear(3, 3))
    atomic_save({"w": torch.ones(1)}, tmp_path / "plain.pth")
    with pytest.raises(DataError, match="not a training-state checkpoint"):
        load_training_state(tmp_path / "plain.pth", model=model)


def test_seed_everything_repeatable():
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()
    seed_everything(3)
    a = draw()
    seed_everything(3, deterministic=True)
    b = draw()
    torch.use_deterministic_algorithms(False)
    assert a == b


def test_cli_user_error_exit_code(capsys):
    def main():
        raise ConfigError("cfg.yaml: unknown key 'x'; valid top-level keys: a, b")
    with pytest.raises(SystemExit) as e:
        cli(main)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: cfg.yaml: unknown key 'x'; valid top-level keys: a, b\n"

    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        cli(interrupted)
    assert e.value.code == 130
    assert cli(lambda: 5) == 5


def test_cli_subprocess_exit_code(tmp_path):
    script = tmp_path / "entry.py"
    script.write_text(f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
                      "from common.config import load_yaml\nfrom common.run import cli\n"
                      "cli(lambda: load_yaml('missing.yaml'))\n")
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert p.returncode == 2
    assert p.stderr == "error: missing.yaml: file not found\n"


def test_derived_seed_is_stable_and_separates_names():
    from common.run import derived_seed
    assert derived_seed(0, "rkd", "none") == derived_seed(0, "rkd", "none")
    assert len({derived_seed(s, m, k) for s in (0, 1) for m in ("kl", "rkd") for k in ("none", "omega")}) == 8
    assert 0 <= derived_seed(2**40, "x") < 2**63
    # crc32-based, not hash(): the same value in every process (PYTHONHASHSEED does not matter)
    assert derived_seed(0, "kl", "none") == __import__("zlib").crc32(b"kl/none")
