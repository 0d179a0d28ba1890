"""Concept registry: `--tokens shape,pose` looks names up here. Adding a concept is one file, its
import and one entry below (plus one row in tests/test_concepts.py)."""
from typing import NamedTuple

from guided_concepts.concepts.appearance import AppearanceConcept, AppearanceConfig, AppearanceLossConfig
from guided_concepts.concepts.base import Concept, ConceptConfig, ConceptOutput, Requirements, StepView
from guided_concepts.concepts.pose import PoseConcept, PoseConfig, PoseLossConfig
from guided_concepts.concepts.shape import ShapeConcept, ShapeConfig, ShapeLossConfig
from guided_concepts.concepts.style import StyleConcept, StyleConfig, StyleLossConfig


class Registered(NamedTuple):
    concept: type[Concept]      # the head and its guidance losses
    config: type                # its `concepts.<name>` dataclass
    loss_config: type           # its `losses.<name>` dataclass


# name -> its entry; prompt clauses follow this order
CONCEPTS: dict[str, Registered] = {
    "shape": Registered(ShapeConcept, ShapeConfig, ShapeLossConfig),
    "pose": Registered(PoseConcept, PoseConfig, PoseLossConfig),
    "appearance": Registered(AppearanceConcept, AppearanceConfig, AppearanceLossConfig),
    "style": Registered(StyleConcept, StyleConfig, StyleLossConfig),
}


def check_requirements(tokens: list[str], concept_configs: dict, loss_configs: dict) -> None:
    """Cross-concept rules, declared by each concept (Concept.requires), and each concept's rules
    between its own config and loss config (Concept.check_settings), checked here only, when the
    config is built. Raises ValueError naming the key."""
    for name in tokens:
        if not CONCEPTS[name].concept.object_level and loss_configs[name].target_weight > 0:
            raise ValueError(f"losses.{name}.target_weight: the {name} word is not one per object, so it has no target words")
        CONCEPTS[name].concept.check_settings(concept_configs[name], loss_configs[name])
        for needed, key in CONCEPTS[name].concept.requires(concept_configs[name], loss_configs[name]).items():
            if needed not in tokens:
                raise ValueError(f"{key} needs the {needed} token (--tokens {','.join([*tokens, needed])})")


__all__ = ["CONCEPTS", "Concept", "ConceptConfig", "ConceptOutput", "Registered", "Requirements", "StepView", "check_requirements"]
