"""`oppsync daemon`: Dagster's daemon (`dagster-daemon run`) with its sensor and automation loops every second.

Dagster's sensor daemon and asset daemon each wake every 5 seconds (module constants, no setting in
dagster.yaml: dagster._daemon.sensor.MIN_INTERVAL_LOOP_TIME, dagster._daemon.asset_daemon.MIN_INTERVAL_LOOP_SECONDS),
whatever a sensor's `minimum_interval_seconds`. A webhook's change crosses both on its way to the mart: the
`syncs_on_webhooks` sensor starts the sync, the `mart_follows_syncs` automation sensor the build after it. At
5 s each they added 5 s on average and up to 10 s to every change (make bench, freshness: target p95 < 60 s).
Each loop iteration only reads the sensors' states and evaluates those whose own interval has elapsed, so a
1-second loop costs a few small queries a second; the sensors keep their own intervals.

The daemon is otherwise `dagster-daemon run` itself, in this process (its daemons are threads): same instance,
same workspace, same heartbeats. Where the daemon is Dagster's own image (Helm chart), it keeps the 5-second loops
and the README's freshness figures do not apply (README: Near-real-time syncs).
"""

from __future__ import annotations

import importlib
import sys

# (module, constant): the loops this command tightens; checked on every start, so a Dagster upgrade that renames
# them fails loudly here instead of silently bringing the 5-second loops back
LOOPS = [
    ("dagster._daemon.sensor", "MIN_INTERVAL_LOOP_TIME"),
    ("dagster._daemon.asset_daemon", "MIN_INTERVAL_LOOP_SECONDS"),
]
DEFAULT_LOOP_SECONDS = 1.0


def tighten_loops(seconds: float) -> dict[str, float]:
    """Set the sensor and asset daemons' loop to `seconds`; returns the previous values by constant."""
    if not 0.2 <= seconds <= 5:
        raise ValueError(f"--loop-seconds {seconds:g}: choose between 0.2 and 5 (Dagster's own loop is 5)")
    before = {}
    for module_name, constant in LOOPS:
        module = importlib.import_module(module_name)
        value = getattr(module, constant, None)
        if not isinstance(value, int | float):
            raise RuntimeError(
                f"{module_name}.{constant} is not in this Dagster version: `oppsync daemon` cannot tighten the "
                "daemon's loops; run `dagster-daemon run -w workspace.yaml` instead (5-second loops)"
            )
        before[f"{module_name}.{constant}"] = value
        setattr(module, constant, seconds)
    return before


def run_daemon(workspace: str, loop_seconds: float = DEFAULT_LOOP_SECONDS) -> int:
    """`dagster-daemon run -w WORKSPACE` with tightened loops; returns its exit status."""
    tighten_loops(loop_seconds)
    from dagster._daemon.cli import main  # the `dagster-daemon` entry point

    sys.argv = ["dagster-daemon", "run", "-w", workspace]
    try:
        main()
    except SystemExit as exit_:  # click ends with SystemExit
        return int(exit_.code or 0)
    return 0
