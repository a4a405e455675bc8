"""The notes' training loop (sections 26-28), as written there, on a folder of CIFAR-10 pictures.

Per-sample PIL decoding through torchvision's ImageFolder + ToTensor on every epoch, DataLoader batch 64
(num_workers 0), fp32, SGD lr 0.01, `loss.item()` every step, evaluation under `torch.no_grad()`.
One change: ImageFolder lists the pictures class by class, so the train loader shuffles (the notes'
built-in CIFAR10 is already mixed). Prints one JSON line per epoch with its own timings.

    python benchmarks/notes_loop.py --data CIFAR_FOLDER --epochs 3
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader


class Tudui(nn.Module):  # the notes' network (section 21), as imgclf's tutorial_cnn
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv2d(3, 32, 5, 1, 2), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 5, 1, 2), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, 1, 2), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 64), nn.Linear(64, 10),
        )

    def forward(self, x):
        return self.model(x)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    train_data = torchvision.datasets.ImageFolder(f"{args.data}/train", transform=torchvision.transforms.ToTensor())
    test_data = torchvision.datasets.ImageFolder(f"{args.data}/test", transform=torchvision.transforms.ToTensor())
    train_dataloader = DataLoader(train_data, batch_size=64, shuffle=True)
    test_dataloader = DataLoader(test_data, batch_size=64)

    tudui = Tudui()
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(tudui.parameters(), lr=1e-2)
    total_train_step = 0
    for i in range(args.epochs):
        tudui.train()
        start = time.perf_counter()
        for imgs, targets in train_dataloader:
            outputs = tudui(imgs)
            loss = loss_fn(outputs, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total_train_step += 1
            if total_train_step % 100 == 0:
                print(f"step {total_train_step}, loss {loss.item()}", flush=True)
        train_seconds = time.perf_counter() - start

        tudui.eval()
        total_test_loss = 0
        total_accuracy = 0
        start = time.perf_counter()
        with torch.no_grad():
            for imgs, targets in test_dataloader:
                outputs = tudui(imgs)
                loss = loss_fn(outputs, targets)
                total_test_loss += loss.item()
                total_accuracy += (outputs.argmax(1) == targets).sum()
        eval_seconds = time.perf_counter() - start
        print(json.dumps({"epoch": i + 1, "test_acc": float(total_accuracy) / len(test_data),
                          "train_images_per_s": len(train_data) / train_seconds, "train_seconds": train_seconds,
                          "eval_images_per_s": len(test_data) / eval_seconds, "eval_seconds": eval_seconds}),
              flush=True)


if __name__ == "__main__":
    main()
