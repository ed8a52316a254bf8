"""Fully sharded data parallel training with PyTorch FSDP2, for models that do not fit one device.

``train.fsdp: true`` under ``accelerate launch`` or ``torchrun`` shards every decoder layer and the rest of
the model across the processes (parameters, gradients and optimizer state), instead of replicating it
as DDP does. Parameter names do not change, so the checkpoint formats stay the same: the trainable
weights are gathered whole onto process 0 when a checkpoint is written (:func:`trainable_state`), and
the optimizer state is saved and restored through ``torch.distributed.checkpoint.state_dict`` in its
full, unsharded form.
Works on GPUs (NCCL) and on CPUs (gloo), which is how the tests run it.
"""

from __future__ import annotations

import torch


def _fsdp():
    from torch.distributed.fsdp import FSDPModule, fully_shard

    return FSDPModule, fully_shard


def shard_model(model, device: str) -> int:
    """Shard ``model`` (a RecReasonModel) in place across all processes; returns the number of units."""
    from torch.distributed.device_mesh import init_device_mesh

    from recreason.models.methods import decoder_layers

    _, fully_shard = _fsdp()
    mesh = init_device_mesh(torch.device(device).type, (torch.distributed.get_world_size(),))
    lm = model.lm.get_base_model() if hasattr(model.lm, "get_base_model") else model.lm
    layers = decoder_layers(lm)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)  # embeddings, final norm, head, user/item tables
    return len(layers) + 1


def is_sharded(model) -> bool:
    return isinstance(model, _fsdp()[0])


def trainable_state(model) -> dict[str, torch.Tensor] | None:
    """The trainable weights gathered whole onto the CPU of process 0, keyed by parameter name (a
    collective: every process calls it; the others get an empty dict). None for an unsharded model."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True, ignore_frozen_params=True))


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def load_weights(model, weights: dict[str, torch.Tensor]) -> None:
    """Load full weights by name (names not given keep their values), into shards when the model is sharded."""
    if not is_sharded(model):
        model.load_state_dict(weights, strict=False)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, weights, options=_options(strict=False))


def optimizer_state(model, optimizer) -> dict:
    """The optimizer's state dict; under FSDP gathered into its full form, keyed by name (a collective)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """The inverse of :func:`optimizer_state`."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_options())
