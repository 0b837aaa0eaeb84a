"""The training of one gauss sweep block (NTDH gauss/main.py, `train` and `train_kd`): the teacher on x1, the no-KD
baseline on x2 and one KD student per (method, mask) on x2, every (setting, run) a group of one batched linear model
(common.synthetic.vectorized.BatchedLinear), all trained full batch with plain SGD through
common.synthetic.dispatch (closed-form gradients where the objective has one, autograd otherwise).
"""
from __future__ import annotations

import math

import torch

from common.kd.crd import CRDistill
from common.run import derived_seed
from common.synthetic import dispatch
from common.synthetic import sweep as sweep_protocol
from common.synthetic.vectorized import BatchedLinear

#: the model-init seed role of each model of a run
TEACHER, STUDENT, BASELINE = 0, 1, 2


def init_seeds(cfg: dict, sweep, role: int) -> list[int]:
    """Model-init seed per group: run r of every setting shares one seed per role (teacher 0, KD student 1,
    baseline 2), as the reference reseeds torch with the run's seed for every γ."""
    return [3 * (cfg["seed"] + sweep.first_run + r) + role for _ in sweep.settings for r in range(sweep.runs)]


def reference_stream(seed: int, teacher_in: int, student_in: int, classes: int, crd_feat: int = 8,
                     crd_n_data: int = 200) -> dict:
    """The initial (weight, bias) of teacher, KD student and no-KD baseline as NTDH gauss/main.py draws them from one
    torch stream: `seed(seed_num + 1)` before the test set, then `run_mm` builds the teacher LinearClassifier, the
    student (`train_kd`), CRDLoss — always constructed, whatever the mode: its two Embed Linear(C, feat_dim) layers
    and the two ContrastMemory banks torch.rand(n_data, feat_dim) scaled to U[−s, s], s = 1/√(feat_dim/3) — and the
    baseline, in that order. Keyed by role; CRD's under "crd": embed_s, embed_t ((weight, bias) each), memory_s (the
    bank of student embeddings, the reference's memory_v1) and memory_t (memory_v2), (n_data, feat_dim) each.
    nn.Linear's init is U(−1/√in, 1/√in) for weight, then bias."""
    gen = torch.Generator().manual_seed(seed)

    def linear(fan_in, out):
        bound = 1.0 / math.sqrt(fan_in)
        w = torch.empty(out, fan_in).uniform_(-bound, bound, generator=gen)
        return w, torch.empty(out).uniform_(-bound, bound, generator=gen)

    teacher, student = linear(teacher_in, classes), linear(student_in, classes)
    embed_s, embed_t = linear(classes, crd_feat), linear(classes, crd_feat)
    stdv = 1.0 / math.sqrt(crd_feat / 3)
    memory_s = torch.rand(crd_n_data, crd_feat, generator=gen).mul_(2 * stdv).add_(-stdv)
    memory_t = torch.rand(crd_n_data, crd_feat, generator=gen).mul_(2 * stdv).add_(-stdv)
    return {TEACHER: teacher, STUDENT: student, BASELINE: linear(student_in, classes),
            "crd": {"embed_s": embed_s, "embed_t": embed_t, "memory_s": memory_s, "memory_t": memory_t}}


@torch.no_grad()
def reference_init(model: BatchedLinear, cfg: dict, sweep, role: int, teacher_in: int) -> None:
    """Parity (NTDH gauss sweeps): each group's initial weights from its run's reference stream (group_streams)."""
    for g, stream in enumerate(group_streams(cfg, sweep, teacher_in, model.out_features)):
        w, b = stream[role]
        model.weight[g].copy_(w)
        model.bias[g, :, 0].copy_(b)


def group_streams(cfg: dict, sweep, teacher_in: int, classes: int, crd_feat: int = 8,
                  crd_n_data: int = 200) -> list[dict]:
    """reference_stream of every group's run (seed `seed + r + 1`, the run's test-set seed), drawn once per run: the
    same for every γ, as the reference."""
    per_run = {}
    for r in range(sweep.first_run, sweep.first_run + sweep.runs):
        per_run[r] = reference_stream(cfg["seed"] + r + 1, teacher_in, sweep.train.x2.shape[1], classes, crd_feat,
                                      crd_n_data)
    return [per_run[sweep.first_run + g % sweep.runs] for g in range(sweep.groups)]


@torch.no_grad()
def reference_crd_init(objective, cfg: dict, sweep) -> None:
    """Parity: every CRD term of `objective` starts from its run's reference stream (reference_stream "crd"): the
    embeddings and memory banks the reference's CRDLoss is built with, instead of draws of their own."""
    for term in objective.terms.values():
        if not isinstance(term, CRDistill):
            continue
        f, n = term.bank_s.shape[1:]
        streams = group_streams(cfg, sweep, sweep.train.x1.shape[1], term.embed_s.in_features, f, n)
        for g, stream in enumerate(streams):
            ref = stream["crd"]
            for layer, (w, b) in ((term.embed_s, ref["embed_s"]), (term.embed_t, ref["embed_t"])):
                layer.weight[g].copy_(w)
                layer.bias[g, :, 0].copy_(b)
            term.bank_s[g].copy_(ref["memory_s"].T)
            term.bank_t[g].copy_(ref["memory_t"].T)


def train_linear(cfg: dict, sweep, x: torch.Tensor, role: int, desc: str, objective=None, teacher_out=None):
    """One BatchedLinear per group on x (G, D, N) against the training labels: the cross-entropy alone (objective
    None), or `objective` against the teacher's training logits. Initial weights: one seed per run and role, or
    under parity the reference's torch construction order (reference_init)."""
    model = BatchedLinear(x.shape[1], int(sweep.train.y.max()) + 1, runs=sweep.groups,
                          seeds=init_seeds(cfg, sweep, role))
    if cfg["parity"]:
        reference_init(model, cfg, sweep, role, sweep.train.x1.shape[1])
    model = model.to(x.device)
    t = cfg["train"]
    return dispatch.train(model, x, sweep.train.y, epochs=t["epochs"], lr=t["lr"], momentum=t["momentum"],
                          objective=objective, teacher_out=teacher_out, desc=desc, progress=cfg["progress"],
                          engine=t["engine"])


def train_teacher(cfg: dict, sweep):
    return train_linear(cfg, sweep, sweep.train.x1, TEACHER, "teacher")


def train_baseline(cfg: dict, sweep):
    """The no-KD student: the cross-entropy alone on x2."""
    return train_linear(cfg, sweep, sweep.train.x2, BASELINE, "no-KD baseline")


#: under parity, the relational terms as the reference computes them, on all 200 training samples: pkt and sp full
#: batch, rkd over all N² pairs and N³ triplets (its angle term in blocks, common.synthetic.fused_relational). Their
#: sampled surrogates are not unbiased for the reference's loss (SP normalises the rows of a Gram matrix of the rows
#: it sees; measured against the reference, the 32-row SP was 0.12-0.25 points lower at five of six γ, and 256
#: sampled RKD pairs and triplets up to 10 points higher at γ = 0; README, "Checked against the reference code").
#: crd keeps its sampler (its anchors and negatives were within noise of the reference's).
PARITY_EXACT = {"pkt": {"sample_rows": None}, "sp": {"sample_rows": None}, "rkd": {"pairs": None, "triplets": None}}


def train_student(cfg: dict, sweep, method: str, mask: str, teacher_train: torch.Tensor):
    """The KD student of one (method, mask) on x2: ce + the method's terms (common.synthetic.sweep.objective_for)
    against the teacher's training logits. Each configuration (and each block of runs) draws from its own torch
    stream (sampled relational terms, CRD), whatever ran before it."""
    torch.manual_seed(derived_seed(cfg["seed"], method, mask, sweep.first_run))
    n_classes = int(sweep.train.y.max()) + 1
    objective = sweep_protocol.objective_for(cfg, method, mask, sweep.train.y, n_classes, PARITY_EXACT)
    if cfg["parity"]:
        reference_crd_init(objective, cfg, sweep)
    objective = objective.to(sweep.train.x2.device)
    return train_linear(cfg, sweep, sweep.train.x2, STUDENT, f"{method}/{mask}", objective, teacher_train)
