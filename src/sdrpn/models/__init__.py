"""Family adapters, keyed by the Hugging Face `config.model_type`."""

from __future__ import annotations

from pathlib import Path

import torch

from sdrpn.errors import SdrpnError
from sdrpn.models.base import AttentionShape, CropTokens, FamilyAdapter, FamilyDefaults, PromptBatch
from sdrpn.models.deepseek_vl import DeepseekVLAdapter, DeepseekVLHybridAdapter
from sdrpn.models.llava import LlavaAdapter
from sdrpn.models.qwen2_5_vl import Qwen2_5_VLAdapter
from sdrpn.shipped import resolve

ADAPTERS: dict[str, type[FamilyAdapter]] = {}


def register_adapter(adapter: type[FamilyAdapter]) -> type[FamilyAdapter]:
    """Register a family; a model_type claimed twice is a bug, so it raises."""
    for model_type in adapter.model_types:
        if model_type in ADAPTERS:
            raise ValueError(f"model_type {model_type!r} is already handled by {ADAPTERS[model_type].__name__}")
        ADAPTERS[model_type] = adapter
    return adapter


register_adapter(LlavaAdapter)
register_adapter(Qwen2_5_VLAdapter)
register_adapter(DeepseekVLAdapter)
register_adapter(DeepseekVLHybridAdapter)


def _model_type(name_or_path: str, revision: str | None = None) -> str:
    from transformers import AutoConfig

    path = Path(name_or_path)
    if path.exists() and path.is_dir() and not (path / "config.json").is_file():
        raise SdrpnError(f"model directory '{name_or_path}' has no config.json")
    if path.exists() and not path.is_dir():
        raise SdrpnError(f"model '{name_or_path}' is a file; give a model folder or a hub name")
    if not path.exists() and _looks_local(name_or_path):
        raise SdrpnError(f"model folder '{name_or_path}' does not exist")
    try:
        return AutoConfig.from_pretrained(name_or_path, revision=revision).model_type
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SdrpnError(f"cannot read model '{name_or_path}': {reason}") from None


def check_device(device: str | None) -> None:
    """Refuse a device that cannot hold the model, before minutes of loading."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise SdrpnError(f"device {device!r} is not a device (cpu, cuda, cuda:1, mps, ...)") from None
    if parsed.type == "meta":
        raise SdrpnError("device meta holds no weights; choose cpu or cuda")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise SdrpnError(f"device {device}: CUDA is not available on this machine (torch {torch.__version__})")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise SdrpnError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise SdrpnError("device mps: MPS is not available on this machine")


def _looks_local(name: str) -> bool:
    """A hub name is 'org/model' (or a bare legacy name); an absolute, relative or home path is a folder."""
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype | None = None,
    device: str | None = None,
    revision: str | None = None,
    **options,
) -> FamilyAdapter:
    """Load a supported MLLM (hub name, local directory, or a shipped name such as 'toy') behind its family
    adapter. `options` are family settings (Qwen2.5-VL: min_pixels, max_pixels); None means the default."""
    check_device(device)
    name_or_path = resolve(str(name_or_path), "mllm")
    model_type = _model_type(name_or_path, revision)
    if model_type not in ADAPTERS:
        supported = ", ".join(sorted(ADAPTERS))
        raise SdrpnError(f"model '{name_or_path}' is of type {model_type!r}; supported families: {supported}")
    return ADAPTERS[model_type].from_pretrained(name_or_path, dtype=dtype, device=device, revision=revision, **options)


def wrap_model(model, processor, name_or_path: str = "in-memory", **options) -> FamilyAdapter:
    """Wrap an already-loaded model + processor (e.g. built in a test) in its family adapter."""
    model_type = model.config.model_type
    if model_type not in ADAPTERS:
        raise SdrpnError(f"model of type {model_type!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[model_type](model, processor, name_or_path, **options)


__all__ = [
    "ADAPTERS",
    "AttentionShape",
    "CropTokens",
    "FamilyAdapter",
    "FamilyDefaults",
    "PromptBatch",
    "check_device",
    "load_model",
    "register_adapter",
    "wrap_model",
]
