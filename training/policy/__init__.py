"""The CIM memory policy, apart from any learner: the compression setting's exemplar memory (store, herding,
trimming), its boxes (CAM, rational-branch CAM, ground truth; refresh, calibration, quality) and phi's bilevel
training. :class:`CIMPolicy` is what a learner holds; docs/learners.md describes the interface."""
from .boxes import BoxFinder, box_quality, check_box_sources
from .exemplars import network_features, update_memory
from .meta import InnerStep, PhiLearner, meta_iterations
from .policy import CIMPolicy, memory_mode

__all__ = [
    "CIMPolicy",
    "InnerStep",
    "BoxFinder",
    "PhiLearner",
    "box_quality",
    "check_box_sources",
    "memory_mode",
    "meta_iterations",
    "network_features",
    "update_memory",
]
