"""bench/pick_tiles.py: choosing the GEMV tiles the app tunes over from a sweep's timings."""

import json
from pathlib import Path

import pytest

from bench import pick_tiles

ROOT = Path(__file__).resolve().parents[1]


def _rows(table):
    return [{"n": n, "k": k, "BLOCK_N": t[0], "SPLIT": t[1], "num_warps": 2, "PREFETCH": False, "LOOP_STAGES": 1,
             **({"HALF2": True} if t[2] else {}), "us": us}
            for (n, k), times in table.items() for t, us in times.items()]


@pytest.mark.parametrize("exhaustive", [True, False])
def test_the_pair_that_covers_the_shapes_best_is_chosen(exhaustive, monkeypatch):
    # A is good on the big shape only, B on the small ones, C is fair everywhere: the best pair is A + B,
    # though C alone is the best single tile (the greedy start), which the swaps must undo.
    a, b, c = (512, 8, False), (128, 32, False), (256, 16, True)
    table = {(100, 100): {a: 9.0, b: 1.0, c: 2.0}, (200, 100): {a: 9.0, b: 1.0, c: 2.0},
             (300, 100): {a: 1.0, b: 9.0, c: 2.5}}
    if not exhaustive:
        monkeypatch.setattr(pick_tiles, "EXHAUSTIVE_LIMIT", 0)
    timings = pick_tiles.timings(_rows(table) + [{"tuned_pick": True, "n": 100, "k": 100, "us": 0.1}])
    layers = {shape: 1 for shape in table}
    assert pick_tiles.choose(timings, 1, layers) == ((256, 16, 2, False, 1, True, 0),)
    assert pick_tiles.choose(timings, 2, layers) == tuple(sorted([(512, 8, 2, False, 1, False, 0),
                                                                  (128, 32, 2, False, 1, False, 0)]))


def test_a_tile_a_shape_did_not_run_counts_as_never_winning():
    table = {(1, 1): {(64, 1, 1, False, 1, False, 0): 5.0}, (2, 1): {(128, 1, 1, False, 1, False, 0): 5.0}}
    assert pick_tiles.step_us([(64, 1, 1, False, 1, False, 0)], table, {}) == float("inf")
    assert pick_tiles.step_us([(64, 1, 1, False, 1, False, 0), (128, 1, 1, False, 1, False, 0)], table, {}) == 10.0


def test_on_the_h200_sweep_the_chosen_five_are_no_worse_than_the_apps_and_print_as_configs():
    rows = json.loads((ROOT / "bench" / "results" / "int4_gemv_sweep_h200_s21.json").read_text())
    table = pick_tiles.timings(rows)
    current = [(256, 16, 4, True, 1, False, 0), (128, 64, 2, True, 1, False, 0), (128, 32, 2, False, 1, False, 0),
               (512, 16, 2, False, 1, False, 0), (512, 8, 2, False, 1, False, 0)]  # session 21's pick
    chosen = pick_tiles.choose(table, 5)
    assert len(chosen) == 5
    assert pick_tiles.step_us(chosen, table, pick_tiles.LAYERS) <= pick_tiles.step_us(current, table, pick_tiles.LAYERS)
    line = pick_tiles.config_line((512, 8, 2, False, 1, True, 0))
    assert line == "triton.Config({'BLOCK_N': 512, 'SPLIT': 8, 'PREFETCH': False, 'HALF2': True}, num_warps=2, num_stages=1)"
    ahead = pick_tiles.config_line((256, 8, 2, False, 1, True, 4))  # asking the L2 4 groups ahead
    assert ahead == ("triton.Config({'BLOCK_N': 256, 'SPLIT': 8, 'PREFETCH': False, 'HALF2': True, 'L2_AHEAD': 4}, "
                     "num_warps=2, num_stages=1)")
    assert pick_tiles.tile_of({"BLOCK_N": 256, "SPLIT": 8, "num_warps": 2, "PREFETCH": False, "HALF2": True,
                               "L2_AHEAD": 4}) == (256, 8, 2, False, 1, True, 4)
    text = pick_tiles.report(table, chosen, tuple(current))
    assert text.count("\n| ") == len(table) and "current 4450" in text  # a row per shape; session 21 had 4,449
