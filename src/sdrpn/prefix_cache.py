"""The B frozen layers' output for each training sample, computed once and kept on disk.

The RPN's input (vision tower, projector, embeddings, layers 0..B-1) never trains, so an epoch after the first
can read it instead of computing it and run only the R layers. A cache folder holds `prefix_cache.json` (what
the entries were computed with: the base model's shapes and weights digest, B, dtype) and one safetensors file
per sample with the hidden states of its real (unpadded) tokens, read through a memory map and written
atomically. A folder computed for another model, B or dtype is refused; an entry whose prompt changed (other
question, template or token count) or whose image changed (other pixels under the same name) is computed again.

Size: tokens x hidden size x bytes per value per sample, e.g. about 5 MB for LLaVA-1.5-7B in bf16 (600 x 4096 x 2).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from sdrpn.distributed import decided_by_main
from sdrpn.errors import SdrpnError
from sdrpn.files import atomic_write, atomic_write_json
from sdrpn.models.base import FamilyAdapter, PromptBatch
from sdrpn.rpn import weights_digest

MANIFEST_NAME = "prefix_cache.json"
FORMAT = 1


class PrefixCache:
    """Hidden states after the first `frozen_layers` layers of `adapter`, by sample, in `directory`."""

    def __init__(self, directory: str | Path, adapter: FamilyAdapter, frozen_layers: int):
        self.directory = Path(directory)
        self.adapter = adapter
        self.frozen_layers = frozen_layers
        self.identity = {
            "format": FORMAT,
            "model_type": adapter.model.config.model_type,
            "fingerprint": adapter.fingerprint(),
            "weights_digest": weights_digest(adapter, frozen_layers),
            "frozen_layers": frozen_layers,
            "dtype": str(adapter.dtype).removeprefix("torch."),
        }
        decided_by_main(self._open)

    def _open(self) -> None:
        """Create the folder, or check that it was computed with this model, B and dtype."""
        if self.directory.exists() and not self.directory.is_dir():
            raise SdrpnError(f"--cache-prefix '{self.directory}' is a file, not a folder")
        manifest = self.directory / MANIFEST_NAME
        if manifest.is_file():
            try:
                found = json.loads(manifest.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError):
                found = None
            if found != self.identity:
                raise SdrpnError(
                    f"prefix cache '{self.directory}' was computed for another base model, B or dtype; "
                    "use another --cache-prefix folder or delete this one"
                )
            return
        if self.directory.is_dir() and any(self.directory.iterdir()):
            raise SdrpnError(f"--cache-prefix '{self.directory}' is a folder of other files; give an empty or new one")
        atomic_write_json(manifest, self.identity)

    def prefix(self, batch: PromptBatch, sample_ids: list[str]) -> torch.Tensor:
        """(B, T, D) hidden states after the frozen layers for `batch`, whose rows are the samples `sample_ids`:
        read when every row is cached, else computed (without gradient) and the missing rows stored."""
        mask = batch.inputs["attention_mask"].bool()
        keys = [
            self._key(sample_id, batch.inputs["input_ids"][row][mask[row]], batch.images[row])
            for row, sample_id in enumerate(sample_ids)
        ]
        stored = [self._read(key) for key in keys]
        if all(hidden is not None for hidden in stored):
            padded = stored[0].new_zeros(batch.size, mask.shape[1], stored[0].shape[-1])
            for row, hidden in enumerate(stored):
                padded[row, mask[row].cpu()] = hidden
            return padded.to(self.adapter.device)
        with torch.no_grad():
            hidden = self.adapter.prefix_hidden(batch, self.frozen_layers)
        for row, key in enumerate(keys):
            if stored[row] is None:
                self._write(key, hidden[row][mask[row]])
        return hidden

    def _key(self, sample_id: str, token_ids: torch.Tensor, image: Image.Image) -> str:
        """An entry's name: the sample, the exact prompt tokens and the image's pixels it was computed from (an image
        file replaced under the same name is computed again)."""
        digest = hashlib.sha256(sample_id.encode())
        digest.update(token_ids.cpu().to(torch.int64).numpy().tobytes())
        digest.update(f"{image.mode}{image.size}".encode())
        digest.update(image.tobytes())
        return digest.hexdigest()[:32]

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def _read(self, key: str) -> torch.Tensor | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt", device="cpu") as entry:
                return entry.get_tensor("hidden")
        except (SafetensorError, OSError):  # damaged outside sdrpn (writes are atomic): computed again
            return None

    def _write(self, key: str, hidden: torch.Tensor) -> None:
        tensor = {"hidden": hidden.detach().contiguous().cpu()}
        atomic_write(self._path(key), lambda file: file.write(save(tensor, metadata={"format": "pt"})))
