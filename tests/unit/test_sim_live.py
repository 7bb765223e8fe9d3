"""The simulator's live model (services/sim/engine.py: front-door reports, front-door
time, client deadlines, plan delay, cold start, shared cores) and the arrivals and
step windows of ``python -m services.sim run`` (services/sim/scenario.py)."""
from __future__ import annotations

import numpy as np

from services.loadgen.schedule import RateShape, read_trace, shape_schedule, trace_schedule
from services.planner import load_profile
from services.sim import SimConfig, make_policy, simulate
from services.sim.metrics import LATE, OK
from services.sim.scenario import (Step, live_config, shape_arrivals, shape_steps, square_shape, step_windows,
                                   trace_arrivals, within)
from services.common.plan import Allocation
from services.sim.policies import Policy
from tests.unit.test_sim import _SwitchAt, one_stage, two_variants

TRACE = "traces/twitter_medium_normal.txt"


# -- arrivals: the load generator's own schedule --------------------------------------
def test_a_square_wave_is_the_load_generators_schedule_for_the_seed():
    shape = square_shape(1.1, 7.2, 30.0)
    got = shape_arrivals(shape, 90.0, 4).times_s
    want = [a.t_s for a in shape_schedule(RateShape("square", rate=1.1, peak_rate=7.2, period_s=30.0), 90.0, 4)]
    assert got.tolist() == want
    assert shape_arrivals(shape, 90.0, 5).times_s.tolist() != want


def test_a_trace_replay_is_the_load_generators_schedule():
    got = trace_arrivals(TRACE, 0.5, 0.09, 1, duration_s=40.0).times_s
    want = [a.t_s for a in trace_schedule(read_trace(TRACE), time_scale=0.5, rate_scale=0.09, seed=1,
                                          duration_s=40.0)]
    assert got.tolist() == want and got.max() < 40.0


def test_square_wave_steps_alternate_up_and_down():
    steps = shape_steps(square_shape(1.0, 7.0, 30.0), 90.0)
    # low for the first half of each period, high for the second
    assert [(s.t_s, s.up) for s in steps] == [(15.0, True), (30.0, False), (45.0, True), (60.0, False),
                                             (75.0, True)]
    assert steps[0].before_qps == 1.0 and steps[0].after_qps == 7.0
    assert shape_steps(RateShape("diurnal", rate=1.0, peak_rate=7.0, period_s=90.0), 90.0) == []
    assert [s.t_s for s in shape_steps(RateShape("step", rate=1.0, peak_rate=5.0, step_at_s=10.0), 30.0)] == [10.0]


def test_step_windows_count_the_seconds_after_each_step_cut_at_the_next():
    t = np.array([0.5, 10.2, 11.0, 12.9, 13.1, 20.0, 21.0, 21.5, 22.5])
    good = np.array([1, 0, 0, 1, 0, 1, 0, 1, 1], dtype=bool)
    steps = [Step(10.0, 1, 7), Step(12.0, 7, 1), Step(21.0, 1, 7)]
    sw = step_windows(t, good, steps, 3.0)
    # up at 10: [10, 12) (cut at the step down): 10.2, 11.0 -> 2 failed of 2
    # down at 12: [12, 15): 12.9 ok, 13.1 failed; up at 21: [21, 24): 21.0 failed, 21.5, 22.5 ok
    assert [(s["requests"], s["violations"]) for s in sw["steps"]] == [(2, 2), (2, 1), (3, 1)]
    assert sw["up"] == {"requests": 5, "violations": 3, "violation_ratio": 3 / 5}   # 2 + 3, 2 + 1
    assert sw["all"]["requests"] == 7 and sw["all"]["violations"] == 4


def test_within_2x_or_one_point():
    assert within(0.287, 0.021) is False          # the square wave: 13x apart
    assert within(0.02, 0.011) is True            # 1.8x
    assert within(0.005, 0.014) is True           # 2.8x, but 0.9 points
    assert within(0.0, 0.02) is False             # 2 points, no ratio
    assert within(0.10, 0.21) is False and within(0.10, 0.20) is True
    assert within(None, 0.1) is None


# -- the live model -------------------------------------------------------------------
class _Fixed(Policy):
    """Every worker on variant ``v`` of task ``t``, batch 1, planned once."""
    name = "fixed"

    def decide(self, obs):
        if obs.current is not None:
            return None
        n = self.n_workers
        return self._plan_from_allocs([Allocation("t", "v", 1, n)], {("t", "v", 1): 1.0}, None, obs.now, "test")


def test_an_answer_after_the_clients_deadline_is_late():
    """One stage of 400 ms, SLO 500 ms: answered at the server in time; 150 ms back to the
    client is past its deadline."""
    prof = one_stage(400.0, slo_ms=500.0)
    arr = np.arange(0.1, 10.0, 1.0)
    pol = lambda: _Fixed(prof, 1)   # noqa: E731
    base = simulate(prof, arr, pol(), SimConfig(n_workers=1, latency_jitter=False))
    assert base.count(OK) == arr.size
    late = simulate(prof, arr, pol(), SimConfig(n_workers=1, latency_jitter=False, egress_s=0.150))
    assert late.count(LATE) == arr.size


def test_front_door_time_comes_before_routing():
    prof = one_stage(100.0, slo_ms=5000.0)
    arr = np.arange(0.1, 10.0, 1.0)
    r = simulate(prof, arr, _Fixed(prof, 1),
                 SimConfig(n_workers=1, latency_jitter=False, ingress_s=0.030, egress_s=0.005))
    assert np.allclose(r.latency_s, 0.135)    # 30 ms in + 100 ms batch + 5 ms out


def test_shared_cores_slow_batches_that_run_at_once():
    """Two workers each running a 100 ms batch at the same time on one core take 200 ms."""
    prof = one_stage(100.0, slo_ms=5000.0)
    arr = np.array([1.0, 1.0 + 1e-6])             # two requests, one per worker
    pol = lambda: _Fixed(prof, 2)   # noqa: E731
    free = simulate(prof, arr, pol(), SimConfig(n_workers=2, latency_jitter=False))
    shared = simulate(prof, arr, pol(), SimConfig(n_workers=2, latency_jitter=False, cores=1.0))
    assert np.allclose(free.latency_s, 0.1, atol=1e-5)
    assert np.isclose(shared.latency_s.max(), 0.2, atol=1e-5)   # the second started beside the first


def test_front_door_reports_lag_the_estimate():
    """A step from 10 to 200 req/s at 10 s: the controller that reads the front door's
    once-a-second reports sees it later than one that counts every arrival."""
    prof = load_profile("profiles/traffic_analysis.json")
    arr = shape_arrivals(RateShape("step", rate=10.0, peak_rate=200.0, step_at_s=10.0), 16.0, 3).times_s

    def est_at(cfg, t):
        r = simulate(prof, arr, make_policy("ours", prof, 20), cfg)
        return float(r.series["demand_est"][np.argmin(np.abs(r.series["t"] - t))])

    exact = est_at(SimConfig(n_workers=20, control_period_s=0.5), 10.5)
    reported = est_at(SimConfig(n_workers=20, control_period_s=0.5, report_s=1.0, report_phase_s=0.9), 10.5)
    # at the tick at 10.5 s the last report was taken at 9.9 s, before the step
    assert reported < 20.0 < exact


def test_early_reports_show_a_step_before_the_next_periodic_report():
    """The same step: a front door that also reports early when its arrivals jump (checked
    every 0.1 s, as the live one does) has it in the estimate at 10.5 s; with once-a-second
    reports (the last at 9.9 s) the estimate has not moved."""
    prof = load_profile("profiles/traffic_analysis.json")
    arr = shape_arrivals(RateShape("step", rate=10.0, peak_rate=200.0, step_at_s=10.0), 16.0, 3).times_s

    def est_at(cfg, t):
        r = simulate(prof, arr, make_policy("ours", prof, 20), cfg)
        return float(r.series["demand_est"][np.argmin(np.abs(r.series["t"] - t))])

    periodic = est_at(SimConfig(n_workers=20, control_period_s=0.25, report_s=1.0, report_phase_s=0.9), 10.5)
    early = est_at(SimConfig(n_workers=20, control_period_s=0.25, report_s=1.0, report_phase_s=0.9,
                             report_check_s=0.1), 10.5)
    assert periodic < 20.0 < early


def test_the_live_model_plans_as_the_controller_does():
    from services.policy.planning import CONTROLLER_SETTLING, PlannerPolicy, settle
    prof = load_profile("profiles/traffic_analysis.json")
    p = settle(PlannerPolicy(prof, prof.slo_ms, burst=True))
    assert (p.min_dwell_s, p.peak_hold_s, p.calibration_dwell_s, p.headroom_low) == (
        CONTROLLER_SETTLING["min_dwell_s"], CONTROLLER_SETTLING["peak_hold_s"],
        CONTROLLER_SETTLING["calibration_dwell_s"], CONTROLLER_SETTLING["headroom_low"])
    assert settle(PlannerPolicy(prof, prof.slo_ms, burst=False)).headroom_low is None   # as --burst off
    assert settle(PlannerPolicy(prof, prof.slo_ms, burst=True), hardware_only=True).headroom_low is None


def test_a_cold_start_plans_for_no_demand_first():
    prof = load_profile("profiles/traffic_analysis.json")
    arr = np.sort(np.random.default_rng(1).uniform(0.0, 10.0, 1000))   # 100 req/s from the start
    warm = simulate(prof, arr, make_policy("ours", prof, 20), SimConfig(n_workers=20))
    cold = simulate(prof, arr, make_policy("ours", prof, 20), SimConfig(n_workers=20, cold_start=True))
    assert warm.series["demand_est"][0] > 50.0 and cold.series["demand_est"][0] == 0.0
    assert cold.series["active"][0] < warm.series["active"][0]


def test_a_plan_reaches_the_workers_after_its_delay():
    """The policy switches variant a -> b at its tick at 2 s (no load time): with a 3 s
    plan delay the requests before 5 s still run on a."""
    prof = two_variants(load_s=0.0)
    arr = np.arange(0.05, 10.0, 0.1)
    now = simulate(prof, arr, _SwitchAt(prof, at_s=2.0), SimConfig(n_workers=1, seed=0, latency_jitter=False))
    later = simulate(prof, arr, _SwitchAt(prof, at_s=2.0),
                     SimConfig(n_workers=1, seed=0, latency_jitter=False, plan_delay_s=3.0))
    mid = (arr > 2.1) & (arr < 4.9)
    assert np.all(now.accuracy[mid] == 0.9)
    assert np.all(later.accuracy[mid] == 0.5) and np.all(later.accuracy[arr > 5.1] == 0.9)


def test_the_live_config_turns_every_option_on_and_keeps_the_rest():
    c = live_config(SimConfig(n_workers=3, seed=7))
    assert (c.n_workers, c.seed, c.report_s, c.control_period_s, c.cold_start) == (3, 7, 1.0, 0.25, True)
    assert c.report_check_s == 0.1       # the front door's early reports, as it runs live
    assert c.ingress_s > 0 and c.egress_s > 0 and c.plan_delay_s > 0
    assert SimConfig().report_s is None and not SimConfig().cold_start   # make reproduce: unchanged


def test_run_prints_a_square_wave_with_its_steps(capsys):
    from services.sim.experiments import main

    main(["run", "--profile", "profiles/ocr_cpu.json", "--spec", "pipelines/ocr.yaml", "--workers", "3",
          "--shape", "square", "--low", "1", "--high", "6", "--period", "10", "--duration", "20"])
    out = capsys.readouterr().out
    assert "square 1/s <-> 6/s, period 10 s" in out
    assert "after 2 step(s) up" in out and "plan versions:" in out and "active workers:" in out
