"""A minimal standalone run of the airbench94 recipe on the CIFAR-10 JPEG folders (needs a CUDA GPU).

Not imgclf's code path: one file, written from the published recipe (fp16 weights, a 2x2 whitening layer,
BatchNorm without scale, identity-initialised convolutions, Nesterov SGD with 64x bias learning rate, a
triangular schedule, Lookahead averaging from epoch 3, alternating flips, 2-pixel shifts, flip-and-shift
test-time augmentation, 9.9 epochs). It answers one question: how much of the gap between imgclf's
accuracy on the JPEG copy and airbench94's published 94.01% (original CIFAR-10) comes from the data?

    python benchmarks/reference_airbench.py CIFAR10_FOLDER [EPOCHS] [SEEDS] [FIRST_SEED]
"""

from __future__ import annotations

import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _read(path: str) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def load_split(root: str, name: str, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised fp16 channels_last images and labels of `root/name/<class>/*.jpg`, on the GPU."""
    files = [(f"{root}/{name}/{c}/{f}", i) for i, c in enumerate(classes)
             for f in sorted(os.listdir(f"{root}/{name}/{c}"))]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        pixels = list(pool.map(_read, [f for f, _ in files], chunksize=512))
    x = torch.tensor(np.stack(pixels)).cuda().permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(MEAN).cuda().view(1, 3, 1, 1)) / torch.tensor(STD).cuda().view(1, 3, 1, 1)
    return x.half().contiguous(memory_format=torch.channels_last), torch.tensor([i for _, i in files]).cuda()


class Norm(nn.BatchNorm2d):
    def __init__(self, channels: int):
        super().__init__(channels, eps=1e-12, momentum=0.4)
        self.weight.requires_grad = False


def conv(c_in: int, c_out: int, kernel: int = 3, padding="same", bias: bool = False) -> nn.Conv2d:
    layer = nn.Conv2d(c_in, c_out, kernel, padding=padding, bias=bias)
    nn.init.dirac_(layer.weight.data[: layer.weight.size(1)])
    return layer


def group(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(conv(c_in, c_out), nn.MaxPool2d(2), Norm(c_out), nn.GELU(), conv(c_out, c_out),
                         Norm(c_out), nn.GELU())


class Scale(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / 9


def make_net(train_x: torch.Tensor) -> nn.Sequential:
    net = nn.Sequential(conv(3, 24, 2, 0, True), nn.GELU(), group(24, 64), group(64, 256), group(256, 256),
                        nn.MaxPool2d(3), nn.Flatten(), nn.Linear(256, 10, bias=False), Scale()).cuda().half()
    net = net.to(memory_format=torch.channels_last)
    for m in net.modules():
        if isinstance(m, Norm):
            m.float()
    patches = train_x[:5000].unfold(2, 2, 1).unfold(3, 2, 1).transpose(1, 3).reshape(-1, 12).float()
    eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
    filters = eigenvectors.T.reshape(12, 3, 2, 2) / torch.sqrt(eigenvalues + 5e-4).view(-1, 1, 1, 1)
    net[0].weight.data[:] = torch.cat([filters, -filters]).half()
    net[0].weight.requires_grad = False
    return net


def shifted(padded: torch.Tensor, pad: int) -> torch.Tensor:
    """One random (2*pad+1)^2 window per picture of an already padded batch."""
    n, c, size = len(padded), padded.shape[1], padded.shape[2] - 2 * pad
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), device=padded.device)
    span = torch.arange(size, device=padded.device)
    rows = (offsets[:, :1] + span).view(n, 1, size, 1).expand(n, c, size, padded.shape[3])
    cols = (offsets[:, 1:] + span).view(n, 1, 1, size).expand(n, c, size, size)
    return padded.gather(2, rows).gather(3, cols)


def train_and_test(data, epochs: float, seed: int) -> str:
    (xtr, ytr), (xte, yte) = data
    torch.manual_seed(seed)
    net = make_net(xtr)
    batch, momentum = 1024, 0.85
    scale = 1024 * (1 + 1 / (1 - momentum))
    lr, wd = 11.5 / scale, 0.0153 * batch / scale
    named = [(k, p) for k, p in net.named_parameters() if p.requires_grad]
    biases = [p for k, p in named if p.ndim == 1 and k != "0.bias"]
    others = [p for k, p in named if not (p.ndim == 1 and k != "0.bias")]
    optimizer = torch.optim.SGD([dict(params=biases, lr=lr * 64, weight_decay=wd / (lr * 64)),
                                 dict(params=others, lr=lr, weight_decay=wd / lr)], momentum=momentum, nesterov=True)
    steps_per_epoch = len(xtr) // batch
    total = math.ceil(epochs * steps_per_epoch)
    peak = int(0.23 * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: 0.2 + 0.8 * i / peak if i < peak else 1 - 0.93 * (i - peak) / (total - peak))
    first_flip = torch.rand(len(xtr), device="cuda") < 0.5
    padded = F.pad(torch.where(first_flip.view(-1, 1, 1, 1), xtr.flip(-1), xtr), (2,) * 4, "reflect")
    average, step = None, 0
    torch.cuda.synchronize()
    start = time.perf_counter()
    for epoch in range(math.ceil(epochs)):
        net[0].bias.requires_grad = epoch < 3
        x = shifted(padded, 2)
        x = x.flip(-1) if epoch % 2 else x
        order = torch.randperm(len(xtr), device="cuda")
        net.train()
        for i in range(steps_per_epoch):
            idx = order[i * batch : (i + 1) * batch]
            logits = net(x[idx].contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits, ytr[idx], label_smoothing=0.2, reduction="sum")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if epoch >= 3 and step % 5 == 0:
                average = average or {k: v.clone() for k, v in net.state_dict().items()}
                _lookahead(net, average, 0.95**5 * (step / total) ** 3)
            if step >= total:
                break
        if average is not None:
            _lookahead(net, average, 1.0)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    net.eval()
    with torch.no_grad():
        def mirrored(v):
            return 0.5 * net(v) + 0.5 * net(v.flip(-1))

        def tta(v):
            p = F.pad(v, (1,) * 4, "reflect")
            return 0.5 * mirrored(v) + 0.25 * (mirrored(p[:, :, :32, :32]) + mirrored(p[:, :, 2:, 2:]))

        plain = torch.cat([net(v) for v in xte.split(2000)]).argmax(1).eq(yte).float().mean().item()
        full = torch.cat([tta(v) for v in xte.split(2000)]).argmax(1).eq(yte).float().mean().item()
    return f"seed {seed}: {epochs} epochs in {seconds:.2f}s, test accuracy {plain:.2%}, with TTA {full:.2%}"


def _lookahead(net: nn.Module, average: dict, decay: float) -> None:
    for (_, avg), value in zip(average.items(), net.state_dict().values(), strict=True):
        if value.dtype in (torch.half, torch.float):
            avg.lerp_(value, 1 - decay)
            value.copy_(avg)


def main() -> None:
    root = sys.argv[1]
    epochs = float(sys.argv[2]) if len(sys.argv) > 2 else 9.9
    seeds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    first = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    torch.backends.cudnn.benchmark = True
    classes = sorted(os.listdir(f"{root}/train"))
    data = load_split(root, "train", classes), load_split(root, "test", classes)
    print(torch.cuda.get_device_name(0), flush=True)
    for seed in range(first, first + seeds):
        print(train_and_test(data, epochs, seed), flush=True)


if __name__ == "__main__":
    main()
