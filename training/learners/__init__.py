"""The class-incremental learners, each with PyCIL's contract (``incremental_train``, ``eval_task``, ``after_task``,
``state_dict`` / ``load_state_dict``): FOSTER and DER, which keep an exemplar memory through the compression
setting's :class:`~training.policy.CIMPolicy`, and the two bounds without memory. ``LEARNERS`` maps the config's
``learner`` key to the class; docs/learners.md shows how to add one."""
from .base import Hooks, Learner
from .bounds import Finetune, Joint
from .der import DER
from .foster import Foster

#: ``cfg.learner`` -> learner class.
LEARNERS = {cls.NAME: cls for cls in (Foster, DER, Finetune, Joint)}


def register_learner(cls: type) -> type:
    """Make a :class:`Learner` subclass selectable as ``learner=<cls.NAME>`` (configs loaded afterwards accept the
    name); usable as a class decorator. docs/learners.md has an example."""
    from .. import config

    if not (isinstance(cls, type) and issubclass(cls, Learner)) or not cls.NAME:
        raise TypeError(f"register_learner: expected a Learner subclass with a NAME, got {cls!r}")
    LEARNERS[cls.NAME] = cls
    for names, keep in ((config.LEARNER_NAMES, True), (config.MEMORY_LEARNERS, cls.USES_MEMORY)):
        if keep and cls.NAME not in names:
            names.append(cls.NAME)
    return cls


def build_learner(cfg, **kwargs) -> Learner:
    """The learner ``cfg.learner`` names, built with ``cfg`` and ``kwargs`` (see :class:`Learner`)."""
    return LEARNERS[cfg.learner](cfg=cfg, **kwargs)


__all__ = ["Learner", "Hooks", "Foster", "DER", "Finetune", "Joint", "LEARNERS", "build_learner", "register_learner"]
