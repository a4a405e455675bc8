"""The notes' network (note 21): the CIFAR-10 model, written as the notes write it.

Train it with imgclf from this file:

    imgclf train --model docs/examples/tudui.py:Tudui --data cifar10 --recipe notes

The checkpoint records this file's name and SHA-256, not its code; to predict, evaluate or export with
the checkpoint, hand the file over again: `--model-code docs/examples/tudui.py`. The class takes no
arguments, so its last layer gives 10 outputs: data with other numbers of classes need a `num_classes`
constructor parameter (imgclf fills in `num_classes`, `in_channels` and `img_size` where a constructor
names them).
"""

from torch import nn
from torch.nn import Conv2d, Flatten, Linear, MaxPool2d, Sequential


class Tudui(nn.Module):
    def __init__(self):
        super().__init__()
        self.model1 = Sequential(
            Conv2d(3, 32, 5, padding=2),  # (N, 32, 32, 32)
            MaxPool2d(2),  # (N, 32, 16, 16)
            Conv2d(32, 32, 5, padding=2),  # (N, 32, 16, 16)
            MaxPool2d(2),  # (N, 32, 8, 8)
            Conv2d(32, 64, 5, padding=2),  # (N, 64, 8, 8)
            MaxPool2d(2),  # (N, 64, 4, 4)
            Flatten(),  # (N, 1024)
            Linear(1024, 64),  # (N, 64)
            Linear(64, 10),  # (N, 10)
        )

    def forward(self, x):
        x = self.model1(x)
        return x
