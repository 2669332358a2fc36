import numpy as np
import pytest
from PIL import Image

from helpers.params import section
from tumorscope.config import WindowConfig
from tumorscope.data.images import UnreadableImage, read_greyscale, window_hu

WINDOW = section(WindowConfig, level=40, width=400)


def test_window_maps_level_and_edges():
    assert window_hu(np.array([-160.0, 40.0, 240.0, -1000.0, 2000.0]), WINDOW).tolist() == [0, 128, 255, 0, 255]


def test_rgb_and_16bit_png_become_uint8_grey(tmp_path):
    rgb = np.zeros((20, 30, 3), dtype=np.uint8)
    rgb[..., 1] = 200
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    pixels, mode = read_greyscale(tmp_path / "rgb.png", WINDOW)
    assert pixels.shape == (20, 30) and pixels.dtype == np.uint8 and mode == "RGB"
    deep = (np.arange(400, dtype=np.uint16).reshape(20, 20) * 100)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    pixels, _ = read_greyscale(tmp_path / "deep.png", WINDOW)
    assert pixels.min() == 0 and pixels.max() == 255


def test_dicom_rescales_hounsfield_units_through_window(tmp_path):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(tmp_path / "ct.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    stored = np.array([[0, 1024], [1064, 1264]], dtype=np.uint16)  # HU = stored - 1024
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = stored.tobytes()
    ds.save_as(tmp_path / "ct.dcm", enforce_file_format=True)
    pixels, mode = read_greyscale(tmp_path / "ct.dcm", WINDOW)
    # -1024 HU (air) -> 0, 0 HU (water) -> 102, 40 HU -> 128, 240 HU -> 255
    assert mode == "DICOM" and pixels.tolist() == [[0, 102], [128, 255]]


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty"), (b"hello, not an image", "not an image"), (None, "corrupt")],
)
def test_unreadable_files_raise_with_reason(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    if content is None:  # a PNG cut in half
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(path)
        content = path.read_bytes()[:200]
    path.write_bytes(content)
    with pytest.raises(UnreadableImage, match=reason):
        read_greyscale(path, WINDOW)
