"""`mapet <command>`: thin argument parsing over the library; defaults come from params.yaml."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mapet.errors import MapetError
from mapet.params import DEFAULT_PARAMS, load_params, param


def _export(args: argparse.Namespace) -> None:
    from mapet.models import load_pretrain_model, save_backbone

    params = load_params(args.params)
    out_dir = Path(param(params, "pretrain.out_dir"))
    model_file = args.model or out_dir / "model.safetensors"
    out = args.out or out_dir / "backbone.safetensors"
    model = load_pretrain_model(model_file)
    save_backbone(model, out)
    print(f"wrote {out}: {model.backbone_name} backbone ({model.objective} pre-training), "
          f"loadable with timm.create_model({model.backbone_name!r}, **timm_kwargs)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mapet", description="MaPeT pre-training workflow.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--params", default=DEFAULT_PARAMS, type=Path, help="parameters file (default: %(default)s)")
        sub.set_defaults(handler=handler)
        return sub

    export = command("export", _export, "Write a pre-trained model's backbone as a timm-loadable safetensors file.")
    export.add_argument("--model", type=Path, help="pre-training model file (default: <pretrain.out_dir>/model.safetensors)")
    export.add_argument("--out", type=Path, help="backbone file to write (default: <pretrain.out_dir>/backbone.safetensors)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except MapetError as error:
        print(f"mapet {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
