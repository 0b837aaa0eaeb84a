"""The computations whose numbers the golden fixtures freeze (tests/golden/golden.npz, written by make_golden.py).

Every case returns {name: numpy array}. The KD-term cases take a `build(name, **kwargs)` so that the same inputs can
be given to the plain autograd reference (`common.kd.build_loss`) and to the synthetic engine's fused terms; both must
reproduce the frozen values. Inputs are float64 and seeded, so the reference and a fused closed-form gradient agree to
far better than the 1e-6 the test asks for.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

DT = torch.float64
RUNS = 3


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- KD terms ------------------------------------------------------------------------------------------------------
# (name, kwargs, input kind): kind "logits" feeds (B, C) logits, "features" (B, D) features; the relational terms
# see more samples so that sampling (sample_rows, pairs / triplets, CRD draws) and the large-bank path are exercised.
TERMS = [
    ("ce", {}, "logits"),
    ("kl", {"temperature": 0.7}, "logits"),
    ("kl", {"temperature": 2.0, "reduction": "mean", "t2": True, "omega_mode": "weight"}, "logits"),
    ("dkd", {"alpha": 1.0, "beta": 8.0, "temperature": 4.0}, "logits"),
    ("dkd", {"alpha": 1.0, "beta": 1.0, "temperature": 0.7}, "binary"),
    ("js", {"part": "nontarget"}, "logits"),
    ("js", {"part": "both", "variant": "reference", "temperature": 2.0}, "logits"),
    ("mse", {}, "features"),
    ("cosine", {}, "features"),
    ("cosine", {"scope": "global"}, "features"),
    ("fitnet", {"student_dim": 6, "teacher_dim": 6, "regressor": "bn_relu"}, "features"),
    ("fitnet", {"student_dim": 6, "teacher_dim": 4, "regressor": "linear"}, "features4"),
    ("rkd", {}, "features"),
    ("rkd", {"pairs": 24, "triplets": 24}, "relational"),
    ("pkt", {}, "features"),
    ("pkt", {"sample_rows": 16}, "relational"),
    ("sp", {}, "features"),
    ("sp", {"sample_rows": 16}, "relational"),
    ("crd", {"student_dim": 6, "teacher_dim": 6, "n_data": 40, "feat_dim": 8, "nce_k": 20, "draws": 3},
     "relational"),
    ("crd", {"student_dim": 6, "teacher_dim": 6, "n_data": 40, "feat_dim": 8, "nce_k": 20, "draws": 3,
             "sample_rows": 12, "labels": True}, "relational"),
]


def term_key(i: int) -> str:
    name, kwargs, _ = TERMS[i]
    return f"{i:02d}_{name}"


def _inputs(kind: str, runs: int | None, seed: int):
    """(student, teacher, labels, ω) for one case: (B, C) / (B, D) without runs, (R, C, N) with."""
    n, c = {"logits": (12, 5), "binary": (12, 2), "features": (12, 6), "features4": (12, 6),
            "relational": (40, 6)}[kind]
    ct = 4 if kind == "features4" else c
    g = _gen(seed)
    lead = (runs,) if runs else ()
    s = torch.randn(*lead, n, c, generator=g, dtype=DT) * 1.5
    t = torch.randn(*lead, n, ct, generator=g, dtype=DT) * 1.5
    classes = 2 if kind == "binary" else 4
    y = torch.randint(classes, (*lead, n), generator=g)
    w = torch.rand(*lead, n, generator=g, dtype=DT)
    w[..., ::4] = 0.0
    w[..., 1::4] = 1.0
    if runs:
        s, t = s.transpose(1, 2).contiguous(), t.transpose(1, 2).contiguous()
    return s, t, y, w


def kd_term(build, i: int, runs: int | None, masked: bool) -> dict:
    """Value and gradients (student, teacher's output stays constant; the term's own parameters) of term i, called
    twice (CRD fixes its normaliser at the first call, so the second exercises the steady-state path)."""
    name, kwargs, kind = TERMS[i]
    kwargs = dict(kwargs)
    s, t, y, w = _inputs(kind, runs, seed=100 + i)
    if kwargs.pop("labels", False):
        kwargs["dataset_labels"] = y
    torch.manual_seed(7 + i)
    term = build(name, runs=runs, **kwargs).to(DT)
    out = {}
    for call in range(2):
        s_in = s.clone().requires_grad_(True)
        value = term(s_in, t, y, omega=w if masked else None)
        params = [p for p in term.parameters() if p.requires_grad]
        grads = torch.autograd.grad(value, [s_in, *params])
        out[f"value{call}"] = value.detach().numpy()
        out[f"grad_student{call}"] = grads[0].numpy()
        for k, gp in enumerate(grads[1:]):
            out[f"grad_param{k}_{call}"] = gp.numpy()
    return out


def kd_terms(build) -> dict:
    out = {}
    for i in range(len(TERMS)):
        for runs in (None, RUNS):
            for masked in (False, True):
                res = kd_term(build, i, runs, masked)
                tag = f"kd/{term_key(i)}/runs{runs or 0}/{'omega' if masked else 'plain'}"
                out.update({f"{tag}/{k}": v for k, v in res.items()})
    return out


# -- ω and divergences --------------------------------------------------------------------------------------------

def omega_and_divergences() -> dict:
    from common import divergence as D
    from common import mask

    g = _gen(5)
    zt, zs = torch.randn(16, 5, generator=g, dtype=DT) * 2, torch.randn(16, 5, generator=g, dtype=DT) * 2
    zs[:6] = zt[:6] * 1.3 + 0.01                          # nearly collinear: kept by the 0.996 threshold
    y = torch.randint(5, (16,), generator=g)
    dense_t, dense_s = torch.randn(2, 4, 3, 3, generator=g, dtype=DT), torch.randn(2, 4, 3, 3, generator=g, dtype=DT)
    dense_y = torch.randint(4, (2, 3, 3), generator=g)
    out = {
        "omega/logits": mask.omega(zt, y, zs),
        "omega/probs": mask.omega(zt, y, zs, space="probs", threshold=0.9),
        "omega/dense": mask.omega(dense_t, dense_y, dense_s, class_dim=1),
        "div/kl_logits": D.kl_logits(zt, zs, 2.0),
        "div/cmd": D.cmd(zt, zs, 5),
        "div/cmd_range": D.cmd(zt, zs, 3, value_range=(-4.0, 4.0)),
    }
    for variant in ("textbook", "reference"):
        for temp in (1.0, 2.5):
            out[f"div/target_js/{variant}/{temp}"] = D.target_js(zs, zt, y, variant, temp)
            zs_g = zs.clone().requires_grad_(True)
            nt = D.nontarget_js(zs_g, zt, y, variant, temp)
            out[f"div/nontarget_js/{variant}/{temp}"] = nt
            out[f"div/nontarget_js_grad/{variant}/{temp}"] = torch.autograd.grad(nt.sum(), zs_g)[0]
            out[f"div/js_divergence/{variant}/{temp}"] = torch.stack(D.js_divergence(zs, zt, y, variant, temp))
    return {k: v.detach().numpy() for k, v in out.items()}


# -- Algorithm 1 ----------------------------------------------------------------------------------------------------

def _tiny_models():
    torch.manual_seed(11)
    teacher = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).to(DT)
    student = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 4)).to(DT)
    g = _gen(12)
    batches = [(torch.randn(10, 6, generator=g, dtype=DT), torch.randn(10, 5, generator=g, dtype=DT),
                torch.randint(4, (10,), generator=g)) for _ in range(2)]
    return teacher, student, batches


def runs_models():
    """A 6-8-4 teacher and a 5-8-4 student stack over RUNS runs, and one batch of 10 samples in the runs layout."""
    from common.synthetic.vectorized import batched_mlp

    t_runs = batched_mlp([6, 8, 4], RUNS, seeds=[1, 2, 3]).to(DT)
    s_runs = batched_mlp([5, 8, 4], RUNS, seeds=[4, 5, 6]).to(DT)
    g = _gen(13)
    xt, xs = torch.randn(RUNS, 6, 10, generator=g, dtype=DT), torch.randn(RUNS, 5, 10, generator=g, dtype=DT)
    return t_runs, s_runs, xt, xs, torch.randint(4, (RUNS, 10), generator=g)


def runs_saliency(saliency) -> dict:
    """Input saliency of the runs models by `saliency(fast, **kwargs)`: the reference, or the synthetic dispatch."""
    out = {}
    for distance in ("mse", "ncjsd"):
        for fast in (True, False):
            s = saliency(fast, op="permute", distance=distance, repeats=2, generator=_gen(4), normalize=False,
                         chunk=4)
            out[f"saliency/runs/{distance}/rank1_{fast}"] = s.detach().numpy()
    return out


def saliency_cases() -> dict:
    from common.saliency import joint_train, removal_indices, saliency_vector
    out = {}
    teacher, student, batches = _tiny_models()
    for place in ("input", "1"):
        for op in ("permute", "zero", "mean"):
            for distance in ("mse", "ncjsd", "l1"):
                for rank1 in ((True, False) if place == "input" else (False,)):
                    s = saliency_vector(teacher, student, batches, place, op=op, distance=distance, repeats=3,
                                        generator=_gen(3), normalize=False, rank1=rank1, chunk=4)
                    out[f"saliency/{place}/{op}/{distance}/rank1_{rank1}"] = s
    # the runs layout of the synthetic experiments: (R, D, N) → (R, C, N), the stacked rank-1 path
    t_runs, s_runs, xt, xs, yr = runs_models()
    out.update(runs_saliency(lambda fast, **kw: saliency_vector(t_runs, s_runs, [(xt, xs, yr)], "input", batch_dim=2,
                                                                channel_dim=1, class_dim=1, **kw)))
    sal = out["saliency/input/permute/mse/rank1_True"]
    for mode in (0, 1, 2):
        out[f"removal/mode{mode}"] = removal_indices(sal, mode, 0.5, generator=_gen(9))
    a, b, batches = _tiny_models()[0], nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 4)).to(DT), batches
    torch.manual_seed(14)
    b = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 4)).to(DT)
    for distance in ("mse", "ncjsd"):
        history = joint_train(a, b, lambda: batches, epochs=3, lr=0.05, distance=distance)
        out[f"joint_train/{distance}"] = torch.tensor(history)
    out["joint_train/weights"] = torch.cat([p.detach().flatten() for p in (*a.parameters(), *b.parameters())])
    return {k: v if isinstance(v, np.ndarray) else v.detach().numpy() for k, v in out.items()}


# -- the synthetic experiments' tables -----------------------------------------------------------------------------

def _rows(rows: list[dict], prefix: str) -> dict:
    """Numeric columns of a results table → one array per column, rows in table order."""
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float, np.floating, np.integer))]
    return {f"{prefix}/{k}": np.array([float(r[k]) for r in rows]) for k in keys}


def _set(cfg: dict, over: dict) -> dict:
    from common.config import set_value

    for k, v in over.items():
        set_value(cfg, k, v)
    return cfg


def gauss_default(runs: int = 10) -> dict:
    """The gauss default (KL, T = 0.7, no mask, 6 γ × 1000 epochs) on `runs` runs, one process."""
    from gauss import experiment
    from gauss import main as gauss_main

    cfg = _set(gauss_main.resolve_config(gauss_main.parse_args([])), {"runs": runs, "workers": 1, "progress": False})
    res = experiment.run_sweep(cfg, torch.device("cpu"), log=lambda *_: None)
    return _rows(res["rows"], "gauss_default")


def gauss_all_methods() -> dict:
    """Every gauss method × mask, 2 runs × 2 γ × 20 epochs: the fused relational / CRD paths inside training."""
    from gauss import experiment
    from gauss import main as gauss_main

    args = gauss_main.parse_args(["--losses", "all", "--masks", "none,omega"])
    cfg = _set(gauss_main.resolve_config(args), {"runs": 2, "workers": 1, "progress": False,
                                                 "train.epochs": 20, "data.overlaps": [0, 10]})
    res = experiment.run_sweep(cfg, torch.device("cpu"), log=lambda *_: None)
    return _rows(res["rows"], "gauss_all")


def sklearn_short() -> dict:
    """sklearn_exp, short: 2 runs × 2 γ, 1500 samples, 60 epochs, Alg. 1 with 2 repeats; kl and pkt, both masks."""
    from sklearn_exp import experiment
    from sklearn_exp import main as sk_main

    args = sk_main.parse_args(["--losses", "kl,pkt", "--masks", "none,omega"])
    cfg = _set(sk_main.resolve_config(args), {
        "runs": 2, "workers": 1, "progress": False, "data.n_samples": 1500, "data.overlaps": [20, 0],
        "train.epochs": 60, "alg1.epochs": 60, "alg1.repeats": 2, "alg1.lr": 0.05})
    res = experiment.run_sweep(cfg, torch.device("cpu"), log=lambda *_: None)
    out = _rows(res["rows"], "sklearn_short")
    out["sklearn_short/saliency_x1"] = np.asarray(res["saliency"]["x1"], dtype=np.float64)
    out["sklearn_short/kept_x1"] = np.asarray(res["saliency"]["kept_x1"], dtype=np.float64)
    return out
