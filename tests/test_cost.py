"""Cost accounting reproduces the paper's numbers (sec. 3.5 and Table 1's KV sizes)."""

from __future__ import annotations

import json

import pytest

from gazejax.cost import attention_cost, main, regions_per_unit
from gazejax.gaze.regions import RegionSize


def test_section_3_5_example():
    cost = attention_cost(
        units=8, grid=(24, 24), region_size=(6, 6, 1), top_k=20, num_context_tokens=4
    )
    assert cost["dense"].entries == 4608 and cost["gaze"].entries == 752
    assert round(cost["gaze"].entries / cost["dense"].entries, 3) == 0.163
    assert cost["dense"].flops == 4608 * 4 * 128  # q.k and p.v over every visual entry
    assert cost["gaze"].flops == 752 * 4 * 128 + 128 * 2 * 128  # plus scoring 128 regions


@pytest.mark.parametrize(
    "grid,region,top_k,entries",
    [
        ((24, 24), (6, 6, 1), 8, 288 + 4),
        ((24, 24), (6, 6, 1), 4, 144 + 4),
        ((24, 24), (6, 6, 1), 2, 72 + 4),
        ((12, 12), (3, 3, 1), 6, 54 + 4),
        ((12, 12), (3, 3, 1), 4, 36 + 4),
    ],
)
def test_table_1_kv_sizes(grid, region, top_k, entries):
    cost = attention_cost(units=1, grid=grid, region_size=region, top_k=top_k, num_context_tokens=4)
    assert cost["gaze"].entries == entries


def test_ragged_regions_and_k_beyond_the_regions():
    assert regions_per_unit((10, 10), 3, RegionSize(4, 4, 2)) == 3 * 3 * 2
    cost = attention_cost(
        units=1, grid=(12, 12), region_size=(6, 6, 1), top_k=50, num_context_tokens=0
    )
    assert cost["gaze"].entries == 4 * 36  # all 4 regions


def test_cli_prints_theory_and_measured(tmp_path, capsys):
    record = {
        "impl": "xla",
        "dtype": "float32",
        "routing": "shared",
        "n_visual": 4608,
        "top_k": 20,
        "speedup": 5.7,
        "byte_bound": 5.3,
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps([record, {**record, "impl": "reference"}]))
    assert main(["--benchmark-json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| entries | 4,608 | 752 | 16.3% |" in out
    assert "| xla | float32 | shared | 4608 | 20 | 5.70 | 5.30 |" in out
    assert "| reference |" not in out
