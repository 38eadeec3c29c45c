"""vitlab: a laboratory for Vision Transformers' positional encodings and attention mechanisms."""
from .api import attention_maps, create_model, fold_string
from .models import KERNELS, QK_PES, SIZES, TOKEN_PES, ModelConfig

__version__ = "0.1.0"
__all__ = ["KERNELS", "QK_PES", "SIZES", "TOKEN_PES", "ModelConfig", "attention_maps", "create_model",
           "fold_string", "__version__"]
