"""Pallas training kernel of gaze attention: many queries (prefill, training), forward + backward.

Semantics are those of ``reference`` (DESIGN.md §2–§4): a text query sees earlier text, the
context tokens of earlier units and the tokens of its selected regions; a visual query sees every
earlier token; a context query sees its unit's visual tokens and its unit's context tokens up to
itself; padding sees nothing; rows that see nothing output 0 and get zero gradient. Routing
(exact ``lax.top_k`` on float32 scores, stop-gradient) runs in XLA before the kernels, once for
every implementation (``dispatch.gaze_attention``).

Layout. Inside the kernels everything is head-major: queries ``[b, h, q, d]``, keys and values
``[b, kv_heads, kv, d]``; per-token metadata is split into int32 vectors, query-side as columns
``[b, q, 1]`` and key-side as rows ``[b, 1, kv]``, so a (query tile, key tile) pair broadcasts
them to ``[block_q, block_kv]``. Sequences are padded to whole tiles with padding slots.

Mask construction on chip. No dense ``[heads, q, kv]`` mask exists anywhere. Each kernel gets
the selection as region ids ``[b, h, q, K]`` (``-1`` = empty slot) plus the metadata vectors,
and per tile builds ``visible = causal/unit rules OR (key is visual AND its region is one of the
query head's K ids)``; the membership test is K compares of a ``[block_q, 1]`` id column
(a static lane slice of the ``[block_q, K]`` selection block: Mosaic cannot prove a dynamic lane
offset aligned) against the ``[1, block_kv]`` key regions, inside a branch taken only for tiles
that hold a selected region (the branch yields int32: Mosaic cannot yield vectors of i1).

Tile skipping. A block-level pre-pass in XLA (:func:`tile_codes`) computes per
``(batch, head, q tile, kv tile)`` a 2-bit code from compact per-tile summaries: bit 0 "some
query may see some key of the tile without routing" (exact for the causal text/visual rules
from the tiles' min/max positions, a superset for the context rule from unit ranges), bit 1
"some query head of the q tile selected a region that has a key in the kv tile" (exact, from a
``[b, h, q_tiles, num_regions]`` region bitmap and a ``[b, kv_tiles, num_regions]`` presence
map). Codes are compacted into *plans*: per program a count and the list of its non-zero tiles,
``(tile << 2) | code``. The dK/dV pass gets the transposed plan: per kv tile the list of ``(query
head of the group, q tile)`` pairs that see it. Skipped tiles are never read, so garbage (even
NaN) in all-padding tiles cannot leak; in partly padded tiles padding slots are masked, but
``0 · NaN`` would still leak, as in any masked attention: keep padding slots finite.

Two drivers walk the plans with the same per-tile code (:func:`_walk`, :class:`_Window`):

- the *loop driver* (Triton on GPU, and the Pallas interpreter by default): grid ``(b, h,
  q_tiles)`` (forward, dQ) or ``(b, kv_heads, kv_tiles)`` (dK/dV); each program's block is the
  whole kv sequence of its KV head (forward, dQ) or the whole query sequence of its GQA group
  (dK/dV), as in JAX's GPU flash attention (a pointer on GPU), and a ``fori_loop`` over its plan
  row loads and computes the planned tiles only (power-of-two tiles, no scratch buffers, plans
  read as scalars from global memory, float32 tiles of 64 for 128-wide heads: shared memory);
- the *grid driver* (Mosaic on TPU), splash-attention style: the plans are scalar-prefetched
  into SMEM and the plan's steps are a fourth, sequential grid axis (length: all kv tiles, or
  all (head, q tile) pairs of the group); the block index maps of the planned operands read
  the step's entry, clamped to the last valid one, so a step past the plan's count asks for the
  block already in VMEM (no copy) and computes nothing; accumulators live in VMEM scratch,
  initialised at the first step and written out at the last. A program holds O(block): at
  Qwen3-4B heads (32/8 × 128, bfloat16), 4608 visual + 2048 text tokens, the forward compiles
  for v5e under a 2 MiB scoped-VMEM limit and the backward under 2.1 MiB (default: 16 MiB).

Forward. A query tile stays resident; the driver walks the plan's kv tiles with an online
softmax in float32; masked logits take a finite ``MASK_VALUE`` and masked probabilities are
forced to 0, so fully masked tiles and rows never produce inf - inf. It writes the output and
the log-sum-exp (``MASK_VALUE`` for rows that see nothing, ``-inf`` once out of the kernel).

Backward, under ``jax.custom_vjp``: ``delta = rowsum(out * d_out) - d_lse`` in XLA, then two
kernels that recompute probabilities per tile from the saved log-sum-exp. dQ: per query tile,
over the plan's kv tiles. dK/dV: kv-major: each program owns one kv tile and walks the ``(head,
q tile)`` pairs of its GQA group that see it, so the sum over the group's query heads happens in
the kernel, deterministically, without atomics.

Platforms. The ``backend`` argument (default ``platform.target_platform()``: the mesh's
platform, else ``jax.default_backend()``) picks the compiler:
``"tpu"`` Mosaic and the grid driver, ``"gpu"``/``"cuda"``/``"triton"`` Triton and the loop
driver. ``interpret=True`` (default on CPU) runs the loop driver in the Pallas interpreter, or,
with ``backend="tpu"``, the grid driver (``interpret=pltpu.InterpretParams(...)``: in the slower
TPU interpreter, which simulates TPU memories, fills scratch with NaN and checks bounds).
``tests/aot/compile_kernels.py`` compiles both for real devices on a CPU. The ``[..., 1]``
metadata/statistics arrays and the ``[..., K]`` selection are lane-padded in TPU memory.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from kernels.gaze_attention import routing as routing_lib
from kernels.gaze_attention.metadata import RegionTable, TokenKind, TokenMeta
from kernels.gaze_attention.platform import (
    Backend,
    Compiler,
    compiler_for,
    dot,
    interprets,
    target_platform,
)
from kernels.gaze_attention.routing import Selection

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
DEFAULT_BLOCK = 128
UNROUTED, ROUTED = 1, 2  # tile code bits: visible without routing; holds a selected region
_TILE_BITS = 22  # dK/dV plan entries: (head << 24) | (q_tile << 2) | code

__all__ = ["attend_selected_pallas_train", "tile_codes"]


def attend_selected_pallas_train(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    query_meta: TokenMeta,
    kv_meta: TokenMeta,
    table: RegionTable,
    selection: Selection,
    *,
    routing: routing_lib.Routing,
    scale: float,
    max_unrouted_tokens: int | None = None,
    block_q: int | None = None,
    block_kv: int | None = None,
    backend: Backend | None = None,
    interpret: bool | pltpu.InterpretParams | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Gaze attention of many queries given their selection, with Pallas flash kernels.

    Differentiable in ``query``, ``key``, ``value`` (through both outputs).

    Args:
      query: [batch, q_len, num_heads, head_dim].
      key: [batch, kv_len, num_kv_heads, head_dim] (``kv_len`` may differ from ``q_len``;
        positions come from the metadata); ``num_heads`` a multiple of ``num_kv_heads``.
      value: [batch, kv_len, num_kv_heads, head_dim].
      query_meta: [batch, q_len] metadata of the queries.
      kv_meta: [batch, kv_len] metadata of the keys.
      table: [batch, num_regions] region table of the keys.
      selection: [batch, q_len, num_heads, top_k] regions of ``table`` per query head.
      routing, max_unrouted_tokens: unused (the selection is per head; every tile that may be
        visible is read); accepted for the signature shared by every implementation.
      scale: logit scale.
      block_q, block_kv: tile sizes (powers of two); default ``min(128, next power of two of
        the length)``, 64 for float32 with ``head_dim >= 128`` on Triton (shared memory).
      backend: ``"tpu"`` (Mosaic), ``"gpu"``/``"cuda"``/``"triton"`` (Triton) or ``"cpu"``;
        default ``platform.target_platform()`` (the ``jax.set_mesh`` mesh's, else
        ``jax.default_backend()``).
      interpret: run in the Pallas interpreter; default: where the default device cannot run
        the backend's kernels (a CPU; Mosaic on a GPU). With ``backend="tpu"`` a
        ``pltpu.InterpretParams`` runs the TPU interpreter.

    Returns:
      ``(out [batch, q_len, num_heads, head_dim] in query.dtype, lse [batch, q_len, num_heads]
      float32)``; ``out = 0`` and ``lse = -inf`` where the query sees nothing.
    """
    del routing, max_unrouted_tokens
    batch, q_len, num_heads, head_dim = query.shape
    kv_len, num_kv_heads = key.shape[1:3]
    if key.shape != value.shape or key.shape[-1] != head_dim or num_heads % num_kv_heads:
        raise ValueError(
            f"incompatible shapes: query {query.shape}, key {key.shape}, value {value.shape}"
        )
    group = num_heads // num_kv_heads
    if group >= 1 << (31 - 2 - _TILE_BITS):
        raise ValueError(f"at most 127 query heads per KV head, got {group}")
    backend = backend or target_platform()
    compiler = compiler_for(backend)
    if not isinstance(interpret, pltpu.InterpretParams):
        interpret = interprets(interpret, compiler)
    largest = _largest_block(compiler, query.dtype, head_dim)
    block_q = _block_size(block_q, q_len, largest, "block_q")
    block_kv = _block_size(block_kv, kv_len, largest, "block_kv")

    q_meta, k_meta = _pad_meta(query_meta, block_q), _pad_meta(kv_meta, block_kv)
    q_pad, kv_pad = q_meta.kind.shape[1] - q_len, k_meta.kind.shape[1] - kv_len
    region = _pad_axis(selection.region, 1, q_pad, -1)  # [b, q, h, K]
    codes = tile_codes(q_meta, k_meta, region, table.num_regions, block_q, block_kv)
    q_plan, kv_plan = _plans(codes, group)
    aux = _Aux(
        q_kind=q_meta.kind[..., None],
        q_unit=q_meta.unit[..., None],
        q_position=q_meta.position[..., None],
        k_kind=k_meta.kind[:, None],
        k_unit=k_meta.unit[:, None],
        k_region=k_meta.region[:, None],
        k_position=k_meta.position[:, None],
        selected=region.transpose(0, 2, 1, 3),
        q_plan=q_plan,
        kv_plan=kv_plan,
    )
    config = _Config(
        scale=float(scale),
        block_q=block_q,
        block_kv=block_kv,
        top_k=region.shape[-1],
        group=group,
        compiler=compiler,
        interpret=interpret,
        # Mosaic compiles the grid driver; interpreted, it runs for an explicit TPU backend.
        grid_driver=compiler == "mosaic" and (backend == "tpu" or not interpret),
    )
    q = _pad_axis(query, 1, q_pad, 0).transpose(0, 2, 1, 3)
    k, v = (_pad_axis(x, 1, kv_pad, 0).transpose(0, 2, 1, 3) for x in (key, value))
    out, lse = _flash(config, q, k, v, aux)
    lse = lse[:, :, :q_len, 0].transpose(0, 2, 1)
    lse = jnp.where(lse > MASK_VALUE / 2, lse, -jnp.inf)  # the kernel marks unseen rows
    return out[:, :, :q_len].transpose(0, 2, 1, 3), lse


def tile_codes(
    query_meta: TokenMeta,
    kv_meta: TokenMeta,
    region: jax.Array,
    num_regions: int,
    block_q: int,
    block_kv: int,
) -> jax.Array:
    """Which (query tile, kv tile) pairs need computing: the block-level pre-pass.

    Args:
      query_meta: [batch, q_len] metadata of the queries.
      kv_meta: [batch, kv_len] metadata of the keys.
      region: [batch, q_len, num_heads, K] selected region ids (``Selection.region``, ``-1``
        for empty slots).
      num_regions: static number of region slots.
      block_q, block_kv: tile sizes; lengths are padded up to whole tiles.

    Returns:
      [batch, num_heads, q_tiles, kv_tiles] int32 codes: 0 when no query of the tile sees any key
      of the tile (the kernels skip it), else bit :data:`UNROUTED` (a causal/unit rule may apply)
      and/or bit :data:`ROUTED` (a query head of the tile selected a region with keys in the
      tile). Every visible pair lies in a non-zero tile.
    """
    query_meta, kv_meta = _pad_meta(query_meta, block_q), _pad_meta(kv_meta, block_kv)
    region = _pad_axis(region, 1, query_meta.kind.shape[1] - region.shape[1], -1)
    batch, _, num_heads, top_k = region.shape
    q_kind, q_unit, q_pos = (
        x.reshape(batch, -1, block_q)
        for x in (query_meta.kind, query_meta.unit, query_meta.position)
    )
    k_kind, k_unit, k_region, k_pos = (
        x.reshape(batch, -1, block_kv)
        for x in (kv_meta.kind, kv_meta.unit, kv_meta.region, kv_meta.position)
    )
    num_q_tiles, num_kv_tiles = q_kind.shape[1], k_kind.shape[1]
    low, high = np.iinfo(np.int32).min, np.iinfo(np.int32).max

    def most(x, where):  # [b, tiles]; ``low`` for an empty set
        return jnp.max(jnp.where(where, x, low), axis=-1)

    def least(x, where):
        return jnp.min(jnp.where(where, x, high), axis=-1)

    q_context = q_kind == TokenKind.CONTEXT
    k_unit_holder = (k_kind == TokenKind.VISUAL) | (k_kind == TokenKind.CONTEXT)
    text_q = most(q_pos, q_kind == TokenKind.TEXT)[:, :, None]
    visual_q = most(q_pos, q_kind == TokenKind.VISUAL)[:, :, None]
    text_or_context_k = least(k_pos, (k_kind == TokenKind.TEXT) | (k_kind == TokenKind.CONTEXT))[
        :, None, :
    ]
    valid_k = least(k_pos, k_kind != TokenKind.PADDING)[:, None, :]
    q_units = least(q_unit, q_context)[:, :, None], most(q_unit, q_context)[:, :, None]
    k_units = least(k_unit, k_unit_holder)[:, None, :], most(k_unit, k_unit_holder)[:, None, :]
    units_meet = (k_units[0] <= q_units[1]) & (q_units[0] <= k_units[1])
    unrouted = (text_or_context_k <= text_q) | (valid_k <= visual_q) | units_meet

    # Region bitmaps: [b·h·q_tiles, R] selected somewhere in the q tile, [b·kv_tiles, R] present.
    selected = region.transpose(0, 2, 1, 3).reshape(-1, block_q * top_k)
    chosen = _bitmap(jnp.where(selected >= 0, selected, num_regions), num_regions)
    visual = k_kind == TokenKind.VISUAL
    present = _bitmap(jnp.where(visual, k_region, num_regions).reshape(-1, block_kv), num_regions)
    routed = jnp.einsum(
        "bhqr,bkr->bhqk",
        chosen.reshape(batch, num_heads, num_q_tiles, num_regions),
        present.reshape(batch, num_kv_tiles, num_regions),
    )
    return unrouted[:, None].astype(jnp.int32) * UNROUTED + (routed > 0).astype(jnp.int32) * ROUTED


# ----------------------------------------------------------------------------------------------
# XLA-side preparation.


class _Aux(NamedTuple):
    """Integer operands of the kernels (no gradient).

    ``q_*``: [b, q, 1] query metadata; ``k_*``: [b, 1, kv] key metadata; ``selected``:
    [b, h, q, K] region ids; ``q_plan``: [b, h, q_tiles, 1 + kv_tiles]; ``kv_plan``:
    [b, kv_heads, kv_tiles, 1 + group · q_tiles] (see :func:`_plan`).
    """

    q_kind: jax.Array
    q_unit: jax.Array
    q_position: jax.Array
    k_kind: jax.Array
    k_unit: jax.Array
    k_region: jax.Array
    k_position: jax.Array
    selected: jax.Array
    q_plan: jax.Array
    kv_plan: jax.Array


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static parameters of the kernels (hashable: the custom_vjp's non-differentiable arg)."""

    scale: float
    block_q: int
    block_kv: int
    top_k: int
    group: int
    compiler: Compiler
    interpret: bool | pltpu.InterpretParams
    grid_driver: bool  # plan steps on a grid axis (Mosaic), else a loop in each program


def _largest_block(compiler: Compiler, dtype, head_dim: int) -> int:
    """The default tile: 128, or 64 where Triton's float32 tiles of a 128-wide head would
    overrun an H100's 227 KiB of shared memory (the dK/dV kernel asks 320 KiB)."""
    wide = jnp.dtype(dtype).itemsize >= 4 and head_dim >= 128
    return DEFAULT_BLOCK // 2 if compiler == "triton" and wide else DEFAULT_BLOCK


def _block_size(block: int | None, length: int, largest: int, name: str) -> int:
    if block is None:
        return min(largest, pl.next_power_of_2(length))
    if block < 1 or block & (block - 1):
        raise ValueError(f"{name} must be a power of two, got {block}")
    return block


def _pad_axis(x: jax.Array, axis: int, pad: int, fill) -> jax.Array:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=fill)


def _pad_meta(meta: TokenMeta, block: int) -> TokenMeta:
    """``meta`` padded with padding slots to a multiple of ``block``."""
    pad = -meta.kind.shape[1] % block
    return jax.tree.map(lambda x: _pad_axis(x, 1, pad, TokenKind.PADDING), meta)


def _bitmap(ids: jax.Array, num_regions: int) -> jax.Array:
    """[rows, n] ids in ``[0, num_regions]`` → [rows, num_regions] float32 0/1 (id R dropped)."""
    rows = jnp.arange(ids.shape[0])[:, None]
    bitmap = jnp.zeros((ids.shape[0], num_regions + 1), jnp.float32).at[rows, ids].set(1.0)
    return bitmap[:, :num_regions]


def _plans(codes: jax.Array, group: int) -> tuple[jax.Array, jax.Array]:
    """Work lists of the kernels from tile codes [b, h, q_tiles, kv_tiles].

    Returns ``q_plan`` [b, h, q_tiles, 1 + kv_tiles] (forward, dQ: kv tiles per q tile) and
    ``kv_plan`` [b, kv_heads, kv_tiles, 1 + group · q_tiles] (dK/dV: per kv tile, the
    ``(head within the group, q tile)`` pairs, as ``head << 22 | q_tile``).
    """
    batch, num_heads, num_q_tiles, num_kv_tiles = codes.shape
    q_plan = _plan(codes, jnp.arange(num_kv_tiles, dtype=jnp.int32))
    per_group = codes.reshape(batch, num_heads // group, group, num_q_tiles, num_kv_tiles)
    per_group = per_group.transpose(0, 1, 4, 2, 3).reshape(*per_group.shape[:2], num_kv_tiles, -1)
    heads = jnp.arange(group, dtype=jnp.int32)[:, None] << _TILE_BITS
    kv_plan = _plan(per_group, (heads | jnp.arange(num_q_tiles, dtype=jnp.int32)).reshape(-1))
    return q_plan, kv_plan


def _plan(codes: jax.Array, ids: jax.Array) -> jax.Array:
    """Compacts tile codes into per-program work lists.

    Args:
      codes: [..., n] tile codes (0 = skip).
      ids: [n] int32 tile identifiers (< 2**29).

    Returns:
      [..., 1 + n] int32: the number ``c`` of non-zero codes, then ``(id << 2) | code`` of those
      tiles in order (entries after the first ``c`` are unused).
    """
    order = jnp.argsort(codes == 0, axis=-1, stable=True)
    entries = (ids[order] << 2) | jnp.take_along_axis(codes, order, axis=-1)
    count = jnp.sum(codes != 0, axis=-1, keepdims=True, dtype=jnp.int32)
    return jnp.concatenate([count, entries.astype(jnp.int32)], axis=-1)


# ----------------------------------------------------------------------------------------------
# custom_vjp: forward saves the log-sum-exp; backward = dQ kernel + kv-major dK/dV kernel.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(config: _Config, q, k, v, aux: _Aux) -> tuple[jax.Array, jax.Array]:
    """q [b, h, q, d], k/v [b, kv_heads, kv, d] (padded, head-major) → (out [b, h, q, d],
    lse [b, h, q, 1] float32, ``MASK_VALUE`` for rows that see nothing)."""
    return _forward(config, q, k, v, aux)


def _flash_fwd(config, q, k, v, aux):
    out, lse = _forward(config, q, k, v, aux)
    return (out, lse), (q, k, v, aux, out, lse)


def _flash_bwd(config, residuals, cotangents):
    q, k, v, aux, out, lse = residuals
    d_out, d_lse = cotangents
    # d logits = P ∘ (dP - delta): the output's term, and d lse / d logits = P for the lse's.
    delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), -1, keepdims=True)
    delta = delta - d_lse
    dq = _backward_q(config, q, k, v, d_out, lse, delta, aux)
    dk, dv = _backward_kv(config, q, k, v, d_out, lse, delta, aux)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------
# Calls: block specs of both drivers, and pallas_call for the interpreter, Mosaic or Triton.
#
# Index maps take the grid indices ``(b, head, tile)`` and, with the grid driver, the step ``i``
# and the plan; ``*step`` is empty with the loop driver, whose plan-driven blocks are the whole
# sequence (block index 0).


def _planned(plan_ref, b, h, t, i):
    """Plan entry of step ``i``, clamped to the last valid one (skipped steps then ask for the
    block already in VMEM, so the pipeline copies nothing; an empty plan's entry 1 is a valid
    tile too)."""
    last = jnp.maximum(plan_ref[b, h, t, 0] - 1, 0)
    return plan_ref[b, h, t, 1 + jnp.minimum(i, last)]


def _call(
    config: _Config, kernel, name, plan, grid, in_specs, out_specs, out_shape, scratch, operands
):
    """``pallas_call`` of one pass: the grid driver (Mosaic, or its interpreter: the plan
    prefetched into SMEM, one more grid axis over plan steps, ``scratch`` accumulators in VMEM)
    or the loop driver (Triton or the interpreter: the program's plan row as an input block).

    ``operands`` start with the queries ``[b, h, q, head_dim]``; ``plan`` goes first.
    """
    head_dim = operands[0].shape[-1]
    if config.grid_driver:
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(*grid, plan.shape[-1] - 1),
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM(shape, jnp.float32) for shape in scratch],
        )
        params = pltpu.CompilerParams(dimension_semantics=("parallel",) * 3 + ("arbitrary",))
        interpret = config.interpret
    else:
        # All plans of the program's (batch, head); the kernel reads row ``pl.program_id(2)``.
        plan_spec = pl.BlockSpec((None, None, *plan.shape[2:]), lambda b, h, t: (b, h, 0, 0))
        grid_spec = pl.GridSpec(grid=grid, in_specs=[plan_spec, *in_specs], out_specs=out_specs)
        if config.interpret:
            params = None
        else:
            params = pltriton.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)
        interpret = bool(config.interpret)
    return pl.pallas_call(
        functools.partial(kernel, config=config),
        grid_spec=grid_spec,
        out_shape=out_shape,
        compiler_params=params,
        interpret=interpret,
        name=name,
    )(plan, *operands)


def _q_major_specs(config: _Config, kv_len: int, head_dim: int, backward: bool):
    """Block specs of a forward/dQ call, grid ``(b, h, q tile[, step])``.

    Returns ``(in_specs, q_tile, rows)``: the inputs (q, k, v, for the ``backward`` (dQ) dO,
    lse and delta, then the metadata and the selection), and the specs of a ``[bq, head_dim]``
    query tile and of its ``[bq, 1]`` row statistics (for the outputs).
    """
    bq, g = config.block_q, config.group
    if config.grid_driver:
        kv_block = config.block_kv

        def kv_tile(b, h, t, i, plan_ref):
            return _planned(plan_ref, b, h, t, i) >> 2
    else:
        kv_block = kv_len

        def kv_tile(*_):
            return 0

    q_tile = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, t, *_: (b, h, t, 0))
    rows = pl.BlockSpec((None, None, bq, 1), lambda b, h, t, *_: (b, h, t, 0))
    kv = pl.BlockSpec(
        (None, None, kv_block, head_dim),
        lambda b, h, t, *s: (b, lax.div(h, g), kv_tile(b, h, t, *s), 0),
    )
    q_meta = pl.BlockSpec((None, bq, 1), lambda b, h, t, *_: (b, t, 0))
    k_meta = pl.BlockSpec((None, 1, kv_block), lambda b, h, t, *s: (b, 0, kv_tile(b, h, t, *s)))
    selected = pl.BlockSpec((None, None, bq, config.top_k), lambda b, h, t, *_: (b, h, t, 0))
    gradients = [q_tile, rows, rows] if backward else []  # dO, lse, delta
    in_specs = [q_tile, kv, kv, *gradients, *[q_meta] * 3, *[k_meta] * 4, selected]
    return in_specs, q_tile, rows


def _aux_operands(aux: _Aux):
    """The metadata vectors and the selection, in kernel argument order."""
    return (
        aux.q_kind,
        aux.q_unit,
        aux.q_position,
        aux.k_kind,
        aux.k_unit,
        aux.k_region,
        aux.k_position,
        aux.selected,
    )


def _forward(config: _Config, q, k, v, aux: _Aux):
    """Flash forward: (out [b, h, q, d] in q.dtype, log-sum-exp [b, h, q, 1] float32)."""
    batch, num_heads, q_len, head_dim = q.shape
    bq = config.block_q
    in_specs, q_tile, rows = _q_major_specs(config, k.shape[2], head_dim, False)
    out_shape = [
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((batch, num_heads, q_len, 1), jnp.float32),
    ]
    return _call(
        config,
        _forward_kernel,
        "gaze_flash_forward",
        aux.q_plan,
        (batch, num_heads, q_len // bq),
        in_specs,
        [q_tile, rows],
        out_shape,
        [(bq, head_dim), (bq, 1), (bq, 1)],  # accumulator, running max, running sum
        (q, k, v, *_aux_operands(aux)),
    )


def _backward_q(config: _Config, q, k, v, d_out, lse, delta, aux: _Aux):
    """dQ [b, h, q, d]: per query tile, over the plan's kv tiles."""
    batch, num_heads, q_len, head_dim = q.shape
    bq = config.block_q
    in_specs, q_tile, _ = _q_major_specs(config, k.shape[2], head_dim, True)
    (dq,) = _call(
        config,
        _backward_q_kernel,
        "gaze_flash_backward_q",
        aux.q_plan,
        (batch, num_heads, q_len // bq),
        in_specs,
        [q_tile],
        [jax.ShapeDtypeStruct(q.shape, q.dtype)],
        [(bq, head_dim)],
        (q, k, v, d_out, lse, delta, *_aux_operands(aux)),
    )
    return dq


def _backward_kv(config: _Config, q, k, v, d_out, lse, delta, aux: _Aux):
    """dK, dV [b, kv_heads, kv, d]: per kv tile, over its GQA group's (head, q tile) plan."""
    batch, num_kv_heads, kv_len, head_dim = k.shape
    q_len, g, bq, bkv = q.shape[2], config.group, config.block_q, config.block_kv
    if config.grid_driver:  # one (query head, q tile) pair per step
        heads, q_block = None, bq

        def pair(b, h, t, i, plan_ref):  # (query head, q tile) block indices
            head, tile, _ = _kv_tile_entry(_planned(plan_ref, b, h, t, i))
            return h * g + head, tile
    else:  # the GQA group's whole query sequence
        heads, q_block = g, q_len

        def pair(b, h, t):
            return h, 0

    def per_pair(*block):  # spec of a [b, h, q, ·] array, blocks picked by the plan
        def index(b, h, t, *step):
            head, tile = pair(b, h, t, *step)
            return b, head, tile, 0

        return pl.BlockSpec((None, heads, q_block, *block), index)

    def q_meta_index(b, h, t, *step):
        return b, pair(b, h, t, *step)[1], 0

    kv_tile = pl.BlockSpec((None, None, bkv, head_dim), lambda b, h, t, *_: (b, h, t, 0))
    q_meta = pl.BlockSpec((None, q_block, 1), q_meta_index)
    k_meta = pl.BlockSpec((None, 1, bkv), lambda b, h, t, *_: (b, 0, t))
    in_specs = [
        per_pair(head_dim),
        kv_tile,
        kv_tile,
        per_pair(head_dim),
        per_pair(1),
        per_pair(1),
        *[q_meta] * 3,
        *[k_meta] * 4,
        per_pair(config.top_k),
    ]
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    return _call(
        config,
        _backward_kv_kernel,
        "gaze_flash_backward_kv",
        aux.kv_plan,
        (batch, num_kv_heads, kv_len // bkv),
        in_specs,
        [kv_tile, kv_tile],
        out_shape,
        [(bkv, head_dim), (bkv, head_dim)],
        (q, k, v, d_out, lse, delta, *_aux_operands(aux)),
    )


# ----------------------------------------------------------------------------------------------
# Kernel bodies: one per pass for both drivers. A pass is a ``step`` over one planned tile and a
# ``finish``; :func:`_walk` runs the steps (a loop, or the grid's step axis with scratch state)
# and :class:`_Window` reads a step's tile (a window of a whole-sequence block, or the block).


class _Window(NamedTuple):
    """Where a step's tile lies in its blocks: ``span`` (a ``pl.ds``) along the sequence axis
    after the ``lead`` indices (the query head within the group for dK/dV), or, with
    ``span=None``, the whole block (grid driver)."""

    lead: tuple = ()
    span: pl.Slice | None = None

    def rows(self, ref, lead: bool = True):
        """The tile of a ``[..., sequence, ·]`` block (``lead=False``: no head axis)."""
        if self.span is None:
            return ref[...]
        return ref[(*(self.lead if lead else ()), self.span, slice(None))]

    def cols(self, ref):
        """The tile of a ``[1, sequence]`` key-metadata block."""
        return ref[...] if self.span is None else ref[:, self.span]

    def column(self, ref, c: int):
        """Static column ``c`` of the tile of a ``[..., q, K]`` selection block (dK/dV)."""
        if self.span is None:
            return ref[:, pl.ds(c, 1)]
        return ref[(*self.lead, self.span, pl.ds(c, 1))]


def _walk(config: _Config, plan_ref, loop_window, step, init, finish, scratch):
    """Runs ``carry = step(window, code, carry)`` over the program's plan entries from
    ``init()``, then ``finish(carry)``.

    Loop driver: a ``fori_loop`` over the ``plan_ref[pl.program_id(2)]`` row, the window of an
    entry from ``loop_window(entry)``, the carry in registers. Grid driver: grid step ``i`` runs
    entry ``i`` of the prefetched plan if there is one (the blocks are its tile: the whole-block
    window), the carry lives in the ``scratch`` refs between steps, the first step initialises
    them and the last one finishes.
    """
    program = [pl.program_id(axis) for axis in range(3)]  # outside loops: interpret mode
    if not config.grid_driver:
        row = program[2]

        def body(i, carry):
            entry = plan_ref[row, i + 1]
            return step(loop_window(entry), entry & 3, carry)

        finish(lax.fori_loop(0, plan_ref[row, 0], body, init()))
        return
    step_index, steps = pl.program_id(3), plan_ref.shape[-1] - 1
    count, entry = plan_ref[(*program, 0)], _planned(plan_ref, *program, step_index)

    def load():
        return tuple(ref[...] for ref in scratch)

    def store(values):
        for ref, value in zip(scratch, values, strict=True):
            ref[...] = value

    @pl.when(step_index == 0)
    def _():
        store(init())

    @pl.when(step_index < count)
    def _():
        store(step(_Window(), entry & 3, load()))

    @pl.when(step_index == steps - 1)
    def _():
        finish(load())


def _kv_window(config: _Config):
    """Forward/dQ, loop driver: the window of a plan entry ``(kv tile << 2) | code``."""
    bkv = config.block_kv
    return lambda entry: _Window(span=pl.ds(pl.multiple_of((entry >> 2) * bkv, bkv), bkv))


def _visible(q_meta, k_meta, code, selected_column, top_k: int) -> jax.Array:
    """[block_q, block_kv] bool: who sees what (DESIGN.md §2) inside one tile.

    ``q_meta``: (kind, unit, position) [block_q, 1]; ``k_meta``: (kind, unit, region, position)
    [1, block_kv]; ``selected_column(c)``: [block_q, 1] c-th selected region id of each query
    (static ``c``: a dynamic lane offset is unprovably aligned for Mosaic).
    """
    q_kind, q_unit, q_pos = q_meta
    k_kind, k_unit, k_region, k_pos = k_meta
    causal = k_pos <= q_pos
    k_visual, k_context = k_kind == TokenKind.VISUAL, k_kind == TokenKind.CONTEXT

    # int32 out of the branch: Mosaic cannot legalize an scf.if that yields vectors of i1.
    def membership():
        hit = selected_column(0) == k_region
        for c in range(1, top_k):
            hit = hit | (selected_column(c) == k_region)
        return hit.astype(jnp.int32)

    def nothing():
        return jnp.zeros(causal.shape, jnp.int32)

    routed = lax.cond((code & ROUTED) != 0, membership, nothing) != 0
    text = (causal & ((k_kind == TokenKind.TEXT) | k_context)) | (k_visual & routed)
    visual = causal & (k_kind != TokenKind.PADDING)
    context = (k_unit == q_unit) & (k_visual | (k_context & causal))
    return (
        ((q_kind == TokenKind.TEXT) & text)
        | ((q_kind == TokenKind.VISUAL) & visual)
        | ((q_kind == TokenKind.CONTEXT) & context)
    )


def _masked_logits(q, k, mask, scale: float) -> jax.Array:
    return jnp.where(mask, dot(q, k, (1, 1)) * scale, MASK_VALUE)


def _kv_tile_entry(entry):
    """dK/dV plan entry → (query head within the group, q tile, code)."""
    return entry >> (2 + _TILE_BITS), (entry >> 2) & ((1 << _TILE_BITS) - 1), entry & 3


def _forward_kernel(
    plan_ref,
    q_ref,
    k_ref,
    v_ref,
    q_kind_ref,
    q_unit_ref,
    q_pos_ref,
    k_kind_ref,
    k_unit_ref,
    k_region_ref,
    k_pos_ref,
    sel_ref,
    o_ref,
    lse_ref,
    *scratch,
    config: _Config,
):
    bq, head_dim = o_ref.shape
    q_meta = (q_kind_ref[...], q_unit_ref[...], q_pos_ref[...])

    def step(window, code, carry):
        acc, peak, total = carry
        k_meta = tuple(window.cols(r) for r in (k_kind_ref, k_unit_ref, k_region_ref, k_pos_ref))
        mask = _visible(q_meta, k_meta, code, lambda c: sel_ref[:, pl.ds(c, 1)], config.top_k)
        logits = _masked_logits(q_ref[...], window.rows(k_ref), mask, config.scale)
        new_peak = jnp.maximum(peak, jnp.max(logits, axis=1, keepdims=True))
        probs = jnp.where(mask, jnp.exp(logits - new_peak), 0.0)
        rescale = jnp.exp(peak - new_peak)
        total = total * rescale + jnp.sum(probs, axis=1, keepdims=True)
        v = window.rows(v_ref)
        acc = acc * rescale + dot(probs.astype(v.dtype), v, (1, 0))
        return acc, new_peak, total

    def init():
        return (
            jnp.zeros((bq, head_dim), jnp.float32),
            jnp.full((bq, 1), MASK_VALUE, jnp.float32),
            jnp.zeros((bq, 1), jnp.float32),
        )

    def finish(carry):
        acc, peak, total = carry
        seen = total > 0
        total = jnp.where(seen, total, 1.0)
        o_ref[...] = jnp.where(seen, acc / total, 0.0).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, peak + jnp.log(total), MASK_VALUE)

    _walk(config, plan_ref, _kv_window(config), step, init, finish, scratch)


def _backward_q_kernel(
    plan_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    q_kind_ref,
    q_unit_ref,
    q_pos_ref,
    k_kind_ref,
    k_unit_ref,
    k_region_ref,
    k_pos_ref,
    sel_ref,
    dq_ref,
    *scratch,
    config: _Config,
):
    q_meta = (q_kind_ref[...], q_unit_ref[...], q_pos_ref[...])

    def step(window, code, carry):
        (dq,) = carry
        k_meta = tuple(window.cols(r) for r in (k_kind_ref, k_unit_ref, k_region_ref, k_pos_ref))
        mask = _visible(q_meta, k_meta, code, lambda c: sel_ref[:, pl.ds(c, 1)], config.top_k)
        q, k = q_ref[...], window.rows(k_ref)
        logits = _masked_logits(q, k, mask, config.scale)
        probs = jnp.where(mask, jnp.exp(logits - lse_ref[...]), 0.0)
        d_logits = probs * (dot(do_ref[...], window.rows(v_ref), (1, 1)) - delta_ref[...])
        return (dq + dot(d_logits.astype(k.dtype), k, (1, 0)),)

    def finish(carry):
        dq_ref[...] = (carry[0] * config.scale).astype(dq_ref.dtype)

    init = lambda: (jnp.zeros(dq_ref.shape, jnp.float32),)  # noqa: E731
    _walk(config, plan_ref, _kv_window(config), step, init, finish, scratch)


def _backward_kv_kernel(
    plan_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    q_kind_ref,
    q_unit_ref,
    q_pos_ref,
    k_kind_ref,
    k_unit_ref,
    k_region_ref,
    k_pos_ref,
    sel_ref,
    dk_ref,
    dv_ref,
    *scratch,
    config: _Config,
):
    k, v = k_ref[...], v_ref[...]
    k_meta = (k_kind_ref[...], k_unit_ref[...], k_region_ref[...], k_pos_ref[...])

    def loop_window(entry):  # (query head, q tile) of a plan entry
        head, tile, _ = _kv_tile_entry(entry)
        bq = config.block_q
        return _Window((head,), pl.ds(pl.multiple_of(tile * bq, bq), bq))

    def step(window, code, carry):
        dk, dv = carry
        q_meta = tuple(window.rows(r, lead=False) for r in (q_kind_ref, q_unit_ref, q_pos_ref))
        mask = _visible(q_meta, k_meta, code, lambda c: window.column(sel_ref, c), config.top_k)
        q, d_out = window.rows(q_ref), window.rows(do_ref)
        logits = _masked_logits(q, k, mask, config.scale)
        probs = jnp.where(mask, jnp.exp(logits - window.rows(lse_ref)), 0.0)
        dv = dv + dot(probs.astype(d_out.dtype), d_out, (0, 0))
        d_logits = probs * (dot(d_out, v, (1, 1)) - window.rows(delta_ref))
        dk = dk + dot(d_logits.astype(q.dtype), q, (0, 0))
        return dk, dv

    def init():
        zeros = jnp.zeros(dk_ref.shape, jnp.float32)
        return zeros, zeros

    def finish(carry):
        dk, dv = carry
        dk_ref[...] = (dk * config.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv.astype(dv_ref.dtype)

    _walk(config, plan_ref, loop_window, step, init, finish, scratch)
