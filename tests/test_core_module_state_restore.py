"""module_state.snapshot / ModuleState.restore on their own: what a forward pass does to a module's
containers, and that restore undoes exactly that (cases found by mutation testing, docs/testing.md).
Each test snapshots, lets a forward pass change the module, restores and checks."""

from __future__ import annotations

from collections import OrderedDict

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
