"""Bridges to the tools the field evaluates with; each needs its own optional extra (`sdrpn[lmms-eval]`)."""
