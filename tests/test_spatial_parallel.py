"""The spatially partitioned locally connected layer: row blocks and halos (pure layout
math), and layers split by the spatial plan (partition_network) on 2 and 4 real gloo ranks
against one process."""

import pytest

from conftest import SCRIPTS, torchrun
from terabrain.errors import ConfigError
from terabrain.parallel.spatial import halo_bytes, row_partition


def test_row_blocks_cover_every_output_row_and_halos_are_what_fields_read():
    # Ni et al. 2015 layer 1 geometry at 300 x 300: 72 output rows, fields 16 rows, stride 4.
    blocks = row_partition(300, 16, 4, 5)
    assert [b.output_rows for b in blocks] == [(0, 15), (15, 30), (30, 44), (44, 58), (58, 72)]
    assert blocks[0].owned_rows == (0, 60) and blocks[-1].owned_rows == (232, 300)
    for block in blocks[:-1]:
        # A field starting at the last output row reads 16 rows: 12 beyond the own rows.
        assert block.receives == ((block.rank + 1, (block.owned_rows[1], block.owned_rows[1] + 12)),)
        assert block.halo_rows == 12
    assert blocks[-1].receives == () and blocks[-1].needed_rows == (232, 300)
    # What one rank receives, its peer sends.
    sent = {(b.rank, peer, rows) for b in blocks for peer, rows in b.sends}
    received = {(peer, b.rank, rows) for b in blocks for peer, rows in b.receives}
    assert sent == received


def test_halo_spanning_several_ranks_and_no_halo_without_overlap():
    blocks = row_partition(12, 7, 1, 4)  # 6 output rows: 2, 2, 1, 1
    assert blocks[0].needed_rows == (0, 8)
    assert blocks[0].receives == ((1, (2, 4)), (2, (4, 5)), (3, (5, 8)))
    assert blocks[0].halo_rows == 6
    assert all(b.receives == () for b in row_partition(20, 2, 3, 3))  # fields do not overlap


def test_halo_bytes_count_rows_times_batch_channels_width():
    counts = halo_bytes((300, 300), 3, 16, 4, 2, batch=192)
    row_bytes = 192 * 3 * 300 * 4
    assert counts == [{"rank": 0, "sent": 0, "received": 12 * row_bytes},
                      {"rank": 1, "sent": 12 * row_bytes, "received": 0}]


def test_more_ranks_than_output_rows_is_a_config_error():
    with pytest.raises(ConfigError, match=r"parallel.model \(8\).*7 output rows"):
        row_partition(16, 4, 2, 8)


@pytest.mark.parametrize("nproc", [2, 4])
def test_partitioned_layer_on_gloo_ranks_equals_one_process(nproc):
    result = torchrun(nproc, str(SCRIPTS / "spatial_equivalence.py"))
    assert result.returncode == 0, result.stdout + result.stderr
    for rank in range(nproc):
        assert f"rank {rank}: all cases ok" in result.stdout, result.stdout + result.stderr
