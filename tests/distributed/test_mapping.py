"""Mapping: validation, rank layout and pipeline layer ranges."""

from __future__ import annotations

import pytest

from rtllm.distributed import Mapping
from rtllm.distributed import parallel_state as ps


def test_default_is_single_rank():
    m = Mapping()
    assert (m.tp_rank, m.pp_rank, m.tp_group, m.pp_group) == (0, 0, [0], [0])
    assert m.is_first_pp_rank and m.is_last_pp_rank
    assert m.pp_layers(3) == range(0, 3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"world_size": 4, "tp_size": 2, "pp_size": 1},
        {"world_size": 2, "rank": 2, "tp_size": 2},
        {"world_size": 0},
        {"world_size": 2, "rank": -1, "tp_size": 2},
        {"world_size": 2, "tp_size": True, "pp_size": 2},
    ],
)
def test_invalid(kwargs):
    with pytest.raises(ValueError):
        Mapping(**kwargs)


def test_tp_major_layout():
    # rank = pp_rank * tp_size + tp_rank
    layout = [Mapping(8, r, tp_size=4, pp_size=2) for r in range(8)]
    assert [m.tp_rank for m in layout] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert [m.pp_rank for m in layout] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert layout[5].tp_group == [4, 5, 6, 7]
    assert layout[5].pp_group == [1, 5]
    assert layout[1].next_pp_rank == 5 and layout[5].prev_pp_rank == 1
    assert layout[1].is_first_pp_rank and not layout[1].is_last_pp_rank
    with pytest.raises(ValueError):
        _ = layout[0].prev_pp_rank
    with pytest.raises(ValueError):
        _ = layout[4].next_pp_rank


@pytest.mark.parametrize("num_layers,pp_size", [(7, 3), (8, 4), (2, 2), (5, 1), (30, 4)])
def test_pp_layers_contiguous_and_even(num_layers, pp_size):
    m = Mapping(pp_size, 0, 1, pp_size)
    ranges = [m.pp_layers(num_layers, s) for s in range(pp_size)]
    assert [i for r in ranges for i in r] == list(range(num_layers))
    sizes = [len(r) for r in ranges]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_pp_layers_needs_a_layer_per_stage():
    with pytest.raises(ValueError, match="cannot be split"):
        Mapping(4, 0, 1, 4).pp_layers(3)


def test_collectives_are_noops_without_tp():
    import torch

    x = torch.arange(4.0)
    assert ps.get_mapping() == Mapping()
    assert ps.tp_all_reduce(x) is x
    assert ps.tp_all_gather(x) is x
