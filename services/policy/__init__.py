"""Decision rules shared by the services and the simulator: one implementation each.

Pure code (no gRPC, no Redis, no clock of its own): the services call these with the
state they measure, the simulator with the state it simulates.

- ``batching``: the EDF queue, the batching rule and early dropping; batch-time estimates
- ``routing``: MostAccurateFirst and opportunistic rerouting
- ``admission``: the token bucket at the plan's admission rate
- ``fairness``: the front door's receive limits split into fair shares per client
- ``demand``: the controller's demand estimate
- ``rates``: per-path query rates as routers measure them
- ``reserve``: the downstream reserve a stage leaves for the stages below it
- ``calibration``: measured batch times folded into the profile the planner uses
- ``planning``: the controller's decide step (re-plan rule + the CVXPY planner)
- ``health``: workers a router avoids (calls late, circuit breakers); batches stuck in a worker

Importing this package imports none of its modules: the data plane imports the light
ones and never ``planning`` (which pulls in CVXPY).
"""
