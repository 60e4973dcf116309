"""End-to-end greedy decoding speed: gazejax dense, gazejax gaze and transformers eager, one run.

The same random Qwen3 weights run in three ways on this machine, for each model shape of
:data:`MODELS`: ``small`` (Qwen2.5-0.5B-shaped with 2 layers: hidden 896, 14 query / 2 KV heads
× 64, MLP 4864; the LM head is most of a step's bytes) and ``qwen3-0.6b`` (28 layers, hidden
1024, 16 / 8 heads × 128, MLP 3072, 596M parameters: the KV cache is a real share of a step);
both with a tied vocabulary of 151936:

* ``dense``: :class:`gazejax.models.decoder.Decoder` with dense attention;
* ``gaze``: the same weights with gaze attention (region 6×6, |C| = 4 context tokens per unit,
  K regions with ``K·36 ≈ 16 %`` of the visual tokens, per query head or, with ``--routing
  shared``, per GQA group; per-head routing reads the union of a group's picks once per KV
  head, up to ``group·K`` regions);
* ``hf``: ``transformers`` ``Qwen3ForCausalLM`` (torch, ``attn_implementation="eager"``), loaded
  from the folder that :func:`gazejax.convert.save_hf` wrote.

The prompt: a "visual context" of N tokens, laid out as N/576 visual units of 24×24 tokens (N/1024
units of 32×32 when 576 does not divide N, e.g. 16384), each followed by its 4 context tokens,
then 16 text tokens. Every prompt token is a random embedding
(visual and context: ``N(0, 0.02²)``; text: rows of the embedding table for random ids), fed as
``inputs_embeds`` to all three. ``hf`` and ``dense`` see the prompt as one causal sequence (so
their greedy tokens must agree exactly; asserted). ``gaze`` gets the same embeddings in its
region-major storage order with the visual-unit metadata (text attends to the K selected regions
plus all text and context tokens), so its tokens may differ: the agreement fraction is reported.

Prefill is timed once per method (for contexts up to the model's ``prefill_up_to``, or
``--prefill-up-to``), in chunks that bound the attention matrix: ``dense`` and ``hf``
in chunks of ``--prefill-chunk`` tokens, ``gaze`` in chunks of whole visual units (as many as fit
in ``--prefill-chunk`` slots, at least one; the text goes with the last unit), since a unit's
tokens are stored region-major; JAX compile time is excluded and reported apart.
A longer context is not prefilled (28 layers of prefill at 16384 tokens take tens of minutes on
a 2-core CPU): every layer's cache is filled with the same random keys and values (standard
normal, as cached, after the k-norm and RoPE) in all three, gaze's in its storage order with its
region descriptors computed from them, and a random token starts the decoding; its rows say
``random`` and measure decode only. Then every method decodes ``--new-tokens`` tokens greedily,
one forward pass + argmax per step, the three methods' steps interleaved; tokens/s is
``1000 / median step ms``. Caches are allocated as the decoder's users get them
(``decoder.cache_slots``: a multiple of 128 slots).

The floor per step is the bytes one step must read (all weights, the tied LM head included, plus
the KV cache: all of it for dense and hf; the selected regions (per-head routing: ``heads·K``,
the union's upper bound), text, context tokens and region descriptors for gaze) divided by a
measured streaming-read bandwidth of this machine; ``by the bytes floor`` is dense's floor over
gaze's, the speed-up over dense that gaze's bytes allow.

    python benchmarks/generate.py      # small at 576 4608 16384 (prefilled), qwen3-0.6b at 576
                                       # (prefilled), 4608 and 16384 (random caches)
    python benchmarks/generate.py --models qwen3-0.6b --contexts 4608 --prefill-up-to 4608
    python benchmarks/generate.py --quick   # smoke run: vocab 32768, 8 tokens, small at 576,
                                            # qwen3-0.6b cut to 4 layers at 576 and 4608

Prints a table and writes ``benchmarks/results/generate_<platform>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import platform
import statistics
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gazejax.convert import save_hf
from gazejax.gaze import TextSegment, VisualSegment, batch_layouts, build_layout
from gazejax.models.decoder import (
    Decoder,
    DecoderConfig,
    KVCache,
    LayerCache,
    cache_slots,
    text_meta,
)
from kernels.gaze_attention import TokenKind, TokenMeta, region_descriptors

UNIT_SIDES = (24, 32)  # a visual unit is 24×24 = 576 tokens (32×32 where 576 does not divide N)
REGION = (6, 6, 1)
NUM_CONTEXT, TEXT_TOKENS, KV_FRACTION = 4, 16, 0.16
FLOAT_BYTES = 4
# Model shapes (Qwen3 weights, random, tied vocabulary) and the contexts each runs by default.
MODELS = {
    "small": dict(
        layers=2, hidden=896, intermediate=4864, heads=14, kv_heads=2, head_dim=64,
        contexts=(576, 4608, 16384), prefill_up_to=16384, new_tokens=32,
    ),
    "qwen3-0.6b": dict(
        layers=28, hidden=1024, intermediate=3072, heads=16, kv_heads=8, head_dim=128,
        contexts=(576, 4608, 16384), prefill_up_to=576, new_tokens=8,
    ),
}  # fmt: skip
# --quick: few contexts and the 28-layer shape cut to 4 layers (compile time dominates).
QUICK = {"small": dict(contexts=(576,)), "qwen3-0.6b": dict(contexts=(576, 4608), layers=4)}
SHAPE_FLAGS = ("layers", "hidden", "intermediate", "heads", "kv_heads", "head_dim")  # overrides
MODEL_FLAGS = (*SHAPE_FLAGS, "prefill_up_to", "new_tokens")


def model_config(args, attention: str, top_k: int = 1) -> DecoderConfig:
    return DecoderConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        tie_embeddings=True,
        max_position_embeddings=65536,
        attention=attention,
        gaze_top_k=top_k,
        gaze_routing=args.routing,
    )


# --- gazejax ---------------------------------------------------------------------------------


def _last(embeds):
    """``[1, 1]``: the slot whose logits a prefill chunk needs (the LM head runs on it only)."""
    return jnp.full((1, 1), embeds.shape[1] - 1, jnp.int32)


def _prefill_dense(model, params, embeds, cache):
    logits, cache = model.apply(
        {"params": params}, None, inputs_embeds=embeds, cache=cache, logit_slots=_last(embeds)
    )
    return logits[:, 0], cache


def _prefill_gaze(model, params, embeds, meta, regions, cache):
    logits, cache = model.apply(
        {"params": params},
        None,
        inputs_embeds=embeds,
        token_meta=meta,
        regions=regions,
        cache=cache,
        logit_slots=_last(embeds),
    )
    return logits[:, 0], cache


def _step_dense(model, params, token, cache):
    logits, cache = model.apply({"params": params}, token[:, None], cache=cache)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


def _step_gaze(model, params, token, position, cache, max_unrouted_tokens):
    shape = (1, 1)
    meta = TokenMeta(
        kind=jnp.full(shape, TokenKind.TEXT, jnp.int32),
        unit=jnp.full(shape, -1, jnp.int32),
        region=jnp.full(shape, -1, jnp.int32),
        position=jnp.reshape(position, shape).astype(jnp.int32),
    )
    logits, cache = model.apply(
        {"params": params},
        token[:, None],
        token_meta=meta,
        cache=cache,
        max_unrouted_tokens=max_unrouted_tokens,
    )
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


def _unit_chunks(unit: np.ndarray, chunk: int) -> list[int]:
    """Chunk boundaries in storage order: whole units (slots of one ``unit`` id, its context
    tokens included), as many as fit in ``chunk`` slots (at least one); trailing text joins the
    last chunk."""
    starts = [0, *(int(i) + 1 for i in np.flatnonzero(unit[1:] != unit[:-1]))]
    units = [s for s in starts if unit[s] >= 0] + [len(unit)]
    cuts = [0]
    for start, stop in zip(units[:-1], units[1:], strict=True):
        if stop - cuts[-1] > chunk and start > cuts[-1]:
            cuts.append(start)
    return [*cuts, len(unit)]


class JaxRunner:
    """A gazejax Decoder's cache, filled by a timed prefill (compile excluded) or with given
    keys and values, then one-token greedy steps."""

    def __init__(self, name, model, params, embeds, new_tokens, chunk, layout=None):
        self.name, self.model, self.params = name, model, params
        self.layout = layout
        length = embeds.shape[0]
        self.length = length
        self.slots = cache_slots(length + new_tokens + 1)
        self.regions = None
        if layout is None:
            self.pieces = [
                jnp.asarray(embeds[i : i + chunk])[None] for i in range(0, length, chunk)
            ]
        else:
            meta, regions = batch_layouts([layout])
            self.meta, self.regions = meta, regions
            storage = jnp.asarray(layout.to_storage(embeds))[None]
            cuts = _unit_chunks(np.asarray(meta.unit[0]), chunk)
            self.pieces = [
                (storage[:, a:b], jax.tree.map(lambda x, a=a, b=b: x[:, a:b], meta))
                for a, b in zip(cuts[:-1], cuts[1:], strict=True)
            ]
            self.unrouted = TEXT_TOKENS + NUM_CONTEXT * layout.num_units + new_tokens + 1

    def _empty(self, num_layers: int) -> KVCache:
        """An empty cache of the runner's slots with ``num_layers`` layers of zeros."""
        config = dataclasses.replace(self.model.config, num_layers=num_layers)
        return KVCache.empty(config, 1, self.slots, regions=self.regions)

    def prefill(self) -> tuple[float, float]:
        """Returns (compile s, prefill s); leaves the first greedy token in ``self.token``."""
        self.cache = self._empty(self.model.config.num_layers)
        begin = time.perf_counter()
        if self.layout is None:
            fn = jax.jit(_prefill_dense, static_argnums=0, donate_argnums=3)
            compiled = {}
            for piece in self.pieces:
                if piece.shape not in compiled:
                    compiled[piece.shape] = fn.lower(
                        self.model, self.params, piece, self.cache
                    ).compile()
            compile_s = time.perf_counter() - begin
            begin = time.perf_counter()
            cache = self.cache
            for piece in self.pieces:
                logits, cache = compiled[piece.shape](self.params, piece, cache)
        else:
            fn = jax.jit(_prefill_gaze, static_argnums=0, donate_argnums=5)
            compiled = {}
            for piece, meta in self.pieces:
                if piece.shape not in compiled:
                    compiled[piece.shape] = fn.lower(
                        self.model, self.params, piece, meta, self.regions, self.cache
                    ).compile()
            compile_s = time.perf_counter() - begin
            begin = time.perf_counter()
            cache = self.cache
            for piece, meta in self.pieces:
                logits, cache = compiled[piece.shape](self.params, piece, meta, self.regions, cache)
        self.token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        jax.block_until_ready((self.token, cache))
        prefill_s = time.perf_counter() - begin
        self.cache = cache
        return compile_s + self._compile_step(), prefill_s

    def fill(self, layer_kv, token: int) -> tuple[float, None]:
        """The cache holding ``layer_kv(i) -> (keys, values)`` (``[length, kv_heads, d]``
        arrays in raster order, as cached: after the k-norm and RoPE) instead of a prefill's,
        and ``token`` as the first greedy token; returns (compile s, None)."""
        empty = self._empty(0)  # metadata only: no zeros beside the filled layers
        layers = []
        for i in range(self.model.config.num_layers):
            keys, values = layer_kv(i)
            if self.layout is not None:  # gaze stores each unit region-major
                keys, values = self.layout.to_storage(keys), self.layout.to_storage(values)
            rows = [_as_rows(x, self.slots) for x in (keys, values)]
            descriptors = None
            if self.layout is not None:
                descriptors = region_descriptors(
                    jnp.asarray(keys)[None], self.meta, self.regions.num_regions
                )
            layers.append(LayerCache(*rows, descriptors))
        if self.layout is None:
            positions = jnp.arange(self.length, dtype=jnp.int32)[None]
            meta = text_meta(positions, jnp.ones((1, self.length), bool))
        else:
            meta = self.meta
        self.cache = empty.update(
            layers, empty.write_meta(meta, jnp.int32(0)), empty.regions, jnp.int32(self.length)
        )
        self.token = jnp.asarray([token], jnp.int32)
        return self._compile_step(), None

    def _compile_step(self) -> float:
        """Compiles the one-token step for the current cache; returns the seconds it took."""
        begin = time.perf_counter()
        self.position = self.length
        if self.layout is None:
            self._step = (
                jax.jit(_step_dense, static_argnums=0, donate_argnums=3)
                .lower(self.model, self.params, self.token, self.cache)
                .compile()
            )
        else:
            self._step = (
                jax.jit(_step_gaze, static_argnums=(0, 5), donate_argnums=4)
                .lower(self.model, self.params, self.token, jnp.int32(0), self.cache, self.unrouted)
                .compile()
            )
        return time.perf_counter() - begin

    def first_token(self) -> int:
        return int(self.token[0])

    def step(self) -> int:
        if self.layout is None:
            self.token, self.cache = self._step(self.params, self.token, self.cache)
        else:
            self.token, self.cache = self._step(
                self.params, self.token, jnp.int32(self.position), self.cache
            )
        self.position += 1
        return int(self.token[0])  # blocks


def _as_rows(x: np.ndarray, slots: int) -> jax.Array:
    """``x [length, kv_heads, d]`` as the cache rows ``[kv_heads, slots, d]`` (tail zeros)."""
    rows = np.swapaxes(x, 0, 1)
    return jnp.asarray(np.pad(rows, [(0, 0), (0, slots - rows.shape[1]), (0, 0)]))


# --- transformers ------------------------------------------------------------------------------


def _output_cache(out):
    """The KV cache of a transformers output (``cache`` or, before 5.2x, ``past_key_values``)."""
    return out["cache"] if "cache" in out else out["past_key_values"]


class HFRunner:
    """The same steps in transformers eager (torch, CPU)."""

    name = "hf"

    def __init__(self, folder, embeds, chunk):
        import torch
        import transformers

        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, attn_implementation="eager", dtype=torch.float32
        ).eval()
        self.embeds = torch.from_numpy(np.ascontiguousarray(embeds))[None]
        self.chunk = chunk
        # transformers >= 5.2x names the cache argument ``cache`` (``past_key_values`` before).
        params = inspect.signature(self.model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        with torch.inference_mode():  # warm-up of torch's kernels
            self.model(inputs_embeds=self.embeds[:, :8], use_cache=True)

    def prefill(self) -> tuple[float, float]:
        torch = self.torch
        begin = time.perf_counter()
        cache = None
        with torch.inference_mode():
            for i in range(0, self.embeds.shape[1], self.chunk):
                out = self.model(
                    inputs_embeds=self.embeds[:, i : i + self.chunk],
                    use_cache=True,
                    logits_to_keep=1,
                    **{self.cache_arg: cache},
                )
                cache = _output_cache(out)
        self.token = out.logits[:, -1].argmax(-1)
        self.cache = cache
        return 0.0, time.perf_counter() - begin

    def fill(self, layer_kv, token: int) -> tuple[float, None]:
        """:meth:`JaxRunner.fill`: a ``DynamicCache`` holding ``layer_kv(i)``."""
        import transformers

        self.cache = transformers.DynamicCache()
        for i in range(self.model.config.num_hidden_layers):
            keys, values = (
                self.torch.from_numpy(np.ascontiguousarray(np.swapaxes(x, 0, 1))[None])
                for x in layer_kv(i)
            )
            self.cache.update(keys, values, i)
        self.token = self.torch.tensor([token])
        return 0.0, None

    def first_token(self) -> int:
        return int(self.token[0])

    def step(self) -> int:
        with self.torch.inference_mode():
            out = self.model(
                input_ids=self.token[:, None], use_cache=True, **{self.cache_arg: self.cache}
            )
        self.cache = _output_cache(out)
        self.token = out.logits[:, -1].argmax(-1)
        return int(self.token[0])


# --- bytes -------------------------------------------------------------------------------------


def read_bandwidth_gbs(mbytes: int = 256, reps: int = 5) -> float:
    """Streaming-read bandwidth (GB/s): median time of a jitted sum over ``mbytes`` MB."""
    x = jnp.ones((mbytes * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    jax.block_until_ready(total(x))
    times = []
    for _ in range(reps):
        begin = time.perf_counter()
        jax.block_until_ready(total(x))
        times.append(time.perf_counter() - begin)
    return x.size * 4 / statistics.median(times) / 1e9


def step_bytes(args, length: int, layout=None, top_k: int = 0) -> dict:
    """Bytes one decode step reads: weights (minus the unread embedding rows) and the KV cache."""
    d, f, h, kv, hd = args.hidden, args.intermediate, args.heads, args.kv_heads, args.head_dim
    layer = d * (h + 2 * kv) * hd + h * hd * d + 3 * d * f + 2 * d + 2 * hd
    weights = (args.layers * layer + args.vocab * d + d) * FLOAT_BYTES  # tied LM head read once
    if layout is None:
        kv_bytes = args.layers * 2 * length * kv * hd * FLOAT_BYTES
    else:
        m = layout.region_capacity
        unrouted = TEXT_TOKENS + NUM_CONTEXT * layout.num_units
        readers = h if args.routing == "per_head" else kv  # heads that each read K regions
        per_layer = (
            2 * readers * top_k * m * hd + 2 * unrouted * kv * hd + layout.num_regions * kv * hd
        ) * FLOAT_BYTES + 4 * (length + 3 * layout.num_regions)
        kv_bytes = args.layers * per_layer
    return dict(weight_bytes=weights, kv_bytes=kv_bytes, bytes=weights + kv_bytes)


# --- one context -------------------------------------------------------------------------------


def run_context(args, n_visual, dense_model, gaze_model, params, table, hf_folder, bandwidth):
    side = next((s for s in UNIT_SIDES if n_visual % (s * s) == 0), None)
    if side is None:
        raise ValueError(f"context {n_visual} is not a whole number of 24×24 or 32×32 units")
    units = n_visual // (side * side)
    layout = build_layout(
        [VisualSegment(side, side, units), TextSegment(TEXT_TOKENS)], REGION, NUM_CONTEXT
    )
    length = layout.length
    m = layout.region_capacity
    top_k = max(1, round(KV_FRACTION * n_visual / m))  # K·m ≈ 16 % of all visual tokens
    rng = np.random.default_rng(n_visual)
    embeds = (0.02 * rng.standard_normal((length, args.hidden))).astype(np.float32)
    text_ids = rng.integers(0, args.vocab, TEXT_TOKENS)
    embeds[-TEXT_TOKENS:] = table[text_ids]  # raster order: units+context, then text

    prefilled = n_visual <= args.prefill_up_to
    if not prefilled:  # the cache is filled with random keys and values instead

        def layer_kv(i):  # the same for every runner: [length, kv_heads, head_dim] K and V
            draw = np.random.default_rng((n_visual, i))
            shape = (length, args.kv_heads, args.head_dim)
            return tuple(draw.standard_normal(shape, np.float32) for _ in range(2))

        first_token = int(rng.integers(0, args.vocab))
    runners = [
        JaxRunner("dense", dense_model, params, embeds, args.new_tokens, args.prefill_chunk),
        JaxRunner(
            "gaze",
            gaze_model.clone(config=_with_top_k(gaze_model.config, top_k)),
            params,
            embeds,
            args.new_tokens,
            args.prefill_chunk,
            layout=layout,
        ),
        HFRunner(hf_folder, embeds, args.prefill_chunk),
    ]
    compile_s, prefill_s, tokens, step_ms = {}, {}, {}, {}
    for r in runners:
        filled = r.prefill() if prefilled else r.fill(layer_kv, first_token)
        compile_s[r.name], prefill_s[r.name] = filled
        tokens[r.name] = [r.first_token()]
        step_ms[r.name] = []
    for _ in range(args.new_tokens):
        for r in runners:
            begin = time.perf_counter()
            tokens[r.name].append(r.step())
            step_ms[r.name].append((time.perf_counter() - begin) * 1e3)
    del runners

    median_ms = {k: statistics.median(v) for k, v in step_ms.items()}
    tok_s = {k: 1e3 / v for k, v in median_ms.items()}
    floors = {"dense": step_bytes(args, length), "gaze": step_bytes(args, length, layout, top_k)}
    floors["hf"] = floors["dense"]
    for fl in floors.values():
        fl["floor_ms"] = fl["bytes"] / (bandwidth * 1e9) * 1e3
    agree = np.mean(np.asarray(tokens["gaze"]) == np.asarray(tokens["dense"]))
    return dict(
        n_visual=n_visual,
        unit_side=side,
        units=units,
        prompt_length=length,
        cache="prefill" if prefilled else "random",
        top_k=top_k,
        region_size=m,
        gaze_kv_fraction=top_k * m / n_visual,
        new_tokens=args.new_tokens,
        prefill_s=prefill_s,
        compile_s=compile_s,
        step_ms=step_ms,
        median_step_ms=median_ms,
        tokens_per_s=tok_s,
        dense_vs_hf=tok_s["dense"] / tok_s["hf"],
        gaze_vs_hf=tok_s["gaze"] / tok_s["hf"],
        gaze_vs_dense=tok_s["gaze"] / tok_s["dense"],
        floor=floors,
        floor_gaze_vs_dense=floors["dense"]["bytes"] / floors["gaze"]["bytes"],
        tokens=tokens,
        dense_equals_hf=tokens["dense"] == tokens["hf"],
        gaze_agreement=float(agree),
    )


def _with_top_k(config: DecoderConfig, top_k: int) -> DecoderConfig:
    return dataclasses.replace(config, gaze_top_k=top_k)


# --- main --------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", nargs="+", choices=tuple(MODELS), default=list(MODELS), help="model shapes"
    )
    parser.add_argument(
        "--contexts",
        type=int,
        nargs="+",
        default=None,
        help="visual tokens (multiples of 576 or 1024); default: each model's (MODELS)",
    )
    parser.add_argument(
        "--new-tokens", type=int, default=None, help="default: the model's (MODELS; --quick: 8)"
    )
    parser.add_argument("--vocab", type=int, default=151936)
    for flag in SHAPE_FLAGS:
        parser.add_argument(f"--{flag.replace('_', '-')}", type=int, default=None)
    parser.add_argument(
        "--prefill-up-to",
        type=int,
        default=None,
        help="prefill contexts up to this many visual tokens; a longer context's cache is "
        "filled with random keys and values, for its decode steps only (default: the model's)",
    )
    parser.add_argument("--prefill-chunk", type=int, default=1024)
    parser.add_argument(
        "--routing",
        choices=("per_head", "shared"),
        default="per_head",
        help="gaze routing: K regions per query head, or per GQA group",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: QUICK (small at 576, qwen3-0.6b with 4 layers at 576 and 4608), 8 new "
        "tokens, vocab 32768",
    )
    parser.add_argument(
        "--out", default=None, help="JSON path; default benchmarks/results/generate_<platform>.json"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.new_tokens, args.vocab = args.new_tokens or 8, 32768
    return args


def model_args(args, name: str) -> argparse.Namespace:
    """``args`` with the shape of ``MODELS[name]`` (less the flags given) and its contexts."""
    shape = dict(MODELS[name], **(QUICK[name] if args.quick else {}))
    shape.update({k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None})
    shape["contexts"] = list(args.contexts or shape["contexts"])
    return argparse.Namespace(**{**vars(args), **shape, "model": name})


def main(argv=None) -> dict:
    args = parse_args(argv)
    platform_name = jax.devices()[0].platform
    results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    out = args.out or os.path.join(results, f"generate_{platform_name}.json")
    bandwidth = read_bandwidth_gbs()
    print(
        f"device: {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores); float32; region {REGION[:2]}, routing {args.routing}, "
        f"|C| {NUM_CONTEXT}, {TEXT_TOKENS} text tokens; read bandwidth {bandwidth:.1f} GB/s",
        flush=True,
    )
    records = []
    for name in args.models:
        run_model(
            model_args(args, name),
            bandwidth,
            records,
            lambda: _write(out, args, bandwidth, records),
        )
    print(f"wrote {len(records)} records to {out}")
    for r in records:
        assert r["dense_equals_hf"], (
            f"{r['model']} N={r['n_visual']}: dense {r['tokens']['dense']} != transformers "
            f"{r['tokens']['hf']}"
        )
    return _write(out, args, bandwidth, records)


def run_model(args, bandwidth, records: list[dict], save) -> None:
    """Every context of one model shape: prints its rows, appends to ``records``, ``save()``s."""
    dense_model = Decoder(model_config(args, "dense"))
    gaze_model = Decoder(model_config(args, "gaze"))
    params = dense_model.init(jax.random.key(args.seed), jnp.zeros((1, 4), jnp.int32))["params"]
    params = jax.tree.map(np.asarray, nn.unbox(params))
    table = np.asarray(params["embed_tokens"]["embedding"])
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(
        f"\n{args.model}: Qwen3 {args.layers} layers, hidden {args.hidden}, heads {args.heads}/"
        f"{args.kv_heads}x{args.head_dim}, mlp {args.intermediate}, vocab {args.vocab} (tied), "
        f"{n_params / 1e6:.0f}M params; {args.new_tokens} new tokens; contexts above "
        f"{args.prefill_up_to} visual tokens get a random cache",
        flush=True,
    )
    header = (
        f"{'N':>6} {'K':>3} {'method':6} {'prefill s':>9} {'vs hf':>6} {'step ms':>8} "
        f"{'tok/s':>7} {'vs hf':>6} {'vs dense':>8} {'floor ms':>8} {'floor tok/s':>11} "
        f"{'KV MB':>7}"
    )
    with tempfile.TemporaryDirectory() as folder:
        save_hf(dense_model, params, folder)
        print(header, flush=True)
        for n_visual in args.contexts:
            r = run_context(
                args, n_visual, dense_model, gaze_model, params, table, folder, bandwidth
            )
            r.update(model=args.model, n_params=n_params)
            records.append(r)
            for name in ("dense", "gaze", "hf"):
                fl = r["floor"][name]
                vs_dense = f"{r['gaze_vs_dense']:>8.2f}" if name == "gaze" else f"{'':>8}"
                prefill = r["prefill_s"][name]
                prefill = (
                    f"{prefill:>9.2f} {r['prefill_s']['hf'] / prefill:>6.2f}"
                    if prefill
                    else f"{'random':>9} {'':>6}"
                )
                print(
                    f"{n_visual:>6} {r['top_k']:>3} {name:6} {prefill} "
                    f"{r['median_step_ms'][name]:>8.1f} {r['tokens_per_s'][name]:>7.1f} "
                    f"{r['tokens_per_s'][name] / r['tokens_per_s']['hf']:>6.2f} {vs_dense} "
                    f"{fl['floor_ms']:>8.1f} {1e3 / fl['floor_ms']:>11.1f} "
                    f"{fl['kv_bytes'] / 1e6:>7.1f}"
                )
            print(
                f"dense tokens == transformers tokens: {r['dense_equals_hf']}; gaze agreement "
                f"with dense: {r['gaze_agreement']:.2f}; gaze / dense {r['gaze_vs_dense']:.2f}, "
                f"by the bytes floor {r['floor_gaze_vs_dense']:.2f} "
                f"({r['gaze_vs_dense'] / r['floor_gaze_vs_dense']:.2f} of it)",
                flush=True,
            )
            save()  # after every context


def _write(out, args, bandwidth, records) -> dict:
    platform_name = jax.devices()[0].platform
    result = dict(
        device=jax.devices()[0].device_kind,
        platform=platform_name,
        cpu_count=os.cpu_count(),
        read_bandwidth_gbs=bandwidth,
        config={k: v for k, v in vars(args).items() if k != "out"},
        models={name: MODELS[name] for name in args.models},
        region=REGION,
        num_context=NUM_CONTEXT,
        text_tokens=TEXT_TOKENS,
        records=records,
    )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
