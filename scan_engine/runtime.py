"""Where and how tensors run: device choice, mixed precision, memory format and threads.

CUDA gets AMP (bf16 where supported, else fp16 with a grad scaler) and channels_last. On a CPU,
bf16 autocast only pays off where the CPU has native bf16 instructions (AVX512-BF16 or AMX): on
an AMD Zen 4 with AVX512-BF16 a stock ResNet-18 SimCLR step ran 2.7x faster than in float32; on
CPUs without them (e.g. Zen 3) oneDNN emulates bf16 and the same step ran 10-40x slower, so it
stays off there. `precision="float32"` turns mixed precision off everywhere.

"auto" also lays images and convolutions out channels_last on every device: on a Zen 3 CPU
without bf16 the cpu preset's SimCLR step ran at 55-64 images/s in channels_last against 42 in
the default layout (stock ResNet-18: 14.1 against 10.6). "float32" keeps the default layout:
the reference numerics the tests' expected results were measured with.

Inference on a CPU runs in small batches (`Runtime.inference_batch_size`): a batch's activations
then stay in the cores' caches. EfficientNet-Lite0 at 224 px on 2 cores of an Intel Xeon with
AMX ran at 126 images/s in batches of 16 against 87 in batches of 64 (bf16; float32 67 against
40), and the whole streaming extractor on CIFAR-10 at 108 against 54 images/s.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

__all__ = ["Runtime", "resolve_runtime", "cpu_fields", "cpu_has_native_bf16"]


@functools.cache
def cpu_fields() -> dict[str, str]:
    """The first processor's `key: value` lines of /proc/cpuinfo (Linux; empty elsewhere)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if not line.strip():
                    break  # end of the first processor's block
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_has_native_bf16() -> bool:
    """True when /proc/cpuinfo lists AVX512-BF16 or AMX-BF16 (Linux; False elsewhere)."""
    flags = set(cpu_fields().get("flags", "").split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


@dataclass(frozen=True)
class Runtime:
    """Device plus the precision policy for it; pass one around instead of `.cuda()` calls."""

    device: torch.device
    amp_dtype: torch.dtype | None  # None: full float32
    channels_last: bool

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def inference_batch_size(self) -> int:
        """Images per forward pass of a frozen backbone (see the module docstring)."""
        return 64 if self.is_cuda else 16

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        # Only fp16 needs loss scaling; bf16 has float32's range.
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        module = module.to(self.device)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module

    def images(self, batch: torch.Tensor) -> torch.Tensor:
        """Move a (B, 3, H, W) batch to the device in the model's memory format."""
        batch = batch.to(self.device, non_blocking=True)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def describe(self) -> dict[str, object]:
        return {
            "device": str(self.device),
            "amp_dtype": None
            if self.amp_dtype is None
            else str(self.amp_dtype).replace("torch.", ""),
            "channels_last": self.channels_last,
            "threads": torch.get_num_threads(),
        }

    @contextlib.contextmanager
    def no_amp(self) -> Iterator[None]:
        with torch.autocast(self.device.type, enabled=False):
            yield


def resolve_runtime(device: str | torch.device | None = None, precision: str = "auto") -> Runtime:
    """'auto'/None picks CUDA when present, else the CPU with every core.

    precision "auto": mixed precision where the hardware runs it natively; "float32": never,
    so that a run gives the same numbers on CPUs with and without bf16 (tests, smoke runs).
    """
    if precision not in ("auto", "float32"):
        raise ValueError(f"precision must be 'auto' or 'float32', not {precision!r}")
    mixed = precision == "auto"
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = mixed
        torch.backends.cudnn.allow_tf32 = mixed
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return Runtime(device, amp if mixed else None, channels_last=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if cores and torch.get_num_threads() != cores:
        torch.set_num_threads(cores)
    native_bf16 = mixed and cpu_has_native_bf16()
    return Runtime(device, torch.bfloat16 if native_bf16 else None, channels_last=mixed)
