"""Building typed configs: YAML recipe + repeated `--set a.b=c` overrides -> frozen dataclasses.

`load_config` builds a job's config from plain dicts, rejecting unknown keys and wrong types with
the dotted key and the reason, before any work starts. A key that was renamed is refused with
its new name (`MOVED`), so an old recipe fails with the fix in the message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import types
import typing
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config value is wrong; the message names the dotted key and the reason."""


_URI_USERINFO = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^/\s@'\"]+@")


def refuse_credentials(key: str, value: str | None) -> None:
    """Credentials in a URI (`https://user:token@host`) would be copied into MLflow params, the
    resolved config written next to checkpoints, and logs; they must come from the environment
    (MLFLOW_TRACKING_USERNAME/PASSWORD, the AWS chain) instead."""
    if value and _URI_USERINFO.search(value):
        raise ConfigError(f"{key}: holds credentials in the URI; take them out and set them in the environment "
                          "(MLFLOW_TRACKING_USERNAME/PASSWORD, AWS_* or an instance role)")


def check_root(root: str) -> None:
    """The job's `root` names something (its existence is the job's first read)."""
    if not root:
        raise ConfigError("root: must name a dataset root (a local path or s3://bucket/prefix)")


MOVED = {
    "data.root": "root",
    "train.dataset_root": "root",
    "data.max_text_len": "model.max_text_len",
    "eval.max_text_len": "model.max_text_len of each eval.models entry",
    "data.val_every_steps": "train.val_every_steps",
}
"""Keys of earlier recipes -> where the setting lives now."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        item_tp = args[0] if args else Any
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return build_dataclass(tp, value, prefix=key)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads `1e-3` as a string; accept what float() accepts.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def _refuse_moved(values: dict[str, Any]) -> None:
    """An old key anywhere in a job's config fails first, naming where the setting lives now
    (before a required key it replaced is reported missing)."""
    for old, new in MOVED.items():
        node: Any = values
        for part in old.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is not _ABSENT:
            raise ConfigError(f"{old}: this setting is now {new} (one name per setting across prepare, recaption, "
                              "pack, pretrain, finetune and evaluate)")


_ABSENT = object()


def build_dataclass(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Build `cls` from a dict; unknown or missing keys and bad types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if not prefix:
        _refuse_moved(values)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in values:
            kwargs[name] = _coerce(values[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = build_dataclass(hints[name], {}, prefix=key)
            else:
                raise ConfigError(f"{key}: required key is missing")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        msg = str(e)
        if prefix and not msg.startswith(prefix):
            # Section validators name keys relative to the top; nested sections get the prefix.
            section = prefix.rsplit(".", 1)[-1]
            if msg.startswith(section + "."):
                msg = prefix + msg[len(section):]
        raise ConfigError(msg) from None


def _parse_scalar(text: str) -> Any:
    """`--set` values are YAML scalars/flow values: 3, 0.5, true, null, [a, b], 'str'."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = json.loads(json.dumps(raw))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. frames.fps=2")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: bad key {key!r}")
        node: Any = out
        for i, p in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):  # list items by index: eval.models.0.weights=...
                if not p.isdigit() or int(p) >= len(node):
                    raise ConfigError(f"--set {item!r}: {'.'.join(parts[:i])} has {len(node)} items, no item {p!r}")
                if last:
                    node[int(p)] = _parse_scalar(text)
                    break
                node = node[int(p)]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[:i])} is not a section")
            if last:
                node[p] = _parse_scalar(text)
                break
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
    return out


def read_yaml_mapping(path: str, what: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; errors start with `what` (e.g. "--config x.yaml")."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"{what}: file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{what}: top level must be a mapping, got {type(raw).__name__}")
    return raw


def load_config(cls: type, path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Load a YAML recipe (or nothing), apply `a.b=c` overrides, build and validate `cls`."""
    raw = read_yaml_mapping(path, f"--config {path}") if path else {}
    return build_dataclass(cls, apply_overrides(raw, list(overrides)))


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data form (tuples become lists), e.g. to ship across Ray or log as params."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def fingerprint(obj: Any) -> str:
    """Stable short hash of plain data or a config dataclass."""
    if dataclasses.is_dataclass(obj):
        obj = to_dict(obj)
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def local_path(path: str | None) -> str | None:
    """Ray workers run in another cwd: an existing relative local path becomes absolute."""
    if path is None or "://" in path or os.path.isabs(path) or not os.path.exists(path):
        return path
    return os.path.abspath(path)
