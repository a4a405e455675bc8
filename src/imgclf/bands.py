"""Pictures beyond 8-bit grey and RGB (issue 23): multi-band TIFFs (tifffile) and 16-bit PNGs and TIFFs, read at
full depth.

A run's pictures have `channels` channels and a `depth` of 8 or 16 bits (`PictureKind`). Ordinary runs (1 or 3
channels, 8 bits) never come here: `transforms.load_image` decodes them as always. The others are decoded by
`load_bands` into uint8 (8 bits) or uint16 (16 bits) arrays, resized in float on the array (antialiased
bilinear, as `transforms.resize_batch`), never through a Pillow mode that cannot hold them. Pixels reach the
network as v / 255 or v / 65535 (`full_scale`), then per-channel mean and std.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from imgclf.errors import UserError, shown
from imgclf.files import not_regular
from imgclf.transforms import MAX_PIXELS, PLAIN, BadImage, Decoding, load_image, quiet_libtiff

DEPTHS = (8, 16)
TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ChannelMismatch(BadImage):
    """A readable picture whose channels do not fit the run's (a 5-band TIFF in a 3-channel run): a mistake in
    the data, refused in one line rather than skipped (`imgclf.cache`), one prediction's error in predict."""


@dataclass(frozen=True)
class Probe:
    """What a picture's header says: its channels as stored (`raw`, alpha included), whether the last is
    alpha, and its depth (8 or 16 bits a sample)."""

    raw: int
    alpha: bool
    depth: int
    width: int = 0
    height: int = 0

    @property
    def natural(self) -> int:
        """The channels a run takes from it by default: transparency composited away, grey+alpha as RGB
        (imgclf's rule for 8-bit pictures, kept)."""
        colour = self.raw - self.alpha
        return 3 if self.alpha and colour == 1 else colour

    def fits(self, channels: int) -> bool:
        """Whether `load_bands` makes `channels` channels of it: as stored, without alpha, grey <-> RGB."""
        colour = self.raw - self.alpha
        return channels in (self.raw, colour) or {channels, colour} == {1, 3}


def full_scale(depth: int) -> float:
    """The value of a full-intensity sample: 255 for 8-bit pictures, 65535 for 16-bit ones."""
    return 65535.0 if depth == 16 else 255.0


def storage_dtype(depth: int) -> np.dtype:
    return np.dtype(np.uint16 if depth == 16 else np.uint8)


def depth_of(images) -> int:
    """16 for uint16 pictures (numpy or torch), else 8."""
    return 16 if str(images.dtype).endswith("uint16") else 8


def is_plain(channels: int, depth: int) -> bool:
    """Whether `transforms.load_image` decodes pictures of this kind (8-bit grey or RGB), else `load_bands`."""
    return depth == 8 and channels in (1, 3)


# ---------------------------------------------------------------- what a folder holds


def probe(path) -> Probe | None:
    """The header of one picture (`Probe`), None when it cannot be read (reported when decoded) or is no
    regular file (a FIFO would block the open for ever)."""
    if not_regular(path) is not None:
        return None
    quiet_libtiff()
    try:
        with open(path, "rb") as f:
            head = f.read(32)
            f.seek(0)
            if head[:4] in TIFF_MAGIC:
                return _tiff_probe(f)
        if head.startswith(PNG_MAGIC) and head[12:16] == b"IHDR":
            bits, colour = head[24], head[25]
            raw = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(colour, 3)
            return Probe(raw, colour in (4, 6), 16 if bits == 16 else 8, *struct.unpack(">II", head[16:24]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                p = _mode_probe(img.mode)
                return Probe(p.raw, p.alpha, p.depth, *img.size)
    except Exception:  # noqa: BLE001 - any reader's error means "unreadable", told when decoded
        return None


def _mode_probe(mode: str) -> Probe:
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Probe(1, False, 16)
    return {"L": Probe(1, False, 8), "1": Probe(1, False, 8), "LA": Probe(2, True, 8), "La": Probe(2, True, 8),
            "RGBA": Probe(4, True, 8), "RGBa": Probe(4, True, 8), "PA": Probe(4, True, 8)}.get(mode, Probe(3, False, 8))


def _tiff_probe(f) -> Probe:
    import tifffile

    with tifffile.TiffFile(f) as tif:
        series = tif.series[0]
        shape, axes = _band_shape(series.shape, series.axes)
        extra = tuple(getattr(tif.pages[0], "extrasamples", ()) or ())
        return Probe(shape[2], bool(extra) and extra[-1] in (1, 2), _tiff_depth(series.dtype), shape[1], shape[0])


def detect(files: list[Path], channels: int | None, plain_channels: int) -> tuple[int, int]:
    """(channels, depth) of a run on `files` (the first 16 are looked at): `channels` (--channels) when given,
    checked against them; else their channel count (`plain_channels`, imgclf's rule for grey and colour
    pictures, unless they hold other counts); 16 bits when one of them has 16. One UserError line for pictures
    that do not fit --channels or that mix band counts."""
    probes = [(f, p) for f in files[:16] if (p := probe(f)) is not None]
    depth = 16 if any(p.depth == 16 for _, p in probes) else 8
    if channels is not None:
        for f, p in probes:
            if not p.fits(channels):
                raise UserError(f"--channels {channels}: {shown(f)} has {describe(p)}; give --channels "
                                f"{p.natural}, or pictures of {channels} channels")
        return channels, depth
    counts = {p.natural for _, p in probes}
    if counts <= {1, 3}:
        return plain_channels, depth
    if len(counts) > 1:
        (f1, p1), (f2, p2) = next((a, b) for a in probes for b in probes if a[1].natural != b[1].natural)
        raise UserError(f"the pictures mix channel counts: {shown(f1)} has {describe(p1)}, {shown(f2)} "
                        f"{describe(p2)}; keep one kind in a data set, or give --channels N")
    return counts.pop(), depth


def header_size(data: bytes) -> tuple[int, int]:
    """(width, height) of the picture in `data`, from its header alone; BadImage when it has none known."""
    try:
        if data[:4] in TIFF_MAGIC:
            import tifffile

            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                height, width, _ = _band_shape(tif.series[0].shape, tif.series[0].axes)[0]
                return width, height
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                return img.size
    except BadImage:
        raise
    except Exception as err:  # noqa: BLE001 - any reader's error: not a picture it knows
        raise BadImage(str(err).splitlines()[0] if str(err) else type(err).__name__) from None


def describe(p: Probe) -> str:
    """'3 channels', '4 channels (the last alpha)', for messages."""
    return f"{p.raw} channel{'s' if p.raw > 1 else ''}{' (the last alpha)' if p.alpha else ''}"


# ---------------------------------------------------------------- decoding


def load_bands(source, *, size: int, channels: int, depth: int, decoding: Decoding = PLAIN) -> np.ndarray:
    """Decode one picture into an array (size, size, channels) of uint8 (depth 8) or uint16 (depth 16).

    TIFFs are read by tifffile (any band count, 8 or 16 bits); 16-bit colour PNGs by `_png16` (Pillow would
    keep their high bytes only); the rest by Pillow, EXIF orientation applied. A sample of the other depth is
    rescaled (8 -> 16: v * 257, exact; 16 -> 8: round(v / 257)). Channels: as stored, else alpha composited on
    white, grey repeated to RGB, or RGB to grey (L = R 299/1000 + G 587/1000 + B 114/1000, Pillow's weights);
    anything else is a ChannelMismatch. The short side is resized to `decoding.resize_for(size)` (antialiased,
    in float: bicubic for a bicubic `decoding`, else bilinear) and the centre `size` cropped. Raises BadImage for anything unreadable, never anything else."""
    quiet_libtiff()
    try:
        arr, alpha = _read(source)
        arr = _fit_channels(arr, alpha, channels)
        return _resize_crop(arr, size, depth, decoding)
    except BadImage:
        raise
    except Exception as err:  # noqa: BLE001 - tifffile, zlib and Pillow raise many types for bad bytes
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BadImage(reason) from None


def _read(source) -> tuple[np.ndarray, bool]:
    """(H, W, C) samples as stored (uint8 or uint16) and whether the last channel is alpha."""
    data = source.read() if hasattr(source, "read") else Path(source).read_bytes()
    if data[:4] in TIFF_MAGIC:
        return _tiff(data)
    if data.startswith(PNG_MAGIC) and len(data) > 26 and data[24] == 16 and data[25] in (2, 4, 6):
        return _png16(data)
    return _pillow(data)


def _tiff(data: bytes) -> tuple[np.ndarray, bool]:
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        series = tif.series[0]
        shape, axes = _band_shape(series.shape, series.axes)
        _check_pixels(shape[0], shape[1])
        _tiff_depth(series.dtype)
        arr = series.asarray()
        extra = tuple(getattr(tif.pages[0], "extrasamples", ()) or ())
    arr = arr.reshape(arr.shape[-2:] + (1,)) if arr.ndim == 2 else arr
    if axes[-1] != "S" and arr.ndim == 3:  # bands as pages or planes: (C, H, W)
        arr = np.moveaxis(arr, 0, -1)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    return np.ascontiguousarray(arr), bool(extra) and extra[-1] in (1, 2)


def _band_shape(shape: tuple[int, ...], axes: str) -> tuple[tuple[int, int, int], str]:
    """(H, W, C) of a TIFF series of shape `shape` and tifffile axes `axes` (YX, YXS, CYX, SYX, QYX...)."""
    if len(shape) == 2:
        return (shape[0], shape[1], 1), axes
    if len(shape) == 3 and axes.endswith("S"):
        return (shape[0], shape[1], shape[2]), axes
    if len(shape) == 3:
        return (shape[1], shape[2], shape[0]), axes
    raise BadImage(f"a TIFF of shape {shape} ({axes}); imgclf reads one picture of bands a file")


def _tiff_depth(dtype) -> int:
    dtype = np.dtype(dtype)
    if dtype in (np.uint8, np.bool_):
        return 8
    if dtype == np.uint16:
        return 16
    raise BadImage(f"samples of type {dtype}; imgclf reads 8- and 16-bit unsigned pictures")


def _png16(data: bytes) -> tuple[np.ndarray, bool]:
    """A 16-bit colour (or grey+alpha) PNG, unfiltered here: Pillow keeps only the high byte of its samples."""
    width, height, _, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    if interlace:
        raise BadImage("an interlaced 16-bit PNG; save it without interlacing")
    _check_pixels(width, height)
    chunks, pos = [], 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"IDAT":
            chunks.append(data[pos + 8 : pos + 8 + length])
        elif kind == b"IEND":
            break
        pos += 12 + length
    channels = {2: 3, 4: 2, 6: 4}[colour]
    raw = zlib.decompress(b"".join(chunks))
    rows = _unfilter(raw, height, width * channels * 2, bpp=channels * 2)
    arr = rows.view(">u2").astype(np.uint16).reshape(height, width, channels)
    return arr, colour in (4, 6)


def _unfilter(raw: bytes, height: int, stride: int, *, bpp: int) -> np.ndarray:
    """PNG's per-row filters undone (ISO 15948, section 9): (height, stride) bytes."""
    if len(raw) < height * (stride + 1):
        raise BadImage("a truncated PNG")
    out = np.zeros((height + 1, stride), dtype=np.uint8)  # row 0: the zero row above the first
    for y in range(height):
        kind, line = raw[y * (stride + 1)], np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1)
        up = out[y]
        if kind in (0, 2):
            out[y + 1] = line + up if kind == 2 else line
        elif kind == 1:  # each lane adds the one bpp to its left: a running sum, modulo 256
            out[y + 1] = np.cumsum(line.reshape(-1, bpp), axis=0, dtype=np.uint64).astype(np.uint8).ravel()
        elif kind in (3, 4):
            out[y + 1] = _unfilter_row(line, up, bpp, paeth=kind == 4)
        else:
            raise BadImage(f"a PNG row with filter type {kind}")
    return out[1:]


def _unfilter_row(line: np.ndarray, up: np.ndarray, bpp: int, *, paeth: bool) -> np.ndarray:
    """Average or Paeth, which depend on the reconstructed left neighbour: pixel by pixel."""
    cur, prev = line.astype(np.int32), up.astype(np.int32)
    out = np.zeros_like(cur)
    for x in range(0, len(cur), bpp):
        b = prev[x : x + bpp]
        a = out[x - bpp : x] if x else np.zeros(bpp, np.int32)
        if paeth:
            c = prev[x - bpp : x] if x else np.zeros(bpp, np.int32)
            p = a + b - c
            pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
            pred = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        else:
            pred = (a + b) // 2
        out[x : x + bpp] = (cur[x : x + bpp] + pred) & 0xFF
    return out.astype(np.uint8)


def _pillow(data: bytes) -> tuple[np.ndarray, bool]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        warnings.simplefilter("ignore", UserWarning)
        with Image.open(io.BytesIO(data)) as img:
            _check_pixels(img.width, img.height)
            img = ImageOps.exif_transpose(img)
            if img.mode.startswith("I;16") or img.mode == "I":
                return np.clip(np.asarray(img, dtype=np.int64), 0, 65535).astype(np.uint16)[..., None], False
            if img.mode in ("P", "PA") or "transparency" in img.info:
                img = img.convert("RGBA")
            elif img.mode not in ("L", "LA", "RGB", "RGBA"):
                img = img.convert("RGB")
            arr = np.array(img, dtype=np.uint8)
    return arr.reshape(arr.shape[0], arr.shape[1], -1), img.mode in ("LA", "RGBA")


def _check_pixels(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise BadImage(f"{width}x{height} pixels is over the {MAX_PIXELS:,}-pixel limit")


def _fit_channels(arr: np.ndarray, alpha: bool, channels: int) -> np.ndarray:
    """`arr` (H, W, C) made `channels` channels deep, as `load_bands` says; ChannelMismatch otherwise."""
    have = arr.shape[2]
    if have == channels:
        return arr
    if alpha and have - 1 in (channels, 1) and channels in (1, 3):
        top = float(np.iinfo(arr.dtype).max)
        a = arr[..., -1:].astype(np.float64) / top
        arr = np.round(arr[..., :-1] * a + top * (1 - a)).astype(arr.dtype)  # on white, as load_image
        have -= 1
    if have == channels:
        return arr
    if have == 1 and channels == 3:
        return np.repeat(arr, 3, axis=2)
    if have == 3 and channels == 1:
        grey = arr.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return np.round(grey).astype(arr.dtype)[..., None]
    raise ChannelMismatch(f"{have} channel{'s' if have > 1 else ''}{' (the last alpha)' if alpha else ''}, "
                          f"not {channels}")


def _resize_crop(arr: np.ndarray, size: int, depth: int, decoding: Decoding = PLAIN) -> np.ndarray:
    """(H, W, C) -> (size, size, C) at `depth`: short side to `decoding.resize_for(size)` (antialiased
    bilinear in float32, as `transforms.resize_batch`; bicubic for a bicubic contract: torch has no other of
    Pillow's filters), centre crop, rounded back to integers."""
    side = decoding.resize_for(size)
    mode = "bicubic" if decoding.interpolation == "bicubic" else "bilinear"
    h, w, _ = arr.shape
    x = torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1)[None]
    here = 16 if arr.dtype == np.uint16 else 8
    if here != depth:
        x = x * 257.0 if depth == 16 else x / 257.0
    if (h, w) != (size, size) or side != size:
        scale = side / min(h, w)
        nh, nw = max(side, round(h * scale)), max(side, round(w * scale))
        x = torch.nn.functional.interpolate(x, size=(nh, nw), mode=mode, antialias=True, align_corners=False)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[:, :, top : top + size, left : left + size]
    out = x[0].permute(1, 2, 0).round().clamp(0, full_scale(depth)).numpy()
    return out.astype(storage_dtype(depth))


def decode(source, *, size: int, channels: int, depth: int, decoding: Decoding = PLAIN) -> np.ndarray:
    """One picture as the run stores it, (size, size, channels), resized and cropped as `decoding` says (a
    pretrained network's input contract; PLAIN: imgclf's own): `transforms.load_image` for plain runs
    (`is_plain`, the uint8 fast path), else `load_bands`."""
    if is_plain(channels, depth):
        return load_image(source, size=size, channels=channels, decoding=decoding)
    return load_bands(source, size=size, channels=channels, depth=depth, decoding=decoding)


RESIZE_RULE = ("multi-band or 16-bit pictures: every band read at its depth (TIFF by tifffile); shorter side resized "
               "to size by antialiased bilinear interpolation in float32, centre size x size crop, rounded "
               "(the steps exactly: `preprocessing`)")
# What `load_bands` does, in words exact enough to redo it elsewhere (the export metadata carries them).
PREPROCESSING = [
    "TIFF: tifffile's first series, bands last (H, W, C); a series stored as (C, H, W) is moved to (H, W, C); "
    "16-bit colour PNG: every sample at 16 bits; anything else: Pillow, EXIF orientation applied",
    "samples of the other depth rescaled: 8 -> 16 bits v * 257, 16 -> 8 bits round(v / 257)",
    "channels: as stored; else the alpha channel composited on white (v * a + max * (1 - a)), grey repeated to "
    "3 channels, or RGB to grey (R * 0.299 + G * 0.587 + B * 0.114, rounded); another count is refused",
    "shorter side resized to size (to resize_side when the input record states one): new sides "
    "max(size, round(side * size / shorter)), torch.nn.functional.interpolate(mode='bilinear' (or 'bicubic' "
    "when the record's interpolation is bicubic), antialias=True, align_corners=False) in float32, "
    "skipped when the picture is already size x size and no resize_side is stated",
    "crop the centre size x size, from ((w - size) // 2, (h - size) // 2); round, clamp to 0..max",
    "array (size, size, C) of uint8 (depth 8) or uint16 (depth 16), transposed to (C, size, size); "
    "the graph divides by 255 or 65535",
]
