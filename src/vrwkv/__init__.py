"""vrwkv: Vision-RWKV (arXiv 2403.02308) in pure PyTorch.

Importing the package registers the models with timm (``timm.create_model("vrwkv_tiny")``) and does nothing else:
no compilation, no downloads, no warnings.
"""
__version__ = "0.1.0"

from vrwkv import ops  # noqa: F401  (re-exported: vrwkv.ops.bi_wkv)
from vrwkv.models import create_model, list_models  # noqa: E402,F401  (importing models registers them with timm)
