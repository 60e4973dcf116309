r"""Trains the multimodal model: ``python -m gazejax.train --config configs/NAME.py --workdir DIR``.

One generic trainer, read top to bottom like a recipe (big_vision style): config -> mesh ->
data -> abstract model -> optimizer -> shardings -> init or resume -> jitted step -> loop with
metrics, evaluation and checkpoints. The same code runs on a laptop CPU, a multi-GPU node and a
TPU pod; only the config's mesh and the launcher differ.

    python -m gazejax.train --config configs/synthetic.py --workdir runs/dense
    python -m gazejax.train --config configs/synthetic.py:attention=gaze --workdir runs/gaze \
        --config.total_steps=2000 --config.model.gaze.top_k=2

Restarting the same command resumes from the newest checkpoint in ``DIR/checkpoints`` that
restores, once the config is checked against it (README, "Training": the resume contract). A
user error ends the command with one line; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from gazejax import optim
from gazejax.checkpointing import Checkpointer, RestoreError, TrainState, write_config
from gazejax.configuration import ConfigError, validate_config
from gazejax.convert import ConversionError
from gazejax.data.batches import (
    Batches,
    BucketError,
    SkippedRecords,
    jsonl_buckets,
    synthetic_buckets,
)
from gazejax.data.records import DataError
from gazejax.data.synthetic import TASKS
from gazejax.data.template import ConversationError
from gazejax.data.vocab import load_tokenizer
from gazejax.gaze.budget import progressive_top_k
from gazejax.gaze.inputs import MultimodalInputs
from gazejax.init_from import init_from_checkpoints, load_workdir_params
from gazejax.losses import answer_exact_match, cross_entropy, turn_scores
from gazejax.metrics import MetricsWriter
from gazejax.models.from_config import multimodal_config
from gazejax.models.mllm import MultimodalConfig, MultimodalModel
from gazejax.paths import as_path
from gazejax.sharding import make_mesh

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show a user error's traceback, not one line.")


def top_k_at(step: int, config: ml_collections.ConfigDict, num_regions: int) -> int | None:
    """K at ``step``: the progressive schedule (all regions -> ``model.gaze.top_k`` over
    ``progressive_top_k.decay_fraction`` of training) held piecewise constant on
    ``progressive_top_k.levels`` levels, since each distinct K compiles once. None when dense."""
    if config.model.attention != "gaze":
        return None
    target = config.model.gaze.top_k
    decay_steps = int(config.progressive_top_k.decay_fraction * config.total_steps)
    if decay_steps <= 0:
        return target
    levels = max(int(config.progressive_top_k.levels), 1)
    held = math.floor(min(step / decay_steps, 1.0) * levels) / levels * decay_steps
    return progressive_top_k(
        int(held), start=max(num_regions, target), target=target, decay_steps=decay_steps
    )


def make_train_step(
    model: MultimodalModel, tx: optax.GradientTransformation, accum: int, frozen=None
):
    """``step(state, inputs, targets, top_k) -> (state, metrics)`` with gradient accumulation
    over ``accum`` micro-batches (the batch axis is split in ``accum`` equal parts).

    ``frozen`` (a tree of bools like the parameters, :func:`optim.frozen_parameters`; None: all
    train) marks parameters that get no gradient: the loss is differentiated with respect to
    the trainable ones only (a frozen ViT under a trainable projector runs no backward pass),
    and ``grad_norm`` is the trainable gradients' norm. The optimizer sees zeros for the rest.
    """

    def split(params):
        """``(trainable, frozen)``: ``params`` with the other kind's leaves None."""
        if frozen is None:
            return params, jax.tree.map(lambda _: None, params)
        pick = lambda keep: jax.tree.map(lambda p, f: p if f == keep else None, params, frozen)  # noqa: E731
        return pick(False), pick(True)

    def merge(trainable, fixed):
        return jax.tree.map(
            lambda t, f: f if t is None else t, trainable, fixed, is_leaf=lambda x: x is None
        )

    def loss_fn(trainable, fixed, inputs, targets, top_k):
        logits = model.apply({"params": merge(trainable, fixed)}, inputs, top_k=top_k)
        return cross_entropy(logits, targets)

    def step(state: TrainState, inputs: MultimodalInputs, targets, top_k):
        trainable, fixed = split(state.params)
        grad_fn = jax.grad(loss_fn, has_aux=True)

        def micro(batch):
            return jax.tree.map(lambda x: x.reshape(accum, -1, *x.shape[1:]), batch)

        def accumulate(carry, mb):
            grads, sums = carry
            (mb_inputs, mb_targets) = mb
            g, s = grad_fn(trainable, fixed, mb_inputs, mb_targets, top_k)
            # Weight each micro-batch's mean-loss gradient by its token count.
            g = jax.tree.map(lambda a, b: a + b * s["tokens"], grads, g)
            return (g, jax.tree.map(jnp.add, sums, s)), None

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        sums0 = {"loss_sum": 0.0, "correct": 0.0, "tokens": 0.0}
        (grads, sums), _ = jax.lax.scan(accumulate, (zeros, sums0), micro((inputs, targets)))
        grads = jax.tree.map(lambda g: g / jnp.maximum(sums["tokens"], 1.0), grads)
        grad_norm = optax.tree.norm(grads)
        grads = merge(grads, jax.tree.map(jnp.zeros_like, fixed))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": sums["loss_sum"] / jnp.maximum(sums["tokens"], 1.0),
            "token_accuracy": sums["correct"] / jnp.maximum(sums["tokens"], 1.0),
            "grad_norm": grad_norm,
            "tokens": jnp.sum(inputs.meta.valid),
        }
        return TrainState(state.step + 1, params, opt_state), metrics

    return step


def make_eval_step(model: MultimodalModel, turns: int | None = None):
    """``(params, inputs, targets, top_k) -> (loss sums, exact bool [batch, T])``: the exact
    match of each of ``turns`` answers (T = ``turns``), or with ``turns`` None of the whole
    sample (T = 1: every answer right)."""

    def evaluate(params, inputs, targets, top_k):
        logits = model.apply({"params": params}, inputs, top_k=top_k)
        _, sums = cross_entropy(logits, targets)
        if turns is None:
            return sums, answer_exact_match(logits, targets)[:, None]
        return sums, turn_scores(logits, targets, turns)[0]

    return evaluate


def build_data(config, model_config: MultimodalConfig, split: str, batch_size: int) -> Batches:
    """The ``split`` batches of the configured data set, this host's share."""
    synthetic = config.data.name == "synthetic"
    tokenizer = load_tokenizer(None if synthetic else config.data.tokenizer)
    if tokenizer.get_vocab_size() > model_config.decoder.vocab_size:
        raise ConfigError(
            f"config.model.decoder.vocab_size={model_config.decoder.vocab_size} is too small: "
            f"the tokenizer (with <image> and <video>) has {tokenizer.get_vocab_size()} tokens"
        )
    if synthetic:
        task_names = list(TASKS)
        buckets = synthetic_buckets(
            config.data.synthetic.to_dict(),
            config.data.buckets.to_dict(),
            split,
            config.seed,
            tokenizer,
            config.data.system_prompt,
        )
    else:  # jsonl
        buckets = jsonl_buckets(
            config.data.to_dict(), split, config.seed, tokenizer, model_config.geometry
        )
        task_names = [config.data.jsonl.get("task", "jsonl")]
    return Batches(
        buckets,
        batch_size,
        model_config.geometry,
        seed=config.seed,
        pad_id=tokenizer.token_to_id(config.data.pad_token),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        task_names=task_names,
    )


def global_batch(mesh, rules, local: tuple) -> tuple:
    """Host-local batch arrays -> global arrays sharded over the batch axis of the mesh."""
    batch_sharding = nn.logical_to_mesh_sharding(jax.sharding.PartitionSpec("batch"), mesh, rules)

    def put(x):
        x = np.asarray(x)
        spec = jax.sharding.PartitionSpec(*batch_sharding.spec, *([None] * (x.ndim - 1)))
        sharding = jax.sharding.NamedSharding(mesh, spec)
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, local)


class StopRequested:
    """Set by SIGTERM: the loop saves a checkpoint and exits cleanly."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True


def initialize_distributed(settings: ml_collections.ConfigDict) -> None:
    """``jax.distributed.initialize``; explicit settings where given, else auto-detection.

    CPU processes exchange collectives through gloo (a no-op setting on GPU and TPU).
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=settings.coordinator_address or None,
        num_processes=settings.num_processes if settings.num_processes > 0 else None,
        process_id=settings.process_id if settings.process_id >= 0 else None,
    )


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Runs (or resumes) training; returns the final evaluation metrics."""
    validate_config(config)
    if config.distributed.enabled:
        initialize_distributed(config.distributed)
    is_main = jax.process_index() == 0
    as_path(workdir).mkdir(parents=True, exist_ok=True)
    checkpointer = Checkpointer(workdir, config.checkpoint_every_steps, config.keep_checkpoints)
    checkpointer.check_config(config.to_dict())

    # Mesh and logical axis rules.
    shape = list(config.mesh.shape)
    if -1 in shape:
        shape[shape.index(-1)] = jax.device_count() // -math.prod(shape)
    mesh = make_mesh(shape)
    print(
        f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} of "
        f"{jax.device_count()} {jax.default_backend()} devices, mesh {dict(mesh.shape)}",
        flush=True,
    )
    rules = tuple(
        (name, tuple(axes) if isinstance(axes, list) else axes)
        for name, axes in config.logical_axis_rules
    )

    # Data and model.
    try:
        model_config = multimodal_config(config.model)
    except (TypeError, ValueError) as error:  # the model's dataclasses name the field
        raise ConfigError(f"config.model: {error}") from error
    model = MultimodalModel(model_config)
    train_batches = build_data(config, model_config, "train", config.batch_size)
    eval_batches = build_data(config, model_config, "eval", config.batch_size)
    example_inputs, _, _ = train_batches(0)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract_vars = jax.eval_shape(model.init, jax.random.key(config.seed), example_inputs)
        param_specs = nn.get_partition_spec(abstract_vars["params"])
        param_shardings = nn.logical_to_mesh_sharding(param_specs, mesh, rules)
        abstract_params = jax.tree.map(  # no sharding constraint on abstract values
            lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x,
            abstract_vars["params"],
            is_leaf=lambda x: isinstance(x, nn.Partitioned),
        )
        tx, schedule = optim.make_optimizer(
            abstract_params,
            learning_rate=config.optim.learning_rate,
            total_steps=config.total_steps,
            warmup_steps=config.optim.warmup_steps,
            weight_decay=config.optim.weight_decay,
            b1=config.optim.b1,
            b2=config.optim.b2,
            clip_norm=config.optim.clip_norm,
            trainable=tuple(config.optim.trainable),
            lr_multipliers=dict(config.optim.lr_multipliers),
        )
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        abstract_opt = jax.eval_shape(tx.init, abstract_params)
        # Optimizer state mirrors the parameters; a parameter group's state holds MaskedNode
        # where another group's parameters are, which keeps no sharding.
        masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
        opt_shardings = optax.tree_map_params(
            tx,
            lambda p, s: p if masked(p) else s,
            abstract_opt,
            param_shardings,
            transform_non_params=lambda _: replicated,
            is_leaf=masked,
        )
        state_shardings = TrainState(replicated, param_shardings, opt_shardings)

        def init_state():
            params = nn.unbox(model.init(jax.random.key(config.seed), example_inputs)["params"])
            return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

        # Resume (the config checked against the checkpoint's) or initialise; only then write.
        restored = None
        abstract_state = jax.tree.map(  # shapes and target shardings
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            jax.eval_shape(init_state),
            state_shardings,
        )
        if checkpointer.all_steps():
            restored = checkpointer.restore_latest(abstract_state, config.to_dict())
        if restored is None:
            state = jax.jit(init_state, out_shardings=state_shardings)()
            start = 0
            init_from = config.init_from.to_dict()
            if any(init_from.values()):
                params = state.params
                if init_from["workdir"]:  # e.g. stage 2 from stage 1; fresh optimizer state
                    params = load_workdir_params(init_from["workdir"], abstract_state.params)
                # Sharded parameters in, sharded out: no device_get (fails across hosts).
                params = init_from_checkpoints(params, init_from, model_config)
                state = jax.jit(
                    lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)),
                    out_shardings=state_shardings,
                )(params)
        else:
            state, start = restored.state, restored.step
        skipped = SkippedRecords(restored.data.get("skipped_records", []) if restored else [])
        if is_main:
            write_config(workdir, config.to_json_best_effort(indent=2), start)
            if restored is not None:
                print(f"resumed from step {start} in {workdir}", flush=True)
                for change in restored.changes:
                    print(f"config changed on resume: {change}", flush=True)

        train_step = jax.jit(
            make_train_step(
                model,
                tx,
                config.grad_accum_steps,
                optim.frozen_parameters(
                    abstract_params, config.optim.trainable, dict(config.optim.lr_multipliers)
                ),
            ),
            static_argnums=(3,),
            donate_argnums=(0,),
            out_shardings=(state_shardings, replicated),
        )
        turns = config.data.synthetic.get("turns", 1) if config.data.name == "synthetic" else None
        eval_step = jax.jit(
            make_eval_step(model, turns), static_argnums=(3,), out_shardings=replicated
        )
        writer = MetricsWriter(workdir, config.total_steps, first_step=start, enabled=is_main)
        stop = StopRequested()
        num_regions = max(b["num_regions"] for b in config.data.buckets.to_dict().values())
        pending: list[tuple[int, dict]] = []
        last_log = time.monotonic()
        step = start
        final = None

        def run_eval(params):  # at the final K of the schedule
            k = top_k_at(config.total_steps, config, num_regions)
            return evaluate(eval_step, params, eval_batches, config, mesh, rules, k)

        def save(step, state):
            _gather_skipped(skipped)
            data = {"skipped_records": sorted(skipped.indices)}
            checkpointer.save(step, state, config.to_dict(), data)

        prefetch = _Prefetcher(train_batches, start)

        # Everything logged for step s is written before checkpoint s: a resume from s drops
        # the records after s (MetricsWriter) and logs them again.
        while step < config.total_steps:
            inputs, targets, infos = prefetch.next()
            skipped.add(infos)
            top_k = top_k_at(step, config, num_regions)
            inputs, targets = global_batch(mesh, rules, (inputs, targets))
            state, metrics = train_step(state, inputs, targets, top_k)
            step += 1
            pending.append((step, metrics))
            if stop.requested or step % config.log_every_steps == 0 or step == config.total_steps:
                _gather_skipped(skipped)
                _flush_metrics(pending, writer, schedule, top_k, last_log, len(skipped))
                last_log = time.monotonic()
                pending = []
            if stop.requested:
                save(step, state)
                checkpointer.close()
                writer.close()
                prefetch.close()
                print(f"SIGTERM: saved step {step} and stopped", flush=True)
                return {}
            if step % config.eval_every_steps == 0 or step == config.total_steps:
                final = run_eval(state.params)
                writer.write(step, final, prefix="eval")
            if checkpointer.due(step):
                save(step, state)
        prefetch.close()
        save(step, state)
        checkpointer.close()
        if final is None:  # resumed at the end: nothing trained, evaluate what is there
            final = run_eval(state.params)  # for final_eval.json (its step is logged)
        writer.close()
    if is_main:
        text = json.dumps({"step": step, **final}, indent=2)
        (as_path(workdir) / "final_eval.json").write_text(text)
    return final


def _gather_skipped(skipped: SkippedRecords) -> None:
    """Adds every other host's dropped records to ``skipped`` (a collective; hosts drop
    different records, and the same record in different epochs)."""
    if jax.process_count() == 1:
        return
    local = np.array(sorted(skipped.indices), np.int32)
    size = int(multihost_utils.process_allgather(np.int32(local.size)).max())
    padded = np.full(max(size, 1), -1, np.int32)
    padded[: local.size] = local
    gathered = multihost_utils.process_allgather(padded)
    skipped.indices.update(int(i) for i in gathered.ravel() if i >= 0)


def _flush_metrics(pending, writer, schedule, top_k, since: float, skipped: int = 0) -> None:
    """Fetches the pending steps' metrics (one host sync per log interval) and writes them.

    Timing covers the interval from ``since`` (``time.monotonic()``) until every pending step
    has finished on the device.

    Raises:
      FloatingPointError: naming the first step and metric that is NaN or inf.
    """
    if not pending:
        return
    fetched = jax.device_get([m for _, m in pending])
    elapsed = time.monotonic() - since
    for (step, _), values in zip(pending, fetched, strict=True):
        for name, value in values.items():
            if not np.isfinite(value):
                raise FloatingPointError(f"non-finite {name} = {value} at step {step}")
    step, values = pending[-1][0], fetched[-1]
    extra = {"learning_rate": float(schedule(step - 1)), "skipped_samples": skipped}
    if top_k is not None:
        extra["top_k"] = top_k
    extra["step_time_s"] = elapsed / len(pending)
    extra["tokens_per_s"] = sum(float(v["tokens"]) for v in fetched) / elapsed
    writer.write(step, {**{k: float(v) for k, v in values.items()}, **extra})


def evaluate(eval_step, params, batches: Batches, config, mesh, rules, top_k) -> dict[str, float]:
    """Loss, token accuracy and answer exact match (overall, per task and, for the synthetic
    set, per family with its number of answers) on the eval split.

    Each answer of a synthetic conversation counts for its own task (``info["turns"]``).
    Each host scores its own examples; per-task counts are summed over hosts.
    """
    tasks = sorted(batches.task_names)
    counts = np.zeros((3, len(tasks)))  # correct answers, answers, per task
    sums = np.zeros(3)  # loss sum, correct tokens, tokens
    for i in range(max(config.eval_examples // config.batch_size, 1)):
        inputs, targets, infos = batches(i)
        inputs, targets = global_batch(mesh, rules, (inputs, targets))
        batch_sums, exact = eval_step(params, inputs, targets, top_k)
        sums += [float(batch_sums[k]) for k in ("loss_sum", "correct", "tokens")]
        local = np.asarray(exact)[batches.offset : batches.offset + len(infos)]
        for info, row in zip(infos, local, strict=True):
            turns = info.get("turns", [(info["task"], None)])
            for (task, _), ok in zip(turns, row, strict=True):
                counts[:2, tasks.index(task)] += (ok, 1)
    counts = multihost_utils.process_allgather(counts[:2]).reshape(-1, 2, len(tasks)).sum(0)
    seen = counts[1] > 0
    results = {
        "loss": sums[0] / max(sums[2], 1.0),
        "token_accuracy": sums[1] / max(sums[2], 1.0),
        "accuracy": float(counts[0].sum() / max(counts[1].sum(), 1.0)),
    }
    results.update(
        {
            f"accuracy/{t}": float(c / n)
            for t, c, n, s in zip(tasks, counts[0], counts[1], seen, strict=True)
            if s
        }
    )
    families: dict[str, np.ndarray] = {}
    for task, c, n in zip(tasks, counts[0], counts[1], strict=True):
        if task in TASKS and n > 0:
            families.setdefault(TASKS[task][0], np.zeros(2))[:] += (c, n)
    for family, (c, n) in sorted(families.items()):
        results[f"accuracy/family/{family}"] = float(c / n)
        results[f"answers/family/{family}"] = float(n)
    return results


class _Prefetcher:
    """Packs the next batches on a background thread while the device trains."""

    def __init__(self, batches: Callable, first_step: int, depth: int = 2):
        from concurrent.futures import ThreadPoolExecutor

        self._batches = batches
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._next_step = first_step
        self._queue = [self._submit() for _ in range(depth)]

    def _submit(self):
        future = self._pool.submit(self._batches, self._next_step)
        self._next_step += 1
        return future

    def next(self):
        future = self._queue.pop(0)
        self._queue.append(self._submit())
        return future.result()

    def close(self):
        self._pool.shutdown(wait=False, cancel_futures=True)


# What a user gets wrong (a config key, a file, a record, a checkpoint), each naming it, and a
# NaN: the command line prints one line for these, and with --debug the traceback.
_USER_ERRORS = (
    BucketError,
    ConfigError,
    ConversationError,
    ConversionError,
    DataError,
    RestoreError,
    FloatingPointError,
    OSError,
)


@contextlib.contextmanager
def _one_line_errors(errors: tuple[type[BaseException], ...], argv: Sequence[str], debug: bool):
    """Exits with status 1 and one line ``error: ...`` on ``errors``, unless ``debug``."""
    try:
        yield
    except errors as error:
        if debug:
            raise
        sys.exit(f"error: {_one_line(error, argv)} (--debug for the traceback)")


def _one_line(error: BaseException, argv: Sequence[str]) -> str:
    """``error``'s message on one line. A config file's error comes as the text of a traceback
    (its last line is the error); an unknown key in a ``--config.`` override as a KeyError
    inside an AttributeError (named here by its argument)."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    text = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Traceback" in text:
        return lines[-1]
    if isinstance(error, KeyError) and lines:
        key = lines[0].strip("'")
        named = [a.split("=")[0] for a in argv if key in a.split("=")[0].split(".")[1:]]
        return " ".join([f"{' '.join(named) or 'config'}: no such config key.", *lines[1:]])
    return " ".join(lines)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, a bad command line or config file in one line."""
    with _one_line_errors((Exception,), argv, debug="--debug" in argv):
        return flags.FLAGS(argv)


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    with _one_line_errors(_USER_ERRORS, argv, debug=_DEBUG.value):
        train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=_parse_flags)
