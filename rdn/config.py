"""Typed, frozen, versioned configs: the one way settings are declared, checked, saved and compared.

A config is a frozen dataclass deriving from :class:`Config`. Each field is declared with
:func:`setting`, which carries the help text (and choices) the command line shows, so a CLI is
generated from the config (:func:`add_config_arguments`, :func:`config_from_arguments`) instead of
declaring its options a second time.

Serialised form (JSON-compatible)::

    {"kind": "<Config class name>", "version": N, <field>: <value>, ...}

``version`` is the class's :attr:`Config.VERSION`; an older file is brought up to date by the
class's :attr:`Config.MIGRATIONS` (one function per step, ``v -> v + 1``) before it is checked, so
a field added later gets its value in one place. Whether a run can resume is a comparison of two
configs: :meth:`Config.differences` names the fields that differ.

Example::

    @dataclass(frozen=True)
    class MyConfig(Config):
        VERSION: ClassVar[int] = 2
        MIGRATIONS: ClassVar[dict] = {1: lambda values: {**values, "depth": 3}}

        width: int = setting(8, "channels of the first layer")
        depth: int = setting(3, "number of blocks")
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeVar

__all__ = [
    "Config",
    "ConfigError",
    "add_config_arguments",
    "config_from_arguments",
    "setting",
]

ConfigType = TypeVar("ConfigType", bound="Config")


class ConfigError(ValueError):
    """A config that cannot be built or read: unknown or missing fields, a bad value, a version from the future."""


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    choices: Iterable[Any] | None = None,
    cli: bool = True,
    flag: str | None = None,
) -> Any:
    """A config field: its default, the help the CLI shows, optional choices.

    Args:
        default: the default value (immutable: tuples, not lists).
        help: one line for ``--help``; the CLI appends the real default.
        choices: the allowed values (checked by the CLI and by :meth:`Config.validate_choices`).
        cli: whether the generated command line offers this field.
        flag: the option's name when not ``--field-name``.
    """
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None, "cli": cli, "flag": flag}
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Config:
    """Base of every config: (de)serialisation with a version, migrations, comparison, replacement."""

    VERSION: ClassVar[int] = 1
    # MIGRATIONS[v] turns the values of a version-v dict (without "kind"/"version") into version v + 1's.
    MIGRATIONS: ClassVar[dict[int, Callable[[dict[str, Any]], dict[str, Any]]]] = {}

    def __post_init__(self) -> None:
        self.validate_choices()

    def validate_choices(self) -> None:
        """Every field declared with ``choices`` holds one of them."""
        for item in fields(self):
            choices = item.metadata.get("choices")
            if choices is not None and getattr(self, item.name) not in choices:
                raise ConfigError(f"{item.name} must be one of {list(choices)}, got {getattr(self, item.name)!r}")

    # -- serialisation ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """``{"kind", "version", fields...}`` with tuples as lists and nested configs as dicts (JSON-ready)."""
        values = {item.name: _plain(getattr(self, item.name)) for item in fields(self)}
        return {"kind": type(self).__name__, "version": self.VERSION, **values}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls: type[ConfigType], data: dict[str, Any]) -> ConfigType:
        """Read what :meth:`to_dict` wrote (any earlier version), migrating and checking it."""
        if not isinstance(data, dict):
            raise ConfigError(f"a {cls.__name__} must be read from a dict, got {type(data).__name__}")
        kind = data.get("kind", cls.__name__)
        if kind != cls.__name__:
            raise ConfigError(f"expected a {cls.__name__}, got a {kind}")
        version = data.get("version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= cls.VERSION:
            raise ConfigError(
                f"{cls.__name__} version {version!r} cannot be read by this rdn (versions 1..{cls.VERSION})"
            )
        values = {key: value for key, value in data.items() if key not in ("kind", "version")}
        for step in range(version, cls.VERSION):
            values = cls.MIGRATIONS[step](dict(values))
        known = {item.name: item for item in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
        converted = {name: _typed(value, _field_type(cls, name)) for name, value in values.items()}
        try:
            return cls(**converted)
        except TypeError as error:  # a required field is missing
            raise ConfigError(f"cannot build {cls.__name__}: {error}") from error

    @classmethod
    def from_json(cls: type[ConfigType], text: str) -> ConfigType:
        return cls.from_dict(json.loads(text))

    # -- comparison -------------------------------------------------------------------------

    def differences(self, other: Config, ignore: Iterable[str] = ()) -> list[str]:
        """The names of the fields whose values differ between ``self`` and ``other`` (same class)."""
        if type(other) is not type(self):
            raise ConfigError(f"cannot compare a {type(self).__name__} with a {type(other).__name__}")
        skipped = set(ignore)
        return [
            item.name
            for item in fields(self)
            if item.name not in skipped and getattr(self, item.name) != getattr(other, item.name)
        ]

    def describe_differences(self, other: Config, ignore: Iterable[str] = ()) -> str:
        """``"name: other's -> self's, ..."`` for every differing field (for error messages)."""
        return ", ".join(
            f"{name}: {getattr(other, name)!r} -> {getattr(self, name)!r}" for name in self.differences(other, ignore)
        )

    def replace(self: ConfigType, **changes: Any) -> ConfigType:
        """A copy with ``changes`` applied (and checked)."""
        return dataclasses.replace(self, **changes)


def _plain(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _typed(value: Any, hint: Any) -> Any:
    """JSON's lists back into the tuples (and nested configs) the field's type hint declares."""
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return _typed(value, options[0]) if len(options) == 1 else value
    if isinstance(hint, type) and issubclass(hint, Config) and isinstance(value, dict):
        return hint.from_dict(value)
    if origin is tuple and isinstance(value, (list, tuple)):
        args = typing.get_args(hint)
        inner = args[0] if args else Any
        return tuple(_typed(item, inner) for item in value)
    return value


# ----------------------------------------------------------------------------------------------
# Command line generated from configs
# ----------------------------------------------------------------------------------------------


def _option(item: dataclasses.Field) -> str:
    return item.metadata.get("flag") or "--" + item.name.replace("_", "-")


def _scalar_type(hint: Any) -> tuple[Any, bool, bool]:
    """(element type, optional, sequence) of a field's type hint."""
    optional = False
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
        origin = typing.get_origin(hint)
    if origin is tuple:
        return typing.get_args(hint)[0], optional, True
    return hint, optional, False


def add_config_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    config_class: type[Config],
    *,
    exclude: Iterable[str] = (),
    defaults: dict[str, Any] | None = None,
) -> None:
    """One option per CLI field of ``config_class`` (``--field-name``), help showing the real default.

    ``defaults`` overrides the class's defaults for this command. Booleans become
    ``--name / --no-name``; ``None`` defaults are shown as "not set"; tuples take several values.
    Options are declared with ``default=argparse.SUPPRESS`` so that :func:`config_from_arguments`
    knows which ones the user gave.
    """
    skipped = set(exclude)
    hints = typing.get_type_hints(config_class)
    overrides = defaults or {}
    for item in fields(config_class):
        if item.name in skipped or not item.metadata.get("cli", True):
            continue
        default = overrides.get(item.name, item.default)
        element, optional, sequence = _scalar_type(hints[item.name])
        shown = "not set" if default is None else (list(default) if isinstance(default, tuple) else default)
        help_text = f"{item.metadata.get('help', '')} (default: {shown})".strip()
        kwargs: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS, "dest": item.name}
        if element is bool and not sequence:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = element if element in (int, float, str) else str
            kwargs["metavar"] = item.name.upper() if item.metadata.get("choices") is None else None
            if item.metadata.get("choices") is not None:
                kwargs["choices"] = item.metadata["choices"]
            if sequence:
                kwargs["nargs"] = "+"
        parser.add_argument(_option(item), **{key: value for key, value in kwargs.items() if value is not None})


def config_from_arguments(
    config_class: type[ConfigType],
    arguments: argparse.Namespace,
    *,
    defaults: dict[str, Any] | None = None,
    **fixed: Any,
) -> ConfigType:
    """The config the parsed ``arguments`` describe: given options over ``defaults`` over the class's.

    ``fixed`` sets fields the command decides itself (they win over everything).
    """
    values = dict(defaults or {})
    names = {item.name for item in fields(config_class)}
    for name in names:
        if hasattr(arguments, name):
            value = getattr(arguments, name)
            values[name] = tuple(value) if isinstance(value, list) else value
    values.update(fixed)
    try:
        return config_class(**{key: value for key, value in values.items() if key in names})
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from error
