"""Train the embedded demo's Qwen2.5-VL ("toy-qwen") from scratch on the toy world, with dynamic resolution.

    python -m sdrpn.toyworld.recipe_qwen --seed 0 --threads 2   # default out: toyworld/weights_qwen/mllm

The model is a real `Qwen2_5_VLForConditionalGeneration` (`build_tiny_qwen`: 2-block vision tower with window
attention in block 0 and full attention in block 1, 14-px patches, 2 x 2 merge; 4-layer text model with GQA and
M-RoPE) with a pixel budget of ``--budget`` px (min = max, saved in the processor): 49 * 28 * 28, so a 512-px
square scene becomes 6 x 6 merged tokens when answering (168 px; the processor's own rounding), a 4:3 scene
6 x 8, a 16:9 one 5 x 9, and labels / RPN training see the scene padded to a gray square of 196 px = 7 x 7
tokens. Scenes come in the aspect ratios of `world.ASPECTS` (1:1, 4:3, 3:4, 16:9, 9:16).

It is trained exactly on the sequences the library builds (`sdrpn.models.qwen2_5_vl.Qwen2_5_VLAdapter`, checked
at start by `check_sequences`): the chat template with the system prompt, the scene as answered (aspect kept)
or as labelled (gray-padded square), and for stage 2 the crop as a second image of the same user turn, its 3-D
positions from the model's rope index over both grids, pruned crop tokens removed after positions are assigned.
The recipe is the LLaVA toy's (`sdrpn.toyworld.recipe`, whose docstring has the lessons learnt), adapted:

a. Vision pretraining: linear heads on every merged token (the LLM's input space) predict the object colour /
   shape in that token (scenes in both layouts and crops), the mark colour (crops only) and, on scene tokens,
   the object's 3 x 3 cell ("where" probe, ``--where-weight``); positives and negatives averaged apart.
b. The whole MLLM on question / answer pairs: single scenes (answer layout, or the label layout for a
   ``--label-frac`` share) and scene + crop pairs. Crops are mostly of the target (1.25x the object up to 3/8
   of the long side, squares some centred and most shifted by up to ``--shift-frac`` of their side, or
   token-aligned boxes of the answer grid as SD-RPN's token boxes are, non-square), sometimes of a wrong place
   or of another scene's target, and sometimes lose a random part of the tokens off the target (masked
   upscaling). Crops keep their aspect ratio at the same pixel budget (7 x 7 tokens for a square crop).
   The per-token heads stay on as an auxiliary loss.

Logged while training (fresh scenes of all aspect ratios): exact-match accuracy per question type from the
scene alone (answer layout, and "label/*" the padded layout) and with the oracle crop as second image, and the
attention-on-target per text layer (as `sdrpn.toyworld.recipe` logs it: ratio over uniform and top-1 hit, for
the last prompt token, the first answer token and "teacher", the mean over the positions that predict the
answer) on the label layout, which SD-RPN's labels are made from (``metrics.attention``; the toy's label
layers are read off ``metrics.attention.fine.teacher.top1_hit``), and on the answer layout the RPN is applied
to (``metrics.attention_answer_layout``). ``--evaluate-only`` measures a saved model again.

Shipped run (``python -m sdrpn.toyworld.recipe_qwen --seed 0 --threads 2``, the defaults; 2965 s of training on
2 cores shared with a test suite, 400 fresh samples per type, all aspect ratios): fine (mark colour) 20.0% from
the scene alone vs 98.25% with the oracle crop; coarse 63.0% / 63.0%; yes/no 49.5% / 49.5%: yes/no questions
and the shape kind of the coarse ones were NOT learnt in 2000 steps (one answer for every scene; the LLaVA
recipe learnt yes/no only after ~3000 steps). Teacher map on fine questions, label layout, per layer: top-1
token = target in 32% / 99% / 95% / 34% of scenes (label layers 1 and 2). The saved folder reloads through
`sdrpn.models.load_model` with the same answers (120/120).

Saves into DIR: ``config.json``/``model.safetensors`` (fp16 storage, reloads as fp32), the processor files,
``recipe.json`` (arguments, seed, versions, metrics, wall time) and ``train.log``; a resumable checkpoint
lives in DIR/work/ while training. Load the folder with ``sdrpn.models.load_model(DIR)``.
"""

from __future__ import annotations

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
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from sdrpn.files import atomic_write_json
from sdrpn.models.tiny import TinyQwenSpec, build_tiny_qwen
from sdrpn.toyworld import world as W
from sdrpn.toyworld.recipe import WHERE_CELLS, Heads, lr_at, run_recipe

TOKEN = 28  # px of one merged token (2 x 2 patches of 14 px)
PATCH = 14
PAD_GRAY = (127, 127, 127)  # the adapter's pad colour for the label layout
DEFAULT_OUT = Path(__file__).parent / "weights_qwen" / "mllm"
SYSTEM_HEAD = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
ASSISTANT_TAIL = "<|im_end|>\n<|im_start|>assistant\n"


@dataclass
class RecipeArgs:
    seed: int = 0
    budget: int = 49 * TOKEN * TOKEN  # min = max pixels of the processor (answers, crops) and of the label layout
    vision_steps: int = 500  # stage a
    vision_batch: int = 32
    vision_lr: float = 1e-3
    steps: int = 2000  # stage b
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 100
    pair_frac: float = 0.55  # share of stage-b batches that are scene + crop pairs
    label_frac: float = 0.4  # of single-scene examples: the scene in the label layout (gray-padded square)
    wrong_crop_frac: float = 0.2  # of pairs: crop of a place without the target
    other_scene_frac: float = 0.1  # of pairs: crop of another scene's target
    drop_frac: float = 0.3  # of target crops: drop a random part of the tokens off the target
    centred_frac: float = 0.15  # of the square target crops: exactly centred (the rest shifted)
    shift_frac: float = 0.3  # shifted crops move the target's centre up to this fraction of the side off-centre
    grid_frac: float = 0.3  # of target crops: boxes of answer-grid tokens, as SD-RPN's token boxes are
    min_crop: float = 1.25  # smallest crop side, in object sizes
    single_fine: float = 0.3  # question mix of single scenes: fine, coarse, the rest yes/no
    single_coarse: float = 0.45
    pair_fine: float = 0.55  # question mix of scene + crop pairs
    pair_coarse: float = 0.3
    aux_weight: float = 0.3
    where_weight: float = 0.6
    vision_lr_mult: float = 0.3
    pool: int = 2000
    refresh_every: int = 200
    crops_per_scene: int = 4  # the last one of a wrong place
    eval_every: int = 400
    eval_n: int = 80
    final_eval_n: int = 400
    threads: int = 2
    bf16: int = 1
    vision_hidden: int = 128
    vision_heads: int = 4
    vision_depth: int = 2
    window_size: int = 56
    text_hidden: int = 192
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2


def spec_for(args: RecipeArgs) -> TinyQwenSpec:
    return TinyQwenSpec(
        text_layers=args.text_layers,
        text_heads=args.text_heads,
        text_kv_heads=args.text_kv_heads,
        text_hidden=args.text_hidden,
        text_intermediate=2 * args.text_hidden,
        vision_hidden=args.vision_hidden,
        vision_heads=args.vision_heads,
        vision_depth=args.vision_depth,
        fullatt_block_indexes=(args.vision_depth - 1,),
        window_size=args.window_size,
        min_pixels=args.budget,
        max_pixels=args.budget,
        init_std=None,
        words=W.WORDS,
    )


# ----------------------------------------------------------------------------------------------
# images as the model sees them


@dataclass
class ModelImage:
    """An image at model input (uint8 H x W x 3, multiples of 28 px), its merged-token grid and the canvas it
    covers in scene pixels (x0, y0, x1, y1; beyond the scene where it is padding)."""

    pixels: np.ndarray
    grid: tuple[int, int]  # (rows, cols) of merged tokens
    canvas: tuple[float, float, float, float]

    @property
    def n(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def grid_thw(self) -> list[int]:
        return [1, 2 * self.grid[0], 2 * self.grid[1]]


def answer_image(image: Image.Image, budget: int, box=None) -> ModelImage:
    """The scene (or a crop of it) as the processor resizes it for answering: aspect kept, min = max budget."""
    region = image.crop(box) if box is not None else image
    w, h = region.size
    if min(w, h) < TOKEN:  # as the adapter grows it (never for the recipe's crops)
        s = TOKEN / min(w, h)
        region = region.resize((max(TOKEN, round(w * s)), max(TOKEN, round(h * s))))
    rh, rw = smart_resize(region.size[1], region.size[0], factor=TOKEN, min_pixels=budget, max_pixels=budget)
    pixels = np.asarray(region.resize((rw, rh), Image.BICUBIC), dtype=np.uint8)
    canvas = tuple(float(v) for v in (box if box is not None else (0, 0, w, h)))
    return ModelImage(pixels, (rh // TOKEN, rw // TOKEN), canvas)


def label_side(budget: int) -> int:
    return max(1, round(budget**0.5 / TOKEN)) * TOKEN


def label_image(image: Image.Image, budget: int) -> ModelImage:
    """The scene as labels and RPN training see it: centred on a gray square, resized to the label grid."""
    w, h = image.size
    side = max(w, h)
    left, top = (side - w) // 2, (side - h) // 2
    canvas_img = image
    if w != h:
        canvas_img = Image.new("RGB", (side, side), PAD_GRAY)
        canvas_img.paste(image, (left, top))
    s = label_side(budget)
    pixels = np.asarray(canvas_img.resize((s, s), Image.BICUBIC), dtype=np.uint8)
    return ModelImage(pixels, (s // TOKEN, s // TOKEN), (-left, -top, side - left, side - top))


def to_patches(images: list[ModelImage], mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """pixel_values (sum of patches, 3 * 2 * 14 * 14) and image_grid_thw, as the Qwen2-VL processor makes them."""
    mean = torch.tensor(mean, dtype=torch.float32)
    std = torch.tensor(std, dtype=torch.float32)
    out = []
    for im in images:
        x = torch.from_numpy(np.array(im.pixels, dtype=np.float32)) * (1 / 255)
        x = ((x - mean) / std).permute(2, 0, 1)  # C, H, W
        c, hh, ww = x.shape
        gh, gw = hh // PATCH, ww // PATCH
        x = x.reshape(c, gh // 2, 2, PATCH, gw // 2, 2, PATCH).permute(1, 4, 2, 5, 0, 3, 6)
        x = x[:, :, :, :, :, None].expand(-1, -1, -1, -1, -1, 2, -1, -1)
        out.append(x.reshape(gh * gw, c * 2 * PATCH * PATCH))
    return torch.cat(out), torch.tensor([im.grid_thw for im in images])


# ----------------------------------------------------------------------------------------------
# per-token labels


def _token_fracs(mask_box, mask: np.ndarray, image: ModelImage):
    """Per-token coverage (rows x cols) of a boolean mask placed at mask_box (scene px), on the image's grid:
    (fraction of the mask's area, fraction of the token's area)."""
    gh, gw = image.grid
    cx0, cy0, cx1, cy1 = image.canvas
    cw, ch = (cx1 - cx0) / gw, (cy1 - cy0) / gh
    ys, xs = np.nonzero(mask)
    area = max(1, len(xs))
    tx = np.floor((xs + mask_box[0] + 0.5 - cx0) / cw).astype(int)
    ty = np.floor((ys + mask_box[1] + 0.5 - cy0) / ch).astype(int)
    ok = (tx >= 0) & (tx < gw) & (ty >= 0) & (ty < gh)
    counts = np.zeros((gh, gw), np.float32)
    np.add.at(counts, (ty[ok], tx[ok]), 1.0)
    return counts / area, counts / (cw * ch)


def _object_labels(obj: W.SceneObject, image: ModelImage, is_crop: bool) -> np.ndarray:
    """(colour, shape, mark, where) per token for one object; 0 = none, -100 = ignored (as recipe.py does)."""
    f_obj, t_obj = _token_fracs(obj.box, W.shape_mask(obj.shape, obj.box[2] - obj.box[0]), image)
    on = (f_obj >= 0.25) | (t_obj >= 0.2)
    near = (f_obj > 0) & ~on
    colour = np.where(on, 1 + W.OBJECT_COLOURS.index(obj.colour), 0)
    shape = np.where(on, 1 + W.SHAPES.index(obj.shape), 0)
    colour[near] = -100
    if is_crop:
        shape[near] = -100
        mb = obj.mark_box
        f_m, _ = _token_fracs(mb, np.ones((mb[3] - mb[1], mb[2] - mb[0]), bool), image)
        mark = np.where(f_m >= 0.2, 1 + W.MARK_COLOURS.index(obj.mark), 0)
        mark[(f_m > 0) & (f_m < 0.2)] = -100
        where = np.full(image.grid, -100)
    else:
        shape[near | (on & (f_obj < 0.25))] = -100
        mark = np.full(image.grid, -100)
        where = np.where(on, 1 + WHERE_CELLS.index(obj.where), 0)
        where[near] = -100
    return np.stack([colour, shape, mark, where]).reshape(4, image.n)


def patch_labels(scene: W.Scene, image: ModelImage, is_crop: bool) -> np.ndarray:
    per_object = np.stack([_object_labels(obj, image, is_crop) for obj in scene.objects])
    positive = per_object > 0
    labels = np.where(positive.any(0), per_object.max(0), np.where((per_object == -100).any(0), -100, 0))
    labels[positive.sum(0) > 1] = -100
    return labels


def target_tokens(shape: str, target_box, image: ModelImage) -> np.ndarray:
    """Boolean per-token mask of the tokens that hold the target (the colour label's rule)."""
    f_obj, t_obj = _token_fracs(target_box, W.shape_mask(shape, target_box[2] - target_box[0]), image)
    return ((f_obj >= 0.25) | (t_obj >= 0.2)).reshape(image.n)


# ----------------------------------------------------------------------------------------------
# crops


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def grid_crop_box(target_box, size: tuple[int, int], grid: tuple[int, int], rng: np.random.Generator):
    """A box of answer-grid tokens (what SD-RPN's token boxes crop): the tokens the target touches, sometimes
    one more on a random side; not square, the target off-centre."""
    w, h = size
    cw, ch = w / grid[1], h / grid[0]
    x0, y0, x1, y1 = target_box
    c0, r0 = int(x0 // cw), int(y0 // ch)
    c1, r1 = int(math.ceil(x1 / cw)), int(math.ceil(y1 / ch))
    if rng.random() < 0.3:
        side = int(rng.integers(4))
        if side == 0:
            c0 = max(c0 - 1, 0)
        elif side == 1:
            r0 = max(r0 - 1, 0)
        elif side == 2:
            c1 = min(c1 + 1, grid[1])
        else:
            r1 = min(r1 + 1, grid[0])
    return (
        int(round(c0 * cw)),
        int(round(r0 * ch)),
        min(w, int(round(c1 * cw))),
        min(h, int(round(r1 * ch))),
    )


def sample_crop_box(scene: W.Scene, size, grid, rng: np.random.Generator, kind: str, args: RecipeArgs):
    """A crop of the target (square: centred or shifted; or a token box) or of a place without it."""
    w, h = size
    if kind == "target" and rng.random() < args.grid_frac:
        return grid_crop_box(scene.target_box, size, grid, rng)
    x0, y0, x1, y1 = scene.target_box
    s = x1 - x0
    lo, hi = args.min_crop * s, 3 * max(w, h) / 8
    if rng.random() < 0.5:  # half of the crops tight, the rest up to 3/8 of the long side
        hi = min(hi, 2.5 * s)
    side = float(np.exp(rng.uniform(math.log(lo), math.log(hi))))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if kind == "target":
        if rng.random() >= args.centred_frac:
            slack = args.shift_frac * side
            cx += rng.uniform(-slack, slack)
            cy += rng.uniform(-slack, slack)
        return W.square_box(cx, cy, side, w, h)
    for _ in range(50):
        box = W.square_box(rng.uniform(0, w), rng.uniform(0, h), side, w, h)
        if not _overlap(box, scene.target_box):
            return box
    return W.square_box(w - cx, h - cy, 1.5 * s, w, h)


class Pool:
    """Scenes of every aspect ratio in memory, at model input in both layouts, with crops and labels."""

    def __init__(self, n: int, seed: int, args: RecipeArgs):
        self.n, self.args = n, args
        self.rng = np.random.default_rng([seed, 7])
        self.next_seed = 1_000_000 * (seed + 1)
        self.items: list[dict] = [self._make() for _ in range(n)]

    def _make(self) -> dict:
        args = self.args
        seed = self.next_seed
        self.next_seed += 1
        aspect = W.ASPECTS[int(self.rng.integers(len(W.ASPECTS)))]
        scene = W.render_scene(seed, aspect=aspect)
        ans = answer_image(scene.image, args.budget)
        lab = label_image(scene.image, args.budget)
        item = {
            "scene": scene,
            "views": {
                layout: {
                    "img": im,
                    "lab": patch_labels(scene, im, False),
                    "tgt": target_tokens(scene.shape, scene.target_box, im),
                }
                for layout, im in (("answer", ans), ("label", lab))
            },
            "crops": [],
        }
        for kind in ["target"] * (args.crops_per_scene - 1) + ["wrong"]:
            box = sample_crop_box(scene, scene.image.size, ans.grid, self.rng, kind, args)
            im = answer_image(scene.image, args.budget, box)
            item["crops"].append(
                {
                    "kind": kind,
                    "box": box,
                    "img": im,
                    "lab": patch_labels(scene, im, True),
                    "tgt": target_tokens(scene.shape, scene.target_box, im),
                }
            )
        scene.image = None
        return item

    def refresh(self, frac: float = 0.25) -> None:
        for i in self.rng.choice(self.n, int(self.n * frac), replace=False):
            self.items[int(i)] = self._make()


# ----------------------------------------------------------------------------------------------
# token sequences, exactly as the adapter builds them


class Batcher:
    """Prompt ids of "[system] <|im_start|>user\\n<|vision_start|>{scene}<|vision_end|>[<|vision_start|>{crop}
    <|vision_end|>]{q}<|im_end|>\\n<|im_start|>assistant\\n" + "{answer}<|im_end|>"."""

    def __init__(self, processor, config):
        self.tok = processor.tokenizer
        self.image_id = config.image_token_id
        self.vstart, self.vend = config.vision_start_token_id, config.vision_end_token_id
        self.eos = self.tok.convert_tokens_to_ids("<|im_end|>")
        self.mean = processor.image_processor.image_mean
        self.std = processor.image_processor.image_std
        self._cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._cache[text]

    def prompt(self, question: str, counts: list[int]) -> list[int]:
        ids = list(self.ids(SYSTEM_HEAD))
        for i, n in enumerate(counts):
            ids += ([self.vstart] if i else []) + [self.image_id] * n + [self.vend]
        return ids + self.ids(question + ASSISTANT_TAIL)

    def answer(self, answer: str) -> list[int]:
        return self.ids(answer) + [self.eos]


def build_batch(model, batcher: Batcher, examples: list[dict], with_answer: bool = True) -> dict:
    """examples: dicts with scene (ModelImage), crop (ModelImage or None), keep (bool per crop token or None),
    question, answer. Right-padded inputs_embeds, attention_mask, (3, B, T) position ids, labels (-100 off the
    answer), and per example: the scene tokens' first index, the last prompt index; the visual features."""
    images, owners = [], []
    for i, e in enumerate(examples):
        images.append(e["scene"])
        owners.append(i)
        if e.get("crop") is not None:
            images.append(e["crop"])
            owners.append(i)
    pixel_values, grid_thw = to_patches(images, batcher.mean, batcher.std)
    feats = list(model.model.get_image_features(pixel_values, grid_thw).pooler_output)
    emb = model.get_input_embeddings()
    seqs, poss, labs, lasts, vis = [], [], [], [], []
    k = 0
    for e in examples:
        parts = [feats[k]]
        grids = [grid_thw[k]]
        k += 1
        if e.get("crop") is not None:
            parts.append(feats[k])
            grids.append(grid_thw[k])
            k += 1
        p_ids = batcher.prompt(e["question"], [len(p) for p in parts])
        a_ids = batcher.answer(e["answer"]) if with_answer else []
        ids = torch.tensor(p_ids + a_ids)
        pos, _ = model.model.get_rope_index(
            ids[None], mm_token_type_ids=(ids == batcher.image_id).int()[None], image_grid_thw=torch.stack(grids)
        )
        pos = pos[:, 0]
        x = emb(ids)
        img_pos = (ids == batcher.image_id).nonzero().squeeze(1)
        x = x.index_put((img_pos,), torch.cat(parts).to(x.dtype))
        lab = torch.full((len(ids),), -100)
        if a_ids:
            lab[len(p_ids) - 1 : len(ids) - 1] = torch.tensor(a_ids)
        keep = torch.ones(len(ids), dtype=torch.bool)
        if e.get("crop") is not None and e.get("keep") is not None:
            crop_pos = img_pos[len(parts[0]) :]
            keep[crop_pos[~torch.as_tensor(e["keep"])]] = False
        x, pos, lab = x[keep], pos[:, keep], lab[keep]
        seqs.append(x)
        poss.append(pos)
        labs.append(lab)
        lasts.append(len(p_ids) - 1 - int((~keep).sum()))
        vis.append(int(img_pos[0]))
    T = max(len(x) for x in seqs)
    B, D = len(seqs), seqs[0].shape[1]
    embeds = seqs[0].new_zeros((B, T, D))
    mask = torch.zeros((B, T), dtype=torch.long)
    positions = torch.zeros((3, B, T), dtype=torch.long)
    labels = torch.full((B, T), -100)
    for i, (x, p, lab) in enumerate(zip(seqs, poss, labs)):
        embeds[i, : len(x)] = x
        mask[i, : len(x)] = 1
        positions[:, i, : len(x)] = p
        positions[:, i, len(x) :] = p[:, -1:] + 1
        labels[i, : len(lab)] = lab
    return {
        "embeds": embeds,
        "mask": mask,
        "positions": positions,
        "labels": labels,
        "lasts": torch.tensor(lasts),
        "vis": torch.tensor(vis),
        "feats": feats,
        "images": images,
    }


def forward(model, batch: dict, **kwargs):
    return model(inputs_embeds=batch["embeds"], attention_mask=batch["mask"], position_ids=batch["positions"], **kwargs)


# ----------------------------------------------------------------------------------------------
# examples


def draw_example(pool: Pool, rng: np.random.Generator, args: RecipeArgs, pair: bool) -> dict:
    item = pool.items[int(rng.integers(pool.n))]
    scene = item["scene"]
    if pair:
        w = [args.pair_fine, args.pair_coarse, 1 - args.pair_fine - args.pair_coarse]
    else:
        w = [args.single_fine, args.single_coarse, 1 - args.single_fine - args.single_coarse]
    qtype = W.QTYPES[int(rng.choice(3, p=w))]
    question, answer, _ = W.ask(scene, qtype, rng)
    layout = "answer" if pair or rng.random() >= args.label_frac else "label"
    view = item["views"][layout]
    ex = {
        "scene": view["img"],
        "scene_lab": view["lab"],
        "crop": None,
        "crop_lab": None,
        "keep": None,
        "question": question,
        "answer": answer,
        "qtype": qtype,
    }
    if pair:
        u = rng.random()
        targets = args.crops_per_scene - 1
        if u < args.other_scene_frac:
            other = pool.items[int(rng.integers(pool.n))]
            crop = other["crops"][int(rng.integers(targets))]
        elif u < args.other_scene_frac + args.wrong_crop_frac:
            crop = item["crops"][-1]
        else:
            crop = item["crops"][int(rng.integers(targets))]
            if rng.random() < args.drop_frac:
                ex["keep"] = crop["tgt"] | (rng.random(crop["img"].n) >= rng.uniform(0.2, 0.8))
        ex["crop"], ex["crop_lab"] = crop["img"], crop["lab"]
    return ex


def eval_examples(n: int, seed: int, qtype: str, mode: str, budget: int) -> list[dict]:
    """Fresh samples of every aspect ratio (seeds disjoint from training); mode: scene | label | oracle |
    crop3 | wrong."""
    out = []
    rng = np.random.default_rng([seed, 99])
    for s in W.make_samples(n, seed, qtype, aspects=W.ASPECTS):
        w, h = s.image.size
        scene = label_image(s.image, budget) if mode == "label" else answer_image(s.image, budget)
        ex = {"scene": scene, "crop": None, "question": s.question, "answer": s.answer, "qtype": s.qtype}
        ex["tgt"] = target_tokens(s.attrs["shape"], s.target_box, scene)
        x0, y0, x1, y1 = s.target_box
        if mode == "oracle":
            ex["crop"] = answer_image(s.image, budget, W.oracle_crop_box(s))
        elif mode == "crop3":
            ex["crop"] = answer_image(s.image, budget, W.square_box((x0 + x1) / 2, (y0 + y1) / 2, 192, w, h))
        elif mode == "wrong":
            fake = W.Scene(None, s.attrs["shape"], "", "", s.target_box, s.attrs["mark_box"], "", s.seed)
            box = sample_crop_box(fake, (w, h), scene.grid, rng, "wrong", RecipeArgs())
            ex["crop"] = answer_image(s.image, budget, box)
        out.append(ex)
    return out


# ----------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def accuracy(model, batcher, examples, bs: int = 50) -> float:
    """Exact match of the teacher-forced argmax over all answer tokens (= greedy decoding is right)."""
    model.eval()
    right = 0
    for i in range(0, len(examples), bs):
        b = build_batch(model, batcher, examples[i : i + bs])
        pred = forward(model, b).logits.argmax(-1)
        right += int(((pred == b["labels"]) | (b["labels"] == -100)).all(1).sum())
    return right / len(examples)


@torch.no_grad()
def attention_on_target(model, batcher, examples, bs: int = 32) -> dict:
    """Per text layer: mean over samples of (mean attention on target tokens / mean over all scene tokens) and
    the top-1 hit rate (heads averaged), for the last prompt token, the first answer token and "teacher"
    (the mean over every position that predicts an answer token, the map SD-RPN's labels are made from)."""
    model.eval()
    text_config = model.config.text_config
    saved = text_config._attn_implementation
    text_config._attn_implementation = "eager"
    sums: dict[str, dict[str, np.ndarray]] = {}
    try:
        for start in range(0, len(examples), bs):
            chunk = examples[start : start + bs]
            b = build_batch(model, batcher, chunk)
            out = forward(model, b, output_attentions=True)
            predicts = (b["labels"] != -100).float()[..., None]
            rows_b = torch.arange(len(chunk))
            for name, pos in (("last_prompt", b["lasts"]), ("answer", b["lasts"] + 1), ("teacher", None)):
                ratios, hits = [], []
                for att in out.attentions:  # (B, H, T, T)
                    rows = att.float().mean(1)
                    a = rows[rows_b, pos] if pos is not None else (rows * predicts).sum(1) / predicts.sum(1)
                    r_layer, h_layer = 0.0, 0.0
                    for i, e in enumerate(chunk):
                        v = a[i, int(b["vis"][i]) : int(b["vis"][i]) + e["scene"].n]
                        tgt = torch.from_numpy(e["tgt"])
                        on = v[tgt].mean() if tgt.any() else v.new_zeros(())
                        r_layer += float(on / v.mean().clamp(min=1e-12))
                        h_layer += float(tgt[int(v.argmax())])
                    ratios.append(r_layer)
                    hits.append(h_layer)
                acc = sums.setdefault(name, {"ratio": np.zeros(len(ratios)), "top1_hit": np.zeros(len(hits))})
                acc["ratio"] += np.array(ratios)
                acc["top1_hit"] += np.array(hits)
    finally:
        text_config._attn_implementation = saved
    n = len(examples)
    return {
        name: {
            "ratio": [round(float(r) / n, 2) for r in v["ratio"]],
            "top1_hit": [round(float(h) / n, 3) for h in v["top1_hit"]],
        }
        for name, v in sums.items()
    }


def evaluate(model, batcher, n: int, seed: int, budget: int) -> dict:
    m = {}
    for qtype in W.QTYPES:
        for mode in ("scene", "label", "oracle"):
            m[f"{mode}/{qtype}"] = accuracy(model, batcher, eval_examples(n, seed, qtype, mode, budget))
    m["crop3/fine"] = accuracy(model, batcher, eval_examples(n, seed, "fine", "crop3", budget))
    m["wrong/fine"] = accuracy(model, batcher, eval_examples(n, seed, "fine", "wrong", budget))
    m = {k: round(v, 4) for k, v in m.items()}
    na = min(n, 100)
    m["attention"] = {
        q: attention_on_target(model, batcher, eval_examples(na, seed + 1, q, "label", budget))
        for q in ("fine", "coarse")
    }
    m["attention_answer_layout"] = {
        q: attention_on_target(model, batcher, eval_examples(na, seed + 1, q, "scene", budget))
        for q in ("fine", "coarse")
    }
    return m


def short(m: dict) -> str:
    acc = " ".join(f"{k} {v:.2f}" for k, v in m.items() if isinstance(v, float))
    hits = m["attention"]["fine"]["teacher"]["top1_hit"]
    hits_a = m["attention_answer_layout"]["fine"]["teacher"]["top1_hit"]
    return f"{acc} | fine teacher top1 label layout {hits} answer layout {hits_a}"


# ----------------------------------------------------------------------------------------------
# the check that training sequences are the adapter's


@torch.no_grad()
def check_sequences(model, processor, budget: int, log=print) -> None:
    """Build one single-scene and one scene + pruned-crop example with `build_batch` and with the adapter
    (`prepare` and `_with_crops`, the sequences `generate` decodes from), and compare ids, 3-D positions,
    pixel values and the next-token logits; raise if they differ."""
    from sdrpn.models import CropTokens, wrap_model

    model.eval()
    adapter = wrap_model(model, processor, "recipe-check")
    assert adapter.min_pixels == adapter.max_pixels == adapter.label_pixels == budget, (
        adapter.min_pixels,
        adapter.max_pixels,
        adapter.label_pixels,
    )
    batcher = Batcher(processor, model.config)
    samples = W.make_samples(3, 123, "fine", aspects=[(4, 3), (1, 1), (9, 16)])
    for s in samples:
        for training in (False, True):
            pb = adapter.prepare([s.image], [[s.question]], training=training)
            im = label_image(s.image, budget) if training else answer_image(s.image, budget)
            pv, thw = to_patches([im], batcher.mean, batcher.std)
            assert torch.equal(thw, pb.inputs["image_grid_thw"].cpu()), (thw, pb.inputs["image_grid_thw"])
            err = float((pv - pb.inputs["pixel_values"].float()).abs().max())
            assert err < 1e-4, f"pixel values differ by {err}"
            ids = torch.tensor(batcher.prompt(s.question, [im.n]))
            assert torch.equal(ids, pb.inputs["input_ids"][0]), (ids, pb.inputs["input_ids"][0])
            b = build_batch(model, batcher, [{"scene": im, "crop": None, "question": s.question, "answer": ""}], False)
            assert torch.equal(b["positions"][:, 0], pb.position_ids[:, 0]), "positions differ"
            assert torch.allclose(b["embeds"], adapter.input_embeddings(pb), atol=1e-5), "embeddings differ"
        # scene + crop, some crop tokens pruned, against the adapter's stage-2 sequence
        pb = adapter.prepare([s.image], [[s.question]])
        box = W.oracle_crop_box(s, 3.0)
        crops, geometries = adapter.encode_crops([s.image.crop(box)])
        crop_im = answer_image(s.image, budget, box)
        assert (geometries[0].grid_height, geometries[0].grid_width) == crop_im.grid
        keep = torch.rand(crop_im.n, generator=torch.Generator().manual_seed(0)) > 0.4
        embeds, positions = adapter._with_crops(pb, 0, [CropTokens(crops[0].features, crop_im.grid, keep)])
        ex = {"scene": answer_image(s.image, budget), "crop": crop_im, "keep": keep.numpy(), "question": s.question}
        b = build_batch(model, batcher, [{**ex, "answer": ""}], False)
        assert b["embeds"].shape[1] == embeds.shape[0], (b["embeds"].shape, embeds.shape)
        assert torch.equal(b["positions"][:, 0], positions), "stage-2 positions differ"
        assert torch.allclose(b["embeds"][0], embeds, atol=1e-5), "stage-2 embeddings differ"
        # the first generated token equals our teacher-forced argmax
        pb.embeddings = None
        gen = adapter.generate(pb, [[CropTokens(crops[0].features, crop_im.grid, keep)]], max_new_tokens=2)
        b = build_batch(model, batcher, [{**ex, "answer": s.answer}])
        pred = forward(model, b).logits.argmax(-1)[0]
        first = int(pred[int(b["lasts"][0])])
        assert first == int(gen[0, 0]), (first, gen)
    log("check: training sequences equal the adapter's (ids, 3-D positions, pixels, embeddings, first token)")


# ----------------------------------------------------------------------------------------------
# training


def save_model(model, processor, out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    args = RecipeArgs(**meta["args"])
    half = build_tiny_qwen(spec_for(args))[0]
    half.load_state_dict(model.state_dict())
    half.to(torch.float16)  # fp16 storage; config.json says float32 so it reloads in fp32
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


def _heads_loss(heads: Heads, feats: list[torch.Tensor], labels: list[np.ndarray]) -> torch.Tensor:
    x = torch.cat(feats).float()[None]
    y = torch.from_numpy(np.concatenate(labels, axis=1))[None]
    return heads.loss(x, y)


def train(args: RecipeArgs, out: Path, log) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    model, processor = build_tiny_qwen(spec_for(args), seed=args.seed)
    model.set_attn_implementation("sdpa")
    check_sequences(model, processor, args.budget, log)
    batcher = Batcher(processor, model.config)
    heads = Heads(args.text_hidden, args.where_weight)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters; args {asdict(args)}")
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    ckpt_path = work / "checkpoint.pt"
    pool = Pool(args.pool, args.seed, args)
    log(f"pool of {args.pool} scenes ready ({time.time() - t0:.0f}s)")
    start_b, ck, history = -1, None, []
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(ck["model"])
        heads.load_state_dict(ck["heads"])
        start_b = int(ck["step"])
        history = json.loads(ck["history"])
        rng = np.random.default_rng([args.seed, start_b + 1])
        log(f"resumed at stage-b step {start_b}")

    # ---- stage a: per-token vision pretraining
    if start_b < 0:
        params = list(model.model.visual.parameters())
        opt = torch.optim.AdamW(params + list(heads.parameters()), lr=args.vision_lr, weight_decay=0.0)
        model.train()
        for step in range(args.vision_steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, args.vision_steps, args.vision_lr, 30)
            imgs, labs = [], []
            for _ in range(args.vision_batch):
                it = pool.items[int(rng.integers(pool.n))]
                u = rng.random()
                if u < 0.3:
                    view = it["views"]["answer" if u < 0.15 else "label"]
                    imgs.append(view["img"])
                    labs.append(view["lab"])
                else:
                    c = it["crops"][int(rng.integers(len(it["crops"])))]
                    imgs.append(c["img"])
                    labs.append(c["lab"])
            pv, thw = to_patches(imgs, batcher.mean, batcher.std)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(args.bf16)):
                feats = list(model.model.get_image_features(pv, thw).pooler_output)
            loss = _heads_loss(heads, feats, labs)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 50 == 0 or step == args.vision_steps - 1:
                with torch.no_grad():
                    y = torch.from_numpy(np.concatenate(labs, axis=1))[2]
                    pred = heads.mark(torch.cat(feats).float()).argmax(-1)
                    pos = y > 0
                    macc = float((pred[pos] == y[pos]).float().mean()) if pos.any() else float("nan")
                log(f"[a {step}] loss {loss.item():.3f} mark-token acc {macc:.2f} ({time.time() - t0:.0f}s)")
        start_b = 0
        torch.save({"model": model.state_dict(), "heads": heads.state_dict(), "step": 0, "history": "[]"}, ckpt_path)

    # ---- stage b: the whole MLLM
    vision_ids = {id(p) for p in model.model.visual.parameters()}
    groups = [
        {"params": [p for p in model.parameters() if id(p) not in vision_ids], "mult": 1.0},
        {"params": [p for p in model.parameters() if id(p) in vision_ids], "mult": args.vision_lr_mult},
        {"params": list(heads.parameters()), "mult": 1.0},
    ]
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    if ck is not None and "opt" in ck:
        opt.load_state_dict(ck["opt"])
    run = {q: [0, 0] for q in W.QTYPES}
    eval_seed = 10_000 + args.seed
    for step in range(start_b, args.steps):
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup) * g["mult"]
        if step and step % args.refresh_every == 0:
            pool.refresh()
        pair = bool(rng.random() < args.pair_frac)
        exs = [draw_example(pool, rng, args, pair) for _ in range(args.batch)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(args.bf16)):
            b = build_batch(model, batcher, exs)
            logits = forward(model, b).logits.float()
        aux_labs = []
        for e in exs:
            aux_labs.append(e["scene_lab"])
            if e["crop"] is not None:
                aux_labs.append(e["crop_lab"])
        aux = _heads_loss(heads, b["feats"], aux_labs)
        labels = b["labels"]
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
            m = evaluate(model, batcher, args.eval_n, eval_seed, args.budget)
            m["step"] = step + 1
            history.append(m)
            log(f"[eval {step + 1}] {short(m)} ({time.time() - t0:.0f}s)")
            log(f"[eval {step + 1} json] {json.dumps(m)}")
            torch.save(
                {
                    "model": model.state_dict(),
                    "heads": heads.state_dict(),
                    "opt": opt.state_dict(),
                    "step": step + 1,
                    "history": json.dumps(history),
                },
                ckpt_path,
            )
    train_s = time.time() - t0
    model.eval()
    final = evaluate(model, batcher, args.final_eval_n, 20_000 + args.seed, args.budget)
    log(f"[final] {short(final)}")
    log(f"[final json] {json.dumps(final)}")
    meta = {
        "args": asdict(args),
        "seed": args.seed,
        "parameters": n_params,
        "train_seconds": round(train_s),
        "final_eval_seconds": round(time.time() - t0 - train_s),
        "metrics": final,
        "history": history,
        "metric_notes": METRIC_NOTES,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    save_model(model, processor, out, meta)
    agreement = check_saved(out, model, processor, args.budget)
    log(f"reloaded with sdrpn.models.load_model: {agreement}")
    meta["reload_check"] = agreement
    atomic_write_json(out / "recipe.json", meta)
    return meta


METRIC_NOTES = {
    "scene/*": "scene only, as answered (aspect kept), exact-match accuracy on fresh scenes of all aspect ratios",
    "label/*": "scene only, in the label layout (gray-padded square at the label grid)",
    "oracle/*": "scene + ground-truth crop (oracle_crop_box, scale 2) as second image",
    "crop3/fine": "scene + a 192-px crop centred on the target",
    "wrong/fine": "scene + a crop of a place without the target",
    "attention": "label layout (what SD-RPN's labels see): ratio = mean attention on target tokens / mean over "
    "all scene tokens (1 = uniform), per text layer, heads averaged; top1_hit = argmax scene token holds the target",
    "attention_answer_layout": "the same on the scene as answered (the layout the RPN is applied to)",
    "reload_check": "answers of the saved (fp16-stored) model through sdrpn.models.load_model vs the trained model",
}


@torch.no_grad()
def check_saved(out: Path, model, processor, budget: int, n: int = 60) -> dict:
    """Answers of the saved folder, loaded as users load it, against the in-memory fp32 model (base and with
    the oracle crop, through the library's own decoding)."""
    from sdrpn.infer import InferSettings, Zoom
    from sdrpn.models import load_model, wrap_model

    reloaded = load_model(str(out))
    here = wrap_model(model, processor, "in-memory")
    samples = W.make_samples(n, 31_337, ["fine", "coarse", "yesno"], aspects=W.ASPECTS)
    images, questions = [s.image for s in samples], [s.question for s in samples]
    boxes = [[W.oracle_crop_box(s)] for s in samples]
    res = {}
    for name, adapter in (("trained", here), ("reloaded", reloaded)):
        zoom = Zoom(adapter, None, InferSettings(method="base", max_new_tokens=4))
        base = [r.answer for r in zoom.ask_batch(images, questions)]
        oracle = [r.answer for r in zoom.ask_with_boxes(images, questions, boxes)]
        res[name] = (base, oracle)
    same = sum(a == b for a, b in zip(res["trained"][0] + res["trained"][1], res["reloaded"][0] + res["reloaded"][1]))
    right = {
        name: {
            "base": round(sum(a == s.answer for a, s in zip(v[0], samples)) / n, 3),
            "oracle": round(sum(a == s.answer for a, s in zip(v[1], samples)) / n, 3),
        }
        for name, v in res.items()
    }
    return {"identical_answers": f"{same}/{2 * n}", "accuracy": right, "pixels": reloaded.max_pixels}


def reevaluate(out: Path, threads: int) -> dict:
    """Measure a saved model's final metrics again with this code; the metrics measured when training ended
    are kept beside them."""
    from sdrpn.models import load_model

    torch.set_num_threads(threads)
    meta = json.loads((out / "recipe.json").read_text())
    adapter = load_model(str(out))
    model, processor = adapter.model, adapter.processor
    model.set_attn_implementation("sdpa")
    args = meta["args"]
    batcher = Batcher(processor, model.config)
    meta.setdefault("metrics_at_training_end", meta["metrics"])
    meta["metrics"] = evaluate(model, batcher, args["final_eval_n"], 20_000 + args["seed"], args["budget"])
    atomic_write_json(out / "recipe.json", meta)
    return meta


def main(argv=None) -> None:
    run_recipe(argv, RecipeArgs, train, reevaluate, DEFAULT_OUT, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    main()
