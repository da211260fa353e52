"""Throughput of the batched augmentations (not a test): images/s of a SimCLR pair of views and
of one strong view on this machine.

    python benchmarks/augment_throughput.py --batch 512 --size 32 [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import torch

from scan_engine.augment import SimCLRAugment, StrongAugment


def benchmark_augment(
    batch: int = 512, size: int = 32, device: str | None = None, seconds: float = 2.0
) -> dict[str, float]:
    """Print and return images/s of a SimCLR pair of views and of one strong view.

    Runs each transform on a random uint8 (batch, 3, size, size) batch for about ``seconds``.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    generator = torch.Generator(device=dev).manual_seed(0)
    shape = (batch, 3, size, size)
    images = torch.randint(0, 256, shape, generator=generator, device=dev, dtype=torch.uint8)
    simclr, strong = SimCLRAugment(size), StrongAugment(size)

    def simclr_pair() -> None:
        simclr(images, generator)
        simclr(images, generator)

    results: dict[str, float] = {}
    for name, fn in (("simclr_two_views", simclr_pair), ("strong", lambda: strong(images))):
        fn()  # warm-up
        runs, start = 0, time.perf_counter()
        while True:
            fn()
            runs += 1
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        results[name] = batch * runs / elapsed
        print(
            f"{name:>17}: {results[name]:10.0f} images/s  "
            f"({batch}x3x{size}x{size}, {dev}, {torch.get_num_threads()} threads)"
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    benchmark_augment(args.batch, args.size, args.device, args.seconds)


if __name__ == "__main__":
    main()
