"""Batches (note 14): a split's pictures sliced, augmented and normalised as whole batches on the device."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from imgclf.augment import Draws, mix_seed
from imgclf.cache import Split
from imgclf.transforms import resized


class BatchLoader:
    """Batches of one split, as (normalised float images, labels) on `device`.

    Train order and augmentation depend only on (seed, epoch, step), so an epoch can be replayed or resumed
    from any step. `batch_size` is global: with `world` processes, rank r gets rows r, r+world, ... of each
    global batch; evaluation gives every sample to exactly one rank.
    """

    def __init__(self, split: Split, *, batch_size: int, transform, train: bool, device: torch.device,
                 seed: int = 0, rank: int = 0, world: int = 1, dtype: torch.dtype = torch.float32,
                 channels_last: bool = False, sample_weights: torch.Tensor | None = None, mixer=None,
                 sides: Callable[[int], int] | None = None, drop_last: bool = False):
        self.split, self.batch_size, self.transform, self.train = split, batch_size, transform, train
        self.device, self.seed, self.rank, self.world = device, seed, rank, world
        self.dtype, self.channels_last = dtype, channels_last
        self.sample_weights = sample_weights  # train: draw pictures with these odds (with replacement)
        self.mixer = mixer  # train: transforms.Mixer (mixup / cutmix), or None
        self.sides = sides  # train: epoch -> the side its batches are resized to (progressive resizing), or None
        self.drop_last = drop_last  # train: no partial last batch
        self.images = split.images
        if device.type == "cuda" and isinstance(self.images, torch.Tensor):
            free, _ = torch.cuda.mem_get_info(device)
            if self.images.nbytes < free // 4:  # keep the data set on the GPU, as the speed records do
                self.images = self.images.to(device)
        self.labels = split.labels.to(device) if self.images.device == device else split.labels
        # Alternating flips (airbench): each picture is mirrored in every other epoch, starting at random,
        # so every two epochs see both orientations of every picture exactly once.
        self.first_flip = None
        if train:
            first_flip = torch.rand(len(split), generator=torch.Generator().manual_seed(mix_seed(seed, -1))) < 0.5
            self.first_flip = first_flip.to(self.labels.device)

    def __len__(self) -> int:
        n = len(self.split)
        if not self.train:
            return -(-len(range(self.rank, n, self.world)) // self.batch_size)
        # A last batch that would leave some process one picture or none breaks BatchNorm: it is dropped.
        partial = not self.drop_last and n % self.batch_size >= 2 * self.world
        return n // self.batch_size + (1 if partial else 0)

    def epoch(self, epoch: int, *, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """Yield (images, labels, size of the global batch) for each step from `start_step`."""
        if self.train:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            order = (torch.randperm(len(self.split), generator=gen) if self.sample_weights is None else
                     torch.multinomial(self.sample_weights, len(self.split), replacement=True, generator=gen))
        else:
            order = torch.arange(self.rank, len(self.split), self.world)
        # indices live where the pictures do: a copy to the GPU at each step would wait for the GPU
        order = order.to(self.labels.device)
        for step in range(start_step, len(self)):
            idx = order[step * self.batch_size : (step + 1) * self.batch_size]
            yield self._batch(idx, epoch, step)

    def _rows(self, idx: torch.Tensor) -> torch.Tensor:
        """The pictures `idx` names, on the device."""
        if isinstance(self.images, np.ndarray):  # memory-mapped: read rows in file order
            idx_sorted, inverse = torch.sort(idx)
            rows = torch.from_numpy(np.take(self.images, idx_sorted.cpu().numpy(), axis=0))
            return rows[torch.argsort(inverse)].to(self.device, non_blocking=True)
        return self.images[idx].to(self.device, non_blocking=True)

    def _batch(self, idx: torch.Tensor, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        # Augmentation that draws per picture (the photo recipe) lets each process decode and augment only its
        # own rows of the global batch: each picture's draws depend on (seed, epoch, step, its place in the
        # global batch) alone, so the result does not depend on the number of processes. Otherwise (the
        # flip-crop family's batch stream) every process augments the whole batch and keeps its rows.
        share = self.train and self.world > 1 and self.transform.augmentation.per_picture
        places = range(self.rank, len(idx), self.world) if share else range(len(idx))
        rows = idx[self.rank :: self.world] if share else idx
        images, labels = self._rows(rows), self.labels[rows]
        draws = None
        if self.train:  # random numbers drawn on the training device, so that nothing waits for a copy
            flip = (self.first_flip[rows] ^ bool(epoch % 2)).to(self.device, non_blocking=True)
            draws = Draws(self.seed, epoch, step, tuple(places), self.device, flip)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = self.transform(images, train=self.train, draws=draws, dtype=self.dtype, memory_format=fmt)
        y = labels.to(self.device, non_blocking=True)
        if self.train and self.world > 1 and not share:  # this rank's share of the global batch
            x, y = x[self.rank :: self.world], y[self.rank :: self.world]
        if self.train and self.sides is not None:
            x = resized(x, self.sides(epoch))
        if self.train and self.mixer is not None:  # soft labels (N, classes) from here on (pairs within a rank)
            x, y = self.mixer(x, y, mix_seed(self.seed, epoch, step + 1, -self.rank - 1))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y, len(idx)
