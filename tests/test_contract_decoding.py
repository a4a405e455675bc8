"""A network from pretrained weights sees pictures as its input contract says (issue 22, session 6): held-out
pictures resized with the contract's interpolation to floor(side / crop_pct), then centre-cropped, in the
training run's evaluation, in `imgclf eval`, in predict and in exports; the decode cache keeps each decoding
apart; the checkpoint records it; a run without a contract, and an older checkpoint, are as before."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, write_class_folder
from PIL import Image

from imgclf.cache import CACHE_FORMAT, _fingerprint, cached_split
from imgclf.checkpoint import build_checkpoint, load_checkpoint, save_checkpoint
from imgclf.config import DataConfig, TrainConfig
from imgclf.errors import UserError
from imgclf.models.own import TutorialCNN
from imgclf.sources import list_images, load_data
from imgclf.transforms import PLAIN, Decoding, input_decoding, load_image

pytestmark = pytest.mark.usefixtures("one_thread")
LITE0 = SHARED_DATA / "pretrained" / "tf_efficientnet_lite0_imagenet.pth"
CONTRACT = Decoding("bicubic", 0.875)  # tf_efficientnet_lite0's: 256 then the centre 224; 36 then 32 here


def framed(path, width: int, height: int, seed: int) -> None:
    """A picture whose border (noise on one colour) differs from its centre (noise on another), so that how
    much of it a crop keeps changes what a network sees."""
    rng = np.random.default_rng(seed)
    img = rng.normal(60 + 40 * (seed % 3), 25, (height, width, 3))
    y, x = height // 4, width // 4
    img[y:-y, x:-x] = rng.normal(190 - 30 * (seed % 2), 25, (height - 2 * y, width - 2 * x, 3))
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)


def framed_folder(root, *, per_class: int = 3):
    """root/train and root/val, classes a and b, framed pictures in both orientations (60x45, 45x60)."""
    seed = 0
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                seed += 1
                size = (60, 45) if i % 2 else (45, 60)
                framed(root / split / cls / f"{i}.png", *size, seed=seed)
    return root


def tiny_checkpoint(path, decoding: Decoding = PLAIN, size: int = 32):
    torch.manual_seed(0)
    model = TutorialCNN(num_classes=2, in_channels=3, img_size=size)
    ckpt = build_checkpoint(model_name="tutorial_cnn", classes=["a", "b"], channels=3, size=size,
                            mean=[0.5] * 3, std=[0.25] * 3, config=TrainConfig().to_dict(),
                            state={"state_dict": model.state_dict()}, decoding=decoding)
    save_checkpoint(path, ckpt)
    return path


def test_a_decoding_names_its_resize_crop_and_record():
    assert PLAIN.resize_for(224) == 224 and PLAIN.record(224) == {} and PLAIN.tag() == ""
    assert CONTRACT.resize_for(224) == 256 and CONTRACT.resize_for(32) == 36
    assert Decoding("bilinear", 224 / 232).resize_for(224) == 232  # torchvision's resnet50 V2: never one short
    assert Decoding("bicubic", 0.9).resize_for(224) == 248  # timm's floor(224 / 0.9)
    assert CONTRACT.record(224) == {"interpolation": "bicubic", "crop_pct": 0.875, "resize_side": 256}
    assert input_decoding({"size": 224}) == PLAIN and input_decoding(CONTRACT.record(224)) == CONTRACT
    assert CONTRACT.for_training() == Decoding("bicubic")  # training pictures: the filter, not the crop


def test_load_image_resizes_with_the_contracts_filter_then_crops_the_centre(tmp_path):
    path = tmp_path / "p.png"
    framed(path, 60, 45, seed=1)
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    # 45 -> 36 (floor(32 / 0.875)): 60 -> 48; the centre 32 from (8, 2)
    expected = np.asarray(rgb.resize((48, 36), Image.BICUBIC).crop((8, 2, 40, 34)))
    assert np.array_equal(load_image(path, size=32, channels=3, decoding=CONTRACT), expected)
    plain = np.asarray(rgb.resize((43, 32), Image.BILINEAR).crop((5, 0, 37, 32)))  # as ever
    assert np.array_equal(load_image(path, size=32, channels=3), plain)
    square = tmp_path / "square.png"  # already at the resize side: cropped all the same
    framed(square, 36, 36, seed=2)
    with Image.open(square) as img:
        assert np.array_equal(load_image(square, size=32, channels=3, decoding=CONTRACT),
                              np.asarray(img.convert("RGB").crop((2, 2, 34, 34))))


def test_the_cache_keeps_each_decoding_apart_and_plain_keys_unchanged(tmp_path):
    files = list_images(write_class_folder(tmp_path / "pics", ["a", "b"], 3, size=20))
    labels = [0, 0, 0, 1, 1, 1]
    old = hashlib.sha256(f"{CACHE_FORMAT}:12:3".encode())  # the key as imgclf computed it before decodings
    for path, label in zip(files, labels, strict=True):
        st = path.stat()
        old.update(os.fsencode(path.resolve()) + f"\0{st.st_size}\0{st.st_mtime_ns}\0{label}\n".encode())
    assert _fingerprint(files, labels, 12, 3, PLAIN) == old.hexdigest()[:24]
    decodings = (PLAIN, Decoding("bicubic"), CONTRACT, Decoding("bilinear", 0.875))
    assert len({_fingerprint(files, labels, 12, 3, d) for d in decodings}) == 4
    root = tmp_path / "cache"
    splits = [cached_split(files, labels, size=12, channels=3, cache_root=root, progress=False, decoding=d)[0]
              for d in decodings]
    assert len([p for p in root.iterdir() if p.is_dir()]) == 4
    for d, split in zip(decodings, splits, strict=True):
        assert np.array_equal(np.asarray(split.images[0]), load_image(files[0], size=12, channels=3,
                                                                      decoding=d).transpose(2, 0, 1))
    again, _ = cached_split(files, labels, size=12, channels=3, cache_root=root, progress=False, decoding=CONTRACT)
    assert torch.equal(torch.as_tensor(again.images), torch.as_tensor(splits[2].images))


def test_held_out_pictures_take_the_contract_and_training_pictures_its_filter(tmp_path):
    root = framed_folder(tmp_path / "d")
    cfg = DataConfig(data=str(root), img_size=32, augment="photo", cache_dir=str(tmp_path / "c"))
    data = load_data(cfg, progress=False, decoding=CONTRACT)
    assert data.img_size == 32 and data.train.images.shape[-1] == 37  # the photo store, round(32 * 8 / 7)
    for split, side, decoding in ((data.val, 32, CONTRACT), (data.train, 37, Decoding("bicubic"))):
        expected = np.stack([load_image(f, size=side, channels=3, decoding=decoding).transpose(2, 0, 1)
                             for f in split.files])
        assert np.array_equal(np.asarray(split.images), expected)
    plain = load_data(cfg, progress=False)
    assert not np.array_equal(np.asarray(plain.val.images), np.asarray(data.val.images))
    checked = load_data(cfg, progress=False, decoding=CONTRACT, crop_train=True)  # `imgclf eval`'s: as predict
    assert np.array_equal(np.asarray(checked.train.images[0]),
                          load_image(checked.train.files[0], size=37, channels=3, decoding=CONTRACT).transpose(2, 0, 1))


def test_a_built_in_data_set_takes_the_contract_too():
    cfg = DataConfig(data="fashion-mnist-mini", img_size=32)
    plain, data = load_data(cfg), load_data(cfg, decoding=CONTRACT)
    assert data.val.images.shape == plain.val.images.shape == (1000, 1, 32, 32)
    assert not torch.equal(data.val.images, plain.val.images)
    # the centre 28 of a 36-pixel resize, against the whole picture at 32: the middle is larger
    assert data.val.images.float().mean() > plain.val.images.float().mean()


def test_the_checkpoint_records_the_decoding_and_older_ones_load_as_before(tmp_path):
    ckpt = load_checkpoint(tiny_checkpoint(tmp_path / "c.pt", CONTRACT))
    assert {k: ckpt["input"][k] for k in ("interpolation", "crop_pct", "resize_side")} == CONTRACT.record(32)
    old = load_checkpoint(tiny_checkpoint(tmp_path / "old.pt"))
    assert set(old["input"]) == {"channels", "size", "depth", "mean", "std"}  # a from-scratch run's record: no decoding
    for bad, match in (({"interpolation": "cubic-ish"}, "interpolation"), ({"crop_pct": 1.5}, "crop_pct"),
                       ({"crop_pct": "x"}, "crop_pct"), ({"resize_side": 40}, "resize_side")):
        broken = {**ckpt, "input": {**ckpt["input"], **bad}}
        save_checkpoint(tmp_path / "bad.pt", broken)
        with pytest.raises(UserError, match=match):
            load_checkpoint(tmp_path / "bad.pt")


def test_predict_gives_the_eval_loops_probabilities_under_the_contract(tmp_path):
    """The same pictures, the same weights: `imgclf eval`'s loop and predict agree picture by picture, and
    both follow the checkpoint's contract (a predictor decoding the plain way answers otherwise)."""
    from imgclf.evaluate import evaluate_checkpoint
    from imgclf.predict import Predictor

    root = framed_folder(tmp_path / "d", per_class=4)
    path = tiny_checkpoint(tmp_path / "c.pt", CONTRACT)
    result = evaluate_checkpoint(path, DataConfig(data=str(root), cache_dir=str(tmp_path / "c")), split="val",
                                 device="cpu", precision="fp32")
    files = result["split_data"].files
    predictor = Predictor.from_checkpoint(path, device="cpu")
    assert predictor.decoding == CONTRACT
    answers = predictor.predict(files, topk=2)
    predicted = torch.tensor([[dict(zip(p.labels, p.probs, strict=True))[c] for c in ("a", "b")] for p in answers])
    assert torch.allclose(predicted, result["probs"].float(), atol=1e-5)
    predictor.decoding = PLAIN
    plain = torch.tensor([[dict(zip(p.labels, p.probs, strict=True))[c] for c in ("a", "b")]
                          for p in predictor.predict(files, topk=2)])
    assert (plain - predicted).abs().max() > 1e-3  # the crop does change what the network sees


def test_an_older_checkpoint_predicts_as_before(tmp_path):
    from imgclf.predict import Predictor

    root = framed_folder(tmp_path / "d", per_class=1)
    path = tiny_checkpoint(tmp_path / "old.pt")
    predictor = Predictor.from_checkpoint(path, device="cpu")
    assert predictor.decoding == PLAIN
    files = [str(f) for f in sorted((root / "val").rglob("*.png"))]
    pixels = torch.from_numpy(np.stack([load_image(f, size=32, channels=3).transpose(2, 0, 1) for f in files]))
    expected = predictor.probabilities(pixels)
    got = torch.tensor([[dict(zip(p.labels, p.probs, strict=True))[c] for c in ("a", "b")]
                        for p in predictor.predict(files, topk=2)])
    assert torch.allclose(got, expected, atol=1e-6)


def test_an_export_states_and_applies_the_contract(tmp_path):
    from imgclf.export import PREPROCESSING, RESIZE_RULE, export_checkpoint, export_metadata
    from imgclf.predict import Predictor

    path = tiny_checkpoint(tmp_path / "c.pt", CONTRACT)
    meta = export_metadata(load_checkpoint(path), "onnx")["input"]
    assert {k: meta[k] for k in ("interpolation", "crop_pct", "resize_side")} == CONTRACT.record(32)
    assert "36" in meta["resize"] and "bicubic" in meta["resize"]
    assert any("Image.BICUBIC" in step and "shorter side is 36" in step for step in meta["preprocessing"])
    plain = export_metadata(load_checkpoint(tiny_checkpoint(tmp_path / "old.pt")), "onnx")["input"]
    assert (plain["resize"], plain["preprocessing"]) == (RESIZE_RULE, PREPROCESSING)
    assert not {"interpolation", "crop_pct", "resize_side"} & set(plain)
    from imgclf.formats import check_metadata

    full = export_metadata(load_checkpoint(path), "onnx")
    check_metadata(full, "m.onnx")
    with pytest.raises(UserError, match="interpolation"):  # a hand-edited export: one line, not a traceback
        check_metadata({**full, "input": {**meta, "interpolation": "smooth"}}, "m.onnx")
    out = export_checkpoint(path, "torchscript", tmp_path / "m.torchscript.pt")
    root = framed_folder(tmp_path / "d", per_class=1)
    files = [str(f) for f in sorted((root / "val").rglob("*.png"))]
    exported = Predictor.from_path(out.path)
    assert exported.decoding == CONTRACT
    for a, b in zip(exported.predict(files), Predictor.from_checkpoint(path, device="cpu").predict(files),
                    strict=True):
        assert a.labels == b.labels and np.allclose(a.probs, b.probs, atol=1e-5)


def test_print_config_and_the_run_say_how_pictures_are_evaluated(tmp_path, capsys):
    from imgclf.cli import build_parser, main, train_config
    from imgclf.pipeline import describe_finetune, normalization

    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    argv = ["train", "--model", "timm/tf_efficientnet_lite0", "--pretrained", str(weights), "--img-size", "224"]
    assert main([*argv, "--print-config"]) == 0
    said = ("evaluated with the shorter side resized (bicubic) to 256 then the centre 224 (crop_pct 0.875)")
    assert capsys.readouterr().out.endswith(f"; {said}\n")
    cfg = train_config(build_parser().parse_args(argv))
    assert describe_finetune(cfg, normalization(cfg, 3)).endswith(f"; {said}")
    scratch = train_config(build_parser().parse_args(["train", "--model", "timm/tf_efficientnet_lite0"]))
    assert main(["train", "--model", "timm/tf_efficientnet_lite0", "--print-config"]) == 0
    assert "evaluated" not in capsys.readouterr().out and normalization(scratch, 3) is None


@pytest.mark.slow
@pytest.mark.skipif(not LITE0.is_file(), reason="../shared/data is absent (ImageNet weights)")
def test_a_fine_tuning_run_evaluates_as_predict_does_on_the_real_weights(tmp_path):
    """A run from the real tf_efficientnet_lite0 weights records the contract (bicubic, crop 0.875: 36 then 32)
    and its best.pt, evaluated by `imgclf eval` and by predict, gives the same probabilities."""
    from imgclf.cli import main
    from imgclf.evaluate import evaluate_checkpoint
    from imgclf.predict import Predictor

    root = framed_folder(tmp_path / "d", per_class=3)
    assert main(["train", "--data", str(root), "--model", "timm/tf_efficientnet_lite0", "--pretrained", str(LITE0),
                 "--img-size", "32", "--epochs", "1", "--device", "cpu", "--precision", "fp32",
                 "--out", str(tmp_path / "r")]) == 0
    best = tmp_path / "r" / "checkpoints" / "best.pt"
    assert input_decoding(load_checkpoint(best)["input"]) == CONTRACT
    result = evaluate_checkpoint(best, DataConfig(data=str(root)), split="val", device="cpu", precision="fp32")
    answers = Predictor.from_checkpoint(best, device="cpu").predict(result["split_data"].files, topk=2)
    predicted = torch.tensor([[dict(zip(p.labels, p.probs, strict=True))[c] for c in ("a", "b")] for p in answers])
    assert torch.allclose(predicted, result["probs"].float(), atol=1e-4)
    metrics = [line for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert abs(__import__("json").loads(metrics[-1])["val_acc"] - result["acc"]) < 1e-9  # the run's own figure
