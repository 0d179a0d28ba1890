"""Concept registry: `--tokens shape,pose` looks names up here. Adding a concept is one file and
one line below."""
from concepts.base import Concept, ConceptConfig, ConceptOutput, StepView
from concepts.shape import ShapeConcept, ShapeConfig, ShapeLossConfig

# name -> (concept class, its config dataclass, its loss config dataclass)
CONCEPTS = {
    "shape": (ShapeConcept, ShapeConfig, ShapeLossConfig),
}

__all__ = ["CONCEPTS", "Concept", "ConceptConfig", "ConceptOutput", "StepView"]
