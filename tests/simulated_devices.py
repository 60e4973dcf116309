"""Checks on a simulated multi-device CPU mesh, run in a subprocess (the device count must be set
in ``XLA_FLAGS`` before jax is imported), and a walk over traced jaxprs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence

RESULTS_TAG = "MESH_CHECK_RESULTS "


# XLA flags that cut the CPU compile time of a small training step ~3× (no LLVM optimisation):
# for checks of what a program writes or shards, not of its speed.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def run_script(path: str, num_devices: int, args: Sequence[str] = (), xla_flags: str = "") -> dict:
    """Runs the test file ``path`` as a script on ``num_devices`` simulated CPU devices (with
    further ``xla_flags``, e.g. :data:`FAST_COMPILE`); returns the JSON it printed after
    :data:`RESULTS_TAG` (fails on a crash, with its stderr)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=root,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices} {xla_flags}".strip(),
    )
    result = subprocess.run(
        [sys.executable, os.path.abspath(path), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=root,
    )
    lines = [x for x in result.stdout.splitlines() if x.startswith(RESULTS_TAG)]
    assert result.returncode == 0 and lines, result.stderr[-4000:]
    return json.loads(lines[-1][len(RESULTS_TAG) :])


def run_checks(checks: Mapping[str, tuple[Callable, ...]]) -> dict[str, str]:
    """Runs each ``name: (check, *args)``; ``{name: "ok" or the traceback}``, for the parent."""
    results = {}
    for name, (check, *args) in checks.items():
        try:
            check(*args)
            results[name] = "ok"
        except Exception:  # noqa: BLE001 - reported to the parent process
            results[name] = traceback.format_exc()
    return results


def print_results(results: dict) -> None:
    """What :func:`run_script` reads back."""
    print(RESULTS_TAG + json.dumps(results), flush=True)


def iter_eqns(jaxpr) -> Iterator:
    """Every equation of ``jaxpr`` and of the jaxprs nested in its parameters."""
    import jax

    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from iter_eqns(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from iter_eqns(sub)
