"""sdrpn: Self-Distilled Region Proposal Networks for Hugging Face multimodal LLMs (arXiv 2509.16944)."""

from sdrpn.errors import SdrpnError

__version__ = "0.1.0"
__all__ = ["SdrpnError", "load"]


def load(*args, **kwargs):
    """`sdrpn.load(model=..., rpn=...)` -> `sdrpn.infer.Zoom` (imported lazily: torch loads on first use)."""
    from sdrpn.infer import load as _load

    return _load(*args, **kwargs)
