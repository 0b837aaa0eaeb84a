"""The shared training mechanics of common/train.py (and the run-directory lock / generator guard of common/run.py)."""
import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from common import train as T
from common.config import ConfigError, DataError, save_yaml
from common.run import RunDir, generator_dir

ROOT = Path(__file__).resolve().parents[2]


def test_freeze_keeps_teacher_in_eval_without_grad():
    teacher = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    holder = nn.ModuleDict({"teacher": T.freeze(teacher), "student": nn.Linear(3, 2)})
    holder.train()
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert holder["student"].training
    assert all(not p.requires_grad for p in teacher.parameters())
    x = torch.randn(5, 3)
    assert torch.equal(teacher(x), teacher(x))  # dropout off, BN statistics frozen


def _order(gen, n=20):
    return [int(i) for b in DataLoader(TensorDataset(torch.arange(n)), batch_size=4, shuffle=True, generator=gen)
            for i in b[0]]


def test_loader_generator_same_order_per_role_whatever_ran_before():
    baseline = _order(T.loader_generator(3, "student"))
    torch.rand(100)  # global RNG use in between must not matter
    _order(T.loader_generator(3, "teacher"))
    kd = _order(T.loader_generator(3, "student"))
    assert baseline == kd
    assert baseline != _order(T.loader_generator(4, "student"))
    assert baseline != _order(T.loader_generator(3, "teacher"))


class _EpochDataset(Dataset):
    def __init__(self, epoch: T.SharedEpoch):
        self.epoch = epoch

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return float(T.epoch_rng(0, self.epoch.get(), i).random())


def test_shared_epoch_reaches_persistent_workers():
    epoch = T.SharedEpoch()
    loader = DataLoader(_EpochDataset(epoch), batch_size=4, num_workers=1, persistent_workers=True)
    seen = []
    for e in (1, 2, 1):
        epoch.set(e)
        seen.append(next(iter(loader)).tolist())
    assert seen[0] != seen[1] and seen[0] == seen[2]


def test_epoch_rng_differs_by_epoch_and_index():
    a = T.epoch_rng(1, 0, 5).random(3)
    assert np.array_equal(a, T.epoch_rng(1, 0, 5).random(3))
    assert not np.array_equal(a, T.epoch_rng(1, 1, 5).random(3))
    assert not np.array_equal(a, T.epoch_rng(1, 0, 6).random(3))


def test_holdout_split_seeded_disjoint_stratified():
    tr, va = T.holdout_split(100, 0.2, seed=0)
    assert len(va) == 20 and len(tr) == 80 and not set(tr) & set(va) and set(tr) | set(va) == set(range(100))
    assert np.array_equal(va, T.holdout_split(100, 0.2, seed=0)[1])
    assert not np.array_equal(va, T.holdout_split(100, 0.2, seed=1)[1])
    labels = [0] * 50 + [1] * 10
    tr, va = T.holdout_split(60, 0.1, seed=0, labels=labels)
    assert sum(labels[i] for i in va) == 1 and len(va) == 6
    with pytest.raises(ConfigError):
        T.holdout_split(10, 0.0, seed=0)
    with pytest.raises(DataError):
        T.holdout_split(1, 0.5, seed=0)


def test_check_finite_names_epoch_step_and_term():
    T.check_finite(torch.tensor(1.0), {"ce": torch.tensor(1.0)}, epoch=1, step=1)
    with pytest.raises(T.NonFiniteLoss, match=r"epoch 3, step 7: term 'kl' = nan"):
        T.check_finite(torch.tensor(float("nan")), {"ce": torch.tensor(1.0), "kl": torch.tensor(float("nan"))},
                       epoch=3, step=7)
    with pytest.raises(T.NonFiniteLoss, match="term 'total' = inf"):
        T.check_finite(float("inf"), {}, epoch=1, step=2)


def _fit(model, opt, gen, steps, start=0):
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(0))
    y = x.sum(1, keepdim=True)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=gen)
    done = start
    while done < steps:
        for xb, yb in loader:
            opt.zero_grad()
            (nn.functional.mse_loss(model(xb), yb) + 0 * torch.rand(())).backward()
            opt.step()
        done += 1
    return model


def test_checkpoint_resume_continues_exactly(tmp_path):
    def make():
        torch.manual_seed(0)
        m = nn.Linear(3, 1)
        return m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), T.loader_generator(0, "student")

    m_full, o_full, g_full = make()
    _fit(m_full, o_full, g_full, steps=4)

    m, o, g = make()
    sel = T.Selector("min")
    _fit(m, o, g, steps=2)
    sel.update(0.5, 2, m)
    ck = T.Checkpoint(tmp_path / "state.pth", model=m, optimizer=o, generator=g, selector=sel)
    ck.save(epoch=2, step=8, note="x")
    torch.rand(50)  # the interrupted process moves on...

    m2, o2, g2 = make()
    sel2 = T.Selector("min")
    torch.manual_seed(123)
    st = T.Checkpoint(tmp_path / "state.pth", model=m2, optimizer=o2, generator=g2, selector=sel2).load()
    assert st == {"epoch": 2, "step": 8, "note": "x"} and sel2.best_epoch == 2 and sel2.best_score == 0.5
    _fit(m2, o2, g2, steps=4, start=2)
    for a, b in zip(m_full.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_checkpoint_refuses_mismatch(tmp_path):
    T.Checkpoint(tmp_path / "s.pth", model=nn.Linear(3, 1)).save(epoch=1)
    with pytest.raises(DataError, match="saved model does not match"):
        T.Checkpoint(tmp_path / "s.pth", model=nn.Linear(4, 1)).load()
    with pytest.raises(DataError, match="lacks the state of optimizer"):
        m = nn.Linear(3, 1)
        T.Checkpoint(tmp_path / "s.pth", model=m, optimizer=torch.optim.SGD(m.parameters(), lr=1)).load()
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="junk.pth"):
        T.Checkpoint(tmp_path / "junk.pth", model=m).load()


def test_due():
    assert [i for i in range(1, 10) if T.due(i, 3)] == [3, 6, 9] and not T.due(3, 0)


def test_selector_keeps_best_and_skips_nan(tmp_path):
    m = nn.Linear(2, 1)
    sel = T.Selector("max", path=tmp_path / "best.pth")
    nn.init.constant_(m.weight, 1.0)
    assert sel.update(0.5, 1, m)
    nn.init.constant_(m.weight, 2.0)
    assert not sel.update(0.4, 2, m) and not sel.update(float("nan"), 3, m)
    sel.restore(m)
    assert torch.all(m.weight == 1.0) and sel.best_epoch == 1
    assert torch.load(tmp_path / "best.pth")["epoch"] == 1


def test_epoch_log_terms_omega_csv(tmp_path):
    rd = RunDir.create(tmp_path, "t")
    log = T.EpochLog(rd, "student")
    log.add({"ce": torch.tensor(1.0), "kl": 3.0})
    log.add({"ce": torch.tensor(3.0), "kl": 1.0})
    log.add_omega(torch.tensor([[1.0, 0.0], [0.5, 1.0]]))
    rec = log.end_epoch(1, val_acc=0.5)
    assert rec == {"epoch": 1, "train_ce": 2.0, "train_kl": 2.0, "omega_mean": 0.625, "omega_masked_share": 0.5,
                   "val_acc": 0.5}
    log.add({"ce": torch.tensor(1.0)})
    rec2 = log.end_epoch(2)
    assert "omega_mean" not in rec2
    rows = list(csv.DictReader(open(rd.path / "student_log.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"] and float(rows[0]["omega_masked_share"]) == 0.5
    assert log.omega_summary()["omega_mean"] == 0.625
    restored = T.EpochLog(rd, "student")
    restored.load_state_dict(log.state_dict())
    assert restored.history == log.history
    rd.close()


def test_resume_dir_and_config_check(tmp_path):
    assert T.resume_dir(None, tmp_path, "x") is None
    with pytest.raises(ConfigError, match="no run of 'x'"):
        T.resume_dir("latest", tmp_path, "x")
    for name in ("x_20260101-000000", "x_20260102-000000"):
        save_yaml({"a": 1}, tmp_path / name / "log" / "config.yaml")
        os.utime(tmp_path / name, (0, 1 if name.endswith("1-000000") else 2))
    assert T.resume_dir("latest", tmp_path, "x").name == "x_20260102-000000"
    (tmp_path / "x_20260101-000000" / "checkpoint").mkdir()
    ck = tmp_path / "x_20260101-000000" / "checkpoint" / "s.pth"
    ck.write_bytes(b"")
    assert T.resume_dir(str(ck), tmp_path, "x") == tmp_path / "x_20260101-000000"
    with pytest.raises(ConfigError, match="not a run directory"):
        T.resume_dir(str(tmp_path), tmp_path, "x")
    saved = {"model": {"name": "ddrnet"}, "train": {"epochs": 3}}
    T.check_resume_config(saved, {"model": {"name": "ddrnet"}, "train": {"epochs": 9}}, ["model", "data"])
    with pytest.raises(ConfigError, match=r"model.name \('ddrnet' -> 'palnet'\)"):
        T.check_resume_config(saved, {"model": {"name": "palnet"}, "train": {"epochs": 3}}, ["model", "data"])


def test_run_dir_lock_refuses_second_process(tmp_path):
    rd = RunDir.create(tmp_path, "r").lock()
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(ROOT)!r})
        from common.run import RunDir, cli
        cli(lambda: RunDir.open({str(rd.path)!r}).lock())
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "in use by another process" in p.stderr and p.stderr.count("\n") == 1
    rd.close()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_generator_dir_never_writes_into_foreign_data(tmp_path):
    new = generator_dir(tmp_path / "demo")
    (new / "a.bin").write_bytes(b"x")
    assert generator_dir(tmp_path / "demo") == new  # its own, marked earlier
    real = tmp_path / "real"
    real.mkdir()
    (real / "00.bin").write_bytes(b"real data")
    with pytest.raises(DataError, match="holds files this generator did not create"):
        generator_dir(real)
    assert (real / "00.bin").read_bytes() == b"real data"
    (tmp_path / "empty").mkdir()
    generator_dir(tmp_path / "empty")


def test_run_dir_unwritable_out_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot create the run directory"):
        RunDir.create(blocker / "sub", "r")




def test_seed_everything_takes_derived_seeds():
    from common.run import derived_seed, seed_everything
    seed_everything(derived_seed(0, "nyu_ssc", "student", 2))
    a = np.random.rand()
    seed_everything(derived_seed(0, "nyu_ssc", "student", 2))
    assert np.random.rand() == a


def test_cli_prints_a_workers_one_line(tmp_path):
    """A DataError raised inside a DataLoader worker is printed as the worker's own line, not torch's traceback."""
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(ROOT)!r})
        import torch
        from torch.utils.data import DataLoader, Dataset
        from common.config import DataError
        from common.run import cli
        class Bad(Dataset):
            def __len__(self): return 4
            def __getitem__(self, i): raise DataError(f"scan_{{i:03d}}.bin: expected float32 x4 records")
        if __name__ == "__main__":
            cli(lambda: list(DataLoader(Bad(), batch_size=2, num_workers=2)))
    """)
    script = tmp_path / "w.py"
    script.write_text(code)
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error: scan_00") and p.stderr.count("\n") == 1, p.stderr
    assert "Traceback" not in p.stderr and "Caught" not in p.stderr
