"""Clinic photographs in: a batch of JPEG / PNG photographs carrying every kind of metadata, and the
ones that must be refused, through the real ingestion (great-expectations contract) and prepare."""
import hashlib
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageCms, PngImagePlugin

from ctrlora.data.contract import ContractError
from ctrlora.data.files import read_png
from ctrlora.data.ingest import IngestConfig, ingest
from ctrlora.data.pairs import PairDataset, read_pairs
from ctrlora.data.photos import PHOTO_CAPTION, normalise_photo, pixel_sha256, png_metadata_chunks
from ctrlora.data.prepare import PrepareConfig, prepare
from ctrlora.data.render import render_scan
from ctrlora.data.scan import write_scan
from _clinic_helpers import identifying_exif

RES = 64
# text planted in the photographs' metadata; none of it may appear anywhere under data/ except quarantine
SECRETS = [b"Jane Patient", b"SERIAL-4711", b"PhoneCo", b"Model X9", b"2024:05:01 10:11:12", b"xmpmeta",
           b"Referral note", b"acsp", b"Exif\x00\x00"]
QUADRANTS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "white": (235, 235, 235)}


def _quadrant_photo(h: int, w: int) -> np.ndarray:
    """Top-left red, top-right green, bottom-left blue, bottom-right white: shows any rotation."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = QUADRANTS["red"]
    a[: h // 2, w // 2:] = QUADRANTS["green"]
    a[h // 2:, : w // 2] = QUADRANTS["blue"]
    a[h // 2:, w // 2:] = QUADRANTS["white"]
    return a


def _land(incoming: Path, scan_id: str, name: str, write) -> Path:
    folder = incoming / scan_id
    folder.mkdir(parents=True)
    write(folder / name)
    (folder / "READY").write_bytes(b"")
    return folder / name


def _bomb_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _apng(path: Path, a: np.ndarray) -> None:
    Image.fromarray(a).save(path, format="PNG", save_all=True, append_images=[Image.fromarray(255 - a)])


def _files(*roots: Path) -> list[Path]:
    return sorted(p for r in roots for p in r.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def clinic(tmp_path_factory):
    data = tmp_path_factory.mktemp("clinic") / "data"
    incoming = data / "incoming"
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    rng = np.random.default_rng(3)
    textured = (rng.random((100, 100, 3)) * 255).astype(np.uint8)
    sources: dict[str, Path] = {}

    # a phone photograph, landscape 120×80 stored sideways (orientation 6), every metadata block
    sources["phone"] = _land(incoming, "clinic-phone", "IMG_0001.JPG", lambda p: Image.fromarray(_quadrant_photo(80, 120)).save(
        p, format="JPEG", quality=95, exif=identifying_exif(6), icc_profile=icc,
        xmp=b"<x:xmpmeta><dc:creator>Jane Patient</dc:creator></x:xmpmeta>", comment=b"Referral note"))
    text = PngImagePlugin.PngInfo()
    text.add_text("Author", "Jane Patient")
    text.add_itxt("Description", "Referral note \u00e9")
    text.add_text("zComment", "SERIAL-4711", zip=True)
    sources["png"] = _land(incoming, "clinic-png", "photo.png",
                           lambda p: Image.fromarray(textured).save(p, format="PNG", pnginfo=text, icc_profile=icc))
    gray16 = (np.linspace(0, 65535, 96 * 96).reshape(96, 96)).astype(np.uint16)
    sources["gray16"] = _land(incoming, "clinic-16bit", "scan.png", lambda p: Image.fromarray(gray16).save(p, format="PNG"))
    sources["cmyk"] = _land(incoming, "clinic-cmyk", "photo.jpg",
                            lambda p: Image.fromarray(textured).convert("CMYK").save(p, format="JPEG", exif=identifying_exif(1)))
    sources["apng"] = _land(incoming, "clinic-apng", "photo.png", lambda p: _apng(p, textured))
    sources["bomb"] = _land(incoming, "clinic-bomb", "photo.png", lambda p: p.write_bytes(_bomb_png(9000, 9000)))
    sources["small"] = _land(incoming, "clinic-small", "photo.jpg",
                             lambda p: Image.fromarray(textured[:40, :40]).save(p, format="JPEG"))
    # the existing rendered path: a good scan, and one whose photo.png is an animated PNG
    write_scan(render_scan(1, scan_id="r-good").scan, incoming)
    bad = write_scan(render_scan(2, scan_id="r-apng").scan, incoming)
    (bad / "photo.png").unlink()
    _apng(bad / "photo.png", render_scan(2, scan_id="r-apng").scan.photo)
    landed = {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in sources.items()}
    assert Image.open(sources["phone"]).getexif().get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.BodySerialNumber] == "SERIAL-4711"
    assert png_metadata_chunks(sources["png"].read_bytes()) == ["iCCP", "tEXt", "iTXt", "zTXt"]

    cfg = IngestConfig.under(data)
    first = ingest(cfg)
    # a later batch: the PNG photograph again, re-saved without its text chunks (same pixels)
    dup = _land(incoming, "clinic-png-again", "photo.png", lambda p: Image.fromarray(textured).save(p, format="PNG"))
    landed["dup"] = hashlib.sha256(dup.read_bytes()).hexdigest()
    second = ingest(cfg)
    result = prepare(PrepareConfig(sources=(data / "scans",), out=data / "prepared", data_root=data, workers=1,
                                   progress=False))
    return {"data": data, "first": first, "second": second, "landed": landed, "prepare": result, "textured": textured}


REFUSED = {  # scan id -> (file named in reason.json, rule), the file as landed
    "clinic-cmyk": ("photo.jpg", "photo_mode"),
    "clinic-apng": ("photo.png", "single_frame"),
    "clinic-bomb": ("photo.png", "header_within_limits"),
    "clinic-small": ("photo.jpg", "photo_size"),
    "r-apng": ("photo.png", "single_frame"),
}


def test_photographs_are_accepted_and_the_rest_quarantined_with_the_rule(clinic):
    data, first, second = clinic["data"], clinic["first"], clinic["second"]
    assert sorted(first.accepted) == ["clinic-16bit", "clinic-phone", "clinic-png", "r-good"]
    assert sorted(first.photos) == ["clinic-16bit", "clinic-phone", "clinic-png"]
    assert sorted(first.quarantined) == sorted(REFUSED)
    for sid, (file, rule) in REFUSED.items():
        reason = json.loads((data / "quarantine" / sid / "reason.json").read_text())
        assert reason["scan_id"] == sid
        assert [(v["file"], v["rule"]) for v in reason["violations"]] == [(file, rule)], reason
    assert second.accepted == [] and list(second.quarantined) == ["clinic-png-again"]
    reason = json.loads((data / "quarantine" / "clinic-png-again" / "reason.json").read_text())
    assert [(v["file"], v["rule"]) for v in reason["violations"]] == [("photo.png", "unique_content")]
    assert "clinic-png" in reason["violations"][0]["detail"]
    # nothing lost: every refused file is in quarantine byte for byte; incoming is empty
    held = {hashlib.sha256(p.read_bytes()).hexdigest() for p in _files(data / "quarantine")}
    for key in ("cmyk", "apng", "bomb", "small", "dup"):
        assert clinic["landed"][key] in held, key
    assert os.listdir(data / "incoming") == []
    assert sorted(os.listdir(data / "scans")) == ["clinic-16bit", "clinic-phone", "clinic-png", "r-good"]


def test_no_metadata_anywhere_in_the_store_or_the_prepared_data(clinic):
    data = clinic["data"]
    files = _files(data / "scans", data / "prepared")
    assert len([p for p in files if p.suffix == ".png"]) > 20
    for p in files:
        raw = p.read_bytes()
        for secret in SECRETS:
            assert secret not in raw, (p, secret)
        assert not raw.startswith(b"\xff\xd8"), p  # no JPEG kept
        if p.suffix == ".png":
            assert png_metadata_chunks(raw) == [], p
            with Image.open(p) as im:
                assert {k for k in im.info if k not in ("dpi", "gamma")} == set(), (p, im.info)
                assert not im.getexif(), p
    meta = json.loads((data / "scans" / "clinic-phone" / "meta.json").read_text())
    assert meta["kind"] == "photo" and meta["source"]["orientation"] == 6
    assert meta["source"]["sha256"] == clinic["landed"]["phone"]
    assert sorted(os.listdir(data / "scans" / "clinic-phone")) == ["READY", "meta.json", "photo.png"]


def test_orientation_crop_resize_and_pixel_formats(clinic):
    scans = clinic["data"] / "scans"
    phone = read_png(scans / "clinic-phone" / "photo.png", "RGB").astype(int)
    assert phone.shape == (RES, RES, 3)
    # orientation 6 turns the stored 120×80 picture a quarter clockwise: red (top-left) goes top-right
    corners = {"top_left": phone[4:12, 4:12], "top_right": phone[4:12, -12:-4],
               "bottom_left": phone[-12:-4, 4:12], "bottom_right": phone[-12:-4, -12:-4]}
    expect = {"top_left": "blue", "top_right": "red", "bottom_left": "white", "bottom_right": "green"}
    for where, colour in expect.items():
        assert np.abs(corners[where].mean(axis=(0, 1)) - QUADRANTS[colour]).max() < 25, (where, corners[where].mean(axis=(0, 1)))
    # 16-bit gray: scaled to 8 bits, gray in all three channels
    gray = read_png(scans / "clinic-16bit" / "photo.png", "RGB")
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert gray[0, 0, 0] < 5 and gray[-1, -1, 0] > 250
    # a PNG photograph already square: only resized, its stored pixels are the normalised ones
    png = read_png(scans / "clinic-png" / "photo.png", "RGB")
    expected = np.asarray(Image.fromarray(clinic["textured"]).resize((RES, RES), Image.Resampling.LANCZOS))
    assert np.array_equal(png, expected)
    assert json.loads((scans / "clinic-png" / "meta.json").read_text())["pixel_sha256"] == pixel_sha256(png)


def test_prepare_gives_photographs_the_derived_conditions_only(clinic):
    prepared, result = clinic["data"] / "prepared", clinic["prepare"]
    assert result.scans == 4
    photos = {"clinic-16bit", "clinic-phone", "clinic-png"}
    for c in ("segmentation", "lighting", "normal", "depth"):
        assert {r["scan_id"] for r in read_pairs(prepared, c)} == {"r-good"}
        assert sorted(os.listdir(prepared / "conditions" / c)) == ["pairs.jsonl", "r-good.png"]
    for c in ("canny", "grayscale", "blur", "palette"):
        rows = {r["scan_id"]: r for r in read_pairs(prepared, c)}
        assert set(rows) == photos | {"r-good"}
        for sid in photos:
            assert rows[sid]["caption"] == PHOTO_CAPTION
            assert read_png(prepared / rows[sid]["condition"], "RGB").shape == (RES, RES, 3)
    for split in ("train", "validation", "test"):  # the reader sees every pair of every split
        ds = PairDataset(prepared, "canny", split)
        for i in range(len(ds)):
            assert ds[i]["photo"].shape == (3, RES, RES)


def test_prepare_refuses_a_stored_photo_with_metadata(clinic, tmp_path):
    data = tmp_path / "data"
    store = data / "scans"
    store.mkdir(parents=True)
    src = clinic["data"] / "scans" / "clinic-png"
    (store / "clinic-png").mkdir()
    for name in ("meta.json", "READY"):
        (store / "clinic-png" / name).write_bytes((src / name).read_bytes())
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "Jane Patient")
    Image.open(src / "photo.png").save(store / "clinic-png" / "photo.png", format="PNG", pnginfo=info)
    with pytest.raises(ContractError, match=r"clinic-png/photo.png: metadata_free \(metadata chunks tEXt\)"):
        prepare(PrepareConfig(sources=(store,), out=data / "prepared", data_root=data, workers=1, progress=False))


def test_normalise_photo_rules(tmp_path):
    a = _quadrant_photo(70, 70)
    rgba = np.dstack([a, np.full(a.shape[:2], 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "opaque.png")
    assert np.array_equal(normalise_photo(tmp_path / "opaque.png", RES).pixels,
                          np.asarray(Image.fromarray(a).resize((RES, RES), Image.Resampling.LANCZOS)))
    # palette (no transparency) and 8-bit gray become RGB
    Image.fromarray(a).quantize(4).save(tmp_path / "palette.png")
    Image.fromarray(a).convert("L").save(tmp_path / "gray.jpg")
    pal = Image.open(tmp_path / "palette.png")
    assert pal.mode == "P" and np.array_equal(normalise_photo(tmp_path / "palette.png", 70).pixels,
                                              np.asarray(pal.convert("RGB")))
    gray = normalise_photo(tmp_path / "gray.jpg", RES)
    assert gray.source["mode"] == "L" and (gray.pixels[..., 0] == gray.pixels[..., 2]).all()
    rgba[0, 0, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "transparent.png")
    Image.fromarray(a).save(tmp_path / "photo.gif")
    Image.fromarray(np.zeros((64, 300, 3), np.uint8)).save(tmp_path / "panorama.png")
    for name, rule in [("transparent.png", "photo_mode"), ("photo.gif", "photo_format"), ("panorama.png", "photo_size")]:
        with pytest.raises(ValueError) as exc:
            normalise_photo(tmp_path / name, RES)
        assert exc.value.rule == rule, (name, exc.value)


def test_embed_cache_and_base_training_take_scans_without_rendered_maps(clinic, tmp_path):
    """Photo-only scans appear in the derived conditions' pairs only; the embed cache and two steps
    of base training over a rendered and a derived condition run on that unequal data."""
    import torch
    from _models_helpers import tiny_eval_backbone

    from ctrlora.models.adapters import add_adapter
    from ctrlora.models.controlnet import CtrLoRAControlNet
    from ctrlora.training.controlnet import ControlNetTrainConfig, train_base
    from ctrlora.training.embed import build_embed_cache
    from ctrlora.training.loop import TrainConfig

    torch.manual_seed(0)
    bb = tiny_eval_backbone(RES)
    cache = build_embed_cache(bb.vae, bb.text_encoder, bb.tokenizer, clinic["data"] / "prepared",
                              ["segmentation", "canny"], progress=False)
    assert sorted(cache.scan_ids) == ["clinic-16bit", "clinic-phone", "clinic-png", "r-good"]
    by_cond = {c: sorted(cache.scan_ids[int(i)] for i in ce.photo_index) for c, ce in cache.conditions.items()}
    assert by_cond == {"segmentation": ["r-good"], "canny": sorted(cache.scan_ids)}
    assert cache.captions[cache.scan_ids.index("clinic-phone")] == PHOTO_CAPTION
    # base training samples train pairs of each condition; put every scan in train for this check
    cache.splits = ["train"] * len(cache.scan_ids)
    cn = CtrLoRAControlNet.from_unet(bb.unet, condition_embedding="vae", vae_scale_factor=bb.vae_scale_factor)
    cn.requires_grad_(False)
    for c in ("segmentation", "canny"):
        add_adapter(cn, c, rank=2, own_modules=False)
    cfg = ControlNetTrainConfig(TrainConfig.from_dict({"max_steps": 2, "batch_size": 2, "log_every": 1}))
    result = train_base(cn, bb.unet, bb.scheduler, cache, ["segmentation", "canny"], cfg, tmp_path / "ckpt")
    assert result.steps_run == 2
    losses = [v for rec in result.history for k, v in rec.items() if k.startswith("loss/")]
    assert losses and all(np.isfinite(losses))


def test_land_a_clinic_export_folder(tmp_path):
    from ctrlora.data.photos import land_photos

    export = tmp_path / "export"
    export.mkdir()
    Image.fromarray(_quadrant_photo(80, 120)).save(export / "Jane Patient 01.JPG", exif=identifying_exif(6))
    Image.fromarray(_quadrant_photo(90, 90)).save(export / "b.png")
    (export / "copy.png").write_bytes((export / "b.png").read_bytes())
    (export / "notes.txt").write_text("Jane Patient")
    before = {p.name: p.read_bytes() for p in export.iterdir()}
    incoming = tmp_path / "data" / "incoming"
    result = land_photos(export, incoming)
    assert result["skipped"] == ["notes.txt"] and len(result["landed"]) == 2 and len(result["already_landed"]) == 1
    for sid in result["landed"]:
        files = sorted(os.listdir(incoming / sid))
        assert files in (["READY", "photo.jpg"], ["READY", "photo.png"]) and "Jane" not in sid
        photo = incoming / sid / files[1]
        assert sid == "photo-" + hashlib.sha256(photo.read_bytes()).hexdigest()[:16]
    assert sorted(os.listdir(incoming)) == sorted(result["landed"])
    assert {p.name: p.read_bytes() for p in export.iterdir()} == before
    assert land_photos(export, incoming)["landed"] == []
