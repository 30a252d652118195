import math

import pytest

from llmopt.evaluate.metrics import Dist, RequestTiming, compute_metrics, cost_per_1k_output_tokens, summarize


def test_metrics_on_synthetic_timestamps():
    reqs = [RequestTiming(0.0, 10, [0.1, 0.2, 0.4]),   # ttft .1, tpot .15, itl .1 .2, e2el .4
            RequestTiming(0.5, 20, [1.0, 1.5])]        # ttft .5, tpot .5, itl .5, e2el 1.0
    m = compute_metrics(reqs, duration=2.0)
    assert m.output_tokens == 5 and m.input_tokens == 30
    assert m.output_tokens_per_s == pytest.approx(2.5)
    assert m.total_tokens_per_s == pytest.approx(17.5)
    assert m.requests_per_s == pytest.approx(1.0)
    assert m.ttft_ms.mean == pytest.approx(300.0)
    assert m.tpot_ms.mean == pytest.approx(325.0)
    assert m.itl_ms.mean == pytest.approx((100 + 200 + 500) / 3)
    assert m.itl_ms.p50 == pytest.approx(200.0)
    assert m.e2el_ms.mean == pytest.approx(700.0)
    assert m.e2el_ms.p50 == pytest.approx(700.0)


def test_percentiles_interpolate_linearly():
    d = Dist.of([i / 1000 for i in range(101)])  # 0..100 ms
    assert (d.p50, d.p95, d.p99) == (pytest.approx(50.0), pytest.approx(95.0), pytest.approx(99.0))
    assert Dist.of([]) == Dist(None, None, None, None)


def test_single_token_requests_have_no_tpot():
    m = compute_metrics([RequestTiming(0.0, 5, [0.2])], duration=0.2)
    assert m.tpot_ms.mean is None and m.itl_ms.mean is None and m.ttft_ms.mean == pytest.approx(200.0)


def test_summary_median_and_spread():
    runs = [compute_metrics([RequestTiming(0.0, 1, [0.1, 0.2])], duration=d) for d in (1.0, 2.0, 4.0)]
    s = summarize(runs)
    assert s.repeats == 3
    assert s.median["output_tokens_per_s"] == pytest.approx(1.0)
    assert s.spread["output_tokens_per_s"] == [pytest.approx(0.5), pytest.approx(2.0)]
    assert s.median["ttft_ms"]["p50"] == pytest.approx(100.0)


def test_cost():
    assert cost_per_1k_output_tokens(3.6, 100.0) == pytest.approx(0.01)
    assert cost_per_1k_output_tokens(None, 100.0) is None
    assert math.isclose(cost_per_1k_output_tokens(0.0, 5.0), 0.0)
