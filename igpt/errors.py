"""igpt's user errors: a problem with what the user gave (a config key, a data file or shard, a checkpoint).

Every command-line entry point (train, prepare, tokenizer, generate, chat, export, eval, lm_eval, plan, report) catches
:class:`IgptError` and prints its message as one line, ``<prog>: error: <message>``, exiting with status 2. The
message names what is wrong (the key, file and line, shard or checkpoint) and what was expected. Anything else is a
bug and keeps its traceback.

The subclasses also derive from the built-in exception that code catching the old errors expects (``ValueError`` for
a config or data value, ``FileNotFoundError`` for a missing path), so they can replace those without breaking callers.
"""

from __future__ import annotations


class IgptError(Exception):
    """A user error: printed as one line by the command-line entry points, without a traceback."""


class ConfigError(IgptError, ValueError):
    """A config key or command-line argument has a wrong or inconsistent value (the message names the key)."""


class DataError(IgptError, ValueError):
    """An input file, record or prepared shard is malformed (the message names the file and line, or the shard)."""


class CheckpointError(IgptError, ValueError):
    """A checkpoint is missing, incomplete, corrupt, unsafe to load or does not match the run."""


class MissingPathError(IgptError, FileNotFoundError):
    """A path the user named does not exist."""


class DivergedError(IgptError, FloatingPointError):
    """Training stopped: too many non-finite losses in a row (``trainer.max_bad_steps``)."""


class MissingExtraError(IgptError, ImportError):
    """A feature needs an optional dependency that is not installed (the message names the pip extra)."""


def require(module: str, extra: str, feature: str):
    """Import ``module`` for ``feature``; :class:`MissingExtraError` naming the pip extra that installs it otherwise."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(
            f"{feature} needs the package {module.split('.')[0]!r}, which is not installed ({e}); "
            f"install it with: pip install 'igpt[{extra}]'"
        ) from None
