"""Labelling videos, cameras and streams with a trained model (issue 25): frames are sampled, prepared
exactly as pictures are (`Predictor.prepare`: the checkpoint's resize and centre crop), labelled in batches,
and summed up as one label per second of video (the mean of that second's frame probabilities).

The decoder is PyAV (the `video` extra), imported only when a video is given: torchvision 0.29 no longer
reads videos (its `torchvision.io.read_video` was deprecated in 0.22 and is gone from the open-source
wheels), and TorchCodec needs FFmpeg's libraries installed apart and a build matched to each torch release,
while PyAV's wheels carry their own FFmpeg, for any torch, and open files, URLs, cameras and RTSP alike."""

from __future__ import annotations

import csv
import itertools
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch

from imgclf.errors import UserError, first_line, shown
from imgclf.transforms import BadImage

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".ts",
                    ".mts", ".m2ts", ".3gp", ".ogv", ".m3u8")
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "srt", "udp", "tcp")
INSTALL_HINT = "pip install imgclf[video]"
OPEN_TIMEOUT = 15.0  # seconds a stream or camera may take to open, and to send its next packet


class BadVideo(Exception):
    """A video, stream or camera that cannot be opened or read on; the message says why, in one line."""


@dataclass(frozen=True)
class Sampling:
    """Which decoded frames are labelled: every `every`-th one (1: all), or with `fps`, the first frame of
    each 1/fps-second slot of the video's own clock (so about `fps` a second, whatever its frame rate)."""

    every: int = 1
    fps: float | None = None


@dataclass
class Second:
    """One second of a video: the frames labelled in it, each (frame number from 0, seconds from the first
    frame, probabilities over the classes), and its label(s) from their mean probability, best first."""

    path: str
    second: int
    frames: list[tuple[int, float, torch.Tensor]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    unknown: bool | None = None  # rejecting (--reject-below): whether the mean's top probability is under the cut


def is_video(text: str) -> bool:
    """Whether `imgclf predict` reads input `text` as a video: a file or http(s) URL named like one
    (VIDEO_EXTENSIONS), a stream URL (rtsp://, rtmp://, srt://, udp://, tcp://), a camera by number ("0", when
    no file has that name) or a camera device (/dev/video0)."""
    if text.isdigit() and not Path(text).exists():
        return True
    if text.startswith("/dev/video"):
        return True
    parts = urlsplit(text)
    if parts.scheme in STREAM_SCHEMES:
        return True
    path = parts.path if parts.scheme in ("http", "https") else text
    return path.lower().endswith(VIDEO_EXTENSIONS)


def require_decoder():
    """The PyAV module; UserError (one line: how to install it) when it is not installed."""
    try:
        import av
    except ImportError:
        raise UserError(f"reading videos needs PyAV, which is not installed: {INSTALL_HINT}") from None
    return av


def open_video(text: str):
    """An opened PyAV container for input `text` (see `is_video`); BadVideo when the decoder cannot open it
    or it holds no video stream."""
    av = require_decoder()
    camera = text.isdigit() or text.startswith("/dev/video")
    target, fmt = _camera(text) if camera else (text, None)
    try:
        container = av.open(target, format=fmt, timeout=OPEN_TIMEOUT)
    except (av.error.FFmpegError, OSError, ValueError) as err:
        reason = shown(err.strerror) if isinstance(getattr(err, "strerror", None), str) else first_line(err)
        what = f"a camera the decoder can open ({shown(target)}: {reason})" if camera else \
            f"a video the decoder can open ({reason})"
        raise BadVideo(f"not {what}") from None
    if not container.streams.video:
        container.close()
        raise BadVideo("holds no video stream")
    return container


def _camera(text: str) -> tuple[str, str]:
    """(device, FFmpeg input format) of a camera given by number or device path."""
    if text.startswith("/dev/video"):
        return text, "v4l2"
    if sys.platform.startswith("linux"):
        return f"/dev/video{int(text)}", "v4l2"
    if sys.platform == "darwin":
        return str(int(text)), "avfoundation"
    raise BadVideo("a camera by number is opened on Linux (v4l2) and macOS; elsewhere give a stream URL")


def sampled_frames(container, sampling: Sampling) -> Iterator[tuple[int, float, object]]:
    """(frame number from 0, seconds since the first frame, PIL image) of each frame `sampling` keeps, in
    order; BadVideo when decoding fails part way."""
    import av

    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # FFmpeg's own frame and slice threads
    rate = float(stream.average_rate or stream.guessed_rate or 25)  # only for frames without a time stamp
    start, next_slot, index = None, 0, -1
    try:
        for index, frame in enumerate(container.decode(stream)):
            stamp = float(frame.pts * frame.time_base) if frame.pts is not None and frame.time_base else index / rate
            start = stamp if start is None else start
            seconds = max(0.0, stamp - start)
            if sampling.fps is not None:
                slot = math.floor(seconds * sampling.fps + 1e-6)  # 1e-6: a time stamp a hair under its slot
                if slot < next_slot:
                    continue
                next_slot = slot + 1
            elif index % sampling.every:
                continue
            yield index, seconds, frame.to_image()
    except av.error.FFmpegError as err:
        raise BadVideo(f"decoding stopped after frame {index + 1} ({first_line(err)})") from None


def label_seconds(predictor, text: str, *, sampling: Sampling = Sampling(), topk: int = 3,
                  batch_size: int = 64) -> Iterator[Second]:
    """Each second of video `text` (opened by `open_video`) with its sampled frames labelled by
    `predictor` (a Predictor or an exported model) and its mean label, as soon as that second has ended.
    BadVideo when it cannot be opened or read on (after the seconds it could label)."""
    container = open_video(text)
    try:
        current: Second | None = None
        pictures: list[np.ndarray] = []
        for index, seconds, image in sampled_frames(container, sampling):
            second = int(seconds + 1e-6)  # 1e-6: as in sampled_frames
            if current is not None and second != current.second:
                yield _labelled(predictor, current, pictures, topk, batch_size)
                current, pictures = None, []
            current = current or Second(text, second)
            try:
                pictures.append(predictor.prepare(image))
            except BadImage as err:
                raise BadVideo(f"frame {index} cannot be prepared ({err})") from None
            current.frames.append((index, seconds, None))
        if current is not None:
            yield _labelled(predictor, current, pictures, topk, batch_size)
    finally:
        container.close()


def _labelled(predictor, second: Second, pictures: list[np.ndarray], topk: int, batch_size: int) -> Second:
    """`second` with its frames' probabilities (in batches of `batch_size`) and the labels of their mean."""
    rows = torch.cat([predictor.probabilities(torch.from_numpy(np.stack(pictures[i : i + batch_size])))
                      for i in range(0, len(pictures), batch_size)])
    second.frames = [(index, seconds, row) for (index, seconds, _), row in zip(second.frames, rows, strict=True)]
    answer = predictor._answer(second.path, rows.mean(0), topk)  # noqa: SLF001 - a picture's answer, --reject-below included
    second.labels, second.probs, second.unknown = answer.labels, answer.probs, answer.unknown
    return second


def frames_csv_path(text: str, requested: str | None) -> Path | None:
    """Where the per-frame CSV of video `text` goes: `requested` (--frames-csv), else beside a video file
    as NAME.frames.csv; None for a stream or camera without --frames-csv."""
    if requested:
        return Path(requested).expanduser()
    if is_video(text) and Path(text).expanduser().is_file():
        path = Path(text).expanduser()
        return path.with_name(f"{path.stem}.frames.csv")
    return None


def csv_header(classes: list[str]) -> list[str]:
    """The per-frame CSV's columns: time_s, frame, label, score, then one probability column per class."""
    return ["time_s", "frame", "label", "score", *map(shown, classes)]


def csv_rows(second: Second, predictor) -> list[list]:
    """`second`'s frames as rows of the per-frame CSV (`csv_header`): the frame's own label (several, joined
    by ";", for a multi-label model; none under every threshold) and the best one's probability."""
    rows = []
    for index, seconds, probs in second.frames:
        labels = predictor.task.decode(probs, 1)
        rows.append([f"{seconds:.3f}", index, ";".join(shown(predictor.classes[j]) for j, _ in labels),
                     f"{labels[0][1]:.6f}" if labels else "", *(f"{p:.6f}" for p in probs.tolist())])
    return rows


def print_videos(predictor, paths: list[str], *, sampling: Sampling = Sampling(), topk: int = 3,
                 batch_size: int = 64, frames_csv: str | None = None, style: str = "text", out=None,
                 err=None) -> bool:
    """`imgclf predict` on videos: each second of each of `paths` (see `is_video`) as soon as it is labelled,
    on `out` (default stdout) as "text" (path, m:ss, labels with their mean probability, how many frames),
    "json" (one object a line) or "csv" (path,second,rank,label,probability); each labelled frame into its
    CSV (`frames_csv_path`, columns `csv_header`). A video that cannot be opened or read on is one line on
    `err` (default stderr), and the others go on. True when any failed."""
    out, err = out or sys.stdout, err or sys.stderr
    if frames_csv and len(paths) > 1:
        raise UserError("--frames-csv names one file: give one video, or leave it out (NAME.frames.csv beside each)")
    writer = csv.writer(out) if style == "csv" else None
    if writer:
        writer.writerow(["path", "second", "rank", "label", "probability"])
    failed = False
    for text in paths:
        try:
            _print_video(predictor, text, sampling, topk, batch_size, frames_csv_path(text, frames_csv), style, out)
        except BadVideo as problem:
            print(f"imgclf: {shown(text)}: {problem}", file=err)
            failed = True
    return failed


def _print_video(predictor, text, sampling, topk, batch_size, csv_path, style, out) -> None:
    seconds = label_seconds(predictor, text, sampling=sampling, topk=topk, batch_size=batch_size)
    first = next(seconds, None)  # opened and read before the CSV is created: a bad video leaves no file
    if first is None:
        raise BadVideo("no frame could be decoded")
    if csv_path is not None and csv_path.exists() and Path(text).exists() and csv_path.samefile(text):
        raise BadVideo("--frames-csv names the video itself")
    try:
        table = open(csv_path, "w", newline="", encoding="utf-8") if csv_path is not None else None  # noqa: SIM115
    except OSError as problem:
        raise BadVideo(f"cannot write {shown(csv_path)} ({first_line(problem)}); name another with --frames-csv FILE") from None
    try:
        rows = csv.writer(table) if table else None
        if rows:
            rows.writerow(csv_header(predictor.classes))
        for second in itertools.chain([first], seconds):
            if rows:
                rows.writerows(csv_rows(second, predictor))
                table.flush()  # a camera is stopped by Ctrl-C: what was labelled is on disk
            _print_second(second, style, out)
    finally:
        if table:
            table.close()


def _print_second(second: Second, style: str, out) -> None:
    pairs = list(zip(second.labels, second.probs, strict=True))
    if style == "json":
        unknown = {} if second.unknown is None else {"unknown": second.unknown}
        print(json.dumps({"path": second.path, "second": second.second, "frames": len(second.frames),
                          "top": [{"label": lab, "probability": round(p, 6)} for lab, p in pairs], **unknown}),
              file=out)
    elif style == "csv":
        unknown = [[shown(second.path), second.second, 0, "unknown", f"{pairs[0][1]:.6f}"]] if second.unknown else []
        csv.writer(out).writerows([*unknown, *([shown(second.path), second.second, rank, shown(lab), f"{p:.6f}"]
                                               for rank, (lab, p) in enumerate(pairs, start=1))])
    else:
        minutes, secs = divmod(second.second, 60)
        tops = "  ".join(f"{shown(lab)} {p:.1%}" for lab, p in pairs) or "(no label over its threshold)"
        tops = f"unknown (best: {tops})" if second.unknown else tops
        count = len(second.frames)
        print(f"{shown(second.path)}  {minutes}:{secs:02d}  {tops}  ({count} frame{'s' * (count != 1)})", file=out)
    out.flush()  # each second as soon as it is known, also into a pipe
