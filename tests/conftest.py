"""Shared fixtures: tiny random LLaVA models of the real transformers classes, built offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdrpn.models import wrap_model
from sdrpn.models.tiny import TinyLlavaSpec, build_tiny_llava

WORDS = "what colour is the object square red green blue where top left".split()
QUESTIONS = ["what colour is the object ?", "where is the square ?", "what is red ?"]


@pytest.fixture(scope="session")
def tiny_model():
    """(model, processor) of a 6-layer tiny LLaVA, 4x4 visual tokens."""
    torch.manual_seed(0)
    return build_tiny_llava(TinyLlavaSpec(words=WORDS), seed=1)


@pytest.fixture(scope="session")
def adapter(tiny_model):
    model, processor = tiny_model
    return wrap_model(model, processor, "tiny-llava")


@pytest.fixture(scope="session")
def model_dir(tiny_model, tmp_path_factory) -> Path:
    """The tiny model saved like a hub checkpoint (config.json, safetensors, processor files)."""
    directory = tmp_path_factory.mktemp("tiny-llava")
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
