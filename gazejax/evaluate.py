r"""Evaluate a trained workdir: a jitted sweep over methods × KV budgets × benchmarks.

    python -m gazejax.evaluate --workdir runs/gaze \
        [--methods dense,gaze,dense_reduced,evict_question,blind] [--budgets 0.11,0.22,0.44] \
        [--examples 288] [--benchmarks synthetic,jsonl:PATH[:NAME]] [--turns 3] \
        [--batch-size 16] [--image-root DIR] [--video-root DIR] [--max-frames 8] [--fps 1] \
        [--jsonl-limit N] [--mesh sequence=8] [--out runs/gaze/eval]

writes ``OUT/results.json`` (DESIGN.md §6: one record per method, budget and benchmark),
``OUT/results.md`` (a table) and ``OUT/score_vs_kv.png`` (score against visual KV fraction).
The budget and the methods are defined in :mod:`gazejax.eval.methods`, the scoring in
:mod:`gazejax.eval.scoring`, the benchmarks in :mod:`gazejax.eval.benchmarks`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gazejax.eval.benchmarks import SOURCES
from gazejax.eval.methods import DEFAULT_BUDGETS, METHODS, parse_methods
from gazejax.eval.reports import markdown_table, write_reports
from gazejax.eval.sweep import sweep
from gazejax.inference.checkpoints import load_checkpoint
from gazejax.paths import as_path
from gazejax.sharding import MESH_AXES, make_mesh, parse_mesh


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gazejax.evaluate",
        description="Sweep methods x KV budgets x benchmarks on a trained workdir.",
    )
    parser.add_argument(
        "--workdir",
        required=True,
        help="a training workdir or a Hugging Face LLaVA folder (imported or exported)",
    )
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (latest)")
    parser.add_argument(
        "--methods",
        default="dense,gaze,dense_reduced,evict_question,blind",
        help=f"comma-separated, of {', '.join(METHODS)}",
    )
    parser.add_argument(
        "--budgets",
        default=",".join(f"{b:g}" for b in DEFAULT_BUDGETS),
        help="fractions of a sample's visual KV entries (gaze: K = round(f * regions))",
    )
    parser.add_argument("--examples", type=int, default=288, help="examples per benchmark")
    parser.add_argument(
        "--turns",
        type=int,
        default=None,
        help="questions per synthetic conversation, each scored with the earlier ones in "
        "context (default: the workdir's data.synthetic.turns, else 1)",
    )
    parser.add_argument(
        "--benchmarks",
        default="synthetic",
        help=f"comma-separated, of {', '.join(s.USAGE for s in SOURCES.values())}",
    )
    parser.add_argument(
        "--image-root",
        default=None,
        help="JSONL image paths are relative to it (the file's folder)",
    )
    parser.add_argument(
        "--video-root", default=None, help="JSONL video paths are relative to it (--image-root)"
    )
    parser.add_argument(
        "--max-frames", type=int, default=None, help="frames per JSONL video (the training data's)"
    )
    parser.add_argument("--fps", type=float, default=1.0, help="JSONL video sampling rate")
    parser.add_argument(
        "--jsonl-limit", type=int, default=None, help="score the first N lines of each JSONL"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's")
    parser.add_argument(
        "--mesh",
        default=None,
        metavar="AXIS=SIZE,...",
        help=f"run each forward over a device mesh with axes {', '.join(MESH_AXES)} (unnamed: "
        "1; one size may be -1, the devices left), e.g. sequence=8 or data=2,sequence=4: "
        "activations split by the logical axis rules, parameters replicated (default: one "
        "device)",
    )
    parser.add_argument("--out", default=None, help="default: WORKDIR/eval")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (errors are printed to stderr, status 1)."""
    args = _parser().parse_args(argv)
    try:
        methods = parse_methods(
            [m.strip() for m in args.methods.split(",") if m.strip()], _floats(args.budgets)
        )
        mesh = None if args.mesh is None else make_mesh(parse_mesh(args.mesh))
        checkpoint = load_checkpoint(args.workdir, args.step)
        results = sweep(
            checkpoint,
            checkpoint.run_config,
            methods,
            args.examples,
            [b.strip() for b in args.benchmarks.split(",") if b.strip()],
            args.batch_size,
            progress=not args.no_progress,
            image_root=args.image_root,
            video_root=args.video_root,
            max_frames=args.max_frames,
            fps=args.fps,
            jsonl_limit=args.jsonl_limit,
            mesh=mesh,
            turns=args.turns,
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    out = args.out or str(as_path(args.workdir) / "eval")
    results["workdir"] = str(as_path(args.workdir))
    write_reports(results, out)
    print(markdown_table(results))
    print(f"wrote {out}/results.json, results.md, score_vs_kv.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
