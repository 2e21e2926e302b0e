"""module_state.snapshot / ModuleState.restore on their own: what a forward pass does to a module's
containers, and that restore undoes exactly that (cases found by mutation testing, docs/testing.md).
Each test snapshots, lets a forward pass change the module, restores and checks."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from gammaguide.module_state import _MAX_DEPTH, snapshot


def restored(module: nn.Module, change) -> "object":
    state = snapshot(module.modules())
    change(module)
    state.restore()
    return state


def test_a_dict_subclass_with_a_value_replaced_under_the_same_key_gets_it_back():
    m = nn.Module()
    kept = torch.zeros(1)
    m.cache = OrderedDict(a=kept)
    restored(m, lambda m: m.cache.__setitem__("a", torch.ones(1)))
    assert m.cache["a"] is kept and list(m.cache) == ["a"]


def test_a_dict_subclass_whose_key_was_renamed_gets_its_key_back():
    m = nn.Module()
    kept = object()
    m.cache = OrderedDict(a=kept)

    def rename(m):
        m.cache["b"] = m.cache.pop("a")  # same length, same value, another key

    restored(m, rename)
    assert list(m.cache.items()) == [("a", kept)]


def test_a_set_whose_member_was_swapped_gets_it_back():
    m = nn.Module()
    m.seen = {"x"}

    def swap(m):
        m.seen.discard("x")
        m.seen.add("y")  # same length, another member

    restored(m, swap)
    assert m.seen == {"x"}


def test_a_plain_dicts_order_is_put_back_even_with_the_same_values():
    m = nn.Module()
    shared = object()
    m.table = {"a": shared, "b": shared}

    def reorder(m):
        del m.table["a"]
        m.table["a"] = shared  # {"b", "a"}: equal as a set of keys, same values

    restored(m, reorder)
    assert list(m.table) == ["a", "b"]


def nest(depth: int) -> tuple[list, list]:
    """A list nested ``depth`` lists below the attribute's own list: (outermost, innermost)."""
    inner: list = [1]
    outer = inner
    for _ in range(depth):
        outer = [outer]
    return outer, inner


def test_containers_are_followed_down_to_the_documented_depth_and_no_further():
    m = nn.Module()
    m.deep, at_limit = nest(_MAX_DEPTH)  # the attribute's list is at depth 0: this one at the limit
    m.deeper, past_limit = nest(_MAX_DEPTH + 1)

    def fill(m):
        at_limit.append(2)
        past_limit.append(2)

    restored(m, fill)
    assert at_limit == [1]  # recorded and put back
    assert past_limit == [1, 2]  # deeper than _MAX_DEPTH: not followed, left as forward made it


def test_a_container_reachable_twice_is_recorded_once():
    m = nn.Module()
    loop: list = []
    loop += [loop, loop]  # a list holding itself twice: 2^depth paths, one container
    table: dict = {}
    table["self"] = table
    m.loop, m.again, m.table = loop, loop, table
    state = snapshot([m])
    assert [id(c) for c, _ in state.others].count(id(loop)) == 1
    assert [id(d) for d in state.dicts].count(id(table)) == 1
    loop.append(3)
    state.restore()
    assert len(loop) == 2 and loop[0] is loop


def test_materialized_names_only_the_lazy_modules_the_pass_called():
    m = nn.Module()
    m.used, m.idle = nn.LazyLinear(3), nn.LazyLinear(3)
    state = restored(m, lambda m: m.used(torch.randn(2, 5)))
    assert set(state.materialized) == {id(m.used.weight), id(m.used.bias)}
    assert state.materialized[id(m.used.weight)] == (3, 5)
    assert isinstance(m.used, nn.LazyLinear) and isinstance(m.idle, nn.LazyLinear)
    assert m.used(torch.randn(2, 7)).shape == (2, 3)  # lazy again: its first real call sets in_features


def test_a_key_moved_between_two_dicts_recorded_side_by_side_goes_back():
    # Same keys and values when both dicts are read one after the other: only their lengths differ.
    m = nn.Module()
    v = object()
    first, second = {"k": v}, {}
    m.pair = [first, second]
    restored(m, lambda m: second.__setitem__("k", first.pop("k")))
    assert first == {"k": v} and second == {}


def test_a_dict_whose_tensor_keys_cannot_be_compared_is_put_back():
    m = nn.Module()
    kept, other = torch.zeros(2), torch.ones(2)  # == between them is a tensor, not a bool
    m.table = {kept: "a"}

    def rekey(m):
        del m.table[kept]
        m.table[other] = "a"

    restored(m, rekey)
    assert list(m.table) == [kept]


def test_tensors_noted_are_the_modules_own_not_their_parameters():
    m = nn.Linear(3, 2)
    state = snapshot([m])
    assert state.tensors == set()
    m.cache = torch.zeros(1)
    assert snapshot([m]).tensors == {id(m.cache)}


def test_buffers_and_submodules_added_next_to_existing_ones_are_removed():
    m = nn.BatchNorm1d(3)  # its _buffers and _parameters are not empty
    m.sub = nn.Linear(1, 1)  # nor its _modules
    buffers, modules = dict(m._buffers), dict(m._modules)

    def grow(m):
        m.register_buffer("extra", torch.zeros(1))
        m.another = nn.ReLU()

    restored(m, grow)
    assert m._buffers == buffers and m._modules == modules
    assert not hasattr(m, "extra") and not hasattr(m, "another")


def test_a_module_missing_one_of_nn_modules_containers_is_still_restored():
    # A module made without nn.Module.__init__ for all its containers (old pickles, odd subclasses).
    m = nn.BatchNorm1d(3)
    del m.__dict__["_state_dict_pre_hooks"]
    buffers = dict(m._buffers)
    restored(m, lambda m: m.register_buffer("extra", torch.zeros(1)))
    assert m._buffers == buffers


def test_the_parameters_of_an_fsdp2_module_are_left_to_fsdp():
    # FSDP2 swaps parameter objects in and out around every forward pass and keeps track of which
    # are in: putting back the ones held before the pass would break its bookkeeping.
    dist = pytest.importorskip("torch.distributed")
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("no gloo backend")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        m.cache = {}
        fsdp.fully_shard(m[0])
        fsdp.fully_shard(m)
        before = [id(p) for p in m.parameters()]
        state = snapshot(m.modules())
        m(torch.randn(3, 4))
        m.cache["x"] = 1
        left_by_fsdp = [id(p) for p in m.parameters()]
        state.restore()
        assert left_by_fsdp != before  # FSDP did swap them (else this test shows nothing)
        assert [id(p) for p in m.parameters()] == left_by_fsdp
        assert m.cache == {}  # what is not FSDP's is still put back
    finally:
        dist.destroy_process_group()
