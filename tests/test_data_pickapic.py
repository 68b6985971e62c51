"""Pick-a-Pic loading/cleaning, latent cache and tiny-world preference labelling."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from deradiff.data.cache import CachedPairs, Encoder, LivePairs, build_cache
from deradiff.data.pickapic import data_fingerprint, decode_image, load_preference_pairs
from deradiff.data.prefs import bradley_terry_labels
from deradiff.errors import DeradiffError
from deradiff.testing import synthetic_pairs, tiny_sd_pipeline, write_pairs


def test_cleaning_drops_ties_skips_undecodable_and_orients(tmp_path):
    src = write_pairs(tmp_path / "p.parquet", 10, ties=2, corrupt=1)
    with pytest.warns(UserWarning, match="1 preference pairs with undecodable images"):
        pairs, stats = load_preference_pairs(src)
    assert (stats.rows, stats.ties, stats.undecodable, stats.kept) == (10, 2, 1, 7)
    assert len(pairs) == 7 and pairs.column_names == ["caption", "jpg_w", "jpg_l"]
    for row in pairs:  # the bright image was the preferred one in every decided row
        w = torch.tensor(np.asarray(decode_image(row["jpg_w"]))).float().mean()
        lo = torch.tensor(np.asarray(decode_image(row["jpg_l"]))).float().mean()
        assert w > lo
    assert data_fingerprint(src, stats) == data_fingerprint(src, stats)


def test_bad_labels_and_max_pairs(tmp_path):
    rows = synthetic_pairs(6)
    rows["label_0"][5], rows["label_1"][5] = 0.0, 0.0
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table(rows), str(path))
    pairs, stats = load_preference_pairs(str(path), max_pairs=3)
    assert stats.bad_labels == 1 and len(pairs) == 3


def test_missing_columns_and_zero_usable_rows_are_clear_errors(tmp_path):
    rows = synthetic_pairs(4)
    del rows["label_1"]
    pq.write_table(pa.table(rows), str(tmp_path / "a.parquet"))
    with pytest.raises(DeradiffError, match="lacks column.*label_1"):
        load_preference_pairs(str(tmp_path / "a.parquet"))
    src = write_pairs(tmp_path / "b.parquet", 3, ties=3)
    with pytest.raises(DeradiffError, match="no usable preference pairs"):
        load_preference_pairs(src)
    with pytest.raises(DeradiffError, match="has no parquet"):
        load_preference_pairs(str(tmp_path / "empty_dir_that_is_missing/"))


def test_cache_equals_live_encoding(tmp_path):
    pairs, _ = load_preference_pairs(write_pairs(tmp_path / "p.parquet", 5))
    encoder = Encoder(tiny_sd_pipeline(), 16, "cpu", torch.float32, seed=1)
    cached = build_cache(pairs, encoder, tmp_path / "cache", batch_size=2, shard_rows=2, progress=False)
    assert len(cached) == 5 and len(cached.index["shards"]) == 3
    live = LivePairs(pairs, encoder).get([4, 0])
    again = CachedPairs(tmp_path / "cache").get([4, 0])
    assert set(live) == set(again) == {"latents_w", "latents_l", "prompt_embeds"}
    for key in live:
        torch.testing.assert_close(live[key], again[key], rtol=1e-5, atol=1e-5)


def test_bradley_terry_labels():
    r0, r1 = torch.tensor([1.0, 0.0, 0.5] * 2000), torch.tensor([0.0, 1.0, 0.5] * 2000)
    hard = bradley_terry_labels(r0, r1, 0.0, torch.Generator())
    assert hard[:3].tolist() == [1.0, 0.0, 1.0]
    soft = bradley_terry_labels(r0, r1, 1.0, torch.Generator().manual_seed(0)).view(-1, 3).mean(0)
    p = torch.sigmoid(torch.tensor(1.0)).item()
    assert soft.tolist() == pytest.approx([p, 1 - p, 0.5], abs=0.03)
