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


NATIVE = [8, None, 8, None]  # layers 0 and 2 slide natively at 8


def test_native_layers_are_fixed_and_not_counted(tmp_path):
    a = Allocation.from_units([1, 0, 0, 0], "kv_head", SHAPE, 4, sinks=1, native=NATIVE)
    assert a.num_units == 4 and a.num_fixed == 4 and a.num_swa == 3 and a.sparsity == 0.75
    assert a.fa == ((False, False), (True, False), (False, False), (False, False))
    assert a.fixed == ((True, True), (False, False), (True, True), (False, False))
    assert a.span == ((8, 8), (None, 4), (8, 8), (4, 4)) and a.native == NATIVE
    assert a.units == [True, False, False, False]
    assert [a.layer_window(i) for i in range(4)] == [(8, 0), (4, 1), (8, 0), (4, 1)]  # native layers: no sinks
    doc = json.loads(a.save(tmp_path / "a.json").read_text())
    assert doc["version"] == 2 and doc["fixed"][0] == [1, 1] and doc["span"][1] == [None, 4] and doc["num_swa_units"] == 3
    b = Allocation.load(tmp_path / "a.json")
    assert b == a and b.native == NATIVE
    assert b.with_window(6).span == ((8, 8), (None, 6), (8, 8), (6, 6))  # a native window never moves
    layer = Allocation.from_units([0, 1], "layer", SHAPE, 4, native=NATIVE)
    assert layer.num_units == 2 and layer.num_swa == 1 and layer.stats()["fixed_units"] == 2
    with pytest.raises(AllocationError, match="expected 4"):
        Allocation.from_units([1] * 8, "kv_head", SHAPE, 4, native=NATIVE)


def test_version_1_files_load_unchanged(tmp_path):
    doc = {"format": "consa.allocation", "version": 1, "granularity": "kv_head",
           "shape": {"num_layers": 4, "num_kv_heads": 2, "num_q_heads": 4}, "window": 16, "sinks": 0,
           "fa": [[0, 0], [1, 1], [1, 0], [0, 0]], "num_swa_units": 5, "meta": {"method": "old"}}
    (tmp_path / "v1.json").write_text(json.dumps(doc))
    a = Allocation.load(tmp_path / "v1.json")
    assert a == Allocation.from_units([0, 0, 1, 1, 1, 0, 0, 0], "kv_head", SHAPE, 16)
    assert a.num_fixed == 0 and a.span[2] == (None, 16) and a.native == [None] * 4 and a.meta == {"method": "old"}


@pytest.mark.parametrize("key,value,match", [
    ("span", [[None, 4], [4, 4], [4, 4], [4, 4]], "null exactly for full-attention"),
    ("span", [[16, 16], [16, 16], [16, 16], [16, 16]], "null exactly for full-attention"),
    ("span", [[None, None], [4, 4], [4, 4], [4, 5]], "layer 3 several spans"),  # layer units: one span a layer
    ("span", [[None, None], [4, 4], [4, 4], [5, 5]], "window 4 must be the largest span"),
    ("span", [[None, None], [4, 4], [4, 4], [4, 0]], "integer >= 1"),
    ("fixed", [[1, 0], [0, 0], [0, 0], [0, 0]], "fixes only some heads"),
    ("fixed", [[0, 0], [0, 0], [0, 0]], "3 rows of 'fixed'"),
])
def test_bad_version_2_records(key, value, match):
    doc = Allocation.from_units([1, 0, 0, 0], "layer", SHAPE, 4).to_dict()
    doc[key] = value
    with pytest.raises(AllocationError, match=match):
        Allocation.from_dict(doc)
