"""Model builders: raw FER2013 pixels in, probabilities over the 7 classes out.

Every model takes input shape (48, 48, 1), float32 values 0..255, and ends in a softmax layer named
``probabilities``. All preprocessing (rescaling, resizing, grayscale to RGB, ImageNet centring) is
inside the model, so a saved model serves raw pixels. Builders are pure functions.

- ``cnn_shallow`` and ``cnn_deep`` reproduce the two networks of the original report (its layer
  tables, Figures 14 and 17: 277,127 and 4,300,103 parameters).
- ``cnn`` is the project's default: a VGG-style network sized to train on a 2-core CPU.
- ``resnet50/101/152`` are ``keras.applications`` backbones with a new head, split into parts
  (`ResNetParts`) so that frozen-backbone features can be computed once and cached.
"""

from __future__ import annotations

import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

import keras
from keras import layers

from fer_mlflow.errors import ConfigError, check_convs, check_widths

INPUT_SHAPE = (48, 48, 1)
NUM_CLASSES = 7
RESNET_NAMES = ("resnet50", "resnet101", "resnet152")
MODEL_NAMES = ("cnn", "cnn_shallow", "cnn_deep", *RESNET_NAMES)
# cnn_deep: the report upscaled to 96. ResNets: 96 puts 48-pixel faces at twice their size, closer to
# the object scale ImageNet filters were trained on, and leaves a 3x3 final feature map instead of
# 2x2 at 48; it costs (96/224)^2 = 18% of the 224 input the backbones were trained at, which keeps
# feature extraction of all of FER2013 to minutes, not hours, on a CPU. The backbones' minimum is 32.
DEFAULT_IMAGE_SIZE = {
    "cnn": 48,
    "cnn_shallow": 48,
    "cnn_deep": 96,
    "resnet50": 96,
    "resnet101": 96,
    "resnet152": 96,
}
# Each builder's own dropout rate: the cnn's after each block, the ResNets' in the head.
DEFAULT_DROPOUT = {"cnn": 0.0, "cnn_shallow": 0.25, "cnn_deep": 0.25,
                   "resnet50": 0.5, "resnet101": 0.5, "resnet152": 0.5}
WEIGHT_KEYWORDS = ("auto", "imagenet", "none")
# The cnn's channels, block by block (see build_cnn).
CNN_WIDTHS = (20, 40, 80, 160)

# The include_top=False ImageNet files Keras itself fetches (keras/src/applications/resnet.py).
_IMAGENET_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
_IMAGENET_NOTOP_MD5 = {
    "resnet50": "4d473c1dd8becc155b73f8504c6f6626",
    "resnet101": "88cf7a10940856eca736dc7b7e228a21",
    "resnet152": "ee4c566cf9a93f14d82f913c2dc6dd0c",
}
# The per-channel means `keras.applications.resnet.preprocess_input` subtracts (its "caffe" mode, BGR).
IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)
# Per socket operation, not per download: offline machines fail at once or after this long.
DOWNLOAD_TIMEOUT_S = 10.0


def _pixels(image_size: int) -> tuple[keras.KerasTensor, keras.KerasTensor]:
    """The raw-pixel input and the same pixels resized to `image_size` (no layer when it is 48)."""
    inputs = keras.Input(INPUT_SHAPE, name="pixels")
    if image_size == INPUT_SHAPE[0]:
        return inputs, inputs
    if image_size < 32:
        raise ConfigError(f"image_size must be at least 32, got {image_size}")
    return inputs, layers.Resizing(image_size, image_size, name="resize")(inputs)


def _probabilities(x: keras.KerasTensor, num_classes: int) -> keras.KerasTensor:
    return layers.Dense(num_classes, activation="softmax", name="probabilities")(x)


def build_cnn_shallow(
    image_size: int = 48, num_classes: int = NUM_CLASSES, dropout: float = DEFAULT_DROPOUT["cnn_shallow"]
) -> keras.Model:
    """The report's first network (Figure 14): 277,127 parameters at 48x48.

    Kernel size 3 and "same" padding follow from its parameter counts and output shapes; the report
    states neither activations nor the dropout rate, so ReLU and 0.25 are assumptions. It scaled
    pixels to 0..1, done here by a Rescaling layer.
    """
    inputs, x = _pixels(image_size)
    x = layers.Rescaling(1 / 255)(x)
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = layers.BatchNormalization()(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Dropout(dropout)(x)
    x = layers.Flatten()(x)
    return keras.Model(inputs, _probabilities(x, num_classes), name="cnn_shallow")


def build_cnn_deep(
    image_size: int = 96, num_classes: int = NUM_CLASSES, dropout: float = DEFAULT_DROPOUT["cnn_deep"]
) -> keras.Model:
    """The report's second network (Figure 17): 4,300,103 parameters at 96x96.

    The 48 to 96 upscaling is a Resizing layer; the other assumptions are those of `build_cnn_shallow`.
    """
    inputs, x = _pixels(image_size)
    x = layers.Rescaling(1 / 255)(x)
    for first, second in ((32, 64), (128, 256), (512, 256)):
        x = layers.Conv2D(first, 3, padding="same", activation="relu")(x)
        x = layers.Conv2D(second, 3, padding="same", activation="relu")(x)
        x = layers.BatchNormalization()(x)
        x = layers.MaxPooling2D(2)(x)
        x = layers.Dropout(dropout)(x)
    x = layers.Conv2D(128, 3, padding="same", activation="relu")(x)
    x = layers.Flatten()(x)
    for first, second in ((64, 128), (256, 128)):
        x = layers.Dense(first, activation="relu")(x)
        x = layers.Dense(second, activation="relu")(x)
        x = layers.Dropout(dropout)(x)
    return keras.Model(inputs, _probabilities(x, num_classes), name="cnn_deep")


def build_cnn(
    widths: tuple[int, ...] = CNN_WIDTHS,
    dropout: float = DEFAULT_DROPOUT["cnn"],
    head_dropout: float = 0.4,
    convs: tuple[int, ...] = (2,),
    image_size: int = 48,
    num_classes: int = NUM_CLASSES,
) -> keras.Model:
    """The project's default: VGG-style, one block of two conv3x3-BN-ReLU per entry of `widths`
    (`convs`: how many in each block, one count for all or one per block; fewer is faster).

    Each block ends in 2x2 max-pooling and `dropout` (0 by default: in its hour-sized budget the
    network underfits, and block dropout 0.2 scored 2.3 points lower on validation data,
    BENCHMARKS.md). Four blocks pool 48 pixels down to a 3x3 map, which is flattened rather than
    averaged because where a feature sits on a face (mouth, brows) matters; the dense head is as
    wide as the last block.
    BatchNormalization uses momentum 0.9: at Keras' 0.99 the moving statistics of a small dataset
    (the 1.3K-image demo, 21 steps an epoch) lag so far behind that inference predicted one class.
    Compute grows with width squared. The default, 20, 40, 80, 160 (0.69M parameters), trains at
    about 300-370 images/s on 2 CPU cores with oneDNN, so 26 epochs of FER2013 fit in an hour on a
    slow day. oneDNN's AVX-512 kernels lay channels out in blocks of 16, so multiples of 16 get
    more from the same time: 16, 32, 128, 256 (1.68M parameters) trains about as fast, and
    32, 64, 128, 256 at about half the speed; with a 55-minute budget the former did not score
    better (BENCHMARKS.md).
    """
    check_widths(widths)
    convs = check_convs(convs, widths)
    inputs, x = _pixels(image_size)
    x = layers.Rescaling(1 / 255)(x)
    for block, (width, count) in enumerate(zip(widths, convs), start=1):
        for conv in range(1, count + 1):
            name = f"block{block}_conv{conv}"
            # No bias: the BatchNormalization that follows has its own offset.
            x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=name)(x)
            x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
            x = layers.ReLU(name=f"{name}_relu")(x)
        x = layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
        x = layers.Dropout(dropout, name=f"block{block}_dropout")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(widths[-1], use_bias=False, name="head_dense")(x)
    x = layers.BatchNormalization(momentum=0.9, name="head_bn")(x)
    x = layers.ReLU(name="head_relu")(x)
    x = layers.Dropout(head_dropout, name="head_dropout")(x)
    return keras.Model(inputs, _probabilities(x, num_classes), name="cnn")


def _fetch_imagenet(name: str, cache_dir: str | None, timeout_s: float) -> str:
    """The path of `name`'s ImageNet notop weights: Keras's cached copy, else a fresh download."""
    file_name = f"{name}_weights_tf_dim_ordering_tf_kernels_notop.h5"
    previous = socket.getdefaulttimeout()
    # urllib's urlretrieve (inside get_file) has no timeout argument; it uses the socket default.
    socket.setdefaulttimeout(timeout_s)
    try:
        return keras.utils.get_file(
            file_name,
            _IMAGENET_URL + file_name,
            cache_subdir="models",
            file_hash=_IMAGENET_NOTOP_MD5[name],
            cache_dir=cache_dir,
        )
    finally:
        socket.setdefaulttimeout(previous)


def resolve_weights(
    name: str,
    weights: str | None,
    cache_dir: str | None = None,
    timeout_s: float = DOWNLOAD_TIMEOUT_S,
) -> tuple[str | None, str]:
    """What to give `keras.applications` as `weights` for backbone `name`, and a description to log.

    `weights`: "imagenet" (the cached file, else a download; ConfigError when neither works),
    "auto" (ImageNet when it can be had, else random initialisation with a warning), "none" (random
    initialisation) or the path of a local weights file for the include_top=False backbone.
    `cache_dir` defaults to Keras's own cache (~/.keras, or $KERAS_HOME).
    Returns (None or a local file path, description).
    """
    if name not in RESNET_NAMES:
        raise ConfigError(f"weights only apply to {', '.join(RESNET_NAMES)}, not to model {name!r}")
    keyword = "none" if weights is None else str(weights).strip().lower()
    if keyword == "none":
        return None, "none (random initialisation)"
    if keyword in ("imagenet", "auto"):
        try:
            path = _fetch_imagenet(name, cache_dir, timeout_s)
        except Exception as error:  # get_file wraps urllib's errors in a bare Exception
            reason = str(error).split(" -- ")[-1]  # drop get_file's "URL fetch failure on <url>"
            if keyword == "imagenet":
                raise ConfigError(
                    f"ImageNet weights for {name} are not in the Keras cache and cannot be "
                    f"downloaded ({reason}): use -P weights=none to train from random "
                    "initialisation, or -P weights=<path> to a local copy of "
                    f"{name}_weights_tf_dim_ordering_tf_kernels_notop.h5"
                ) from None
            warnings.warn(
                f"weights=auto: ImageNet weights for {name} are unavailable ({reason}), "
                "so the backbone starts from random initialisation",
                stacklevel=2,
            )
            return None, f"none (random initialisation: ImageNet weights unavailable, {reason})"
        return path, f"imagenet ({path})"
    path = Path(str(weights)).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"weights file {path} does not exist; give an existing .h5/.weights.h5 file of the "
            f"{name} backbone without its top, or one of {', '.join(WEIGHT_KEYWORDS)}"
        )
    return str(path), f"local file {path}"


@dataclass(frozen=True)
class ResNetParts:
    """A ResNet classifier and its parts; all share the same layers (and so the same weights)."""

    features: keras.Model  # raw (48,48,1) pixels -> pooled backbone features (2048,)
    head: keras.Model  # features -> probabilities
    model: keras.Model  # head(features(x)), end to end
    backbone: keras.Model  # the keras.applications network, include_top=False, pooling="avg"
    weights: str  # what the backbone was initialised with, to log


def build_resnet(
    name: str,
    image_size: int = 96,
    weights: str | None = "auto",
    num_classes: int = NUM_CLASSES,
    head_units: int = 256,
    dropout: float | None = None,
) -> ResNetParts:
    """A `keras.applications` ResNet (`name` in RESNET_NAMES) with a new head, as `ResNetParts`.

    Inside the model: resize to `image_size`, replicate gray to 3 channels, then what the backbone's
    own `keras.applications.resnet.preprocess_input` does (RGB to BGR, ImageNet mean subtracted) as
    one `Rescaling` layer: with three equal channels the swap changes nothing, and unlike the ops
    `preprocess_input` adds, the layer exports to ONNX. The head
    is Dropout, Dense(`head_units`, relu), Dropout, Dense(`num_classes`, softmax). The backbone is
    left trainable; freeze it with `parts.backbone.trainable = False`, unfreeze its top with
    `unfreeze_top`.
    Raises ConfigError when `weights` cannot be honoured (see `resolve_weights`).
    """
    if name not in RESNET_NAMES:
        raise ConfigError(f"unknown ResNet {name!r}; expected one of {', '.join(RESNET_NAMES)}")
    dropout = DEFAULT_DROPOUT[name] if dropout is None else dropout
    keras_weights, description = resolve_weights(name, weights)
    constructor = {
        "resnet50": keras.applications.ResNet50,
        "resnet101": keras.applications.ResNet101,
        "resnet152": keras.applications.ResNet152,
    }[name]
    inputs, x = _pixels(image_size)  # resize the one gray channel: 3x cheaper than after replicating
    try:
        backbone = constructor(
            include_top=False,
            weights=keras_weights,
            input_shape=(image_size, image_size, 3),
            pooling="avg",
        )
    except (ValueError, OSError, KeyError) as error:
        if keras_weights is None:
            raise
        raise ConfigError(f"weights file {keras_weights} does not fit {name}: {error}") from None
    x = layers.Concatenate(name="gray_to_rgb")([x, x, x])
    x = layers.Rescaling(1.0, offset=[-mean for mean in IMAGENET_BGR_MEAN], name="imagenet_mean")(x)
    pooled = backbone(x)
    features = keras.Model(inputs, pooled, name=f"{name}_features")

    head_layers = [
        layers.Dropout(dropout, name="head_dropout_1"),
        layers.Dense(head_units, activation="relu", name="head_dense"),
        layers.Dropout(dropout, name="head_dropout_2"),
        layers.Dense(num_classes, activation="softmax", name="probabilities"),
    ]
    head_inputs = keras.Input(pooled.shape[1:], name="features")
    y, z = head_inputs, pooled
    for layer in head_layers:  # the same layer objects in `head` and `model`: shared weights
        y, z = layer(y), layer(z)
    head = keras.Model(head_inputs, y, name=f"{name}_head")
    model = keras.Model(inputs, z, name=name)
    return ResNetParts(features, head, model, backbone, description)


def unfreeze_top(backbone: keras.Model, count: int) -> None:
    """Fine-tuning: make the last `count` layers of `backbone` trainable, the rest and every
    BatchNormalization (which keeps its ImageNet statistics) not."""
    backbone.trainable = True
    for layer in backbone.layers[:-count]:
        layer.trainable = False
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


def build_model(
    name: str,
    *,
    image_size: int | None = None,
    weights: str | None = "auto",
    num_classes: int = NUM_CLASSES,
    widths: tuple[int, ...] = CNN_WIDTHS,
    dropout: float | None = None,
    convs: tuple[int, ...] = (2,),
) -> keras.Model:
    """The end-to-end model `name` (one of MODEL_NAMES); `image_size` None means its default.

    `weights` applies to the ResNets only (see `resolve_weights`); for the CNNs it must be "auto" or
    "none". `widths` and `convs` apply to `cnn` only; `dropout` None keeps each builder's default.
    Use `build_resnet` instead to get the ResNet's parts and the description of its weights.
    """
    if name not in MODEL_NAMES:
        raise ConfigError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    size = DEFAULT_IMAGE_SIZE[name] if image_size is None else int(image_size)
    options = {} if dropout is None else {"dropout": dropout}
    if name in RESNET_NAMES:
        return build_resnet(name, size, weights, num_classes, **options).model
    if weights is not None and str(weights).strip().lower() not in ("auto", "none"):
        raise ConfigError(
            f"weights={weights} applies to the ResNets only; model {name} trains from scratch, "
            "so use weights=auto or weights=none"
        )
    if name == "cnn":
        return build_cnn(widths=widths, image_size=size, num_classes=num_classes, convs=convs, **options)
    builder = build_cnn_shallow if name == "cnn_shallow" else build_cnn_deep
    return builder(image_size=size, num_classes=num_classes, **options)
