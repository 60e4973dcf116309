"""What the vision tower costs per batch when it encodes every unit slot of the bucket, against
only the chunks of ``units_per_encode`` slots that some sample fills (``MultimodalConfig``).

Shapes are the video config's (``configs/cambrian_4b_video.py``): 32 unit slots per sample,
SigLIP2 So400m/16 at 384 px + the compressing projector, ``units_per_encode = 4``. A sample's
real units come first; a chunk of 4 slots runs when any sample of the batch has a real unit in
it, so the tower runs ``ceil(max real units / 4) · 4`` slots per sample instead of 32. The
batch is the global one: under ``jax.jit`` over a mesh the skip is one decision for all devices
(a ``lax.cond`` predicate is uniform), so a single long clip anywhere in the batch runs every
chunk.

- FLOP floor: the tower's FLOPs for one unit from XLA's cost analysis of the lowered forward
  (bfloat16, nothing allocated), times the slots each path encodes.
- The "mixture" rows are expectations over random global batches of an assumed mix: half
  images (1 unit), half videos of 1..32 frames, uniform (at 1 FPS: clips up to 32 s and longer
  ones subsampled to 32); other mixes give other figures, the fixed batches bound them.
- Measured: the forward of ``encode_units`` on this CPU with the config's ``runlocal`` tower
  (32-px frames, 2 layers) on the same slot counts, both paths interleaved in one process
  (medians); the ratio, not the milliseconds, carries over.

    python benchmarks/vision_units.py [--reps 5]

Prints a table and writes ``benchmarks/results/vision_units.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from timing import median_ms

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs import cambrian_4b_video  # noqa: E402
from gazejax.models.from_config import multimodal_config  # noqa: E402
from gazejax.models.mllm import MultimodalModel  # noqa: E402

BATCHES = {  # name -> real units of each sample of one batch
    "4 images": [1, 1, 1, 1],
    "4 clips of 4-12 s": [12, 4, 8, 6],
    "3 images + a 32 s clip": [1, 1, 1, 32],
}
MIXTURE_SIZES = (1, 4, 16, 128)


def slots(counts, max_units: int, chunk: int) -> tuple[int, int]:
    """Unit slots encoded per batch: ``(every slot, chunks some sample fills)``."""
    longest = math.ceil(max(counts) / chunk) * chunk
    return len(counts) * max_units, len(counts) * min(longest, max_units)


def mixture(batch: int, max_units: int, chunk: int, draws: int = 20000) -> tuple[float, float]:
    """Expected :func:`slots` over batches of the assumed image / video mix."""
    rng = np.random.default_rng(0)
    video = rng.random((draws, batch)) < 0.5
    counts = np.where(video, rng.integers(1, max_units + 1, (draws, batch)), 1)
    longest = np.minimum(np.ceil(counts.max(axis=1) / chunk) * chunk, max_units)
    return batch * max_units, float(batch * longest.mean())


def unit_flops(config) -> float:
    """FLOPs of the tower and projector for one unit (lowered, not compiled)."""
    model = MultimodalModel(config)
    size = config.vit.image_size
    pixels = jax.ShapeDtypeStruct((1, 1, size, size, 3), jnp.float32)
    encode = partial(model.apply, method="encode_units")
    init = partial(model.init, method="encode_units")
    params = jax.eval_shape(lambda x: init(jax.random.key(0), x), pixels)
    return float(jax.jit(encode).lower(params, pixels).cost_analysis()["flops"])


def measured(config, counts, max_units: int, reps: int) -> tuple[float, float]:
    """Median ms of ``encode_units`` (every slot, chunks) on a batch with ``counts`` real units."""
    size = config.vit.image_size
    rng = np.random.default_rng(0)
    units = jnp.asarray(rng.uniform(-1, 1, (len(counts), max_units, size, size, 3)), jnp.float32)
    num_units = jnp.asarray(counts, jnp.int32)
    model = MultimodalModel(config)
    params = model.init(jax.random.key(0), units[:, :1], method="encode_units")
    paths = [
        jax.jit(
            partial(
                MultimodalModel(dataclasses.replace(config, units_per_encode=c)).apply,
                method="encode_units",
            )
        )
        for c in (0, config.units_per_encode)
    ]
    return tuple(median_ms(paths, (params, units, num_units), reps))


def _row(name: str, counts, slot_counts, ms=(None, None)) -> dict:
    """A table row: slots encoded and, where timed, milliseconds (every slot, chunks)."""
    keys = ("every_slots", "chunk_slots", "every_ms", "chunk_ms")
    return {"batch": name, "counts": counts, **dict(zip(keys, (*slot_counts, *ms), strict=True))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--out", default=str(pathlib.Path(__file__).parent / "results" / "vision_units.json")
    )
    args = parser.parse_args()
    video = cambrian_4b_video.get_config()
    full = multimodal_config(video.model)
    small = multimodal_config(cambrian_4b_video.get_config("runlocal").model)
    small = dataclasses.replace(small, units_per_encode=full.units_per_encode)
    chunk, max_units = full.units_per_encode, video.data.buckets.all.max_units
    per_unit = unit_flops(full)
    rows = [
        _row(
            name,
            counts,
            slots(counts, max_units, chunk),
            measured(small, counts, max_units, args.reps),
        )
        for name, counts in BATCHES.items()
    ]
    rows += [
        _row(f"mixture, batch {size}", None, mixture(size, max_units, chunk))
        for size in MIXTURE_SIZES
    ]
    print(
        f"video config: {max_units} unit slots per sample, units_per_encode={chunk}, "
        f"tower + projector {per_unit / 1e12:.3f} TFLOP per unit (XLA cost analysis)"
    )
    print(
        "| batch | slots: every / chunks | ViT TFLOP floor: every / chunks | saved | "
        "measured ms (runlocal tower): every / chunks | measured ratio |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        r["every_tflop"] = r["every_slots"] * per_unit / 1e12
        r["chunk_tflop"] = r["chunk_slots"] * per_unit / 1e12
        r["saved"] = 1 - r["chunk_slots"] / r["every_slots"]
        timed = (
            f"{r['every_ms']:.1f} / {r['chunk_ms']:.1f} | {r['every_ms'] / r['chunk_ms']:.2f}x"
            if r["every_ms"]
            else "- | -"
        )
        print(
            f"| {r['batch']} | {r['every_slots']} / {r['chunk_slots']:.1f} | "
            f"{r['every_tflop']:.1f} / {r['chunk_tflop']:.1f} | {r['saved']:.0%} | {timed} |"
        )
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "unit_tflop": per_unit / 1e12,
                "units_per_encode": chunk,
                "max_units": max_units,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
