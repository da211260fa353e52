"""The command-line syntax shared by scan-cluster and scan-bench for config values: --set
KEY=VALUE overrides, --overcluster and --clusters-range."""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = [
    "parse_overcluster",
    "parse_range",
    "parse_override",
    "nest_overrides",
    "add_override_option",
]


def parse_overcluster(text: str | None) -> float | list[int] | None:
    """'2' or '1.5' is a factor; '20,30' is a list of cluster counts."""
    if text is None:
        return None
    try:
        if "," in text:
            return [int(part) for part in text.split(",") if part.strip()]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--overcluster takes a factor (2) or a list of counts (20,30), not {text!r}"
        ) from None


def parse_range(text: str) -> tuple[int, int]:
    """'5-30' or '5,30' -> (5, 30)."""
    parts = text.replace(",", "-").split("-")
    try:
        low, high = (int(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--clusters-range takes LOW-HIGH (e.g. 5-30), not {text!r}"
        ) from None
    return low, high


def parse_override(text: str) -> tuple[list[str], Any]:
    """'scan.epochs=5' -> (['scan', 'epochs'], 5); values are read as JSON when they parse."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set takes KEY=VALUE, not {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().split("."), value


def nest_overrides(overrides: list[tuple[list[str], Any]]) -> dict[str, Any]:
    """[(["scan", "epochs"], 5), ...] from --set options -> {"scan": {"epochs": 5}, ...}."""
    nested: dict[str, Any] = {}
    for path, value in overrides:
        node = nested
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return nested


def add_override_option(parser: argparse.ArgumentParser) -> None:
    """--set KEY=VALUE (repeatable), collected in `args.overrides` for nest_overrides."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        type=parse_override,
        default=[],
        metavar="KEY=VALUE",
        help="any config field, e.g. --set pretext.epochs=50 (repeatable)",
    )
