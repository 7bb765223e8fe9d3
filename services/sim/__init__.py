"""Discrete-event simulator of a pipeserve cluster.

It runs the project's own policy code - the planner (``services.planner``), the demand
estimator and re-planning rule of the controller (``services.controller``), the
MostAccurateFirst routing policy (``services.policy.routing``), the EDF batching rule
with early dropping (``services.policy.batching``) and admission control
(``services.policy.admission``) - with a simulated clock and an instantaneous transport.

    from services.sim import SimConfig, simulate, make_policy, poisson_arrivals
    res = simulate(profile, arrivals_s, make_policy("ours", profile), SimConfig(n_workers=20))
    res.violation_ratio, res.effective_accuracy, res.mean_active_workers

See docs/simulator.md.
"""
from services.sim.arrivals import (bursty_arrivals, diurnal_arrivals, peak_rate, poisson_arrivals,
                                   trace_arrivals)
from services.sim.engine import SimConfig, simulate
from services.sim.metrics import SimResult
from services.sim.policies import POLICIES, Decision, make_policy

__all__ = ["POLICIES", "Decision", "SimConfig", "SimResult", "bursty_arrivals", "diurnal_arrivals",
           "make_policy", "peak_rate", "poisson_arrivals", "simulate", "trace_arrivals"]
