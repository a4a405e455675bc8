"""Class heatmaps (issue 25, point 1): where in a picture the network looked for a class, by Grad-CAM
(Selvaraju et al., 2017) and Grad-CAM++ (Chattopadhay et al., 2018): `imgclf cam`.

Both weigh the feature maps of one layer by the gradient of the class's logit with respect to them, and
keep the positive part of the sum. Written here, not taken from pytorch-grad-cam: that package brings
OpenCV, scikit-learn and ttach for what is two forward hooks and a few tensor operations, and its layer
must be named by the caller, where imgclf finds it for any network (`find_layer`).

The layer: by default the last module, in the order the forward pass runs them, whose output is a 4-D
(N, C, H, W) tensor with H and W over 1 (the last convolutional stage: resnet's `layer4`, TutorialCNN's
`features`); `--layer NAME` chooses another (the names are those of `model.named_modules()`, as `imgclf
inspect` shows them). A network without such an output (a vision transformer's tokens) needs --layer of a
4-D one or cannot be explained this way: one UserError line says so."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imgclf.errors import UserError, shown

METHODS = ("gradcam", "gradcam++")
SHOWN_SIDE = 224  # overlays of smaller inputs are enlarged to this side, so that the heatmap can be seen


def spatial_layers(model: nn.Module, x: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """(name, output shape) of every module of `model` whose output for `x` is 4-D with H, W > 1, in the order
    their forward passes end (a container after its children); the model itself is left out."""
    found, handles = [], []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(module, inputs, output, name=name):
            if isinstance(output, torch.Tensor) and output.ndim == 4 and min(output.shape[-2:]) > 1:
                found.append((name, tuple(output.shape)))

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return found


def find_layer(model: nn.Module, x: torch.Tensor, name: str | None = None) -> str:
    """The layer to explain: `name` (checked: a module giving a 4-D output with H, W > 1 for `x`), or by default
    the last such one (`spatial_layers`). One UserError line when there is none or `name` is not one."""
    layers = spatial_layers(model, x)
    names = [n for n, _ in layers]
    if name is None:
        if not layers:
            raise UserError("the network has no layer with a spatial (N, C, H, W) output to explain (a vision "
                            "transformer?); give --layer NAME of one")
        return names[-1]
    if name not in names:
        known = ", ".join(names[-6:]) or "none"
        raise UserError(f"--layer {shown(name)} is not a module of the network with a spatial (N, C, H, W) "
                        f"output; the last ones are: {known}")
    return name


def class_maps(model: nn.Module, layer: str, x: torch.Tensor, targets: torch.Tensor | None = None,
               method: str = "gradcam") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(heatmaps (N, H, W) in [0, 1] at the input's size, the classes explained (N,), the logits (N, classes))
    of `model` (in eval mode) on the normalised batch `x`: `method`'s weighting of module `layer`'s feature
    maps by the gradient of each picture's target logit (`targets`, default its most probable class). A map
    with no positive evidence is all zeros."""
    if method not in METHODS:
        raise UserError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    module = dict(model.named_modules())[layer]
    kept: dict[str, torch.Tensor] = {}

    def hook(module, inputs, output):
        kept["acts"] = output.clone()  # a later in-place operation (ReLU(inplace=True)) must not change it
        return kept["acts"]

    handle = module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = model(x.detach().requires_grad_(True))  # a graph even when every weight is frozen
            chosen = logits.argmax(1) if targets is None else targets
            # torch.autograd.grad, not backward(): the weights' .grad are left as they are
            grads = torch.autograd.grad(logits.gather(1, chosen.view(-1, 1)).sum(), kept["acts"])[0]
    finally:
        handle.remove()
    acts, grads = kept["acts"].detach().float(), grads.float()
    weights = (grad_cam_weights if method == "gradcam" else grad_cam_pp_weights)(acts, grads)
    cam = torch.relu((weights[:, :, None, None] * acts).sum(1, keepdim=True))
    cam = nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    top = cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    return (cam / top).clamp(0, 1), chosen.detach(), logits.detach()


def grad_cam_weights(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM: each channel's weight is its gradient averaged over the positions. (N, C)."""
    return grads.mean(dim=(2, 3))


def grad_cam_pp_weights(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++: each position's positive gradient weighted by alpha = g^2 / (2 g^2 + sum(A) g^3), the
    closed form for an exponential of the score (so that several separate regions of a class all count). (N, C)."""
    g2, g3 = grads.pow(2), grads.pow(3)
    denominator = 2 * g2 + acts.sum(dim=(2, 3), keepdim=True) * g3
    alpha = torch.where(denominator != 0, g2 / denominator.where(denominator != 0, torch.ones_like(denominator)),
                        torch.zeros_like(g2))
    return (alpha * torch.relu(grads)).sum(dim=(2, 3))


def _colormap(values: np.ndarray) -> np.ndarray:
    """[0, 1] values -> uint8 RGB of matplotlib's "jet" (blue: cold, red: hot)."""
    from matplotlib import colormaps

    return (colormaps["jet"](values)[..., :3] * 255).astype(np.uint8)


def overlay(picture: np.ndarray, heatmap: np.ndarray, *, strength: float = 0.45) -> np.ndarray:
    """uint8 (H, W, C) picture (C 1 or 3) under the [0, 1] (H, W) `heatmap` coloured: uint8 (H, W, 3)."""
    rgb = np.repeat(picture, 3, axis=2) if picture.shape[2] == 1 else picture
    mixed = (1 - strength) * rgb.astype(np.float64) + strength * _colormap(heatmap).astype(np.float64)
    return mixed.round().clip(0, 255).astype(np.uint8)


@dataclass
class CamResult:
    """What `cam_pictures` did: the layer and method, per picture (path, written PNG, class, probability)
    and the grid PNG; `failed`: (path, why) of the pictures that could not be read."""
    layer: str
    method: str
    pictures: list[tuple[str, Path, str, float]] = field(default_factory=list)
    grid: Path | None = None
    failed: list[tuple[str, str]] = field(default_factory=list)


def cam_pictures(checkpoint, images: list[str], out, *, class_name: str | None = None, method: str = "gradcam",
                 layer: str | None = None, device: str = "auto") -> CamResult:
    """`imgclf cam`: for each picture of `images` (files and folders, as predict takes them), the heatmap of
    `class_name` (default: the picture's most probable class) written as OUT/<name>.cam.png (the picture
    and its overlay side by side), and for more than one picture OUT/grid.png of the overlays, captioned."""
    from imgclf.checkpoint import load_checkpoint
    from imgclf.models import model_from_checkpoint
    from imgclf.predict import expand_paths
    from imgclf.runtime import resolve_device

    if method not in METHODS:
        raise UserError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    ckpt = load_checkpoint(checkpoint)
    classes, inp = ckpt["classes"], ckpt["input"]
    if class_name is not None and class_name not in classes:
        raise UserError(f"--class {shown(class_name)} is not a class of the checkpoint ({', '.join(classes[:8])}"
                        f"{', ...' if len(classes) > 8 else ''})")
    dev = resolve_device(device)
    model = model_from_checkpoint(ckpt).float().to(dev).eval()
    pictures, failed = _read(expand_paths(images), inp)
    if not pictures:
        raise UserError("no picture could be read" + (f" ({shown(failed[0][0])}: {failed[0][1]})" if failed else ""))
    x = _normalised(np.stack([p for _, p in pictures]), inp).to(dev)
    name = find_layer(model, x[:1], layer)
    result = CamResult(name, method, failed=failed)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    overlays, captions = [], []
    for start in range(0, len(pictures), 16):  # gradients of a batch at a time
        chunk = pictures[start : start + 16]
        targets = None if class_name is None else torch.full((len(chunk),), classes.index(class_name), device=dev)
        maps, chosen, logits = class_maps(model, name, x[start : start + 16], targets, method)
        probs = ckpt_probabilities(ckpt, logits.cpu())
        for (path, picture), heat, c, row in zip(chunk, maps.cpu().numpy(), chosen.tolist(), probs, strict=True):
            shown_overlay = overlay(picture, heat)
            written = _write_pair(out, path, picture, shown_overlay, result.pictures)
            result.pictures.append((path, written, classes[c], float(row[c])))
            overlays.append(shown_overlay.transpose(2, 0, 1))
            captions.append(f"{Path(path).name[:18]}\n{classes[c][:18]} {float(row[c]):.0%}")
    if len(pictures) > 1:
        result.grid = _write_grid(out / "grid.png", overlays, captions, f"{method} of {name}")
    return result


def ckpt_probabilities(ckpt: dict, logits: torch.Tensor) -> torch.Tensor:
    """The checkpoint's task's probabilities of `logits` (calibrated, as predict gives them)."""
    from imgclf.tasks import checkpoint_task

    return checkpoint_task(ckpt).activation(logits.float())


def _read(paths: list[str], inp: dict) -> tuple[list[tuple[str, np.ndarray]], list[tuple[str, str]]]:
    """The pictures of `paths` decoded as predict decodes them (uint8 (S, S, C)), and the failures."""
    from imgclf.predict import fetch
    from imgclf.transforms import BadImage, load_image

    good, bad = [], []
    for path in paths:
        try:
            good.append((path, load_image(fetch(path), size=inp["size"], channels=inp["channels"])))
        except BadImage as err:
            bad.append((path, str(err)))
    return good, bad


def _normalised(pictures: np.ndarray, inp: dict) -> torch.Tensor:
    """uint8 (N, S, S, C) -> the float (N, C, S, S) batch the network takes."""
    from imgclf.transforms import BatchTransform

    return BatchTransform(tuple(inp["mean"]), tuple(inp["std"]))(torch.from_numpy(pictures).permute(0, 3, 1, 2),
                                                                 train=False)


def _enlarged(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) enlarged (nearest) to at least SHOWN_SIDE, so that small inputs can be seen."""
    factor = max(1, -(-SHOWN_SIDE // max(image.shape[:2])))
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


def _write_pair(out: Path, path: str, picture: np.ndarray, mixed: np.ndarray, done: list) -> Path:
    """OUT/<stem>.cam.png: the picture and its overlay side by side (a number added when names repeat)."""
    from imgclf.visualize import save_rgb_png

    stem = Path(path).stem if path != "-" else "stdin"
    taken = {p.name for _, p, _, _ in done}
    name = f"{stem}.cam.png"
    for i in range(2, len(done) + 3):
        if name not in taken:
            break
        name = f"{stem}-{i}.cam.png"
    rgb, mixed = _enlarged(np.repeat(picture, 3, axis=2) if picture.shape[2] == 1 else picture), _enlarged(mixed)
    gap = np.full((rgb.shape[0], max(2, rgb.shape[1] // 32), 3), 255, dtype=np.uint8)
    return save_rgb_png(np.concatenate([rgb, gap, mixed], axis=1), out / name)


def _write_grid(path: Path, overlays: list[np.ndarray], captions: list[str], title: str) -> Path:
    from imgclf.visualize import image_grid, save_png

    return save_png(image_grid(overlays, captions, ncols=min(6, len(overlays)), lines=2, tile_inches=1.8,
                               title=title), path)


def cam_output(result: CamResult) -> tuple[str, str]:
    """`imgclf cam`'s (standard output, standard error): a line per picture written, the grid; failures."""
    lines = [f"{shown(str(written))}  {shown(label)} {p:.1%}" for _, written, label, p in result.pictures]
    if result.grid is not None:
        lines.append(f"wrote {result.grid}")
    lines.append(f"({result.method} of layer {shown(result.layer)})")
    err = "".join(f"imgclf: {shown(path)}: {shown(why)}\n" for path, why in result.failed)
    return "\n".join(lines) + "\n", err
