"""The simulator's contention from a measured sharing table (services/sim/engine.py)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from services.policy.calibration import Timing
from services.sim import SimConfig, simulate
from tests.unit.test_sim import one_stage
from tests.unit.test_sim_live import _Fixed


def shared(table, latency_ms=100.0):
    return replace(one_stage(latency_ms, slo_ms=5000.0), device="dev", sharing={"dev": table})


SEED = 17   # routes the 3 (or 4) simultaneous requests below one to each worker (asserted)


def _run(prof, n_workers, arr, **cfg):
    return simulate(prof, arr, _Fixed(prof, n_workers),
                    SimConfig(n_workers=n_workers, latency_jitter=False, seed=SEED, **cfg))


def test_the_seed_puts_one_request_on_each_worker():
    for n in (3, 4):
        assert np.allclose(_run(one_stage(100.0, slo_ms=5000.0), n, 1.0 + np.arange(n) * 1e-6).latency_s, 0.1)


def test_the_measured_factor_replaces_processor_sharing():
    """Three 100 ms batches starting at once: the table says 3 busy workers cost 1.5x
    each (not 3x as on one core); the first started alone, the second beside one."""
    arr = np.array([1.0, 1.0 + 1e-6, 1.0 + 2e-6])
    r = _run(shared({1: 1.0, 2: 1.2, 3: 1.5}), 3, arr, cores=1.0)
    assert np.allclose(np.sort(r.latency_s), [0.1, 0.12, 0.15], atol=1e-5)
    # without a table: today's cores model, 1x, 2x, 3x
    plain = _run(one_stage(100.0, slo_ms=5000.0), 3, arr, cores=1.0)
    assert np.allclose(np.sort(plain.latency_s), [0.1, 0.2, 0.3], atol=1e-5)


def test_a_table_models_contention_without_cores():
    arr = np.array([1.0, 1.0 + 1e-6])
    assert np.allclose(np.sort(_run(shared({1: 1.0, 2: 1.4}), 2, arr).latency_s), [0.1, 0.14], atol=1e-5)
    assert np.allclose(_run(one_stage(100.0, slo_ms=5000.0), 2, arr).latency_s, 0.1, atol=1e-5)


def test_workers_on_other_devices_do_not_slow_each_other():
    """Four workers, two per device: the 3rd and 4th batch start on the second device."""
    arr = 1.0 + np.arange(4) * 1e-6
    r = _run(shared({1: 1.0, 2: 1.4}), 4, arr, workers_per_device=2)
    assert np.allclose(np.sort(r.latency_s), [0.1, 0.1, 0.14, 0.14], atol=1e-5)


def test_workers_per_device_must_be_positive():
    with pytest.raises(ValueError, match="workers_per_device"):
        _run(shared({1: 1.0, 2: 1.4}), 2, np.array([1.0]), workers_per_device=0)


class _Recording(_Fixed):
    def __init__(self, *a):
        super().__init__(*a)
        self.seen: list[Timing] = []

    def observe_timings(self, timings):
        self.seen.extend(timings)


def test_timings_report_the_load_they_ran_under():
    prof = shared({1: 1.0, 2: 1.4})
    arr = np.array([0.2, 0.2 + 1e-6, 2.0])        # the last keeps the run (and its ticks) going
    pol = _Recording(prof, 2)
    simulate(prof, arr, pol, SimConfig(n_workers=2, latency_jitter=False, control_period_s=0.5, seed=SEED))
    t = pol.seen[0]
    assert t.count == 2 and t.busy == 1.5          # one alone, one beside it
    assert t.total_ms == pytest.approx(100.0 + 140.0)


def test_the_run_command_passes_workers_per_device():
    import argparse

    from services.sim.run import add_arguments, config

    p = argparse.ArgumentParser()
    add_arguments(p)
    common = argparse.Namespace(workers=4, seed=0, hop_ms=0.0, model="ideal")   # the run parser's own flags
    a = p.parse_args(["--workers-per-device", "2"], namespace=argparse.Namespace(**vars(common)))
    assert config(a, None).workers_per_device == 2
    assert config(p.parse_args([], namespace=argparse.Namespace(**vars(common))), None).workers_per_device is None
