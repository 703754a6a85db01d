"""sdrpn: Self-Distilled Region Proposal Networks for Hugging Face multimodal LLMs (arXiv 2509.16944)."""

__version__ = "0.1.0"
