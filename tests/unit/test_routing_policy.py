"""MostAccurateFirst: fill the most accurate workers up to their planned share, spill
the rest down the accuracy ladder."""
import pytest
from hypothesis import given, strategies as st

from services.policy.routing import MostAccurateFirstPolicy, RouteTable, most_accurate_first

W = {"hi": 0.25, "mid": 0.25, "lo": 0.5}
ACC = {"hi": 0.99, "mid": 0.9, "lo": 0.6}


def test_planned_demand_routes_the_planned_split():
    assert most_accurate_first(W, ACC, 1.0) == pytest.approx(W)


def test_less_demand_takes_traffic_from_the_least_accurate_first():
    eff = most_accurate_first(W, ACC, 0.6)
    # 0.6 of the planned rate: hi and mid full (0.25 each), lo gets 0.1; normalised by 0.6
    assert eff == pytest.approx({"hi": 0.25 / 0.6, "mid": 0.25 / 0.6, "lo": 0.1 / 0.6})
    assert most_accurate_first(W, ACC, 0.2) == {"hi": 1.0}


def test_more_demand_overloads_everyone_by_the_same_factor():
    assert most_accurate_first(W, ACC, 2.0) == pytest.approx(W)


def test_zero_weights_get_nothing_and_no_weight_is_an_error():
    assert "x" not in most_accurate_first({**W, "x": 0.0}, {**ACC, "x": 1.0}, 0.1)
    with pytest.raises(ValueError):
        most_accurate_first({"a": 0.0}, {"a": 1.0})


def test_table_choice_is_deterministic_and_accuracy_ordered():
    t = RouteTable.build(W, ACC, 1.0)
    assert t.ids == ("hi", "mid", "lo")
    assert [t.choose(u) for u in (0.0, 0.24, 0.26, 0.51, 0.999)] == ["hi", "hi", "mid", "lo", "lo"]
    p = MostAccurateFirstPolicy(ACC, fill=1.0)
    assert p.choose(W, 0.3, 0.5) == "hi"       # 0.5 of planned: hi holds 0.25/0.5 = half the traffic
    assert p.choose(W, 0.7, 0.5) == "mid"


@given(st.dictionaries(st.sampled_from("abcdef"), st.floats(0.01, 10), min_size=1),
       st.floats(0.01, 5.0))
def test_effective_weights_are_a_distribution_favouring_accuracy(weights, ratio):
    acc = {k: 0.1 * (i + 1) for i, k in enumerate(sorted(weights))}
    eff = most_accurate_first(weights, acc, ratio)
    assert sum(eff.values()) == pytest.approx(1.0)
    total = sum(weights.values())
    if ratio <= 1.0:   # nobody exceeds its planned capacity, in units of the observed rate
        for k, x in eff.items():
            assert x * ratio <= weights[k] / total + 1e-9


def test_equally_accurate_workers_share_traffic_instead_of_packing_it():
    # three workers of one variant, planned for twice the demand they see: spreading the
    # traffic keeps each at half its planned load; packing it would run two of them full
    weights = {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}
    eff = most_accurate_first(weights, {"a": 0.9, "b": 0.9, "c": 0.9}, load_ratio=0.5)
    assert eff == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    # a more accurate class is still filled first: x takes its whole planned share
    eff = most_accurate_first({"x": 0.25, "a": 0.375, "b": 0.375}, {"x": 0.99, "a": 0.9, "b": 0.9},
                              load_ratio=0.5)
    assert eff == pytest.approx({"x": 0.5, "a": 0.25, "b": 0.25})   # 0.25/0.5, then (0.5-0.25)/2/0.5


def test_fill_caps_how_full_the_most_accurate_workers_get():
    """With fill f, MostAccurateFirst routes as for capacities f x the planned shares:
    at load ratio f the planned split itself; below it the most accurate first."""
    weights, acc = {"hi": 0.5, "lo": 0.5}, {"hi": 0.99, "lo": 0.8}
    p = MostAccurateFirstPolicy(acc, fill=0.5)
    t = p.table(weights, 0.5)
    assert dict(zip(t.ids, t.cum)) == pytest.approx({"hi": 0.5, "lo": 1.0})
    t = p.table(weights, 0.2)                       # hi's capacity is 0.25 of the plan: all of it
    assert t.ids == ("hi",)
    t = p.table(weights, 0.4)                       # hi full at 0.25, the rest (0.15) spills
    assert dict(zip(t.ids, t.cum)) == pytest.approx({"hi": 0.25 / 0.4, "lo": 1.0})
    full = MostAccurateFirstPolicy(acc, fill=1.0).table(weights, 0.4)
    assert full.ids == ("hi",)                      # fill 1: hi takes all 0.4 of its 0.5
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            MostAccurateFirstPolicy(acc, fill=bad)


def test_reroute_choice_keeps_an_on_time_worker_and_moves_a_late_group():
    from services.policy.routing import expected_finish_s, reroute_choice
    assert expected_finish_s(10.0, 9, 4, 0.5) == pytest.approx(11.5)       # 3 batches of <= 4
    assert expected_finish_s(10.0, 0, 4, 0.5) == 10.0
    finish = {"slow": 12.0, "mid": 10.9, "fast": 10.5}
    assert reroute_choice("slow", finish, deadline_s=13.0, reserve_s=0.5) == "slow"   # on time: stays
    assert reroute_choice("slow", finish, deadline_s=11.2, reserve_s=0.5) == "fast"   # late: first finisher
    assert reroute_choice("slow", finish, deadline_s=10.9, reserve_s=0.5) == "slow"   # nobody makes it
    assert reroute_choice("new", finish, deadline_s=0.0, reserve_s=0.0) == "new"      # no estimate: stays


def test_reroute_choice_moves_a_group_left_with_too_little_slack():
    from services.policy.routing import reroute_choice
    finish = {"slow": 10.8, "fast": 10.2}
    # slow makes the deadline (11.0) but with 0.2 s to spare, less than the 0.5 s slack asked
    assert reroute_choice("slow", finish, deadline_s=11.0, reserve_s=0.0, slack_s=0.5) == "fast"
    assert reroute_choice("slow", finish, deadline_s=11.0, reserve_s=0.0, slack_s=0.1) == "slow"
    # fast misses the slack too, but makes the deadline: still the better bet
    assert reroute_choice("slow", finish, deadline_s=10.5, reserve_s=0.0, slack_s=0.5) == "fast"
