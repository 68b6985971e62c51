"""Typed configs: dataclass schemas, loaded from YAML and overridden by `a.b=value` arguments.

Every field is declared once with `option(default, "help")`, which is where it is documented. Loading
checks every key and type and raises a `ConfigError` whose one-line message names the offending key.

Values keep the text the user wrote until the schema says what they are. YAML 1.1 would turn an unquoted
`2026-12-03` into a date, `0755` into 493 and `1:30` into 90 before any field is consulted; here a string
field gets exactly that text, an int field accepts decimal integers only, a float field numbers only (finite),
a bool field true/false (also yes/no, on/off), and `null` (or `~`) means null. An override's text after `=`
is used as is for a string field (quote it, e.g. `'null'`, for a word that would otherwise mean null) and
read as YAML otherwise (`seeds=[0,1]`).

Paths: a relative path in a YAML file is read from the current directory, like everything a run writes,
except in fields declared with `relative_to_yaml=True` (files that ship next to the YAML: other configs,
prompt lists); there it is read from the folder of the YAML that sets it. Overrides always read from the
current directory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from deradiff.errors import ConfigError

T = TypeVar("T")

REQUIRED: Any = dataclasses.MISSING
YAML_RELATIVE = "relative_to_yaml"  # field metadata key: a path read from the setting YAML's folder
YAML_RELATIVE_NOTE = " (relative path in a YAML: from that YAML's folder)"

_NULL_WORDS = ("null", "Null", "NULL", "~")
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
_INT = re.compile(r"[-+]?(0|[1-9](_?[0-9])*)")
_LEADING_ZERO = re.compile(r"[-+]?0[0-9_]+")
_YAML_SPECIAL_FLOATS = {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}
_PLAIN_TAG = "!deradiff/plain"


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
           relative_to_yaml: bool = False) -> Any:
    """Declare a config field with its documentation; omit `default` (and `factory`) for a required field.
    `relative_to_yaml`: the value is a file that ships next to the YAML (see the module docstring)."""
    if not help:
        raise ValueError("every config option needs a help text")
    metadata: dict[str, Any] = {"help": help}
    if relative_to_yaml:
        metadata[YAML_RELATIVE] = True
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    if isinstance(default, (list, dict, set)):
        frozen = default  # mutable defaults must be copied per instance
        return dataclasses.field(default_factory=lambda: type(frozen)(frozen), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def load_config(schema: type[T], path: str | Path | None = None, overrides: typing.Sequence[str] = (),
                values: typing.Mapping[str, Any] | None = None) -> T:
    """Build `schema` from a YAML file (optional) plus `key=value` overrides (text, as a user types them), then
    `values` (dotted key -> Python value, set as given: for a caller composing a config), validating everything."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
        _resolve_yaml_paths(schema, raw, Path(path).parent)
    for item in overrides:
        key, value = _parse_override(item)
        _set_nested(raw, key.split("."), value)
    for key, value in (values or {}).items():
        _set_nested(raw, key.split("."), value)
    return _build(schema, raw, prefix="")


def validated(config: T) -> T:
    """`config` after the checks `load_config` runs on what it builds (every section's `validate`, innermost
    first): for a loaded config a caller changed, so a value it sets must pass them as one typed by a user."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            validated(value)
    check = getattr(config, "validate", None)
    if callable(check):
        check()
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config (for logging, metadata and stage cache keys)."""
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    """Write a config as YAML that `load_config` reads back to the same config from any folder: YAML-relative
    paths are written absolute, since the saved file usually lives elsewhere than the one they came from."""
    Path(path).write_text(yaml.safe_dump(_absolute_yaml_paths(config), sort_keys=False))


def describe(schema: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, type, help) for every field, nested keys dotted: the reference for `--help` and docs."""
    rows = []
    hints = get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(describe(hints[f.name], prefix=f"{key}."))
        else:
            note = YAML_RELATIVE_NOTE if f.metadata.get(YAML_RELATIVE) else ""
            rows.append((key, _type_name(hints[f.name]), f.metadata.get("help", "") + note))
    return rows


# ---- reading: YAML keeps unquoted text, overrides keep their raw text --------------------------------------
class _Plain(str):
    """An unquoted YAML scalar, kept as text; the field it sets decides its type."""


class _Override(str):
    """The text after `=` of a command-line override, read once the field's type is known."""


class _TextLoader(yaml.SafeLoader):
    """SafeLoader that turns every unquoted scalar into `_Plain` text (quoted ones stay plain strings)."""

    def resolve(self, kind: Any, value: str, implicit: tuple[bool, bool]) -> str:
        if kind is yaml.ScalarNode and implicit[0] and value != "<<":  # `<<` is YAML's merge key
            return _PLAIN_TAG
        return super().resolve(kind, value, implicit)


_TextLoader.add_constructor(_PLAIN_TAG, lambda loader, node: _Plain(node.value))


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist (expected a YAML file)")
    try:
        data = yaml.load(path.read_text(), Loader=_TextLoader)
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{path}' is not a UTF-8 text file (expected a YAML file)") from None
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
    return key.strip(), _Override(text)


def _read_text(text: str) -> Any:
    """An override's text as YAML (unquoted scalars as `_Plain`); text that is not YAML stays text."""
    if not text.strip():
        return _Plain("")
    try:
        return yaml.load(text, Loader=_TextLoader)
    except yaml.YAMLError:
        return _Plain(text)


def _set_nested(raw: dict[str, Any], parts: list[str], value: Any) -> None:
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{'.'.join(parts[: i + 1])}' is not a section, cannot set '{'.'.join(parts)}'")
        node = child
    node[parts[-1]] = value


# ---- YAML-relative paths ----------------------------------------------------------------------------------
def _resolve_yaml_paths(schema: type, raw: dict[str, Any], folder: Path) -> None:
    """Rewrite, in place, the relative values of `relative_to_yaml` fields to paths under `folder`."""
    hints = get_type_hints(schema)
    for f in dataclasses.fields(schema):
        value = raw.get(f.name)
        if dataclasses.is_dataclass(hints[f.name]) and isinstance(value, dict):
            _resolve_yaml_paths(hints[f.name], value, folder)
        elif f.metadata.get(YAML_RELATIVE) and _is_relative_path(value):
            raw[f.name] = os.path.abspath(folder / value)  # absolute: the same file however --config was typed


def _is_relative_path(value: Any) -> bool:
    """A non-empty relative local path; `world:train`, URLs and other `scheme:` names are not paths."""
    if not isinstance(value, str) or _is_null(value) or not value.strip():
        return False
    return ":" not in value and not value.startswith("~") and not Path(value).is_absolute()


def _absolute_yaml_paths(config: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            value = _absolute_yaml_paths(value)
        elif f.metadata.get(YAML_RELATIVE) and _is_relative_path(value):
            value = os.path.abspath(value)
        else:
            value = _copy(value)
        out[f.name] = value
    return out


def _copy(value: Any) -> Any:
    """A nested copy with tuples as lists, which `yaml.safe_dump` writes."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_copy(v) for v in value]
    return value


# ---- building and type checks -----------------------------------------------------------------------------
def _build(schema: type[T], raw: Any, prefix: str) -> T:
    section = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{section}' must be a mapping, got {_show(raw)}")
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
    if isinstance(value, _Override) and not _takes_text(tp) and get_origin(tp) not in (Union, types.UnionType):
        value = _read_text(value)
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{key}.")
    if origin in (Union, types.UnionType):
        return _coerce_union(tp, value, key)
    if origin is Literal:
        choice = _text(value) if isinstance(value, str) else value
        if choice not in get_args(tp):
            shown = repr(choice) if isinstance(value, str) else _show(value)
            raise ConfigError(f"config key '{key}' must be one of {list(get_args(tp))}, got {shown}")
        return choice
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {_show(value)}")
        args = get_args(tp)
        item_type = args[0] if args else Any
        return [_coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping, got {_show(value)}")
        return _plain(value)
    return _coerce_scalar(tp, value, key)


def _takes_text(tp: Any) -> bool:
    """A string field or a choice of strings: an override's text is taken exactly as written."""
    if get_origin(tp) is Literal:
        return all(isinstance(a, str) for a in get_args(tp))
    return tp is str


def _coerce_union(tp: Any, value: Any, key: str) -> Any:
    args = get_args(tp)
    if type(None) in args and _is_null(value):
        return None
    arms = [a for a in args if a is not type(None)]
    if len(arms) == 1:  # `X | None`: X's own error says best what is wrong
        return _coerce(arms[0], value, key)
    for arm in sorted(arms, key=_takes_text):  # text last, so `prompts=[a, b]` is a list, not that text
        try:
            return _coerce(arm, value, key)
        except ConfigError:
            pass
    raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {_show(value)}")


def _coerce_scalar(tp: Any, value: Any, key: str) -> Any:
    if tp is Any:
        return _plain(value)
    if tp is float:
        return _to_float(value, key)
    if tp is int:
        return _to_int(value, key)
    if tp is bool:
        return _to_bool(value, key)
    if tp is str:
        return _to_str(value, key)
    raise TypeError(f"unsupported config annotation {tp!r} for '{key}'")


def _to_float(value: Any, key: str) -> float:
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        number = _float_text(value.strip())
    if number is None:
        raise ConfigError(f"config key '{key}' expects float, got {_show(value)}")
    if not math.isfinite(number):
        raise ConfigError(f"config key '{key}' must be a finite number, got {number}")
    return number


def _float_text(text: str) -> float | None:
    """Python's float syntax (1e-4, 0.5, 1_000.5) plus YAML's .inf/.nan; None for anything else (1:30)."""
    if text.lower() in _YAML_SPECIAL_FLOATS:
        return _YAML_SPECIAL_FLOATS[text.lower()]
    try:
        return float(text)
    except ValueError:
        return None


def _to_int(value: Any, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _INT.fullmatch(value.strip()):
        return int(value)
    hint = ""
    if isinstance(value, str) and _LEADING_ZERO.fullmatch(value.strip()):
        hint = " (a leading zero is ambiguous: YAML 1.1 reads 0755 as octal 493; write the decimal number)"
    raise ConfigError(f"config key '{key}' expects int, got {_show(value)}{hint}")


def _to_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.strip().lower()]
    raise ConfigError(f"config key '{key}' expects true or false (yes/no and on/off also work), got {_show(value)}")


def _to_str(value: Any, key: str) -> str:
    if _is_null(value):
        raise ConfigError(f"config key '{key}' expects a string, got null (quote it for the word: 'null')")
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):  # configs built in Python
        return str(value)
    raise ConfigError(f"config key '{key}' expects a string, got {_show(value)}")


def _text(value: str) -> str:
    """The string a value stands for: an override's text without enclosing quotes, else the text itself."""
    if isinstance(value, _Override) and len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        quoted = _read_text(value)
        if isinstance(quoted, str) and not isinstance(quoted, _Plain):
            return quoted
    return str(value)


def _is_null(value: Any) -> bool:
    """None, or an unquoted null word (an empty unquoted YAML value too; an empty override is the text '')."""
    if value is None:
        return True
    if isinstance(value, _Plain):
        return value.strip() in (*_NULL_WORDS, "")
    return isinstance(value, _Override) and value.strip() in _NULL_WORDS


def _plain(value: Any) -> Any:
    """`value` with text read as YAML would (null, booleans, decimal ints, floats), for untyped fields."""
    if isinstance(value, _Override):
        return _plain(_read_text(value))
    if isinstance(value, _Plain):
        return _plain_scalar(value.strip())
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _plain_scalar(text: str) -> Any:
    if text in (*_NULL_WORDS, ""):
        return None
    if text.lower() in _BOOL_WORDS:
        return _BOOL_WORDS[text.lower()]
    if _INT.fullmatch(text):
        return int(text)
    if _LEADING_ZERO.fullmatch(text):  # 0755: octal to YAML 1.1, decimal to 1.2; an error shows it as written
        return text
    number = _float_text(text)
    if number is not None and (re.search(r"[0-9]", text) or text.lower() in _YAML_SPECIAL_FLOATS):
        return number  # not Python's bare `inf`/`nan` words, which YAML reads as text
    return str(text)


def _show(value: Any) -> str:
    """How an error message quotes a value: as YAML would have read it."""
    return repr(_plain(value))


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
