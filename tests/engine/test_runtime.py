"""Precision policy: mixed precision only where the hardware runs it natively, never on request."""

from __future__ import annotations

import pytest
import torch

from scan_engine import runtime as runtime_module
from scan_engine.runtime import Runtime, resolve_runtime


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_uses_bf16_only_on_cpus_that_have_it(monkeypatch, native_bf16: bool) -> None:
    monkeypatch.setattr(runtime_module, "cpu_has_native_bf16", lambda: native_bf16)
    chosen = resolve_runtime("cpu", "auto")
    assert chosen.amp_dtype == (torch.bfloat16 if native_bf16 else None)
    assert chosen.channels_last  # faster without bf16 too


def test_float32_never_autocasts(monkeypatch) -> None:
    monkeypatch.setattr(runtime_module, "cpu_has_native_bf16", lambda: True)
    chosen = resolve_runtime("cpu", "float32")
    assert chosen.amp_dtype is None and not chosen.channels_last
    layer = torch.nn.Linear(4, 4)
    with chosen.autocast():
        assert layer(torch.ones(2, 4)).dtype == torch.float32


def test_bf16_autocast_runs_a_linear_layer_in_bf16(monkeypatch) -> None:
    monkeypatch.setattr(runtime_module, "cpu_has_native_bf16", lambda: True)
    with resolve_runtime("cpu", "auto").autocast():
        assert torch.nn.Linear(4, 4)(torch.ones(2, 4)).dtype == torch.bfloat16


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision"):
        resolve_runtime("cpu", "fp8")


def test_cpu_runtime_lays_out_images_and_convolutions_channels_last(monkeypatch) -> None:
    monkeypatch.setattr(runtime_module, "cpu_has_native_bf16", lambda: False)
    chosen = resolve_runtime("cpu", "auto")
    conv = chosen.prepare(torch.nn.Conv2d(3, 8, 3))
    batch = chosen.images(torch.zeros(2, 3, 8, 8))
    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_cpu_fields_read_the_first_processor() -> None:
    fields = runtime_module.cpu_fields()
    assert fields.get("processor") == "0" and "flags" in fields
    assert runtime_module.cpu_has_native_bf16() == (
        "avx512_bf16" in fields["flags"].split() or "amx_bf16" in fields["flags"].split()
    )


def test_inference_batches_are_small_on_a_cpu_and_larger_on_cuda() -> None:
    # Cache-sized batches on a CPU (measured 2x faster than 64 per pass); CUDA keeps 64.
    assert resolve_runtime("cpu").inference_batch_size == 16
    assert Runtime(torch.device("cuda"), None, channels_last=True).inference_batch_size == 64
