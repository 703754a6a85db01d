"""Shared fixtures: tiny random models of the real transformers classes (LLaVA-1.5, Qwen2.5-VL, DeepSeek-VL and its
hybrid), built offline.

Tests that take `adapter` run once per family; none may assume one family's token count or grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdrpn.models import wrap_model
from sdrpn.models.tiny import (
    TinyDeepseekSpec,
    TinyLlavaSpec,
    TinyQwenSpec,
    build_tiny_deepseek,
    build_tiny_llava,
    build_tiny_qwen,
)

WORDS = "what colour is the object square red green blue where top left".split()
QUESTIONS = ["what colour is the object ?", "where is the square ?", "what is red ?"]


FAMILIES = ("llava", "qwen", "deepseek", "deepseek-hybrid")
# DeepSeek-VL at 96 px (6 x 6 tokens; SAM at 256 px) keeps the family tests fast; tests/test_deepseek.py runs the
# real 384 px / 1024 px input end to end.
SMALL_DEEPSEEK = {"image_size": 96, "high_res_size": 256}


def build_tiny(family: str, seed: int = 1, **sizes):
    """(model, processor): a 6-layer LLaVA with 4x4 visual tokens, a Qwen2.5-VL of the 3B layout (36 layers,
    16 heads, 2 KV heads) whose grids follow each image's aspect ratio (up to 6 x 6 tokens), or a DeepSeek-VL of
    the 1.3B layout (24 layers x 16 heads) or the 7B hybrid's (30 x 32, with the SAM branch), 6 x 6 tokens."""
    torch.manual_seed(0)
    if family == "llava":
        return build_tiny_llava(TinyLlavaSpec(words=WORDS, **sizes), seed=seed)
    if family == "qwen":
        return build_tiny_qwen(TinyQwenSpec(words=WORDS, **sizes), seed=seed)
    sizes = {**SMALL_DEEPSEEK, **sizes, "words": WORDS}
    spec = TinyDeepseekSpec(**sizes) if family == "deepseek" else TinyDeepseekSpec.seven_b(**sizes)
    return build_tiny_deepseek(spec, seed=seed)


@pytest.fixture(scope="session", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_model(family):
    return build_tiny(family)


@pytest.fixture(scope="session")
def adapter(tiny_model, family):
    model, processor = tiny_model
    return wrap_model(model, processor, f"tiny-{family}")


@pytest.fixture(scope="session")
def llava_adapter():
    """For the few tests about LLaVA's own layout (its chat template, its fixed square grid)."""
    model, processor = build_tiny("llava")
    return wrap_model(model, processor, "tiny-llava")


@pytest.fixture(scope="session")
def model_dir(tiny_model, tmp_path_factory) -> Path:
    """The tiny model saved like a hub checkpoint (config.json, safetensors, processor files)."""
    directory = tmp_path_factory.mktemp("tiny-model")
    model, processor = tiny_model
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def random_images(count: int, seed: int = 0, size=(100, 80)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture()
def image_folder(tmp_path) -> Path:
    """A folder of 10 images and a JSONL of questions about them."""
    lines = []
    for index, image in enumerate(random_images(10, seed=3)):
        image.save(tmp_path / f"{index}.png")
        lines.append(json.dumps({"image": f"{index}.png", "question": QUESTIONS[index % 3]}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models run faster on one thread than with two threads fighting over a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def extended_inputs(inputs: dict, new_ids: torch.Tensor) -> dict:
    """A prepared batch's model inputs with token ids appended to every row (for stock-forward references)."""
    extended = dict(inputs)
    extended["input_ids"] = torch.cat([inputs["input_ids"], new_ids], 1)
    extended["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(new_ids)], 1)
    if "mm_token_type_ids" in inputs:
        extended["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(new_ids)], 1).int()
    return extended
