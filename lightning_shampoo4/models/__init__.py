"""Model zoo for the benchmarks: CIFAR ResNet / VGG / ViT / Swin and small digits models, in plain torch.

``create_model(name, num_classes, in_chans, img_size, width, **kwargs)`` builds a registered
model (``list_models()`` lists them); ``"timm:<name>"`` builds a timm model when timm is
installed. Importing this package registers every model below.
"""

from ._registry import TIMM_PREFIX, UnknownModelError, create_model, list_models, register_model
from .layers import DropPath
from .resnet import ResNet
from .small import MLPClassifier, SmallCNN
from .swin import SwinTransformer
from .vgg import VGG
from .vit import VisionTransformer

__all__ = [
    "TIMM_PREFIX",
    "VGG",
    "DropPath",
    "MLPClassifier",
    "ResNet",
    "SmallCNN",
    "SwinTransformer",
    "UnknownModelError",
    "VisionTransformer",
    "create_model",
    "list_models",
    "register_model",
]
