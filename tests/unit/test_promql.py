"""services/tools/promql.py: the PromQL subset the dashboard figure evaluates when no
Prometheus runs. Expected values with their arithmetic (Prometheus's definitions)."""
from __future__ import annotations


import pytest

from services.tools.promql import PromQLError, SeriesStore, evaluate, metric_names_in, parse, query_range


def store_with(**series) -> SeriesStore:
    """``name={"a=x,b=y": [(t, v), ...]}``."""
    s = SeriesStore()
    for name, by_labels in series.items():
        for labels, points in by_labels.items():
            d = dict(kv.split("=") for kv in labels.split(",")) if labels else {}
            for t, v in points:
                s.add(t, name, d, v)
    return s


def test_rate_is_the_increase_over_the_window_and_survives_a_counter_reset():
    s = store_with(c_total={"w=1": [(0, 0), (1, 10), (2, 20), (3, 5), (4, 15)]})
    [(labels, v)] = evaluate(parse("rate(c_total[10s])"), s, t=4).items()
    assert dict(labels) == {"w": "1"}
    assert v == pytest.approx((10 + 10 + 5 + 10) / 4)     # the reset at t=3 restarts from 0
    assert evaluate(parse("increase(c_total[2.5s])"), s, t=4) == {labels: 5 + 10}   # samples t=2..4
    assert evaluate(parse("rate(c_total[0.5s])"), s, t=4) == {}   # one sample: no rate


def test_histogram_quantile_interpolates_within_the_bucket_holding_the_rank():
    s = store_with(h_bucket={"le=0.1": [(0, 2)], "le=0.2": [(0, 6)], "le=+Inf": [(0, 8)]})
    q = lambda x: evaluate(parse(f"histogram_quantile({x}, h_bucket)"), s, t=0)[frozenset()]   # noqa: E731
    assert q(0.5) == pytest.approx(0.1 + (0.2 - 0.1) * (4 - 2) / (6 - 2))   # rank 0.5 * 8 = 4
    assert q(0.25) == pytest.approx(0.0 + 0.1 * 2 / 2)                       # rank 2, first bucket
    assert q(0.99) == 0.2          # rank 7.92 in the +Inf bucket: the highest finite bound


def test_aggregation_selection_and_division():
    s = store_with(x={"task=a,w=1": [(0, 2)], "task=a,w=2": [(0, 4)], "task=b,w=3": [(0, 10)]},
                   y={"task=a": [(0, 3)], "task=b": [(0, 5)]})
    by_task = evaluate(parse("sum by (task) (x) / sum by (task) (y)"), s, t=0)
    assert by_task == {frozenset({("task", "a")}): (2 + 4) / 3, frozenset({("task", "b")}): 10 / 5}
    assert evaluate(parse('sum(x{task!="b"})'), s, t=0) == {frozenset(): 6}
    assert evaluate(parse('count(x{w=~"1|3"})'), s, t=0) == {frozenset(): 2}
    assert evaluate(parse("max without (w) (x) * 2"), s, t=0)[frozenset({("task", "b")})] == 20
    assert evaluate(parse("sum(x) by (task)"), s, t=0)[frozenset({("task", "a")})] == 6


def test_an_instant_selector_takes_the_last_sample_within_the_lookback():
    s = store_with(g={"": [(0, 1), (10, 2)]})
    assert evaluate(parse("g"), s, t=12) == {frozenset(): 2}
    assert evaluate(parse("g"), s, t=9) == {frozenset(): 1}
    assert evaluate(parse("g"), s, t=400) == {}            # older than 5 minutes


def test_query_range_steps_through_the_run():
    s = store_with(c_total={"": [(t, 3 * t) for t in range(11)]})
    [(labels, (ts, vs))] = query_range("rate(c_total[2s])", s, 2, 10, 2).items()
    assert ts == [2, 4, 6, 8, 10] and vs == pytest.approx([3.0] * 5)


@pytest.mark.parametrize("text,error", [
    ("rate(x)", "range selector"),
    ("irate(x[5s])", "not supported"),
    ("rate(x[$__rate_interval])", "unresolved variable"),
    ("sum by (a (x)", "expected"),
    ("x{a=b}", "expected 'str'"),
])
def test_outside_the_subset_is_refused_by_name(text, error):
    with pytest.raises(PromQLError, match=error):
        parse(text)


def test_metric_names_of_a_query():
    node = parse('histogram_quantile(0.9, sum by (le) (rate(a_bucket[5s]))) / b + c{x="1"}')
    assert metric_names_in(node) == {"a_bucket", "b", "c"}
