"""Models. Importing this package registers them with timm (``timm.create_model("vrwkv_tiny")``)."""
from vrwkv.models._factory import create_model
from vrwkv.models._registry import is_model, list_models, register_model
from vrwkv.models.vrwkv import VRWKV, Block, checkpoint_filter_fn
from vrwkv.models.vrwkv6 import VRWKV6

__all__ = [
    "VRWKV", "VRWKV6", "Block", "checkpoint_filter_fn", "create_model", "is_model", "list_models", "register_model",
]
