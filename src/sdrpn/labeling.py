"""Pseudo-label generation (paper 3.2): the frozen MLLM answers, its attention becomes labels.

Labels are cached on disk in shards written atomically; a re-run skips the samples already done, and an
interrupted run (Ctrl-C, or the launcher stopping a multi-process run) first writes what it finished, so it
loses at most the batch in flight. Several processes share the work:

    accelerate launch --multi_gpu --num_processes 4 -m sdrpn.cli label --model M --data D --out LABELS

Each record keeps the raw map, the token norms and the sink map too, so label settings (and the ablations that
regress raw attention) can change without decoding again.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from sdrpn.attention import HEAD_WEIGHTINGS, QUERIES, teacher_attention
from sdrpn.data import Sample
from sdrpn.distributed import decided_by_main, run_state, terminate_as_interrupt
from sdrpn.errors import SdrpnError
from sdrpn.files import atomic_write, atomic_write_json, clean_stale_temporaries
from sdrpn.images import load_image
from sdrpn.labels import assign_labels, remove_sinks, remove_sinks_by_attention
from sdrpn.models.base import FamilyAdapter, LayerHeads

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one writer per folder is then the user's to keep
    fcntl = None

SETTINGS_NAME = "label_settings.json"
LOCK_NAME = ".lock"
SINK_RULES = ("norm", "attention", "none")
ANSWER_SOURCES = ("model", "dataset")


@dataclass
class LabelSettings:
    """How attention becomes labels. `None` fields take the adapter's defaults for the model (see
    `FamilyAdapter.defaults`); `label_heads` may also name one of the model's head sets ("text-rich")."""

    label_heads: dict[int, list[int] | None] | str | None = None  # layer -> heads (None = all), or a set's name
    sink_rule: str | None = None  # "norm" (paper), "attention" (released code) or "none"
    norm_layer: int | None = None  # layer whose input hidden states give token norms (default: first label layer)
    tau_norm: float | None = None  # None: median + 5 MAD of each image's norms
    sink_heads: dict[int, list[int] | None] | None = None  # for sink_rule="attention" (default: the model's)
    sink_threshold: float | None = None
    fg: float = 0.2
    bg: float = 0.1
    max_box_frac: float = 0.5
    max_new_tokens: int = 128
    queries: str | None = None  # "answer" (the generated tokens, released) or "prompt+answer" (+ the prefill row)
    head_weighting: str | None = None  # "head" (every listed head alike, released) or "layer" (mean of layer means)
    prompt_style: str | None = None  # how prompts are written (default: the model's); training and answers follow
    answers: str = "model"  # "model": its own greedy answers (the paper's); "dataset": the data's answers (ablation)

    def __post_init__(self) -> None:
        if self.sink_rule is not None and self.sink_rule not in SINK_RULES:
            raise SdrpnError(f"sink_rule must be one of {SINK_RULES}, got {self.sink_rule!r}")
        if self.queries is not None and self.queries not in QUERIES:
            raise SdrpnError(f"queries must be one of {QUERIES}, got {self.queries!r}")
        if self.answers not in ANSWER_SOURCES:
            raise SdrpnError(f"answers must be one of {ANSWER_SOURCES}, got {self.answers!r}")
        if self.head_weighting is not None and self.head_weighting not in HEAD_WEIGHTINGS:
            raise SdrpnError(f"head_weighting must be one of {HEAD_WEIGHTINGS}, got {self.head_weighting!r}")
        if not isinstance(self.label_heads, str):
            self.label_heads = _int_keys(self.label_heads)
        self.sink_heads = _int_keys(self.sink_heads)

    def resolved(self, adapter: FamilyAdapter) -> LabelSettings:
        """Fill model-dependent defaults, so the cache and the RPN record what was really used."""
        defaults = adapter.defaults()
        if isinstance(self.label_heads, str):
            defaults = defaults.with_head_set(self.label_heads)
        label_heads = self.label_heads if isinstance(self.label_heads, dict) and self.label_heads else None
        label_heads = label_heads or defaults.label_heads
        sink_rule = self.sink_rule or defaults.sink_rule
        sink_heads = self.sink_heads or defaults.sink_heads
        if sink_rule == "attention" and not sink_heads:
            raise SdrpnError("the attention sink rule needs sink heads, and this model has none by default")
        num_layers = adapter.attention_shape.num_layers
        num_heads = adapter.attention_shape.num_heads
        for kind, layers in (("label", label_heads), ("sink", sink_heads or {})):
            for layer, heads in layers.items():
                if not 0 <= layer < num_layers:
                    raise SdrpnError(f"{kind} layer {layer} does not exist (the model has {num_layers} layers)")
                for head in heads or []:
                    if not 0 <= head < num_heads:
                        raise SdrpnError(f"{kind} head {layer}:{head} does not exist (layers have {num_heads} heads)")
        norm_layer = self.norm_layer if self.norm_layer is not None else min(label_heads)
        threshold = self.sink_threshold if self.sink_threshold is not None else defaults.sink_threshold
        return LabelSettings(
            **{
                **asdict(self),
                "label_heads": label_heads,
                "sink_rule": sink_rule,
                "sink_heads": sink_heads if sink_rule == "attention" else None,
                "sink_threshold": threshold,
                "norm_layer": norm_layer,
                "queries": self.queries or defaults.label_queries,
                "head_weighting": self.head_weighting or defaults.head_weighting,
                "prompt_style": self.prompt_style or getattr(adapter, "prompt_style", "chat_template"),
            }
        )

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def _int_keys(mapping: dict | None) -> dict[int, list[int] | None] | None:
    return None if mapping is None else {int(k): (list(v) if v is not None else None) for k, v in mapping.items()}


def denoise(raw: torch.Tensor, norms: torch.Tensor | None, sinks: torch.Tensor | None, settings: LabelSettings):
    """Sink removal by the configured rule (paper eq. 1, or the released attention rule)."""
    if settings.sink_rule == "norm" and norms is not None:
        return remove_sinks(raw, norms, settings.tau_norm)
    if settings.sink_rule == "attention" and sinks is not None:
        return remove_sinks_by_attention(raw, sinks, settings.sink_threshold)
    return raw


def make_labels(raw: torch.Tensor, norms, sinks, settings: LabelSettings) -> torch.Tensor:
    """One sample's raw RoI map (H, W) -> labels in {-1, 0, 1} (paper eq. 1-2)."""
    return assign_labels(denoise(raw, norms, sinks, settings), settings.fg, settings.bg, settings.max_box_frac)


@dataclass
class LabelReport:
    labelled: int = 0
    skipped_done: int = 0
    bad: list[str] = field(default_factory=list)
    dropped: int = 0  # labelled, but the foreground box was too large: all ignored

    @classmethod
    def total(cls, reports: list[LabelReport]) -> LabelReport:
        """The whole run's report from every process's own (samples already done are counted once)."""
        return cls(
            labelled=sum(r.labelled for r in reports),
            skipped_done=reports[0].skipped_done,
            bad=[reason for r in reports for reason in r.bad],
            dropped=sum(r.dropped for r in reports),
        )


class LabelCache:
    """A folder of `shard-NNNNN-<random>.pt` files (lists of records) plus the settings that made them.

    One writer at a time holds the folder's lock; shard names cannot collide, and readers keep the first
    record of a sample id, so even a folder two runs once wrote into reads without duplicates."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def shards(self) -> list[Path]:
        return sorted(self.directory.glob("shard-*.pt"))

    def records(self) -> Iterable[dict]:
        seen: set[str] = set()
        for shard in self.shards():
            for record in torch.load(shard, weights_only=True):
                if record["sample_id"] not in seen:
                    seen.add(record["sample_id"])
                    yield record

    def done_ids(self) -> set[str]:
        return {record["sample_id"] for record in self.records()}

    def settings(self) -> dict:
        path = self.directory / SETTINGS_NAME
        if not path.is_file():
            raise SdrpnError(f"'{self.directory}' is not a label folder: no {SETTINGS_NAME}")
        return json.loads(path.read_text())

    def start(
        self,
        model: str,
        settings: LabelSettings,
        data: str | None = None,
        *,
        force: bool = False,
        image_root: str | Path | None = None,
    ) -> None:
        """Create the folder, or check that a resumed run uses the same model, settings and data file (`data` is
        its fingerprint); `force` accepts another data file (e.g. one with lines added). `image_root` is recorded
        so that training opens only images inside it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        meta = {"model": model, "settings": settings.to_json(), "data": data}
        if image_root is not None:
            meta["image_root"] = str(image_root)
        path = self.directory / SETTINGS_NAME
        if path.is_file():
            existing = json.loads(path.read_text())
            if {**existing, "data": None} != {**meta, "data": None}:
                raise SdrpnError(f"'{self.directory}' holds labels made with other settings or model; use a new --out")
            if data is None or existing.get("data") in (None, data):
                return
            if not force:
                raise SdrpnError(
                    f"'{self.directory}' holds labels of another data file; use a new --out, or --force to add "
                    "this file's samples (samples already labelled are skipped by their id)"
                )
        atomic_write_json(path, meta)

    def write_shard(self, records: list[dict]) -> Path:
        index = len(self.shards())
        path = self.directory / f"shard-{index:05d}-{secrets.token_hex(4)}.pt"
        atomic_write(path, lambda file: torch.save(records, file))
        return path

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder for one writer; a second run says who holds it and stops (POSIX file locks)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / LOCK_NAME
        with open(path, "a+") as handle:
            if fcntl is not None:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.seek(0)
                    holder = handle.read().strip() or "another process"
                    raise SdrpnError(
                        f"'{self.directory}' is being written by {holder}; wait for it or use another --out"
                    ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
            handle.flush()
            try:
                yield
            finally:
                handle.seek(0)
                handle.truncate()
                if fcntl is not None:
                    fcntl.flock(handle, fcntl.LOCK_UN)


def _answer_ids(adapter: FamilyAdapter, samples: list[Sample]) -> list[list[int]]:
    """The data's answers as the model's tokens, each ending with EOS (what the model is made to say)."""
    eos = adapter.eos_token_ids[0]
    return [adapter.tokenizer(s.answer.strip(), add_special_tokens=False)["input_ids"] + [eos] for s in samples]


def _record(sample: Sample, index: int, output) -> dict:
    """One sample's labels and what made them; every map is on the sample's own grid (recorded too)."""
    raw = output.roi_maps[index].to(torch.float32).cpu()
    norms = None if output.norms is None else output.norms[index].cpu()
    sinks = None if output.sink_maps is None else output.sink_maps[index].cpu()
    return {
        "sample_id": sample.sample_id,
        "image": str(sample.image_path),
        "question": sample.question,
        "answer": output.answers[index],
        "grid": list(raw.shape),
        "raw_map": raw,
        "norms": norms,
        "sink_map": sinks,
    }


def generate_labels(
    adapter: FamilyAdapter,
    samples: list[Sample],
    out_dir: str | Path,
    settings: LabelSettings | None = None,
    *,
    batch_size: int = 4,
    shard_size: int = 256,
    progress: bool = True,
    open_image: Callable = load_image,
    data: str | None = None,
    force: bool = False,
    image_root: str | Path | None = None,
) -> LabelReport:
    """Label `samples` into `out_dir`; resumable, and bad samples are counted, not fatal.

    `open_image(sample.image_path)` gives the RGB image; replace it for images that are not files. `data` is
    the data file's fingerprint: a resume with another file is refused unless `force`.

    Launched on several processes (`accelerate launch`, `torchrun`), the main process holds the folder and
    finds what is left to do; every process labels its own share into its own shards, and the report that
    every process returns counts them all."""
    settings = (settings or LabelSettings()).resolved(adapter)
    adapter.use_prompt_style(settings.prompt_style)
    state = run_state()
    if state.num_processes > 1:
        adapter.model.to(state.device)
    cache = LabelCache(out_dir)
    with ExitStack() as held:

        def open_folder() -> set[str]:
            held.enter_context(cache.lock())
            clean_stale_temporaries(cache.directory, ["shard-*.pt", SETTINGS_NAME], min_age=0)  # left by a kill
            cache.start(adapter.name_or_path, settings, data, force=force, image_root=image_root)
            return cache.done_ids()

        done = decided_by_main(open_folder)
        todo = [s for s in samples if s.sample_id not in done]
        with state.split_between_processes(todo) as share, terminate_as_interrupt():
            report = _label_share(adapter, cache, share, settings, batch_size, shard_size, open_image, progress)
        report.skipped_done = len(samples) - len(todo)
        return LabelReport.total(gather_object([report])) if state.num_processes > 1 else report


def _label_share(
    adapter: FamilyAdapter,
    cache: LabelCache,
    todo: list[Sample],
    settings: LabelSettings,
    batch_size: int,
    shard_size: int,
    open_image: Callable,
    progress: bool,
) -> LabelReport:
    """Label this process's samples; finished records are written even when the run is interrupted."""
    report = LabelReport()
    pending: list[dict] = []
    bar = tqdm(total=len(todo), desc="labels", unit="sample", disable=not progress or not run_state().is_main_process)
    try:
        for start in range(0, len(todo), batch_size):
            chunk, images = [], []
            for sample in todo[start : start + batch_size]:
                if settings.answers == "dataset" and not (sample.answer or "").strip():
                    report.bad.append(f"{sample.sample_id}: no answer in the data (labels from the data's answers)")
                    continue
                try:
                    images.append(open_image(sample.image_path))
                    chunk.append(sample)
                except SdrpnError as error:
                    report.bad.append(f"{sample.sample_id}: {error}")
            if chunk:
                pending.extend(_label_chunk(adapter, chunk, images, settings, report))
            if len(pending) >= shard_size:
                cache.write_shard(pending)
                pending = []
            bar.update(len(todo[start : start + batch_size]))
    finally:
        if pending:
            cache.write_shard(pending)
        bar.close()
    return report


def _label_chunk(
    adapter: FamilyAdapter, chunk: list[Sample], images: list, settings: LabelSettings, report: LabelReport
) -> list[dict]:
    """One batch through the teacher: its records, with labels."""
    batch = adapter.prepare(images, [[s.question] for s in chunk], training=True)
    output = teacher_attention(
        adapter,
        batch,
        settings.label_heads,
        max_new_tokens=settings.max_new_tokens,
        norm_layer=settings.norm_layer if settings.sink_rule == "norm" else None,
        sink_heads=settings.sink_heads if settings.sink_rule == "attention" else None,
        queries=settings.queries,
        head_weighting=settings.head_weighting,
        forced_answers=_answer_ids(adapter, chunk) if settings.answers == "dataset" else None,
    )
    records = []
    for index, sample in enumerate(chunk):
        record = _record(sample, index, output)
        labels = make_labels(record["raw_map"], record["norms"], record["sink_map"], settings)
        record["labels"] = labels.to(torch.int8)
        records.append(record)
        report.dropped += bool((labels == -1).all())
    report.labelled += len(chunk)
    return records


def label_heads_from_text(text: str) -> LayerHeads | str:
    """Parse '14:24,13,26;15' -> {14: [24, 13, 26], 15: None} (a layer without heads = all heads); a word
    such as 'text-rich' names one of the model's head sets."""
    if re.fullmatch(r"[A-Za-z][\w-]*", text.strip()):
        return text.strip()
    result: LayerHeads = {}
    try:
        for part in filter(None, (p.strip() for p in text.split(";"))):
            layer, _, heads = part.partition(":")
            result[int(layer)] = [int(h) for h in heads.split(",")] if heads.strip() else None
    except ValueError:
        raise SdrpnError(f"cannot parse layer/heads {text!r}; expected e.g. '14:24,13,26;15'") from None
    return result
