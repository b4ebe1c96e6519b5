"""The metric-name reading of PromQL that the dashboard tests rely on."""

from __future__ import annotations

import pytest

from tests.promql import metric_names, substitute


@pytest.mark.parametrize(("expr", "names"), [
    ("fedkube_round", {"fedkube_round"}),
    ('max(fedkube_round{namespace="$namespace", job="$job"})', {"fedkube_round"}),
    ("histogram_quantile(0.95, sum by (le, job) (rate(x_bucket{le!=\"1\"}[$__rate_interval])))",
     {"x_bucket"}),
    ('sum(rate(a_total{result="error"}[5m])) / sum(rate(b_total[5m]))', {"a_total", "b_total"}),
    ("max(r) / on (job) group_left (phase) max(t)", {"r", "t"}),
    ("sum(x) by (le) > bool 1e3", {"x"}),
    ("up offset 1h5m and foo @ 100", {"up", "foo"}),
    ("sum without (instance) (job:rate5m)", {"job:rate5m"}),
    ('count_values("value", build_info)', {"build_info"}),
    ("vector(1)", set()),
])
def test_metric_names(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_unreadable_expression_is_an_error() -> None:
    with pytest.raises(ValueError, match="cannot read PromQL"):
        metric_names("sum(x) ; drop")


def test_substitute_longest_variable_first() -> None:
    assert substitute('x{job="$job", j="${jobs}"}[$__rate_interval]',
                      {"job": "a", "jobs": "b", "__rate_interval": "30s"}) == \
        'x{job="a", j="b"}[30s]'
