"""The Ray runtime of eopd-ray, in role packages: runtime (actor groups, process groups, faults), rollout,
teacher, student, sync (weight transfer to the engines), driver (the session of actors, the phases of a step,
the training loop, evaluation). Dependencies run one way: driver over the roles, the roles over sync and
runtime, everything over the library `eopd_ray`."""

import os

# Before Ray is imported (every module here imports it): a local Ray binds to 127.0.0.1 rather than the
# machine's network address, and sends no usage statistics. Set these yourself to choose otherwise.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
