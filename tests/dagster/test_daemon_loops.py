"""`oppsync daemon` (locations/daemon.py): Dagster's daemon with 1-second sensor and automation loops. The
topology tests and the freshness benchmark run the daemon through it; these check the loops it sets."""

import importlib
import subprocess
import sys

import pytest

from oppsync_pipeline.locations.daemon import LOOPS, tighten_loops

pytestmark = pytest.mark.unit


def test_the_loop_constants_exist_in_this_dagster_and_are_dagsters_five_seconds():
    # an upgrade renaming them would make `oppsync daemon` refuse to start (below), never silently slow
    for module, constant in LOOPS:
        assert getattr(importlib.import_module(module), constant) == 5


def test_tighten_sets_both_loops_and_the_daemon_loops_read_them_at_run_time():
    code = (
        "import dagster._daemon.sensor as s, dagster._daemon.asset_daemon as a, inspect;"
        "from oppsync_pipeline.locations.daemon import tighten_loops;"
        "before = tighten_loops(1.0);"
        "print(sorted(before.values()), s.MIN_INTERVAL_LOOP_TIME, a.MIN_INTERVAL_LOOP_SECONDS);"
        # the loops compute their sleep from the module global on every iteration, not a copy taken at import
        "print('MIN_INTERVAL_LOOP_TIME - loop_duration' in inspect.getsource(s.execute_sensor_iteration_loop));"
        "print('MIN_INTERVAL_LOOP_SECONDS - loop_duration' in inspect.getsource(a.AssetDaemon))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:3] == ["[5, 5] 1.0 1.0", "True", "True"]


@pytest.mark.parametrize("seconds", [0, 0.1, 6, -1])
def test_loop_seconds_out_of_range_is_refused_with_the_range(seconds):
    with pytest.raises(ValueError, match="between 0.2 and 5"):
        tighten_loops(seconds)


def test_cli_refuses_a_bad_loop_before_starting_anything(capsys):
    from oppsync_pipeline.cli import main

    assert main(["daemon", "--loop-seconds", "9"]) == 2
    assert "choose between 0.2 and 5" in capsys.readouterr().err
