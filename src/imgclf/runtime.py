"""Where and how numbers are computed (notes 29-30): device choice, precision, autocast."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from imgclf.errors import UserError


def resolve_device(text: str, dist=None) -> torch.device:
    """'auto' picks CUDA (this process's local rank), then Apple's MPS, then the CPU; others are checked."""
    local_rank = dist.local_rank if dist is not None else 0
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UserError(f"unknown --device {text!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda, but PyTorch sees no CUDA GPU here; use --device auto or cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        elif device.index >= torch.cuda.device_count():
            raise UserError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) here")
        torch.cuda.set_device(device)
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps, but Apple's MPS is not available here; use --device auto or cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unsupported --device {text!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
                    and cpu_has_native_bf16())
    return False


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bf16 in hardware (x86 AVX512-BF16 or AMX, Arm BF16). oneDNN also accepts
    bf16 on a plain AVX512 CPU, emulating it: there bf16 training ran 3-4x slower than fp32 (resnet18 at 128,
    an AVX512 Xeon without AVX512-BF16), so `auto` must not choose it. Where /proc/cpuinfo cannot be read (not
    Linux), oneDNN's own answer is taken."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.partition(":")[2].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_precision(text: str, device: torch.device) -> torch.dtype:
    """fp32, bf16 or fp16 for autocast; 'auto' is bf16 where the hardware has it, else fp32."""
    if text == "auto":
        return torch.bfloat16 if bf16_supported(device) else torch.float32
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[text]
    if dtype == torch.float16 and device.type == "cpu":
        raise UserError("--precision fp16 needs a GPU; on the CPU use bf16 or fp32")
    return dtype


def autocast_factory(device: torch.device, dtype: torch.dtype):
    """A zero-argument callable returning the autocast context for this device and precision."""
    if dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def weights_dtype(bf16_weights: bool, precision: torch.dtype) -> torch.dtype:
    """The dtype a run keeps its weights in (BatchNorm's stay float32): float32, or bfloat16 with
    --bf16-weights, which needs the run's arithmetic (`precision`, resolved) to be bf16: one UserError line
    otherwise."""
    if not bf16_weights:
        return torch.float32
    if precision != torch.bfloat16:
        raise UserError(f"--bf16-weights needs bf16 arithmetic, but this run computes in {str(precision)[6:]} here; "
                        f"give --precision bf16, or drop --bf16-weights")
    return torch.bfloat16


def cast_weights(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model` with its floating-point weights and buffers in `dtype`, except its BatchNorm layers, which stay
    float32 (their statistics and shifts need the precision; torch's batch norm takes a bf16 input with
    float32 parameters). Unchanged for float32."""
    if dtype == torch.float32:
        return model
    model.to(dtype)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.float()
    return model
