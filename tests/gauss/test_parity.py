"""The parity switches of the synthetic sweeps (`parity: true`): each restores one number-changing behaviour of the
reference code (NTDH gauss/main.py and sklearn/main.py, `train_kd`)."""
import copy
import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from common.kd import build_loss
from common.synthetic import sweep
from gauss import experiment
from tests.gauss.test_gauss import small_cfg


def test_fitnet_untrained_regressor_is_a_fresh_batchnorm_relu_every_step():
    """trainable: false → no trainable parameter, and the loss is MSE(ReLU(BatchNorm1d fresh, train mode)(z_s), z_t)
    at every step, as the reference rebuilding its ConvReg each step computes it."""
    g = torch.Generator().manual_seed(0)
    loss = build_loss("fitnet", student_dim=2, teacher_dim=2, regressor="bn_relu", trainable=False)
    assert not any(p.requires_grad for p in loss.parameters())
    for _ in range(3):
        z_s, z_t = torch.randn(50, 2, generator=g), torch.randn(50, 2, generator=g)
        fresh = torch.nn.Sequential(torch.nn.BatchNorm1d(2), torch.nn.ReLU()).train()
        assert torch.allclose(loss(z_s, z_t), F.mse_loss(fresh(z_s), z_t), atol=1e-6)
    trained = build_loss("fitnet", student_dim=2, teacher_dim=2, regressor="bn_relu")
    assert all(p.requires_grad for p in trained.parameters())
    try:
        build_loss("fitnet", student_dim=2, teacher_dim=2, regressor="linear", trainable=False)
    except ValueError as e:
        assert "bn_relu" in str(e)
    else:
        raise AssertionError("trainable: false with a linear regressor must be refused")


def test_parity_objective_leaves_fitnet_regressor_and_crd_embeddings_untrained():
    cfg = small_cfg(runs=2, parity=True, **{"train.epochs": 5, "data.overlaps": [0], "kd.losses": ["fitnet", "crd"]})
    before = copy.deepcopy(cfg["kd"])
    y = torch.randint(0, 2, (2, 200), generator=torch.Generator().manual_seed(1))
    for method in ("fitnet", "crd"):
        obj = sweep.objective_for(cfg, method, "none", y, 2)
        assert not any(p.requires_grad for p in obj.parameters()), method
        off = sweep.objective_for({**cfg, "parity": False}, method, "none", y, 2)
        assert any(p.requires_grad for p in off.parameters()), method
    assert cfg["kd"] == before   # the config itself is not changed


def test_parity_sweep_keeps_crd_embeddings_at_their_initial_weights():
    """A whole parity sweep of crd and fitnet runs (the terms' frozen parts get no update) and differs from the
    default, whose regressor / embeddings are trained."""
    base = {"train.epochs": 30, "data.overlaps": [0], "kd.losses": ["fitnet"], "runs": 2}
    on = experiment.run_sweep(small_cfg(parity=True, **base), torch.device("cpu"), log=lambda *_: None)
    off = experiment.run_sweep(small_cfg(**base), torch.device("cpu"), log=lambda *_: None)
    a, b = on["per_run"]["fitnet/none"]["target_mass_js"], off["per_run"]["fitnet/none"]["target_mass_js"]
    assert a.shape == b.shape and (a != b).any()


def test_reference_torch_construction_order():
    """Parity: teacher, student, CRD (embeddings and memory banks) and baseline drawn from one stream in the
    reference's order — built here with torch's own modules under the global seed, as NTDH gauss/main.py does."""
    from gauss import trainer

    torch.manual_seed(7)
    teacher, student = torch.nn.Linear(25, 2), torch.nn.Linear(25, 2)
    embed_s, embed_t = torch.nn.Linear(2, 8), torch.nn.Linear(2, 8)
    stdv = 1.0 / math.sqrt(8 / 3)   # ContrastMemory's two banks, U[-stdv, stdv]
    memory_v1 = torch.rand(200, 8).mul_(2 * stdv).add_(-stdv)
    memory_v2 = torch.rand(200, 8).mul_(2 * stdv).add_(-stdv)
    baseline = torch.nn.Linear(25, 2)
    got = trainer.reference_stream(7, 25, 25, 2)
    for role, ref in ((trainer.TEACHER, teacher), (trainer.STUDENT, student), (trainer.BASELINE, baseline)):
        assert torch.equal(got[role][0], ref.weight.detach()) and torch.equal(got[role][1], ref.bias.detach())
    crd = got["crd"]
    for name, ref in (("embed_s", embed_s), ("embed_t", embed_t)):
        assert torch.equal(crd[name][0], ref.weight.detach()) and torch.equal(crd[name][1], ref.bias.detach())
    assert torch.equal(crd["memory_s"], memory_v1) and torch.equal(crd["memory_t"], memory_v2)
    cfg = small_cfg(runs=2, parity=True, **{"train.epochs": 1, "data.overlaps": [0, 10]})
    sw = experiment.build_sweep(cfg)
    model = trainer.BatchedLinear(25, 2, runs=sw.groups)
    trainer.reference_init(model, cfg, sw, trainer.BASELINE, 25)
    run1 = trainer.reference_stream(cfg["seed"] + 1 + 1, 25, 25, 2)[trainer.BASELINE]
    for g in (1, 3):   # run 1 at both γ
        assert torch.equal(model.weight[g], run1[0]) and torch.equal(model.bias[g, :, 0], run1[1])
    # CRD's embeddings and memory banks: the run's own reference draws, not draws of their own
    y = torch.randint(0, 2, (sw.groups, 200), generator=torch.Generator().manual_seed(1))
    obj = sweep.objective_for(cfg, "crd", "none", y, 2)
    trainer.reference_crd_init(obj, cfg, sw)
    term, crd1 = obj.terms["crd"], trainer.reference_stream(cfg["seed"] + 1 + 1, 25, 25, 2)["crd"]
    for g in (1, 3):
        assert torch.equal(term.embed_s.weight[g], crd1["embed_s"][0]) and torch.equal(term.embed_t.bias[g, :, 0],
                                                                                      crd1["embed_t"][1])
        assert torch.equal(term.memory_s[g], crd1["memory_s"]) and torch.equal(term.memory_t[g], crd1["memory_t"])


def test_parity_gives_the_relational_terms_every_training_sample():
    """gauss under parity: pkt and sp on the full batch and rkd over every pair and triplet, as the reference's PKT /
    Similarity / RKD (their sampled surrogates are biased against it); crd keeps its sampler; without parity the
    configured surrogates."""
    from gauss import trainer

    cfg = small_cfg(runs=2, parity=True, **{"data.overlaps": [0]})
    y = torch.randint(0, 2, (2, 200), generator=torch.Generator().manual_seed(1))
    for method, term in (("pkt", "pkt"), ("sp", "sp")):
        on = sweep.objective_for(cfg, method, "none", y, 2, trainer.PARITY_EXACT)
        off = sweep.objective_for({**cfg, "parity": False}, method, "none", y, 2, trainer.PARITY_EXACT)
        assert on.terms[term].sample_rows is None and off.terms[term].sample_rows == 32, method
    on = sweep.objective_for(cfg, "rkd", "none", y, 2, trainer.PARITY_EXACT).terms["rkd"]
    off = sweep.objective_for({**cfg, "parity": False}, "rkd", "none", y, 2, trainer.PARITY_EXACT).terms["rkd"]
    assert (on.pairs, on.triplets) == (None, None) and (off.pairs, off.triplets) == (256, 256)
    crd = sweep.objective_for(cfg, "crd", "none", y, 2, trainer.PARITY_EXACT).terms["crd"]
    assert crd.sample_rows == 32


def test_parity_rkd_trains_with_the_exact_loss(monkeypatch):
    """gauss --parity's rkd: the blocked exact RKD (common.synthetic.fused_relational) trains the same students as
    the (G, N, N, N) autograd reference of common.kd.relational, and differently from the 256-pair surrogate."""
    from common.kd.relational import RKDistill
    from common.synthetic.fused_relational import FusedRKD

    cfg = small_cfg(runs=2, parity=True, **{"train.epochs": 3, "data.overlaps": [0], "kd.losses": ["rkd"]})

    def students(c):
        results = experiment.run_sweep(c, torch.device("cpu"), log=lambda *_: None)
        return pd.DataFrame(experiment.run_rows(results, c["seed"]))["kd_acc"].to_numpy()

    blocked = students(cfg)
    monkeypatch.setattr(FusedRKD, "_exact_angle", RKDistill._exact_angle)
    np.testing.assert_allclose(students(cfg), blocked, atol=1.5e-3)   # at most one test sample apart
    monkeypatch.undo()
    sampled = students({**cfg, "parity": False})
    assert not np.allclose(sampled, blocked)
