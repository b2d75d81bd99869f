"""Training data: image datasets (:mod:`.images`: CIFAR, MNIST, image folders, the fast batch loader) and
character text (:mod:`.text`). Both load from a local path or a download into the cache folder."""

from .images import *  # noqa: F401,F403 - the package is the public face of its two modules
from .images import __all__ as _images_all
from .text import *  # noqa: F401,F403
from .text import __all__ as _text_all

__all__ = [*_images_all, *_text_all]
