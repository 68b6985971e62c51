"""Typed configs: dataclass schemas, loaded from YAML and overridden by `a.b=value` arguments.

Every field is declared once with `option(default, "help")`, which is where it is documented. Loading
checks every key and type and raises a `ConfigError` whose one-line message names the offending key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from deradiff.errors import ConfigError

T = TypeVar("T")

REQUIRED: Any = dataclasses.MISSING


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable[[], Any] | None = None) -> Any:
    """Declare a config field with its documentation; omit `default` (and `factory`) for a required field."""
    if not help:
        raise ValueError("every config option needs a help text")
    metadata = {"help": help}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    if isinstance(default, (list, dict, set)):
        frozen = default  # mutable defaults must be copied per instance
        return dataclasses.field(default_factory=lambda: type(frozen)(frozen), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def load_config(schema: type[T], path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> T:
    """Build `schema` from a YAML file (optional) plus `key=value` overrides, validating everything."""
    raw: dict[str, Any] = _read_yaml(Path(path)) if path is not None else {}
    for item in overrides:
        key, value = _parse_override(item)
        _set_nested(raw, key.split("."), value)
    return _build(schema, raw, prefix="")


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config (for logging, metadata and stage cache keys)."""
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    """Write a config as YAML that `load_config` reads back to an equal object."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def describe(schema: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, type, help) for every field, nested keys dotted: the reference for `--help` and docs."""
    rows = []
    hints = get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(describe(hints[f.name], prefix=f"{key}."))
        else:
            rows.append((key, _type_name(hints[f.name]), f.metadata.get("help", "")))
    return rows


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist (expected a YAML file)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, got {type(data).__name__}")
    return data


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{item}' must look like key=value (e.g. train.lr=1e-4)")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def _set_nested(raw: dict[str, Any], parts: list[str], value: Any) -> None:
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{'.'.join(parts[: i + 1])}' is not a section, cannot set '{'.'.join(parts)}'")
        node = child
    node[parts[-1]] = value


def _build(schema: type[T], raw: Any, prefix: str) -> T:
    section = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{section}' must be a mapping, got {raw!r}")
    hints = get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (known keys in {section}: {', '.join(fields)})"
        )
    values = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name in raw:
            values[name] = _coerce(hints[name], raw[name], key)
        elif dataclasses.is_dataclass(hints[name]) and f.default_factory is dataclasses.MISSING:
            values[name] = _build(hints[name], {}, f"{key}.")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config key '{key}' is required ({f.metadata.get('help', 'no help')})")
    instance = schema(**values)
    validate = getattr(instance, "validate", None)
    if callable(validate):
        validate()
    return instance


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless (int → float)."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{key}.")
    if origin in (Union, types.UnionType):
        return _coerce_union(tp, value, key)
    if origin is Literal:
        value = _unyaml_bool(value, get_args(tp))
        if value not in get_args(tp):
            raise ConfigError(f"config key '{key}' must be one of {list(get_args(tp))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        args = get_args(tp)
        item_type = args[0] if args else Any
        return [_coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}")
        return dict(value)
    return _coerce_scalar(tp, value, key)


_YAML_BOOL_WORDS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}


def _unyaml_bool(value: Any, options: tuple) -> Any:
    """YAML reads an unquoted `no`/`off`/`yes`/`on` as a boolean: give a string choice such as
    `mixed_precision: no` back its word when exactly one option spells that boolean."""
    if not isinstance(value, bool) or any(isinstance(o, bool) for o in options):
        return value
    spelled = [o for o in options if isinstance(o, str) and o.lower() in _YAML_BOOL_WORDS[value]]
    return spelled[0] if len(spelled) == 1 else value


def _coerce_union(tp: Any, value: Any, key: str) -> Any:
    args = get_args(tp)
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in (a for a in args if a is not type(None)):
        try:
            return _coerce(arg, value, key)
        except ConfigError as exc:
            errors.append(str(exc))
    raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")


def _coerce_scalar(tp: Any, value: Any, key: str) -> Any:
    if tp is Any:
        return value
    if tp is float:
        # YAML 1.1 reads "1e-4" as a string; accept any text Python parses as a float.
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects float, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' expects float, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects int, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects true or false, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
    raise TypeError(f"unsupported config annotation {tp!r} for '{key}'")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is Literal:
        return "one of " + "/".join(map(str, get_args(tp)))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))
