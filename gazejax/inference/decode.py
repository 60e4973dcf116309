"""Autoregressive decoding with the KV cache: prefill once, then one jitted step per token.

big_vision/PaliGemma style: a Python loop over two jitted functions (prefill and extend), easy to
debug and to stop at end-of-sequence. Two loops:

- :func:`generate_answer`: the multimodal model on a packed :class:`Prompt` (images / video and
  text), one sample; gaze decode reads the text, the context tokens and the selected regions
  only. Token ``i`` is predicted by the query of the token before it (the last prompt token for
  ``i = 0``), so ``selections[i]`` are that query's regions.
- :func:`generate_token_ids`: the text-only :class:`Decoder` on a batch of token ids (left
  padded); what the Hugging Face parity tests compare with ``transformers``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from jax.sharding import NamedSharding, PartitionSpec

from gazejax.data.vocab import IM_END_TOKEN
from gazejax.gaze.inputs import MultimodalInputs
from gazejax.inference.probes import selections_at
from gazejax.inference.prompts import Prompt
from gazejax.inference.sampling import sample_next_token
from gazejax.inference.sequence_parallel import decode_shards, shard_prompt
from gazejax.models.decoder import Decoder, KVCache, cache_slots
from gazejax.models.mllm import MultimodalModel
from gazejax.sharding import mesh_rules
from kernels.gaze_attention import TokenKind, TokenMeta

# --- The multimodal model on a prompt ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """What :func:`generate_answer` produced.

    Attributes:
      text: the answer, decoded without special tokens.
      token_ids: int32 ``[n]``: the generated tokens, the stop token included when emitted.
      selections: gaze only: int32 ``[n, num_layers, num_heads, top_k]`` region ids selected
        by the query that predicted each token (``-1``: no region in that slot); else None.
      finished: whether generation stopped at the stop token.
    """

    text: str
    token_ids: np.ndarray
    selections: np.ndarray | None
    finished: bool


@functools.partial(jax.jit, static_argnames=("model", "top_k", "max_len"))
def _prefill(model: MultimodalModel, params, inputs: MultimodalInputs, last_slot, top_k, max_len):
    cache = KVCache.empty(model.config.decoder, 1, max_len, regions=inputs.regions)
    slots = jnp.reshape(last_slot, (1, 1))
    (logits, cache), state = model.apply(
        {"params": params},
        inputs,
        top_k=top_k,
        cache=cache,
        logit_slots=slots,
        mutable=["intermediates"],
    )
    return logits[0, 0], cache, selections_at(state, last_slot)


@functools.partial(
    jax.jit,
    static_argnames=("model", "top_k", "max_unrouted_tokens"),
    donate_argnames=("cache",),
)
def _step(model: MultimodalModel, params, token, position, cache, top_k, max_unrouted_tokens):
    """One decode step of ``token`` (int32 scalar) at ``position``; compiled once per shape."""
    shape = (1, 1)
    meta = TokenMeta(
        kind=jnp.full(shape, TokenKind.TEXT, jnp.int32),
        unit=jnp.full(shape, -1, jnp.int32),
        region=jnp.full(shape, -1, jnp.int32),
        position=jnp.full(shape, position, jnp.int32),
    )
    (logits, cache), state = model.apply(
        {"params": params},
        jnp.full(shape, token, jnp.int32),
        meta,
        cache,
        top_k=top_k,
        max_unrouted_tokens=max_unrouted_tokens,
        method=MultimodalModel.extend,
        mutable=["intermediates"],
    )
    return logits[0, -1], cache, selections_at(state, 0)


def generate_answer(
    model: MultimodalModel,
    params,
    prompt: Prompt,
    max_new_tokens: int,
    *,
    tokenizer: tokenizers.Tokenizer | None = None,
    top_k: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng: jax.Array | None = None,
    eos_id: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> GenerationResult:
    """Prefills ``prompt`` into a KV cache, then decodes one jitted step per token.

    Args:
      model, params: a :class:`MultimodalModel` (dense or gaze attention) and its parameters.
      prompt: from :func:`~gazejax.inference.prompts.build_prompt`.
      max_new_tokens: the most tokens to generate.
      tokenizer: decodes the answer's text (empty text without one); its ``<|im_end|>`` is the
        default ``eos_id``.
      top_k: gaze K, regions per query head; default ``model.config.decoder.gaze_top_k``
        (a dense model takes none).
      temperature, top_p: see :func:`~gazejax.inference.sampling.sample_next_token`; 0 is greedy.
      rng: PRNG key, needed when sampling.
      eos_id: stop once this token is generated.
      mesh: split the KV cache along its sequence over the mesh's ``sequence`` axis (other
        axes of size 1; :mod:`gazejax.inference.sequence_parallel`); the same tokens, and
        selections in the same region ids, as without.
    """
    options = dict(
        tokenizer=tokenizer,
        top_k=top_k,
        temperature=temperature,
        top_p=top_p,
        rng=rng,
        eos_id=eos_id,
    )
    if mesh is None:
        return _generate_answer(model, params, prompt, max_new_tokens, **options)
    sharded = shard_prompt(prompt, decode_shards(mesh), room=max_new_tokens)
    params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    with mesh_rules(mesh):
        result = _generate_answer(
            model, params, sharded.prompt, max_new_tokens, free_slot=sharded.free_slot, **options
        )
    if result.selections is None:
        return result
    return dataclasses.replace(result, selections=sharded.original_regions(result.selections))


def _generate_answer(
    model: MultimodalModel,
    params,
    prompt: Prompt,
    max_new_tokens: int,
    *,
    tokenizer: tokenizers.Tokenizer | None,
    top_k: int | None,
    temperature: float,
    top_p: float,
    rng: jax.Array | None,
    eos_id: int | None,
    free_slot: int | None = None,
) -> GenerationResult:
    """:func:`generate_answer` on the current mesh; the answer's tokens go to the cache's slots
    from ``free_slot`` on (default: after the prompt's ``length`` slots)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    gaze = model.config.decoder.attention == "gaze"
    if not gaze and top_k is not None:
        raise ValueError(f"top_k={top_k} is gaze's K, but the model's attention is dense")
    if gaze and top_k is None:
        top_k = model.config.decoder.gaze_top_k
    if eos_id is None and tokenizer is not None:
        eos_id = tokenizer.token_to_id(IM_END_TOKEN)
    if temperature > 0 and rng is None:
        rng = jax.random.key(0)
    logits, cache, selection = _prefill(
        model,
        params,
        prompt.inputs,
        jnp.int32(prompt.last_slot),
        top_k=top_k,
        max_len=prompt.length
        if free_slot is not None
        else cache_slots(prompt.length + max_new_tokens),
    )
    if free_slot is not None:
        cache = cache.replace(end=jnp.int32(free_slot))
    unrouted = prompt.num_unrouted + max_new_tokens if gaze else None
    tokens, selections = [], []
    finished = False
    for i in range(max_new_tokens):
        step_rng = None if rng is None else jax.random.fold_in(rng, i)
        token = int(sample_next_token(logits[None], step_rng, temperature, top_p)[0])
        tokens.append(token)
        if selection is not None:
            selections.append(np.asarray(selection))
        if token == eos_id:
            finished = True
            break
        if i + 1 == max_new_tokens:
            break
        logits, cache, selection = _step(
            model,
            params,
            jnp.int32(token),
            jnp.int32(prompt.next_position + i),
            cache,
            top_k=top_k,
            max_unrouted_tokens=unrouted,
        )
    token_ids = np.asarray(tokens, np.int32)
    text = "" if tokenizer is None else tokenizer.decode(tokens, skip_special_tokens=True)
    return GenerationResult(
        text=text,
        token_ids=token_ids,
        selections=np.stack(selections) if selections else None,
        finished=finished,
    )


# --- The text-only decoder on token ids --------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def _extend(model: Decoder, params, input_ids, positions, input_mask, cache: KVCache):
    """Runs ``input_ids [batch, seq]`` against the cache; returns last logits and the cache."""
    logits, cache = model.apply(
        {"params": params}, input_ids, positions, input_mask=input_mask, cache=cache
    )
    return logits[:, -1], cache


def generate_token_ids(
    model: Decoder,
    params,
    prompt_ids: jax.Array,
    max_new_tokens: int,
    *,
    prompt_mask: jax.Array | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng: jax.Array | None = None,
    eos_id: int | None = None,
) -> jax.Array:
    """Generates ``max_new_tokens`` after each prompt.

    Args:
      model, params: a :class:`Decoder` and its parameters.
      prompt_ids: int ``[batch, prompt_len]``, **left**-padded when lengths differ.
      max_new_tokens: number of tokens to generate.
      prompt_mask: bool ``[batch, prompt_len]``, False on the left padding; default all True.
      temperature, top_p: see :func:`sample_next_token`; 0 means greedy.
      rng: PRNG key, needed when sampling.
      eos_id: once a sample emits it, the sample's later tokens are ``eos_id``; the loop stops
        early when every sample has finished.

    Returns:
      int32 ``[batch, max_new_tokens]``.
    """
    batch, prompt_len = prompt_ids.shape
    prompt_mask = (
        jnp.ones((batch, prompt_len), bool) if prompt_mask is None else prompt_mask.astype(bool)
    )
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
    cache = KVCache.empty(model.config, batch, cache_slots(prompt_len + max_new_tokens))
    logits, cache = _extend(
        model, params, prompt_ids.astype(jnp.int32), positions, prompt_mask, cache
    )
    next_position = positions[:, -1:] + 1
    finished = jnp.zeros((batch,), bool)
    tokens = []
    for step in range(max_new_tokens):
        step_rng = None if rng is None else jax.random.fold_in(rng, step)
        token = sample_next_token(logits, step_rng, temperature, top_p)
        if eos_id is not None:
            token = jnp.where(finished, eos_id, token)
            finished = finished | (token == eos_id)
        tokens.append(token)
        if step + 1 == max_new_tokens or (eos_id is not None and bool(finished.all())):
            break
        logits, cache = _extend(
            model, params, token[:, None], next_position, jnp.ones((batch, 1), bool), cache
        )
        next_position = next_position + 1
    out = jnp.stack(tokens, axis=1)
    if out.shape[1] < max_new_tokens:
        out = jnp.pad(out, ((0, 0), (0, max_new_tokens - out.shape[1])), constant_values=eos_id)
    return out
