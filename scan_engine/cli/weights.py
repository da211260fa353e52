"""`scan-weights`: which pretrained backbones this machine can run, and putting weights in place.

    scan-weights list                                   names, feature size, where weights are
    scan-weights import dinov2_vits14 dinov2_vits14_pretrain.pth
    scan-weights fetch dinov2_vitb14                    (online machines: hub cache → models folder)

The models folder is --models-dir, else $MODELS_DIR. `import` converts the file to timm's layout,
checks it loads strictly and stores it once under its sha256; a file that does not fit is
refused and nothing is written.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from scan_engine.backbones import (
    DEFAULT_BACKBONE,
    CorruptWeightsError,
    MissingWeightsError,
    UnknownBackboneError,
    WeightsFileError,
    fetch_weights,
    get_spec,
    import_weights,
    list_backbones,
    weights_status,
)

__all__ = ["build_parser", "main"]

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    folder = argparse.ArgumentParser(add_help=False)
    folder.add_argument(
        "--models-dir",
        type=Path,
        # SUPPRESS: the option may come before or after the command without one hiding the other.
        default=argparse.SUPPRESS,
        help="the service's models folder (default: $MODELS_DIR)",
    )
    parser = argparse.ArgumentParser(
        prog="scan-weights",
        description="List pretrained backbones and import or fetch their weights.",
        parents=[folder],
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "list", parents=[folder], help="every backbone and whether its weights are here"
    )
    importing = commands.add_parser(
        "import", parents=[folder], help="check a local weights file loads, then store it"
    )
    importing.add_argument("name", help="backbone name (see `scan-weights list`)")
    importing.add_argument(
        "file", type=Path, help="a timm, torch.hub, torchvision, MoCo or open_clip checkpoint"
    )
    fetching = commands.add_parser(
        "fetch", parents=[folder], help="download (or take from the hub cache) and store"
    )
    fetching.add_argument("name", help="backbone name (see `scan-weights list`)")
    return parser


def _models_dir(args: argparse.Namespace) -> Path | None:
    if getattr(args, "models_dir", None) is not None:
        return args.models_dir
    from_environment = os.environ.get("MODELS_DIR")
    return Path(from_environment) if from_environment else None


def _list(models_dir: Path | None) -> str:
    rows = [("backbone", "dim", "size", "weights", "licence")]
    for spec in list_backbones():
        status = weights_status(spec, models_dir)
        where = status if status is not None else f"missing (scan-weights import {spec.name} FILE)"
        name = f"{spec.name} (default)" if spec.name == DEFAULT_BACKBONE else spec.name
        rows.append((name, str(spec.feature_dim), str(spec.input_size), where, spec.licence))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in rows
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    models_dir = _models_dir(args)
    try:
        if args.command == "list":
            sys.stdout.write(_list(models_dir))
            return 0
        get_spec(args.name)  # an unknown name fails before any model is built
        if models_dir is None:
            print("scan-weights: give --models-dir or set MODELS_DIR", file=sys.stderr)
            return 2
        if args.command == "import":
            sha256 = import_weights(args.name, args.file, models_dir)
        else:
            sha256 = fetch_weights(args.name, models_dir)
    except (
        UnknownBackboneError,
        MissingWeightsError,
        WeightsFileError,
        CorruptWeightsError,
    ) as error:
        print(f"scan-weights: {error}", file=sys.stderr)
        return 2
    print(f"{args.name}: stored in {models_dir} (sha256 {sha256})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
