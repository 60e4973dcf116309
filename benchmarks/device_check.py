"""The one command a lent GPU (or TPU) runs: the kernel tests natively, then both kernel
benchmarks, everything into one JSON file.

    python3 benchmarks/device_check.py                  # at most 8 min (step limits)
    python3 benchmarks/device_check.py --out /tmp/dc    # JSON and logs under /tmp/dc

It needs only jax, flax, numpy and pytest (what the H200 machine's ``python3`` has, PLATFORM.md):
the repository is put on ``PYTHONPATH`` instead of installed. Steps, each with a time limit,
each recorded even when it fails:

1. ``pytest`` on the op, routing, region, sharded-decode and both Pallas kernel test files:
   on a GPU the Triton kernels run natively and the Mosaic ones interpreted; float32 references
   at ``highest`` matmul precision (``tests/conftest.py``);
2. ``gaze_kernels.py``: decode at N = 4608 / 16384 / 65536 (dense einsum, cuDNN, gaze xla,
   gaze pallas; bytes floors), training forward + backward at 4608 / 16384 (dense, sdpa, cuDNN,
   xla, pallas; FLOP floors, peak memory);
3. ``decode_attention.py``: dense vs gaze xla / pallas decode, bfloat16, the same N.

``device_check.json`` holds the device, the versions, per step its command, exit status, seconds
and the tail of its output, the test counts and failures (from pytest's JUnit XML), and the
benchmarks' records.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree

ROOT = pathlib.Path(__file__).resolve().parent.parent
TESTS = (
    "tests/test_gaze_attention_op.py",
    "tests/test_gaze_routing.py",
    "tests/test_gaze_regions.py",
    "tests/test_sharded_decode.py",
    "tests/test_pallas_decode.py",
    "tests/test_pallas_train.py",
)
SIZES = ("4608", "16384", "65536")
LIMITS = {"tests": 270, "gaze_kernels": 150, "decode_attention": 60}  # seconds: 8 min at most


def run(name: str, command: list[str], limit: int, out: pathlib.Path) -> dict:
    """Runs one step with a time limit; its output goes to ``out/<name>.log``."""
    print(f"== {name}: {' '.join(command)}", flush=True)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit
        )
        status, text = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        status = "timeout"
        text = "".join(
            x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
            for x in (expired.stdout, expired.stderr)
        )
    seconds = time.perf_counter() - start
    (out / f"{name}.log").write_text(text)
    print(text[-3000:], flush=True)
    print(f"== {name}: status {status} in {seconds:.0f} s", flush=True)
    return dict(command=command, status=status, seconds=round(seconds, 1), tail=text[-4000:])


def test_results(junit: pathlib.Path) -> dict:
    """Counts and failures from pytest's JUnit XML."""
    if not junit.exists():
        return {}
    cases = ElementTree.parse(junit).getroot().iter("testcase")
    results = dict(passed=0, failed=0, skipped=0, failures=[])
    for case in cases:
        problem = next(iter(case), None)
        if problem is None:
            results["passed"] += 1
        elif problem.tag == "skipped":
            results["skipped"] += 1
        else:
            results["failed"] += 1
            message = (problem.get("message") or "")[:300]
            results["failures"].append(f"{case.get('classname')}::{case.get('name')}: {message}")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "device_check"))
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-benchmarks", action="store_true")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    probe = (
        "import jax, jaxlib; d = jax.devices()[0]; "
        "print(jax.__version__, jaxlib.__version__, d.platform, d.device_kind, sep='|')"
    )
    version = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    fields = version.stdout.strip().split("|")
    report = dict(
        device=fields[3] if len(fields) == 4 else version.stderr[-500:],
        platform=fields[2] if len(fields) == 4 else None,
        jax=fields[0] if fields[0] else None,
        jaxlib=fields[1] if len(fields) > 1 else None,
        steps={},
    )
    print(f"device: {report['device']} ({report['platform']}), jax {report['jax']}", flush=True)
    if not args.skip_tests:
        junit = out / "tests.xml"
        command = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow"]
        step = run("tests", [*command, f"--junitxml={junit}", *TESTS], LIMITS["tests"], out)
        report["steps"]["tests"] = dict(step, **test_results(junit))
    if not args.skip_benchmarks:
        kernels_json, decode_json = out / "gaze_kernels.json", out / "decode_attention.json"
        benchmarks = {
            "gaze_kernels": (
                [python, "benchmarks/gaze_kernels.py", "--sizes", *SIZES]
                + ["--train-sizes", "4608", "16384", "--reps", "20", "--train-reps", "3"]
                + ["--max-seconds", "5", "--out", str(kernels_json)],
                kernels_json,
            ),
            "decode_attention": (
                [python, "benchmarks/decode_attention.py", "--sizes", *SIZES]
                + ["--dtypes", "bfloat16", "--impls", "xla", "pallas", "--reps", "20"]
                + ["--out", str(decode_json)],
                decode_json,
            ),
        }
        for name, (command, records) in benchmarks.items():
            step = run(name, command, LIMITS[name], out)
            if records.exists():
                step["records"] = json.loads(records.read_text())
            report["steps"][name] = step
    path = out / "device_check.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    failed = [n for n, s in report["steps"].items() if s["status"] != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
