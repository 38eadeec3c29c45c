"""Model layer: the backbone and the catalogue of positional encodings and attention kernels.

Importing this package registers every catalogue entry (one module per family)."""
from . import token_pe, rope, pope, string_pe, kernels  # noqa: F401,I001  (registration, catalogue order)
from .config import ModelConfig, make_config
from .kernels import KERNELS
from .qk_base import QK_PES
from .sizes import SIZES
from .token_pe import TOKEN_PES
from .vit import VisionTransformer

__all__ = ["KERNELS", "QK_PES", "SIZES", "TOKEN_PES", "ModelConfig", "VisionTransformer", "make_config"]
