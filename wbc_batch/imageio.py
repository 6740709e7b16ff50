"""Reading images into uint8 RGB arrays, with a clear reason whenever that is not possible.

`read_image(path)` reads the file's bytes (so names with any characters work on every platform),
checks what they are, and decodes them with OpenCV (`IMREAD_UNCHANGED`, so the bit depth and the
alpha channel are seen rather than silently converted):

- 16-bit (and float) images are scaled to 8 bits by the image's own maximum, so 12-bit camera
  data stored in 16-bit files is not nearly black; a maximum more than twice the level under
  which all but a hundredth of a percent of the values lie is a few hot pixels, and that level
  is used instead (`_without_hot_pixels`: in a bright-field smear nothing is brighter than the
  glass, so what lies above it is clipped); NaN and infinite values of a float image count
  as 0;
- a JPEG is turned as its EXIF orientation tag says (as image viewers show it, and as the
  trainers read their images), so boxes and overlays match what the user sees;
- a TIFF is turned as its Orientation tag says too (a tiled one by this module: OpenCV shuffles
  the tiles of one it turns), and a fourth sample its ExtraSamples tag calls unspecified (an RGBX
  camera) is data, not transparency; where it is alpha, the colours OpenCV gives may already be
  multiplied by it (associated alpha is stored so, and libtiff multiplies 8-bit unassociated
  alpha): those are not multiplied again (`_premultiplied`), and a TIFF transparent everywhere
  whose colours are lost with it is refused;
- grayscale becomes RGB; an alpha channel that is 0 everywhere (a 32-bit BMP's unused byte) is
  taken as absent, and any other is composited on white (the colour of an empty slide),
  except where its fully transparent pixels, composited on black, all belong to an unlit frame
  (`frame.unlit_frame`: transparent margins or corners around the field): they show nothing of
  the slide, so they are composited on black and the analysis leaves them out as it does a
  field stop's corners or padding bars, rather than taking a white margin for glass or a cell;
- a JPEG without its end-of-image marker or a PNG without its IEND chunk is reported as truncated
  (OpenCV would otherwise decode the part it has and grey the rest, which a half-written file
  from a scanner would look like), and so is a BMP shorter than its header says, and a TIFF that
  does not decode and whose directories or pixels reach past its end (`tiff_cut_off`);
- a TIFF holding several full-size pages (a focus stack, or several fields in one file) is refused
  rather than silently analysed from its first page only; its field is its largest page not
  marked reduced-resolution, and smaller pages (thumbnails, pyramid levels), first or not, are
  ignored;
- files in a format that is not read (WebP, GIF, JPEG 2000, HEIC, PDF, DICOM) are named as such,
  and so is a TIFF in a compression OpenCV's reader lacks (ZSTD, LZMA, JPEG 2000...);
- images of more than `MAX_PIXELS` pixels are refused before decoding, with the size in the
  message, rather than exhausting memory. 200 megapixels is well above whole-field microscope
  images (a 12000 x 9000 field is 108 megapixels and is processed in tiles by the analysis).
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import struct
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from .errors import WbcBatchError
from .results import one_line

#: images with more pixels than this are refused (see the module docstring)
MAX_PIXELS = 200_000_000

#: format name by file signature
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
)


_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"


class ImageReadError(WbcBatchError, ValueError):
    """An image file, or the bytes given, could not be turned into pixels; the message says why,
    in one line. A ValueError, as every error about a value given (here a path or bytes)."""


class NotASmearError(ImageReadError):
    """The file is a readable image, but not one smear photograph that can be analysed: a label
    mask (a few grey levels), an image too small to hold a WBC, or a multi-page TIFF. Reading it
    again will not help (`watch` does not retry it). A ValueError too: given as an array
    (`Runner.process_array`), it is a value that cannot be analysed, as the README says."""


#: a grey image of 2 to this many distinct values, one of them 0 (the background of every mask
#: layout: 0/128/255, 0/255, 0/1/2), is a label mask, not a photograph. A uniform image is left
#: alone: an empty or blown-out field, which analyses to no cells.
MASK_LEVELS = 4


#: an image whose shorter side is under this many pixels cannot show a WBC that can be classified
#: (the analysis enlarges at most 4x to the segmenter's 112-pixel WBC; 120x120 single-cell crops
#: are the smallest images in the public datasets)
MIN_SIDE = 32


def check_smear(rgb: np.ndarray) -> None:
    """Raise NotASmearError when a decoded uint8 RGB image is a label mask (e.g. the 0/128/255
    masks that sit beside the images in the WBC Image Dataset and in a lab's training folders),
    or is smaller than MIN_SIDE on a side (a thumbnail or an icon)."""
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise NotASmearError(f"too small to hold a WBC ({w}x{h} px; at least {MIN_SIDE}x{MIN_SIDE} "
                             "is needed); not analysed")
    # a colour image is told by a sample first: this check runs twice for each image of a run
    # (decode_smear, then Runner.process_array), and a whole-image compare is the costly part
    for px in (rgb[::16, ::16], rgb):
        if not (np.array_equal(px[..., 0], px[..., 1]) and np.array_equal(px[..., 0], px[..., 2])):
            return
    grey = rgb[:, :, 0]
    levels = np.flatnonzero(np.bincount(grey.ravel(), minlength=256))
    if 2 <= len(levels) <= MASK_LEVELS and levels[0] == 0:
        bilevel = (" or a black-and-white (1-bit) image" if levels.tolist() == [0, 255]
                   else "")
        raise NotASmearError(f"looks like a label mask{bilevel}, not a photograph of a smear (grey "
                             f"with only the values {', '.join(str(v) for v in levels)}); not "
                             "analysed")


def read_smear(path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """`read_image`, then `check_smear`: what `run` and `watch` analyse.

    :raises ImageReadError: as `read_image`; NotASmearError for a label mask.
    """
    return decode_smear(read_bytes(path), max_pixels=max_pixels)


def decode_smear(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """`read_smear` for the bytes of a file already read (`read_bytes`)."""
    rgb = decode_image(data, max_pixels=max_pixels)
    check_smear(rgb)
    return rgb


def read_failure(exc: BaseException) -> str:
    """What images.csv says for an image `read_smear` could not give (`run` and `watch` word it
    alike): the reader's own message, or, for a failure nobody foresaw (a decoder bug, a share
    that dropped out mid-read), the exception's type and first line."""
    if isinstance(exc, ImageReadError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return "out of memory while reading the image"
    return f"cannot read the image: {type(exc).__name__}: {one_line(exc)}"


def read_image(path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read an image file as a uint8 RGB array (H, W, 3).

    :raises ImageReadError: empty, unreadable, not an image, truncated, too large, or undecodable.
    """
    return decode_image(read_bytes(path), max_pixels=max_pixels)


class NotARegularFile(OSError):
    """A pipe, a device or a socket where a file was expected (`read_file`)."""


NOT_REGULAR = "not a regular file (a pipe, a device or a socket)"


def read_file(path) -> bytes:
    """The whole content of the regular file `path`, opened without waiting: a pipe put where an
    image was (after the search that found a file there) raises NotARegularFile at once, where
    reading it would have waited for ever for a writer, and a batch with it.

    :raises OSError: as `open` (IsADirectoryError for a folder), or NotARegularFile."""
    nonblock = getattr(os, "O_NONBLOCK", 0)
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags | nonblock)
    except BlockingIOError:  # a lease on a regular file (Samba, NFS): wait for it, as open does
        if _special(path):
            raise
        fd = os.open(path, flags)
    except OSError as exc:  # a socket cannot be opened at all (ENXIO)
        if exc.errno == errno.ENXIO and _special(path):
            raise NotARegularFile(errno.EINVAL, NOT_REGULAR, str(path)) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
        if not stat.S_ISREG(mode):
            raise NotARegularFile(errno.EINVAL, NOT_REGULAR, str(path))
        if nonblock:  # a regular file: read it as any other (no filesystem may answer EAGAIN)
            os.set_blocking(fd, True)
        fh = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with fh:
        return fh.read()


def _special(path) -> bool:
    """Whether `path` is a pipe, a socket or a device."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def read_bytes(path) -> bytes:
    """The whole content of an image file, for `decode_image` or `decode_smear`.

    :raises ImageReadError: missing (a broken link named as one), a folder, not a regular file
        (`read_file`), or unreadable.
    """
    path = Path(path)
    try:
        return read_file(path)
    except IsADirectoryError:
        raise ImageReadError("is a folder, not a file") from None
    except NotARegularFile:
        raise ImageReadError(NOT_REGULAR) from None
    except OSError as exc:
        why = link_fault(path, exc)
        if why is not None:
            raise ImageReadError(why) from None
        if isinstance(exc, FileNotFoundError):
            raise ImageReadError("file not found") from None
        raise ImageReadError(f"cannot read file: {exc.strerror or exc}") from None


def link_fault(path: Path, exc: OSError):
    """Why the link `path` could not be followed (`exc`, raised reading or stat-ing it): a loop
    (a link that leads back to itself), a missing target, or another fault on the way (a target
    through a file, a folder that cannot be entered); None where `path` is no link and the
    fault is not a loop."""
    if exc.errno == errno.ELOOP:
        return "a link loop: the link leads back to itself, never to a file"
    try:
        if not Path(path).is_symlink():
            return None
        target = os.readlink(path)
    except OSError:
        return None
    if isinstance(exc, FileNotFoundError):
        return f"broken link: its target {target} is missing"
    return f"a link that cannot be followed to its target {target}: {exc.strerror or exc}"


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode the bytes of an image file (see `read_image`): bytes, or any buffer of them (a
    bytearray, a memoryview, a uint8 NumPy array, as a web service receives an upload)."""
    import cv2

    if not isinstance(data, bytes):
        try:
            data = memoryview(data).tobytes()
        except TypeError:
            hint = ("; read_image(path) or read_smear(path) reads a file"
                    if isinstance(data, (str, os.PathLike)) else "")
            raise ImageReadError(f"needs the bytes of an image file (or a buffer of them), not a "
                                 f"{type(data).__name__}{hint}") from None
    if len(data) == 0:
        raise ImageReadError("empty file (0 bytes)")
    fmt = sniff_format(data)
    if fmt is None:
        other = sniff_unsupported(data)
        if other is not None:
            raise ImageReadError(f"the content is {other}, which is not read (JPEG, PNG, BMP and "
                                 "TIFF are); save the image as PNG or TIFF")
        raise ImageReadError("not an image file (content is not JPEG, PNG, BMP or TIFF)")
    if fmt == "JPEG" and not jpeg_is_complete(data):
        raise ImageReadError("truncated JPEG (no end-of-image marker)")
    if fmt == "PNG" and not png_is_complete(data):
        raise ImageReadError("truncated PNG (no IEND chunk)")
    if fmt == "BMP":
        _check_bmp_complete(data)
    size = header_size(data)
    if size is not None:
        w, h = size
        if w <= 0 or h <= 0:
            raise ImageReadError(f"{fmt} header gives an invalid size {w}x{h}")
        if w * h > max_pixels:
            raise ImageReadError(
                f"image too large: {w}x{h} = {w * h / 1e6:.1f} megapixels "
                f"(the limit is {max_pixels / 1e6:g}); split it or downscale it first")
    orientation, extra, variant = 1, None, None
    if fmt == "TIFF":
        data, orientation, extra, variant = _tiff_field(data)
    _quiet_opencv()
    buf = np.frombuffer(data, dtype=np.uint8)
    # a JPEG is 8-bit without alpha, so IMREAD_COLOR loses nothing and applies EXIF orientation
    flags = cv2.IMREAD_COLOR if fmt == "JPEG" or (fmt == "BMP" and _os2_bmp(data)) \
        else cv2.IMREAD_UNCHANGED
    try:
        arr = cv2.imdecode(buf, flags)
    except cv2.error as exc:
        arr, error = None, _first_line(str(exc))
    else:
        error = "corrupt or unsupported variant"
    if arr is None or arr.size == 0:
        cut = tiff_cut_off(data) if fmt == "TIFF" else None
        if cut:  # a copy cut short, not a scanner setting to change
            raise ImageReadError(f"truncated TIFF ({cut})")
        raise ImageReadError(f"cannot decode {fmt} ({variant or error})")
    with_alpha = arr.ndim == 3 and arr.shape[2] in (2, 4)
    if extra == 0 and with_alpha:
        arr = arr[:, :, :-1]
    premultiplied = extra in (1, 2) and with_alpha and _premultiplied(arr, extra)
    return to_rgb8(np.ascontiguousarray(ORIENTATIONS[orientation](arr)), premultiplied)


def _premultiplied(arr: np.ndarray, extra: int) -> bool:
    """Whether a TIFF's decoded colours are already multiplied by its alpha (the last channel),
    by its ExtraSamples `extra` and depth: associated alpha (1) is stored so, and libtiff
    multiplies 8-bit unassociated alpha (2) as it decodes, not 16-bit or float; and, as a guard
    against a mislabelled file, no colour above its pixel's alpha (one step of rounding allowed).
    An alpha of 0 everywhere is taken as absent (`to_rgb8`) where the colours are still there.

    :raises ImageReadError: transparent everywhere, its colours lost with it."""
    colours, alpha = arr[:, :, :-1], arr[:, :, -1:]
    if not alpha.any():
        if not colours.any():
            raise ImageReadError("the TIFF is transparent everywhere (its alpha is 0), so nothing "
                                 "of the field shows; save it without transparency")
        return False
    if extra == 2 and arr.dtype != np.uint8:
        return False
    step = 1 if np.issubdtype(arr.dtype, np.integer) else 1e-6
    # float32 holds every 16-bit value exactly, at half float64's memory on a large field
    return bool((colours <= alpha.astype(np.float32) + step).all())


@functools.lru_cache(maxsize=None)  # once per process: it is called for every image decoded
def _quiet_opencv() -> None:
    """Keep OpenCV's own log off the terminal: a truncated TIFF or BMP made it print blocks such
    as `[ERROR:2@0.1] global grfmt_tiff.cpp:117 TIFF_Error TIFFFillStrip: Read error...` beside
    the progress bar, where the failed image's row already says why in one line. Process-wide
    (OpenCV has one log level); fatal errors are still printed."""
    import cv2

    logging_ = getattr(getattr(cv2, "utils", None), "logging", None)
    if logging_ is not None:
        logging_.setLogLevel(logging_.LOG_LEVEL_FATAL)


def to_rgb8(arr: np.ndarray, premultiplied: bool = False) -> np.ndarray:
    """An array as OpenCV decodes it (BGR/BGRA/gray, any depth) -> uint8 RGB (H, W, 3).
    `premultiplied`: its colours are already multiplied by its alpha (`_premultiplied`)."""
    import cv2

    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (2, 3, 4)):
        raise ImageReadError(f"unsupported pixel layout {arr.shape}")
    alpha = None
    if arr.ndim == 3 and arr.shape[2] in (2, 4):
        alpha = arr[:, :, -1]
        arr = arr[:, :, :-1] if arr.shape[2] == 4 else arr[:, :, 0]
        if not alpha.any():  # transparent everywhere shows nothing: a 32-bit BMP's unused byte
            alpha = None
    scale = _depth_scale(arr)
    img = _to_uint8(arr, scale)
    if alpha is not None:
        a = alpha.astype(np.float32) / _alpha_max(alpha)
        if img.ndim == 3:
            a = a[:, :, None]
        img = img.astype(np.float32) * (1.0 if premultiplied else a)
        img = img + _underneath(img, alpha == 0) * (1.0 - a)
    if img.dtype != np.uint8:
        img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _underneath(on_black: np.ndarray, clear: np.ndarray) -> float:
    """What an image's transparency is composited on (module docstring): 0 (black) when its
    fully transparent pixels (`clear`) all belong to the unlit frame of the image composited on
    black (`on_black`, float, gray or 3 channels), else 255 (white)."""
    if not clear.any():
        return 255.0
    from .frame import unlit_frame

    px = np.clip(np.rint(on_black), 0, 255).astype(np.uint8)
    frame = unlit_frame(px if px.ndim == 3 else np.dstack([px] * 3))
    return 0.0 if frame is not None and frame[clear].all() else 255.0


def _depth_scale(arr: np.ndarray):
    """Factor taking `arr`'s values to 0..255, or None when it is already uint8."""
    if arr.dtype == np.uint8:
        return None
    if arr.dtype == np.int8:
        return 255.0 / 127.0
    finite = arr[np.isfinite(arr)] if np.issubdtype(arr.dtype, np.floating) else arr
    top = float(np.max(finite)) if finite.size else 0.0
    if np.issubdtype(arr.dtype, np.floating) and top <= 1.0:
        return 255.0
    top = min(top, _without_hot_pixels(arr, top))
    return 255.0 / top if top > 0 else 1.0


#: the share of an image's values above which a maximum counts as a few hot pixels
HOT_SHARE = 1e-4


def _without_hot_pixels(arr: np.ndarray, top: float) -> float:
    """`top`, or the level under which all but `HOT_SHARE` of the values of `arr` (finite ones)
    lie when `top` is more than twice that: one hot pixel at 65535 in 12-bit data made the whole
    image nearly black (and its overlay with it). Those few pixels are clipped to white instead.
    Whole pixels are sampled, every channel of each: a step over the values themselves could
    read one channel only."""
    pixels = arr.reshape(-1, arr.shape[-1] if arr.ndim == 3 else 1)
    flat = pixels[:: max(1, pixels.size // 1_000_000)].reshape(-1)  # ~ a million values
    if np.issubdtype(flat.dtype, np.floating):
        flat = flat[np.isfinite(flat)]
    k = int(flat.size * (1 - HOT_SHARE))
    if flat.size == 0 or k >= flat.size:
        return top
    level = float(np.partition(flat, k)[k])
    return level if 0 < level and top > 2 * level else top


def _alpha_max(alpha: np.ndarray) -> float:
    if np.issubdtype(alpha.dtype, np.integer):
        return float(np.iinfo(alpha.dtype).max)
    return 1.0


def _to_uint8(arr: np.ndarray, scale) -> np.ndarray:
    if scale is None:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    out = arr.astype(np.float32) * np.float32(scale)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "unknown error"


# --- looking at the bytes -----------------------------------------------------------------------

def sniff_format(data: bytes):
    """"JPEG", "PNG", "BMP" or "TIFF" from the file signature, or None."""
    for sig, name in _SIGNATURES:
        if data.startswith(sig):
            return name
    return None


#: formats that are recognised only to name them in the error, by signature at an offset
_UNSUPPORTED = (
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (0, b"\xffO\xffQ", "JPEG 2000"),
    (0, b"%PDF", "PDF"),
    (128, b"DICM", "DICOM"),
)


def sniff_unsupported(data: bytes):
    """The name of a known image format that is not read (e.g. "WebP"), or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"avif"):
        return "AVIF" if data[8:12] == b"avif" else "HEIC/HEIF"
    for offset, sig, name in _UNSUPPORTED:
        if data[offset:offset + len(sig)] == sig:
            return name
    return None


def _check_bmp_complete(data: bytes) -> None:
    """Refuse a BMP shorter than its pixels need (a cut copy). Only the uncompressed layouts,
    whose size follows from the header, are checked."""
    layout = _bmp_layout(data)
    if layout is not None and len(data) < layout[0] + layout[1]:
        raise ImageReadError(f"truncated BMP ({len(data):,} of {layout[0] + layout[1]:,} bytes)")


def _os2_bmp(data: bytes) -> bool:
    """A BMP with the 12-byte OS/2 header, which OpenCV's IMREAD_UNCHANGED reads as one garbled
    channel at 24 bits (IMREAD_COLOR reads it right)."""
    header = _bmp_header(data)
    return header is not None and header.os2


class BmpHeader(NamedTuple):
    """What wbc-batch reads of a BMP's headers. `width` and `height` keep their sign (a negative
    height is a top-down BMP); `bits` and `compression` are None in a Windows BMP cut short
    before them."""

    offset: int  # of the pixel data
    os2: bool  # the 12-byte OS/2 core header (16-bit sizes, never compressed)
    width: int
    height: int
    bits: Optional[int]
    compression: Optional[int]


def _bmp_header(data: bytes) -> Optional[BmpHeader]:
    """The BMP's headers (`BmpHeader`), or None where the file is too short to give its size."""
    try:
        offset, length = struct.unpack_from("<II", data, 10)
        if length == 12:
            w, h, _, bits = struct.unpack_from("<HHHH", data, 18)
            return BmpHeader(offset, True, w, h, bits, 0)
        w, h = struct.unpack_from("<ii", data, 18)
    except struct.error:
        return None
    try:
        bits, compression = struct.unpack_from("<HI", data, 28)
    except struct.error:
        bits = compression = None
    return BmpHeader(offset, False, w, h, bits, compression)


def _bmp_layout(data: bytes):
    """(pixel data offset, pixel data size) of an uncompressed BMP, or None."""
    header = _bmp_header(data)
    if header is None:
        return None
    offset, _, w, h, bits, compression = header
    if compression not in (0, 3) or bits not in (1, 4, 8, 16, 24, 32) or w == 0 or h == 0:
        return None
    return offset, (bits * abs(w) + 31) // 32 * 4 * abs(h)


def jpeg_is_complete(data: bytes) -> bool:
    """True when an end-of-image marker (FF D9) follows the last start-of-scan marker (FF DA).

    Inside entropy-coded data a literal FF byte is always stuffed as FF 00, so FF D9 after the last
    scan can only be the real end marker; data appended after it by some cameras is accepted.
    """
    body = data.rstrip(b"\x00")
    if body.endswith(b"\xff\xd9"):
        return True
    sos = data.rfind(b"\xff\xda")
    return sos >= 0 and data.find(b"\xff\xd9", sos) >= 0


def png_is_complete(data: bytes) -> bool:
    """True when the PNG's IEND chunk is present."""
    return data.rfind(_PNG_IEND) >= 0


def header_size(data: bytes):
    """(width, height) read from the file header, or None when the header is not understood."""
    try:
        fmt = sniff_format(data)
        if fmt == "PNG" and len(data) >= 24 and data[12:16] == b"IHDR":
            w, h = struct.unpack(">II", data[16:24])
            return int(w), int(h)
        if fmt == "BMP":
            header = _bmp_header(data)
            return None if header is None else (abs(header.width), abs(header.height))
        if fmt == "JPEG":
            return _jpeg_size(data)
        if fmt == "TIFF":
            return _tiff_size(data)
    except (struct.error, IndexError, ValueError):
        return None
    return None


def _jpeg_size(data: bytes):
    i = 2
    n = len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return int(w), int(h)
        if marker == 0xDA:
            return None
        i += 2 + length
    return None


def _tiff_size(data: bytes):
    """The size of a TIFF's field page (`_field_page`), or None where its header does not say."""
    field = _field_page(tiff_ifds(data))
    if field is None or field.width is None or field.height is None:
        return None
    return int(field.width), int(field.height)


class TiffPage(NamedTuple):
    """What `tiff_ifds` reads of one page (image file directory) of a TIFF; None: not given."""

    offset: int                       # of its directory in the file
    width: Optional[int]
    height: Optional[int]
    subfile: Optional[int]            # NewSubfileType: bit 0 set for a reduced-resolution page
    orientation: Optional[int]        # 1..8, as EXIF's
    orientation_at: Optional[int]     # where the Orientation value is stored in the file
    tiled: bool                       # TileWidth given: the pixels are stored in tiles
    extra: Optional[int]              # ExtraSamples: 0 unspecified data, 1 and 2 alpha
    compression: Optional[int]        # Compression: 1 none, 5 LZW, 8 Deflate, ...
    bits: Optional[int] = None        # BitsPerSample of the first sample
    sample_format: Optional[int] = None  # SampleFormat of the first: 1 unsigned, 2 signed, 3 float


#: the tags `tiff_ifds` reads (the first value of each): width, height, NewSubfileType,
#: Compression, Orientation, TileWidth, ExtraSamples, BitsPerSample, SampleFormat
_TIFF_TAGS = (256, 257, 254, 259, 274, 322, 338, 258, 339)


def tiff_ifds(data: bytes, limit: int = 10_000) -> list:
    """The pages (`TiffPage`) of a TIFF or BigTIFF, following the chain of image file
    directories. Stops at a broken or looping chain (the pages read so far are returned) and
    after `limit` pages."""
    order = "<" if data[:2] == b"II" else ">"
    try:
        big = struct.unpack(order + "H", data[2:4])[0] == 43
        head, entry, off_fmt, count_fmt = (8, 20, "Q", "Q") if big else (4, 12, "I", "H")
        ifd = struct.unpack(order + off_fmt, data[head:head + struct.calcsize(off_fmt)])[0]
    except struct.error:  # cut off before its first directory: no page to read
        return []
    pages, seen = [], set()
    while ifd and ifd not in seen and len(pages) < limit:
        seen.add(ifd)
        try:
            count = struct.unpack(order + count_fmt, data[ifd:ifd + struct.calcsize(count_fmt)])[0]
            start = ifd + struct.calcsize(count_fmt)
            tags, where = {}, {}
            for k in range(count):
                e = start + entry * k
                tag, typ = struct.unpack(order + "HH", data[e:e + 4])
                if tag in _TIFF_TAGS:
                    value_at = _value_at(data, order, e, off_fmt, typ)
                    fmt = "H" if typ == 3 else "I"
                    if value_at + struct.calcsize(fmt) > len(data):
                        continue  # a value past the end of the file: the tag is not given
                    tags[tag] = struct.unpack_from(order + fmt, data, value_at)[0]
                    where[tag] = value_at if typ == 3 else None
            end = start + entry * count
            next_ifd = struct.unpack(order + off_fmt, data[end:end + struct.calcsize(off_fmt)])[0]
        except struct.error:
            break
        pages.append(TiffPage(ifd, tags.get(256), tags.get(257), tags.get(254), tags.get(274),
                              where.get(274), 322 in tags, tags.get(338), tags.get(259),
                              tags.get(258), tags.get(339)))
        ifd = next_ifd
    return pages


#: StripOffsets and StripByteCounts, TileOffsets and TileByteCounts: where a page's pixels lie
_TIFF_DATA_TAGS = ((273, 279), (324, 325))
#: the struct code and byte size of each TIFF value type (BYTE, ASCII, SHORT, LONG, RATIONAL, ...)
_TIFF_TYPES = {1: ("B", 1), 2: ("B", 1), 3: ("H", 2), 4: ("I", 4), 5: ("I", 8), 6: ("b", 1),
               7: ("B", 1), 8: ("h", 2), 9: ("i", 4), 10: ("i", 8), 11: ("f", 4), 12: ("d", 8),
               13: ("I", 4), 16: ("Q", 8), 17: ("q", 8), 18: ("Q", 8)}


def tiff_cut_off(data: bytes) -> Optional[str]:
    """"N of M bytes" where a TIFF's pages or their pixels reach past the end of `data` (a copy
    cut short), else None (also where the file says too little to tell)."""
    order = "<" if data[:2] == b"II" else ">"
    try:
        big = struct.unpack(order + "H", data[2:4])[0] == 43
        off_fmt = "Q" if big else "I"
        first = struct.unpack_from(order + off_fmt, data, 8 if big else 4)[0]
    except struct.error:
        return f"{len(data):,} bytes, cut off inside its header"
    if first >= len(data):  # the directory written last, after the pixels, and not reached
        return f"{len(data):,} bytes; its first directory starts at byte {first:,}"
    # the first directory too: one cut off inside is no page to `tiff_ifds`
    need = max(_pixels_end(data, order, ifd, big)
               for ifd in {first, *(page.offset for page in tiff_ifds(data))})
    return f"{len(data):,} of {need:,} bytes" if need > len(data) else None


def _pixels_end(data: bytes, order: str, ifd: int, big: bool) -> int:
    """The byte after the last part of the page whose directory is at `ifd`: the directory, the
    values its entries point to, and its strips or tiles (0 where it does not say)."""
    off_fmt, count_fmt, entry = ("Q", "Q", 20) if big else ("I", "H", 12)
    off_size = struct.calcsize(off_fmt)
    try:
        count = struct.unpack_from(order + count_fmt, data, ifd)[0]
    except struct.error:
        return 0
    start = ifd + struct.calcsize(count_fmt)
    need = start + entry * count + off_size  # the directory, up to the next one's offset
    if need > len(data):
        return need
    lists = {}
    for k in range(count):
        e = start + entry * k
        tag, typ = struct.unpack_from(order + "HH", data, e)
        if typ not in _TIFF_TYPES:
            continue
        at, n = _entry_values(data, order, e, off_fmt, typ)
        fmt, size = _TIFF_TYPES[typ]
        need = max(need, at + n * size)
        if at + n * size <= len(data) and typ in (3, 4, 16) \
                and any(tag in pair for pair in _TIFF_DATA_TAGS):
            lists[tag] = np.frombuffer(data, np.dtype(order + fmt), count=n, offset=at).astype(object)
    ends = [max((o + c for o, c in zip(lists[offsets], lists[counts])), default=0)
            for offsets, counts in _TIFF_DATA_TAGS if offsets in lists and counts in lists]
    return max([need, *ends])


def _value_at(data: bytes, order: str, entry: int, off_fmt: str, typ: int) -> int:
    """Where the first value of the directory entry at `entry` is (`_entry_values`)."""
    return _entry_values(data, order, entry, off_fmt, typ)[0]


def _entry_values(data: bytes, order: str, entry: int, off_fmt: str, typ: int) -> tuple:
    """(where the values of the directory entry at `entry` are, how many): in the entry itself
    when they all fit there (4 bytes, 8 in a BigTIFF), else at the offset the entry holds."""
    inline = entry + 4 + struct.calcsize(off_fmt)  # after tag, type and count
    count = struct.unpack_from(order + off_fmt, data, entry + 4)[0]
    if count * _TIFF_TYPES.get(typ, ("I", 4))[1] <= struct.calcsize(off_fmt):
        return inline, count
    return struct.unpack_from(order + off_fmt, data, inline)[0], count


def tiff_pages(data: bytes, limit: int = 10_000) -> list:
    """(width, height, NewSubfileType) of each page of a TIFF or BigTIFF (`tiff_ifds`)."""
    return [(p.width, p.height, p.subfile) for p in tiff_ifds(data, limit)]


def _tiff_field(data: bytes) -> tuple:
    """The field page of a TIFF, made the one OpenCV decodes: -> (the bytes to decode, the EXIF
    orientation still to apply to the decoded pixels (1: none), its ExtraSamples (0: a fourth
    sample is unspecified data rather than alpha; 1, 2: alpha; None: not given), why it may not
    decode (`_tiff_variant`) or None).

    - The field is the largest page not marked reduced-resolution: a thumbnail first (TIFF/EP
      puts it there) is not analysed in its place. Where it is not the first page, the header's
      first-directory offset is pointed at it, in a copy of the bytes.
    - A tiled page's orientation is turned here: OpenCV shuffles the tiles of a tiled TIFF it
      turns (Orientation 2, 3, 6, 7), so the copy says 1 and the pixels are turned after.
    - ExtraSamples 0 ("unspecified"): the fourth sample is data (an RGBX camera), not alpha.

    :raises NotASmearError: several pages of the field's size (`_refuse_stack`).
    """
    pages = tiff_ifds(data)
    if not pages:
        return data, 1, None, None
    field = _field_page(pages)
    _refuse_stack(_full_pages(pages), field)
    out = bytearray(data) if field is not pages[0] or field.tiled else None
    order = "<" if data[:2] == b"II" else ">"
    if field is not pages[0]:
        big = struct.unpack(order + "H", data[2:4])[0] == 43
        struct.pack_into(order + ("Q" if big else "I"), out, 8 if big else 4, field.offset)
    orientation = 1
    if field.tiled and field.orientation in ORIENTATIONS and field.orientation_at is not None:
        struct.pack_into(order + "H", out, field.orientation_at, 1)
        orientation = field.orientation
    return ((bytes(out) if out is not None else data), orientation, field.extra,
            _tiff_variant(field))


#: TIFF compressions that OpenCV's TIFF reader may lack (it reads none, LZW, JPEG, Deflate and
#: PackBits), by their Compression tag
_TIFF_COMPRESSIONS = {2: "CCITT RLE", 3: "CCITT fax 3", 4: "CCITT fax 4", 6: "old-style JPEG",
                      33003: "JPEG 2000 (Aperio)", 33005: "JPEG 2000 (Aperio)",
                      34712: "JPEG 2000", 34887: "LERC", 34925: "LZMA", 50000: "ZSTD",
                      50001: "WebP", 50002: "JPEG XL"}


def _tiff_variant(page: TiffPage) -> Optional[str]:
    """Why a TIFF page may not decode, where its tags say so: "compressed with ZSTD ...: save it
    with LZW, Deflate or no compression", or its 16-bit floating-point samples (OpenCV reads
    float TIFFs of 32 and 64 bits only); else None."""
    name = _TIFF_COMPRESSIONS.get(page.compression)
    if name is not None:
        return (f"compressed with {name}, which this reader does not read: save it with LZW, "
                "Deflate or no compression")
    if page.sample_format == 3 and page.bits == 16:
        return ("16-bit floating-point samples (half float), which this reader does not read: "
                "save it with 8- or 16-bit integer samples")
    return None


def _full_pages(pages: list) -> list:
    """The pages not marked reduced-resolution (NewSubfileType bit 0), or all where all are."""
    return [p for p in pages if not (p.subfile or 0) & 1] or pages


def _field_page(pages: list) -> Optional[TiffPage]:
    """The largest of `_full_pages` (the first of equals), or None without pages."""
    full = _full_pages(pages)
    return max(full, key=lambda p: (p.width or 0) * (p.height or 0)) if full else None


#: EXIF orientation -> the stored pixels as a viewer shows them
ORIENTATIONS = {
    1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a, -1)[::-1],
    8: lambda a: np.rot90(a, 1),
}


def _refuse_stack(full: list, field: TiffPage) -> None:
    """Raise NotASmearError for a TIFF with more than one page of the field's size among its pages
    not marked reduced-resolution (`full`): its other fields or focus planes would otherwise be
    silently left out."""
    full = [p for p in full if (p.width, p.height) == (field.width, field.height)]
    if len(full) > 1:
        raise NotASmearError(
            f"multi-page TIFF with {len(full)} full-size pages (a focus stack or several fields?); "
            "only single-page images are analysed: save each field as its own file")
