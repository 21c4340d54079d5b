"""Untrusted image bytes -> PIL images, with the limits checked before any pixel is decoded.

Order of checks (each a 4xx `ImageRejected`, never a 5xx):

1. size of the encoded bytes (`max_bytes`);
2. the format, from the magic bytes: JPEG, PNG and WebP only (GIF, BMP, TIFF, ... -> 415);
3. width x height from the header (`Image.open` is lazy: it parses the header only) against
   `max_pixels`, so a decompression bomb (a tiny file declaring 50 000 x 50 000 pixels) is
   refused before a buffer is allocated; Pillow's own `DecompressionBombError` is a second net;
4. the full decode (`load()`); truncated or corrupt data -> 422.

Any aspect ratio within `max_pixels` is served (a 1 x 16M-pixel strip included): the
preprocessing resamples only the region its centre crop keeps (`flora.models.image_transform`),
so its cost does not grow with the long side.

Runs on a worker thread (`asyncio.to_thread`), never on the event loop.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, UnidentifiedImageError

from flora.models.image_decode import to_rgb

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")


class ImageRejected(Exception):
    """An image the server will not decode; `status` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def sniff_format(data: bytes) -> str | None:
    """The format named by the magic bytes (any format Pillow would recognise is named, so
    the error can say what was sent), or None when the bytes match no known signature."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data.startswith(b"BM"):
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return None


def decode_image(
    data: bytes, *, max_pixels: int, max_bytes: int, name: str = "image"
) -> Image.Image:
    """Decode one JPEG/PNG/WebP image into an 8-bit RGB PIL image (high-bit-depth
    grayscale scaled by its bit depth: `flora.models.image_decode.to_rgb`, as in training).

    Raises `ImageRejected` with 413 (too many bytes or pixels), 415 (another format) or 422
    (empty, corrupt or truncated data).
    """
    if not data:
        raise ImageRejected(422, f"{name}: empty image")
    if len(data) > max_bytes:
        raise ImageRejected(413, f"{name}: {len(data)} bytes, the limit is {max_bytes}")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageRejected(422, f"{name}: not a JPEG, PNG or WebP image (unrecognised bytes)")
    if fmt not in ALLOWED_FORMATS:
        raise ImageRejected(415, f"{name}: {fmt} images are not supported (JPEG, PNG or WebP)")
    try:
        with warnings.catch_warnings():
            # Pillow warns between MAX_IMAGE_PIXELS and 2x; our own limit decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[fmt])  # header only
            width, height = image.size
            if width <= 0 or height <= 0:
                raise ImageRejected(422, f"{name}: the header gives no image size")
            if width * height > max_pixels:
                raise ImageRejected(
                    413,
                    f"{name}: {width}x{height} = {width * height} pixels, the limit is "
                    f"{max_pixels}",
                )
            image.load()
    except ImageRejected:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageRejected(413, f"{name}: too many pixels ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected(422, f"{name}: corrupt {fmt} data ({exc})") from None
    return to_rgb(image)  # 16-bit PNGs scaled to 8 bits, not clipped to white


# Line breaks that MIME (RFC 2045: lines of at most 76 characters) and PEM encoders put in
# base64, e.g. coreutils `base64` (wraps at 76) or `openssl base64` (64).
_LINE_BREAKS = str.maketrans("", "", "\r\n")


def decode_base64(text: str, *, max_bytes: int, name: str = "image") -> bytes:
    """Base64 (a `data:image/...;base64,` prefix is accepted) -> bytes; 422 if invalid.

    Line breaks anywhere and whitespace around the value are accepted, as MIME decoders do;
    any other character outside the alphabet is an error (a space inside a line is a text,
    not a wrapped encoding). The encoded length is checked first, so a huge string is not
    decoded at all."""
    if text.startswith("data:"):
        _, sep, text = text.partition(",")
        if not sep:
            raise ImageRejected(422, f"{name}: malformed data URL")
    if "\n" in text or "\r" in text:
        text = text.translate(_LINE_BREAKS)
    text = text.strip()
    if len(text) > (max_bytes // 3 + 1) * 4 + 4:
        raise ImageRejected(413, f"{name}: more than {max_bytes} bytes")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        pass
    what = "text" if any(c.isspace() for c in text) else "not valid base64"
    raise ImageRejected(
        422,
        f"{name}: {what}; this server classifies images, so each input is a base64-encoded "
        "JPEG, PNG or WebP file (a data:image/...;base64, URL works too)",
    )
