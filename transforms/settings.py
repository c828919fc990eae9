"""Options declared once: each is a field of a config dataclass whose metadata carries its help, how its value
is read from the command line, and how it is checked.

One declaration feeds everything that names the option: the command line (:func:`add_arguments`, in
:mod:`pipeline.options`), the config objects (their ``__post_init__`` calls :func:`check`), the keywords of
:class:`transforms.stage.ScoreLPIPS` (:func:`parameters`: its signature is made from the configs' fields) and
the reading of a parsed command line back into configs (:func:`from_values`). Adding an option is one field
(:func:`option`) plus its use.

A :class:`Rule` says what values an option takes: it parses command-line text and checks any value (a keyword
given in Python, a config built by hand), with one message for both.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence


@dataclass(frozen=True)
class Rule:
    """The values an option takes: ``parse`` turns command-line text into a value (``ValueError`` when it
    cannot), ``problem`` says what is wrong with a value (``None`` when nothing is), ``choices`` lists the
    allowed values where there is a short list."""

    parse: Callable[[str], Any] = str
    problem: Callable[[Any], Optional[str]] = lambda value: None
    choices: Optional[tuple[Any, ...]] = None


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def count(minimum: int = 0) -> Rule:
    """A whole number >= ``minimum``."""
    return Rule(int, lambda value: None if _is_int(value) and value >= minimum
                else f"must be a whole number >= {minimum}, got {value!r}")


def seconds() -> Rule:
    """A finite number >= 0."""
    def problem(value: Any) -> Optional[str]:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
        return None if ok else f"must be a finite number >= 0, got {value!r}"

    return Rule(float, problem)


def fraction() -> Rule:
    """A number between 0 and 1."""
    def problem(value: Any) -> Optional[str]:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 <= value <= 1
        return None if ok else f"must be between 0 and 1, got {value!r}"

    return Rule(float, problem)


def finite(optional: bool = True) -> Rule:
    """A finite number (or ``None`` when ``optional``)."""
    def problem(value: Any) -> Optional[str]:
        if value is None and optional:
            return None
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else f"must be a finite number, got {value!r}"

    return Rule(float, problem)


def one_of(choices: Sequence[Any], optional: bool = False) -> Rule:
    """One of ``choices`` (or ``None`` when ``optional``)."""
    allowed = tuple(choices)
    return Rule(str, lambda value: None if value in allowed or (optional and value is None)
                else f"must be one of {allowed}, got {value!r}", allowed)


def text(optional: bool = True) -> Rule:
    """A string (a column name, a path); ``None`` allowed when ``optional``."""
    return Rule(str, lambda value: None if isinstance(value, str) or (optional and value is None)
                else f"must be a string, got {value!r}")


def whole() -> Rule:
    """Any whole number (a seed)."""
    return Rule(int, lambda value: None if _is_int(value) else f"must be a whole number, got {value!r}")


def switch() -> Rule:
    """On or off (a flag on the command line)."""
    return Rule(bool, lambda value: None if isinstance(value, bool) else f"must be True or False, got {value!r}")


def auto_or_count(minimum: int = 0) -> Rule:
    """``auto`` (``None``: decided where it runs) or a whole number >= ``minimum``."""
    def parse(text_value: str) -> Optional[int]:
        return None if text_value.strip().lower() == "auto" else int(text_value)

    return Rule(parse, lambda value: None if value is None or (_is_int(value) and value >= minimum)
                else f"must be auto or a whole number >= {minimum}, got {value!r}")


def option(default: Any, help: str, rule: Optional[Rule] = None, *, cli: bool = True,  # noqa: A002
           metavar: Optional[str] = None, aliases: Sequence[str] = ()) -> Any:
    """A config field that is an option: its default, its help (the command line's), its :class:`Rule`
    (default: a string or ``None``). ``cli=False``: a keyword of the Python API only; ``aliases``: more
    command-line spellings (``--group_column``)."""
    return dataclasses.field(default=default, metadata={"help": help, "rule": rule or text(), "cli": cli,
                                                        "metavar": metavar, "aliases": tuple(aliases)})


def options_of(config: Any) -> list[dataclasses.Field]:
    """The option fields of a config class or object (those declared with :func:`option`)."""
    return [field for field in dataclasses.fields(config) if "rule" in field.metadata]


def problem(field: dataclasses.Field, value: Any) -> Optional[str]:
    """What is wrong with ``value`` for ``field`` (``None``: nothing)."""
    return field.metadata["rule"].problem(value)


def check(config: Any) -> None:
    """Raise ``ValueError`` (``"<name> must be ..."``) for the first option of ``config`` whose value its rule
    refuses. Configs call it from ``__post_init__``."""
    for field in options_of(config):
        found = problem(field, getattr(config, field.name))
        if found:
            raise ValueError(f"{field.name} {found}")


def _argparse_type(field: dataclasses.Field) -> Callable[[str], Any]:
    rule: Rule = field.metadata["rule"]

    def read(text_value: str) -> Any:
        try:
            value = rule.parse(text_value)
        except (TypeError, ValueError):
            value = text_value
        found = rule.problem(value)
        if found:
            raise argparse.ArgumentTypeError(found)
        return value

    read.__name__ = field.name  # argparse names the type in its messages
    return read


def add_arguments(group: Any, *configs: type, only: Optional[Sequence[str]] = None, aliases: bool = False,
                  helped: Optional[Callable[[dataclasses.Field], str]] = None) -> None:
    """``--<name>`` on ``group`` (an argparse parser or group) for every command-line option of ``configs``
    (or the ``only`` ones): type, default, choices and help from the declaration; with ``aliases``, their
    other spellings too; ``helped(field)``, when given, writes each help text (e.g. with its default)."""
    for config in configs:
        for field in options_of(config):
            if not field.metadata["cli"] or (only is not None and field.name not in only):
                continue
            flags = (f"--{field.name}", *(field.metadata["aliases"] if aliases else ()))
            common = {"dest": field.name, "default": field.default,
                      "help": helped(field).replace("%", "%%") if helped else field.metadata["help"]}
            rule: Rule = field.metadata["rule"]
            if rule.parse is bool:
                group.add_argument(*flags, action="store_true", **common)
            elif rule.choices:  # argparse checks the choices itself ("invalid choice: ...")
                group.add_argument(*flags, choices=rule.choices, metavar=field.metadata["metavar"], **common)
            else:
                group.add_argument(*flags, type=_argparse_type(field), metavar=field.metadata["metavar"], **common)


def from_values(config: type, values: Any) -> Any:
    """``config`` built from an object (a parsed command line, Beam's options view) or a mapping holding a
    value for each of its options."""
    get = values.get if isinstance(values, Mapping) else (lambda name, default: getattr(values, name, default))
    return config(**{field.name: get(field.name, field.default) for field in options_of(config)})


def values_of(*configs: Any) -> dict[str, Any]:
    """``{name: value}`` of every option of the config objects ``configs``."""
    return {field.name: getattr(config, field.name) for config in configs for field in options_of(config)}


def parameters(configs: Iterable[type], positional: Sequence[str] = ()) -> list[inspect.Parameter]:
    """Keyword parameters (``positional`` first, in that order, positional-or-keyword; the rest keyword-only)
    for every option of ``configs``: what a function taking those options as keywords accepts."""
    found = {field.name: field for config in configs for field in options_of(config)}
    ordered = [*positional, *(name for name in found if name not in positional)]
    return [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD if name in positional
                              else inspect.Parameter.KEYWORD_ONLY, default=found[name].default,
                              annotation=found[name].type)
            for name in ordered]


def bind(signature: inspect.Signature, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The values of ``signature``'s parameters for a call ``(*args, **kwargs)`` (defaults filled in); a
    ``TypeError`` for an unknown keyword or too many positional arguments, as a plain function would."""
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)
