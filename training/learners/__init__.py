"""The class-incremental learners, each with PyCIL's contract (``incremental_train``, ``eval_task``, ``after_task``,
``state_dict`` / ``load_state_dict``): FOSTER and DER, which keep an exemplar memory through the compression
setting's :class:`~training.policy.CIMPolicy`, and the two bounds without memory. ``LEARNERS`` maps the config's
``learner`` key to the class; docs/learners.md shows how to add one."""
from .base import Learner
from .bounds import Finetune, Joint
from .der import DER
from .foster import Foster

#: ``cfg.learner`` -> learner class.
LEARNERS = {cls.NAME: cls for cls in (Foster, DER, Finetune, Joint)}


def build_learner(cfg, **kwargs) -> Learner:
    """The learner ``cfg.learner`` names, built with ``cfg`` and ``kwargs`` (see :class:`Learner`)."""
    return LEARNERS[cfg.learner](cfg=cfg, **kwargs)


__all__ = ["Learner", "Foster", "DER", "Finetune", "Joint", "LEARNERS", "build_learner"]
