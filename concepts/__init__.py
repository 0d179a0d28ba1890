"""Concept registry: `--tokens shape,pose` looks names up here. Adding a concept is one file and
one line below (plus one row in tests/test_concepts.py)."""
from concepts.appearance import AppearanceConcept, AppearanceConfig, AppearanceLossConfig
from concepts.base import Concept, ConceptConfig, ConceptOutput, StepView
from concepts.pose import PoseConcept, PoseConfig, PoseLossConfig
from concepts.shape import ShapeConcept, ShapeConfig, ShapeLossConfig
from concepts.style import StyleConcept, StyleConfig, StyleLossConfig

# name -> (concept class, its config dataclass, its loss config dataclass); prompt clauses follow this order
CONCEPTS = {
    "shape": (ShapeConcept, ShapeConfig, ShapeLossConfig),
    "pose": (PoseConcept, PoseConfig, PoseLossConfig),
    "appearance": (AppearanceConcept, AppearanceConfig, AppearanceLossConfig),
    "style": (StyleConcept, StyleConfig, StyleLossConfig),
}

__all__ = ["CONCEPTS", "Concept", "ConceptConfig", "ConceptOutput", "StepView"]
