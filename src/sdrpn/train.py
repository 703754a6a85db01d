"""Self-distillation of the RPN from a label folder (paper 3.3, Algorithm 1).

One process:            sdrpn train --model M --labels LABELS --out RPN
Several GPUs, one node: accelerate launch --multi_gpu --num_processes 4 -m sdrpn.cli train --model M --labels ...
(or torchrun --nproc-per-node 4 -m sdrpn.cli train ...; without a GPU the processes meet over gloo on the CPU)

Only the RPN's R layers train; the B frozen layers run under no_grad, so they keep no activations and gradient
checkpointing them would save nothing; `--cache-prefix` stores their output so later epochs skip them. The loss is
BCE-with-logits on the labelled tokens only (0 when a sample has none). AdamW (0.9, 0.98), no weight decay, cosine
schedule with 3% warm-up, gradient clipping. `--resume` continues from the last step checkpoint in the output
folder: one file (`OUT/resume.pt`, written atomically, read without unpickling code) holding the RPN, optimiser,
schedule, step and the run's identity (settings, data); a resume with other settings or data is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from sdrpn.distributed import run_state
from sdrpn.errors import SdrpnError
from sdrpn.files import atomic_write, clean_stale_temporaries
from sdrpn.images import load_image
from sdrpn.labeling import LabelCache, LabelSettings, make_labels
from sdrpn.models.base import FamilyAdapter
from sdrpn.prefix_cache import PrefixCache
from sdrpn.rpn import CONFIG_NAME, WEIGHTS_NAME, RegionProposalNetwork, RpnConfig, check_base

TARGETS = ("labels", "labels-no-sinks", "raw-mse")
PRECISIONS = ("auto", "bf16", "fp16", "no")
STATE_NAME = "resume.pt"


@dataclass
class TrainSettings:
    frozen_layers: int | None = None  # B (None: the adapter's default for the model)
    rpn_layers: int | None = None  # R
    learning_rate: float | None = None  # None: the family's released value (LLaVA-1.5 5e-5, Qwen2.5-VL 1e-4)
    batch_size: int = 8
    grad_accumulation: int | None = None  # None: reach the family's released effective batch (512 / 128)
    epochs: float = 1.0
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_samples: int | None = None  # seeded random subset (the paper's 10K setting)
    seed: int = 0
    save_every: int = 0  # batches between resumable checkpoints, taken at whole updates (0: only at the end)
    mixed_precision: str = "auto"  # "auto" (bf16 on GPU, as released), "bf16", "fp16" (GPU only) or "no"
    target: str = "labels"  # "labels" (paper), "labels-no-sinks", "raw-mse" (ablations)
    final_norm: bool | None = None  # a copy of the final norm in the RPN (None: the family's default)

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise SdrpnError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.mixed_precision not in PRECISIONS:
            raise SdrpnError(f"mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}")
        if self.batch_size < 1 or (self.learning_rate is not None and self.learning_rate <= 0) or self.epochs <= 0:
            raise SdrpnError("batch_size, learning_rate and epochs must be positive")
        if self.grad_accumulation is not None and self.grad_accumulation < 1:
            raise SdrpnError("grad_accumulation must be at least 1")


def masked_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits over tokens labelled 0/1; ignored (-1) tokens do not count; 0 when none."""
    keep = labels >= 0
    if not bool(keep.any()):
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[keep], labels[keep].to(logits.dtype))


def masked_mse(logits: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """The ablation that regresses the (max-normalised) raw attention map directly; padding columns
    (beyond a sample's grid) hold -1 and do not count."""
    keep = raw >= 0
    target = raw.clamp(min=0) / raw.amax(-1, keepdim=True).clamp(min=1e-12)
    return F.mse_loss(torch.sigmoid(logits)[keep], target[keep])


def training_targets(records: list[dict], settings: LabelSettings, target: str, grids: list[tuple[int, int]]):
    """Per-record targets (B, N_max), padded with -1 (ignored) beyond each sample's grid: the cached labels,
    labels re-derived without sink removal, or the raw maps themselves (the paper's ablation ladder: raw MSE
    -> + label assignment -> + sink removal). A record made on another grid than the model gives now (other
    resolution settings, or another model) is refused."""
    for record, grid in zip(records, grids):
        made = tuple(record["raw_map"].shape)
        if made != tuple(grid):
            raise SdrpnError(
                f"sample {record['sample_id']!r} was labelled on a {made[0]} x {made[1]} token grid but the model "
                f"now gives {grid[0]} x {grid[1]}; re-run `sdrpn label` with this model and resolution"
            )
    if target == "labels":
        maps = [r["labels"].long() for r in records]
    elif target == "raw-mse":
        maps = [r["raw_map"].float() for r in records]
    else:
        no_sinks = LabelSettings(**{**asdict(settings), "sink_rule": "none"})
        maps = [make_labels(r["raw_map"], None, None, no_sinks).long() for r in records]
    longest = max(m.numel() for m in maps)
    padded = maps[0].new_full((len(maps), longest), -1)
    for row, values in enumerate(maps):
        padded[row, : values.numel()] = values.flatten()
    return padded


def load_records(label_dir: str | Path, max_samples: int | None, seed: int) -> tuple[list[dict], LabelSettings, str]:
    cache = LabelCache(label_dir)
    meta = cache.settings()
    records = sorted(cache.records(), key=lambda r: r["sample_id"])
    if not records:
        raise SdrpnError(f"label folder '{label_dir}' holds no labelled samples")
    if meta.get("image_root"):  # shards are files a user may be handed: their paths are checked again
        root = Path(meta["image_root"])
        for record in records:
            if not Path(record["image"]).resolve().is_relative_to(root):
                raise SdrpnError(
                    f"label folder '{label_dir}': sample {record['sample_id']!r} names image {record['image']!r}, "
                    f"outside the image root '{root}' it was labelled from"
                )
    random.Random(seed).shuffle(records)
    if max_samples is not None:
        records = records[:max_samples]
    return records, LabelSettings(**meta["settings"]), meta["model"]


def train_rpn(
    adapter: FamilyAdapter,
    label_dir: str | Path,
    out_dir: str | Path,
    settings: TrainSettings | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    max_steps: int | None = None,
    open_image: Callable = load_image,
    prefix_cache: str | Path | None = None,
) -> RegionProposalNetwork:
    """Train an RPN for `adapter` on the labels in `label_dir`; checkpoints go to `out_dir`.

    `open_image(record["image"])` gives the RGB image, as in labelling. `prefix_cache`: a folder that keeps the
    frozen layers' output of every sample (`sdrpn.prefix_cache`), so epochs after the first run only the RPN."""
    settings = settings or TrainSettings()
    records, label_settings, _ = load_records(label_dir, settings.max_samples, settings.seed)
    if label_settings.prompt_style:  # the RPN learns on the prompts the labels were made with
        adapter.use_prompt_style(label_settings.prompt_style)
    out_dir = Path(out_dir)
    state_path = out_dir / STATE_NAME
    clean_stale_temporaries(out_dir, [STATE_NAME, WEIGHTS_NAME, CONFIG_NAME])  # older than a minute: left by a kill
    state = _read_state(state_path) if resume and state_path.is_file() else None
    defaults = adapter.defaults()
    frozen = settings.frozen_layers or defaults.frozen_layers
    depth = settings.rpn_layers or defaults.rpn_layers
    if state is not None:
        config = RpnConfig(**json.loads(state["rpn_config"]))
        check_base(config, adapter, state_path)
        rpn = RegionProposalNetwork(adapter, config.frozen_layers, config.rpn_layers, config)
        rpn.load_state_dict_checked(state["rpn"])
    else:
        rpn = RegionProposalNetwork(adapter, frozen, depth, final_norm=settings.final_norm)
    rpn.config.label_settings = label_settings.to_json()
    rpn.float().train()
    for parameter in adapter.model.parameters():
        parameter.requires_grad_(False)

    precision = settings.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if precision == "fp16" and run_state().device.type == "cpu":
        raise SdrpnError("fp16 mixed precision needs a GPU (this run is on the CPU); use bf16 or no")
    processes = run_state().num_processes  # each process takes its own slice of every global batch
    settings, total_batches = _schedule(settings, defaults, len(records), processes, max_steps)
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=settings.grad_accumulation)
    optimizer = torch.optim.AdamW(
        [p for p in rpn.parameters() if p.requires_grad],
        lr=settings.learning_rate,
        betas=(0.9, 0.98),
        weight_decay=settings.weight_decay,
    )
    total_updates = total_batches // settings.grad_accumulation
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(settings.warmup_ratio * total_updates), total_updates)
    cache = PrefixCache(prefix_cache, adapter, rpn.frozen_layers) if prefix_cache else None
    rpn, optimizer = accelerator.prepare(rpn, optimizer)  # the schedule counts updates itself (below)
    adapter.model.to(accelerator.device)

    identity = _run_identity(settings, records, label_settings, total_batches, (frozen, depth))
    start = 0
    if state is not None:
        if json.loads(state["identity"]) != identity:
            raise SdrpnError(
                f"'{state_path}' belongs to a run with other settings or data; resume with the same options, "
                "or train into a new --out"
            )
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = int(state["batch"])
    order = [
        i for epoch in range(math.ceil(settings.epochs)) for i in _epoch_order(len(records), settings.seed + epoch)
    ]
    loss_fn = masked_mse if settings.target == "raw-mse" else masked_bce
    progress = progress and accelerator.is_main_process
    bar = tqdm(total=total_batches, initial=start, desc="train rpn", unit="batch", disable=not progress)
    for batch_index in range(start, total_batches):
        begin = ((batch_index * processes + accelerator.process_index) * settings.batch_size) % len(order)
        chosen = [records[order[(begin + j) % len(order)]] for j in range(settings.batch_size)]
        images = [open_image(r["image"]) for r in chosen]
        batch = adapter.prepare(images, [[r["question"]] for r in chosen], training=True)
        targets = training_targets(chosen, label_settings, settings.target, batch.grids).to(accelerator.device)
        with accelerator.accumulate(rpn):
            with accelerator.autocast():  # as inside the RPN's own forward, so a cached prefix is the same
                prefix = cache.prefix(batch, [r["sample_id"] for r in chosen]) if cache else None
            logits, _ = rpn(batch, prefix)
            loss = loss_fn(logits[:, 0], targets)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(rpn.parameters(), settings.max_grad_norm)
            optimizer.step()
            if accelerator.sync_gradients:
                scheduler.step()
            optimizer.zero_grad()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = batch_index + 1
        whole_update = done % settings.grad_accumulation == 0  # a checkpoint never holds half-accumulated gradients
        if settings.save_every and done % settings.save_every == 0 and whole_update and done < total_batches:
            _save(accelerator, rpn, optimizer, scheduler, state_path, done, identity)
    bar.close()
    _save(accelerator, rpn, optimizer, scheduler, state_path, total_batches, identity)
    final = accelerator.unwrap_model(rpn)
    if accelerator.is_main_process:
        final.save(out_dir, **_training_record(settings, len(records), total_batches))
    accelerator.wait_for_everyone()  # every process returns once the checkpoint is there
    return final.eval()


def _epoch_order(count: int, seed: int) -> list[int]:
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return order


def _training_record(settings: TrainSettings, samples: int, batches: int) -> dict:
    return {"settings": asdict(settings), "samples": samples, "batches": batches}


def _schedule(settings: TrainSettings, defaults, samples: int, processes: int, max_steps: int | None):
    """Resolve the learning rate and accumulation (the family's released values unless set) and the number of
    batches: one pass per epoch, at most `max_steps` updates, and whole updates only (accumulation never exceeds
    the run, so a small data set still takes at least one step)."""
    steps_per_epoch = math.ceil(samples / (settings.batch_size * processes))
    batches = max(1, int(steps_per_epoch * settings.epochs))
    accumulation = settings.grad_accumulation
    if accumulation is None:
        accumulation = max(1, min(math.ceil(defaults.effective_batch / (settings.batch_size * processes)), batches))
    if max_steps is not None:
        batches = min(batches, max_steps * accumulation)
    batches = math.ceil(batches / accumulation) * accumulation
    resolved = replace(
        settings, learning_rate=settings.learning_rate or defaults.learning_rate, grad_accumulation=accumulation
    )
    return resolved, batches


def _run_identity(settings: TrainSettings, records: list[dict], labels: LabelSettings, batches: int, depth) -> dict:
    """What a resumed run must share with the one it continues: settings, schedule length and the data."""
    chosen = {k: v for k, v in asdict(settings).items() if k != "save_every"}
    ids = hashlib.sha256("\n".join(sorted(r["sample_id"] for r in records)).encode()).hexdigest()[:16]
    return {"settings": chosen, "batches": batches, "depth": list(depth), "samples": ids, "labels": labels.to_json()}


def _read_state(path: Path) -> dict:
    """A resume file, loaded without running any code from it (tensors and plain values only)."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # pickle errors for code in the file, zip errors for a truncated one
        raise SdrpnError(
            f"'{path}' is not a training state sdrpn wrote ({' '.join(str(error).split())[:160]})"
        ) from None
    needed = {"rpn", "rpn_config", "optimizer", "scheduler", "batch", "identity"}
    if not isinstance(state, dict) or not needed <= set(state):
        raise SdrpnError(f"'{path}' is not a training state sdrpn wrote (missing parts)")
    return state


def _save(accelerator, rpn, optimizer, scheduler, path: Path, batch: int, identity: dict) -> None:
    """One resumable checkpoint in ONE file, written atomically: its pieces cannot come from different steps."""
    if not accelerator.is_main_process:
        return
    network = accelerator.unwrap_model(rpn)
    state = {
        "rpn": {name: tensor.detach().cpu() for name, tensor in network.state_dict().items()},
        "rpn_config": json.dumps(asdict(network.config)),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "batch": batch,
        "identity": json.dumps(identity, sort_keys=True),
    }
    atomic_write(path, lambda file: torch.save(state, file))
