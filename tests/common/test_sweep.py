"""The synthetic sweep protocol (common.synthetic.sweep) as both experiments use it: config-time checks of the
hyper-parameters, losses, options and masks (issue 15 items 4 and 9), declared in each config.yaml's _checks or
checked by sweep.check_config."""
import pytest

from common.config import ConfigError
from gauss import main as gauss_main
from sklearn_exp import main as sk_main

BAD_HYPERPARAMETERS = [
    (["--set", "train.lr=.nan"], "finite"), (["--set", "train.lr=.inf"], "train.lr"),
    (["--set", "train.lr=-0.1"], "train.lr"), (["--set", "train.lr=0"], "train.lr"),
    (["--set", "train.epochs=0"], "train.epochs"), (["--runs", "0"], "runs"),
    (["--set", "kd.methods.kl.kl.temperature=0"], "temperature"), (["--losses", "nope"], "unknown method"),
    (["--masks", "none,sometimes"], "kd.masks"), (["--set", "kd.methods.kl.kl.tau=1"], "unknown option(s) tau"),
    (["--set", "kd.methods.kl.kl.reduction=sum"], "reduction"), (["--engine", "fast"], "train.engine"),
    (["--set", "kd.methods.kl={foo: {weight: 1.0}}"], "unknown KD loss 'foo'"),
]


@pytest.mark.parametrize("main", [gauss_main, sk_main], ids=["gauss", "sklearn_exp"])
@pytest.mark.parametrize("argv,needle", BAD_HYPERPARAMETERS, ids=[" ".join(a) for a, _ in BAD_HYPERPARAMETERS])
def test_bad_hyperparameters_are_config_errors(main, argv, needle):
    """Non-finite / out-of-range hyper-parameters, an unknown loss, option or mask → one ConfigError line naming the
    key, at config time (the CLI turns it into `error: ...`, exit 2)."""
    with pytest.raises(ConfigError) as err:
        main.resolve_config(main.parse_args(argv))
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_good_defaults_pass():
    for main in (gauss_main, sk_main):
        cfg = main.resolve_config(main.parse_args(["--set", "train.lr=1e-3", "--losses", "all"]))
        assert cfg["train"]["lr"] == 1e-3
