"""xmodal model library: a CLIP-style image-text dual encoder, in torch.

Imports neither Prefect, DVC nor MLflow, so it can be used from any trainer or server. Import
from the submodules (`model.dual_encoder`, `model.loss`, `model.metrics`, `model.config`): this
file imports nothing, so code that needs only the config or the metrics does not load torch.
"""
