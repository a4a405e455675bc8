"""timm's architectures (`--model timm/NAME`, optional: `pip install 'imgclf[timm]'`) and their adapter: the
head is what timm's `get_classifier` gives, and the input contract is timm's `pretrained_cfg` of the weights."""

from __future__ import annotations

import difflib
import urllib.parse
from pathlib import Path

from torch import nn

from imgclf import usercode
from imgclf.errors import UserError
from imgclf.models.adapter import Adapter, InputContract, Say, init_layers, say_on_stderr
from imgclf.models.weights import check_reachable, load_weights

TIMM_PREFIX = "timm/"
TIMM_MISSING = "pip install 'imgclf[timm]'"


class TimmAdapter(Adapter):
    """timm's architecture `name` (timm/ARCH or timm/ARCH.TAG): built by timm with the run's classes (and its
    own head initialisation), a pretrained file loaded where its tensors fit (its old head does not)."""

    family = "timm"

    def build(self, *, num_classes: int, in_channels: int = 3, img_size: int = 32, pretrained: str | None = None,
              model_args: str | dict | None = None, base: nn.Module | None = None, say: Say | None = None) -> nn.Module:
        """Built for the request and checked on one blank picture."""
        timm, arch = self._arch()
        file = bool(pretrained) and Path(pretrained).expanduser().exists()
        hub = _timm_hub_name(timm, arch, pretrained) if pretrained and not file else None
        kwargs = {**usercode.parse_model_args(model_args), "num_classes": num_classes, "in_chans": in_channels}
        model = _timm_create(timm, self.name, hub or arch, img_size, pretrained=hub is not None, **kwargs)
        report = load_weights(model, pretrained, skip_mismatched=True) if file else None
        usercode.check_output(model, self.name, num_classes=num_classes, in_channels=in_channels, img_size=img_size)
        if report is not None:
            (say or say_on_stderr)(self.describe_load(model, report, num_classes))
        return model

    def head(self, model: nn.Module) -> list[nn.Module]:
        classifier = model.get_classifier()
        return list(classifier) if isinstance(classifier, tuple) else [classifier]

    def replace_head(self, model: nn.Module, num_classes: int, *, init: str = "default") -> list[nn.Module]:
        """timm's `reset_classifier` (which keeps the model's pooling), then `init`."""
        model.reset_classifier(num_classes)
        layers = self.head(model)
        init_layers(layers, init)
        return layers

    def input_contract(self, pretrained: bool | str | None) -> InputContract | None:
        """timm's `pretrained_cfg` of the weights: of the tag `pretrained` names, else (True, DEFAULT, a file)
        the default weights of the architecture (or of its tag in timm/ARCH.TAG). None for an architecture
        timm has no weights for."""
        if not pretrained:
            return None
        timm, arch = self._arch()
        named = isinstance(pretrained, str) and not Path(pretrained).expanduser().exists()
        try:
            full = _weights_name(timm, arch, pretrained if named else "DEFAULT")
        except UserError:
            if named:
                raise
            return None  # no weights of this architecture in timm's list: nothing says what they want
        cfg = timm.models.get_pretrained_cfg(full)
        if cfg is None or not cfg.mean:
            return None
        return InputContract(tuple(cfg.mean), tuple(cfg.std), cfg.interpolation or "bilinear",
                             float(cfg.crop_pct or 1.0), int(cfg.input_size[-1]),
                             f"timm pretrained_cfg of {cfg.architecture}.{cfg.tag}" if cfg.tag else
                             f"timm pretrained_cfg of {cfg.architecture}")

    def _arch(self):
        """(the timm module, the architecture name), after checking that timm knows it."""
        timm = _import_timm(self.name)
        arch = self.name[len(TIMM_PREFIX):]
        if not arch or not timm.is_model(arch):
            close = difflib.get_close_matches(arch, timm.list_models(), n=3)
            hint = f"did you mean {', '.join(TIMM_PREFIX + c for c in close)}? " if close else ""
            raise UserError(f"timm has no model {arch!r}; {hint}`imgclf models --search TEXT` lists them")
        return timm, arch


def _import_timm(name: str):
    try:
        import timm
    except ImportError:
        raise UserError(f"--model {name} needs the package timm: {TIMM_MISSING}") from None
    return timm


def _timm_create(timm, name: str, arch: str, img_size: int, *, pretrained: bool, **kwargs) -> nn.Module:
    """timm.create_model for `img_size` where the architecture takes that argument, else at its own size
    (refused in one line when that size is fixed and differs)."""
    try:
        try:
            return timm.create_model(arch, pretrained=pretrained, img_size=img_size, **kwargs)
        except TypeError as err:  # the architecture has no img_size argument: it adapts to any size, or none
            if "img_size" not in str(err):
                raise
        model = timm.create_model(arch, pretrained=pretrained, **kwargs)
    except Exception as err:  # noqa: BLE001 - timm and the architectures raise many types
        what = f"with the weights {arch}" if pretrained else f"for {img_size}x{img_size} pictures"
        raise UserError(f"could not build {name} {what} ({usercode.first_line(err)})") from None
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = tuple(cfg.get("input_size") or ())[1:]
    if cfg.get("fixed_input_size") and size and size != (img_size, img_size):
        raise UserError(f"{name} takes only {size[0]}x{size[1]} pictures, got {img_size}x{img_size}; pass "
                        f"--img-size {size[0]}")
    return model


def _timm_hub_name(timm, arch: str, text: str) -> str:
    """timm's name of the weights `--pretrained text` asks for (`_weights_name`), after checking that their
    server answers (else one line, at once)."""
    full = _weights_name(timm, arch, text)
    cfg = timm.models.get_pretrained_cfg(full)
    if cfg.hf_hub_id:
        import huggingface_hub

        page, host = f"{huggingface_hub.constants.ENDPOINT}/{cfg.hf_hub_id}", huggingface_hub.constants.ENDPOINT
    else:
        page = host = cfg.url or ""
    check_reachable(urllib.parse.urlparse(host).hostname, what=f"the timm weights {full}", page=page)
    return full


def _weights_name(timm, arch: str, text: str) -> str:
    """timm's name of the weights `text` names for `arch` (DEFAULT, a tag such as a1_in1k, or ARCH.TAG),
    checked to exist (else one line)."""
    base = arch.partition(".")[0]
    tag = text.strip()
    # DEFAULT: timm's default weights of the architecture, or those of the tag in `--model timm/ARCH.TAG`
    full = arch if tag.upper() == "DEFAULT" else tag if tag.startswith(base + ".") else f"{base}.{tag}"
    known = timm.list_pretrained(base + ".*")
    if not (known if full == base else full in known):
        tags = ", ".join(k.partition(".")[2] for k in known[:6]) or "none"
        raise UserError(f"--pretrained {text!r} is neither a file nor weights timm has for {base} (DEFAULT, or "
                        f"a tag: {tags})")
    return full

