"""The family adapter protocol: everything sdrpn needs to know about one MLLM family.

The rest of the library speaks only to this protocol, so a new family is one new adapter file. Nothing
outside `sdrpn.models` imports a transformers model class. The protocol carries any token grid: every
sample of a batch has its own visual grid (H_i, W_i), its own positions (whatever shape the family's
rotary embedding needs) and, in stage 2, its own crops, each with its own grid and kept tokens.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
from PIL import Image
from torch import nn

from sdrpn.errors import SdrpnError
from sdrpn.roi import Geometry, RoiSettings

LayerHeads = dict[int, list[int] | None]  # layer index -> heads to average (None = all heads)


@dataclass
class PromptBatch:
    """A batch of [system, image, conversation] prompts, ready for the model, with each sample's token layout.

    Sequences are left-padded, so the last position of every row is its last prompt token. Samples may have
    grids of different sizes: `visual_positions` is padded to the largest (by repeating the sample's last
    visual position, so gathers stay valid); `visual_counts` says how many columns of each row are real.
    """

    inputs: dict[str, torch.Tensor]  # model-ready tensors (input_ids, attention_mask, pixel_values, ...)
    position_ids: torch.Tensor  # what the family's positional encoding takes: (B, T), or (3, B, T) for M-RoPE
    visual_positions: torch.Tensor  # (B, N_max) sequence index of every visual token of the image, row-major
    query_positions: list[list[int]]  # per sample: the last token of each user turn
    geometries: list[Geometry]  # how each original image maps onto its own grid
    images: list[Image.Image] = field(default_factory=list)  # the original RGB images (for cropping)
    conversations: list[list[str]] = field(default_factory=list)  # the texts the prompts were made from
    # Cache of the adapter's input_embeddings: the vision tower runs once per batch, however many stages
    # (RoI prediction, decoding) use it.
    embeddings: torch.Tensor | None = field(default=None, repr=False)
    # Stage 1's frozen layers over this prompt: stage 2 continues from them instead of computing them again.
    prefix: PrefixState | None = field(default=None, repr=False)
    # Answers already decoded from exactly this prompt (raw attention's first pass): a sample that gets no crop
    # keeps its answer instead of decoding it again.
    decoded: torch.Tensor | None = field(default=None, repr=False)
    # Per sample, which of its image's own visual tokens stage 2 keeps when a crop is added ((N_i,) bool, None: all):
    # the released Qwen2.5-VL pruning of high-resolution images (`RoiSettings.prune_above`).
    visual_keep: list[torch.Tensor | None] | None = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return len(self.query_positions)

    @property
    def grids(self) -> list[tuple[int, int]]:
        return [(g.grid_height, g.grid_width) for g in self.geometries]

    @property
    def visual_counts(self) -> list[int]:
        return [h * w for h, w in self.grids]

    def row_keep(self, index: int) -> torch.Tensor | None:
        """(T_i,) bool over sample `index`'s unpadded prompt: False on the image tokens stage 2 drops (None: none)."""
        if self.visual_keep is None or self.visual_keep[index] is None:
            return None
        real = self.inputs["attention_mask"][index].bool()
        keep = torch.ones(int(real.sum()), dtype=torch.bool)
        columns = self.visual_positions[index, : self.visual_counts[index]].cpu() - int((~real).sum())
        keep[columns] = self.visual_keep[index].cpu()
        return keep

    def per_sample(self, values: torch.Tensor) -> list[torch.Tensor]:
        """(B, N_max, ...) values over the visual tokens -> each sample's (H_i, W_i, ...) grid."""
        return [values[i, : h * w].reshape(h, w, *values.shape[2:]) for i, (h, w) in enumerate(self.grids)]


@dataclass
class PrefixState:
    """What the first `layers` decoder layers computed over a batch's prompts, in the batch's own (left-padded)
    layout: the hidden states they output and their keys/values (a transformers `Cache`; None when the family
    does not keep them). Layers 0..B-1 are frozen and causal, so for the tokens before the crop ([system, image])
    stage 2 would compute exactly these again."""

    layers: int
    hidden: torch.Tensor  # (B, T, D) after `layers` layers, no norm
    cache: object | None = None  # transformers Cache holding layers 0..layers-1 over the T columns


@dataclass
class AnswerRow:
    """One sample's stage-2 input, unpadded: embeddings and positions (whatever shape the family's rotary
    embedding takes, sequence last), and how many leading tokens are the prompt's own (same embeddings, same
    positions), whose keys/values stage 1 may already hold."""

    embeds: torch.Tensor  # (T_i, D)
    positions: torch.Tensor  # (T_i,) or (P, T_i)
    shared: int


def unchanged_prefix(keep: torch.Tensor | None, shared: int) -> int:
    """How many of a row's leading `shared` prompt tokens stay where they were once the tokens `keep` marks False
    are dropped: those before the first dropped one."""
    if keep is None or bool(keep[:shared].all()):
        return shared
    return int((~keep[:shared]).nonzero()[0, 0])


def pad_visual_positions(positions: list[torch.Tensor]) -> torch.Tensor:
    """Per-sample visual positions of different lengths -> (B, N_max), padded with each row's last position."""
    longest = max(len(p) for p in positions)
    return torch.stack([torch.cat([p, p[-1:].expand(longest - len(p))]) for p in positions])


@dataclass
class CropTokens:
    """One crop for stage 2: all its visual tokens, their grid, and which of them are kept.

    The adapter inserts the crop with the family's own markers and positions; masked-out tokens are
    removed after positions are assigned, so kept tokens keep their 2-D positions (masked upscaling)."""

    features: torch.Tensor  # (h * w, D) in the LLM's input space, row-major
    grid: tuple[int, int]  # (h, w)
    keep: torch.Tensor | None = None  # (h * w,) bool; None: every token is kept

    def __post_init__(self) -> None:
        h, w = self.grid
        if self.features.shape[0] != h * w:
            raise ValueError(f"crop of grid {h} x {w} has {self.features.shape[0]} tokens")
        if self.keep is not None and self.keep.shape != (h * w,):
            raise ValueError(f"keep mask of shape {tuple(self.keep.shape)} for a {h} x {w} crop")

    @property
    def kept(self) -> int:
        return self.features.shape[0] if self.keep is None else int(self.keep.sum())

    def kept_features(self) -> torch.Tensor:
        return self.features if self.keep is None else self.features[self.keep.to(self.features.device)]


@dataclass(frozen=True)
class AttentionShape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int


@dataclass(frozen=True)
class FamilyDefaults:
    """Settings the family (or a recognised checkpoint of it) brings; explicit user choices override them.

    `label_head_sets` names alternative label heads (e.g. Qwen2.5-VL's "text-rich" and "natural"); each name
    may carry its own sink heads in `sink_head_sets` (released code: none for the text-rich lists)."""

    label_heads: LayerHeads
    frozen_layers: int  # B
    rpn_layers: int  # R
    sink_rule: str = "norm"
    sink_heads: LayerHeads | None = None
    sink_threshold: float = 1e-3
    prompt_style: str = "chat_template"  # how prompts are written: the checkpoint's template, or a family style
    rpn_final_norm: bool = False  # a copy of the final norm in the RPN's head (the released LLaVA RPN)
    learning_rate: float = 5e-5  # released RPN training (LLaVA-1.5); Qwen2.5-VL 1e-4
    effective_batch: int = 512  # samples per update (gradient accumulation fills it); Qwen2.5-VL 128
    label_queries: str = "answer"  # the generated tokens only (released); "prompt+answer" adds the prefill row
    head_weighting: str = "head"  # every listed (layer, head) weighs the same (released); "layer": per layer
    roi: RoiSettings = field(default_factory=RoiSettings)
    task_tau: dict[str, float] = field(default_factory=dict)  # released per-benchmark RoI thresholds (`--task`)
    label_head_sets: dict[str, LayerHeads] = field(default_factory=dict)
    sink_head_sets: dict[str, LayerHeads | None] = field(default_factory=dict)
    # Resolution of families that choose it per image (Qwen2.5-VL): the pixel budget for answering, and the one
    # square budget labels and RPN training use.
    min_pixels: int | None = None
    max_pixels: int | None = None
    label_pixels: int | None = None
    # ViCrop's base window side in original-image pixels (its official code: 336 for LLaVA-1.5, 224 for Qwen2.5-VL);
    # None: the model's own input side
    vicrop_window_px: int | None = None

    def with_head_set(self, name: str) -> FamilyDefaults:
        """The defaults with the named label heads (and their sink heads) in place."""
        if name not in self.label_head_sets:
            known = ", ".join(sorted(self.label_head_sets)) or "none for this model"
            raise SdrpnError(f"unknown label head set {name!r} (known: {known})")
        sinks = self.sink_head_sets.get(name, self.sink_heads)
        rule = self.sink_rule if sinks or self.sink_rule == "norm" else "none"
        return replace(self, label_heads=self.label_head_sets[name], sink_heads=sinks, sink_rule=rule)


@dataclass(frozen=True)
class KnownCheckpoint:
    """A released checkpoint, recognised by its architecture and shapes (not by its folder's name), and the
    settings the paper used for it."""

    name: str
    signature: dict  # config values that identify it, as `config_signature` reads them
    defaults: FamilyDefaults


class FamilyAdapter(ABC):
    """One MLLM family. Subclasses set `model_types`, `known_checkpoints` and implement the abstract methods."""

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    known_checkpoints: ClassVar[tuple[KnownCheckpoint, ...]] = ()

    def __init__(self, model: nn.Module, processor, name_or_path: str):
        self.model = model
        self.processor = processor
        self.name_or_path = name_or_path

    # --- loading -------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        dtype: torch.dtype | None = None,
        device: str | None = None,
        revision: str | None = None,
        **options,
    ):
        """Load model + processor from a hub name (at `revision`, a branch, tag or commit) or a local directory;
        `options` are family settings (e.g. min_pixels / max_pixels), and a family refuses options it lacks."""

    # --- defaults ------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def config_signature(cls, config) -> dict:
        """The config values (architecture + shapes) that identify a checkpoint of this family."""

    @classmethod
    def recognise(cls, config) -> KnownCheckpoint | None:
        """The known checkpoint whose signature this config has, if any (a copy in any folder matches)."""
        signature = cls.config_signature(config)
        return next((known for known in cls.known_checkpoints if known.signature == signature), None)

    @abstractmethod
    def generic_defaults(self) -> FamilyDefaults:
        """Defaults for a model of this family that is no known checkpoint."""

    def defaults(self) -> FamilyDefaults:
        known = self.recognise(self.model.config)
        return known.defaults if known is not None else self.generic_defaults()

    # --- prompts -------------------------------------------------------------------------------
    @abstractmethod
    def prepare(
        self, images: list[Image.Image], conversations: list[list[str]], *, training: bool = False
    ) -> PromptBatch:
        """Tokenise prompts. A conversation alternates user/assistant texts and ends with a user turn; the
        image belongs to the first user turn. `training=True` lays the image out as labels and RPN training
        see it (families whose resolution varies train at one fixed grid)."""

    # --- layers --------------------------------------------------------------------------------
    @property
    @abstractmethod
    def decoder_layers(self) -> nn.ModuleList:
        """The LLM's decoder layers, in order."""

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
        """Apply the family's positional rotation to the RPN's q (B, H, Q, D) and k (B, H_kv, N_max, D).

        Identity by default: LLaVA's RPN compares q/k without RoPE, as the released models do."""
        return q, k

    @abstractmethod
    def run_layers(self, hidden: torch.Tensor, batch: PromptBatch, layers: list[nn.Module]) -> torch.Tensor:
        """Run `layers` on hidden states (B, T, D) of `batch`; returns the last layer's output (no norm)."""

    def prefix_hidden(self, batch: PromptBatch, num_layers: int) -> torch.Tensor:
        """Hidden states (B, T, D) after the first `num_layers` decoder layers (no final norm)."""
        return self.run_layers(self.input_embeddings(batch), batch, list(self.decoder_layers)[:num_layers])

    def prefix_state(self, batch: PromptBatch, num_layers: int) -> PrefixState:
        """Stage 1's frozen layers over the prompt, kept on the batch for stage 2. By default only the hidden
        states (stage 2 then computes the whole prompt again); the stock layout keeps their keys/values too."""
        batch.prefix = PrefixState(num_layers, self.prefix_hidden(batch, num_layers))
        return batch.prefix

    @torch.no_grad()
    def run_prompts_sharing_prefix(
        self, batches: list[PromptBatch], num_layers: int, around_rest: Callable[[torch.Tensor], ContextManager]
    ) -> None:
        """Run the first `num_layers` layers over several prompts about the same images, each prompt wrapped in
        `around_rest(its visual positions)`. By default prompt by prompt; the stock layout runs the prefix the
        prompts share once."""
        layers = list(self.decoder_layers)[:num_layers]
        for batch in batches:
            with around_rest(batch.visual_positions):
                self.run_layers(self.input_embeddings(batch), batch, layers)

    @torch.no_grad()
    def reprompt(self, batch: PromptBatch, conversations: list[list[str]]) -> PromptBatch:
        """The same images with other texts. Their visual tokens are copied from `batch`, so the vision tower
        does not run again (ViCrop asks two more prompts about each image)."""
        other = self.prepare(batch.images, conversations)
        source = self.input_embeddings(batch)
        embeds = self.model.get_input_embeddings()(other.inputs["input_ids"])
        rows = torch.arange(batch.size, device=embeds.device)[:, None]
        embeds[rows, other.visual_positions] = source[rows, batch.visual_positions.to(embeds.device)].to(embeds.dtype)
        other.embeddings = embeds
        return other

    def use_prompt_style(self, style: str) -> None:
        """Write prompts in this style from now on (a family that has only its chat template refuses others)."""
        if style != "chat_template":
            raise SdrpnError(f"{self.family} prompts are written with the checkpoint's chat template, not {style!r}")

    @abstractmethod
    def input_parameters(self, frozen_layers: int) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of every weight the hidden states after `frozen_layers` layers depend on."""

    @contextmanager
    @abstractmethod
    def text_attention(self, implementation: str) -> Iterator[None]:
        """Switch the LLM's attention implementation inside the block (the vision tower is untouched)."""

    # --- images and generation -----------------------------------------------------------------
    @abstractmethod
    def input_size(self, geometry: Geometry) -> tuple[int, int]:
        """(width, height) in pixels of what the vision tower saw for an image of this geometry."""

    @abstractmethod
    def encode_crops(
        self, crops: list[Image.Image], *, stretch: bool = False
    ) -> tuple[list[CropTokens], list[Geometry]]:
        """Visual tokens of each crop image as stage 2 feeds them, and how each lies on its grid. `stretch`
        resizes a crop to a fixed-size input without keeping its aspect (the released LLaVA stage 2); families
        whose input follows the aspect ratio ignore it."""

    @abstractmethod
    def input_embeddings(self, batch: PromptBatch) -> torch.Tensor:
        """Embeddings (B, T, D) of the prompt with the image's visual tokens in place (cached on the batch)."""

    @abstractmethod
    def generate(
        self,
        batch: PromptBatch,
        crops: list[list[CropTokens]] | None = None,
        max_new_tokens: int = 128,
        logits_processor=None,
    ) -> torch.Tensor:
        """Greedy-decode; the crops of sample i go right after its image tokens, in order. `logits_processor`
        (a transformers `LogitsProcessorList`) may steer decoding, e.g. to a given answer.
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

    def middle_band_defaults(self, **overrides) -> FamilyDefaults:
        """The middle-band rule (`middle_band`) for this model's depth."""
        return middle_band(self.attention_shape.num_layers, **overrides)


def middle_band(num_layers: int, **overrides) -> FamilyDefaults:
    """All heads of the middle band of layers [L//4, L//2] for labels, B = L/2 - 1, R = 3.

    The middle band is where MLLMs localise best (paper, Fig. 3 and TwigVLM); it needs no hand-picking,
    which does not transfer between models anyway."""
    frozen = max(1, num_layers // 2 - 1)
    return FamilyDefaults(
        label_heads={layer: None for layer in range(num_layers // 4, num_layers // 2 + 1)},
        frozen_layers=frozen,
        rpn_layers=max(1, min(3, num_layers - frozen)),
        **overrides,
    )
