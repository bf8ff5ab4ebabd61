"""Typed, frozen configs: YAML file + dotted command-line overrides.

Each stage declares one frozen dataclass (nested dataclasses for sections). ``load_config``
builds it from a YAML mapping, applies ``section.key=value`` overrides (values parsed as YAML, so
``3e-5``, ``true``, ``[1, 2]`` work), refuses unknown keys and wrong types with the dotted key
named, and then the dataclass's own ``__post_init__`` checks the values.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key."""


def _parse_scalar(text: str, key: str) -> Any:
    """``text`` read as YAML. Text that is no YAML, or whose YAML a constructor refuses (a 13th
    month, ``!!int x``, an integer of more than 4300 digits), stays the string as typed."""
    try:
        value = yaml.safe_load(text)
        cyclic = _cyclic(value)
    except (yaml.YAMLError, ValueError, KeyError):  # KeyError: "!!bool maybe" (no such boolean)
        return text
    except RecursionError:
        raise ConfigError(f"override {key!r}: the value is nested too deeply") from None
    if cyclic:
        # "&a [*a]": an alias inside its own anchor; no config can hold (or save) such a value.
        raise ConfigError(f"override {key!r}: the value contains itself (a YAML alias inside its "
                          "own anchor)")
    return value


def _cyclic(value: Any) -> bool:
    """Whether the lists and mappings of ``value`` contain themselves (each one walked once)."""
    done: set[int] = set()

    def walk(node: Any, inside: set[int]) -> bool:
        if not isinstance(node, (dict, list)) or id(node) in done:
            return False
        if id(node) in inside:
            return True
        inside.add(id(node))
        if any(walk(v, inside) for v in (node.values() if isinstance(node, dict) else node)):
            return True
        inside.discard(id(node))
        done.add(id(node))
        return False

    return walk(value, set())


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of ``data`` with each ``a.b.c=value`` override set."""
    data = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = _parse_scalar(raw, key)
    return data


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


_BOOL_WORDS = {False: {"no", "off", "n", "false"}, True: {"yes", "on", "y", "true"}}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it (ints widen to float)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arm, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"config key {key!r}: {_show(value)} does not match {_name(tp)}")
    if origin is Literal:
        if isinstance(value, bool):
            # YAML 1.1 reads no/off/yes/on as booleans: "mixed_precision: no" means the option.
            spelled = [o for o in get_args(tp) if isinstance(o, str) and o.lower() in _BOOL_WORDS[value]]
            value = spelled[0] if len(spelled) == 1 else value
        if value not in get_args(tp):
            raise ConfigError(f"config key {key!r}: {_show(value)} is not one of {list(get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a section (mapping), got {_show(value)}")
        return build(tp, value, prefix=key + ".")
    if origin in (list, tuple) or tp in (list, tuple):
        origin = origin or tp
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected a list, got {_show(value)}")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:   # a bare ``dict`` (few-shot examples) holds anything
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {_show(value)}")
        key_tp, value_tp = get_args(tp) or (Any, Any)
        out = {}
        for k, v in value.items():
            sub = f"{key}.{k if isinstance(k, str) else _show(k)}"
            out[_coerce(k, key_tp, sub)] = _coerce(v, value_tp, sub)
        return out
    if tp is float:
        return _float(value, key)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r}: expected an integer, got {_show(value)}")
        # Every integer setting is a count, a size, a step or a seed: all fit in 64 bits, and
        # torch and numpy refuse more (a traceback mid-run instead of this line now).
        if not -2**63 <= value < 2**63:
            raise ConfigError(f"config key {key!r}: {_show(value)} is out of range (a 64-bit integer)")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected true or false, got {_show(value)}")
        return value
    if tp is str:
        if not isinstance(value, str):
            if isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)
                                            and -2**63 <= value < 2**63):
                return str(value)
            raise ConfigError(f"config key {key!r}: expected a string, got {_show(value)}")
        return value
    raise ConfigError(f"config key {key!r}: unsupported annotation {tp!r}")


def _show(value: Any) -> str:
    """``value`` for a one-line message: its repr, shortened; an integer too long to print (more
    than 4300 digits) by its size."""
    try:
        text = repr(value)
    except ValueError:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    return text if len(text) <= 80 else text[:60] + f"... ({len(text)} characters)"


def _float(value: Any, key: str) -> float:
    """A float setting: any number or numeric string; NaN, bools and huge integers are refused."""
    if isinstance(value, str):
        # YAML 1.1 reads "3e-5" (no dot) as a string; accept any numeric literal.
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config key {key!r}: expected a number, got {_show(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise ConfigError(f"config key {key!r}: {_show(value)} is too large for a number") from None
    if number != number:   # NaN passes every range check written as a comparison
        raise ConfigError(f"config key {key!r}: expected a number, got NaN")
    return number


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _stage_default(f: dataclasses.Field) -> dict:
    """The section's default as the stage declares it; {} when it is not valid on its own
    (a section with required keys, such as ``data.train``)."""
    try:
        return dataclasses.asdict(f.default_factory())
    except (ValueError, TypeError):
        return {}


def build(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    # YAML mapping keys need not be strings ("optim={1: 2}"): sorted and named by their text.
    unknown = sorted((k for k in data if k not in fields), key=str)
    if unknown:
        raise ConfigError(f"unknown config key {prefix + str(unknown[0])!r} "
                          f"(known in this section: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if name in data:
            value = data[name]
            if (isinstance(value, dict) and dataclasses.is_dataclass(hints[name])
                    and f.default_factory is not dataclasses.MISSING):
                # A partly given section keeps the stage's own defaults for the other keys
                # (e.g. PPO's constant schedule when only optim.lr is set).
                value = {**_stage_default(f), **value}
            kwargs[name] = _coerce(value, hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = build(hints[name], {}, prefix=key + ".")
            else:
                raise ConfigError(f"config key {key!r} is required")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"config section {prefix.rstrip('.') or cls.__name__!r}: {exc}") from exc


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None,
                section: str | None = None) -> Any:
    """Load ``cls`` from YAML ``path`` (optionally one top-level ``section`` of it) + overrides."""
    data: dict = {}
    if path is not None:
        loaded = load_yaml(path)
        data = loaded.get(section, {}) if section else loaded
    return build(cls, apply_overrides(data, overrides or []))


def load_yaml(path: str | Path, what: str = "config file") -> dict:
    """The mapping at the top of the YAML file ``path`` (empty file: ``{}``); a missing file,
    invalid YAML or another top level is a :class:`ConfigError` that names the file."""
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a directory, not a YAML file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path}: not UTF-8 text (byte {exc.start}): is it a YAML "
                          "file?") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot be read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path}: invalid YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what} {path}: the top level must be a mapping")
    return loaded


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def require(cond: bool, message: str) -> None:
    """Validation helper for ``__post_init__``: raise ``ConfigError(message)`` unless ``cond``."""
    if not cond:
        raise ConfigError(message)
