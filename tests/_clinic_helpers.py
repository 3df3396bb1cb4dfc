"""Shared helper of the clinic-import tests: the identifying EXIF a phone writes into a clinic's
photograph (a patient's name, a serial number, GPS), which the importer must strip."""
from __future__ import annotations

from PIL import ExifTags, Image


def identifying_exif(orientation: int = 1, unique: int | None = None) -> Image.Exif:
    """EXIF with the given orientation and identifiers; ``unique`` adds an ImageUniqueID (which
    also makes otherwise equal photographs differ)."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    exif[ExifTags.Base.Make] = "PhoneCo"
    exif[ExifTags.Base.Model] = "Model X9"
    exif[ExifTags.Base.DateTime] = "2024:05:01 10:11:12"
    exif[ExifTags.Base.ImageDescription] = "Jane Patient"
    ifd = exif.get_ifd(ExifTags.IFD.Exif)
    ifd[ExifTags.Base.BodySerialNumber] = "SERIAL-4711"
    if unique is not None:
        ifd[ExifTags.Base.ImageUniqueID] = f"{unique:032x}"
    exif.get_ifd(ExifTags.IFD.GPSInfo).update({1: "N", 2: (52.0, 22.0, 1.5), 3: "E", 4: (4.0, 53.0, 2.0)})
    return exif
