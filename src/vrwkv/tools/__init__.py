"""Tools for backbone users: ``flops`` (params / MACs / FLOPs per module type), ``erf`` (effective receptive field
maps), ``export`` (ONNX, TorchScript), ``compile`` (torch.compile with a clean CPU fallback), ``features`` (pooled
embeddings of an image folder), ``cpu_memory`` (keep freed memory in the process: no fresh pages faulted in per
forward). Import the submodules directly; nothing is imported here."""
