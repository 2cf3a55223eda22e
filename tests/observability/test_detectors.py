"""Detectors on synthetic series: a latency step flagged within a few samples, a disk ramp's time-to-full
within 10% of the truth, and noise alone raising nothing over a long run."""

from __future__ import annotations

import random

import pytest

from openautoglm.config.observability import AnomalyRule, DetectorsConfig, ForecastRule
from openautoglm.observability.detectors import AnomalyDetector, ForecastDetector
from openautoglm.observability.forecast import HoltForecaster, human_duration

DEFAULTS = {r.signal: r for r in DetectorsConfig().anomalies}


def latency_noise(rng: random.Random, base: float = 0.8) -> float:
    # Lognormal with occasional long requests: real latency is skewed, never Gaussian.
    x = base * rng.lognormvariate(0, 0.08)
    return x * 1.6 if rng.random() < 0.01 else x


@pytest.mark.parametrize("method", ["mad", "ewma"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_latency_step_is_flagged_within_n_samples(method: str, seed: int) -> None:
    rng = random.Random(seed)
    rule = DEFAULTS["latency"].model_copy(update={"method": method})
    det = AnomalyDetector(rule)
    for _ in range(200):
        assert det.observe(latency_noise(rng)) is None
    flagged_at = None
    for i in range(20):
        if det.observe(latency_noise(rng, base=2.0)) is not None:
            flagged_at = i + 1
            break
    assert flagged_at is not None and flagged_at <= rule.consecutive + 1
    d = det.observe(latency_noise(rng, base=2.0))
    assert d is not None and d.kind == "latency_anomaly" and d.evidence["baseline"] == pytest.approx(0.8, rel=0.1)


def test_a_lasting_shift_stays_flagged_and_recovery_clears_it() -> None:
    rng = random.Random(7)
    det = AnomalyDetector(DEFAULTS["latency"])
    for _ in range(100):
        det.observe(latency_noise(rng))
    flags = [det.observe(latency_noise(rng, base=2.0)) is not None for _ in range(150)]
    assert all(flags[5:])  # not absorbed into the baseline after one window of 60
    assert det.observe(latency_noise(rng)) is None


@pytest.mark.parametrize("seed", [11, 12])
def test_noise_alone_raises_no_alarm_over_a_long_run(seed: int) -> None:
    rng = random.Random(seed)
    latency = AnomalyDetector(DEFAULTS["latency"])
    errors = AnomalyDetector(DEFAULTS["error_rate"])
    throughput = AnomalyDetector(DEFAULTS["throughput"])
    for i in range(20_000):  # a day at one sample every 5 s
        assert latency.observe(latency_noise(rng)) is None, i
        # About 1% of requests fail at random (50 requests a tick).
        assert errors.observe(sum(rng.random() < 0.01 for _ in range(50)) / 50) is None, i
        assert throughput.observe(max(rng.gauss(1200, 150), 0)) is None, i


def test_error_burst_from_a_clean_baseline_and_throughput_collapse() -> None:
    errors = AnomalyDetector(DEFAULTS["error_rate"])
    for _ in range(50):
        assert errors.observe(0.0) is None
    assert errors.observe(0.02) is None  # one failure in fifty is below the absolute floor
    hits = [errors.observe(0.3) for _ in range(DEFAULTS["error_rate"].consecutive)]
    assert hits[-1] is not None and hits[-1].severity == "critical"

    rng = random.Random(5)
    tput = AnomalyDetector(DEFAULTS["throughput"])
    for _ in range(100):
        tput.observe(rng.gauss(1000, 50))
    assert tput.observe(1500) is None  # direction "down": more throughput is no trouble
    found = [tput.observe(rng.gauss(200, 20)) for _ in range(3)]
    assert found[-1] is not None and "below" in found[-1].message


def test_missing_samples_keep_the_state() -> None:
    det = AnomalyDetector(DEFAULTS["latency"])
    for _ in range(30):
        det.observe(0.5)
        assert det.observe(None) is None


def test_holt_recovers_an_exact_line() -> None:
    fit = HoltForecaster(0.5, 0.3)
    for i in range(40):
        fit.update(3.0 * i, 10.0 + 0.25 * 3.0 * i)
    p = fit.project(100.0)
    assert p is not None and p.trend_per_s == pytest.approx(0.25, rel=1e-6)
    assert p.time_to_limit_s == pytest.approx((100.0 - (10.0 + 0.25 * 117)) / 0.25, rel=1e-6)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_disk_ramp_time_to_full_within_ten_percent(seed: int) -> None:
    rng = random.Random(seed)
    rule = ForecastRule(signal="disk", limit=1.0, horizon_s=3600.0)
    det = ForecastDetector(rule, "/var/lib/autoglm")
    total, used0, rate = 500e9, 300e9, 50e6  # bytes, bytes, bytes/s: full in 4,000 s from t=0
    found = None
    for tick in range(200):
        t = tick * 5.0 + rng.uniform(-0.5, 0.5)  # the loop does not tick exactly on time
        used = used0 + rate * t + rng.gauss(0, 20e6)  # log files and temporary files come and go
        found = det.observe(t, used / total)
    truth = (total - (used0 + rate * t)) / rate
    assert found is not None and found.kind == "disk_forecast"
    ttl = found.evidence["time_to_limit_s"]
    assert abs(ttl - truth) <= 0.1 * truth, (ttl, truth)
    assert found.message == f"disk /var/lib/autoglm full in {human_duration(ttl)}"


def test_forecast_stays_quiet_beyond_the_horizon_or_when_falling() -> None:
    rule = ForecastRule(signal="kv_cache", limit=0.98, horizon_s=60.0)
    far, falling = ForecastDetector(rule), ForecastDetector(rule)
    for i in range(30):
        assert far.observe(i * 5.0, 0.1 + 0.0001 * i) is None  # full in hours
        assert falling.observe(i * 5.0, 0.9 - 0.01 * i) is None
    near = ForecastDetector(rule)
    out = [near.observe(i * 5.0, 0.5 + 0.02 * i) for i in range(20)]
    assert out[4] is None  # fewer than min_samples
    assert out[-1] is not None and out[-1].severity == "warning"
    over = near.observe(100.0, 0.99)
    assert over is not None and over.severity == "critical" and "now" in over.message


def test_configuration_is_validated() -> None:
    with pytest.raises(ValueError, match="fraction"):
        ForecastRule(signal="disk", limit=1.5)
    with pytest.raises(ValueError, match=r"webhook\.url"):
        DetectorsConfig(anomalies=[AnomalyRule(signal="latency", actions=["webhook"])])
    with pytest.raises(ValueError):
        AnomalyRule(signal="latency", actions=["page-the-ceo"])  # type: ignore[list-item]
