"""The fast engine of the synthetic experiments (gauss, sklearn_exp), and nothing else.

vectorized  R independent small models as stacked parameters (BatchedLinear stacks, feature-major (R, D, N)).
fastfit     full-batch SGD of those stacks with a hand-written backward and closed-form logit gradients.
native      fastfit's C engine (csrc/mlp_train.c, compiled on first use; torch when no compiler).
parallel    a sweep's runs cut into blocks over worker processes.

Everything here must give the numbers of the plain references in common.kd, common.mask, common.divergence and
common.saliency (tests/golden); the experiments reach it through one dispatch point, common.synthetic.dispatch.
"""
