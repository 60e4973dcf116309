"""Command-line checkpoint conversion.

    python -m gazejax.convert hf-to-gazejax --input HF_DIR --output GAZEJAX_DIR
    python -m gazejax.convert gazejax-to-hf --input GAZEJAX_DIR --output HF_DIR [--dtype bfloat16]
    python -m gazejax.convert workdir-to-hf --input WORKDIR [--step N] --output HF_DIR
    python -m gazejax.convert npz-to-gazejax --input vit.npz --variant So400m/16 --image-size 384 \
        --output GAZEJAX_DIR

Hugging Face folders are local (``config.json`` + ``model.safetensors`` or a sharded index);
nothing is downloaded. A gazejax folder is ``model.json`` + an orbax ``params`` tree. An input
that cannot be converted is one line naming the file or key, exit status 1; ``--debug`` shows
the traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gazejax.convert.hf import carried_config, load_hf, read_hf_config, save_hf
from gazejax.convert.native import load_gazejax, read_model_config, save_gazejax


def _hf_to_gazejax(args: argparse.Namespace) -> None:
    model, params = load_hf(args.input)
    save_gazejax(model, params, args.output, config=carried_config(read_hf_config(args.input)))


def _gazejax_to_hf(args: argparse.Namespace) -> None:
    model, params = load_gazejax(args.input)
    save_hf(
        model,
        params,
        args.output,
        dtype=args.dtype,
        max_shard_bytes=args.max_shard_bytes,
        config=carried_config(read_model_config(args.input)),
    )


def _workdir_to_hf(args: argparse.Namespace) -> None:
    from gazejax.inference.checkpoints import export_checkpoint, load_checkpoint

    export_checkpoint(load_checkpoint(args.input, args.step), args.output, dtype=args.dtype)


def _npz_to_gazejax(args: argparse.Namespace) -> None:
    from gazejax.convert.big_vision import load_big_vision_npz
    from gazejax.models.vit import VisionTransformer, vit_config

    config = vit_config(args.variant, image_size=args.image_size, pool=args.pool)
    params = load_big_vision_npz(args.input, config)
    save_gazejax(VisionTransformer(config), params, args.output)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gazejax.convert",
        description="Convert checkpoints between Hugging Face, big_vision .npz and gazejax.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    hf_in = commands.add_parser(
        "hf-to-gazejax",
        help="local HF folder (qwen3, qwen2, siglip, siglip_vision_model, llava) -> gazejax folder",
    )
    hf_in.set_defaults(run=_hf_to_gazejax)

    hf_out = commands.add_parser("gazejax-to-hf", help="gazejax folder -> HF folder")
    hf_out.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    hf_out.add_argument(
        "--max-shard-bytes",
        type=int,
        default=None,
        help="split into several safetensors files with an index",
    )
    hf_out.set_defaults(run=_gazejax_to_hf)

    workdir_out = commands.add_parser(
        "workdir-to-hf",
        help="training workdir -> HF LlavaForConditionalGeneration folder + gaze side files "
        "(gazejax.json, gazejax.safetensors), which generate / evaluate / lmms-eval also read",
    )
    workdir_out.add_argument("--step", type=int, default=None, help="default: the latest")
    workdir_out.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    workdir_out.set_defaults(run=_workdir_to_hf)

    npz_in = commands.add_parser(
        "npz-to-gazejax", help="big_vision ViT .npz (plain or SigLIP two-tower) -> gazejax folder"
    )
    npz_in.add_argument("--variant", required=True, help="ViT variant, e.g. So400m/16, B/16")
    npz_in.add_argument("--image-size", type=int, required=True)
    npz_in.add_argument(
        "--pool",
        default="none",
        choices=["none", "map"],
        help="map for SigLIP files, which carry the attention-pooling head (MAPHead_0)",
    )
    npz_in.set_defaults(run=_npz_to_gazejax)

    for command in (hf_in, hf_out, workdir_out, npz_in):
        command.add_argument("--input", required=True)
        command.add_argument("--output", required=True)
        command.add_argument(
            "--debug", action="store_true", help="on an error, raise it with its traceback"
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (errors are one line on stderr, status 1)."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (OSError, ValueError) as error:  # ConversionError, a missing file, a bad variant
        if args.debug:
            raise
        print(f"gazejax.convert: error: {error} (--debug for the traceback)", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
