"""The memory update at the end of a phase: old classes trimmed to the new per-class budget, then for each new class
the box-compressed views of its training images, their ReLU-branch features, compression-aware herding under the
budget (:func:`training.memory.herding_select`) and the chosen exemplars compressed into the memory."""
from __future__ import annotations

import torch

from .. import cim as cim_lib
from ..memory import class_budget, compress_exemplars, exemplar_costs, herding_select

__all__ = ["update_memory", "network_features"]


@torch.no_grad()
def network_features(network, loader, runtime) -> tuple[torch.Tensor, list, torch.Tensor]:
    """ReLU-branch features (concatenated over backbones), indices and original sizes of the readable images of a
    loader over an :class:`~training.cim.ImageBoxDataset` with ``return_size``."""
    network.eval()
    feats, kept, sizes = [], [], []
    for batch in loader:
        if batch is None:
            continue
        with runtime.autocast():
            feats.append(network(runtime.to_device(batch[0], image=True))["features"].float().cpu())
        kept.extend(int(i) for i in batch[2])
        sizes.append(batch[3])
    if not feats:
        return torch.zeros(0, network.feature_dim), [], torch.zeros(0, 2, dtype=torch.int64)
    return torch.cat(feats), kept, torch.cat(sizes)


def update_memory(memory, network, phase, table, *, cfg, stream, runtime, transform, loader,
                  exemplar_cams: dict) -> None:
    """Trim the old classes of ``memory`` to the budget of ``phase`` and add its new classes' exemplars, stored with
    the boxes of ``table`` (None: uncompressed); the CAMs of the chosen exemplars go to ``exemplar_cams``."""
    budget = class_budget(cfg, total_classes=phase.total)
    if not cfg.fixed_memory:
        for label in memory.classes():
            memory.trim(label, budget)
    mode = memory.mode
    train = stream.source.train
    for cls in phase.classes:
        indices = stream.train_indices([cls])
        view = cim_lib.ImageBoxDataset(train, indices, transform, stream.label_map, boxes=table,
                                       prob=1.0 if table is not None else 0.0, ratio=cfg.compress_ratio,
                                       return_size=True)
        features, kept, sizes = network_features(network, loader(view, cfg.batch_size, shuffle=False), runtime)
        if not kept:
            memory.add_class(cls, [])
            continue
        boxes = table.select(kept)[0] if mode == "cam" else None
        costs = exemplar_costs(boxes, sizes, cfg.compress_ratio, mode)
        chosen = [kept[i] for i in herding_select(features, costs, budget)]
        chosen = runtime.broadcast_object(chosen)  # every rank stores rank 0's choice
        images = [train.load(i) for i in chosen]
        chosen_boxes = table.select(chosen)[0] if mode == "cam" else None
        memory.add_class(cls, compress_exemplars(images, chosen_boxes, cfg.compress_ratio, mode, indices=chosen,
                                                 label=cls))
        if mode == "cam" and table.cams is not None:
            exemplar_cams[cls] = {"indices": torch.tensor(chosen, dtype=torch.int64), "cams": table.cams_of(chosen)}
