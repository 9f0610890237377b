"""The mart's automation condition (defs/mart/assets.py MART_AUTOMATION) on two toy assets, evaluated as the
asset daemon evaluates it: a sync that lands while a build runs gets a build of its own. Dagster's eager
condition forgot it as soon as the build that was already running finished (make bench, freshness: 20 of 20
changes never reached the mart). No dbt, no warehouse: the condition alone."""

from __future__ import annotations

import threading
import time

import dagster as dg

from oppsync_pipeline.defs.mart.assets import MART_AUTOMATION, mart_automation


@dg.asset
def sync():
    return 1


@dg.asset
def directory():
    return 1


def defs_with(condition: dg.AutomationCondition) -> dg.Definitions:
    @dg.asset(deps=[sync, directory], automation_condition=condition)
    def mart():
        return 1

    return dg.Definitions(assets=[sync, directory, mart])


def tick(defs: dg.Definitions, instance: dg.DagsterInstance, cursor=None):
    return dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)


def synced_once(defs: dg.Definitions, instance: dg.DagsterInstance):
    """The daemon's first tick (it only records the condition), then every connection's first sync; the next
    tick requests the first build."""
    initial = tick(defs, instance)
    build(defs, instance, "sync", "directory")
    return tick(defs, instance, initial.cursor)


def build(defs: dg.Definitions, instance: dg.DagsterInstance, *names: str) -> None:
    assert dg.materialize(defs.assets, selection=list(names), instance=instance).success


def sync_during_build(condition: dg.AutomationCondition, before_first_tick: bool = False) -> int:
    """Both deps synced, the mart requested and building (a real run, held open); the sync lands again and the
    daemon ticks while that build runs; then the build finishes. How many builds does the next tick request?"""
    release = threading.Event()

    @dg.asset(deps=[sync, directory], automation_condition=condition)
    def mart():
        assert release.wait(60)
        return 1

    defs = dg.Definitions(assets=[sync, directory, mart])
    with dg.DagsterInstance.ephemeral() as instance:
        first = synced_once(defs, instance)
        assert first.get_num_requested(dg.AssetKey("mart")) == 1
        building = threading.Thread(target=build, args=(defs, instance, "mart"))
        building.start()
        try:
            wait_for_run(instance)
            if before_first_tick:  # the sync lands before the tick after the request: the build may read too early
                build(defs, instance, "sync")
            running = tick(defs, instance, first.cursor)
            if not before_first_tick:
                build(defs, instance, "sync")  # a webhook's sync commits while the mart builds
            running = tick(defs, instance, running.cursor)
            assert running.total_requested == 0  # in progress: nothing is started twice
        finally:
            release.set()
            building.join(60)
        return tick(defs, instance, running.cursor).get_num_requested(dg.AssetKey("mart"))


def wait_for_run(instance: dg.DagsterInstance) -> None:
    deadline = time.monotonic() + 60
    while not instance.get_run_records(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])):
        assert time.monotonic() < deadline, "the build never started"
        time.sleep(0.1)


def test_a_sync_during_a_build_gets_a_build_of_its_own():
    assert sync_during_build(MART_AUTOMATION) == 1
    # what Dagster's eager does (why the condition is ours): the finished build swallows the sync
    assert sync_during_build(dg.AutomationCondition.eager()) == 0


def test_a_build_by_hand_clears_what_was_due():
    defs = defs_with(MART_AUTOMATION)
    with dg.DagsterInstance.ephemeral() as instance:
        first = synced_once(defs, instance)
        idle = tick(defs, instance, first.cursor)
        build(defs, instance, "sync")
        due = tick(defs, instance, idle.cursor)
        assert due.get_num_requested(dg.AssetKey("mart")) == 1
        build(defs, instance, "mart")  # build_mart, not the automation: nothing new since
        assert tick(defs, instance, due.cursor).total_requested == 0


def test_a_sync_seen_with_the_end_of_a_build_is_kept():
    """The build finished and a sync landed after it read the tables, both before the daemon's next tick."""
    defs = defs_with(MART_AUTOMATION)
    with dg.DagsterInstance.ephemeral() as instance:
        first = synced_once(defs, instance)
        idle = tick(defs, instance, first.cursor)
        build(defs, instance, "mart")
        build(defs, instance, "sync")
        assert tick(defs, instance, idle.cursor).get_num_requested(dg.AssetKey("mart")) == 1


def test_a_sync_right_after_the_request_is_not_lost_either():
    assert sync_during_build(MART_AUTOMATION, before_first_tick=True) == 1


def test_a_fresh_deployment_builds_a_model_that_reads_only_an_ignored_dep():
    """The users view reads only a table the extracts write (ignored for rebuilds): it is still built the first
    time, or the models below it would wait for it forever (found by make bench on a fresh deployment)."""

    @dg.asset(deps=[directory], automation_condition=mart_automation([dg.AssetKey("directory")]))
    def users_view():
        return 1

    defs = dg.Definitions(assets=[sync, directory, users_view])
    with dg.DagsterInstance.ephemeral() as instance:
        assert synced_once(defs, instance).get_num_requested(dg.AssetKey("users_view")) == 1


def test_nothing_new_requests_nothing_and_an_ignored_dep_alone_requests_nothing():
    defs = defs_with(mart_automation([dg.AssetKey("directory")]))
    with dg.DagsterInstance.ephemeral() as instance:
        first = synced_once(defs, instance)
        assert first.get_num_requested(dg.AssetKey("mart")) == 1
        build(defs, instance, "mart")
        idle = tick(defs, instance, first.cursor)
        assert idle.total_requested == 0
        build(defs, instance, "directory")  # an extract alone: its views read the tables live
        quiet = tick(defs, instance, idle.cursor)
        assert quiet.total_requested == 0
        build(defs, instance, "sync")
        assert tick(defs, instance, quiet.cursor).get_num_requested(dg.AssetKey("mart")) == 1
