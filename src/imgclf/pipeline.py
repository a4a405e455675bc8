"""A run's pieces built from its configuration: data, model, transform and loaders (notes 13-14, 24).

Training, `lr-find`, checkpoint evaluation and the run report all set up through here, so that the batches
they see for the same flags cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
from torch import nn

from imgclf import augment, distributed
from imgclf.cache import Split
from imgclf.config import LONG_RUN, DataConfig, TrainConfig
from imgclf.distributed import DistInfo
from imgclf.errors import UserError
from imgclf.loader import BatchLoader
from imgclf.models import InputContract, adapter_for, build_model
from imgclf.optim import balancing_weights
from imgclf.runtime import cast_weights, resolve_precision, weights_dtype
from imgclf.sources import ImageData, load_data
from imgclf.tasks import refuse_misfits
from imgclf.transforms import INTERPOLATIONS, PLAIN, BatchTransform, Decoding, Mixer, progressive_side
from imgclf.usercode import check_output

WHITENING_PICTURES = 5000  # fastnet's first layer is set from the patch statistics of this many pictures


@dataclass
class RunParts:
    data: ImageData
    model: nn.Module  # on the device, in the run's memory format
    head: list[nn.Parameter]  # what trains while the backbone is frozen (--freeze-backbone, --freeze-epochs)
    transform: BatchTransform
    train: BatchLoader
    val: BatchLoader  # evaluated after every epoch
    test: BatchLoader | None  # evaluated once at the end, when the data set has a test split beside val
    contract: InputContract | None = None  # the pretrained weights' input contract, when it normalises the pictures


def build_run(cfg: TrainConfig, data: ImageData, *, device: torch.device, dist: DistInfo | None = None,
              fresh: bool = True, model: nn.Module | None = None) -> RunParts:
    """Model, transform and loaders of a run on `data`. `fresh`: initialise the weights (pretrained file,
    head initialisation, fastnet's whitening) as a new run does; a resumed run takes them from its checkpoint
    instead. `model`: a network object to use instead of building `cfg.model.name` (the Python API).
    RunParts.data is `data` with the mean and std the pictures are normalised by (`normalization`)."""
    dist = dist or DistInfo()
    refuse_misfits(cfg, data)  # before a network is built for options the task cannot honour
    model = run_network(cfg, data, fresh=fresh, model=model)
    contract = normalization(cfg, data.channels)
    if contract is not None:
        data = dataclasses.replace(data, mean=contract.mean, std=contract.std)
    refuse_unsupported(cfg, len(data.train), dist)
    head = [p for p in model.parameters() if p.requires_grad]
    if cfg.model.whiten_bias_epochs:  # in the optimizer from the start; set_stage freezes it after its epochs
        whitening_bias(model, cfg.model.whiten_bias_epochs, cfg.model.name).requires_grad_(True)
    dtype = weights_dtype(cfg.run.bf16_weights, resolve_precision(cfg.run.precision, device))
    transform = build_transform(cfg.data, data, epochs=cfg.optim.epochs)
    common = dict(transform=transform, device=device, rank=dist.rank, world=dist.world_size,
                  channels_last=cfg.run.channels_last)
    odds = None
    if cfg.data.balance == "sampler":  # each class drawn as often as the others, its pictures equally often
        odds = balancing_weights(data.train.labels, len(data.classes))[data.train.labels]
    mixer = None
    if cfg.data.mixup > 0 or cfg.data.cutmix > 0:
        mixer = Mixer(len(data.classes), mixup=cfg.data.mixup, cutmix=cfg.data.cutmix, switch=cfg.data.mix_switch)
    train = BatchLoader(data.train, batch_size=cfg.data.batch_size, train=True, seed=cfg.run.seed, dtype=dtype,
                        sample_weights=odds, mixer=mixer, sides=_sides(cfg, data, model),
                        drop_last=cfg.data.drop_last, **common)
    batch = eval_batch_size(cfg.data, data.val)
    val, test = (None if split is None else BatchLoader(split, batch_size=batch, train=False, **common)
                 for split in (data.val, data.test))
    if fresh and hasattr(model, "init_whitening"):
        model.init_whitening(whitening_batch(data.train, transform, device))
    model = cast_weights(place_model(model, device, channels_last=cfg.run.channels_last), dtype)
    return RunParts(data, model, head, transform, train, val, test, contract)


def refuse_unsupported(cfg: TrainConfig, pictures: int, dist: DistInfo) -> None:
    """One UserError line for what a run of `cfg` on `pictures` training pictures and the processes of `dist`
    cannot do."""
    for flag, value in (("--freeze-epochs", cfg.model.freeze_epochs),
                        ("--whiten-bias-epochs", cfg.model.whiten_bias_epochs)):
        if value and dist.enabled:
            raise UserError(f"{flag} is not supported with several processes yet (DistributedDataParallel fixes the "
                            f"trainable weights when it starts); train the stages as two runs")
    if cfg.data.batch_size < dist.world_size:
        raise UserError(f"--batch-size {cfg.data.batch_size} is smaller than the {dist.world_size} processes; "
                        f"it is the global batch size, split across them")
    if cfg.run.bf16_weights and cfg.run.ema:  # its small steps (1 - --ema-decay) would round away in bf16
        raise UserError("--ema with --bf16-weights is not supported: the average would be kept in bf16; use "
                        "--lookahead (its average is float32), or drop one of them")
    if cfg.data.drop_last and pictures < cfg.data.batch_size:
        raise UserError(f"--drop-last: the {pictures} training pictures make no full batch of "
                        f"{cfg.data.batch_size}; give a smaller --batch-size, or drop --drop-last")


def run_network(cfg: TrainConfig, data: ImageData, *, fresh: bool, model: nn.Module | None = None) -> nn.Module:
    """The run's network: `model` (the Python API's object, checked against `data`) or `cfg.model.name` built for
    `data`, a new run's from --pretrained weights; a new run's head then starts as --head-init says."""
    if model is not None:  # the Python API's object: one line now, rather than a traceback in the first step
        check_output(model, type(model).__name__, num_classes=len(data.classes), in_channels=data.channels,
                     img_size=data.img_size)
    else:
        model = build_model(cfg.model.name, num_classes=len(data.classes), in_channels=data.channels,
                            img_size=data.img_size, pretrained=cfg.model.pretrained if fresh else None,
                            freeze_backbone=cfg.model.freeze_backbone or cfg.model.freeze_epochs > 0,
                            model_args=cfg.model.args)
    if fresh and cfg.model.head_init != "default":
        adapter_for(cfg.model.name).init_head(model, cfg.model.head_init)
    return model


def describe_finetune(cfg: TrainConfig, contract: InputContract | None, side: int | None = None) -> str:
    """One line on how a run from --pretrained weights trains: stages, optimiser, head, normalisation, and
    evaluation's resize and crop of pictures of `side` pixels (default --img-size)."""
    m, o = cfg.model, cfg.optim
    if m.freeze_backbone:
        stages = "the new head alone"
    elif m.freeze_epochs:
        stages = (f"the new head alone for {m.freeze_epochs} epoch{'s' if m.freeze_epochs > 1 else ''}, then the "
                  f"whole network (backbone at {m.backbone_lr_scale:g}x the rate)")
    else:
        stages = "the whole network"
    return (f"fine-tuning from {m.pretrained}: {stages}; {o.optimizer} lr {o.lr:g}, {o.schedule}, batch "
            f"{cfg.data.batch_size}; head init {m.head_init}; BatchNorm statistics {m.bn_stats}; "
            f"{describe_input(contract, side or cfg.data.img_size)}")


def describe_input(contract: InputContract | None, side: int | None) -> str:
    """How pictures of `side` pixels (None: not known yet) enter the network, normalised and, for evaluation
    (and predict, serve, exports), resized and cropped, as `contract` (normalisation's, or None) says."""
    norm = (f"mean {contract.mean} std {contract.std} ({contract.source})" if contract is not None
            else "the training pictures' mean and std")
    decoding = contract_decoding(contract)
    if decoding == PLAIN:
        return f"pictures normalised by {norm}; evaluated with the shorter side resized (bilinear) to the side"
    resize = f"{decoding.resize_for(side)} then the centre {side}" if side else \
        "floor(side / crop_pct) then the centre side"
    return (f"pictures normalised by {norm}; evaluated with the shorter side resized ({decoding.interpolation}) "
            f"to {resize} (crop_pct {decoding.crop_pct:g})")


def contract_decoding(contract: InputContract | None) -> Decoding:
    """The Decoding of pictures that `contract` (normalisation's, or None) asks for: its interpolation and
    centre crop (bilinear for an interpolation Pillow has not: INTERPOLATIONS); imgclf's own (PLAIN) without
    one."""
    if contract is None:
        return PLAIN
    known = contract.interpolation in INTERPOLATIONS
    return Decoding(contract.interpolation if known else PLAIN.interpolation, contract.crop_pct)


def run_decoding(cfg: TrainConfig) -> Decoding:
    """How the run's pictures are decoded (transforms.Decoding): as the input contract that normalises them
    asks (`normalization`), else imgclf's own. Pure in `cfg`, like `normalization`."""
    return contract_decoding(normalization(cfg, 3))


def normalization(cfg: TrainConfig, channels: int) -> InputContract | None:
    """The input contract of the run's pretrained weights when the pictures are to be normalised by its mean
    and std (--normalize weights, or auto with --pretrained weights whose contract is known: timm's
    pretrained_cfg, torchvision's weights); None where the data's own statistics normalise them. Pure in
    `cfg`: a resumed run, `lr-find` and the report normalise as the run did."""
    if cfg.data.normalize == "data" or (cfg.data.normalize == "auto" and channels not in (1, 3)):
        return None  # bands beyond RGB (imgclf.bands): RGB weights' statistics say nothing of them
    contract = adapter_for(cfg.model.name).input_contract(cfg.model.pretrained) if cfg.model.pretrained else None
    if contract is None and cfg.data.normalize == "weights":
        if not cfg.model.pretrained:
            raise UserError("--normalize weights needs --pretrained weights; without them the data's statistics "
                            "normalise the pictures (--normalize data)")
        raise UserError(f"--normalize weights: imgclf knows no input contract (mean and std) of the weights "
                        f"{cfg.model.pretrained} for {cfg.model.name}; use --normalize data")
    return None if contract is None else contract.for_channels(channels)


def _sides(cfg: TrainConfig, data: ImageData, model: nn.Module):
    """Progressive resizing's epoch -> training side, once the model is known to take the smallest side; None
    without --progressive-resize."""
    start = cfg.data.progressive_resize
    if start is None:
        return None
    if start >= data.img_size:
        raise UserError(f"--progressive-resize {start} must be smaller than the picture side ({data.img_size})")
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, data.channels, start, start))
    except (RuntimeError, ValueError) as err:
        raise UserError(f"--progressive-resize {start}: {cfg.model.name} cannot take {start}x{start} pictures "
                        f"({str(err).splitlines()[0][:120]}); give a larger side, or use a model that pools "
                        f"globally (fastnet, torchvision, timm)") from None
    finally:
        model.train(training)
    return functools.partial(progressive_side, epochs=cfg.optim.epochs, start=start, full=data.img_size)


def augmentation(cfg: DataConfig, data: ImageData, *, epochs: int = LONG_RUN) -> str:
    """The preset `cfg` asks for on `data` (imgclf.augment.choose: "auto" resolved by the kind of data, the
    run's length and the operations' options given; an option its preset would ignore is refused)."""
    return augment.choose(cfg, photos=data.photos, epochs=epochs)


def set_stage(model: nn.Module, head: list[nn.Parameter], cfg: TrainConfig, epoch: int) -> None:
    """Staged fine-tuning: from epoch --freeze-epochs on (counted from 0), the whole network trains. With
    --whiten-bias-epochs N, fastnet's whitening bias trains in epochs 0..N-1 only (a frozen parameter gets no
    gradient, so the optimizer, which holds it from the start, leaves it)."""
    if cfg.model.freeze_epochs and not cfg.model.freeze_backbone:
        head_ids = {id(p) for p in head}
        for p in model.parameters():
            p.requires_grad_(epoch >= cfg.model.freeze_epochs or id(p) in head_ids)
    if cfg.model.whiten_bias_epochs:
        whitening_bias(model, cfg.model.whiten_bias_epochs, cfg.model.name).requires_grad_(
            epoch < cfg.model.whiten_bias_epochs)


def whitening_bias(model: nn.Module, epochs: int, name: str) -> nn.Parameter | None:
    """The bias of fastnet's whitening first layer (`model.whiten`), or None where the model has none; with
    --whiten-bias-epochs set (`epochs` > 0), a model without one is one UserError line."""
    bias = getattr(getattr(model, "whiten", None), "bias", None)
    if epochs and not isinstance(bias, nn.Parameter):
        raise UserError(f"--whiten-bias-epochs is for fastnet networks (a whitening first layer with a bias); "
                        f"{name} has none")
    return bias


def build_transform(cfg: DataConfig, data: ImageData, *, epochs: int = LONG_RUN) -> BatchTransform:
    """The train/eval preset for `data`: its statistics and the augmentation `cfg` asks for (the photo recipe's
    strength by the run's length, `epochs`, where `cfg` leaves it open)."""
    options = augment.options(cfg, size=data.img_size, mean=data.mean, epochs=epochs)
    pad = options["crop"]["pad"]
    preset = augmentation(cfg, data, epochs=epochs)
    if data.channels not in (1, 3) and "policy" in augment.PRESETS[preset] and options["policy"]["policy"] != "none":
        raise UserError(f"--auto-augment {options['policy']['policy']} is made of colour operations for 1 or 3 "
                        f"channels, not {data.channels}; give --auto-augment none")
    if pad >= data.img_size:
        raise UserError(f"--crop-pad {pad} must be smaller than the picture side ({data.img_size})")
    return BatchTransform(data.mean, data.std, preset, pad=pad,
                          size=data.img_size, options=options)


def eval_batch_size(cfg: DataConfig, split: Split) -> int:
    """--eval-batch-size, or by default 1024 pictures when they are small and fewer when large (about 12 MB of
    uint8 input a batch: 1024 at 32x32, 256 at 128x128, 83 at 224x224), so that evaluating photos takes no
    more memory than training on them."""
    if cfg.eval_batch_size:
        return cfg.eval_batch_size
    c, h, w = split.images.shape[1:]
    return max(1, min(1024, (12 << 20) // (c * h * w)))


def eval_loader(split: Split, transform: BatchTransform, *, batch_size: int, device: torch.device,
                channels_last: bool = False) -> BatchLoader:
    """Every picture of `split` once, in order, normalised as in training (no augmentation)."""
    return BatchLoader(split, batch_size=batch_size, transform=transform, train=False, device=device,
                       channels_last=channels_last)


def whitening_batch(split: Split, transform: BatchTransform, device: torch.device) -> torch.Tensor:
    """The first pictures of `split`, normalised, on the CPU: what fastnet's whitening layer is set from."""
    loader = eval_loader(split, transform, batch_size=WHITENING_PICTURES, device=device)
    return next(iter(loader.epoch(0)))[0].cpu()


def place_model(model: nn.Module, device: torch.device, *, channels_last: bool) -> nn.Module:
    return model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)


def load_data_ranked(cfg: DataConfig, dist: DistInfo, decoding: Decoding = PLAIN) -> ImageData:
    """Rank 0 decodes (and caches) first; the others then read its cache instead of decoding again. Options
    that no augmentation preset can run together are refused before any decoding. `decoding`: the run's
    (`run_decoding`)."""
    augment.choose(cfg, photos=False, epochs=1)  # refuses the same whatever the data and length
    if not dist.is_main:
        distributed.barrier(dist)
    data = load_data(cfg, progress=dist.is_main, decoding=decoding)
    if dist.is_main:
        distributed.barrier(dist)
    return data
