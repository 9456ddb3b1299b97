"""Installs the test-only fault injection of ``tests/faults.py`` in a subprocess that asks for it (IGPT_FAULT_*)."""

import os
import sys

if any(os.environ.get(k) for k in ("IGPT_FAULT_NAN_STEPS", "IGPT_FAULT_KILL_STEP", "IGPT_FAULT_CKPT_PAUSE_S")):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from tests.faults import install_from_env

    install_from_env()
    sys.path.pop(0)
