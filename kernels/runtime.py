"""Where igpt's Triton kernels can run, and the launch settings shared by every kernel file.

Triton decides at decoration time (when a kernel module is imported) whether ``@triton.jit`` functions are compiled
for the GPU or run by the CPU interpreter (``TRITON_INTERPRET=1``, see ``triton/runtime/interpreter.py``). This
module answers the questions the kernel launchers and the model's backend selection ask:

- :func:`triton_available`: can the kernels run at all here (CUDA present, or the interpreter switched on)?
- :func:`check_device`: raise :class:`KernelUnavailableError`, naming the reason, before a launch that cannot work.
- :func:`use_autotune`: several ``@triton.autotune`` configs only when compiled for CUDA (the interpreter has no
  CPU ``do_bench``, and one config keeps it fast); ``IGPT_KERNELS_AUTOTUNE=0`` (read at each new launch shape) pins
  the first config that fits (used by the GPU test run so that every new shape does not pay for a tuning sweep).
"""

from __future__ import annotations

import os

import torch

try:
    import triton

    _TRITON_IMPORT_ERROR = ""
except ImportError as exc:  # pragma: no cover - triton is an install requirement
    triton = None
    _TRITON_IMPORT_ERROR = f"cannot import triton ({exc})"


_KERNELS: list[object] = []  # one representative kernel per kernel module, to see how they were built


def register_kernel(fn: object) -> object:
    """Record a kernel so :func:`triton_available` can tell whether it was built for the interpreter."""
    _KERNELS.append(fn)
    return fn


class KernelUnavailableError(RuntimeError):
    """Raised when a Triton kernel is asked to run where it cannot (no CUDA and no interpreter, wrong device)."""


def interpret_requested() -> bool:
    """True when ``TRITON_INTERPRET`` is set to a true value in the environment (read at call time)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def is_interpreted(fn: object) -> bool:
    """True when ``fn`` (a ``@triton.jit`` or ``@triton.autotune`` object) was built for the CPU interpreter."""
    while hasattr(fn, "fn") and type(fn).__name__ in ("Autotuner", "Heuristics"):
        fn = fn.fn
    return type(fn).__name__ == "InterpretedFunction"


def triton_available() -> tuple[bool, str]:
    """Whether the Triton kernels can run in this process, and if not, why.

    Returns ``(True, "")`` when triton imports and either CUDA is available or ``TRITON_INTERPRET=1`` (CPU
    interpreter); otherwise ``(False, reason)`` with a reason fit for an error message.
    """
    if triton is None:
        return False, _TRITON_IMPORT_ERROR
    if torch.cuda.is_available():
        return True, ""
    if interpret_requested():
        if any(not is_interpreted(fn) for fn in _KERNELS):
            return False, (
                "TRITON_INTERPRET=1 was set after igpt.kernels was imported, so its kernels were built for CUDA, "
                "which is not available; set TRITON_INTERPRET=1 before the first import of igpt.kernels"
            )
        return True, ""
    return False, (
        "Triton kernels need a CUDA GPU or the Triton CPU interpreter: torch.cuda.is_available() is False and "
        "TRITON_INTERPRET is not set (set TRITON_INTERPRET=1 before importing igpt.kernels to run them on CPU, slowly)"
    )


def check_device(name: str, kernel: object, *tensors: torch.Tensor) -> None:
    """Raise :class:`KernelUnavailableError` when ``kernel`` cannot run on the device of ``tensors``."""
    ok, reason = triton_available()
    if not ok:
        raise KernelUnavailableError(f"igpt.kernels.{name}: {reason}")
    interpreted = is_interpreted(kernel)
    for t in tensors:
        if t.device.type == "cuda" or (interpreted and t.device.type == "cpu"):
            continue
        if t.device.type == "cpu":
            raise KernelUnavailableError(
                f"igpt.kernels.{name}: got a CPU tensor but the kernels were compiled for CUDA; move the inputs to a "
                "GPU, or set TRITON_INTERPRET=1 before igpt.kernels is first imported to use the CPU interpreter"
            )
        raise KernelUnavailableError(
            f"igpt.kernels.{name}: tensors on device {t.device} are not supported (expected cuda, or cpu under "
            "TRITON_INTERPRET=1)"
        )


def use_autotune() -> bool:
    """Tune over several configs only when compiling for CUDA and ``IGPT_KERNELS_AUTOTUNE`` is not ``0``."""
    if interpret_requested():
        return False
    return os.environ.get("IGPT_KERNELS_AUTOTUNE", "1").strip() != "0"


def pick_configs(configs: list, interpreter_config: object) -> list:
    """The autotune candidate list: all ``configs`` on CUDA (each launch's ``early_config_prune`` keeps those for its
    device and shape, and only the first of them when autotuning is off), ``interpreter_config`` alone under
    ``TRITON_INTERPRET=1``."""
    if interpret_requested():
        return [interpreter_config]
    return list(configs)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= ``n`` (and >= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()
