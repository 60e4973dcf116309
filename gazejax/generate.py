"""Answer a question about images or a video with a trained gazejax model.

    python -m gazejax.generate --checkpoint WORKDIR --image cat.png --prompt "what color?" \\
        [--video clip.mp4 | --video frames/] [--max-new-tokens 32] [--temperature T --top-p P] \\
        [--top-k K] [--attention dense|gaze] [--mesh sequence=8] [--routing-map OUT.png] \
        [--attention-map OUT.png]

The prompt is the training template (:mod:`gazejax.inference.prompts`), prefilled once into the
KV cache, then decoded one token per jitted step (:func:`gazejax.inference.generate_answer`)
until ``<|im_end|>`` or ``--max-new-tokens``. ``--mesh sequence=N`` splits the KV cache along
its sequence over N devices (:mod:`gazejax.inference.sequence_parallel`): same answer, 1/N of
the cache per device. The maps are described in :mod:`gazejax.inference.maps`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import jax

from gazejax.data.records import DataError
from gazejax.inference import (
    build_prompt,
    draw_attention_map,
    draw_routing_map,
    generate_answer,
    load_checkpoint,
    load_visuals,
    with_attention,
)
from gazejax.models.mllm import MultimodalModel
from gazejax.sharding import make_mesh, parse_mesh


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gazejax.generate",
        description="Answer a question about images or a video with a trained gazejax model.",
    )
    parser.add_argument(
        "--checkpoint",
        "--workdir",
        required=True,
        help="training workdir (config.json + checkpoints/; the latest step unless --step) or "
        "Hugging Face LLaVA folder (imported, or exported by python -m gazejax.convert)",
    )
    parser.add_argument("--step", type=int, default=None, help="checkpoint step to restore")
    parser.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    parser.add_argument(
        "--video", action="append", default=[], help="video file or folder of frames (repeatable)"
    )
    parser.add_argument(
        "--prompt",
        required=True,
        help="the question (<image> placeholders optional: one per image / video is put first)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="gaze K, regions per query head, from 1 to the prompt's regions (default: the model "
        "config's); gaze decoding or the --attention-map's gaze row only",
    )
    parser.add_argument(
        "--attention",
        choices=("dense", "gaze"),
        default=None,
        help="override the model's attention (same weights)",
    )
    parser.add_argument(
        "--mesh",
        default=None,
        metavar="sequence=N",
        help="split the KV cache along its sequence over N devices (prefill and every decode "
        "step; the other mesh axes must be 1); default: one device",
    )
    parser.add_argument(
        "--max-frames",
        type=int,
        default=None,
        help="frames sampled from a video (default: the training data's)",
    )
    parser.add_argument("--fps", type=float, default=1.0, help="video sampling rate")
    parser.add_argument(
        "--routing-map",
        default=None,
        metavar="OUT.png",
        help="draw, for each generated token (at most 8), the regions it selected; each region "
        "is shaded by the fraction of (layer, head) pairs that selected it (gaze only)",
    )
    parser.add_argument(
        "--attention-map",
        default=None,
        metavar="OUT.png",
        help="draw the first generated token's attention over the visual tokens (mean over "
        "heads and layers): dense forward vs gaze forward of the same weights",
    )
    return parser


def _check_top_k_is_used(args: argparse.Namespace, gaze: bool) -> None:
    """Raises ValueError naming ``--top-k`` when it is below 1 or nothing would read it (dense
    decoding without an ``--attention-map``, whose gaze row reads it)."""
    if args.top_k is None:
        return
    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    if not gaze and not args.attention_map:
        raise ValueError(
            "--top-k is gaze's K, but --attention dense decodes with dense attention"
            if args.attention
            else "--top-k is gaze's K, but this checkpoint is dense (add --attention gaze)"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (errors are printed to stderr, status 1)."""
    args = _parser().parse_args(argv)
    try:
        mesh = None if args.mesh is None else make_mesh(parse_mesh(args.mesh))
        checkpoint = load_checkpoint(args.checkpoint, args.step)
        config = checkpoint.config
        if args.attention:
            config = with_attention(config, args.attention)
        gaze = config.decoder.attention == "gaze"
        if args.routing_map and not gaze:
            raise ValueError("--routing-map needs gaze attention (add --attention gaze)")
        _check_top_k_is_used(args, gaze)
        if not args.image and not args.video:
            raise ValueError("give at least one --image or --video")
        visuals = load_visuals(
            args.image,
            args.video,
            image_size=config.vit.image_size,
            max_frames=checkpoint.max_frames if args.max_frames is None else args.max_frames,
            fps=args.fps,
        )
        prompt = build_prompt(
            config, checkpoint.tokenizer, args.prompt, visuals, checkpoint.system_prompt
        )
        if args.top_k is not None and args.top_k > prompt.num_regions:
            raise ValueError(
                f"--top-k {args.top_k} is more than the {prompt.num_regions} regions of the "
                f"prompt's images / video; K={prompt.num_regions} already selects every region"
            )
        model = MultimodalModel(config)
        result = generate_answer(
            model,
            checkpoint.params,
            prompt,
            args.max_new_tokens,
            tokenizer=checkpoint.tokenizer,
            top_k=args.top_k if gaze else None,
            temperature=args.temperature,
            top_p=args.top_p,
            rng=jax.random.key(args.seed),
            mesh=mesh,
        )
        print(result.text)
        if args.routing_map:
            size = draw_routing_map(args.routing_map, prompt, config, result, checkpoint.tokenizer)
            print(f"routing map: {args.routing_map} ({size[0]}x{size[1]})", file=sys.stderr)
        if args.attention_map:
            size = draw_attention_map(
                args.attention_map, prompt, model, checkpoint.params, top_k=args.top_k
            )
            print(f"attention map: {args.attention_map} ({size[0]}x{size[1]})", file=sys.stderr)
    except (DataError, FileNotFoundError, ValueError) as exc:
        print(f"gazejax.generate: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
