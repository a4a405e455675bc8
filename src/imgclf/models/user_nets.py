"""The user's own network (`--model FILE.py:ClassName`, imported by `imgclf.usercode`; or `python:ClassName`,
an object handed over in Python) and its adapter. Its head is its last Linear or Conv2d layer; it brings no
input contract (its pictures are normalised by the data's statistics)."""

from __future__ import annotations

from torch import nn

from imgclf import usercode
from imgclf.errors import UserError
from imgclf.models.adapter import Adapter, Say, last_layer, say_on_stderr
from imgclf.models.weights import load_weights, refuse_weights_name


class UserAdapter(Adapter):
    """A network of the user's: built from their file, or (`python:Class`) not built here at all: its head
    and parameter groups still serve the object `imgclf.fit` is given."""

    family = "user"

    def build(self, *, num_classes: int, in_channels: int = 3, img_size: int = 32, pretrained: str | None = None,
              model_args: str | dict | None = None, base: nn.Module | None = None, say: Say | None = None) -> nn.Module:
        if self.name.startswith(usercode.PYTHON_PREFIX):
            raise UserError(f"{self.name} is a class of a notebook or script, trained with imgclf.fit; continue it "
                            f"there: imgclf.fit({self.name[len(usercode.PYTHON_PREFIX):]}(), DATA, resume=RUN)")
        if pretrained:
            refuse_weights_name(pretrained, self.name)
        model = usercode.build_user_model(usercode.parse_code_name(self.name), model_args, num_classes=num_classes,
                                          in_channels=in_channels, img_size=img_size)
        if pretrained:
            report = load_weights(model, pretrained, skip_mismatched=True)
            (say or say_on_stderr)(self.describe_load(model, report, num_classes))
        return model

    def head(self, model: nn.Module) -> list[nn.Module]:
        return [last_layer(model)[1]]
