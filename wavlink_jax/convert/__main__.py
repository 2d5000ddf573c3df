"""Convert a pretrained PyTorch tower into a tower directory (`tower.json` + orbax `params/`).

    python -m wavlink_jax.convert whisper SRC --out DIR [--no-global-token] [--seed N]
    python -m wavlink_jax.convert clip_text SRC --out DIR [--new-projection]

SRC is what `load_whisper` / `load_clip_text` accept (Hugging Face directory, OpenAI `.pt`, hub id). The
result is what `init_from` and the loaders read back (`wavlink_jax.convert.save`).
"""

from __future__ import annotations

import argparse
import sys

from flax import nnx

from wavlink_jax import cli
from wavlink_jax.convert.save import check_tower_out, save_tower


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m wavlink_jax.convert", description=__doc__.split("\n\n")[0])
    towers = parser.add_subparsers(dest="kind", required=True)
    whisper = towers.add_parser("whisper", help="a Whisper encoder (HF directory, OpenAI .pt or hub id)")
    whisper.add_argument("source", help="HF Whisper directory, OpenAI .pt, or hub id (e.g. openai/whisper-base.en)")
    whisper.add_argument("--out", required=True, help="output directory (must not hold a converted tower yet)")
    whisper.add_argument("--no-global-token", action="store_true", help="plain Whisper, without WavLink's token")
    whisper.add_argument("--seed", type=int, default=0, help="seed of the new global token's initialisation")
    clip = towers.add_parser("clip_text", help="a CLIP text tower (HF CLIP directory or hub id)")
    clip.add_argument("source", help="HF CLIP directory or hub id (e.g. openai/clip-vit-base-patch32)")
    clip.add_argument("--out", required=True, help="output directory (must not hold a converted tower yet)")
    clip.add_argument(
        "--new-projection", action="store_true", help="allow a CLIPTextModel without text_projection (random init)"
    )
    return parser


def _load(args: argparse.Namespace) -> nnx.Module:
    if args.kind == "whisper":
        from wavlink_jax.convert import load_whisper

        return load_whisper(args.source, global_token=not args.no_global_token, seed=args.seed)
    from wavlink_jax.convert import load_clip_text

    return load_clip_text(args.source, new_projection=args.new_projection)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with cli.user_errors():
        check_tower_out(args.out)  # before the source is read
        module = _load(args)
        out = save_tower(args.out, args.kind, module.config, module)
    params = sum(v.get_value().size for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param)))
    print(f"{args.kind} tower ({params / 1e6:.1f}M parameters) from {args.source} written to {out}")
    print(f"config: {module.config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
