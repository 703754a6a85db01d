"""The family adapter protocol: everything sdrpn needs to know about one MLLM family.

The rest of the library speaks only to this protocol, so a new family (Qwen2.5-VL, DeepSeek-VL, ...)
is one new adapter file. Nothing outside `sdrpn.models` imports a transformers model class.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from PIL import Image
from torch import nn

from sdrpn.roi import Geometry


@dataclass
class PromptBatch:
    """A batch of [system, image, conversation] prompts, ready for the model, with the token layout.

    Sequences are left-padded, so the last position of every row is its last prompt token.
    """

    inputs: dict[str, torch.Tensor]  # model-ready tensors (input_ids, attention_mask, pixel_values, ...)
    position_ids: torch.Tensor  # (B, T), padding-aware
    visual_positions: torch.Tensor  # (B, N_v) sequence index of every visual token of the image
    query_positions: list[list[int]]  # per sample: the last token of each user turn
    grid: tuple[int, int]  # (H, W) of the visual-token grid, row-major over visual_positions
    geometries: list[Geometry]  # how each original image maps onto the grid
    images: list[Image.Image] = field(default_factory=list)  # the original RGB images (for cropping)
    # Cache of the adapter's input_embeddings: the vision tower runs once per batch, however many stages
    # (RoI prediction, decoding) use it.
    embeddings: torch.Tensor | None = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return len(self.query_positions)


@dataclass(frozen=True)
class AttentionShape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int


class FamilyAdapter(ABC):
    """One MLLM family. Subclasses set `model_types` and implement the abstract methods."""

    model_types: ClassVar[tuple[str, ...]] = ()
    # Label layers/heads known to ground well, per checkpoint name (None = all heads).
    known_label_heads: ClassVar[dict[str, dict[int, list[int] | None]]] = {}
    default_rpn_layers: ClassVar[dict[str, tuple[int, int]]] = {}  # name -> (B, R)

    def __init__(self, model: nn.Module, processor, name_or_path: str):
        self.model = model
        self.processor = processor
        self.name_or_path = name_or_path

    # --- loading -------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def from_pretrained(cls, name_or_path: str, *, dtype: torch.dtype | None = None, device: str | None = None):
        """Load model + processor from a hub name or a local directory."""

    # --- prompts -------------------------------------------------------------------------------
    @abstractmethod
    def prepare(self, images: list[Image.Image], conversations: list[list[str]]) -> PromptBatch:
        """Tokenise prompts. A conversation alternates user/assistant texts and ends with a user turn;
        the image belongs to the first user turn."""

    # --- layers --------------------------------------------------------------------------------
    @property
    @abstractmethod
    def decoder_layers(self) -> nn.ModuleList:
        """The LLM's decoder layers, in order."""

    @property
    @abstractmethod
    def final_norm(self) -> nn.Module: ...

    @property
    @abstractmethod
    def attention_shape(self) -> AttentionShape: ...

    @abstractmethod
    def attention_module(self, layer: nn.Module) -> nn.Module:
        """The self-attention sub-module of a decoder layer (the one attention functions receive)."""

    @abstractmethod
    def qk_parts(self, layer: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
        """(input norm, q projection, k projection) of a decoder layer: the RPN's head."""

    def position_qk(self, q: torch.Tensor, k: torch.Tensor, batch: PromptBatch, query_index: torch.Tensor):
        """Apply the family's positional rotation to the RPN's q (B, H, Q, D) and k (B, H, N_v, D).

        Identity by default: LLaVA's RPN compares q/k without RoPE, as the released models do."""
        return q, k

    @abstractmethod
    def run_layers(self, hidden: torch.Tensor, batch: PromptBatch, layers: list[nn.Module]) -> torch.Tensor:
        """Run `layers` on hidden states (B, T, D) of `batch`; returns the last layer's output (no norm)."""

    def prefix_hidden(self, batch: PromptBatch, num_layers: int) -> torch.Tensor:
        """Hidden states (B, T, D) after the first `num_layers` decoder layers (no final norm)."""
        return self.run_layers(self.input_embeddings(batch), batch, list(self.decoder_layers)[:num_layers])

    @contextmanager
    @abstractmethod
    def text_attention(self, implementation: str) -> Iterator[None]:
        """Switch the LLM's attention implementation inside the block (the vision tower is untouched)."""

    # --- images and generation -----------------------------------------------------------------
    @abstractmethod
    def encode_images(self, images: list[Image.Image]) -> tuple[list[torch.Tensor], list[Geometry]]:
        """Visual tokens (N, D) of each image, in the LLM's input space, and their grid geometry."""

    @abstractmethod
    def input_embeddings(self, batch: PromptBatch) -> torch.Tensor:
        """Embeddings (B, T, D) of the prompt with the image's visual tokens in place (cached on the batch)."""

    @abstractmethod
    def generate(
        self,
        batch: PromptBatch,
        extra_visual_tokens: list[torch.Tensor] | None = None,
        max_new_tokens: int = 128,
    ) -> torch.Tensor:
        """Greedy-decode; extra visual tokens (n_i, D) of sample i go right after its image tokens.
        Returns the new token ids (B, L), padded with the pad id after EOS."""

    @abstractmethod
    def decode(self, token_ids: torch.Tensor) -> list[str]: ...

    @property
    @abstractmethod
    def eos_token_ids(self) -> list[int]: ...

    # --- identity ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def fingerprint(self) -> str:
        """A short hash of the LLM's shapes: an RPN made for another base model will not match."""
        shape = self.attention_shape
        names = sorted(self.model.config.to_dict().get("architectures") or [type(self.model).__name__])
        payload = json.dumps({"shape": shape.__dict__, "architectures": names}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def default_label_heads(self) -> dict[int, list[int] | None]:
        """Known grounding heads for this checkpoint, else all heads of a middle band of layers.

        The middle band [L//4, L//2] is where MLLMs localise best (paper, Fig. 3 and TwigVLM); it
        needs no hand-picking, which does not transfer between models anyway."""
        for name, heads in self.known_label_heads.items():
            if self.name_or_path.rstrip("/").endswith(name):
                return heads
        num_layers = self.attention_shape.num_layers
        return {layer: None for layer in range(num_layers // 4, num_layers // 2 + 1)}

    def default_rpn_depth(self) -> tuple[int, int]:
        """(B, R): known values for known checkpoints, else B just after the label band, R = 3 (or less)."""
        for name, depth in self.default_rpn_layers.items():
            if self.name_or_path.rstrip("/").endswith(name):
                return depth
        num_layers = self.attention_shape.num_layers
        frozen = max(1, num_layers // 2 - 1)
        return frozen, max(1, min(3, num_layers - frozen))
