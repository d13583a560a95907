"""torchft: PyTorch-native fine-tuning for Llama models.

Sub-packages are imported on demand (``torchft.models``, ``torchft.checkpoint`` ...): importing
``torchft`` itself stays cheap so the ``tune`` CLI starts fast.
"""

__version__ = "0.1.0"

from torchft import _known_noise

_known_noise.install()  # before any sub-package imports torchao
