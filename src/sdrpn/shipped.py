"""Names of the models that ship inside the package: `toy` (a LLaVA) and `toy-qwen` (a Qwen2.5-VL), each with
its self-distilled RPN.

`sdrpn.load(model="toy", rpn="toy")`, `sdrpn ask --model toy --rpn toy` and the bench all resolve a
shipped name here, through the installed package (never the working directory)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

SHIPPED = {"toy": "weights", "toy-qwen": "weights_qwen"}  # name -> folder under sdrpn/toyworld: mllm/ and rpn/


def shipped_dir(kind: str, name: str = "toy") -> Path:
    """The folder of a shipped model's `mllm` or its `rpn`."""
    return Path(str(resources.files("sdrpn.toyworld") / SHIPPED[name] / kind))


def resolve(name_or_path: str | None, kind: str) -> str | None:
    """A shipped name -> its folder; anything else (hub name, path, None) unchanged."""
    if isinstance(name_or_path, str) and name_or_path in SHIPPED:
        return str(shipped_dir(kind, name_or_path))
    return name_or_path


def shipped_name(path: str | Path) -> str | None:
    """The shipped name of a folder, if it is one (recorded in RPN configs instead of an install path)."""
    for name in SHIPPED:
        if Path(path).resolve() == shipped_dir("mllm", name).resolve():
            return name
    return None
