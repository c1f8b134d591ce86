import json

import pytest

from consa.allocation import Allocation, AllocationError, ModelShape, swa_count

SHAPE = ModelShape(4, 2, 4)


def test_roundtrip_and_stats(tmp_path):
    a = Allocation.from_units([0, 0, 1, 1, 1, 0, 0, 0], "kv_head", SHAPE, 16, sinks=2, meta={"method": "x"})
    p = a.save(tmp_path / "a.json")
    b = Allocation.load(p)
    assert b == a and b.meta == {"method": "x"}
    st = a.stats()
    assert st["swa_units"] == 5 and st["fa_share_per_layer"] == [0.0, 1.0, 0.5, 0.0]
    assert st["fa_blocks"] == [(1, 3)] and st["contiguity"] == 1.0
    c = Allocation.from_units([1, 0, 1, 0], "layer", SHAPE, 8)
    assert c.fa_blocks() == [(0, 1), (2, 3)] and c.contiguity() == 0.5
    assert c.fa == ((True, True), (False, False), (True, True), (False, False))


@pytest.mark.parametrize("t,n,k", [(0.5, 8, 4), (0.75, 8, 6), (0.875, 8, 7), (0.75, 10, 8), (0.5, 7, 4)])
def test_swa_count_is_round_t_n(t, n, k):
    assert swa_count(t, n) == k


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_sparsity_outside_open_interval(bad):
    with pytest.raises(AllocationError, match="between 0 and 1"):
        swa_count(bad, 8)


def test_validation_errors():
    with pytest.raises(AllocationError, match="granularity"):
        Allocation.uniform(True, "head", SHAPE, 4)
    with pytest.raises(AllocationError, match="window"):
        Allocation.uniform(True, "layer", SHAPE, 0)
    with pytest.raises(AllocationError, match="mixes"):
        Allocation("layer", SHAPE, 4, ((1, 0), (1, 1), (1, 1), (1, 1)))
    with pytest.raises(AllocationError, match="multiple"):
        ModelShape(2, 3, 4)


@pytest.mark.parametrize(
    "text,match",
    [
        ("{not json", "not valid JSON"),
        ('{"format": "other"}', "not a consa allocation"),
        ('{"format": "consa.allocation", "version": 99}', "version"),
        ('{"format": "consa.allocation", "version": 1, "granularity": "layer"}', "missing the key"),
    ],
)
def test_malformed_files_are_one_clear_error(tmp_path, text, match):
    p = tmp_path / "a.json"
    p.write_text(text)
    with pytest.raises(AllocationError, match=match):
        Allocation.load(p)


def test_inconsistent_count_and_bad_bits(tmp_path):
    d = Allocation.uniform(True, "kv_head", SHAPE, 4).to_dict()
    d["num_swa_units"] = 3
    (tmp_path / "a.json").write_text(json.dumps(d))
    with pytest.raises(AllocationError, match="SWA units"):
        Allocation.load(tmp_path / "a.json")
    d = Allocation.uniform(True, "kv_head", SHAPE, 4).to_dict()
    d["fa"][0][0] = 7
    with pytest.raises(AllocationError, match="0 or 1"):
        Allocation.from_dict(d)


def test_mismatched_model_shape():
    a = Allocation.uniform(True, "kv_head", SHAPE, 4)
    with pytest.raises(AllocationError, match="the model has 5"):
        a.check_matches(ModelShape(5, 2, 4))


def test_missing_file():
    with pytest.raises(AllocationError, match="not found"):
        Allocation.load("/nonexistent/alloc.json")
