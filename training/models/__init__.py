"""Networks: backbones with a per-call ReLU / rational activation switch (:mod:`.backbones`), the growing networks
of the learners (:mod:`.nets`) and their parameter groups and fast weights (:mod:`.params`)."""
from .backbones import ACTIVATIONS, ActivationSite, BasicBlock, CifarResNet, ResNet18, build_backbone
from .nets import DERNet, FosterNet, IncrementalNet, network_from_spec
from .params import functional_forward, rational_modules, split_parameters

__all__ = [
    "ACTIVATIONS",
    "ActivationSite",
    "BasicBlock",
    "ResNet18",
    "CifarResNet",
    "IncrementalNet",
    "FosterNet",
    "DERNet",
    "build_backbone",
    "network_from_spec",
    "functional_forward",
    "split_parameters",
    "rational_modules",
]
