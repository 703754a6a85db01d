"""`lmms-eval --model sdrpn`: sdrpn's answers inside the harness the paper's tables come from, with no fork.

lmms-eval (0.6.1 and later) reads models from the `lmms_eval.models` entry-point group; sdrpn's
pyproject.toml points it at `manifest`. Every request is answered by `Zoom.ask_batch`, so a score here is a
score of exactly what `sdrpn ask` answers:

    lmms-eval --model sdrpn --model_args model=llava-hf/llava-1.5-7b-hf,rpn=rpn-llava7b/,task=textvqa \\
              --tasks textvqa_val --batch_size 1 --log_samples --output_path results/
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from lmms_eval import utils
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm

from sdrpn.cli import DTYPES, check_output_file
from sdrpn.errors import SdrpnError

if TYPE_CHECKING:
    from sdrpn.infer import ZoomResult


def manifest():
    """What the `lmms_eval.models` entry point gives lmms-eval: `--model sdrpn` is `SdrpnLmms`. A function, so that
    importing this module never imports `lmms_eval.models`, whose own import loads the entry points (and so
    this module) again."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="sdrpn", simple_class_path=f"{__name__}.{SdrpnLmms.__name__}")


def process_device(device: str | None) -> str | None:
    """In a multi-process run (`accelerate launch`, torchrun) each process answers on its own GPU,
    cuda:LOCAL_RANK, whatever single `--device` the command line gave; a CPU run stays on the CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or str(device) == "cpu":
        return device
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def question_text(context: str) -> str:
    """The task's prompt without lmms-eval's `<image>` placeholders: sdrpn places the image itself, through
    the model's own prompt format."""
    return context.replace("<image>", "").strip()


def single_image(visuals: list | None, task: str, doc_id: int):
    """The document's one image (what `doc_to_visual` gives); sdrpn answers about exactly one."""
    count = 0 if visuals is None else len(visuals)
    if count != 1:
        raise SdrpnError(f"{task} document {doc_id} has {count} images; sdrpn answers about exactly one")
    return visuals[0]


def generation_limits(generation: dict) -> dict:
    """`Zoom.ask_batch` keywords from a task's `generation_kwargs`: its `max_new_tokens` and `until` stop
    strings; decoding stays greedy whatever else it asks."""
    if generation.get("do_sample") or float(generation.get("temperature") or 0) > 0:
        warnings.warn("sdrpn decodes greedily; the task's sampling settings are ignored", stacklevel=2)
    until = generation.get("until") or []
    until = [until] if isinstance(until, str) else until
    limits = {"stop": [s for s in until if s]}
    if generation.get("max_new_tokens") is not None:
        limits["max_new_tokens"] = _positive_int(generation["max_new_tokens"], "max_new_tokens")
    return limits


def _positive_int(value, name: str) -> int:
    """lmms-eval hands numbers over as int, float or str (`--batch_size 4`, YAML `max_new_tokens: 16`)."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number != float(value) or number < 1:
        raise SdrpnError(f"{name} must be a positive integer for sdrpn, got {value!r}")
    return number


class SdrpnLmms(lmms):
    """An sdrpn `Zoom` as an lmms-eval `generate_until` model: one image per document, greedy decoding."""

    is_simple = True

    def __init__(
        self,
        model: str | None = None,
        pretrained: str | None = None,
        rpn: str | None = None,
        method: str | None = None,
        upscale: str = "mask",
        tau: float | None = None,
        task: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,  # lmms-eval passes it; batches here are exactly --batch_size
        roi_log: str | None = None,
        prune: bool = True,
        vicrop_high_res: bool = False,
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            known = [name for name in inspect.signature(SdrpnLmms).parameters if name != "unknown"]
            raise SdrpnError(f"unknown model_args for sdrpn: {', '.join(sorted(unknown))} (known: {', '.join(known)})")
        if model is not None and pretrained is not None and str(model) != str(pretrained):
            raise SdrpnError(f"model={model} and pretrained={pretrained} disagree: give one of them")
        name = model if model is not None else pretrained
        if name is None:
            raise SdrpnError("sdrpn needs model_args model=NAME_OR_PATH (or pretrained=...), e.g. model=toy,rpn=toy")
        for option, flag in (("prune", prune), ("vicrop_high_res", vicrop_high_res)):
            if not isinstance(flag, bool):
                raise SdrpnError(f"{option} must be True or False, got {flag!r}")
        if dtype is not None and dtype not in DTYPES:
            raise SdrpnError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.batch_size_per_gpu = _positive_int(batch_size, "batch_size")
        self._rank = int(os.environ.get("RANK", "0"))
        self._world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.roi_log = self._start_roi_log(roi_log)
        from sdrpn.infer import load  # transformers loads with the model, not when lmms-eval lists its models

        self.zoom = load(
            model=str(name),
            rpn=None if rpn is None else str(rpn),
            method=method,
            upscale=upscale,
            tau=tau,
            task=task,
            dtype=getattr(torch, dtype) if dtype else None,
            device=process_device(device),
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            prune=prune,
            vicrop_high_res=vicrop_high_res,
        )

    def _start_roi_log(self, path: str | None) -> Path | None:
        """A fresh JSONL file (one per process in a multi-process run), appended to batch by batch."""
        if path is None:
            return None
        check_output_file(str(path), "roi_log")
        target = Path(path)
        if self._world_size > 1:
            target = target.with_name(f"{target.stem}.rank{self._rank}{target.suffix}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("")
        return target

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return torch.device(self.zoom.adapter.device)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Requests sharing generation settings are answered `--batch_size` at a time, in lmms-eval's order."""
        collator = utils.Collator([request.args for request in requests], lambda args: -len(args[0]), grouping=True)
        answers = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="sdrpn answering")
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, generation = [args[0] for args in chunk], chunk[0][1]
            images = [
                single_image(show(self.task_dict[task][split][doc]), task, doc) for *_, show, doc, task, split in chunk
            ]
            results = self.zoom.ask_batch(images, [question_text(c) for c in contexts], **generation_limits(generation))
            self._log(chunk, results)
            for context, result in zip(contexts, results):
                answers.append(result.answer)
                self.cache_hook.add_partial("generate_until", (context, generation), result.answer)
            progress.update(len(chunk))
        progress.close()
        return collator.get_original(answers)

    def _log(self, chunk, results: list[ZoomResult]) -> None:
        """Per sample: where it looked, what that cost (extra visual tokens, seconds), what it answered."""
        if self.roi_log is None:
            return
        with self.roi_log.open("a", encoding="utf-8") as log:
            for args, result in zip(chunk, results):
                record = {"task": args[4], "doc_id": args[3], **result.to_json()}
                record.pop("roi_map")
                log.write(json.dumps(record) + "\n")

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise SdrpnError("sdrpn answers by generating: tasks scored by log-likelihood are not supported")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise SdrpnError("sdrpn answers one question per image: multi-round tasks are not supported")
