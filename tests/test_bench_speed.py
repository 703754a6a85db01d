"""`sdrpn bench speed` runs every variant on a tiny model and prints its table; bad options are one line. No timing."""

from __future__ import annotations

import json

import pytest
import torch
from scipy import ndimage

from sdrpn.benchmark_speed import VARIANTS, blob_map, format_speed_table, measure, speed_zoom
from sdrpn.cli import main
from sdrpn.rpn import RegionProposalNetwork


def test_every_variant_runs_and_the_table_prints(llava_adapter):
    torch.manual_seed(0)
    rpn = RegionProposalNetwork(llava_adapter, 2, 3).eval()
    zoom = speed_zoom(llava_adapter, rpn, new_tokens=2, given_maps=True, vicrop_layer=1)
    result = measure(zoom, (1, 2), samples=2, seed=7, progress=False)
    rows = {(row["variant"], row["batch"]): row for row in result["rows"]}
    assert set(rows) == {(v.name, b) for v in VARIANTS for b in (1, 2)}
    for batch in (1, 2):
        assert rows[("base", batch)]["throughput_vs_base"] == 1.0
        assert rows[("base", batch)]["mean_extra_tokens"] == 0
        for name in ("SD-RPN mask", "SD-RPN box", "SD-RPN mask, recompute", "ViCrop official", "ViCrop (sdrpn)"):
            assert rows[(name, batch)]["mean_extra_tokens"] > 0, f"{name} added no crop: its path did not run"
        assert rows[("SD-RPN no region", batch)]["mean_extra_tokens"] == 0
        assert all(row["seconds_per_answer"] > 0 for row in result["rows"])
    assert set(result["memory"]) == {"greedy", "label_capture", "eager_output_attentions"}
    table = format_speed_table(result)
    for variant in VARIANTS:
        assert variant.name in table
    assert "sdrpn_mask_vs_base" in table and "roi_stage_official_vicrop_over_sdrpn" in table


def test_the_given_map_makes_two_regions_of_part_of_the_grid():
    probability = blob_map((24, 24))
    _, regions = ndimage.label(probability > 0.15)
    assert regions == 2 and 20 < (probability > 0.15).sum() < 200 and probability.max() > 0.9


@pytest.mark.parametrize(
    "options, message",
    [
        (["--batch", "0"], "--batch"),
        (["--batch", "1,x"], "--batch"),
        (["--model", "llava70b-shape"], "unknown model shape"),
        (["--model", "llava7b-shape", "--device", "cuda:99"], "cuda"),
    ],
)
def test_bad_options_are_one_line(options, message, capsys):
    assert main(["bench", "speed", *options]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message.lower() in err.lower()


def test_pieces_time_every_part_of_one_answer(tmp_path, capsys):
    out = tmp_path / "pieces.json"
    argv = ["bench", "speed", "--model", "toy", "--pieces", "--samples", "1", "--new-tokens", "2", "--json", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    seconds = result["seconds"]
    assert {"vision tower, the image", "stage 1: the RPN", "whole answer, base", "whole answer, SD-RPN mask"} <= set(
        seconds
    )
    assert all(value > 0 for value in seconds.values())
    printed = capsys.readouterr().out
    assert "SD-RPN no region throughput / base" in printed and len(printed.strip().splitlines()) == len(seconds) + 3
