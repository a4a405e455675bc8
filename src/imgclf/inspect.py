"""`imgclf inspect`: every layer of a network with its output shape, parameters and multiply-accumulates
(notes 16-21: how each layer changes the tensor's shape).

Shapes come from a real forward pass of one input with forward hooks on the leaf modules, so they are what
the network does, not what its definition suggests. MACs are counted for convolutions
(C_out * H_out * W_out * C_in / groups * k_h * k_w) and linear layers (in * out per output row); other layers
(pooling, activations, normalisation) are counted as 0, as torchinfo and fvcore do.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from imgclf.errors import UserError


@dataclass
class LayerRow:
    name: str  # dotted path in the model, e.g. features.0
    kind: str  # class name, e.g. Conv2d
    output_shape: list[int]  # without the batch dimension
    params: int  # parameters owned by this layer (0 when it runs a second time)
    macs: int  # multiply-accumulates for one input
    called: bool = True  # False: holds parameters but its parent uses them without calling it


@dataclass
class Summary:
    model: str
    input_shape: list[int]  # C, H, W
    layers: list[LayerRow]
    total_params: int
    trainable_params: int
    total_macs: int
    size_mb: float  # parameters and buffers, in megabytes (10^6 bytes)

    def to_dict(self) -> dict:
        return asdict(self)


def layer_macs(module: nn.Module, inp: torch.Tensor | None, output: torch.Tensor) -> int:
    """Multiply-accumulates of one call of `module` on `inp` that produced `output` (batch of 1)."""
    per_sample = output[0].numel() if output.dim() > 0 else output.numel()
    if isinstance(module, nn.modules.conv._ConvTransposeNd):  # each input element is spread over a kernel
        in_elements = inp[0].numel() if inp is not None and inp.dim() > 0 else 0
        return int(in_elements * module.out_channels // module.groups * math.prod(module.kernel_size))
    if isinstance(module, nn.modules.conv._ConvNd):
        return int(per_sample * module.in_channels // module.groups * math.prod(module.kernel_size))
    if isinstance(module, nn.Linear):
        return int(per_sample * module.in_features)
    if isinstance(module, nn.Bilinear):
        return int(per_sample * module.in1_features * module.in2_features)
    return 0


def attention_macs(module: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor) -> int:
    """Projections of query, key and value, the scores, their weighted sum and the output projection."""
    dim = 1 if module.batch_first else 0
    q_len, k_len, e = query.shape[dim], key.shape[dim], module.embed_dim
    return int(q_len * e * e + k_len * e * (module.kdim + module.vdim) + 2 * q_len * k_len * e + q_len * e * e)


def summarize(model: nn.Module, input_shape: tuple[int, int, int], *, name: str = "model") -> Summary:
    """Run one (1, C, H, W) zero input through `model` in eval mode and record every leaf layer's call."""
    rows: list[LayerRow] = []
    seen: set[int] = set()
    names = {module: n for n, module in model.named_modules()}

    def hook(module, args, kwargs, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(out, torch.Tensor):
            return
        inp = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if isinstance(module, nn.MultiheadAttention):
            query = args[0] if args else kwargs["query"]
            key = args[1] if len(args) > 1 else kwargs.get("key", query)
            macs = attention_macs(module, query, key)
        else:
            macs = layer_macs(module, inp, out)
        own = sum(p.numel() for p in module.parameters(recurse=False))
        rows.append(LayerRow(names[module] or type(module).__name__, type(module).__name__,
                             list(out.shape[1:]), 0 if id(module) in seen else own, macs))
        seen.add(id(module))

    # leaves, and containers that own parameters directly (nn.MultiheadAttention's in_proj_weight)
    watched = [m for m in model.modules()
               if not list(m.children()) or any(True for _ in m.parameters(recurse=False))]
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in watched]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    except RuntimeError as err:
        detail = str(err).splitlines()[0][:200]
        raise UserError(f"{name} cannot take a {'x'.join(map(str, input_shape))} input: {detail}") from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for module in watched:  # e.g. MultiheadAttention's out_proj, whose weights its parent uses directly
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if own and id(module) not in seen:
            rows.append(LayerRow(names[module], type(module).__name__, [], own, 0, called=False))
    params = {id(p): p for p in model.parameters()}.values()
    size = sum(p.numel() * p.element_size() for p in params) + sum(b.numel() * b.element_size()
                                                                  for b in model.buffers())
    return Summary(name, list(input_shape), rows, total_params=sum(p.numel() for p in params),
                   trainable_params=sum(p.numel() for p in params if p.requires_grad),
                   total_macs=sum(r.macs for r in rows), size_mb=size / 1e6)


def format_table(summary: Summary) -> str:
    """The summary as a fixed-width text table with totals, for the terminal."""
    header = ("layer", "type", "output shape", "params", "MACs")
    lines = [(r.name, r.kind, "x".join(map(str, r.output_shape)) if r.called else "(used by its parent)",
              f"{r.params:,}", f"{r.macs:,}") for r in summary.layers]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]

    def fmt(cells) -> str:
        return (f"{cells[0]:<{widths[0]}}  {cells[1]:<{widths[1]}}  {cells[2]:<{widths[2]}}  "
                f"{cells[3]:>{widths[3]}}  {cells[4]:>{widths[4]}}").rstrip()

    rule = "-" * len(fmt(["x" * w for w in widths]))
    out = [f"{summary.model} on a {'x'.join(map(str, summary.input_shape))} input (shapes without the batch "
           f"dimension)", rule, fmt(header), rule, *(fmt(line) for line in lines), rule]
    frozen = summary.total_params - summary.trainable_params
    out += [f"parameters: {summary.total_params:,}" + (f" ({frozen:,} frozen)" if frozen else ""),
            f"MACs:       {summary.total_macs:,} ({_human(summary.total_macs)} per picture)",
            f"size:       {summary.size_mb:.2f} MB of parameters and buffers"]
    return "\n".join(out)


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(int(n))


def model_for(target: str, *, input_shape: tuple[int, int, int], num_classes: int) -> tuple[nn.Module, str]:
    """A model by name (built for `input_shape`) or from an imgclf checkpoint file."""
    path = Path(target).expanduser()
    if path.is_file():
        from imgclf.checkpoint import load_checkpoint
        from imgclf.models import model_from_checkpoint

        ckpt = load_checkpoint(path)
        return model_from_checkpoint(ckpt), f"{ckpt['model']['name']} ({path.name})"
    if target.endswith((".pt", ".pth", ".ckpt")) or ("/" in target and ".py:" not in target
                                                     and not target.startswith("timm/")):
        raise UserError(f"no such checkpoint: {target}")
    from imgclf.models import build_model

    channels, height, _ = input_shape
    return build_model(target, num_classes=num_classes, in_channels=channels, img_size=height), target


def checkpoint_input(target: str) -> tuple[int, int, int] | None:
    """The input shape a checkpoint was trained for, or None for a model name."""
    path = Path(target).expanduser()
    if not path.is_file():
        return None
    from imgclf.checkpoint import load_checkpoint

    inp = load_checkpoint(path)["input"]
    return (inp["channels"], inp["size"], inp["size"])


def inspect_target(target: str, *, input_shape: tuple[int, int, int] | None = None,
                   num_classes: int = 10) -> Summary:
    """The layer table of `target`, a model name or a checkpoint file (`imgclf inspect`), for an input of
    `input_shape` (C, H, W): by default the checkpoint's, or 3x32x32 for a model name. `num_classes` sizes
    the last layer of a model given by name."""
    shape = input_shape or checkpoint_input(target) or (3, 32, 32)
    model, name = model_for(target, input_shape=shape, num_classes=num_classes)
    return summarize(model, shape, name=name)
