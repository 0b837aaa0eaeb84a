"""Experiment configuration: a defaults YAML that doubles as the schema, overridden in layers.

    defaults.yaml  <-  --config my.yaml  <-  --set a.b=1 --set c=[1,2]  <-  experiment flags (e.g. --epochs 3)

Every layer is validated against the defaults: an unknown key or a value of the wrong type is a `ConfigError` that
names its source (file path, "--set" or the flag) and says what was expected, so a typo never silently does nothing.

Type rules (the default value decides): None accepts anything; bool only bool; int only int (not bool); float int or
float (stored as float); str only str; list any list; dict a mapping, merged key by key.

Declared checks. A defaults YAML may carry a top-level `_checks` mapping from dotted keys (`*` matches any one
component, for open mappings) to a rule; a value is checked in the layer that sets it, so the error names that layer:

    _checks:
      train.lr: "(0, 10]"              # an interval: ( ) open, [ ] closed, inf allowed as a bound
      train.epochs: "[1, inf)"
      loss.mask: [none, omega]          # the allowed choices (a list value is checked element by element)
      loss.terms.*.temperature: "(0, inf)"

Floats must be finite everywhere (NaN never, ±inf only where an interval's closed bound says so). The `_checks`
mapping itself never appears in a resolved config.

Numbers. YAML files and --set values are read with YAML 1.2's float syntax, so `1e-3`, `1e6` and `3.0E+2` are
floats (PyYAML's YAML 1.1 reads them as text).

Open mappings. Some mappings have user-chosen keys (e.g. `loss.terms`, keyed by loss name). A default that is an
empty mapping `{}`, or a mapping containing `_open: true`, accepts any keys and values without checks; overrides
are still deep-merged into it. The `_open` marker itself never appears in a resolved config:

    loss:
      terms: {_open: true, ce: 1.0}     # --set loss.terms.kd=0.5  ->  terms: {ce: 1.0, kd: 0.5}
"""
from __future__ import annotations

import argparse
import copy
import fnmatch
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import yaml

OPEN_KEY = "_open"
CHECKS_KEY = "_checks"


class UserError(Exception):
    """An error caused by user input (config, flags, files). `common.run.cli` prints it as one line, exit code 2."""


class ConfigError(UserError):
    """Bad configuration: unknown key, wrong type, unparsable override, unavailable device."""


class DataError(UserError):
    """A dataset or checkpoint file is missing or malformed."""


# ----------------------------------------------------------------------------------------------------------------
# YAML files

class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2's float syntax: `1e-3` is a float, not the string '1e-3'."""


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first in list(_Loader.yaml_implicit_resolvers):
    _Loader.yaml_implicit_resolvers[_first] = [(tag, rx) for tag, rx in _Loader.yaml_implicit_resolvers[_first]
                                              if tag != "tag:yaml.org,2002:float"]
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_loads(text: str) -> Any:
    """yaml.safe_load with YAML 1.2 floats (see the module docstring)."""
    return yaml.load(text, Loader=_Loader)


def load_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping. An empty file reads as {}."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); expected a YAML file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        data = yaml_loads(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({_short_yaml_reason(e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _short_yaml_reason(e: yaml.YAMLError) -> str:
    # PyYAML messages span several lines (context, snippet); keep the problem and its line:column.
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "w") -> Path:
    """Write a file atomically: `write(f)` into a temp file next to the target, fsync, os.replace. A crash (or a full
    disk) mid-write leaves the previous file intact instead of a truncated one, which matters most for the config a
    run records and the checkpoint a resume depends on."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; give it the mode open() would (0666 less the umask), like the logs and plots.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def save_yaml(cfg: dict, path: str | os.PathLike) -> None:
    """Write `cfg` as YAML atomically (temp file in the same directory, then os.replace), keeping key order."""
    text = yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)
    atomic_write(path, lambda f: f.write(text))


# ----------------------------------------------------------------------------------------------------------------
# Validated deep merge

def _is_open(schema: dict) -> bool:
    return not schema or schema.get(OPEN_KEY) is True


def _strip_open(d: Any) -> Any:
    """Deep copy of `d` without the `_open` markers (and the top-level `_checks`)."""
    if isinstance(d, dict):
        return {k: _strip_open(v) for k, v in d.items() if k not in (OPEN_KEY, CHECKS_KEY)}
    return copy.deepcopy(d)


def _deep_update(base: dict, override: dict) -> dict:
    """Unchecked deep merge, used inside open mappings."""
    out = dict(base)
    for k, v in override.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


_INTERVAL = re.compile(r"^\s*([\[(])\s*([^,]+?)\s*,\s*([^,]+?)\s*([\])])\s*$")


def _bound(text: str, rule: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"_checks: malformed interval {rule!r} (expected e.g. '(0, inf)' or '[1, 10]')") from None


def _check_rule(rule: Any, value: Any, key: str, source: str) -> None:
    """Raise ConfigError if `value` breaks the declared `rule` (a list of choices or an interval string)."""
    if isinstance(value, list) and not (isinstance(rule, list) and value in rule):
        for item in value:
            _check_rule(rule, item, key, source)
        return
    if isinstance(rule, list):
        if value not in rule:
            raise ConfigError(f"{source}: key '{key}' must be one of {', '.join(map(str, rule))}; got {value!r}")
        return
    m = _INTERVAL.match(str(rule))
    if not m:
        raise ValueError(f"_checks: rule for '{key}' must be a list of choices or an interval, got {rule!r}")
    lo_br, lo, hi, hi_br = m.group(1), _bound(m.group(2), rule), _bound(m.group(3), rule), m.group(4)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{source}: key '{key}' expects a number in {rule}, got {value!r}")
    inside = (value > lo or (lo_br == "[" and value == lo)) and (value < hi or (hi_br == "]" and value == hi))
    if not inside:
        raise ConfigError(f"{source}: key '{key}' expects a value in {rule.strip()}, got {value!r}")


def _finite(value: Any, key: str, source: str, rule: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        if math.isnan(value) or rule is None or isinstance(rule, list) or str(rule).count("inf") == 0:
            raise ConfigError(f"{source}: key '{key}' must be a finite number, got {value!r}")
    elif isinstance(value, list):
        for item in value:
            _finite(item, key, source, rule)


def _rule_for(checks: dict, key: str) -> Any:
    """The declared rule for dotted `key` (exact match first, then `*` patterns), or None."""
    if key in checks:
        return checks[key]
    parts = key.split(".")
    for pattern, rule in checks.items():
        pat = pattern.split(".")
        if len(pat) == len(parts) and all(a == b or (a == "*" and b) or fnmatch.fnmatchcase(b, a)
                                          for a, b in zip(pat, parts)):
            return rule
    return None


def _validate_leaf(checks: dict, key: str, value: Any, source: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if k != OPEN_KEY:
                _validate_leaf(checks, f"{key}.{k}", v, source)
        return
    rule = _rule_for(checks, key)
    _finite(value, key, source, rule)
    if rule is not None:
        _check_rule(rule, value, key, source)


_TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "a mapping"}


def _check_type(default: Any, value: Any, key: str, source: str) -> Any:
    """Return `value` (int promoted to float where the default is a float) or raise ConfigError."""
    if default is None:
        return copy.deepcopy(value)
    kind = type(default)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ConfigError(f"{source}: key '{key}' expects {_TYPE_NAMES.get(kind, kind.__name__)}, got {value!r}")
    return copy.deepcopy(value)


def _apply(schema: dict, base: dict, override: dict, source: str, prefix: str = "", checks: dict | None = None) -> dict:
    """Merge `override` into `base` (the current values), validating its keys, types and declared checks against
    `schema` (the defaults; its top-level `_checks` are the checks)."""
    if checks is None:
        checks = schema.get(CHECKS_KEY) or {}
        if not isinstance(checks, dict):
            raise ValueError(f"_checks must be a mapping of dotted keys to rules, got {type(checks).__name__}")
    if _is_open(schema):
        for k, v in override.items():
            _validate_leaf(checks, f"{prefix}{k}", v, source)
        return _deep_update(base, override)
    out = dict(base)
    for k, v in override.items():
        key = f"{prefix}{k}"
        if k not in schema or k in (OPEN_KEY, CHECKS_KEY):
            valid = ", ".join(str(s) for s in schema if s not in (OPEN_KEY, CHECKS_KEY))
            where = f"valid keys under '{prefix[:-1]}'" if prefix else "valid top-level keys"
            raise ConfigError(f"{source}: unknown key '{key}'; {where}: {valid}")
        default = schema[k]
        if isinstance(default, dict):
            if not isinstance(v, dict):
                raise ConfigError(f"{source}: key '{key}' expects a mapping, got {v!r}")
            out[k] = _apply(default, base.get(k) or {}, v, source, prefix=f"{key}.", checks=checks)
        else:
            out[k] = _check_type(default, v, key, source)
            _validate_leaf(checks, key, out[k], source)
    return out


def merge(defaults: dict, override: dict, source: str) -> dict:
    """New dict: `override` deep-merged over `defaults`, which define the allowed keys and types (module docstring).

    `source` names where `override` came from, for error messages. Inputs are not modified.
    """
    return _apply(defaults, _strip_open(defaults), override, source)


# ----------------------------------------------------------------------------------------------------------------
# Dotted keys and --set

def _split_key(key: str, what: str) -> list[str]:
    parts = key.split(".")
    if not key or any(not p.strip() for p in parts):
        raise ConfigError(f"{what}: malformed key {key!r} (expected dotted names like 'optim.lr')")
    return [p.strip() for p in parts]


def _nest(parts: list[str], value: Any) -> dict:
    """['a', 'b'], 1 -> {'a': {'b': 1}}"""
    out: Any = value
    for p in reversed(parts):
        out = {p: out}
    return out


def parse_set(items: list[str]) -> dict:
    """["a.b=3", "c=[1, 2]"] -> {"a": {"b": 3}, "c": [1, 2]}. Values are parsed as YAML; unparsable ones stay text."""
    out: dict = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set: malformed item {item!r} (expected KEY=VALUE, e.g. optim.lr=0.1)")
        parts = _split_key(key.strip(), f"--set {item!r}")
        try:
            value = yaml_loads(raw)
        except yaml.YAMLError:
            value = raw  # e.g. "name=[draft" -- not YAML, so take the text as typed
        node = out
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                prefix = ".".join(parts[:i + 1])
                raise ConfigError(f"--set: item {item!r} conflicts with an earlier value for '{prefix}'")
        leaf = parts[-1]
        # A later item wins, except that two mappings for the same key merge (a={x: 1} then a.y=2).
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            value = _deep_update(node[leaf], value)
        node[leaf] = value
    return out


def _walk(cfg: dict, parts: list[str], key: str) -> dict:
    """The mapping that holds the last component of `key`."""
    node = cfg
    for i, p in enumerate(parts[:-1]):
        if not isinstance(node, dict) or p not in node:
            _missing(node, parts[:i + 1])
        node = node[p]
    if not isinstance(node, dict):
        raise ConfigError(f"config key '{'.'.join(parts[:-1])}' is not a mapping, cannot hold '{key}'")
    return node


def _missing(node: Any, parts: list[str]):
    parent = ".".join(parts[:-1])
    valid = ", ".join(map(str, node)) if isinstance(node, dict) else "(not a mapping)"
    where = f"valid keys under '{parent}'" if parent else "valid top-level keys"
    raise ConfigError(f"unknown config key '{'.'.join(parts)}'; {where}: {valid}")


def get(cfg: dict, key: str) -> Any:
    """cfg["a"]["b"] for key "a.b"."""
    parts = _split_key(key, "config")
    node = _walk(cfg, parts, key)
    if parts[-1] not in node:
        _missing(node, parts)
    return node[parts[-1]]


def set_value(cfg: dict, key: str, value: Any, *, create: bool = False) -> None:
    """cfg["a"]["b"] = value for key "a.b", in place, unvalidated. The key must exist unless `create`."""
    parts = _split_key(key, "config")
    node = _walk(cfg, parts, key)
    if parts[-1] not in node and not create:
        _missing(node, parts)
    node[parts[-1]] = value


# ----------------------------------------------------------------------------------------------------------------
# Command line

def base_parser(description: str) -> argparse.ArgumentParser:
    """The flags every experiment shares; experiments add their own shortcuts and pass them to `resolve` as flags."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", metavar="PATH", help="YAML file merged over the experiment's defaults")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override one config key, e.g. --set optim.lr=0.01 (repeatable, applied after --config)")
    p.add_argument("--out", metavar="DIR", default="runs", help="where the run directory is created (default: runs)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    return p


def resolve(defaults_path: str | os.PathLike, args: argparse.Namespace, flags: dict[str, str] | None = None,
            layers: Sequence[str | os.PathLike] = ()) -> dict:
    """The run's config: defaults <- layers (e.g. a preset or demo YAML) <- --config <- --set <- flags.

    flags: argparse dest -> dotted config key, e.g. {"epochs": "train.epochs"}; a flag left at None is not applied.
    Every layer is validated against the defaults; errors name the layer's file, "--set" or the flag.
    """
    defaults = load_yaml(defaults_path)
    # the defaults obey their own declared checks (a wrong declaration shows up at once, naming the file)
    cfg = _apply(defaults, {}, _strip_open(defaults), str(defaults_path))
    files = [Path(p) for p in layers] + ([Path(args.config)] if getattr(args, "config", None) else [])
    for path in files:
        cfg = _apply(defaults, cfg, load_yaml(path), str(path))
    cfg = _apply(defaults, cfg, parse_set(getattr(args, "set", None) or []), "--set")
    for dest, key in (flags or {}).items():
        value = getattr(args, dest, None)  # a flag this command does not define counts as not given
        if value is not None:
            flag = "--" + dest.replace("_", "-")
            cfg = _apply(defaults, cfg, _nest(_split_key(key, flag), value), flag)
    return cfg


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda if available else cpu; "cpu"; "cuda" / "cuda:N" (must be available)."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} requested but CUDA is not available")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise ConfigError(f"--device {name} requested but only {n} CUDA device(s) are visible")
        return dev
    raise ConfigError(f"--device expects auto, cpu, cuda or cuda:N, got {name!r}")
