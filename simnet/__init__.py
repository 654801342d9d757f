"""simnet: a seeded discrete-event simulator (simpy) of a swarm.

It runs `routing/` and `balancing/` unmodified. Scenarios (each a table and a PNG plot, also
reachable as `peerd sim balance|failures|churn`):

- `simnet.balance`: load balancing against the exact optimum (`simnet.optimum`).
- `simnet.failures`: sequential generation with failing servers, three recovery strategies.
- `simnet.churn`: servers joining, leaving and crashing under client load, rebalancing on/off.
- `simnet.joins`: servers started at the same moment with stale listings, claims settled or not.

`simnet.timing` and `simnet.network` hold the compute and network figures assumed; README.md
beside this file states every assumption.
"""
