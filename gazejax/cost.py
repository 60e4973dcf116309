"""Attention cost per text query, gaze vs dense (paper sec. 3.5), and the command line.

    python -m gazejax.cost --units 8 --grid 24 24 --region 6 6 1 --top-k 20 --context 4
    python -m gazejax.cost ... --benchmark-json decode_attention.json   # measured, beside

For one text query and one attention head over the visual part of the cache:
- entries: dense attends to every visual token ``N = U·h·w``; gaze to ``K·m + |C|·U`` (K regions
  of m tokens, capped at the number of regions, plus the context tokens of every unit);
- FLOPs: ``4·d`` per entry (``q·k`` and the weighted sum of ``v``), plus gaze's routing,
  ``2·d`` per region descriptor;
- bytes: keys and values of every entry read once (``2·d·itemsize`` per entry), plus gaze's
  float32 descriptors (``4·d`` per region).
Text tokens are the same for both and left out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence

import numpy as np
from etils import epath

from gazejax.gaze.budget import gaze_kv_size
from gazejax.gaze.regions import RegionSize, validate_region_size


@dataclasses.dataclass(frozen=True)
class QueryCost:
    """Per text query and head: visual KV entries attended, FLOPs and bytes read."""

    entries: int
    flops: int
    bytes: int


def regions_per_unit(grid: tuple[int, int], frames: int, region: RegionSize) -> int:
    """Regions of ``frames`` frames of an ``h × w`` grid (ragged edges count as regions)."""
    h, w = grid
    return (
        math.ceil(h / region.height)
        * math.ceil(w / region.width)
        * math.ceil(frames / region.frames)
    )


def attention_cost(
    units: int,
    grid: tuple[int, int],
    region_size: Sequence[int],
    top_k: int,
    num_context_tokens: int,
    head_dim: int = 128,
    dtype: str = "bfloat16",
) -> dict[str, QueryCost]:
    """``{"dense": ..., "gaze": ...}`` costs of one text query (see the module docstring).

    Args:
      units: visual units (images or frames) ``U``; frames are grouped by ``region_size[2]``.
      grid: ``(h, w)`` tokens of a unit after the projector.
      region_size: ``(r_h, r_w)`` or ``(r_h, r_w, r_t)``.
      top_k: K; num_context_tokens: ``|C|``; head_dim: d; dtype: the cache's dtype.
    """
    region = validate_region_size(region_size, *grid)
    itemsize = np.dtype(dtype if dtype != "bfloat16" else np.float16).itemsize
    num_regions = regions_per_unit(grid, units, region)
    dense_entries = units * grid[0] * grid[1]
    gaze_entries = gaze_kv_size(top_k, region.capacity, num_context_tokens, units, num_regions)
    per_entry_flops, per_entry_bytes = 4 * head_dim, 2 * head_dim * itemsize
    return {
        "dense": QueryCost(
            dense_entries, dense_entries * per_entry_flops, dense_entries * per_entry_bytes
        ),
        "gaze": QueryCost(
            gaze_entries,
            gaze_entries * per_entry_flops + num_regions * 2 * head_dim,
            gaze_entries * per_entry_bytes + num_regions * 4 * head_dim,
        ),
    }


def _table(costs: dict[str, QueryCost]) -> str:
    dense, gaze = costs["dense"], costs["gaze"]
    lines = ["| | dense | gaze | gaze / dense |", "|---|---|---|---|"]
    for name in ("entries", "flops", "bytes"):
        d, g = getattr(dense, name), getattr(gaze, name)
        lines.append(f"| {name} | {d:,} | {g:,} | {g / d:.1%} |")
    return "\n".join(lines)


def _measured(path: str) -> str:
    """The decode benchmark's records (``benchmarks/decode_attention.py`` JSON) as a table."""
    records = json.loads(epath.Path(path).read_text())
    lines = [
        "| impl | dtype | routing | N | K | speedup (measured) | byte_bound (theory) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if r.get("impl") == "reference":
            continue
        lines.append(
            f"| {r['impl']} | {r['dtype']} | {r['routing']} | {r['n_visual']} | "
            f"{r['top_k']} | {r['speedup']:.2f} | {r['byte_bound']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gazejax.cost", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--units", type=int, default=8, help="images or frames U")
    parser.add_argument("--grid", type=int, nargs=2, default=(24, 24), help="tokens h w per unit")
    parser.add_argument("--region", type=int, nargs="+", default=(6, 6, 1), help="r_h r_w [r_t]")
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--context", type=int, default=4, help="context tokens |C| per unit")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--benchmark-json", help="decode_attention.py output, shown beside")
    args = parser.parse_args(argv)
    costs = attention_cost(
        args.units,
        tuple(args.grid),
        args.region,
        args.top_k,
        args.context,
        args.head_dim,
        args.dtype,
    )
    print(
        f"one text query, one head: U={args.units}, grid {args.grid[0]}x{args.grid[1]}, "
        f"regions {'x'.join(map(str, args.region))}, K={args.top_k}, |C|={args.context}, "
        f"d={args.head_dim}, {args.dtype} cache"
    )
    print(_table(costs))
    if args.benchmark_json:
        print("\nmeasured decode step (benchmarks/decode_attention.py):")
        print(_measured(args.benchmark_json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
