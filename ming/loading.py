"""Checkpoint I/O in the release's layout: resolve a folder or hub id, build a model without allocating its weights,
then stream each safetensors tensor straight to its target device and dtype.

A 36 GB checkpoint is never held twice: tensors are memory-mapped from disk and copied one at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

DEFAULT_HUB_ID = "inclusionAI/Ming-Lite-Omni"
DEFAULT_REVISION = "250504"  # the Preview release


class CheckpointError(ValueError):
    """A checkpoint does not match the model: lists every missing, unexpected and mis-shaped key."""


def resolve_checkpoint(path_or_hub_id: str, revision: str | None = None) -> str:
    """A local folder is used as is; anything else is treated as a hub id and downloaded (or found in the cache)."""
    if os.path.isdir(path_or_hub_id):
        return path_or_hub_id
    if os.path.exists(path_or_hub_id):
        raise CheckpointError(f"{path_or_hub_id} is a file; expected a checkpoint folder or a hub id")
    from huggingface_hub import snapshot_download

    rev = revision or (DEFAULT_REVISION if path_or_hub_id == DEFAULT_HUB_ID else None)
    return snapshot_download(path_or_hub_id, revision=rev)


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Create parameters on the meta device (no memory) while buffers stay real, so that non-persistent buffers
    computed in __init__ (rotary tables and the like) keep their values."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def release_targets(model: nn.Module) -> dict[str, tuple[nn.Parameter, int | None]]:
    """Map each release key to (parameter, index into its first dim or None).

    Modules that store several release tensors in one stacked parameter expose `release_views()`."""
    targets: dict[str, tuple[nn.Parameter, int | None]] = {}
    stacked: set[int] = set()
    for prefix, module in model.named_modules():
        if hasattr(module, "release_views"):
            for key, (param, index) in module.release_views().items():
                targets[f"{prefix}.{key}" if prefix else key] = (param, index)
                stacked.add(id(param))
    for name, param in model.named_parameters():
        if id(param) not in stacked:
            targets[name] = (param, None)
    return targets


def checkpoint_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, n) for n in names]
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {folder}")


def materialize(model: nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
    """Give every meta parameter real (uninitialised) storage on `device`; floating ones in `dtype`. Buffers move
    to `device` keeping their own dtype."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            target_dtype = dtype if param.is_floating_point() else param.dtype
            if param.device.type == "meta" or param.device != torch.device(device) or param.dtype != target_dtype:
                empty = torch.empty(param.shape, dtype=target_dtype, device=device)
                if param.device.type != "meta":
                    empty.copy_(param.data)
                module._parameters[name] = nn.Parameter(empty, requires_grad=False)
        for name, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[name] = buf.to(device)


@torch.no_grad()
def load_release_weights(model: nn.Module, folder: str, skip_prefixes: tuple[str, ...] = ()) -> None:
    """Copy every tensor of the folder's safetensors into the (already materialised) model.

    Keys are the release's; keys under `skip_prefixes` belong to another model (the talker) and are left alone.
    Raises one CheckpointError listing all problems."""
    targets = release_targets(model)
    seen: set[str] = set()
    unexpected: list[str] = []
    mis_shaped: list[str] = []
    for file in checkpoint_files(folder):
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():
                if key.startswith(skip_prefixes):
                    continue
                if key not in targets:
                    unexpected.append(key)
                    continue
                param, index = targets[key]
                dest = param if index is None else param[index]
                tensor = f.get_tensor(key)
                if tuple(tensor.shape) != tuple(dest.shape):
                    mis_shaped.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model {tuple(dest.shape)}")
                    seen.add(key)  # present, reported once: as mis-shaped, not also as missing
                    continue
                dest.copy_(tensor)
                seen.add(key)
    missing = sorted(k for k in targets if k not in seen)
    if missing or unexpected or mis_shaped:
        lines = [f"checkpoint {folder} does not match the model:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
            if keys:
                lines.append(f"  {len(keys)} {title}:")
                lines.extend(f"    {k}" for k in keys[:50])
                if len(keys) > 50:
                    lines.append(f"    ... and {len(keys) - 50} more")
        raise CheckpointError("\n".join(lines))


def save_release_weights(model: nn.Module, folder: str, max_shard_bytes: int = 4 << 30) -> None:
    """Write the model's state dict under the release's key names, sharded with an index past one shard."""
    state = {}
    for key, value in model.state_dict().items():
        tensor = value.detach().cpu()
        # Per-expert views share one stacked storage; safetensors wants each tensor to own its memory.
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        state[key] = tensor.contiguous()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    os.makedirs(folder, exist_ok=True)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
