"""Issue 25, item 5: `imgclf predict CKPT clip.mp4` labels a video's frames (all, every Nth, or --fps a
second), prints a label per second and writes a per-frame CSV; a file, stream or camera the decoder cannot
open is one line. The video is a slideshow of three real CIFAR-10 test pictures, one second each at 10 frames
a second, written with PyAV here; the checkpoint is a tiny network taught those three pictures."""

from __future__ import annotations

import csv
import json
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgclf import video
from imgclf.checkpoint import build_checkpoint, save_checkpoint
from imgclf.cli import main
from imgclf.config import TrainConfig
from imgclf.errors import EXIT_OK, EXIT_PARTIAL
from imgclf.models import TutorialCNN
from imgclf.predict import Predictor

pytestmark = pytest.mark.usefixtures("one_thread")  # in-process trainings: one intra-op thread (conftest)

av = pytest.importorskip("av")

CLASSES = ["airplane", "cat", "ship"]
FPS = 10


def write_slideshow(path: Path, pictures: list[Image.Image], *, fps: int = FPS, side: int = 96) -> Path:
    """An MPEG-4 video showing each of `pictures` for one second (`fps` frames), `side` pixels square."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        for i, picture in enumerate(p.resize((side, side), Image.BICUBIC) for p in pictures for _ in range(fps)):
            frame = av.VideoFrame.from_image(picture)
            frame.pts, frame.time_base = i, Fraction(1, fps)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def taught_checkpoint(path: Path, pictures: list[np.ndarray]) -> Path:
    """A TutorialCNN checkpoint (32x32, mean 0.5, std 0.25) taught to name pictures[i] CLASSES[i], noisy
    copies included so that the video's compression does not fool it."""
    torch.manual_seed(0)
    model = TutorialCNN(num_classes=3, in_channels=3, img_size=32)
    x = torch.from_numpy(np.stack(pictures)).float().div(255).sub(0.5).div(0.25)
    y = torch.arange(3)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        batch = torch.cat([x, (x + 0.3 * torch.randn(7, *x.shape)).flatten(0, 1)])
        loss = torch.nn.functional.cross_entropy(model(batch), y.repeat(8))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    ckpt = build_checkpoint(model_name="tutorial_cnn", classes=CLASSES, channels=3, size=32, mean=[0.5] * 3,
                            std=[0.25] * 3, config=TrainConfig().to_dict(), state={"state_dict": model.state_dict()})
    save_checkpoint(path, ckpt)
    return path


@pytest.fixture(scope="module")
def clip(cifar10_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("video")
    pictures = [Image.open(sorted((cifar10_dir / "test" / name).glob("*.jpg"))[0]).convert("RGB") for name in CLASSES]
    checkpoint = taught_checkpoint(root / "taught.pt", [np.asarray(p).transpose(2, 0, 1) for p in pictures])
    return {"root": root, "checkpoint": checkpoint, "video": write_slideshow(root / "clip.mp4", pictures)}


def test_what_is_a_video(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for text in ("clip.mp4", "a/b.MOV", "rtsp://cam.local/stream", "0", "/dev/video2", "https://x.org/v.mp4?t=1"):
        assert video.is_video(text), text
    (tmp_path / "7").write_bytes(b"")
    for text in ("a.jpg", "https://x.org/a.png", "-", "7", "folder"):
        assert not video.is_video(text), text


def test_a_label_per_second_and_a_row_per_frame(clip, capsys):
    code = main(["predict", str(clip["checkpoint"]), str(clip["video"]), "--device", "cpu", "--topk", "1"])
    out, err = capsys.readouterr()
    assert code == EXIT_OK, err
    lines = out.splitlines()
    assert [line.split("  ")[:2] for line in lines] == [[str(clip["video"]), f"0:0{i}"] for i in range(3)]
    assert [line.split("  ")[2].split()[0] for line in lines] == CLASSES, out
    assert all(line.endswith("(10 frames)") for line in lines), out
    with open(clip["root"] / "clip.frames.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["time_s", "frame", "label", "score", *CLASSES]
    assert [int(r[1]) for r in rows[1:]] == list(range(30))
    assert [float(r[0]) for r in rows[1:]] == pytest.approx([i / FPS for i in range(30)])
    assert [r[2] for r in rows[1:]] == [name for name in CLASSES for _ in range(FPS)]
    for r in rows[1:]:
        scores = [float(v) for v in r[4:]]
        assert sum(scores) == pytest.approx(1, abs=1e-5) and float(r[3]) == max(scores)


def test_frames_are_the_pictures_preparation(clip):
    """A frame goes through Predictor.prepare, as a picture does: the same array as the decoded frame saved
    as a PNG and predicted as a picture."""
    predictor = Predictor.from_path(clip["checkpoint"], device="cpu")
    with av.open(str(clip["video"])) as container:
        frame = next(container.decode(video=0)).to_image()
    frame.save(clip["root"] / "frame.png")
    assert np.array_equal(predictor.prepare(frame), predictor._decode(str(clip["root"] / "frame.png")))  # noqa: SLF001


@pytest.mark.parametrize(("flags", "frames"), [(["--every", "4"], [0, 4, 8, 12, 16, 20, 24, 28]),
                                                (["--fps", "2"], [0, 5, 10, 15, 20, 25]),
                                                (["--fps", "100"], list(range(30)))])
def test_sampling(clip, tmp_path, flags, frames, capsys):
    table = tmp_path / "frames.csv"
    code = main(["predict", str(clip["checkpoint"]), str(clip["video"]), "--device", "cpu", "--json",
                 "--frames-csv", str(table), *flags])
    out, err = capsys.readouterr()
    assert code == EXIT_OK, err
    seconds = [json.loads(line) for line in out.splitlines()]
    assert [s["top"][0]["label"] for s in seconds] == CLASSES
    assert sum(s["frames"] for s in seconds) == len(frames)
    with open(table, newline="") as f:
        assert [int(r["frame"]) for r in csv.DictReader(f)] == frames


@pytest.mark.slow
def test_an_exported_model_labels_a_video(clip, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    onnx = tmp_path / "taught.onnx"
    assert main(["export", str(clip["checkpoint"]), "--format", "onnx", "--out", str(onnx)]) == EXIT_OK
    capsys.readouterr()
    code = main(["predict", str(onnx), str(clip["video"]), "--csv", "--frames-csv", str(tmp_path / "f.csv")])
    out, err = capsys.readouterr()
    assert code == EXIT_OK, err
    rows = list(csv.DictReader(out.splitlines()))
    assert [(r["second"], r["label"]) for r in rows if r["rank"] == "1"] == [("0", "airplane"), ("1", "cat"), ("2", "ship")]


def test_what_cannot_be_opened_is_one_line(clip, tmp_path, capsys):
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video\n")
    missing = tmp_path / "missing.avi"
    code = main(["predict", str(clip["checkpoint"]), str(bad), str(missing), str(clip["video"]), "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == EXIT_PARTIAL
    lines = err.splitlines()
    assert len(lines) == 2 and "Traceback" not in err, err
    assert lines[0].startswith(f"imgclf: {bad}: not a video the decoder can open"), err
    assert lines[1].startswith(f"imgclf: {missing}: not a video the decoder can open"), err
    assert len(out.splitlines()) == 3 and not (tmp_path / "bad.frames.csv").exists()


def test_a_camera_or_stream_that_is_not_there_is_one_line(clip, capsys):
    code = main(["predict", str(clip["checkpoint"]), "9", "rtsp://127.0.0.1:9/none", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == EXIT_PARTIAL and out == ""
    lines = err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("imgclf: 9: not a camera the decoder can open"), err
    assert lines[1].startswith("imgclf: rtsp://127.0.0.1:9/none: not a video the decoder can open"), err


def test_usage_mistakes_are_one_line(clip, capsys, monkeypatch):
    args = ["predict", str(clip["checkpoint"])]
    assert main([*args, str(clip["video"]), "picture.png"]) == 2
    assert "pictures or videos, not both" in capsys.readouterr().err
    assert main([*args, "picture.png", "--fps", "2"]) == 2
    assert "are for videos" in capsys.readouterr().err
    assert main([*args, str(clip["video"]), "0", "--frames-csv", "x.csv"]) == 2
    assert "--frames-csv names one file" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed: `import av` fails
    assert main([*args, str(clip["video"])]) == 2
    assert capsys.readouterr().err.strip().endswith("pip install imgclf[video]")


def test_reject_below_answers_unknown_seconds(clip, tmp_path, capsys):
    """An untrained network (probabilities near a third) under --reject-below 0.9: every second is unknown."""
    torch.manual_seed(0)
    model = TutorialCNN(num_classes=3, in_channels=3, img_size=32)
    untrained = tmp_path / "untrained.pt"
    save_checkpoint(untrained, build_checkpoint(model_name="tutorial_cnn", classes=CLASSES, channels=3, size=32,
                                                mean=[0.5] * 3, std=[0.25] * 3, config=TrainConfig().to_dict(),
                                                state={"state_dict": model.state_dict()}))
    code = main(["predict", str(untrained), str(clip["video"]), "--device", "cpu", "--topk", "1",
                 "--reject-below", "0.9", "--frames-csv", str(tmp_path / "unknown.csv")])
    out, err = capsys.readouterr()
    assert code == EXIT_OK, err
    assert all(line.split("  ")[2].startswith("unknown (best: ") for line in out.splitlines()), out
    assert len(out.splitlines()) == 3
