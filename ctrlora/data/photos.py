"""Clinic photographs: a landed JPEG or PNG turned into a scan's ``photo.png``, and the PNG
metadata check every stored image passes.

Normalisation rule (:func:`normalise_photo`), in this order:

1. **Header first.** The file must be a JPEG or PNG (by content, not by name) with one frame
   (animated PNG, MPO and other multi-frame files are refused); its declared width × height must
   not exceed ``max_pixels`` (default 2²⁶ ≈ 67 MP, below PIL's own bomb threshold) — checked
   before any pixel is decoded.
2. **Size.** The shorter side must be at least the target resolution (never upscaled) and the
   longer side at most :data:`MAX_ASPECT` times the shorter.
3. **Decode** fully (a truncated file fails); a JPEG at the coarsest DCT scale (1, 1/2, 1/4 or
   1/8) that keeps both sides at least the resolution.
4. **EXIF orientation** (tag 274, values 2–8) is applied to the pixels.
5. **Pixel format** (:data:`MODE_RULE`): 8-bit RGB as is; 8-bit gray and palette images become
   RGB; 16-bit gray is scaled to 8 bits (``round(v · 255 / 65535)``) then RGB; an alpha channel is
   dropped only when every pixel is opaque. CMYK (its colours need the ICC profile we strip),
   transparent pixels, 1-bit and 32-bit integer / float images are refused.
6. **Geometry** (:class:`Geometry`), by ``aspect``: ``crop`` (what ingestion does with a landed
   photograph) resizes the largest centred square (offsets ``(w - s) // 2``, ``(h - s) // 2``) to
   resolution × resolution with Lanczos; ``pad`` (the clinic importer's default, see
   :mod:`ctrlora.data.clinic`) resizes the whole photograph so its longer side is the resolution and
   centres it on a black square (letterbox). The same :class:`Geometry` then places every map of
   the photograph.

Only the resulting pixels go on: a fresh array, encoded by :func:`ctrlora.data.files.png_bytes`,
which writes no metadata chunk, so nothing of the file's EXIF, XMP, ICC profile, comments or PNG
text reaches the store. Each refusal raises :class:`PhotoRejected` naming the contract rule.
"""
from __future__ import annotations

import hashlib
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctrlora.data.scan import META, READY

PHOTO_KIND = "photo"  # meta.json "kind" of a photo-only scan
PHOTO_SCAN_FILES = ("photo.png", META, READY)  # a photo-only scan in the accepted store
PHOTO_CAPTION = "dental photo"  # what is known of a clinic photograph without reading its pixels
PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png")
PHOTO_FORMATS = ("JPEG", "PNG")
MAX_PHOTO_PIXELS = 1 << 26
MAX_ASPECT = 4.0
EXIF_ORIENTATION = 0x0112
MODE_RULE = ("RGB kept; L and P (no transparency) converted to RGB; I;16 scaled by round(v*255/65535) then RGB; "
             "RGBA / LA / PA / P with transparency only when fully opaque (alpha dropped); "
             "CMYK, transparent pixels, 1, I, F and other modes refused")
NORMALISATION = ("EXIF orientation applied, pixel format by the mode rule, largest centred square, "
                 "Lanczos resize to resolution x resolution, 8-bit RGB, no metadata")

# PNG chunks that carry pixels or how to display them; any other chunk (tEXt, zTXt, iTXt, eXIf,
# iCCP, tIME, animation chunks, private chunks) counts as metadata
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PIXEL_CHUNKS = frozenset({"IHDR", "PLTE", "IDAT", "IEND", "tRNS", "gAMA", "cHRM", "sRGB", "sBIT", "pHYs", "bKGD"})


class PhotoRejected(ValueError):
    """A landed photograph breaks a contract rule; ``rule`` is its name in ``reason.json``."""

    def __init__(self, rule: str, detail: str):
        super().__init__(f"{rule}: {detail}")
        self.rule = rule
        self.detail = detail


ASPECTS = ("pad", "crop")


@dataclass(frozen=True)
class Geometry:
    """How an upright image of ``size`` (width, height) becomes resolution × resolution: the
    region ``box`` (left, top, right, bottom in its pixels) is resized to ``content`` (width,
    height) and placed at ``offset`` (x, y) of the square; the rest of the square is padding.
    The photograph and each of its maps go through the same geometry, each with its own
    resampling filter and padding value (:meth:`apply`)."""

    aspect: str
    size: tuple[int, int]
    resolution: int
    box: tuple[int, int, int, int]
    content: tuple[int, int]
    offset: tuple[int, int]

    @classmethod
    def of(cls, width: int, height: int, resolution: int, aspect: str) -> "Geometry":
        """``crop``: the largest centred square, resized to fill the square. ``pad``: the whole
        image, its longer side resized to the resolution (the shorter to the rounded proportional
        length, at least 1), centred."""
        if aspect not in ASPECTS:
            raise ValueError(f"aspect must be one of {ASPECTS}, got {aspect!r}")
        if aspect == "crop":
            s = min(width, height)
            left, top = (width - s) // 2, (height - s) // 2
            return cls(aspect, (width, height), resolution, (left, top, left + s, top + s),
                       (resolution, resolution), (0, 0))
        scale = resolution / max(width, height)
        cw, ch = max(1, min(resolution, round(width * scale))), max(1, min(resolution, round(height * scale)))
        return cls(aspect, (width, height), resolution, (0, 0, width, height), (cw, ch),
                   ((resolution - cw) // 2, (resolution - ch) // 2))

    def apply(self, im: Any, resample: Any, fill: Any) -> Any:
        """The PIL image ``im`` (of :attr:`size`) placed by this geometry: cropped to
        :attr:`box`, resized with ``resample`` (skipped when the size already fits), padded with
        ``fill``."""
        from PIL import Image

        if im.size != self.size:
            raise ValueError(f"image of size {im.size[0]}×{im.size[1]}, geometry made for {self.size[0]}×{self.size[1]}")
        region = im if self.box == (0, 0, *self.size) else im.crop(self.box)
        if region.size != self.content:
            region = region.resize(self.content, resample)
        if self.content == (self.resolution, self.resolution):
            return region
        canvas = Image.new(region.mode, (self.resolution, self.resolution), fill)
        canvas.paste(region, self.offset)
        return canvas

    def as_dict(self) -> dict[str, Any]:
        return {"aspect": self.aspect, "size": list(self.size), "resolution": self.resolution,
                "box": list(self.box), "content": list(self.content), "offset": list(self.offset)}


@dataclass(frozen=True)
class NormalisedPhoto:
    pixels: np.ndarray  # resolution × resolution × 3 uint8
    source: dict[str, Any]  # format, width, height, mode, orientation applied (no metadata values)
    geometry: Geometry | None = None  # how the decoded upright image was placed (its maps follow it)

    @property
    def pixel_sha256(self) -> str:
        return pixel_sha256(self.pixels)


def is_photo_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(PHOTO_EXTENSIONS)


def pixel_sha256(pixels: np.ndarray) -> str:
    """Content hash of decoded pixels (shape + bytes): equal for the same picture whatever file,
    encoder or metadata it came in."""
    a = np.ascontiguousarray(pixels, dtype=np.uint8)
    return hashlib.sha256(("x".join(map(str, a.shape)) + ":").encode() + a.tobytes()).hexdigest()


def png_chunk_types(data: bytes) -> list[str]:
    """The chunk types of a PNG file in order (stops at a truncated chunk)."""
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG file")
    types, pos = [], len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        types.append(kind.decode("latin-1"))
        pos += 12 + length
    return types


def png_metadata_chunks(data: bytes) -> list[str]:
    """The chunks of a PNG that are not pixel data (see :data:`PIXEL_CHUNKS`), distinct, in order."""
    found: list[str] = []
    for kind in png_chunk_types(data):
        if kind not in PIXEL_CHUNKS and kind not in found:
            found.append(kind)
    return found


def load_strictly(im: Any) -> None:
    """Decode a PIL image fully, strictly: a truncated file or a decompression bomb raises
    (``ImageFile.LOAD_TRUNCATED_IMAGES`` off for the call, the bomb warning an error)."""
    from PIL import Image, ImageFile

    lenient = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient


def _to_rgb(im, mode: str):
    """Apply :data:`MODE_RULE`; returns an RGB image or raises :class:`PhotoRejected`."""
    from PIL import Image

    if mode == "RGB":
        return im
    if mode == "L":
        return im.convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L"):
        v = np.asarray(im).astype(np.uint32)
        return Image.fromarray(((v * 255 + 32767) // 65535).astype(np.uint8), mode="L").convert("RGB")
    if mode == "P":
        if "transparency" not in im.info:
            return im.convert("RGB")
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA"):
        alpha = np.asarray(im.getchannel("A"))
        if alpha.min() < 255:
            raise PhotoRejected("photo_mode", f"mode {mode} with {int((alpha < 255).sum())} transparent pixels "
                                              "(a photograph has no transparency)")
        return (im if mode == "RGBA" else im.convert("RGBA")).convert("RGB")
    if mode == "CMYK":
        raise PhotoRejected("photo_mode", "mode CMYK: its colours depend on an ICC profile, which is stripped; "
                                          "export the photograph as RGB")
    raise PhotoRejected("photo_mode", f"mode {mode} is not a photograph's pixel format ({MODE_RULE})")


def normalise_photo(path: str | Path, resolution: int, max_pixels: int = MAX_PHOTO_PIXELS, aspect: str = "crop",
                    draft: bool = True) -> NormalisedPhoto:
    """The scan photo of the JPEG / PNG at ``path`` by the module's rule, or :class:`PhotoRejected`.

    ``aspect``: ``crop`` or ``pad`` (:class:`Geometry`); the size rule asks the side that is
    resized to the resolution to be at least the resolution (the shorter side for ``crop``, the
    longer for ``pad``). ``draft``: let a JPEG decode at a reduced DCT scale; pass ``False`` when
    maps drawn on the full-size photograph must follow the returned :attr:`NormalisedPhoto.geometry`."""
    if aspect not in ASPECTS:
        raise ValueError(f"aspect must be one of {ASPECTS}, got {aspect!r}")
    from PIL import Image, ImageOps

    try:
        im = Image.open(path)  # header only
    except Image.DecompressionBombError as exc:
        raise PhotoRejected("header_within_limits", f"header declares a decompression bomb: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any failure to identify the file
        raise PhotoRejected("decodable", f"cannot read the image header: {type(exc).__name__}: {exc}") from None
    with im:
        if im.format not in PHOTO_FORMATS:
            raise PhotoRejected("photo_format", f"format {im.format}, expected one of {', '.join(PHOTO_FORMATS)}")
        width, height = im.size
        if width * height > max_pixels:
            raise PhotoRejected("header_within_limits", f"header declares {width}×{height} = {width * height} pixels "
                                                        f"> {max_pixels} (decompression-bomb guard)")
        frames = int(getattr(im, "n_frames", 1))
        if frames != 1:
            raise PhotoRejected("single_frame", f"{im.format} with {frames} frames (animated or multi-frame); "
                                                "one still image expected")
        short, long_ = min(width, height), max(width, height)
        if (short if aspect == "crop" else long_) < resolution:
            side = "shorter" if aspect == "crop" else "longer"
            raise PhotoRejected("photo_size", f"size {width}×{height}: {side} side below {resolution} (never upscaled)")
        if long_ > MAX_ASPECT * short:
            raise PhotoRejected("photo_size", f"size {width}×{height}: aspect ratio above {MAX_ASPECT:g}:1")
        if im.format == "JPEG" and draft:
            # let libjpeg decode at 1/2, 1/4 or 1/8 scale while the result stays >= the resolution
            # on both sides (a 12 MP phone photo decodes in a tenth of the time and memory)
            im.draft(im.mode, (resolution, resolution))
        try:
            load_strictly(im)
        except Exception as exc:  # noqa: BLE001
            raise PhotoRejected("decodable", f"decoding failed: {type(exc).__name__}: {exc}") from None
        source = {"format": im.format, "width": width, "height": height, "mode": im.mode}
        orientation = im.getexif().get(EXIF_ORIENTATION, 1)
        source["orientation"] = int(orientation) if orientation in range(1, 9) else 1
        upright = ImageOps.exif_transpose(im)
        rgb = _to_rgb(upright, upright.mode)
        geometry = Geometry.of(rgb.size[0], rgb.size[1], resolution, aspect)
        # letterbox bars are black, like the dark oral cavity around the teeth
        pixels = np.array(geometry.apply(rgb, Image.Resampling.LANCZOS, (0, 0, 0)), dtype=np.uint8)
    if pixels.shape != (resolution, resolution, 3):
        raise PhotoRejected("photo_mode", f"normalised to shape {pixels.shape}, expected {(resolution, resolution, 3)}")
    return NormalisedPhoto(pixels=pixels, source=source, geometry=geometry)


def photo_scan_meta(scan_id: str, resolution: int, photo: NormalisedPhoto, source_sha256: str) -> dict[str, Any]:
    """``meta.json`` of a photo-only scan: what the normalisation did and the original file's hash
    (to trace it in the clinic's export); no value read from the file's metadata is kept."""
    return {"scan_id": scan_id, "kind": PHOTO_KIND, "resolution": resolution, "pixel_sha256": photo.pixel_sha256,
            "normalisation": NORMALISATION, "source": {**photo.source, "sha256": source_sha256}}


def photo_scan_id(data: bytes) -> str:
    """The scan id of a clinic photograph: ``photo-`` + the first 16 hex digits of its file's
    sha256. Taken from the content, never from the file name (which may carry a patient's name),
    so the same file gets the same id whichever way it lands."""
    return "photo-" + hashlib.sha256(data).hexdigest()[:16]


def land_photos(src: str | Path, incoming: str | Path) -> dict[str, list[str]]:
    """Land a clinic's export folder: each JPEG / PNG directly in ``src`` becomes
    ``incoming/photo-<first 16 hex of its sha256>/`` holding a byte copy (``photo.jpg`` or
    ``photo.png``) and ``READY``, written in a hidden folder and renamed into place. The id comes
    from the content, never from the file name (which may carry a patient's name); a byte-identical
    file lands once. ``src`` is left as it is. Returns ``{"landed": ids, "already_landed": ids,
    "skipped": names}`` (skipped: not a plain file with a photo extension)."""
    import os
    import shutil
    import tempfile

    src, incoming = Path(src), Path(incoming)
    if not src.is_dir():
        raise NotADirectoryError(f"{src}: not a folder of photographs")
    incoming.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[str]] = {"landed": [], "already_landed": [], "skipped": []}
    for name in sorted(os.listdir(src)):
        path = src / name
        if not is_photo_name(name) or path.is_symlink() or not path.is_file():
            out["skipped"].append(name)
            continue
        data = path.read_bytes()
        scan_id = photo_scan_id(data)
        if os.path.lexists(incoming / scan_id) or scan_id in out["landed"]:
            out["already_landed"].append(scan_id)
            continue
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{scan_id}-", dir=incoming))
        try:
            ext = ".png" if name.lower().endswith(".png") else ".jpg"
            (tmp / f"photo{ext}").write_bytes(data)
            (tmp / READY).write_bytes(b"")
            os.chmod(tmp, 0o755)
            os.rename(tmp, incoming / scan_id)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        out["landed"].append(scan_id)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Land a folder of clinic photographs into the incoming folder "
                                                 "(one scan folder per photograph, READY last); then run the ingestion.")
    parser.add_argument("src", type=Path, help="folder of .jpg / .jpeg / .png photographs (not recursive)")
    parser.add_argument("--incoming", type=Path, default=Path("data/incoming"), help="landing folder (default: data/incoming)")
    args = parser.parse_args(argv)
    try:
        result = land_photos(args.src, args.incoming)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
