"""The ``key=value`` command lines of igpt's tools (generate, chat, export, eval, plan, and the data tools).

One parser for all of them: :func:`parse` reads Hydra-style ``key=value`` arguments (a leading ``+`` is accepted)
against a spec of key -> :class:`Key` (type, default, help), converts each value to its key's type, and raises
:class:`igpt.errors.ConfigError` naming the key for an unknown key, a malformed argument, a bad value or a missing
required key. ``-h``/``--help`` prints every key with its type and default, then the tool's description, and exits 0.
:func:`spec_of` derives the spec of a function's keyword parameters (the data tools), and :func:`run` is the entry
point wrapper that prints an :class:`igpt.errors.IgptError` as one line and returns exit status 2.
"""

from __future__ import annotations

import inspect
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union, get_args, get_origin, get_type_hints

from igpt.errors import ConfigError, IgptError

REQUIRED: Any = ...  # the default of a key that must be given
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}
_NULL = {"null", "none", "~"}


@dataclass(frozen=True)
class Key:
    """One ``key=value`` argument: its type (``str``, ``int``, ``float``, ``bool``, or ``X | None``), default
    (:data:`REQUIRED` when it must be given) and a one-line help."""

    type: Any = str
    default: Any = REQUIRED
    help: str = ""


def as_spec(spec: dict[str, Any]) -> dict[str, Key]:
    """Accept ``Key`` values or ``(type, default)`` / ``(type, default, help)`` tuples."""
    return {k: v if isinstance(v, Key) else Key(*v) for k, v in spec.items()}


def spec_of(func: Callable[..., Any], required: Sequence[str] = (), skip: Sequence[str] = ("self",)) -> dict[str, Key]:
    """The spec of ``func``'s keyword parameters: type hints convert, defaults are the signature's; the names in
    ``required`` must be given."""
    hints = get_type_hints(func)
    out = {}
    for name, p in inspect.signature(func).parameters.items():
        if name in skip:
            continue
        default = REQUIRED if name in required or p.default is inspect.Parameter.empty else p.default
        out[name] = Key(hints.get(name, str), default)
    return out


def _type_name(hint: Any) -> str:
    if get_origin(hint) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def convert(key: str, value: str, hint: Any) -> Any:
    """``value`` (a command-line string) as ``hint``'s type; :class:`ConfigError` naming ``key`` otherwise."""
    if get_origin(hint) in (Union, types.UnionType):  # X | None, or str | Sequence[str]
        if value.lower() in _NULL:
            return None
        hint = next(a for a in get_args(hint) if a is not type(None))
    try:
        if hint is bool:
            if value.lower() in _TRUE:
                return True
            if value.lower() in _FALSE:
                return False
            raise ValueError
        if hint is int:
            return int(value.replace("_", ""))
        if hint is float:
            return float(value)
    except ValueError:
        raise ConfigError(f"{key}={value!r}: expected {_type_name(hint)}") from None
    return value


def usage(prog: str, spec: dict[str, Any], doc: str = "") -> str:
    """``--help``'s text: the command, every key with its type, default and help, then ``doc``."""
    spec = as_spec(spec)
    lines = [f"usage: python -m {prog} " + " ".join(
        f"{k}=<{k}>" if key.default is REQUIRED else f"[{k}=...]" for k, key in spec.items())]
    width = max((len(k) for k in spec), default=0)
    lines.append("")
    lines.append("keys:")
    for k, key in spec.items():
        default = "required" if key.default is REQUIRED else f"default {key.default!r}"
        text = f"  {k.ljust(width)}  {_type_name(key.type)}, {default}"
        lines.append(text + (f": {key.help}" if key.help else ""))
    doc = inspect.cleandoc(doc or "")
    return "\n".join(lines) + ("\n\n" + doc if doc else "")


def parse(argv: Sequence[str], spec: dict[str, Any], prog: str, doc: str = "") -> dict[str, Any]:
    """Parse ``key=value`` arguments against ``spec`` (see the module docstring). Returns every key of the spec,
    defaults filled in."""
    spec = as_spec(spec)
    out: dict[str, Any] = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(usage(prog, spec, doc))
            raise SystemExit(0)
        key, eq, value = arg.partition("=")
        key = key.lstrip("+")
        if not eq:
            raise ConfigError(f"argument {arg!r} is not key=value (see python -m {prog} --help)")
        if key not in spec:
            raise ConfigError(f"unknown key {key!r}; accepted keys: {', '.join(spec)}")
        out[key] = convert(key, value, spec[key].type)
    missing = [k for k, key in spec.items() if key.default is REQUIRED and k not in out]
    if missing:
        raise ConfigError(f"missing {', '.join(f'{k}=<value>' for k in missing)} (see python -m {prog} --help)")
    return {k: out.get(k, key.default) for k, key in spec.items()}


def wants_help(argv: Sequence[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def run(prog: str, main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)``; a user error (:class:`IgptError`) is printed as ``<prog>: error: <message>`` on one line
    and gives exit status 2. Anything else is a bug and keeps its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(argv) or 0
    except IgptError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
