"""Options as dataclass fields: one definition read by argparse, YAML and Python.

A field made with :func:`opt` carries its default, help text, command-line flag and :class:`Rule`.
:func:`add_fields` turns the fields of a dataclass into argparse options (the default and rule shown in
the help, the default itself left to the dataclass), :func:`from_mapping` builds the dataclass from
nested YAML/command-line values (an unknown key is an error naming it) and :func:`check_fields`
enforces types, rules and choices. No torch import: command lines parse instantly.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class EvalConfigError(ValueError):
    """A bad evaluation option or config key; the message names it and says how to fix it."""


# --------------------------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class Rule:
    """A constraint on a value (each element of a tuple), stated as text in ``--help`` and in errors."""

    text: str
    ok: Callable[[Any], bool]


def at_least(n: float) -> Rule:
    return Rule(f">= {n:g}", lambda v: v >= n)


def positive() -> Rule:
    return Rule("> 0", lambda v: v > 0)


def fraction() -> Rule:
    return Rule("in (0, 1)", lambda v: 0 < v < 1)


def momentum() -> Rule:
    return Rule("in [0, 1)", lambda v: 0 <= v < 1)


def opt(default: Any, help: str, *, flag: str | None = None, cli: bool = True, choices: Sequence[str] | None = None,
        metavar: str | None = None, default_text: str | None = None, rule: Rule | None = None,
        none_words: Sequence[str] = ()) -> Any:
    """A dataclass field carrying its CLI/YAML metadata (``default`` may be a dataclass or ``dict``).

    ``none_words``: strings that mean ``None`` for this field (``--widths all``, ``tasks: auto``).
    """
    meta = {"help": help, "flag": flag, "cli": cli, "choices": tuple(choices) if choices else None,
            "metavar": metavar, "default_text": default_text, "rule": rule, "none_words": tuple(none_words)}
    if isinstance(default, type):  # a nested dataclass or a dict: a fresh instance per config
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------- values
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True  # noqa: UP007
    return tp, False


def _describe(tp: Any) -> str:
    base, _ = _strip_optional(tp)
    if typing.get_origin(base) is tuple:
        return f"a list of {_describe(typing.get_args(base)[0])}s"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping"}.get(
        base, str(base))


def coerce(value: Any, tp: Any, key: str, none_words: Sequence[str] = ()) -> Any:
    """``value`` (from YAML or the command line) as type ``tp``; EvalConfigError naming ``key`` if impossible.

    Lists become tuples; a comma-separated string is accepted wherever a list is expected; a string
    of ``none_words`` means None.
    """
    base, optional = _strip_optional(tp)
    if optional and isinstance(value, str) and value.strip().lower() in none_words:
        return None
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null") and base is not str):
        if optional:
            return None
        raise EvalConfigError(f"{key} must be {_describe(tp)}, got {value!r}")
    if typing.get_origin(base) is tuple:
        item = typing.get_args(base)[0]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            value = [value]
        return tuple(coerce(v, item, key) for v in value)
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.strip().lower() in ("true", "yes", "1")
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            return int(value)
    elif base is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif base is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
    elif base is dict:
        if isinstance(value, Mapping):
            return dict(value)
    raise EvalConfigError(f"{key} must be {_describe(tp)}, got {value!r}")


def _is_dataclass_type(tp: Any) -> bool:
    base, _ = _strip_optional(tp)
    return isinstance(base, type) and dataclasses.is_dataclass(base)


def from_mapping(cls: type, data: Mapping[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a (nested) mapping; unknown keys and wrong types are errors naming them."""
    if not isinstance(data, Mapping):
        raise EvalConfigError(f"{where or 'the eval config'} must be a mapping of keys, got {data!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = f"{where}.{unknown[0]}" if where else str(unknown[0])
        raise EvalConfigError(f"unknown key {key!r}; valid keys{' of ' + where if where else ''}: "
                              f"{', '.join(names)}")
    hints = _hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        tp = hints[name]
        if _is_dataclass_type(tp):
            base, optional = _strip_optional(tp)
            kwargs[name] = None if value is None and optional else from_mapping(base, value or {}, key)
        else:
            field_ = next(f for f in dataclasses.fields(cls) if f.name == name)
            kwargs[name] = coerce(value, tp, key, field_.metadata.get("none_words", ()))
    return cls(**kwargs)


def to_mapping(obj: Any) -> Any:
    """A dataclass config as plain nested dicts/lists (for YAML/JSON next to the report)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_mapping(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_mapping(v) for k, v in obj.items()}
    return obj


def check_fields(obj: Any, where: str = "") -> Any:
    """Coerce and check every field of dataclass ``obj`` against its type, rule and choices (in place)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        key = f"{where}.{f.name}" if where else f.name
        value = getattr(obj, f.name)
        if value is None:
            continue
        if dataclasses.is_dataclass(value):
            check_fields(value, key)
            continue
        # Python callers may pass lists, or strings like "all"
        value = coerce(value, hints[f.name], key, f.metadata.get("none_words", ()))
        if value is None:
            setattr(obj, f.name, value)
            continue
        setattr(obj, f.name, value)
        items = value if isinstance(value, tuple) else (value,)
        if isinstance(value, tuple) and not value:
            raise EvalConfigError(f"{key} is empty; give at least one value")
        rule: Rule | None = f.metadata.get("rule")
        choices = f.metadata.get("choices")
        for v in items:
            if rule is not None and not rule.ok(v):
                raise EvalConfigError(f"{key} must be {rule.text}, got {v!r}")
            if choices and v not in choices:
                raise EvalConfigError(f"{key}: {v!r} is not one of {', '.join(choices)}")
    return obj


def deep_merge(base: dict, extra: Mapping) -> dict:
    """``extra`` merged into ``base`` key by key (free-form ``model_args`` mappings are replaced whole)."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) and k not in ("model_args",):
            out[k] = deep_merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


# --------------------------------------------------------------------------------------------- argparse
class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (``prog: error: …; see --help``), exit code 2, no usage dump."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.HelpFormatter):
    """Wraps each line of the description and epilog on its own (their line breaks are kept)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=110)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        return "\n".join(textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
                         if line.strip() else "" for line in text.splitlines())


def _format_default(f: dataclasses.Field, tp: Any) -> str:
    if f.metadata.get("default_text"):
        return f.metadata["default_text"]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default)
    if isinstance(default, float):
        return f"{default:g}"
    return str(default)


def field_help(f: dataclasses.Field, tp: Any) -> str:
    """Help text of a field: what it is, its rule and its default."""
    text = f.metadata["help"]
    rule: Rule | None = f.metadata.get("rule")
    if rule is not None:
        base, _ = _strip_optional(tp)
        each = "each " if typing.get_origin(base) is tuple else ""
        text += f"; {each}{rule.text}"
    if f.metadata.get("choices") and typing.get_origin(_strip_optional(tp)[0]) is tuple:
        text += f"; comma-separated, from {', '.join(f.metadata['choices'])}"
    return f"{text} (default: {_format_default(f, tp)})"


def _key_values(text: str) -> tuple[str, Any]:
    if "=" not in text or not text.split("=", 1)[0].strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r} (e.g. --model-arg depth=2)")
    key, value = text.split("=", 1)
    return key.strip(), _scalar(value.strip())


def _scalar(text: str) -> Any:
    """``"2"`` → 2, ``"0.5"`` → 0.5, ``"true"`` → True, ``"none"`` → None, else the text."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    low = text.lower()
    return {"true": True, "false": False, "none": None, "null": None}.get(low, text)


class _KeyValueAction(argparse.Action):
    """``--model-arg depth=2 --model-arg embed_dim=64`` → ``{"depth": 2, "embed_dim": 64}``."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        current = dict(getattr(namespace, self.dest, None) or {})
        key, value = values
        current[key] = value
        setattr(namespace, self.dest, current)


def add_fields(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, prefix: str = "",
               only: Sequence[str] | None = None, required: Sequence[str] = ()) -> None:
    """One option per CLI field of dataclass ``cls``; ``dest`` is the field's dotted config key.

    Defaults are not set on the parser (``SUPPRESS``): an option the user did not give keeps the
    dataclass default, so each default exists in exactly one place.
    """
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True) or (only is not None and f.name not in only):
            continue
        tp = hints[f.name]
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        dest = prefix + f.name
        kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS,
                                  "help": field_help(f, tp).replace("%", "%%")}
        base, _ = _strip_optional(tp)
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif base is dict:
            kwargs.update(action=_KeyValueAction, type=_key_values, metavar=f.metadata.get("metavar") or "KEY=VALUE")
        else:
            kwargs["type"] = _cli_type(tp, flag, f.metadata.get("none_words", ()))
            choices = f.metadata.get("choices")
            if choices and typing.get_origin(base) is not tuple:
                kwargs["choices"] = choices
            listed = ("," if typing.get_origin(base) is tuple else "|").join(choices or ())
            kwargs["metavar"] = f.metadata.get("metavar") or listed or _metavar(base)
        if f.name in required:
            kwargs["required"] = True
            kwargs["help"] = kwargs["help"].rsplit(" (default:", 1)[0] + " (required)"
        parser.add_argument(flag, **kwargs)


def _metavar(base: Any) -> str:
    if typing.get_origin(base) is tuple:
        return "A,B,..."
    return {int: "N", float: "X", str: "TEXT"}.get(base, "VALUE")


def _cli_type(tp: Any, flag: str, none_words: Sequence[str] = ()) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return coerce(text, tp, "value", none_words)
        except EvalConfigError as exc:  # argparse prefixes "argument --flag: "
            raise argparse.ArgumentTypeError(str(exc).replace("value must be", "must be")) from None

    return convert


def add_debug_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", default=False,
                        help="show the full Python traceback of an error (default: one-line message)")


def namespace_to_mapping(ns: argparse.Namespace) -> dict:
    """Dotted ``dest`` names of an argparse namespace → nested dict (``debug`` dropped)."""
    out: dict = {}
    for dest, value in vars(ns).items():
        if dest == "debug":
            continue
        node = out
        *parents, leaf = dest.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Config key (an option's ``dest``) → its command-line flag, e.g. ``"knn.ks"`` → ``"--ks"``."""
    return {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings and a.dest != "help"}


def in_cli_terms(exc: EvalConfigError, flags: Mapping[str, str]) -> EvalConfigError:
    """The error with config keys replaced by the flags a command-line user typed."""
    text = str(exc)
    for key in sorted(flags, key=len, reverse=True):
        text = re.sub(rf"(?<![\w.-]){re.escape(key)}(?![\w])", flags[key], text)
    return EvalConfigError(text)


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    """``--debug`` anywhere on the command line (checked before parsing, so parse-time errors see it)."""
    return "--debug" in (sys.argv[1:] if argv is None else argv)
