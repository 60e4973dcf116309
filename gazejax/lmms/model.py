"""The lmms-eval model ``gazejax``: a training workdir's checkpoint behind lmms-eval's API.

``--model_args`` (all optional but ``workdir``):
  workdir: the directory given to ``python -m gazejax.train --workdir``, or a Hugging Face
    LLaVA folder (imported, or exported by ``python -m gazejax.convert workdir-to-hf``).
  step: the checkpoint step (default: the latest).
  attention: ``dense`` or ``gaze`` (default: the checkpoint's); the same weights either way.
  top_k / budget: gaze only, at most one: K >= 1 regions per query head, or the fraction of
    each request's visual regions, ``K = max(1, round(budget · regions))`` as in
    ``python -m gazejax.evaluate``; default the checkpoint's ``gaze.top_k``. A request with at
    most K regions reads all of them (DESIGN.md §3): one K serves requests of every size.
  max_new_tokens: when a task's ``generation_kwargs`` name none (default 32).
  max_frames, fps: video sampling (default: the training data's ``max_frames``, 1 frame/s).
  seed: sampling seed (request ``i`` samples with ``fold_in(key(seed), i)``).
  mesh: a device mesh as ``python -m gazejax.generate --mesh`` takes it, with ``;`` between
    axes in ``--model_args`` (whose separator is ``,``), e.g. ``mesh=sequence=8``: decoding
    splits the KV cache along its sequence over the ``sequence`` axis (its other axes 1) and
    ``loglikelihood`` runs its forward over the mesh; default one device.
  score: what ``loglikelihood`` returns first: ``nll`` (default), the summed negative
    log-likelihood ``-log p(continuation | prompt)``, or ``loglik``, its negation. lmms-eval's
    ``multiple_choice`` picks the option of *smallest* value (``argmin``: its models return a
    loss; EvolvingLMMs-Lab/lmms-eval#370), so ``nll`` ranks options by likelihood there;
    ``loglik`` is lm-eval's convention (its ``perplexity`` aggregation, ``exp(-mean)``, wants it).
lmms-eval's ``batch_size`` batches ``loglikelihood`` requests (``generate_until`` runs one
request at a time); ``device`` is ignored: JAX runs on its default backend.

Prompting is the training template (ChatML with the training system prompt; one ``<image>``
per visual before the task's text unless the text places them), so a task's ``doc_to_text`` is
the user turn. ``loglikelihood`` returns ``(-log p(continuation | prompt), is_greedy)`` (see
``score``) summed over the continuation's tokens, tokenized apart from the prompt, as
lmms-eval's own models do.
The continuation is the assistant's answer: its leading whitespace (lmms-eval's
``target_delimiter``) is dropped, as training answers start right after ``assistant\n``; the
closing ``<|im_end|>`` is not scored. ``generate_until`` decodes with the KV cache and
gaze decode (:func:`gazejax.inference.generate_answer`) until ``<|im_end|>`` or
``max_new_tokens``, then cuts the text at the first ``until`` string. Visuals from a task's
``doc_to_visual``: PIL images, image paths, video files or folders of frames.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from lmms_eval.api.instance import GenerationResult, Instance, unwrap_generation_output
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from gazejax.data.images import preprocess, read_image
from gazejax.data.packing import Text, Visual, pack_batch
from gazejax.data.video import FRAME_SUFFIXES, read_video
from gazejax.eval.methods.gaze import gaze_top_k
from gazejax.inference import (
    generate_answer,
    load_checkpoint,
    pack_prompt,
    prompt_items,
    with_attention,
)
from gazejax.inference.sequence_parallel import decode_shards
from gazejax.losses import answer_exact_match, answer_loglik
from gazejax.models.mllm import MultimodalModel
from gazejax.sharding import make_mesh, mesh_rules, parse_mesh

log = logging.getLogger(__name__)

PAD_MULTIPLE = 64
"""Request lengths are rounded up to a multiple of this: fewer shapes, fewer compilations."""
MANGLES_PAIRS = unwrap_generation_output((0.0, True))[0] != (0.0, True)
"""lmms-eval 0.7's evaluator passes every model output through ``unwrap_generation_output``,
which turns a ``(loglik, is_greedy)`` tuple into its ``str`` (every ``multiple_choice`` task then
fails in ``process_results``); a :class:`GenerationResult` payload passes through untouched."""
SAMPLING_KEYS = ("until", "max_new_tokens", "temperature", "top_p", "do_sample", "num_beams")


def read_visuals(
    visuals: Sequence | None, *, image_size: int, max_frames: int, fps: float
) -> list[np.ndarray]:
    """Preprocessed float32 ``[frames, H, W, 3]`` per visual of a task's ``doc_to_visual``.

    PIL images and image files (suffixes of ``FRAME_SUFFIXES``) are one frame; other paths are
    videos (a file or a folder of frames, sampled at ``fps`` up to ``max_frames``).

    Raises:
      DataError: a missing or corrupt file (naming it).
      TypeError: anything else (audio, say).
    """
    out = []
    for visual in visuals or ():
        if isinstance(visual, Image.Image):
            out.append(preprocess(visual.convert("RGB"), image_size)[None])
        elif isinstance(visual, (str, pathlib.Path)):
            path = pathlib.Path(visual)
            if path.suffix.lower() in FRAME_SUFFIXES:
                out.append(read_image(path, image_size)[None])
            else:
                frames, _ = read_video(path, image_size=image_size, max_frames=max_frames, fps=fps)
                out.append(frames)
        else:
            raise TypeError(
                "gazejax reads images (PIL or a path) and videos (a file or a folder of frames); "
                f"doc_to_visual gave {type(visual).__name__}"
            )
    return out


def with_continuation(items: list, continuation: np.ndarray) -> list:
    """Prompt ``items`` (ending in a text span) followed by ``continuation`` token ids, with
    next-token targets on exactly the continuation's tokens."""
    if not isinstance(items[-1], Text) or len(continuation) == 0:
        raise ValueError("need a prompt ending in text and a non-empty continuation")
    last = items[-1]
    targets = np.full(len(last.ids), -1, np.int32)
    targets[-1] = continuation[0]
    follow = np.append(continuation[1:], -1).astype(np.int32)
    return [
        *items[:-1],
        Text(last.ids, targets),
        Text(np.asarray(continuation, np.int32), follow),
    ]


def cut_at(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any (non-empty) string of ``until``."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


class GazeJaxLMM(lmms):
    """A gazejax checkpoint (dense or gaze attention) as an lmms-eval simple model."""

    def __init__(
        self,
        workdir: str,
        step: int | None = None,
        attention: str | None = None,
        top_k: int | None = None,
        budget: float | None = None,
        max_new_tokens: int = 32,
        max_frames: int | None = None,
        fps: float = 1.0,
        seed: int = 0,
        score: str = "nll",
        mesh: str | None = None,
        batch_size: int | str = 1,
        device: str | None = None,
        max_batch_size: int | None = None,
        **unknown,
    ) -> None:
        super().__init__()
        del device, max_batch_size  # JAX places arrays itself; batches are batch_size
        if unknown:
            raise TypeError(f"gazejax: unknown model_args {sorted(unknown)}")
        checkpoint = load_checkpoint(workdir, step)
        attention = attention or checkpoint.config.decoder.attention
        if attention not in ("dense", "gaze"):
            raise ValueError(f"gazejax: attention must be dense or gaze, got {attention!r}")
        if top_k is not None and budget is not None:
            raise ValueError("gazejax: give top_k or budget, not both")
        if attention == "dense" and (top_k is not None or budget is not None):
            raise ValueError("gazejax: top_k / budget need attention=gaze")
        if top_k is not None and int(top_k) < 1:
            raise ValueError(f"gazejax: top_k must be >= 1, got {top_k}")
        if budget is not None and not 0 < float(budget) <= 1:
            raise ValueError(f"gazejax: budget must be in (0, 1], got {budget}")
        if score not in ("nll", "loglik"):
            raise ValueError(f"gazejax: score must be nll or loglik, got {score!r}")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"gazejax: batch_size must be a positive integer, got {batch_size!r}")
        self.mesh = None if mesh is None else make_mesh(parse_mesh(str(mesh).replace(";", ",")))
        if self.mesh is not None:
            decode_shards(self.mesh)  # the decode's constraint, checked before any request
            params = jax.device_put(checkpoint.params, NamedSharding(self.mesh, PartitionSpec()))
            checkpoint = dataclasses.replace(checkpoint, params=params)
        self.checkpoint = checkpoint
        self.config = with_attention(checkpoint.config, attention)
        self.model = MultimodalModel(self.config)
        self.top_k = None if top_k is None else int(top_k)
        self.budget = None if budget is None else float(budget)
        self.max_new_tokens = int(max_new_tokens)
        self.max_frames = int(checkpoint.max_frames if max_frames is None else max_frames)
        if self.max_frames < 1:
            raise ValueError(f"gazejax: max_frames must be >= 1, got {max_frames}")
        self.fps = float(fps)
        self.seed = int(seed)
        self.sign = -1.0 if score == "nll" else 1.0
        self.batch_size = int(batch_size)
        self._score = jax.jit(self._score_batch, static_argnums=(2,))

    # --- Shared -------------------------------------------------------------------------------

    def _gaze_k(self, num_regions: int) -> int | None:
        """K for a request with ``num_regions`` visual regions (None: dense attention)."""
        if self.config.decoder.attention != "gaze":
            return None
        if self.budget is not None:
            return gaze_top_k(self.budget, num_regions)
        return self.config.decoder.gaze_top_k if self.top_k is None else self.top_k

    def _prompt(self, context: str, doc_to_visual: Callable, doc_id, task: str, split: str):
        doc = self.task_dict[task][split][doc_id]
        visuals = read_visuals(
            doc_to_visual(doc),
            image_size=self.config.vit.image_size,
            max_frames=self.max_frames,
            fps=self.fps,
        )
        items = prompt_items(
            self.checkpoint.tokenizer, context, visuals, self.checkpoint.system_prompt
        )
        return doc, items

    # --- loglikelihood ------------------------------------------------------------------------

    def _score_batch(self, params, inputs, top_k, targets):
        logits = self.model.apply({"params": params}, inputs, top_k=top_k)
        return answer_loglik(logits, targets), answer_exact_match(logits, targets)

    def loglikelihood(self, requests: list[Instance]) -> list:
        """``(∓log p(continuation | context, visuals), continuation is the greedy answer)`` per
        request (``-`` for ``score=nll``; in a ``GenerationResult`` where :data:`MANGLES_PAIRS`);
        requests with the same K are batched by shape, ``batch_size`` at a time."""
        tokenizer = self.checkpoint.tokenizer
        by_k: dict[int | None, list] = {}
        for index, request in enumerate(requests):
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            doc, items = self._prompt(context, doc_to_visual, doc_id, task, split)
            if callable(continuation):
                continuation = continuation(doc)
            answer = str(continuation).lstrip()
            ids = tokenizer.encode(answer, add_special_tokens=False).ids
            if not ids:
                raise ValueError(f"{task}/{split}/{doc_id}: empty continuation {continuation!r}")
            items = with_continuation(items, np.asarray(ids, np.int32))
            packed = pack_prompt(self.config, items, PAD_MULTIPLE)
            units = sum(len(x.frames) for x in items if isinstance(x, Visual))
            shape = (packed.length, max(units, 1), packed.inputs.regions.num_regions)
            k = self._gaze_k(packed.num_regions)
            by_k.setdefault(k, []).append((shape, index, items))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="gazejax loglikelihood")
        for k, group in by_k.items():
            group.sort(key=lambda g: g[:2])
            for first in range(0, len(group), self.batch_size):
                batch = group[first : first + self.batch_size]
                shape = tuple(max(g[0][i] for g in batch) for i in range(3))
                padded = batch + [batch[-1]] * (self.batch_size - len(batch))
                inputs, targets = pack_batch([g[2] for g in padded], self.config.geometry, *shape)
                with mesh_rules(self.mesh):
                    loglik, greedy = self._score(self.checkpoint.params, inputs, k, targets)
                for (_, index, _), value, is_greedy in zip(batch, loglik, greedy, strict=False):
                    results[index] = (self.sign * float(value), bool(is_greedy))
                    args = requests[index].args[:2]
                    self.cache_hook.add_partial("loglikelihood", args, results[index])
                bar.update(len(batch))
        bar.close()
        if MANGLES_PAIRS:
            return [GenerationResult(text=pair) for pair in results]  # type: ignore[arg-type]
        return results

    # --- generate_until -----------------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Each request's answer, decoded with the KV cache (greedy unless ``do_sample`` and
        ``temperature > 0``), cut at the first of ``until``."""
        out = []
        for index, request in enumerate(
            tqdm(requests, disable=self.rank != 0, desc="gazejax generate_until")
        ):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            kwargs = dict(gen_kwargs or {})
            ignored = sorted(set(kwargs) - set(SAMPLING_KEYS))
            if ignored:
                log.warning("gazejax ignores generation_kwargs %s", ignored)
            if int(kwargs.get("num_beams") or 1) != 1:
                raise ValueError("gazejax decodes greedily or by sampling: num_beams must be 1")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature") or 0) > 0
            _, items = self._prompt(context, doc_to_visual, doc_id, task, split)
            prompt = pack_prompt(self.config, items, PAD_MULTIPLE)
            result = generate_answer(
                self.model,
                self.checkpoint.params,
                prompt,
                int(kwargs.get("max_new_tokens") or self.max_new_tokens),
                tokenizer=self.checkpoint.tokenizer,
                top_k=self._gaze_k(prompt.num_regions),
                temperature=float(kwargs.get("temperature") or 0) if sample else 0.0,
                top_p=float(kwargs.get("top_p") or 1.0) if sample else 1.0,
                rng=jax.random.fold_in(jax.random.key(self.seed), index),
                mesh=self.mesh,
            )
            text = cut_at(result.text, until)
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("gazejax: multi-round generation is not supported")
