"""Reading images: every supported kind becomes uint8 RGB, every failure a clear one-line reason."""

import os

import cv2
import numpy as np
import pytest

from wbc_batch import imageio
from wbc_batch.imageio import ImageReadError, decode_image, header_size, read_image

from conftest import encode, standard_field, write_image


def bgr_encode(arr, ext, params=()):
    ok, buf = cv2.imencode(ext, arr, list(params))
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif", ".jpg"])
def test_rgb_roundtrip_keeps_channel_order(tmp_path, ext):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, :, 0] = 200  # red
    path = write_image(tmp_path / f"x{ext}", rgb, params=(cv2.IMWRITE_JPEG_QUALITY, 100))
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    assert abs(int(out[5, 5, 0]) - 200) <= 3 and out[5, 5, 1] <= 3 and out[5, 5, 2] <= 3


def test_16bit_tiff_scaled_by_its_maximum(tmp_path):
    arr = np.zeros((10, 12, 3), np.uint16)
    arr[:, :6] = 4000  # 12-bit data in a 16-bit file
    arr[:, 6:] = 2000
    (tmp_path / "a.tif").write_bytes(bgr_encode(arr, ".tif"))
    out = read_image(tmp_path / "a.tif")
    assert out.dtype == np.uint8 and out.shape == (10, 12, 3)
    assert out[0, 0, 0] == 255 and abs(int(out[0, 11, 0]) - 128) <= 1


def test_a_few_hot_pixels_do_not_darken_a_16bit_image(tmp_path):
    # one pixel at 65535 in 12-bit data scaled the image to 1/16 of its brightness
    arr = np.full((200, 300, 3), 2000, np.uint16)
    arr[:, 150:] = 4000
    arr[0, 0] = 65535
    (tmp_path / "a.tif").write_bytes(bgr_encode(arr, ".tif"))
    out = read_image(tmp_path / "a.tif")
    assert out[0, 0].tolist() == [255] * 3 and out[5, 200].tolist() == [255] * 3
    assert abs(int(out[5, 5, 0]) - 128) <= 1
    big = np.empty((1000, 1000, 3), np.uint16)  # 3M values: a step of 3 over them read one
    for c, level in enumerate((1000, 1800, 2600)):  # channel, and blew the others out
        big[..., c] = level
    (tmp_path / "c.tif").write_bytes(bgr_encode(big, ".tif"))
    assert read_image(tmp_path / "c.tif")[0, 0].tolist() == [255, 177, 98]
    noisy = (3000 + np.random.default_rng(1).integers(-300, 300, (480, 640, 3))).astype(np.uint16)
    noisy[[5, 50, 100, 200, 300], [7, 70, 170, 270, 370]] = 65535  # five white hot pixels
    (tmp_path / "d.png").write_bytes(bgr_encode(noisy, ".png"))
    assert np.median(read_image(tmp_path / "d.png")) > 200
    arr[:, :20] = 65535  # a tenth of the image that bright is no hot pixel: its maximum stays
    (tmp_path / "b.tif").write_bytes(bgr_encode(arr, ".tif"))
    assert abs(int(read_image(tmp_path / "b.tif")[5, 200, 0]) - 16) <= 1


def test_16bit_png(tmp_path):
    arr = np.full((8, 8), 65535, np.uint16)
    arr[:4] = 0
    (tmp_path / "a.png").write_bytes(bgr_encode(arr, ".png"))
    out = read_image(tmp_path / "a.png")
    assert out.shape == (8, 8, 3) and out[0, 0].tolist() == [0, 0, 0] and out[7, 7].tolist() == [255] * 3


def test_gray_png_becomes_rgb(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    (tmp_path / "g.png").write_bytes(bgr_encode(gray, ".png"))
    out = read_image(tmp_path / "g.png")
    assert out.shape == (8, 8, 3)
    assert (out[:, :, 0] == gray).all() and (out[:, :, 1] == gray).all() and (out[:, :, 2] == gray).all()


def test_rgba_png_composited_on_white(tmp_path):
    bgra = np.zeros((4, 4, 4), np.uint8)
    bgra[..., 2] = 255  # red
    bgra[:, :2, 3] = 255  # left half opaque, right half half transparent
    bgra[:, 2:, 3] = 128
    (tmp_path / "a.png").write_bytes(bgr_encode(bgra, ".png"))
    out = read_image(tmp_path / "a.png")
    assert out.shape == (4, 4, 3)
    assert out[1, 0].tolist() == [255, 0, 0]
    assert out[1, 3, 0] == 255 and 120 <= out[1, 3, 1] <= 135


def test_rgba_png_with_fully_transparent_pixels_composited_on_black(tmp_path):
    # transparent margins show nothing of the slide: black makes them the analysis's unlit frame
    bgra = np.zeros((4, 4, 4), np.uint8)
    bgra[..., 2] = 255  # red
    bgra[:, :2, 3] = 255  # left half opaque, right half transparent
    bgra[0, 0, 3] = 128
    (tmp_path / "a.png").write_bytes(bgr_encode(bgra, ".png"))
    out = read_image(tmp_path / "a.png")
    assert out[1, 0].tolist() == [255, 0, 0]
    assert out[1, 3].tolist() == [0, 0, 0]
    assert 120 <= out[0, 0, 0] <= 135 and out[0, 0, 1] == 0


def test_one_by_one(tmp_path):
    path = write_image(tmp_path / "p.png", np.full((1, 1, 3), 7, np.uint8))
    assert read_image(path).shape == (1, 1, 3)


@pytest.mark.parametrize("content, reason", [
    (b"", r"empty file \(0 bytes\)"),
    (b"this is text, not a picture\n", "not an image file"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "truncated PNG"),
])
def test_bad_bytes(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=reason) as info:
        read_image(path)
    assert "\n" not in str(info.value)


def test_truncated_jpeg(tmp_path):
    data = encode(standard_field(), ".jpg")
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated JPEG"):
        read_image(tmp_path / "t.jpg")


def test_a_cut_bmp_fails_and_a_wrong_file_size_field_does_not():
    # a BMP cut short said "cannot decode BMP (corrupt or unsupported variant)"
    import struct

    field = standard_field()
    data = encode(field, ".bmp")
    half = len(data) // 2 + 5
    with pytest.raises(ImageReadError, match=rf"truncated BMP \({half:,} of {len(data):,} bytes\)"):
        decode_image(data[:half])
    wrong = bytearray(data)  # a header whose file size is 2 bytes off: the pixels are all there
    struct.pack_into("<I", wrong, 2, len(data) + 2)
    assert decode_image(bytes(wrong)).shape == field.shape
    assert decode_image(data + bytes(len(data))).shape == field.shape  # bytes after the pixels


def test_an_os2_bmp_of_24_bits_is_read_in_colour():
    # OpenCV's IMREAD_UNCHANGED read it as one garbled channel, analysed without a word
    import struct

    img = np.random.default_rng(2).integers(1, 255, (64, 70, 3), np.uint8)  # BGR
    row = (24 * 70 + 31) // 32 * 4
    body = b"".join(np.ascontiguousarray(img[::-1][y]).tobytes().ljust(row, b"\0")
                    for y in range(64))
    data = (b"BM" + struct.pack("<IHHI", 26 + len(body), 0, 0, 26)
            + struct.pack("<IHHHH", 12, 70, 64, 1, 24) + body)
    assert np.array_equal(decode_image(data), img[:, :, ::-1])


def test_a_bmp_header_gives_its_size_both_layouts_and_when_cut_after_it():
    # one reading of a BMP's headers (imageio._bmp_header) for its size, its pixel layout and
    # its OS/2 form
    import struct

    windows = encode(standard_field(), ".bmp")
    h, w = standard_field().shape[:2]
    assert header_size(windows) == (w, h)
    assert header_size(windows[:26]) == (w, h)  # cut before the bit depth: the size is known
    assert header_size(windows[:25]) is None
    top_down = bytearray(windows)
    struct.pack_into("<i", top_down, 22, -h)
    assert header_size(bytes(top_down)) == (w, h)
    os2 = b"BM" + struct.pack("<IHHI", 26, 0, 0, 26) + struct.pack("<IHHHH", 12, 70, 64, 1, 24)
    assert header_size(os2) == (70, 64)
    with pytest.raises(ImageReadError, match=r"truncated BMP \(26 of 13,594 bytes\)"):
        decode_image(os2)


def test_a_truncated_tiff_is_one_line_and_opencv_prints_nothing(tmp_path, capfd):
    # before: OpenCV's own `[ERROR:0@0.1] ... TIFF_Error TIFFReadDirectory ...` lines reached the
    # terminal beside the progress bar
    data = encode(standard_field(), ".tif")
    (tmp_path / "t.tif").write_bytes(data[: len(data) // 2])
    capfd.readouterr()
    with pytest.raises(ImageReadError, match="truncated TIFF") as info:
        read_image(tmp_path / "t.tif")
    assert "\n" not in str(info.value)
    assert capfd.readouterr().err == ""


def _tiff_directory_first(img) -> bytes:
    """A baseline RGB TIFF whose directory comes before its pixels, as tifffile and some
    scanners write it (libtiff and OpenCV write it last)."""
    import struct

    h, w, c = img.shape
    tags = {256: (4, 1, w), 257: (4, 1, h), 258: (3, c, 0), 259: (3, 1, 1), 262: (3, 1, 2),
            273: (4, 1, 0), 277: (3, 1, c), 278: (4, 1, h), 279: (4, 1, img.nbytes)}
    bps = 8 + 2 + 12 * len(tags) + 4
    pixels = bps + 2 * c
    tags[258], tags[273] = (3, c, bps), (4, 1, pixels)
    out = bytearray(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(tags)))
    for tag in sorted(tags):
        typ, count, value = tags[tag]
        out += struct.pack("<HHI", tag, typ, count)
        out += struct.pack("<HH", value, 0) if typ == 3 and count == 1 else struct.pack("<I", value)
    out += b"\x00" * 4 + struct.pack(f"<{c}H", *[8] * c) + img.tobytes()
    return bytes(out)


@pytest.mark.parametrize("layout", ["directory last", "directory first", "tiled"])
def test_a_tiff_cut_short_anywhere_says_truncated_with_its_sizes(layout):
    # "corrupt or unsupported variant" sent a lab to its scanner settings for an unfinished copy
    img = np.ascontiguousarray(standard_field()[:96, :128])
    data = {"directory last": encode(img, ".tif"), "directory first": _tiff_directory_first(img),
            "tiled": _tiff([img], tile=(64, 64))}[layout]
    assert decode_image(data).shape == img.shape
    for end in range(4, len(data), 7):  # the signature kept: a file of fewer bytes is no TIFF
        try:
            decode_image(data[:end])  # only a cut in the trailing next-page offset decodes
        except ImageReadError as exc:
            assert str(exc).startswith("truncated TIFF ("), (end, len(data), str(exc))
        else:
            assert end >= len(data) - 4, (end, len(data))
    with pytest.raises(ImageReadError, match=rf"^truncated TIFF \({len(data) // 2:,} (of|bytes)"):
        decode_image(data[:len(data) // 2])


def test_jpeg_with_bytes_after_the_end_marker_is_accepted(tmp_path):
    data = encode(standard_field(), ".jpg") + b"camera trailer \xff\x00 data"
    (tmp_path / "t.jpg").write_bytes(data)
    assert read_image(tmp_path / "t.jpg").shape == (240, 320, 3)


def test_corrupt_body_is_a_decode_error(tmp_path):
    data = bytearray(encode(standard_field(), ".png"))
    data[40:400] = b"\x00" * 360  # break the compressed data, keep IHDR and IEND
    (tmp_path / "c.png").write_bytes(bytes(data))
    with pytest.raises(ImageReadError, match="cannot decode PNG"):
        read_image(tmp_path / "c.png")


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageReadError, match="file not found"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ImageReadError, match="folder"):
        read_image(tmp_path / "dir.png")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes (POSIX)")
def test_a_pipe_is_refused_without_waiting_for_a_writer(tmp_path):
    import threading

    os.mkfifo(tmp_path / "p.png")
    said = []

    def read():
        try:
            read_image(tmp_path / "p.png")
        except ImageReadError as exc:
            said.append(str(exc))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(30)
    assert said == ["not a regular file (a pipe, a device or a socket)"]
    with pytest.raises(imageio.NotARegularFile):  # an OSError, for `watch`'s retries
        imageio.read_file(tmp_path / "p.png")
    with pytest.raises(IsADirectoryError):
        imageio.read_file(tmp_path)
    import socket

    if hasattr(socket, "AF_UNIX"):  # a socket cannot even be opened
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(tmp_path / "s.png"))
            with pytest.raises(ImageReadError, match=r"^not a regular file \(a pipe"):
                read_image(tmp_path / "s.png")
    (tmp_path / "f.png").write_bytes(b"abc")
    assert imageio.read_file(tmp_path / "f.png") == b"abc"


def test_a_regular_file_under_a_lease_is_waited_for_as_open_waits(tmp_path, monkeypatch):
    # a Samba or NFS lease makes an open without blocking fail with EAGAIN, where a plain open
    # waits for the lease to be broken: the image was an error row
    path = tmp_path / "leased.png"
    path.write_bytes(b"abc")
    real, opened = os.open, []

    def leased(name, flags, *args):
        opened.append(bool(flags & getattr(os, "O_NONBLOCK", 0)))
        if flags & getattr(os, "O_NONBLOCK", 0):
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return real(name, flags, *args)

    monkeypatch.setattr(os, "open", leased)
    assert imageio.read_file(path) == b"abc"
    if hasattr(os, "O_NONBLOCK"):
        assert opened == [True, False]


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tif"])
def test_header_size(ext):
    data = encode(np.zeros((37, 53, 3), np.uint8), ext)
    assert header_size(data) == (53, 37)


def test_too_large_refused_before_decoding(tmp_path, monkeypatch):
    path = write_image(tmp_path / "big.png", np.zeros((100, 200, 3), np.uint8))
    monkeypatch.setattr(cv2, "imdecode", lambda *a: pytest.fail("decoded a refused image"))
    with pytest.raises(ImageReadError, match=r"image too large: 200x100 = 0.0 megapixels \(the limit is 0.01\)"):
        read_image(path, max_pixels=10_000)


def test_limit_allows_a_12000x9000_field():
    assert 12000 * 9000 <= imageio.MAX_PIXELS


# --- label masks are not smears -------------------------------------------------------------------

def _mask(values) -> np.ndarray:
    """A 40x60 grey image in vertical bands of exactly these values."""
    m = np.zeros((40, 60), np.uint8)
    for i, band in enumerate(np.array_split(np.arange(60), len(values))):
        m[:, band] = values[i]
    return m


@pytest.mark.parametrize("values", [(0, 128, 255), (0, 255), (0, 1, 2), (0, 64, 128, 255)])
def test_label_masks_are_refused_by_read_smear(tmp_path, values):
    path = write_image(tmp_path / "mask.png", np.dstack([_mask(values)] * 3))
    cv2.imwrite(str(tmp_path / "grey.png"), _mask(values))  # single channel, as masks usually are
    for p in (path, tmp_path / "grey.png"):
        assert read_image(p).shape == (40, 60, 3)  # still an image to decode
        with pytest.raises(imageio.NotASmearError, match="label mask") as info:
            imageio.read_smear(p)
        assert isinstance(info.value, ImageReadError)
        assert ", ".join(str(v) for v in values) in str(info.value)


def test_a_black_and_white_image_and_a_link_loop_are_named_as_what_they_are(tmp_path):
    # before: a 1-bit scan was only "a label mask", and a loop "cannot read file: Too many levels
    # of symbolic links"
    path = write_image(tmp_path / "bw.png", np.dstack([_mask((0, 255))] * 3))
    with pytest.raises(imageio.NotASmearError, match=r"label mask or a black-and-white \(1-bit\) "
                                                     "image, not a photograph of a smear"):
        imageio.read_smear(path)
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    with pytest.raises(ImageReadError, match="a link loop: the link leads back to itself"):
        imageio.read_smear(tmp_path / "loop.jpg")


@pytest.mark.parametrize("name, rgb", [
    ("a smear", standard_field()),
    ("a uniform field", np.full((40, 40, 3), 255, np.uint8)),
    ("the smallest image analysed", np.full((imageio.MIN_SIDE, 500, 3), 200, np.uint8)),
    ("grey levels without a 0 background", np.dstack([_mask((30, 100, 220))] * 3)),
    ("five grey levels", np.dstack([_mask((0, 60, 120, 180, 240))] * 3)),
    ("a colour image of few values", np.dstack([_mask((0, 128)), _mask((0, 120)), _mask((0, 128))])),
])
def test_check_smear_leaves_images_alone(name, rgb):
    imageio.check_smear(rgb)


@pytest.mark.parametrize("shape", [(8, 8), (31, 640), (480, 20)])
def test_images_too_small_to_hold_a_wbc_are_refused_by_read_smear(tmp_path, shape):
    path = write_image(tmp_path / "thumb.png", np.full((*shape, 3), 200, np.uint8))
    with pytest.raises(imageio.NotASmearError, match="too small to hold a WBC") as info:
        imageio.read_smear(path)
    assert f"{shape[1]}x{shape[0]} px" in str(info.value)


# --- what other cameras and tools write ------------------------------------------------------------

def _with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """The JPEG with an APP1 Exif segment holding only the Orientation tag, as phone cameras and
    some microscope cameras write it (the pixels stay stored unturned)."""
    import struct

    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) \
        + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)
    body = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + jpeg[2:]


def test_jpeg_is_turned_as_its_exif_orientation_says(tmp_path):
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:, :30] = (255, 0, 0)  # left half red
    plain = encode(rgb, ".jpg", (cv2.IMWRITE_JPEG_QUALITY, 100))
    (tmp_path / "turned.jpg").write_bytes(_with_exif_orientation(plain, 6))  # 90 degrees clockwise
    (tmp_path / "plain.jpg").write_bytes(_with_exif_orientation(plain, 1))
    assert read_image(tmp_path / "plain.jpg").shape == (40, 60, 3)
    out = read_image(tmp_path / "turned.jpg")
    assert out.shape == (60, 40, 3)  # as a viewer shows it
    assert out[5, 20, 0] > 200 and out[55, 20, 0] < 50  # the red half is now on top


def test_float_image_with_nan_and_inf(tmp_path):
    arr = np.full((32, 40, 3), 0.5, np.float32)
    arr[:, :20] = 1.0
    arr[0, 0] = np.nan
    arr[0, 1] = np.inf
    arr[0, 2] = -np.inf
    (tmp_path / "f.tif").write_bytes(bgr_encode(arr, ".tif"))
    out = read_image(tmp_path / "f.tif")
    assert out[5, 5].tolist() == [255] * 3 and out[5, 35].tolist() == [128] * 3
    assert out[0, :3].tolist() == [[0] * 3] * 3


def _tiff_pages(tmp_path, pages) -> bytes:
    path = tmp_path / "stack.tif"
    assert cv2.imwritemulti(str(path), pages)
    return path.read_bytes()


def test_multi_page_tiff_is_refused_not_cut_to_its_first_page(tmp_path):
    field = cv2.cvtColor(standard_field(), cv2.COLOR_RGB2BGR)
    data = _tiff_pages(tmp_path, [field, field, 255 - field])
    assert [p[:2] for p in imageio.tiff_pages(data)] == [(320, 240)] * 3
    with pytest.raises(imageio.NotASmearError, match="multi-page TIFF with 3 full-size pages"):
        decode_image(data)


def test_tiff_with_a_smaller_second_page_is_read(tmp_path):
    field = cv2.cvtColor(standard_field(), cv2.COLOR_RGB2BGR)
    data = _tiff_pages(tmp_path, [field, cv2.resize(field, (80, 60))])  # a thumbnail, a pyramid level
    assert decode_image(data).shape == (240, 320, 3)


def _tiff(pages, tile=None, orientation=None, extra=None, subfiles=None, compression=1,
          sample_format=None) -> bytes:
    """A little-endian baseline TIFF of RGB(A) pages (of the pages' dtype; `sample_format` 3
    for floats), stored in one strip or in tiles, with the tags a scanner's or camera's
    software writes (OpenCV writes strips only)."""
    import struct

    out, ifds = bytearray(b"II*\x00\x00\x00\x00\x00"), []
    for n, img in enumerate(pages):
        h, w, c = img.shape
        tw, th = tile or (w, h)
        chunks = []
        for y in range(0, h, th):
            for x in range(0, w, tw):
                part = np.zeros((th, tw, c), img.dtype)
                part[:min(th, h - y), :min(tw, w - x)] = img[y:y + th, x:x + tw]
                chunks.append((part if tile else img).tobytes())
        offsets = []
        for chunk in chunks:
            offsets.append(len(out))
            out += chunk
        bps, offs, counts = len(out), len(out) + 2 * c, len(out) + 2 * c + 4 * len(chunks)
        out += struct.pack(f"<{c}H", *[8 * img.itemsize] * c) + struct.pack(f"<{len(chunks)}I", *offsets)
        out += struct.pack(f"<{len(chunks)}I", *map(len, chunks))
        many = len(chunks) > 1
        tags = {256: (4, 1, w), 257: (4, 1, h), 258: (3, c, bps), 259: (3, 1, compression), 262: (3, 1, 2),
                277: (3, 1, c), 284: (3, 1, 1),
                **({322: (3, 1, tw), 323: (3, 1, th), 324: (4, len(chunks), offs if many else offsets[0]),
                    325: (4, len(chunks), counts if many else len(chunks[0]))} if tile else
                   {273: (4, 1, offsets[0]), 278: (4, 1, h), 279: (4, 1, len(chunks[0]))}),
                **({274: (3, 1, orientation)} if orientation else {}),
                **({338: (3, 1, extra)} if extra is not None else {}),
                **({254: (4, 1, subfiles[n])} if subfiles else {})}
        if sample_format:  # one value per sample, stored after the page's data
            tags[339] = (3, c, len(out))
            out += struct.pack(f"<{c}H", *[sample_format] * c)
        ifds.append(len(out))
        out += struct.pack("<H", len(tags))
        for tag in sorted(tags):
            typ, count, value = tags[tag]
            out += struct.pack("<HHI", tag, typ, count)
            out += struct.pack("<HH", value, 0) if typ == 3 and count == 1 else struct.pack("<I", value)
        out += b"\x00" * 4
    struct.pack_into("<I", out, 4, ifds[0])
    for ifd, following in zip(ifds, ifds[1:]):
        struct.pack_into("<I", out, ifd + 2 + 12 * struct.unpack_from("<H", out, ifd)[0], following)
    return bytes(out)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("tile", [None, (64, 64)])
def test_a_tiff_is_turned_as_its_orientation_says_tiled_too(orientation, tile):
    # OpenCV shuffled the tiles of a tiled TIFF it turned (Orientation 2, 3, 6, 7): half cells
    # were reported as ok. Strips, turned by OpenCV, are the reference the mapping must meet
    rgb = standard_field()
    shown = imageio.ORIENTATIONS[orientation](rgb)
    assert np.array_equal(decode_image(_tiff([rgb], tile=tile, orientation=orientation)), shown)


@pytest.mark.parametrize("subfiles", [None, (1, 0)])
def test_a_tiff_with_its_thumbnail_first_is_read_from_its_field(subfiles):
    # TIFF/EP writers put the reduced image first: the 80x60 thumbnail had been analysed
    rgb = standard_field()
    data = _tiff([cv2.resize(rgb, (80, 60)), rgb], subfiles=subfiles)
    assert header_size(data) == (320, 240)
    assert np.array_equal(decode_image(data), rgb)
    with pytest.raises(imageio.NotASmearError, match="2 full-size pages"):
        decode_image(_tiff([cv2.resize(rgb, (80, 60)), rgb, 255 - rgb]))


def test_an_unspecified_fourth_sample_or_an_alpha_of_zeros_is_no_transparency(tmp_path):
    # an RGBX TIFF (ExtraSamples 0) and a 32-bit BMP with its unused byte 0 had read as a blank,
    # white field: "ok, 0 WBCs"
    rgb = standard_field()
    rgbx = np.dstack([rgb, np.zeros(rgb.shape[:2], np.uint8)])
    assert np.array_equal(decode_image(_tiff([rgbx], extra=0)), rgb)
    bmp = bgr_encode(np.dstack([rgb[..., ::-1], np.zeros(rgb.shape[:2], np.uint8)]), ".bmp")
    assert np.array_equal(decode_image(bmp), rgb)


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("extra", [1, 2])
def test_a_tiff_with_alpha_reads_as_the_same_pixels_in_a_png(bits, extra):
    # before: libtiff had multiplied an 8-bit TIFF's colours by its unassociated alpha, and they
    # were multiplied again: a half-transparent field read about 50 grey levels too dark
    rgb = standard_field()
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:, 100:] = 128
    straight = np.dstack([rgb, alpha]).astype(np.float64) * (257.0 if bits == 16 else 1.0)
    dtype = np.uint16 if bits == 16 else np.uint8
    png = decode_image(bgr_encode(straight[..., [2, 1, 0, 3]].astype(dtype), ".png"))
    stored = straight.copy()
    if extra == 1:  # associated alpha: stored already multiplied, as the format says
        stored[..., :3] *= alpha[..., None] / 255.0
    data = _tiff([np.rint(stored).astype(dtype)], extra=extra)
    assert np.abs(decode_image(data).astype(int) - png.astype(int)).max() <= 1


def test_a_16_bit_tiff_with_straight_alpha_and_dark_colours_is_not_taken_as_multiplied():
    # a first version took colours nowhere above their alpha as already multiplied, whatever the
    # depth: a 12-bit camera's samples in a 16-bit file read up to 64 levels too light
    rgb = standard_field().astype(np.float64) * 4095 / 255
    alpha = np.full(rgb.shape[:2], 65535.0)
    alpha[:, 100:] = 32768
    straight = np.rint(np.dstack([rgb, alpha])).astype(np.uint16)
    png = decode_image(bgr_encode(straight[..., [2, 1, 0, 3]], ".png"))
    assert np.abs(decode_image(_tiff([straight], extra=2)).astype(int) - png.astype(int)).max() <= 1


def test_a_tiff_transparent_everywhere_is_refused_where_its_colours_are_lost():
    # before: an 8-bit one's colours, multiplied by an alpha of 0, read as a black field: "ok,
    # 0 WBCs"; a 16-bit one keeps its colours, and its alpha of zeros is taken as absent
    rgba = np.dstack([standard_field(), np.zeros((240, 320), np.uint8)])
    with pytest.raises(ImageReadError, match="the TIFF is transparent everywhere"):
        decode_image(_tiff([rgba], extra=2))
    deep = rgba.astype(np.uint16) * 257
    assert np.array_equal(decode_image(_tiff([deep], extra=2)), decode_image(_tiff([deep[..., :3]])))


def test_a_tiff_in_a_compression_opencv_cannot_read_names_it():
    # a valid ZSTD or LZMA TIFF was "corrupt or unsupported variant": as if the file were broken
    data = _tiff([standard_field()], compression=50000)
    with pytest.raises(ImageReadError, match="compressed with ZSTD, which this reader does not read: "
                                             "save it with LZW, Deflate or no compression"):
        decode_image(data)


def test_a_half_float_tiff_names_its_samples_and_float32_reads():
    # OpenCV reads float TIFFs of 32 and 64 bits only: a float16 one was "corrupt or unsupported
    # variant", as if the file were broken
    rgb = standard_field()
    as_float = rgb.astype(np.float32) / 255
    half = _tiff([as_float.astype(np.float16)], sample_format=3)
    page = imageio.tiff_ifds(half)[0]
    assert (page.bits, page.sample_format) == (16, 3)  # both stored away from their entries
    with pytest.raises(ImageReadError, match=r"16-bit floating-point samples \(half float\), which "
                                             "this reader does not read"):
        decode_image(half)
    assert np.array_equal(decode_image(_tiff([as_float], sample_format=3)), rgb)
    assert imageio.tiff_ifds(_tiff([rgb]))[0][-2:] == (8, None)


def test_tiff_pages_survives_a_looping_or_broken_chain():
    import struct

    one_entry = struct.pack("<H", 1) + struct.pack("<HHIHH", 256, 3, 1, 7, 0)
    looping = b"II*\x00" + struct.pack("<I", 8) + one_entry + struct.pack("<I", 8)
    assert imageio.tiff_pages(looping) == [(7, None, None)]
    assert imageio.tiff_pages(looping[:-2]) == []  # cut inside the next-page offset


@pytest.mark.parametrize("content, name", [
    (b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x00" * 20, "WebP"),
    (b"GIF89a" + b"\x00" * 20, "GIF"),
    (b"\x00\x00\x00\x18ftypheic" + b"\x00" * 20, "HEIC/HEIF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00" * 20, "JPEG 2000"),
    (b"%PDF-1.7\n" + b"\x00" * 20, "PDF"),
    (b"\x00" * 128 + b"DICM" + b"\x00" * 20, "DICOM"),
])
def test_known_formats_that_are_not_read_are_named(tmp_path, content, name):
    path = tmp_path / "scan.png"
    path.write_bytes(content)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert str(info.value) == (f"the content is {name}, which is not read (JPEG, PNG, BMP and TIFF "
                               "are); save the image as PNG or TIFF")


def test_broken_link_says_so(tmp_path):
    import os

    os.symlink(tmp_path / "gone.png", tmp_path / "link.png")
    with pytest.raises(ImageReadError, match="broken link: its target .*gone.png is missing"):
        read_image(tmp_path / "link.png")


def test_decode_image_takes_any_buffer_of_bytes_and_names_what_is_not_one():
    # before: AttributeError from a memoryview or a NumPy array (a web upload), TypeError from str
    data = bgr_encode(standard_field()[..., ::-1], ".png")
    for buffer in (bytearray(data), memoryview(data), np.frombuffer(data, np.uint8)):
        assert np.array_equal(decode_image(buffer), decode_image(data))
    for other, said in (("field.png", "not a str; read_image(path) or read_smear(path) reads a file"),
                        (None, "not a NoneType")):
        for decode in (decode_image, imageio.decode_smear):  # neither names the other
            with pytest.raises(ImageReadError) as info:
                decode(other)
            assert str(info.value) == ("needs the bytes of an image file (or a buffer of them), "
                                       + said)
