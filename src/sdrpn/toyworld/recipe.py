"""Train the embedded demo MLLM from scratch on the toy world (CPU: 25-35 min on 2 cores).

    python -m sdrpn.toyworld.recipe --out DIR --seed 0          # default DIR: toyworld/weights/mllm

The model is a real LLaVA (`build_tiny_llava`: 2-layer CLIP tower, 4-layer Llama, hidden 192, 2.3M
parameters, 4.6 MB in fp16; 112-px input = 7 x 7 visual tokens). It is a genuine base model: it sees
the whole scene at low resolution, and learns nothing about RPNs. Stages:

a. Vision pretraining (our stand-in for a pretrained CLIP): linear heads on every projected patch
   token predict the object colour / shape present in that patch (scenes and crops), the mark colour
   (crops only, where it is legible) and, on scene tokens, the object's 3 x 3 cell (the "where" probe,
   ``--where-weight``); positive and negative patches are averaged separately so the rare positive
   patches weigh as much as the empty ones.
b. The whole MLLM on question/answer pairs, from single scenes ("USER: <image>\\n{q} ASSISTANT:") and
   from scene + crop pairs ("USER: <image><image>\\n{q} ASSISTANT:", the crop's visual tokens right
   after the scene's, both at the same 112-px input - the sequence SD-RPN's second stage builds).
   Crops are mostly of the target (1.5x the object up to 3/8 of the scene side, some exactly
   centred, some jittered), sometimes of a wrong place or of another scene, and sometimes lose a
   random subset of the crop tokens that do not cover the target (masked upscaling keeps only the
   crop tokens under the RoI mask). Answers are the answer words + "</s>". The per-patch heads stay
   on as a small auxiliary loss.

Logged while training: accuracy per question type (scene only, oracle crop) and the attention-on-
target ratio per layer (eager attention; mean attention of a query position over the target's
visual tokens divided by its mean over all scene tokens; 1.0 = uniform) and how often the target holds
the top-1 token, for three query positions: the last prompt token (which predicts the answer; SD-RPN's
RPN query), the first answer token, and "teacher", the mean over every position that predicts an answer
token (the map SD-RPN's labels are made from; the toy's label layers are read off it, see
`sdrpn.toyworld.pipeline.label_layers_from_recipe`). ``--evaluate-only`` measures a saved model again.

Shipped run (``python -m sdrpn.toyworld.recipe --seed 0``, the defaults; 2099 s of training on 2 cores,
400 fresh samples per type): fine (mark colour) 16% from the scene alone (chance 20%) vs 98% with the
oracle crop; coarse 73% from the scene and 73% with the oracle crop; yes/no 99%. Teacher map on fine
questions, per layer: 12x / 2x / 18x / 2x uniform, top-1 token = target in 52% / 6% / 95% / 17% of scenes
(hence the toy's label layer 2).

Why these defaults:
- Crops off centre. With half of the target crops exactly centred (``--centred-frac 0.5 --shift-frac 0``),
  the model read a crop reliably only when the mark sat at its centre: RoI windows 0-10 px off the mark
  were read right 89% of the time (2-layer tower, seed 99). With 85% of the crops shifted (the mark up to
  30% of the side off centre) it is 92% on seed 99.
- The "where" probe at 0.6. Without it (``--where-weight 0 --crop-shape-whole 0`` are the earlier model's
  settings), the model answered "where is the object ?" from the place of the object's token in the
  sequence, and the crop tokens SD-RPN inserts after the scene's moved it: "where" fell from 88.9% to 83.3%
  with SD-RPN (seed 99), and SD-RPN lost 3.7 coarse points on seed 7. The probe puts the cell into the
  token's content. At 1.0 (seeds 0 and 1) "where" held, but the teacher map found the target less often
  (top-1 83-86% at the best layer) and SD-RPN read 51-72% of marks; at 0.3 "where" fell to 72%; 0.6 keeps
  both (docs/benchmarks.md, "What was tried").

Saves into DIR: ``config.json``/``model.safetensors`` (fp16 storage, reloads as fp32), the processor
files, ``recipe.json`` (arguments, seed, versions, metrics, wall time) and ``train.log``; a resumable
``checkpoint.pt`` lives in DIR/work/ while training.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.utils.constants import OPENAI_CLIP_MEAN

from sdrpn.files import atomic_write_json
from sdrpn.images import pad_to_square
from sdrpn.models.tiny import TinyLlavaSpec, build_tiny_llava
from sdrpn.toyworld import world as W

GRID = W.INPUT_SIZE // 16  # 7 x 7 visual tokens
N_TOK = GRID * GRID
DEFAULT_OUT = Path(__file__).parent / "weights" / "mllm"
CLIP_MEAN_RGB = tuple(int(round(255 * m)) for m in OPENAI_CLIP_MEAN)  # the adapter's pad colour


@dataclass
class RecipeArgs:
    seed: int = 0
    vision_steps: int = 1500  # stage a
    vision_batch: int = 32
    vision_lr: float = 1e-3
    steps: int = 4500  # stage b
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 100
    pair_frac: float = 0.55  # share of stage-b samples that are scene + crop pairs
    wrong_crop_frac: float = 0.2  # of pairs: crop of a place without the target
    other_scene_frac: float = 0.1  # of pairs: crop of another scene's target
    drop_frac: float = 0.3  # of target crops: drop a random part of the tokens off the target
    centred_frac: float = 0.15  # of the other target crops: exactly centred on the target (the rest shifted)
    shift_frac: float = 0.3  # > 0: shifted crops move the mark up to this fraction of the side off-centre
    grid_frac: float = 0.4  # of target crops: grid-aligned boxes, as an RoI on the scene's token grid gives
    pair_fine: float = 0.55  # question mix of scene + crop pairs: fine, coarse, the rest yes/no
    pair_coarse: float = 0.3
    aux_weight: float = 0.3  # per-patch heads during stage b
    where_weight: float = 0.6  # the per-patch "where" probe on scene tokens (0 = off)
    crop_shape_whole: int = 1  # 1: a crop token with any solid part of the shape is labelled with it; 0: only >= 25%
    multi_frac: float = 0.0  # share of scenes with 2-3 objects, the target named by its colour (binding)
    vision_lr_mult: float = 0.3  # stage-b learning rate of the vision tower + projector, relative to lr
    pool: int = 2000  # scenes held in memory; a quarter is re-rendered every refresh_every steps
    refresh_every: int = 200
    crops_per_scene: int = 3
    eval_every: int = 400
    eval_n: int = 96
    final_eval_n: int = 400
    threads: int = 2
    bf16: int = 1  # bf16 autocast for the forward passes of training (1.3x faster on CPU); weights stay fp32
    vision_hidden: int = 192
    text_hidden: int = 192
    text_layers: int = 4
    vision_layers: int = 2


# ----------------------------------------------------------------------------------------------
# data: scenes, crops, per-patch labels, token sequences


def _patch_fracs(mask_box, mask, box):
    """Per-token coverage (GRID x GRID) of a boolean mask placed at mask_box (scene px), seen through
    the crop ``box`` (scene px): (fraction of the mask's area, fraction of the token's area)."""
    mx0, my0, mx1, my1 = mask_box
    bx0, by0, bx1, by1 = box
    side = bx1 - bx0
    ys, xs = np.nonzero(mask)
    area = max(1, len(xs))
    # token index of every mask pixel centre
    tx = np.floor((xs + mx0 + 0.5 - bx0) / side * GRID).astype(int)
    ty = np.floor((ys + my0 + 0.5 - by0) / side * GRID).astype(int)
    ok = (tx >= 0) & (tx < GRID) & (ty >= 0) & (ty < GRID)
    counts = np.zeros((GRID, GRID), np.float32)
    np.add.at(counts, (ty[ok], tx[ok]), 1.0)
    tok_area = (side / GRID) ** 2
    return counts / area, counts / tok_area


WHERE_CELLS = [" ".join(w for w in (r, c) if w) or "centre" for r in W.ROWS for c in W.COLS]


def _object_labels(obj: W.SceneObject, box, is_crop: bool, crop_shape_whole: bool = True) -> np.ndarray:
    """(colour, shape, mark, where) labels per token for one object (see `patch_labels`)."""
    f_obj, t_obj = _patch_fracs(obj.box, W.shape_mask(obj.shape, obj.box[2] - obj.box[0]), box)
    on = (f_obj >= 0.25) | (t_obj >= 0.2)
    near = (f_obj > 0) & ~on  # a sliver of the object: ignored
    colour = np.where(on, 1 + W.OBJECT_COLOURS.index(obj.colour), 0)
    shape = np.where(on, 1 + W.SHAPES.index(obj.shape), 0)
    colour[near] = -100
    if is_crop and crop_shape_whole:  # a crop shows the whole shape over several tokens; attention can gather it
        shape[near] = -100
    else:  # a scene token with a sliver of the shape does not show which shape it is
        shape[near | (on & (f_obj < 0.25))] = -100
    if is_crop:
        mb = obj.mark_box
        f_m, _ = _patch_fracs(mb, np.ones((mb[3] - mb[1], mb[2] - mb[0]), bool), box)
        mark = np.where(f_m >= 0.2, 1 + W.MARK_COLOURS.index(obj.mark), 0)
        mark[(f_m > 0) & (f_m < 0.2)] = -100
        where = np.full((GRID, GRID), -100)
    else:
        mark = np.full((GRID, GRID), -100)
        where = np.where(on, 1 + WHERE_CELLS.index(obj.where), 0)
        where[near] = -100
    return np.stack([colour, shape, mark, where]).reshape(4, N_TOK)


def patch_labels(scene: W.Scene, box, is_crop: bool, crop_shape_whole: bool = True) -> np.ndarray:
    """(colour, shape, mark, where) labels per token of every object, 0 = none, -100 = ignored (also where
    two objects share a token). ``where`` (scenes only) is the object's 3 x 3 cell on the tokens that hold
    it: the answer to "where" then lives in the token's content, not only in its place in the sequence,
    which crop tokens inserted after the scene's shift."""
    per_object = np.stack([_object_labels(obj, box, is_crop, crop_shape_whole) for obj in scene.objects])
    positive = per_object > 0
    labels = np.where(positive.any(0), per_object.max(0), np.where((per_object == -100).any(0), -100, 0))
    labels[positive.sum(0) > 1] = -100
    return labels


def target_tokens(shape: str, target_box, box) -> np.ndarray:
    """Boolean per-token mask of the tokens that hold the target (same rule as the colour label)."""
    s = target_box[2] - target_box[0]
    f_obj, t_obj = _patch_fracs(target_box, W.shape_mask(shape, s), box)
    return ((f_obj >= 0.25) | (t_obj >= 0.2)).reshape(N_TOK)


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def grid_crop_box(target_box, size: int, rng: np.random.Generator):
    """The kind of box an RoI on the scene's token grid gives: the cells the target touches, sometimes one
    cell more on a random side; not square, and the target off-centre."""
    cell = size / GRID
    x0, y0, x1, y1 = target_box
    c0, r0 = int(x0 // cell), int(y0 // cell)
    c1, r1 = int(math.ceil(x1 / cell)), int(math.ceil(y1 / cell))
    if rng.random() < 0.3:
        side = int(rng.integers(4))
        c0, r0, c1, r1 = (
            [max(c0 - 1, 0), c0, c0, c0][side],
            [r0, max(r0 - 1, 0), r0, r0][side],
            [c1, c1, min(c1 + 1, GRID), c1][side],
            [r1, r1, r1, min(r1 + 1, GRID)][side],
        )
        r0, c0 = min(r0, r1 - 1), min(c0, c1 - 1)
    return tuple(int(round(v * cell)) for v in (c0, r0, c1, r1))


def padded_square(box) -> tuple[int, int, int, int]:
    """The square canvas (scene px) a non-square crop occupies once padded to square, centred as the
    adapter pads it: per-token labels of the crop are computed on this canvas."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0)
    left, top = x0 - (side - (x1 - x0)) // 2, y0 - (side - (y1 - y0)) // 2
    return (left, top, left + side, top + side)


def crop_input(image: Image.Image, box) -> Image.Image:
    """The crop as the model sees it: padded to square with the processor's mean colour, resized."""
    x0, y0, x1, y1 = box
    if x1 - x0 == y1 - y0:
        return W.to_input(image, box)
    return W.to_input(pad_to_square(image.crop(box), CLIP_MEAN_RGB))


def sample_crop_box(
    target_box,
    size: int,
    rng: np.random.Generator,
    kind: str,
    grid_frac: float = 0.0,
    centred_frac: float = 0.5,
    shift_frac: float = 0.0,
):
    """A crop box of the target ("target": some exactly centred, some grid-aligned like an RoI, the rest
    shifted) or of a place without it ("wrong"). ``shift_frac`` > 0: the target's centre (the mark) may
    sit up to that fraction of the side off the crop's centre, the object itself partly cut off, as an
    RoI window centred on an estimate puts it; 0: the whole target stays inside."""
    if kind == "target" and rng.random() < grid_frac:
        return grid_crop_box(target_box, size, rng)
    x0, y0, x1, y1 = target_box
    s = x1 - x0
    lo, hi = 1.5 * s, 3 * size / 8
    if rng.random() < 0.5:  # half of the crops tight (1.5-2.5x the object), the rest up to 3 scene tokens
        hi = min(hi, 2.5 * s)
    side = float(np.exp(rng.uniform(math.log(lo), math.log(hi))))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if kind == "target":
        if rng.random() >= centred_frac:  # jitter: the RoI of a coarse map is only roughly centred
            slack = shift_frac * side if shift_frac > 0 else max(0.0, min((side - s) / 2 - 1, side / 4))
            cx += rng.uniform(-slack, slack)
            cy += rng.uniform(-slack, slack)
        return W.square_box(cx, cy, side, size)
    for _ in range(50):
        box = W.square_box(*rng.uniform(0, size, 2), side, size)
        if not _overlap(box, target_box):
            return box
    return W.square_box(size - cx, size - cy, 1.5 * s, size)


def to_pixels(images: list[Image.Image], mean, std) -> torch.Tensor:
    """uint8 input-size images -> normalised pixel_values (as CLIPImageProcessorPil makes them)."""
    a = np.stack([np.asarray(im, np.float32) for im in images]) / 255.0
    a = (a - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(a.transpose(0, 3, 1, 2).copy())


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected visual tokens (B, N_TOK, D), CLS dropped, as LLaVA inserts them."""
    return torch.stack(list(model.get_image_features(pixel_values=pixel_values).pooler_output))


class Pool:
    """Scenes in memory at input resolution, with a few crops each and all labels; partly refreshed."""

    def __init__(
        self,
        n: int,
        crops: int,
        seed: int,
        grid_frac=0.0,
        centred_frac=0.5,
        shift_frac=0.0,
        multi_frac=0.0,
        crop_shape_whole=True,
    ):
        self.n, self.crops, self.grid_frac, self.multi_frac = n, crops, grid_frac, multi_frac
        self.crop_shape_whole = crop_shape_whole
        self.centred_frac, self.shift_frac = centred_frac, shift_frac
        self.rng = np.random.default_rng([seed, 7])
        self.next_seed = 1_000_000 * (seed + 1)
        self.items: list[dict] = [self._make() for _ in range(n)]

    def _make(self) -> dict:
        seed = self.next_seed
        self.next_seed += 1
        objects = 1 if self.rng.random() >= self.multi_frac else int(self.rng.integers(2, W.MAX_OBJECTS + 1))
        scene = W.render_scene(seed, objects=objects)
        full = (0, 0, scene.image.size[0], scene.image.size[1])
        item = {
            "scene": scene,
            "img": W.to_input(scene.image),
            "lab": patch_labels(scene, full, False),
            "crops": [],
        }
        kinds = ["target"] * (self.crops - 1) + ["wrong"]
        for kind in kinds:
            box = sample_crop_box(
                scene.target_box,
                scene.image.size[0],
                self.rng,
                kind,
                self.grid_frac,
                self.centred_frac,
                self.shift_frac,
            )
            canvas = padded_square(box)
            item["crops"].append(
                {
                    "kind": kind,
                    "box": box,
                    "img": crop_input(scene.image, box),
                    "lab": patch_labels(scene, canvas, True, self.crop_shape_whole),
                    "tgt": target_tokens(scene.shape, scene.target_box, canvas),
                }
            )
        scene.image = None  # keep memory small: the high-res scene is not needed any more
        return item

    def refresh(self, frac: float = 0.25) -> None:
        for i in self.rng.choice(self.n, int(self.n * frac), replace=False):
            self.items[int(i)] = self._make()


class Batcher:
    """Tokenises "USER: <image>[<image>]\\n{q} ASSISTANT:" + " {answer}</s>" with any number of image tokens."""

    def __init__(self, processor):
        self.tok = processor.tokenizer
        self.image_id = self.tok.convert_tokens_to_ids("<image>")
        self.eos = self.tok.eos_token_id
        self.pad = self.tok.pad_token_id
        self.mean = processor.image_processor.image_mean
        self.std = processor.image_processor.image_std
        self._cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._cache[text]

    def prompt(self, question: str, n_image_tokens: int) -> list[int]:
        head = self.ids("USER:")
        tail = self.ids("\n" + question + " ASSISTANT:")
        return head + [self.image_id] * n_image_tokens + tail

    def answer(self, answer: str) -> list[int]:
        return self.ids(answer) + [self.eos]


def build_batch(model, batcher: Batcher, examples: list[dict], with_answer: bool = True):
    """examples: dicts with scene_img, crop_img (or None), keep (bool[N_TOK] or None), question, answer.
    Returns inputs_embeds, attention_mask, labels (-100 off the answer), positions of the last prompt
    token, image-feature tensors (scene, crop) for the auxiliary heads."""
    scenes = to_pixels([e["scene_img"] for e in examples], batcher.mean, batcher.std)
    crop_idx = [i for i, e in enumerate(examples) if e["crop_img"] is not None]
    imgs = scenes
    if crop_idx:
        crops = to_pixels([examples[i]["crop_img"] for i in crop_idx], batcher.mean, batcher.std)
        imgs = torch.cat([scenes, crops])
    feats = image_features(model, imgs)  # (B + C, N_TOK, D)
    scene_f, crop_f = feats[: len(examples)], feats[len(examples) :]
    emb = model.get_input_embeddings()
    seqs, labs, lasts, vis = [], [], [], []
    for i, e in enumerate(examples):
        parts = [scene_f[i]]
        if e["crop_img"] is not None:
            cf = crop_f[crop_idx.index(i)]
            if e.get("keep") is not None:
                cf = cf[torch.from_numpy(e["keep"])]
            parts.append(cf)
        v = torch.cat(parts)
        p_ids = batcher.prompt(e["question"], len(v))
        a_ids = batcher.answer(e["answer"]) if with_answer else []
        ids = torch.tensor(p_ids + a_ids)
        x = emb(ids)
        img_pos = (ids == batcher.image_id).nonzero().squeeze(1)
        x = x.index_put((img_pos,), v.to(x.dtype))
        lab = torch.full((len(ids),), -100)
        if a_ids:
            lab[len(p_ids) - 1 : len(ids) - 1] = torch.tensor(a_ids)
        seqs.append(x)
        labs.append(lab)
        lasts.append(len(p_ids) - 1)
        vis.append(int(img_pos[0]))
    T = max(len(x) for x in seqs)
    D = seqs[0].shape[1]
    embeds = seqs[0].new_zeros((len(seqs), T, D))
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    labels = torch.full((len(seqs), T), -100)
    for i, (x, lab) in enumerate(zip(seqs, labs)):  # right padding: positions stay 0..L-1
        embeds[i, : len(x)] = x
        mask[i, : len(x)] = 1
        labels[i, : len(lab)] = lab
    return embeds, mask, labels, torch.tensor(lasts), torch.tensor(vis), scene_f, crop_f, crop_idx


class Heads(torch.nn.Module):
    """Per-patch linear probes: object colour, object shape, mark colour, object's 3 x 3 cell (0 = none)."""

    def __init__(self, d: int, where_weight: float = 1.0):
        super().__init__()
        self.colour = torch.nn.Linear(d, 1 + len(W.OBJECT_COLOURS))
        self.shape = torch.nn.Linear(d, 1 + len(W.SHAPES))
        self.mark = torch.nn.Linear(d, 1 + len(W.MARK_COLOURS))
        self.where = torch.nn.Linear(d, 1 + len(WHERE_CELLS))
        self.where_weight = where_weight

    def loss(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Balanced CE: mean over positive patches + mean over 'none' patches, per head."""
        total = feats.new_zeros(())
        weighted = ((self.colour, 1.0), (self.shape, 1.0), (self.mark, 2.0), (self.where, self.where_weight))
        for k, (head, w) in enumerate(weighted):
            if w == 0:
                continue
            y = labels[:, k].reshape(-1)
            logits = head(feats).reshape(-1, head.out_features)
            ce = F.cross_entropy(logits, y.clamp(min=0), reduction="none")
            valid = y != -100
            for sel in (valid & (y > 0), valid & (y == 0)):
                if sel.any():
                    total = total + w * ce[sel].mean()
        return total


# ----------------------------------------------------------------------------------------------
# examples


def draw_example(pool: Pool, rng: np.random.Generator, args: RecipeArgs, pair: bool | None = None, qtype=None):
    item = pool.items[int(rng.integers(pool.n))]
    scene = item["scene"]
    if pair is None:
        pair = rng.random() < args.pair_frac
    if qtype is None:
        w = [args.pair_fine, args.pair_coarse, 1 - args.pair_fine - args.pair_coarse] if pair else [0.3, 0.45, 0.25]
        qtype = W.QTYPES[int(rng.choice(3, p=w))]
    question, answer, _ = W.ask(scene, qtype, rng)
    ex = {
        "scene_img": item["img"],
        "crop_img": None,
        "keep": None,
        "question": question,
        "answer": answer,
        "qtype": qtype,
        "item": item,
        "crop": None,
    }
    if pair:
        u = rng.random()
        if u < args.other_scene_frac:
            other = pool.items[int(rng.integers(pool.n))]
            crop = [c for c in other["crops"] if c["kind"] == "target"][int(rng.integers(pool.crops - 1))]
        elif u < args.other_scene_frac + args.wrong_crop_frac:
            crop = item["crops"][-1]
        else:
            crop = item["crops"][int(rng.integers(pool.crops - 1))]
            if rng.random() < args.drop_frac:
                keep = crop["tgt"] | (rng.random(N_TOK) >= rng.uniform(0.2, 0.8))
                ex["keep"] = keep
        ex["crop_img"] = crop["img"]
        ex["crop"] = crop
    return ex


# ----------------------------------------------------------------------------------------------
# evaluation


def eval_examples(n: int, seed: int, qtype: str, mode: str, objects: int = 1):
    """Fresh samples (seeds disjoint from training); mode: scene | oracle | crop3 | wrong."""
    out = []
    rng = np.random.default_rng([seed, 99])
    for s in W.make_samples(n, seed, qtype, objects=objects):
        ex = {
            "scene_img": W.to_input(s.image),
            "crop_img": None,
            "question": s.question,
            "answer": s.answer,
            "qtype": s.qtype,
            "sample": s,
        }
        if mode == "oracle":
            ex["crop_img"] = W.to_input(s.image, W.oracle_crop_box(s))
        elif mode == "crop3":
            x0, y0, x1, y1 = s.target_box
            ex["crop_img"] = W.to_input(s.image, W.square_box((x0 + x1) / 2, (y0 + y1) / 2, 192, 512))
        elif mode == "wrong":
            ex["crop_img"] = W.to_input(s.image, sample_crop_box(s.target_box, s.image.size[0], rng, "wrong"))
        out.append(ex)
    return out


@torch.no_grad()
def accuracy(model, batcher, examples, bs: int = 64) -> float:
    """Exact match of the teacher-forced argmax over all answer tokens (= greedy decode is right)."""
    model.eval()
    right = 0
    for i in range(0, len(examples), bs):
        chunk = examples[i : i + bs]
        embeds, mask, labels, *_ = build_batch(model, batcher, chunk)
        logits = model(inputs_embeds=embeds, attention_mask=mask).logits
        pred = logits.argmax(-1)
        ok = ((pred == labels) | (labels == -100)).all(1)
        right += int(ok.sum())
    return right / len(examples)


@torch.no_grad()
def attention_on_target(model, batcher, examples) -> dict:
    """Per layer: mean over samples of (mean attention on target tokens / mean over all scene tokens),
    and the top-1 hit rate (heads averaged), for the last prompt token, the first answer token, and
    "teacher": the mean over every position that predicts an answer token, the map SD-RPN's labels are
    made from."""
    model.eval()
    model.set_attn_implementation("eager")
    try:
        embeds, mask, labels, lasts, vis, *_ = build_batch(model, batcher, examples)
        out = model(inputs_embeds=embeds, attention_mask=mask, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    res = {}
    tgt = torch.stack(
        [
            torch.from_numpy(
                target_tokens(e["sample"].attrs["shape"], e["sample"].target_box, (0, 0, *e["sample"].image.size))
            )
            for e in examples
        ]
    )
    b = torch.arange(len(examples))
    predicts_answer = (labels != -100).float()[..., None]  # (B, T, 1): the next token is an answer token
    for name, pos in (("last_prompt", lasts), ("answer", lasts + 1), ("teacher", None)):
        ratios, hits = [], []
        for att in out.attentions:  # (B, H, T, T)
            rows = att.mean(1)
            a = rows[b, pos] if pos is not None else (rows * predicts_answer).sum(1) / predicts_answer.sum(1)
            idx = vis[:, None] + torch.arange(N_TOK)[None]
            a = torch.gather(a, 1, idx)  # (B, N_TOK) attention on the scene tokens
            on = (a * tgt).sum(1) / tgt.sum(1).clamp(min=1)
            ratios.append(float((on / a.mean(1).clamp(min=1e-12)).mean()))
            hits.append(float(tgt[b, a.argmax(1)].float().mean()))
        res[name] = {"ratio": [round(r, 2) for r in ratios], "top1_hit": [round(h, 3) for h in hits]}
    return res


def evaluate(model, batcher, n: int, seed: int, binding: bool = False) -> dict:
    """Accuracy per question type from the scene alone and with crops; ``binding``: also on scenes of
    three objects, the target named by its colour ("named/*")."""
    m = {}
    for qtype in W.QTYPES:
        m[f"scene/{qtype}"] = accuracy(model, batcher, eval_examples(n, seed, qtype, "scene"))
        m[f"oracle/{qtype}"] = accuracy(model, batcher, eval_examples(n, seed, qtype, "oracle"))
    m["crop3/fine"] = accuracy(model, batcher, eval_examples(n, seed, "fine", "crop3"))
    m["wrong/fine"] = accuracy(model, batcher, eval_examples(n, seed, "fine", "wrong"))
    if binding:
        for qtype in ("fine", "coarse"):
            for mode in ("scene", "oracle"):
                m[f"named/{mode}/{qtype}"] = accuracy(model, batcher, eval_examples(n, seed, qtype, mode, 3))
    m = {k: round(v, 4) for k, v in m.items()}
    m["attention"] = {
        q: attention_on_target(model, batcher, eval_examples(min(n, 64), seed + 1, q, "scene"))
        for q in ("fine", "coarse")
    }
    if binding:
        m["attention"]["named/fine"] = attention_on_target(
            model, batcher, eval_examples(min(n, 64), seed + 1, "fine", "scene", 3)
        )
    return m


# ----------------------------------------------------------------------------------------------
# training


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def spec_for(args: RecipeArgs) -> TinyLlavaSpec:
    return TinyLlavaSpec(
        image_size=W.INPUT_SIZE,
        patch_size=16,
        vision_hidden=args.vision_hidden,
        vision_layers=args.vision_layers,
        vision_heads=3,
        text_hidden=args.text_hidden,
        text_layers=args.text_layers,
        text_heads=4,
        text_kv_heads=4,
        text_intermediate=2 * args.text_hidden,
        max_positions=256,
        words=W.WORDS,
    )


def save_model(model, processor, out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    half = build_tiny_llava(spec_for(RecipeArgs(**meta["args"])))[0]
    half.load_state_dict(model.state_dict())
    half.to(torch.float16)  # fp16 storage halves the size; config.json says float32 so it reloads in fp32
    half.save_pretrained(out)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = "float32"
    for sub in ("text_config", "vision_config"):
        if isinstance(cfg.get(sub), dict) and "dtype" in cfg[sub]:
            cfg[sub]["dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    processor.save_pretrained(out)
    (out / "recipe.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def train(args: RecipeArgs, out: Path, log) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    model, processor = build_tiny_llava(spec_for(args), seed=args.seed)
    model.set_attn_implementation("sdpa")
    batcher = Batcher(processor)
    heads = Heads(args.text_hidden, args.where_weight)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters; args {asdict(args)}")
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    ckpt_path = work / "checkpoint.pt"
    pool = Pool(
        args.pool,
        args.crops_per_scene,
        args.seed,
        args.grid_frac,
        args.centred_frac,
        args.shift_frac,
        args.multi_frac,
        bool(args.crop_shape_whole),
    )
    log(f"pool of {args.pool} scenes ready ({time.time() - t0:.0f}s)")
    start_b = 0
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(ck["model"])
        heads.load_state_dict(ck["heads"])
        start_b = ck["step"]
        log(f"resumed at stage-b step {start_b}")

    # ---- stage a: per-patch vision pretraining
    if start_b == 0:
        params = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
        opt = torch.optim.AdamW(params + list(heads.parameters()), lr=args.vision_lr, weight_decay=0.0)
        model.train()
        for step in range(args.vision_steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, args.vision_steps, args.vision_lr, 30)
            imgs, labs = [], []
            for _ in range(args.vision_batch):
                it = pool.items[int(rng.integers(pool.n))]
                if rng.random() < 0.3:
                    imgs.append(it["img"])
                    labs.append(it["lab"])
                else:
                    c = it["crops"][int(rng.integers(pool.crops))]
                    imgs.append(c["img"])
                    labs.append(c["lab"])
            feats = image_features(model, to_pixels(imgs, batcher.mean, batcher.std))
            loss = heads.loss(feats, torch.from_numpy(np.stack(labs)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 50 == 0 or step == args.vision_steps - 1:
                with torch.no_grad():
                    y = torch.from_numpy(np.stack(labs))[:, 2].reshape(-1)
                    pred = heads.mark(feats).argmax(-1).reshape(-1)
                    pos = y > 0
                    macc = float((pred[pos] == y[pos]).float().mean()) if pos.any() else float("nan")
                log(f"[a {step}] loss {loss.item():.3f} mark-patch acc {macc:.2f} ({time.time() - t0:.0f}s)")

    # ---- stage b: the whole MLLM
    vision_ids = {id(p) for m in (model.model.vision_tower, model.model.multi_modal_projector) for p in m.parameters()}
    groups = [
        {"params": [p for p in model.parameters() if id(p) not in vision_ids], "mult": 1.0},
        {"params": [p for p in model.parameters() if id(p) in vision_ids], "mult": args.vision_lr_mult},
        {"params": list(heads.parameters()), "mult": 1.0},
    ]
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    if start_b and "opt" in ck:
        opt.load_state_dict(ck["opt"])
    run = {q: [0, 0] for q in W.QTYPES}
    history = []
    eval_seed = 10_000 + args.seed
    for step in range(start_b, args.steps):
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup) * g["mult"]
        if step and step % args.refresh_every == 0:
            pool.refresh()
        pair = bool(rng.random() < args.pair_frac)  # whole batches of one kind: no padding 80 -> 145 tokens
        exs = [draw_example(pool, rng, args, pair=pair) for _ in range(args.batch)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(args.bf16)):
            embeds, mask, labels, lasts, vis, scene_f, crop_f, crop_idx = build_batch(model, batcher, exs)
            logits = model(inputs_embeds=embeds, attention_mask=mask).logits.float()
            aux_labs = [e["item"]["lab"] for e in exs] + [exs[i]["crop"]["lab"] for i in crop_idx]
            aux = heads.loss(torch.cat([scene_f, crop_f]).float(), torch.from_numpy(np.stack(aux_labs)))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        total = loss + args.aux_weight * aux
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            ok = ((logits.argmax(-1) == labels) | (labels == -100)).all(1)
        for e, o in zip(exs, ok.tolist()):
            run[e["qtype"]][0] += int(o)
            run[e["qtype"]][1] += 1
        if step % 50 == 0:
            accs = " ".join(f"{q} {r[0] / max(1, r[1]):.2f}" for q, r in run.items())
            log(f"[b {step}] loss {loss.item():.3f} aux {aux.item():.3f} train acc: {accs} ({time.time() - t0:.0f}s)")
            run = {q: [0, 0] for q in W.QTYPES}
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            m = evaluate(model, batcher, args.eval_n, eval_seed, args.multi_frac > 0)
            m["step"] = step + 1
            history.append(m)
            log(f"[eval {step + 1}] {json.dumps(m)} ({time.time() - t0:.0f}s)")
            torch.save(
                {"model": model.state_dict(), "heads": heads.state_dict(), "opt": opt.state_dict(), "step": step + 1},
                ckpt_path,
            )
    train_s = time.time() - t0
    final = evaluate(model, batcher, args.final_eval_n, 20_000 + args.seed, args.multi_frac > 0)
    log(f"[final] {json.dumps(final)}")
    meta = {
        "args": asdict(args),
        "seed": args.seed,
        "parameters": n_params,
        "train_seconds": round(train_s),
        "final_eval_seconds": round(time.time() - t0 - train_s),
        "metrics": final,
        "history": history,
        "metric_notes": {
            "scene/*": "scene only, exact-match accuracy of the answer on fresh samples",
            "oracle/*": "scene + ground-truth crop (oracle_crop_box, scale 2) as second image",
            "crop3/fine": "scene + a 192-px (3/8 of the scene side) crop centred on the target",
            "wrong/fine": "scene + a crop of a place without the target",
            "attention": "ratio = mean attention on target tokens / mean over all scene tokens (1 = uniform), "
            "per layer, heads averaged; top1_hit = argmax scene token holds the target",
        },
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    save_model(model, processor, out, meta)
    return meta


def reevaluate(out: Path, threads: int) -> dict:
    """Measure a saved model's final metrics again with this code (e.g. for a log older than a new measure),
    as they are from its saved weights; the metrics measured when training ended are kept beside them."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    torch.set_num_threads(threads)
    meta = json.loads((out / "recipe.json").read_text())
    model = LlavaForConditionalGeneration.from_pretrained(out)
    model.set_attn_implementation("sdpa")
    batcher = Batcher(LlavaProcessor.from_pretrained(out))
    args = meta["args"]
    meta.setdefault("metrics_at_training_end", meta["metrics"])
    meta["metrics"] = evaluate(
        model, batcher, args["final_eval_n"], 20_000 + args["seed"], args.get("multi_frac", 0) > 0
    )
    atomic_write_json(out / "recipe.json", meta)
    return meta


def _remove_own_work(work: Path) -> None:
    """Delete the resumable checkpoint this recipe wrote, and its folder only if nothing else is in it."""
    (work / "checkpoint.pt").unlink(missing_ok=True)
    if work.is_dir() and not any(work.iterdir()):
        work.rmdir()


def run_recipe(argv, args_class, train_fn, reevaluate_fn, default_out: Path, description: str) -> None:
    """The command line shared by the toy recipes: train into --out (logging to train.log), or re-measure."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=default_out, help=f"output folder (default {default_out})")
    parser.add_argument(
        "--evaluate-only", action="store_true", help="re-measure the saved model in --out (metrics in recipe.json)"
    )
    for f, v in asdict(args_class()).items():
        parser.add_argument("--" + f.replace("_", "-"), type=type(v), default=v)
    ns = parser.parse_args(argv)
    out = ns.out
    if ns.evaluate_only:
        print(json.dumps(reevaluate_fn(out, ns.threads)["metrics"]))
        return
    args = args_class(**{k: v for k, v in vars(ns).items() if k not in ("out", "evaluate_only")})
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.log", "a") as logf:

        def log(msg: str) -> None:
            print(msg, flush=True)
            logf.write(msg + "\n")
            logf.flush()

        meta = train_fn(args, out, log)
        _remove_own_work(out / "work")
        log(f"saved to {out} ({meta['train_seconds']}s of training)")


def main(argv=None) -> None:
    run_recipe(argv, RecipeArgs, train, reevaluate, DEFAULT_OUT, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    main()
