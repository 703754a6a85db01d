"""Pseudo-labels for the RPN from a teacher's noisy RoI attention map (paper section 3.2).

Why: the raw response->image attention is noisy. Sink tokens (huge hidden-state norm) soak up attention
without meaning, so they are zeroed first. The remaining map is only trustworthy at its extremes
(a >= 0.2 a_max is mostly on the object, a <= 0.1 a_max mostly off it), so only those tokens get a label;
the ambiguous middle band and the non-foreground tokens inside the foreground's box (inactivated parts
of the object) are ignored (-1), and a sample whose foreground box covers half the image is dropped.

Shapes: a "sample" is one image's tokens, as a grid (H, W) or a flat sequence (N,); a leading batch
dimension gives (B, H, W) or (B, N). A 2-D tensor is read as one (H, W) grid unless `batched=True`.
Empty tensors are valid: they give empty results (a sample without tokens has a NaN sink threshold, like
an all-NaN one, so nothing is removed). Settings must be finite real numbers in range, else SdrpnError.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from sdrpn.errors import SdrpnError

__all__ = [
    "assign_labels",
    "label_stats",
    "remove_sinks",
    "remove_sinks_by_attention",
    "sink_threshold",
]

# With MAD == 0 (over half the tokens share one norm) or a near-constant sample, the spread used by the
# outlier rule is floored at this fraction of |median|: a token must then exceed the common norm by
# mad_k * 0.1% of it to count as a sink, so float jitter never makes one.
MAD_FLOOR_REL = 1e-3


def _real(value: object) -> float | None:
    """`value` as a float if it is a real number (bools, strings, None, tensors are not), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except OverflowError:  # an int beyond the float range
        return math.inf if value > 0 else -math.inf
    except (TypeError, ValueError):
        return None


def _finite(value: object, name: str, minimum: float | None = None) -> float:
    """A finite real setting (>= minimum when given), else SdrpnError naming it. Python ints and floats
    come back as they are (so comparisons with tensors behave as before), other reals as floats."""
    number = _real(value)
    if number is None or not math.isfinite(number) or (minimum is not None and number < minimum):
        bound = f" >= {minimum:g}" if minimum is not None else ""
        raise SdrpnError(f"{name} must be a finite number{bound}, got {value!r}")
    return value if isinstance(value, (int, float)) else number  # type: ignore[return-value]


def _check_tensor(x: object, name: str, *, real: bool = True) -> Tensor:
    if not isinstance(x, Tensor):
        raise SdrpnError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if real and x.is_complex():
        raise SdrpnError(f"{name} must be real, got dtype {x.dtype}")
    return x


def _is_batched(x: Tensor, batched: bool | None, name: str) -> bool:
    """Whether `x` has a leading batch dim, by the module's shape convention (see module docstring)."""
    if batched is not None and not isinstance(batched, bool):
        raise SdrpnError(f"batched must be True, False or None, got {batched!r}")
    if batched is None:
        if x.ndim in (1, 2):
            return False
        if x.ndim == 3:
            return True
    elif batched and x.ndim in (2, 3):
        return True
    elif not batched and x.ndim in (1, 2):
        return False
    raise SdrpnError(
        f"{name}: expected shape (N,), (H, W), (B, N) or (B, H, W), got {tuple(x.shape)} (batched={batched})"
    )


def _check_same_shape(a: Tensor, b: Tensor, a_name: str, b_name: str) -> None:
    _check_tensor(a, a_name, real=False)
    _check_tensor(b, b_name)
    if a.shape != b.shape:
        raise SdrpnError(f"{a_name} and {b_name} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def sink_threshold(norms: Tensor, mad_k: float = 5.0, *, batched: bool | None = None) -> Tensor:
    """Per-sample automatic tau_norm: median + mad_k * MAD of the sample's token norms.

    MAD is the raw median absolute deviation (not scaled by 1.4826), floored at MAD_FLOOR_REL * |median|
    (and at the dtype's eps) so that a constant sample flags nothing but a clear outlier. The median is
    the lower median; NaN norms are ignored (an all-NaN or empty sample gets a NaN threshold, which flags
    nothing). A threshold beyond the dtype's range is inf. Returns a 0-d tensor for one sample, shape (B,)
    for a batch.
    """
    mad_k = _finite(mad_k, "mad_k", minimum=0)
    _check_tensor(norms, "norms")
    is_batched = _is_batched(norms, batched, "norms")
    x = norms.to(torch.promote_types(norms.dtype, torch.float32))
    x = x.flatten(1) if is_batched else x.reshape(1, -1)  # (B, T)
    if x.shape[1] == 0:  # no tokens: no median (nanmedian would raise), as for an all-NaN sample
        thr = torch.full((x.shape[0],), math.nan, dtype=x.dtype, device=x.device)
        return thr if is_batched else thr[0]
    median = x.nanmedian(dim=1, keepdim=True).values  # (B, 1)
    mad = (x - median).abs().nanmedian(dim=1, keepdim=True).values
    floor = (MAD_FLOOR_REL * median.abs()).clamp_min(torch.finfo(x.dtype).eps)
    thr = (median + mad_k * torch.maximum(mad, floor)).squeeze(1)  # (B,)
    return thr if is_batched else thr[0]


def remove_sinks(
    roi_map: Tensor,
    norms: Tensor,
    tau_norm: float | None = None,
    mad_k: float = 5.0,
    *,
    batched: bool | None = None,
) -> Tensor:
    """Paper eq. (1): a copy of `roi_map` with 0 where the token's hidden-state L2 norm > tau_norm.

    `tau_norm=None` uses `sink_threshold(norms, mad_k)` per sample. `batched` only matters then, to tell
    a (B, N) batch from an (H, W) grid.
    """
    _check_same_shape(roi_map, norms, "roi_map", "norms")
    if tau_norm is not None:
        return roi_map.masked_fill(norms > _finite(tau_norm, "tau_norm"), 0)
    thr = sink_threshold(norms, mad_k, batched=batched)
    if thr.ndim == 1:  # (B,) -> (B, 1, ...) to broadcast over the sample's tokens
        thr = thr.reshape(thr.shape[0], *([1] * (norms.ndim - 1)))
    # Compare in the threshold's dtype (at least float32): a 0-d threshold would otherwise be rounded to
    # half-precision norms' dtype, a (B, 1, ...) one not, and one sample would differ alone and in a batch.
    return roi_map.masked_fill(norms.to(thr.dtype) > thr, 0)


def remove_sinks_by_attention(roi_map: Tensor, sink_attention: Tensor, threshold: float = 1e-3) -> Tensor:
    """The released code's sink rule: 0 where the "sink heads" attend to the token with >= threshold.

    Their settings: 1e-3 for LLaVA-1.5 (layer 2, mean of all heads), 1e-2 for Qwen2.5-VL.
    """
    _check_same_shape(roi_map, sink_attention, "roi_map", "sink_attention")
    return roi_map.masked_fill(sink_attention >= _finite(threshold, "threshold"), 0)


def assign_labels(roi_map: Tensor, fg: float = 0.2, bg: float = 0.1, max_box_frac: float = 0.5) -> Tensor:
    """Paper eq. (2): int64 labels in {1 fg, 0 bg, -1 ignored}, same shape as the (H, W) or (B, H, W) map.

    Per sample, with a_max = max(map): 1 where a >= fg * a_max; 0 where a <= bg * a_max and the token is
    outside the minimal box around all fg tokens; -1 elsewhere. The whole sample is -1 (dropped) when the
    box covers >= max_box_frac of the grid's tokens or when a_max <= 0 (or NaN). An empty map gives empty labels.
    """
    fg_value, bg_value, frac = _real(fg), _real(bg), _real(max_box_frac)
    if fg_value is None or not 0 <= fg_value <= 1:
        raise SdrpnError(f"fg must be in [0, 1], got {fg!r}")
    if bg_value is None or not 0 <= bg_value <= fg_value:
        raise SdrpnError(f"bg must be in [0, fg={fg}], got {bg!r}")
    if frac is None or not 0 < frac <= 1:
        raise SdrpnError(f"max_box_frac must be in (0, 1], got {max_box_frac!r}")
    if not isinstance(fg, (int, float)) or not isinstance(bg, (int, float)):
        fg, bg = fg_value, bg_value  # e.g. numpy float32 or Fraction: compare as Python floats
    _check_tensor(roi_map, "roi_map")
    if roi_map.ndim not in (2, 3):
        raise SdrpnError(f"roi_map must be an (H, W) grid or a (B, H, W) batch, got shape {tuple(roi_map.shape)}")
    if roi_map.numel() == 0:  # no tokens (e.g. a (0, W) grid or an empty batch): nothing to label
        return torch.full(roi_map.shape, -1, dtype=torch.int64, device=roi_map.device)

    a = roi_map if roi_map.is_floating_point() else roi_map.float()
    a = a.unsqueeze(0) if a.ndim == 2 else a  # (B, H, W)
    _, h, w = a.shape
    a_max = a.amax(dim=(1, 2), keepdim=True)  # (B, 1, 1)
    is_fg = a >= fg * a_max
    is_low = a <= bg * a_max

    # Minimal box around the fg tokens: first/last row and column holding one (empty box if none).
    rows = torch.arange(h, device=a.device)
    cols = torch.arange(w, device=a.device)
    row_has, col_has = is_fg.any(dim=2), is_fg.any(dim=1)  # (B, H), (B, W)
    r0 = torch.where(row_has, rows, h).amin(dim=1)  # (B,)
    r1 = torch.where(row_has, rows, -1).amax(dim=1)
    c0 = torch.where(col_has, cols, w).amin(dim=1)
    c1 = torch.where(col_has, cols, -1).amax(dim=1)
    in_rows = (rows >= r0[:, None]) & (rows <= r1[:, None])  # (B, H)
    in_cols = (cols >= c0[:, None]) & (cols <= c1[:, None])  # (B, W)
    in_box = in_rows[:, :, None] & in_cols[:, None, :]  # (B, H, W)

    box_area = ((r1 - r0 + 1).clamp_min(0) * (c1 - c0 + 1).clamp_min(0)).double()
    dropped = (box_area / (h * w) >= frac) | ~(a_max.flatten() > 0)  # (B,)

    labels = torch.full(a.shape, -1, dtype=torch.int64, device=a.device)
    labels[is_low & ~in_box] = 0
    labels[is_fg] = 1
    labels[dropped] = -1
    return labels.reshape(roi_map.shape)


def label_stats(labels: Tensor) -> dict[str, int | bool]:
    """Counts for ONE sample's label map (any shape): fg, bg, ignored tokens, and dropped (all -1)."""
    _check_tensor(labels, "labels")
    if labels.ndim > 2:
        raise SdrpnError(f"label_stats takes one sample ((N,) or (H, W)), got shape {tuple(labels.shape)}")
    n_fg = int((labels == 1).sum())
    n_bg = int((labels == 0).sum())
    n_ignored = int((labels == -1).sum())
    if n_fg + n_bg + n_ignored != labels.numel():
        raise SdrpnError("labels must only hold -1, 0 or 1")
    return {"fg": n_fg, "bg": n_bg, "ignored": n_ignored, "dropped": n_ignored == labels.numel()}
