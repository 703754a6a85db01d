"""The region proposal network: R layers on top of B frozen layers of the MLLM (paper 3.3).

The first R-1 layers are copies of decoder layers B..B+R-2 and run whole; layer B+R-1 contributes only
its input norm and q/k projections. The RoI logits of a query token (the last token of a user turn)
against each visual token are q.k / sqrt(d_head), averaged over heads: at initialisation they are that
layer's own attention logits, which is why so little data trains it.

A checkpoint is a small adapter folder bound to its base model: `rpn_config.json` (base model, shapes
fingerprint, weights digest, B, R, label settings, library version) + `rpn_model.safetensors`.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from sdrpn.errors import SdrpnError
from sdrpn.files import atomic_write, atomic_write_json
from sdrpn.models.base import FamilyAdapter, PromptBatch

CONFIG_NAME = "rpn_config.json"
WEIGHTS_NAME = "rpn_model.safetensors"


DIGEST_VERSION = "v2"


def weights_digest(adapter: FamilyAdapter, frozen_layers: int) -> str:
    """A digest of every weight the RPN's input depends on (vision tower, projector, embeddings, the B frozen
    layers): a strided sample of each tensor, rounded to bf16 so fp32 and bf16 loads agree. A base model whose
    vision tower, projector or early layers were fine-tuned gives other boxes, so it must not reuse an RPN."""
    digest = hashlib.sha256()
    for name, tensor in adapter.input_parameters(frozen_layers):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].to(torch.bfloat16).float().cpu()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return f"{DIGEST_VERSION}:{digest.hexdigest()[:16]}"


@dataclass
class RpnConfig:
    base_model: str
    model_type: str
    fingerprint: str
    weights_digest: str
    frozen_layers: int  # B
    rpn_layers: int  # R
    label_settings: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    roi_settings: dict = field(default_factory=dict)  # inference defaults for this RPN (sdrpn.roi.RoiSettings)
    sdrpn_version: str = ""
    final_norm: bool = False  # a trainable copy of the final norm in front of the head (the released LLaVA RPN)
    prompt_style: str = "chat_template"  # how the prompts it was trained on were written (answers use the same)


class RegionProposalNetwork(nn.Module):
    """Predicts RoI logits over the visual tokens from one partial forward pass."""

    def __init__(
        self,
        adapter: FamilyAdapter,
        frozen_layers: int,
        rpn_layers: int,
        config: RpnConfig | None = None,
        *,
        final_norm: bool | None = None,
    ):
        """`final_norm` (None: the family's default; a config's own value wins) puts a trainable copy of the
        model's final norm, initialised from it, in front of the head's input norm, as the released LLaVA RPN
        has it; the initial map is then no longer exactly the layer's attention logits."""
        super().__init__()
        shape = adapter.attention_shape
        if frozen_layers < 0 or rpn_layers < 1 or frozen_layers + rpn_layers > shape.num_layers:
            raise SdrpnError(
                f"B={frozen_layers}, R={rpn_layers} do not fit a model of {shape.num_layers} layers "
                "(need B+R <= L, R >= 1)"
            )
        from sdrpn import __version__

        self.adapter = adapter  # not a submodule: only the RPN's own weights are saved
        layers = [adapter.decoder_layers[i] for i in range(frozen_layers, frozen_layers + rpn_layers)]
        self.blocks = nn.ModuleList(copy.deepcopy(layer) for layer in layers[:-1])
        head_norm, q_proj, k_proj = adapter.qk_parts(layers[-1])
        self.head_norm = copy.deepcopy(head_norm)
        self.q_proj = copy.deepcopy(q_proj)
        self.k_proj = copy.deepcopy(k_proj)
        if config is not None:
            final_norm = config.final_norm
        elif final_norm is None:
            final_norm = adapter.defaults().rpn_final_norm
        self.final_norm = copy.deepcopy(adapter.final_norm) if final_norm else None
        for parameter in self.parameters():
            parameter.requires_grad_(True)
        self.config = config or RpnConfig(
            base_model=adapter.name_or_path,
            model_type=adapter.model.config.model_type,
            fingerprint=adapter.fingerprint(),
            weights_digest=weights_digest(adapter, frozen_layers),
            frozen_layers=frozen_layers,
            rpn_layers=rpn_layers,
            sdrpn_version=__version__,
            final_norm=bool(final_norm),
            prompt_style=getattr(adapter, "prompt_style", "chat_template"),
        )

    @property
    def frozen_layers(self) -> int:
        return self.config.frozen_layers

    def frozen_prefix(self, batch: PromptBatch) -> torch.Tensor:
        """Hidden states after the B frozen layers: no gradient, and cacheable by the caller."""
        with torch.no_grad():
            return self.adapter.prefix_hidden(batch, self.frozen_layers)

    def forward(self, batch: PromptBatch, prefix: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """RoI logits (B, Q, N_v) for every user turn's last token, and a (B, Q) mask of real turns."""
        turns = max(len(q) for q in batch.query_positions)
        query_index = torch.tensor([q + [q[-1]] * (turns - len(q)) for q in batch.query_positions])
        query_mask = torch.tensor([[i < len(q) for i in range(turns)] for q in batch.query_positions])
        return self.logits_at(self.trunk(batch, prefix), batch, query_index), query_mask

    def trunk(self, batch: PromptBatch, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, T, D) after the R - 1 whole RPN layers: what the head reads its queries and keys from."""
        hidden = self.frozen_prefix(batch) if prefix is None else prefix
        return self.adapter.run_layers(hidden.to(self.q_proj.weight.dtype), batch, list(self.blocks))

    def logits_at(self, hidden: torch.Tensor, batch: PromptBatch, query_index: torch.Tensor) -> torch.Tensor:
        """The head's logits (B, Q, N_v): q.k / sqrt(d_head) of the tokens at `query_index` (B, Q) against every
        visual token, averaged over heads."""
        rows = torch.arange(batch.size, device=hidden.device)[:, None]
        query_index = query_index.to(hidden.device)
        queries = hidden[rows, query_index]  # (B, Q, D)
        keys = hidden[rows, batch.visual_positions.to(hidden.device)]  # (B, N_max, D)
        if self.final_norm is not None:
            queries, keys = self.final_norm(queries), self.final_norm(keys)
        queries, keys = self.head_norm(queries), self.head_norm(keys)
        shape = self.adapter.attention_shape
        q = self.q_proj(queries).view(batch.size, -1, shape.num_heads, shape.head_dim).transpose(1, 2)
        k = self.k_proj(keys).view(batch.size, -1, shape.num_kv_heads, shape.head_dim).transpose(1, 2)
        q, k = self.adapter.position_qk(q, k, batch, query_index)
        k = k.repeat_interleave(shape.num_heads // shape.num_kv_heads, dim=1)
        logits = (q @ k.transpose(-1, -2)) / shape.head_dim**0.5  # (B, H, Q, N_v)
        return logits.float().mean(1)

    def question_scores(self, hidden: torch.Tensor, batch: PromptBatch) -> list[torch.Tensor]:
        """Per sample (N_i,): how much the question looks at each visual token, sigmoid(max over every token after
        the image of the head's logits), as the released Qwen2.5-VL code scores tokens to prune."""
        length = hidden.shape[1]
        starts = [int(batch.visual_positions[i, count - 1]) + 1 for i, count in enumerate(batch.visual_counts)]
        widest = max(length - start for start in starts)
        query_index = torch.stack(  # each row's tokens after its image, the last repeated to the widest (same max)
            [torch.arange(start, start + widest).clamp(max=length - 1) for start in starts]
        )
        best = self.logits_at(hidden, batch, query_index).amax(1).sigmoid()
        return [best[i, :count] for i, count in enumerate(batch.visual_counts)]

    def load_state_dict_checked(self, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """Load weights; names that are missing or unexpected are returned, shapes that differ are refused."""
        mine = self.state_dict()
        for name, tensor in state.items():
            if name in mine and tuple(mine[name].shape) != tuple(tensor.shape):
                raise SdrpnError(
                    f"RPN weight {name} has shape {tuple(tensor.shape)}, the model needs {tuple(mine[name].shape)}"
                )
        result = self.load_state_dict(state, strict=False)
        return list(result.missing_keys), list(result.unexpected_keys)

    # --- checkpoint ----------------------------------------------------------------------------
    def save(self, directory: str | Path, **extra_training: object) -> Path:
        """Write the adapter folder atomically (a crash never leaves a half-written checkpoint)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.training.update(extra_training)
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        atomic_write(directory / WEIGHTS_NAME, lambda file: file.write(save(state, metadata={"format": "pt"})))
        atomic_write_json(directory / CONFIG_NAME, asdict(self.config))
        return directory


_CONFIG_TYPES = {
    "base_model": str,
    "model_type": str,
    "fingerprint": str,
    "weights_digest": str,
    "frozen_layers": int,
    "rpn_layers": int,
    "label_settings": dict,
    "training": dict,
    "roi_settings": dict,
    "sdrpn_version": str,
    "final_norm": bool,
    "prompt_style": str,
}


def read_rpn_config(directory: str | Path) -> RpnConfig:
    """The checkpoint's config, every field checked: a tampered or truncated file is refused in one line."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise SdrpnError(f"'{directory}' is not an RPN checkpoint: no {CONFIG_NAME}")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SdrpnError(f"'{path}' is not a valid RPN config: {' '.join(str(error).split())}") from None
    if not isinstance(data, dict):
        raise SdrpnError(f"'{path}' is not a valid RPN config: expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_CONFIG_TYPES))
    if unknown:
        raise SdrpnError(f"'{path}' is not a valid RPN config: unknown keys {unknown}")
    for key, kind in _CONFIG_TYPES.items():
        if key in data and (not isinstance(data[key], kind) or (kind is not bool and isinstance(data[key], bool))):
            raise SdrpnError(f"'{path}': {key} must be a {kind.__name__}, got {data[key]!r:.40}")
    missing = [key for key in list(_CONFIG_TYPES)[:6] if key not in data]
    if missing:
        raise SdrpnError(f"'{path}' is not a valid RPN config: missing {missing}")
    return RpnConfig(**data)


def check_base(config: RpnConfig, adapter: FamilyAdapter, where: str | Path) -> None:
    """Refuse an RPN made for another base model (other shapes, or the same shapes with other weights)."""
    if not config.weights_digest.startswith(f"{DIGEST_VERSION}:"):
        raise SdrpnError(
            f"RPN '{where}' was made by an older sdrpn whose record of the base model's weights cannot be checked; "
            "train it again, or pass allow_other_base=True"
        )
    mine = (adapter.model.config.model_type, adapter.fingerprint(), weights_digest(adapter, config.frozen_layers))
    theirs = (config.model_type, config.fingerprint, config.weights_digest)
    if mine != theirs:
        raise SdrpnError(
            f"RPN '{where}' was trained for base model '{config.base_model}', not '{adapter.name_or_path}' "
            "(shapes or weights differ); train an RPN for this model, or pass allow_other_base=True"
        )


def load_rpn(directory: str | Path, adapter: FamilyAdapter, *, allow_other_base: bool = False) -> RegionProposalNetwork:
    """Load an RPN onto its base model; another base model raises unless `allow_other_base`."""
    config = read_rpn_config(directory)
    if not allow_other_base:
        check_base(config, adapter, directory)
    adapter.use_prompt_style(config.prompt_style)  # answers are prompted as the RPN was trained
    rpn = RegionProposalNetwork(adapter, config.frozen_layers, config.rpn_layers, config)
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise SdrpnError(f"RPN '{directory}' has no {WEIGHTS_NAME}")
    try:
        state = load_file(str(weights))
    except Exception as error:  # safetensors raises its own error types for truncated or corrupt files
        raise SdrpnError(f"'{weights}' is not a readable safetensors file ({' '.join(str(error).split())})") from None
    missing, unexpected = rpn.load_state_dict_checked(state)
    if missing or unexpected:
        raise SdrpnError(
            f"RPN weights in '{directory}' do not match its config (B={config.frozen_layers}, R={config.rpn_layers}): "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return rpn.to(adapter.device).eval()
