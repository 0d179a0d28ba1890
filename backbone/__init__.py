from guided_concepts.backbone.load import Backbone, FrozenImageEncoder, load_backbone, resolve_model_path
from guided_concepts.backbone.tiny import build_tiny_pipeline, ensure_tiny_model

__all__ = ["Backbone", "FrozenImageEncoder", "build_tiny_pipeline", "ensure_tiny_model", "load_backbone",
           "resolve_model_path"]
