import copy

import pytest
import torch

from common.config import (ConfigError, UserError, base_parser, get, load_yaml, merge, parse_set, resolve,
                           resolve_device, save_yaml, set_value)

DEFAULTS = {
    "seed": 0,
    "name": "demo",
    "optim": {"lr": 0.1, "momentum": 0.9, "nesterov": False, "milestones": [10, 20]},
    "train": {"epochs": 5, "batch_size": 32},
    "loss": {"terms": {"_open": True, "ce": 1.0}, "extra": {}},
    "data": {"root": None},
}


def test_merge_overrides_and_keeps_inputs_untouched():
    before = copy.deepcopy(DEFAULTS)
    out = merge(DEFAULTS, {"optim": {"lr": 0.5}, "train": {"epochs": 7}}, "x.yaml")
    assert out["optim"] == {"lr": 0.5, "momentum": 0.9, "nesterov": False, "milestones": [10, 20]}
    assert out["train"] == {"epochs": 7, "batch_size": 32}
    assert DEFAULTS == before
    out["optim"]["milestones"].append(30)  # result shares no mutable state with the defaults
    assert DEFAULTS == before


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        merge(DEFAULTS, {"optim": {"lrr": 0.5}}, "my.yaml")
    assert str(e.value) == ("my.yaml: unknown key 'optim.lrr'; "
                            "valid keys under 'optim': lr, momentum, nesterov, milestones")
    with pytest.raises(ConfigError) as e:
        merge(DEFAULTS, {"sed": 1}, "my.yaml")
    assert str(e.value) == "my.yaml: unknown key 'sed'; valid top-level keys: seed, name, optim, train, loss, data"
    assert isinstance(e.value, UserError)


@pytest.mark.parametrize("override, message", [
    ({"seed": "1"}, "s: key 'seed' expects int, got '1'"),
    ({"seed": True}, "s: key 'seed' expects int, got True"),
    ({"seed": 1.5}, "s: key 'seed' expects int, got 1.5"),
    ({"optim": {"lr": "fast"}}, "s: key 'optim.lr' expects float, got 'fast'"),
    ({"optim": {"lr": False}}, "s: key 'optim.lr' expects float, got False"),
    ({"optim": {"nesterov": 1}}, "s: key 'optim.nesterov' expects bool, got 1"),
    ({"optim": {"milestones": 10}}, "s: key 'optim.milestones' expects list, got 10"),
    ({"name": 3}, "s: key 'name' expects str, got 3"),
    ({"train": 3}, "s: key 'train' expects a mapping, got 3"),
])
def test_type_errors(override, message):
    with pytest.raises(ConfigError) as e:
        merge(DEFAULTS, override, "s")
    assert str(e.value) == message


def test_int_promoted_to_float_and_none_accepts_anything():
    out = merge(DEFAULTS, {"optim": {"lr": 1}, "data": {"root": {"any": [1, 2]}}}, "s")
    assert out["optim"]["lr"] == 1.0 and isinstance(out["optim"]["lr"], float)
    assert out["data"]["root"] == {"any": [1, 2]}


def test_open_mappings():
    out = merge(DEFAULTS, {"loss": {"terms": {"kd": 0.5, "crd": {"t": 0.07}}, "extra": {"whatever": "x"}}}, "s")
    assert out["loss"]["terms"] == {"ce": 1.0, "kd": 0.5, "crd": {"t": 0.07}}  # merged, `_open` removed
    assert out["loss"]["extra"] == {"whatever": "x"}
    assert "_open" not in merge(DEFAULTS, {}, "s")["loss"]["terms"]
    with pytest.raises(ConfigError, match="key 'loss.terms' expects a mapping"):
        merge(DEFAULTS, {"loss": {"terms": [1]}}, "s")


def test_parse_set_types():
    out = parse_set(["a.b=3", "a.c=0.1", "d=true", "e=[1, 2]", "f=null", "g=hello world", "a.h={x: 1}", "a.h.y=2"])
    assert out == {"a": {"b": 3, "c": 0.1, "h": {"x": 1, "y": 2}}, "d": True, "e": [1, 2], "f": None,
                   "g": "hello world"}
    assert isinstance(out["a"]["b"], int) and isinstance(out["a"]["c"], float)
    assert parse_set(["x=[1, 2"]) == {"x": "[1, 2"}  # not valid YAML: kept as the text typed
    assert parse_set(["x=1", "x=2"]) == {"x": 2}  # later wins


@pytest.mark.parametrize("item", ["novalue", "=3", "a..b=1", ".a=1", " =1"])
def test_parse_set_malformed(item):
    with pytest.raises(ConfigError, match="--set") as e:
        parse_set([item])
    assert repr(item) in str(e.value)


def test_parse_set_conflict():
    with pytest.raises(ConfigError, match="conflicts with an earlier value for 'a'"):
        parse_set(["a=1", "a.b=2"])


def test_get_and_set_value():
    cfg = merge(DEFAULTS, {}, "s")
    assert get(cfg, "optim.lr") == 0.1
    set_value(cfg, "optim.lr", 0.2)
    assert cfg["optim"]["lr"] == 0.2
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'; valid keys under 'optim': lr, momentum"):
        get(cfg, "optim.lrr")
    with pytest.raises(ConfigError, match="unknown config key 'optimm'; valid top-level keys: seed"):
        set_value(cfg, "optimm.lr", 1)
    with pytest.raises(ConfigError):
        set_value(cfg, "optim.new", 1)
    set_value(cfg, "optim.new", 1, create=True)
    assert cfg["optim"]["new"] == 1


def _write(path, text):
    path.write_text(text)
    return path


def test_resolve_precedence(tmp_path):
    defaults = tmp_path / "defaults.yaml"
    save_yaml(DEFAULTS, defaults)
    user = _write(tmp_path / "user.yaml", "optim: {lr: 0.5, momentum: 0.5}\ntrain: {epochs: 10, batch_size: 8}\n"
                                          "loss: {terms: {kd: 2.0}}\n")
    parser = base_parser("test")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    args = parser.parse_args(["--config", str(user), "--set", "optim.lr=0.25", "--set", "train.epochs=20",
                              "--set", "loss.terms.kd=3", "--epochs", "30"])
    cfg = resolve(defaults, args, flags={"epochs": "train.epochs", "batch_size": "train.batch_size"})
    assert cfg["optim"]["lr"] == 0.25        # --set beats --config
    assert cfg["optim"]["momentum"] == 0.5   # --config beats defaults
    assert cfg["train"]["epochs"] == 30      # flag beats --set
    assert cfg["train"]["batch_size"] == 8   # flag left at None does not apply
    assert cfg["loss"]["terms"] == {"ce": 1.0, "kd": 3}
    assert cfg["seed"] == 0 and "_open" not in cfg["loss"]["terms"]
    assert args.out == "runs" and args.device == "auto"

    # Each layer's errors name their source.
    bad = _write(tmp_path / "bad.yaml", "optim: {lrr: 1}\n")
    with pytest.raises(ConfigError, match=f"^{bad}: unknown key 'optim.lrr'"):
        resolve(defaults, parser.parse_args(["--config", str(bad)]))
    with pytest.raises(ConfigError, match="^--set: key 'train.epochs' expects int, got 'x'"):
        resolve(defaults, parser.parse_args(["--set", "train.epochs=x"]))
    with pytest.raises(ConfigError, match="^--bad-flag: unknown key 'train.epochz'"):
        args = parser.parse_args([])
        args.bad_flag = 3
        resolve(defaults, args, flags={"bad_flag": "train.epochz"})


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_yaml(tmp_path / "nope.yaml")
    assert str(e.value) == f"{tmp_path / 'nope.yaml'}: file not found"
    invalid = _write(tmp_path / "invalid.yaml", "a: [1, 2\nb: 3\n")
    with pytest.raises(ConfigError, match=f"^{invalid}: invalid YAML \\(.*line") as e:
        load_yaml(invalid)
    assert "\n" not in str(e.value)
    listy = _write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match=f"^{listy}: top level must be a mapping"):
        load_yaml(listy)
    assert load_yaml(_write(tmp_path / "empty.yaml", "")) == {}


def test_save_yaml_round_trip(tmp_path):
    save_yaml(DEFAULTS, tmp_path / "sub" / "c.yaml")
    assert load_yaml(tmp_path / "sub" / "c.yaml") == DEFAULTS
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["c.yaml"]  # no temp file left behind


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="--device expects"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="^--device cuda requested but CUDA is not available$"):
            resolve_device("cuda")


CHECKED = """
train: {lr: 0.1, epochs: 3, engine: auto, steps: [1, 2]}
loss: {terms: {_open: true, kl: {temperature: 1.0}}, mask: none}
_checks:
  train.lr: "(0, 10]"
  train.epochs: "[1, inf)"
  train.engine: [auto, native, torch]
  train.steps: "[0, inf)"
  loss.mask: [none, omega]
  loss.terms.*.temperature: "(0, inf)"
"""


def _resolve_checked(tmp_path, *sets, config=None):
    import argparse
    defaults = _write(tmp_path / "defaults.yaml", CHECKED)
    return resolve(defaults, argparse.Namespace(config=config, set=list(sets)))


@pytest.mark.parametrize("item, message", [
    ("train.lr=-1", "--set: key 'train.lr' expects a value in (0, 10], got -1.0"),
    ("train.lr=.nan", "--set: key 'train.lr' must be a finite number, got nan"),
    ("train.lr=.inf", "--set: key 'train.lr' must be a finite number, got inf"),
    ("train.lr=1e3", "--set: key 'train.lr' expects a value in (0, 10], got 1000.0"),
    ("train.epochs=0", "--set: key 'train.epochs' expects a value in [1, inf), got 0"),
    ("train.engine=gpu", "--set: key 'train.engine' must be one of auto, native, torch; got 'gpu'"),
    ("train.steps=[1, -2]", "--set: key 'train.steps' expects a value in [0, inf), got -2"),
    ("loss.terms.dkd={temperature: 0}", "--set: key 'loss.terms.dkd.temperature' expects a value in (0, inf), got 0"),
])
def test_declared_checks_one_line_naming_layer_and_key(tmp_path, item, message):
    with pytest.raises(ConfigError) as e:
        _resolve_checked(tmp_path, item)
    assert str(e.value) == message


def test_declared_checks_in_a_file_name_the_file(tmp_path):
    user = _write(tmp_path / "mine.yaml", "loss: {mask: omegaa}\n")
    with pytest.raises(ConfigError, match=f"^{user}: key 'loss.mask' must be one of none, omega; got 'omegaa'$"):
        _resolve_checked(tmp_path, config=str(user))
    cfg = _resolve_checked(tmp_path, "loss.mask=omega", "loss.terms.kl.temperature=4")
    assert cfg["loss"]["mask"] == "omega" and "_checks" not in cfg


def test_defaults_obey_their_checks(tmp_path):
    import argparse
    bad = _write(tmp_path / "bad.yaml", "a: 0\n_checks: {a: '[1, 2]'}\n")
    with pytest.raises(ConfigError, match=f"^{bad}: key 'a' expects a value in"):
        resolve(bad, argparse.Namespace(config=None, set=[]))


def test_scientific_notation_is_a_float_everywhere(tmp_path):
    user = _write(tmp_path / "mine.yaml", "train: {lr: 1e-3}\n")
    assert _resolve_checked(tmp_path, config=str(user))["train"]["lr"] == 1e-3
    assert _resolve_checked(tmp_path, "train.lr=5E-1")["train"]["lr"] == 0.5
    assert parse_set(["a=1e6", "b=1.5e+2", "c=1_000", "d='1e3'", "e=1.0.0"]) == \
        {"a": 1e6, "b": 150.0, "c": 1000, "d": "1e3", "e": "1.0.0"}


def test_non_utf8_yaml_is_one_line(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("a: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=f"^{bad}: not UTF-8 text"):
        load_yaml(bad)


def test_atomic_write_respects_umask(tmp_path):
    import os
    from common.config import atomic_write
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "r.json", lambda f: f.write("{}"))
        assert (os.stat(tmp_path / "r.json").st_mode & 0o777) == 0o644
        os.umask(0o077)
        atomic_write(tmp_path / "s.json", lambda f: f.write("{}"))
        assert (os.stat(tmp_path / "s.json").st_mode & 0o777) == 0o600
    finally:
        os.umask(old)
