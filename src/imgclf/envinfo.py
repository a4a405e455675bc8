"""`imgclf env` (notes 01, 29-30): versions and devices in one screen, to check a set-up or paste into a bug report."""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata

import torch

from imgclf import __version__
from imgclf.runtime import bf16_supported, resolve_device

PACKAGES = ("torch", "torchvision", "pillow", "numpy", "tensorboard", "matplotlib")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cudnn_version() -> str | None:
    if not torch.backends.cudnn.is_available():
        return None
    v = torch.backends.cudnn.version()  # 92400 -> 9.24.0
    return f"{v // 10000}.{v % 10000 // 100}.{v % 100}" if v else None


def environment() -> dict:
    """Versions of Python and the packages imgclf uses, and every device PyTorch can compute on."""
    cuda = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            cuda.append({"device": f"cuda:{i}", "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                         "capability": f"{props.major}.{props.minor}",
                         "bf16": bf16_supported(torch.device("cuda", i))})
    return {
        "imgclf": __version__,
        "python": f"{platform.python_version()} ({platform.python_implementation()}) at {sys.executable}",
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "torch_cuda": torch.version.cuda,
        "cudnn": _cudnn_version(),
        "cpu": {"cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                "torch_threads": torch.get_num_threads(), "bf16": bf16_supported(torch.device("cpu"))},
        "cuda": cuda,
        "mps": bool(torch.backends.mps.is_available()),
        "default_device": str(resolve_device("auto")),
    }


def environment_output(env: dict, *, as_json: bool = False) -> str:
    """What `imgclf env` prints: `env` (`environment()`) as one JSON object or as `format_environment`'s lines."""
    return (json.dumps(env) if as_json else format_environment(env)) + "\n"


def format_environment(env: dict) -> str:
    yes = {True: "yes", False: "no"}
    lines = [f"{'imgclf':<12} {env['imgclf']}", f"{'python':<12} {env['python']}", f"{'platform':<12} {env['platform']}"]
    for name, version in env["packages"].items():
        extra = ""
        if name == "torch":
            extra = f" (built for CUDA {env['torch_cuda']}, cuDNN {env['cudnn']})" if env["torch_cuda"] else " (CPU build)"
        lines.append(f"{name:<12} {version}{extra}")
    cpu = env["cpu"]
    lines += ["devices:", f"  {'cpu':<8} {cpu['cores']} cores, {cpu['torch_threads']} torch threads, "
                          f"bf16 {yes[cpu['bf16']]}"]
    for dev in env["cuda"]:
        lines.append(f"  {dev['device']:<8} {dev['name']}, {dev['memory_gib']} GiB, compute capability "
                     f"{dev['capability']}, bf16 {yes[dev['bf16']]}")
    if not env["cuda"]:
        lines.append(f"  {'cuda':<8} none (torch.cuda.is_available() is False)")
    lines.append(f"  {'mps':<8} {'available' if env['mps'] else 'not available'}")
    lines.append(f"--device auto uses: {env['default_device']}")
    return "\n".join(lines)
