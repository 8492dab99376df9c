"""Config sections as typed dataclasses, declared, checked and exposed one way: a section derives from
``Section``, its fields declared with ``field(default, help=, flags=, choices=, min=)``. Construction checks
each value against its type hint (``int`` refuses ``True`` and ``"4"``, ``float`` takes ints), choices and
lower bound, then ``_check()``: a mistake is a ``MegaGPTError`` keyed by the field. ``FlagSet`` adds one
argparse flag per field, its help ending with the YAML key and default; ``yaml=False`` fields are filled
by the program, ``cli=False`` ones get no flag.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import typing

from megagpt.errors import MegaGPTError

_MISSING = dataclasses.MISSING


def field(default=_MISSING, *, help: str, flags: tuple = (), choices: tuple | None = None, min=None,
          default_factory=_MISSING, default_text: str | None = None, yaml: bool = True, cli: bool = True):
    """A ``dataclasses.field`` carrying its documentation and checks in ``metadata``."""
    meta = {"help": help, "flags": tuple(flags), "choices": tuple(choices) if choices else None, "min": min,
            "default_text": default_text, "yaml": yaml, "cli": cli and yaml}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def _base_type(hint):
    """(the type, whether None is allowed) of ``int``, ``Optional[int]`` or ``int | None``."""
    args = typing.get_args(hint)
    if type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return hint, False


def _is(typ, value) -> bool:
    if isinstance(value, bool):   # a bool is an int to isinstance, never to a config
        return typ is bool
    return isinstance(value, (int, float) if typ is float else typ)


def check_value(name: str, value, hint, meta) -> None:
    """The one type / choices / lower-bound check; raises ``MegaGPTError(key=name)``."""
    typ, optional = _base_type(hint)
    if value is None and optional:
        return
    if not _is(typ, value):
        raise MegaGPTError(f"{name}={value!r} must be of type {typ.__name__}", key=name)
    choices = meta.get("choices")
    if choices and value not in choices:
        raise MegaGPTError(f"{name}={value!r} must be one of {', '.join(map(str, choices))}", key=name)
    low = meta.get("min")
    if low is not None and value < low:
        raise MegaGPTError(f"{name}={value!r} must be >= {low}", key=name)


class Section:
    """Mixin for a config dataclass: checked on construction, built from / written to a dict."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            check_value(f.name, getattr(self, f.name), hints[f.name], f.metadata)
        self._check()

    def _check(self) -> None:
        """Checks across fields; raise ``MegaGPTError(..., key=<field>)``."""

    @classmethod
    def keys(cls) -> list[str]:
        """The keys a config file may set (every field but the program-filled ones)."""
        return [f.name for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)]

    @classmethod
    def from_dict(cls, d: dict, **filled):
        """From a config-file section; ``filled`` sets ``yaml=False`` fields."""
        known = cls.keys()
        if not isinstance(d, dict):
            raise MegaGPTError(f"expected a mapping of {', '.join(known)}, got {d!r}")
        unknown = [k for k in d if k not in known]
        if unknown:
            raise MegaGPTError(f"unknown key(s) {', '.join(map(repr, unknown))}; known keys: {', '.join(known)}",
                               key=str(unknown[0]))
        return cls(**d, **filled)

    def to_dict(self) -> dict:
        return {k: copy.deepcopy(getattr(self, k)) for k in self.keys()}


# ---------------------------------------------------------------------------------- flags
def _default_of(f):
    if f.default is not _MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not _MISSING else None


def _yaml_text(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def flag_help(section: str, f) -> str:
    m = f.metadata
    text = m["help"] + (f"; one of {', '.join(map(str, m['choices']))}" if m.get("choices") else "")
    default = m.get("default_text") or _yaml_text(_default_of(f))
    return f"{text} [{section}.{f.name}, default {default}]".replace("%", "%%")


class Overrides(dict):
    """``{(section, key): value}`` from the command line; ``.flags`` holds each one's flag text
    (``"--seq-length 99"``) and ``.names`` every flag of every field, for error messages."""

    def __init__(self):
        super().__init__()
        self.flags, self.names = {}, {}


class FlagSet:
    """Command-line flags generated from config sections, one per field."""

    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser
        self._flags: dict = {}   # (section, key) -> its flag names

    def add(self, section: str, cls) -> None:
        group = self.parser.add_argument_group(f"{section} section of the config")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.metadata.get("cli", True):
                continue
            names = f.metadata.get("flags") or ("--" + f.name.replace("_", "-"),)
            typ, _ = _base_type(hints[f.name])
            kw = {"dest": f"{section}.{f.name}", "default": argparse.SUPPRESS, "help": flag_help(section, f)}
            if typ is bool:
                kw["action"] = argparse.BooleanOptionalAction
            elif typ is list:
                kw.update(nargs="+", metavar=f.name.upper())
            else:
                kw.update(type=typ, metavar=f.name.upper())
            group.add_argument(*names, **kw)
            self._flags[(section, f.name)] = names

    def parse(self, argv: list[str] | None = None) -> tuple[argparse.Namespace, Overrides]:
        argv = sys.argv[1:] if argv is None else list(argv)
        args = self.parser.parse_args(argv)
        return args, self.overrides(args, argv)

    def overrides(self, args: argparse.Namespace, argv: list[str]) -> Overrides:
        """The given flags only (every generated flag defaults to "not given")."""
        out = Overrides()
        for (section, key), names in self._flags.items():
            out.names[(section, key)] = names[0]
            if hasattr(args, f"{section}.{key}"):
                value = getattr(args, f"{section}.{key}")
                out[(section, key)] = value
                out.flags[(section, key)] = _flag_text(names, value, argv)
        return out


def _flag_text(names, value, argv) -> str:
    """How the user wrote it: the last of ``names`` (or ``--no-...``) in ``argv``, with the value."""
    spelled = list(names) + ["--no-" + n[2:] for n in names]
    used = next((f for f in reversed([tok.split("=", 1)[0] for tok in argv]) if f in spelled), names[0])
    if isinstance(value, bool):
        return used
    return f"{used} {' '.join(map(str, value)) if isinstance(value, list) else value}"
