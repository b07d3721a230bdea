#!/usr/bin/env python3
"""Self-test of the bed's AWS side: ``python bed/aws/selftest.py [-v]`` (needs requirements-dev.txt).

Set SELFTEST_LOGS=1 to see the launcher's and the bridge's logs.

Starts ``launcher.py`` on a free loopback port and drives it the way tests and the controller
will: boto3 for the AWS APIs (retries off, so every injected error is seen), HTTP for ``/_bed/``.
The node bridge is tested in-process against moto's in-process backends and a fake Kubernetes API.
"""

from __future__ import annotations

import json
import logging
import os
import random
import select
import signal
import subprocess
import sys
import time
import unittest
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from awsbed.activities import ActivityLog  # noqa: E402
from awsbed.faults import CapacityFaults, NotReadyFaults  # noqa: E402
from awsbed.nodes import (  # noqa: E402
    INSTANCE_ID_ANNOTATION,
    NODE_LEASE_NAMESPACE,
    NOT_READY_REASON,
    NodeBridge,
    node_manifest,
)
from awsbed.scaling import Timing  # noqa: E402
from awsbed.world import InstanceView, MotoWorld, decide_capacity_type  # noqa: E402

REGION = "us-east-1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 60.0


class Launcher:
    """launcher.py as a child process on a free port."""

    def __init__(self, *extra: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "launcher.py"), "--port", "0", "--region", REGION, *extra],
            stdout=subprocess.PIPE,
            stderr=None if os.environ.get("SELFTEST_LOGS") else subprocess.DEVNULL,
            text=True,
        )
        stdout = self.process.stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], START_TIMEOUT)
        line = stdout.readline() if ready else ""
        if not line.startswith("READY "):
            self.process.kill()
            self.process.wait()
            stdout.close()
            raise RuntimeError(f"launcher did not start: {line!r}")
        self.url = line.split()[1]

    def stop(self) -> None:
        """SIGTERM it and wait until it exits (a launcher that ignored the signal would hang the
        suite: past STOP_TIMEOUT it fails instead; how long it takes is not asserted)."""
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=STOP_TIMEOUT)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def bed(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        """Call the control API; (status, decoded JSON)."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def client(self, service: str) -> Any:
        return boto3.client(
            service,
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id="AKIDBEDTEST",
            aws_secret_access_key="secret",
            config=Config(retries={"total_max_attempts": 1}),
        )


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class BedCase(unittest.TestCase):
    """A launcher shared by a class's tests, and helpers to drive it."""

    launcher: Launcher
    launcher_args: tuple[str, ...] = ("--launch-delay", "0", "--termination-delay", "0")

    @classmethod
    def setUpClass(cls) -> None:
        cls.launcher = Launcher(*cls.launcher_args)
        cls.asg = cls.launcher.client("autoscaling")
        cls.ec2 = cls.launcher.client("ec2")
        status, cls.spot_template = cls.launcher.bed(
            "POST", "/_bed/launch-templates", {"name": unique("lt-spot"), "instance_type": "m5.large", "spot": True}
        )
        assert status == 201, cls.spot_template

    @classmethod
    def tearDownClass(cls) -> None:
        cls.launcher.stop()

    # -- helpers --------------------------------------------------------------------------------

    def bed(self, method: str, path: str, body: dict[str, Any] | None = None, expect: int = 200) -> Any:
        status, payload = self.launcher.bed(method, path, body)
        self.assertEqual(status, expect, payload)
        return payload

    def create_group(self, desired: int, tags: dict[str, str] | None = None) -> str:
        name = unique("asg")
        self.asg.create_auto_scaling_group(
            AutoScalingGroupName=name,
            LaunchTemplate={"LaunchTemplateName": self.spot_template["name"], "Version": "$Latest"},
            AvailabilityZones=["us-east-1a"],
            MinSize=0,
            MaxSize=10,
            DesiredCapacity=desired,
            Tags=[{"Key": k, "Value": v, "PropagateAtLaunch": True} for k, v in (tags or {}).items()],
        )
        return name

    def group(self, name: str) -> dict[str, Any]:
        return self.asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]

    def instance_ids(self, name: str) -> list[str]:
        return [i["InstanceId"] for i in self.group(name)["Instances"]]

    def activities(self, name: str) -> list[dict[str, Any]]:
        return self.asg.describe_scaling_activities(AutoScalingGroupName=name)["Activities"]

    def set_desired(self, name: str, desired: int) -> None:
        self.asg.set_desired_capacity(AutoScalingGroupName=name, DesiredCapacity=desired)

    def assert_error(self, call: Any, code: str, status: int) -> None:
        with self.assertRaises(ClientError) as caught:
            call()
        self.assertEqual(caught.exception.response["Error"]["Code"], code)
        self.assertEqual(caught.exception.response["ResponseMetadata"]["HTTPStatusCode"], status)


class AwsSideTest(BedCase):
    """The API surface, on a launcher whose ASGs launch and terminate at once (delays 0); how AWS
    takes its time is ``AwsTimingTest``'s."""

    # -- scaling and activities -----------------------------------------------------------------

    def test_set_desired_capacity_launches_instances_and_records_activities(self) -> None:
        name = self.create_group(desired=1)
        self.assertEqual(len(self.instance_ids(name)), 1)
        self.set_desired(name, 3)

        ids = self.instance_ids(name)
        self.assertEqual(len(ids), 3)
        activities = self.activities(name)
        self.assertEqual(len(activities), 3)
        self.assertTrue(all(a["StatusCode"] == "Successful" for a in activities))
        self.assertEqual(
            sorted(a["Description"] for a in activities),
            sorted(f"Launching a new EC2 instance: {i}" for i in ids),
        )
        newest = activities[0]
        self.assertIn(
            "explicitly set group desired capacity changing the desired capacity from 1 to 3", newest["Cause"]
        )
        self.assertEqual(newest["Progress"], 100)
        self.assertIsNotNone(newest["StartTime"].tzinfo)
        self.assertIn("Availability Zone", json.loads(newest["Details"]))
        # Newest first: the activity of the CreateAutoScalingGroup launch comes last.
        self.assertIn("created an AutoScalingGroup", activities[-1]["Cause"])

        calls = self.bed("GET", f"/_bed/calls?action=SetDesiredCapacity&asg={name}")
        self.assertEqual([(c["desired_capacity"], c["status"]) for c in calls], [(3, 200)])

    def test_scale_in_records_terminations(self) -> None:
        name = self.create_group(desired=3)
        self.set_desired(name, 1)
        self.assertEqual(len(self.instance_ids(name)), 1)
        newest = self.activities(name)[:2]
        self.assertTrue(all(a["Description"].startswith("Terminating EC2 instance: i-") for a in newest))
        self.assertIn("shrinking the capacity from 3 to 1", newest[0]["Cause"])

    def test_desired_capacity_outside_min_and_max_is_refused_as_on_aws(self) -> None:
        name = self.create_group(desired=1)
        group = self.group(name)
        above = group["MaxSize"] + 1
        self.assert_error(lambda: self.set_desired(name, above), "ValidationError", 400)
        self.assertEqual(self.group(name)["DesiredCapacity"], 1, "a refused call changes nothing")
        self.asg.update_auto_scaling_group(AutoScalingGroupName=name, MaxSize=above, DesiredCapacity=above)
        self.assertEqual(self.group(name)["DesiredCapacity"], above, "raising MaxSize with it is allowed")

    def test_capacity_rebalance_can_be_switched_on_by_update(self) -> None:
        name = self.create_group(desired=0)
        self.assertFalse(self.group(name).get("CapacityRebalance", False))
        self.asg.update_auto_scaling_group(AutoScalingGroupName=name, CapacityRebalance=True)
        self.assertTrue(self.group(name)["CapacityRebalance"])
        self.asg.update_auto_scaling_group(AutoScalingGroupName=name, MaxSize=4)
        self.assertTrue(self.group(name)["CapacityRebalance"], "an update without the flag keeps it")

    def test_spot_template_instances_are_marked_spot(self) -> None:
        name = self.create_group(desired=1)
        instance_id = self.instance_ids(name)[0]
        described = self.bed("GET", f"/_bed/asgs/{name}")
        self.assertEqual(described["capacity_type"], "SPOT")
        self.assertEqual(described["instances"][0]["id"], instance_id)
        self.assertEqual(described["instances"][0]["lifecycle_state"], "InService")

    def test_describe_scaling_activities_filters_and_pages(self) -> None:
        name = self.create_group(desired=5)
        first = self.asg.describe_scaling_activities(AutoScalingGroupName=name, MaxRecords=2)
        self.assertEqual(len(first["Activities"]), 2)
        second = self.asg.describe_scaling_activities(
            AutoScalingGroupName=name, MaxRecords=2, NextToken=first["NextToken"]
        )
        third = self.asg.describe_scaling_activities(
            AutoScalingGroupName=name, MaxRecords=2, NextToken=second["NextToken"]
        )
        self.assertNotIn("NextToken", third)
        paged = [a["ActivityId"] for page in (first, second, third) for a in page["Activities"]]
        self.assertEqual(paged, [a["ActivityId"] for a in self.activities(name)])
        self.assertEqual(len(set(paged)), 5)

        picked = self.asg.describe_scaling_activities(ActivityIds=[paged[1], paged[3]])["Activities"]
        self.assertEqual({a["ActivityId"] for a in picked}, {paged[1], paged[3]})

    def test_terminate_instance_in_asg_keeps_the_activity_id_it_returned(self) -> None:
        name = self.create_group(desired=2)
        victim = self.instance_ids(name)[0]
        answer = self.asg.terminate_instance_in_auto_scaling_group(
            InstanceId=victim, ShouldDecrementDesiredCapacity=False
        )
        activity_id = answer["Activity"]["ActivityId"]

        recorded = self.asg.describe_scaling_activities(ActivityIds=[activity_id])["Activities"]
        self.assertEqual(len(recorded), 1)
        self.assertEqual(recorded[0]["Description"], f"Terminating EC2 instance: {victim}")
        self.assertIn("in response to a user request", recorded[0]["Cause"])
        ids = self.instance_ids(name)
        self.assertEqual(len(ids), 2, "a replacement is launched when the desired capacity is kept")
        self.assertNotIn(victim, ids)

        survivor = ids[0]
        self.asg.terminate_instance_in_auto_scaling_group(InstanceId=survivor, ShouldDecrementDesiredCapacity=True)
        self.assertEqual(self.group(name)["DesiredCapacity"], 1)
        self.assertEqual(len(self.instance_ids(name)), 1)

    # -- spot capacity failure ------------------------------------------------------------------

    def test_capacity_fault_blocks_launches_until_cleared(self) -> None:
        name = self.create_group(desired=1)
        self.bed("POST", "/_bed/faults/capacity", {"asg": name})
        self.set_desired(name, 3)

        group = self.group(name)
        self.assertEqual(group["DesiredCapacity"], 3, "the desired capacity is stored")
        self.assertEqual(len(group["Instances"]), 1, "but nothing launches")
        failed = self.activities(name)[0]
        self.assertEqual(failed["StatusCode"], "Failed")
        self.assertIn("InsufficientInstanceCapacity", failed["StatusMessage"])
        self.assertIn("Spot", failed["StatusMessage"])

        cleared = self.bed("DELETE", f"/_bed/faults/capacity/{name}")
        self.assertEqual(len(cleared["launched"]), 2)
        self.assertEqual(
            sorted(self.instance_ids(name)), sorted(cleared["launched"] + [group["Instances"][0]["InstanceId"]])
        )
        newest = self.activities(name)[:2]
        self.assertTrue(all(a["StatusCode"] == "Successful" for a in newest))
        self.assertEqual(sorted(a["Description"][-19:] for a in newest), sorted(cleared["launched"]))

    def test_capacity_fault_still_lets_the_group_scale_in(self) -> None:
        name = self.create_group(desired=3)
        self.bed("POST", "/_bed/faults/capacity", {"asg": name, "message": "custom capacity trouble"})
        self.set_desired(name, 1)
        self.assertEqual(len(self.instance_ids(name)), 1)
        self.set_desired(name, 2)
        self.assertEqual(len(self.instance_ids(name)), 1)
        self.assertEqual(self.activities(name)[0]["StatusMessage"], "custom capacity trouble")
        self.bed("DELETE", f"/_bed/faults/capacity/{name}")
        self.assertEqual(len(self.instance_ids(name)), 2)

    def test_capacity_fault_blocks_replacement_of_a_reclaimed_instance(self) -> None:
        name = self.create_group(desired=2)
        self.bed("POST", "/_bed/faults/capacity", {"asg": name})
        victim = self.instance_ids(name)[0]
        reclaimed = self.bed("DELETE", f"/_bed/instances/{victim}")
        self.assertEqual((reclaimed["asg"], reclaimed["replacements"]), (name, []))
        self.assertEqual(len(self.instance_ids(name)), 1)
        self.bed("DELETE", f"/_bed/faults/capacity/{name}")
        self.assertEqual(len(self.instance_ids(name)), 2)

    # -- Nodes that never turn Ready --------------------------------------------------------------

    def test_not_ready_fault_is_armed_listed_and_cleared(self) -> None:
        name = self.create_group(desired=1)
        self.assertEqual(self.bed("POST", "/_bed/faults/not-ready", {"asg": name}), {"asg": name, "armed": True})
        self.assertIn(name, self.bed("GET", "/_bed/faults")["not_ready"])
        self.set_desired(name, 2)
        self.assertEqual(len(self.instance_ids(name)), 2, "instances launch as usual: only their Nodes are held")
        cleared = self.bed("DELETE", f"/_bed/faults/not-ready/{name}")
        self.assertEqual(cleared, {"asg": name, "armed": False, "was_armed": True})
        self.assertNotIn(name, self.bed("GET", "/_bed/faults")["not_ready"])
        again = self.bed("DELETE", f"/_bed/faults/not-ready/{name}")
        self.assertFalse(again["was_armed"])

    # -- injected errors ------------------------------------------------------------------------

    def test_throttling_count_fails_the_next_calls_only(self) -> None:
        name = self.create_group(desired=1)
        self.bed(
            "POST",
            "/_bed/faults/errors",
            {"kind": "throttling", "rate": 1.0, "count": 2, "actions": ["SetDesiredCapacity"]},
        )
        try:
            self.assert_error(lambda: self.set_desired(name, 2), "Throttling", 400)
            self.assert_error(lambda: self.set_desired(name, 3), "Throttling", 400)
            self.assertEqual(self.group(name)["DesiredCapacity"], 1, "throttled calls never reach moto")
            self.set_desired(name, 4)
        finally:
            self.bed("DELETE", "/_bed/faults/errors")
        self.assertEqual(self.group(name)["DesiredCapacity"], 4)
        calls = self.bed("GET", f"/_bed/calls?action=SetDesiredCapacity&asg={name}")
        self.assertEqual(
            [(c["desired_capacity"], c["status"], c["injected_error"]) for c in calls],
            [(2, 400, "Throttling"), (3, 400, "Throttling"), (4, 200, None)],
        )

    def test_server_error_never_reaches_moto(self) -> None:
        name = self.create_group(desired=1)
        self.bed("POST", "/_bed/faults/errors", {"kind": "server", "count": 1, "actions": ["SetDesiredCapacity"]})
        try:
            self.assert_error(lambda: self.set_desired(name, 5), "InternalFailure", 500)
        finally:
            self.bed("DELETE", "/_bed/faults/errors")
        self.assertEqual(self.group(name)["DesiredCapacity"], 1)
        self.assertEqual(len(self.activities(name)), 1)

    def test_error_rate_is_reproducible_with_a_seed(self) -> None:
        self.bed(
            "POST",
            "/_bed/faults/errors",
            {"kind": "throttling", "rate": 0.5, "seed": 7, "actions": ["DescribeAutoScalingGroups"]},
        )
        outcomes = []
        try:
            for _ in range(20):
                try:
                    self.asg.describe_auto_scaling_groups()
                    outcomes.append(True)
                except ClientError:
                    outcomes.append(False)
            rules = self.bed("GET", "/_bed/faults")["errors"]
        finally:
            self.bed("DELETE", "/_bed/faults/errors")
        rng = random.Random(7)
        self.assertEqual(outcomes, [rng.random() >= 0.5 for _ in range(20)])
        self.assertEqual(rules[0]["injected"], outcomes.count(False))

    def test_ec2_errors_use_the_ec2_error_format(self) -> None:
        self.bed("POST", "/_bed/faults/errors", {"kind": "throttling", "count": 1, "actions": ["DescribeInstances"]})
        try:
            self.assert_error(lambda: self.ec2.describe_instances(), "RequestLimitExceeded", 400)
        finally:
            self.bed("DELETE", "/_bed/faults/errors")

    # -- control API ----------------------------------------------------------------------------

    def test_foreign_activity_can_be_added_and_completed(self) -> None:
        name = self.create_group(desired=0)
        added = self.bed(
            "POST", "/_bed/activities", {"asg": name, "status": "InProgress", "description": "Foreign work"}, expect=201
        )
        activity_id = added["activity_id"]
        (seen,) = self.asg.describe_scaling_activities(ActivityIds=[activity_id])["Activities"]
        self.assertEqual((seen["StatusCode"], seen["Description"]), ("InProgress", "Foreign work"))
        self.assertNotIn("EndTime", seen)

        self.bed("PATCH", f"/_bed/activities/{activity_id}", {"status": "Successful"})
        (done,) = self.asg.describe_scaling_activities(AutoScalingGroupName=name)["Activities"]
        self.assertEqual((done["StatusCode"], done["Progress"]), ("Successful", 100))
        self.assertIn("EndTime", done)

        self.bed("PATCH", "/_bed/activities/nope", {"status": "Successful"}, expect=404)
        self.bed("PATCH", f"/_bed/activities/{activity_id}", {"status": "Bogus"}, expect=400)

    def test_standalone_instances_run_and_terminate(self) -> None:
        made = self.bed("POST", "/_bed/instances", {"name_tag": "standalone", "tags": {"team": "bed"}}, expect=201)
        (reservation,) = self.ec2.describe_instances(InstanceIds=[made["id"]])["Reservations"]
        instance = reservation["Instances"][0]
        self.assertEqual({t["Key"]: t["Value"] for t in instance["Tags"]}, {"Name": "standalone", "team": "bed"})
        self.assertEqual(instance["PrivateDnsName"], made["private_dns_name"])
        self.assertTrue(made["private_dns_name"].endswith(".ec2.internal"))

        reclaimed = self.bed("DELETE", f"/_bed/instances/{made['id']}")
        self.assertEqual((reclaimed["asg"], reclaimed["replacements"]), (None, []))
        (reservation,) = self.ec2.describe_instances(InstanceIds=[made["id"]])["Reservations"]
        self.assertEqual(reservation["Instances"][0]["State"]["Name"], "terminated")
        self.bed("DELETE", "/_bed/instances/i-00000000000000000", expect=404)

    def test_reclaimed_asg_member_is_replaced(self) -> None:
        name = self.create_group(desired=2)
        victim = self.instance_ids(name)[0]
        reclaimed = self.bed("DELETE", f"/_bed/instances/{victim}")
        self.assertEqual(reclaimed["asg"], name)
        self.assertEqual(len(reclaimed["replacements"]), 1)
        self.assertEqual(self.group(name)["DesiredCapacity"], 2)
        ids = self.instance_ids(name)
        self.assertEqual(len(ids), 2)
        self.assertNotIn(victim, ids)
        self.assertIn(reclaimed["replacements"][0], ids)
        terminating = next(a for a in self.activities(name) if victim in a["Description"])
        self.assertIn("EC2 health check", terminating["Cause"])

    def test_control_api_rejects_bad_input(self) -> None:
        self.bed("POST", "/_bed/faults/capacity", {}, expect=400)
        self.bed("POST", "/_bed/faults/not-ready", {"asg": 7}, expect=400)
        self.bed("POST", "/_bed/faults/errors", {"kind": "weird"}, expect=400)
        self.bed("POST", "/_bed/faults/errors", {"kind": "server", "rate": 2}, expect=400)
        self.bed("GET", "/_bed/asgs/no-such-group", expect=404)
        self.bed("GET", "/_bed/no-such-route", expect=404)
        self.bed("POST", "/_bed/launch-templates", {"name": self.spot_template["name"]}, expect=409)
        self.bed("GET", "/_bed/nodes", expect=404)  # bridge off


def wait_for(what: str, check: Any, timeout: float = 15.0) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for: {what}")
        time.sleep(0.05)


class AwsTimingTest(BedCase):
    """ASGs that take their time, as on AWS: the launcher's default delays, shortened per ASG."""

    launcher_args = ()

    def create_group(self, desired: int, tags: dict[str, str] | None = None, **options: Any) -> str:
        name = unique("asg")
        timing = {"launch_delay": 0.4, "termination_delay": 0.4, "retry_delay": 0.2, **options.pop("timing", {})}
        self.bed("PUT", f"/_bed/timing/{name}", timing)
        self.asg.create_auto_scaling_group(
            AutoScalingGroupName=name,
            LaunchTemplate={"LaunchTemplateName": self.spot_template["name"], "Version": "$Latest"},
            AvailabilityZones=options.pop("zones", ["us-east-1a"]),
            MinSize=options.pop("min_size", 0),
            MaxSize=10,
            DesiredCapacity=desired,
            Tags=[{"Key": k, "Value": v, "PropagateAtLaunch": True} for k, v in (tags or {}).items()],
        )
        self.wait_in_service(name, desired)
        return name

    def states(self, name: str) -> dict[str, str]:
        return {i["InstanceId"]: i["LifecycleState"] for i in self.group(name)["Instances"]}

    def wait_in_service(self, name: str, count: int) -> list[str]:
        def ready() -> list[str] | None:
            states = self.states(name)
            in_service = [i for i, s in states.items() if s == "InService"]
            return in_service if len(in_service) == count and len(states) == count else None

        return wait_for(f"{count} InService instances in {name}", ready) if count else []

    def activity(self, activity_id: str) -> dict[str, Any]:
        return self.asg.describe_scaling_activities(ActivityIds=[activity_id])["Activities"][0]

    def test_default_delays_are_at_least_a_second(self) -> None:
        defaults = self.bed("GET", "/_bed/timing")
        self.assertGreaterEqual(defaults["launch_delay"], 1.0)
        self.assertGreaterEqual(defaults["termination_delay"], 1.0)
        self.assertEqual(self.bed("GET", "/_bed/timing/never-made")["launch_delay"], defaults["launch_delay"])

    def test_a_launch_is_pending_then_in_service_with_aws_texts(self) -> None:
        name = self.create_group(desired=3, timing={"launch_delay": 0.8})
        before = set(self.instance_ids(name))
        self.set_desired(name, 4)

        (new,) = set(self.instance_ids(name)) - before
        self.assertEqual(self.states(name)[new], "Pending")
        launching = self.activities(name)[0]
        self.assertEqual(launching["Description"], f"Launching a new EC2 instance: {new}")
        self.assertEqual(launching["StatusCode"], "PreInService")
        self.assertNotIn("EndTime", launching)
        self.assertRegex(
            launching["Cause"],
            r"^At \S+Z a user request explicitly set group desired capacity changing the desired capacity from 3 "
            r"to 4\.  At \S+Z an instance was started in response to a difference between desired and actual "
            r"capacity, increasing the capacity from 3 to 4\.$",
        )
        (call,) = self.bed("GET", f"/_bed/calls?action=SetDesiredCapacity&asg={name}")
        self.assertEqual(call["params"]["DesiredCapacity"], "4")
        self.assertEqual(call["activity_ids"], [launching["ActivityId"]])
        self.assertEqual(call["status"], 200)

        self.wait_in_service(name, 4)
        done = self.activity(launching["ActivityId"])
        self.assertEqual(done["StatusCode"], "Successful")
        self.assertEqual(done["Progress"], 100)
        self.assertIn("EndTime", done)

    def test_a_spot_launch_can_wait_for_its_instance_id(self) -> None:
        name = self.create_group(desired=0, timing={"spot_wait": 0.6})
        self.set_desired(name, 1)
        waiting = self.activities(name)[0]
        self.assertEqual(waiting["StatusCode"], "WaitingForSpotInstanceId")
        self.assertEqual(self.instance_ids(name), [], "no instance before the spot request is fulfilled")
        (instance_id,) = self.wait_in_service(name, 1)
        done = self.activity(waiting["ActivityId"])
        self.assertEqual(
            (done["StatusCode"], done["Description"]), ("Successful", f"Launching a new EC2 instance: {instance_id}")
        )

    def test_a_launch_hook_holds_the_instance_until_completed(self) -> None:
        name = self.create_group(desired=0)
        self.asg.put_lifecycle_hook(
            LifecycleHookName="hold",
            AutoScalingGroupName=name,
            LifecycleTransition="autoscaling:EC2_INSTANCE_LAUNCHING",
            HeartbeatTimeout=60,
            DefaultResult="ABANDON",
        )
        self.set_desired(name, 1)
        (instance_id,) = wait_for(
            "Pending:Wait", lambda: [i for i, s in self.states(name).items() if s == "Pending:Wait"]
        )
        self.assertEqual(self.activities(name)[0]["StatusCode"], "MidLifecycleAction")
        self.asg.record_lifecycle_action_heartbeat(
            LifecycleHookName="hold", AutoScalingGroupName=name, InstanceId=instance_id
        )
        time.sleep(0.5)
        self.assertEqual(self.states(name)[instance_id], "Pending:Wait", "held while the hook waits")
        self.asg.complete_lifecycle_action(
            LifecycleHookName="hold",
            AutoScalingGroupName=name,
            InstanceId=instance_id,
            LifecycleActionResult="CONTINUE",
        )
        self.assertEqual(self.states(name)[instance_id], "InService")
        self.assertEqual(self.activities(name)[0]["StatusCode"], "Successful")
        self.assert_error(
            lambda: self.asg.complete_lifecycle_action(
                LifecycleHookName="hold",
                AutoScalingGroupName=name,
                InstanceId=instance_id,
                LifecycleActionResult="CONTINUE",
            ),
            "ValidationError",
            400,
        )

    def test_a_launch_hook_that_times_out_abandons_and_the_group_launches_again(self) -> None:
        name = self.create_group(desired=0)
        self.asg.put_lifecycle_hook(
            LifecycleHookName="short",
            AutoScalingGroupName=name,
            LifecycleTransition="autoscaling:EC2_INSTANCE_LAUNCHING",
            HeartbeatTimeout=1,
            DefaultResult="ABANDON",
        )
        self.set_desired(name, 1)
        first = wait_for("a Failed launch", lambda: [a for a in self.activities(name) if a["StatusCode"] == "Failed"])[
            0
        ]
        self.assertRegex(
            first["StatusMessage"],
            r"^Instance failed to complete user's Lifecycle Action: Lifecycle Action with token [0-9a-f-]{36} was "
            r"abandoned: Heartbeat Timeout$",
        )
        wait_for("a second launch", lambda: len(self.activities(name)) >= 2)

    def test_the_next_launches_fail_then_capacity_returns(self) -> None:
        name = self.create_group(desired=1)
        self.bed("POST", "/_bed/faults/capacity", {"asg": name, "count": 2})
        self.set_desired(name, 2)
        self.wait_in_service(name, 2)
        launches = [a for a in self.activities(name) if a["Description"].startswith("Launching")][:3]
        self.assertEqual([a["StatusCode"] for a in launches], ["Successful", "Failed", "Failed"])
        for failed in launches[1:]:
            self.assertEqual(
                failed["StatusMessage"],
                "Could not launch Spot Instances. InsufficientInstanceCapacity - There is no Spot capacity "
                "available that matches your request. Launching EC2 instance failed.",
            )
            self.assertTrue(failed["Description"].startswith("Launching a new EC2 instance.  Status Reason: "))
        self.assertNotIn(name, self.bed("GET", "/_bed/faults")["capacity"], "the fault used itself up")

    def test_a_zone_short_of_capacity_fails_there_and_the_group_launches_in_another(self) -> None:
        name = self.create_group(desired=0, zones=["us-east-1a", "us-east-1b"])
        self.bed("POST", "/_bed/faults/capacity", {"asg": name, "zone": "us-east-1a"})
        self.set_desired(name, 2)
        self.wait_in_service(name, 2)
        zones = {i["AvailabilityZone"] for i in self.group(name)["Instances"]}
        self.assertEqual(zones, {"us-east-1b"})
        failed = [a for a in self.activities(name) if a["StatusCode"] == "Failed"]
        self.assertTrue(failed)
        self.assertTrue(all(json.loads(a["Details"])["Availability Zone"] == "us-east-1a" for a in failed))

    def test_a_fault_clears_itself_after_its_time(self) -> None:
        name = self.create_group(desired=0)
        self.bed("POST", "/_bed/faults/capacity", {"asg": name, "seconds": 0.8})
        self.set_desired(name, 1)
        self.assertEqual(self.activities(name)[0]["StatusCode"], "Failed")
        self.wait_in_service(name, 1)
        self.assertNotIn(name, self.bed("GET", "/_bed/faults")["capacity"])

    def test_a_termination_takes_time_with_its_own_activity(self) -> None:
        name = self.create_group(desired=2, timing={"termination_delay": 0.8})
        victim = self.instance_ids(name)[0]
        answer = self.asg.terminate_instance_in_auto_scaling_group(
            InstanceId=victim, ShouldDecrementDesiredCapacity=True
        )
        activity = answer["Activity"]
        self.assertEqual(activity["StatusCode"], "InProgress")
        self.assertEqual(activity["Description"], f"Terminating EC2 instance: {victim}")
        self.assertRegex(
            activity["Cause"],
            rf"^At \S+Z instance {victim} was taken out of service in response to a user request, shrinking the "
            r"capacity from 2 to 1\.$",
        )
        self.assertEqual(self.states(name)[victim], "Terminating")
        wait_for("the instance to be gone", lambda: victim not in self.states(name))
        self.assertEqual(self.activity(activity["ActivityId"])["StatusCode"], "Successful")
        state = self.ec2.describe_instances(InstanceIds=[victim])["Reservations"][0]["Instances"][0]["State"]["Name"]
        self.assertEqual(state, "terminated")
        (call,) = self.bed("GET", "/_bed/calls?action=TerminateInstanceInAutoScalingGroup")[-1:]
        self.assertEqual(call["params"]["InstanceId"], victim)
        self.assertEqual(call["activity_ids"], [activity["ActivityId"]])

    def test_terminating_without_decrement_launches_a_replacement(self) -> None:
        name = self.create_group(desired=1)
        (victim,) = self.instance_ids(name)
        self.asg.terminate_instance_in_auto_scaling_group(InstanceId=victim, ShouldDecrementDesiredCapacity=False)
        states = self.states(name)
        self.assertEqual(states[victim], "Terminating")
        self.assertEqual(sorted(states.values()), ["Pending", "Terminating"])
        (replacement,) = self.wait_in_service(name, 1)
        self.assertNotEqual(replacement, victim)

    def test_terminate_with_decrement_at_min_size_is_refused(self) -> None:
        name = self.create_group(desired=1, min_size=1)
        (only,) = self.instance_ids(name)
        with self.assertRaises(ClientError) as caught:
            self.asg.terminate_instance_in_auto_scaling_group(InstanceId=only, ShouldDecrementDesiredCapacity=True)
        self.assertEqual(caught.exception.response["Error"]["Code"], "ValidationError")
        self.assertEqual(
            caught.exception.response["Error"]["Message"],
            "Currently, desiredSize equals minSize (1). Terminating instance without replacement will violate "
            "group's min size constraint. Either set shouldDecrementDesiredCapacity flag to false or lower "
            "group's min size.",
        )
        self.assertEqual(self.states(name), {only: "InService"})
        self.assert_error(lambda: self.set_desired(name, 0), "ValidationError", 400)

    def test_protected_instances_are_never_scaled_in(self) -> None:
        name = self.create_group(desired=3)
        keep = self.instance_ids(name)[:2]
        self.asg.set_instance_protection(AutoScalingGroupName=name, InstanceIds=keep, ProtectedFromScaleIn=True)
        self.set_desired(name, 1)
        wait_for("scale-in", lambda: sorted(self.states(name)) == sorted(keep))
        self.set_desired(name, 0)
        time.sleep(0.6)
        self.assertEqual(sorted(self.states(name)), sorted(keep), "no protected instance is chosen")
        self.assertEqual(self.group(name)["DesiredCapacity"], 0)

    def test_a_neighbour_scales_the_group_in_and_out(self) -> None:
        name = self.create_group(desired=2, min_size=1)
        first, second = self.instance_ids(name)
        self.asg.set_instance_protection(AutoScalingGroupName=name, InstanceIds=[first], ProtectedFromScaleIn=True)
        out = self.bed("POST", "/_bed/neighbour/desired", {"asg": name, "desired": 4})
        self.assertEqual(len(out["activity_ids"]), 2)
        self.wait_in_service(name, 4)
        refused = self.bed("POST", "/_bed/neighbour/desired", {"asg": name, "desired": 11}, expect=400)
        self.assertEqual(
            refused["message"], "New SetDesiredCapacity value 11 is above max value 10 for the AutoScalingGroup."
        )

        chosen = self.bed("POST", "/_bed/neighbour/terminate", {"asg": name})
        self.assertEqual(chosen["instance"], second, "the first unprotected InService instance")
        self.assertEqual(chosen["desired"], 3)
        named = [i for i in self.instance_ids(name) if i not in (first, second)][0]
        self.bed("POST", "/_bed/neighbour/terminate", {"asg": name, "instance": named})
        calls = self.bed("GET", "/_bed/calls?actor=neighbour")
        mine = [
            c
            for c in calls
            if c["params"].get("AutoScalingGroupName") == name or c["params"].get("InstanceId") in (second, named)
        ]
        self.assertEqual(
            [c["action"] for c in mine],
            [
                "SetDesiredCapacity",
                "SetDesiredCapacity",
                "TerminateInstanceInAutoScalingGroup",
                "TerminateInstanceInAutoScalingGroup",
            ],
        )
        self.assertEqual(mine[1]["error"], "ValidationError")
        self.assertEqual([c["params"]["InstanceId"] for c in mine[2:]], [second, named])
        wait_for("two left", lambda: len(self.states(name)) == 2)
        self.assertEqual(self.group(name)["DesiredCapacity"], 2)

    def test_throttling_answers_once_the_burst_is_spent(self) -> None:
        bucket = self.bed("POST", "/_bed/throttle", {"action": "DescribeLaunchConfigurations", "burst": 2, "rate": 0.5})
        self.assertEqual(bucket["burst"], 2)
        try:
            self.asg.describe_launch_configurations()
            self.asg.describe_launch_configurations()
            with self.assertRaises(ClientError) as caught:
                self.asg.describe_launch_configurations()
            error = caught.exception.response["Error"]
            self.assertEqual((error["Code"], error["Message"]), ("Throttling", "Rate exceeded"))
            self.asg.describe_auto_scaling_groups(MaxRecords=1)  # other actions have their own budget
            time.sleep(2.1)
            self.asg.describe_launch_configurations()  # refilled at 0.5 per second
        finally:
            self.bed("DELETE", "/_bed/throttle")
        self.asg.describe_launch_configurations()

    def test_error_rules_can_be_scoped_to_one_group(self) -> None:
        mine, other = self.create_group(desired=0), self.create_group(desired=0)
        self.bed("POST", "/_bed/faults/errors", {"kind": "server", "asg": mine, "actions": ["SetDesiredCapacity"]})
        try:
            self.assert_error(lambda: self.set_desired(mine, 1), "InternalFailure", 500)
            self.set_desired(other, 1)
        finally:
            self.bed("DELETE", "/_bed/faults/errors")


class LifecycleTest(unittest.TestCase):
    def test_reset_clears_everything_and_sigterm_stops_it_cleanly(self) -> None:
        launcher = Launcher()
        try:
            asg = launcher.client("autoscaling")
            asg.describe_auto_scaling_groups()
            launcher.bed("POST", "/_bed/faults/capacity", {"asg": "x"})
            launcher.bed("POST", "/_bed/faults/not-ready", {"asg": "x"})
            launcher.bed("POST", "/_bed/activities", {"asg": "x"})
            self.assertEqual(len(launcher.bed("GET", "/_bed/calls")[1]), 1)
            self.assertEqual(launcher.bed("POST", "/_bed/reset")[0], 200)
            self.assertEqual(launcher.bed("GET", "/_bed/calls")[1], [])
            self.assertEqual(launcher.bed("GET", "/_bed/activities")[1], [])
            self.assertEqual(
                launcher.bed("GET", "/_bed/faults")[1],
                {"capacity": [], "capacity_rules": [], "not_ready": [], "errors": []},
            )
        finally:
            launcher.stop()
        self.assertEqual(launcher.process.returncode, 0)


# -- the node bridge, in-process ----------------------------------------------------------------


def view(**overrides: Any) -> InstanceView:
    fields: dict[str, Any] = {
        "instance_id": "i-0123456789abcdef0",
        "private_dns_name": "ip-10-0-1-23.ec2.internal",
        "private_ip": "10.0.1.23",
        "availability_zone": "us-east-1a",
        "region": "us-east-1",
        "instance_type": "m5.large",
        "instance_tags": {},
        "asg_name": "workers",
        "asg_tags": {},
        "capacity_type": "SPOT",
    }
    fields.update(overrides)
    return InstanceView(**fields)


class NodeManifestTest(unittest.TestCase):
    def test_node_carries_identity_labels_and_status(self) -> None:
        node = node_manifest(view())
        self.assertEqual(node["metadata"]["name"], "ip-10-0-1-23.ec2.internal")
        self.assertEqual(node["spec"]["providerID"], "aws:///us-east-1a/i-0123456789abcdef0")
        labels = node["metadata"]["labels"]
        self.assertEqual(labels["kubernetes.io/hostname"], "ip-10-0-1-23.ec2.internal")
        self.assertEqual(labels["topology.kubernetes.io/zone"], "us-east-1a")
        self.assertEqual(labels["node.kubernetes.io/instance-type"], "m5.large")
        self.assertEqual(labels["eks.amazonaws.com/nodegroup"], "workers")
        self.assertEqual(labels["eks.amazonaws.com/capacityType"], "SPOT")
        self.assertEqual(labels["type"], "kwok")
        self.assertEqual(
            node["metadata"]["annotations"],
            {"kwok.x-k8s.io/node": "fake", INSTANCE_ID_ANNOTATION: "i-0123456789abcdef0"},
        )
        status = node["status"]
        self.assertEqual(status["capacity"], {"cpu": "4", "memory": "16Gi", "pods": "110"})
        self.assertEqual(status["allocatable"], status["capacity"])
        self.assertIn({"type": "InternalIP", "address": "10.0.1.23"}, status["addresses"])
        self.assertEqual(status["nodeInfo"]["architecture"], "amd64")
        self.assertEqual(status["nodeInfo"]["operatingSystem"], "linux")

    def test_a_node_whose_kubelet_never_turns_ready(self) -> None:
        since = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
        node = node_manifest(view(), not_ready_since=since)
        self.assertEqual(
            node["metadata"]["annotations"],
            {"bed.local/kubelet": "bridge", INSTANCE_ID_ANNOTATION: "i-0123456789abcdef0"},
            "no kwok annotation: the bridge plays this kubelet",
        )
        conditions = {c["type"]: c for c in node["status"]["conditions"]}
        self.assertEqual(sorted(conditions), ["DiskPressure", "MemoryPressure", "PIDPressure", "Ready"])
        ready = conditions["Ready"]
        self.assertEqual((ready["status"], ready["reason"]), ("False", NOT_READY_REASON))
        self.assertIn("cni plugin not initialized", ready["message"])
        self.assertEqual(ready["lastHeartbeatTime"], "2026-01-02T03:04:05Z")
        self.assertNotIn("conditions", node_manifest(view())["status"], "kwok posts a healthy Node's conditions")

        from kubernetes.client import V1Node

        V1Node.model_validate(node)

    def test_node_passes_the_kubernetes_clients_validation(self) -> None:
        from kubernetes.client import V1Node

        node = V1Node.model_validate(node_manifest(view(), kubelet_version="v1.36.3"))
        self.assertEqual(node.spec.provider_id, "aws:///us-east-1a/i-0123456789abcdef0")
        self.assertEqual(node.status.node_info.kubelet_version, "v1.36.3")

    def test_node_template_tags_become_labels_and_nodegroup_tag_wins(self) -> None:
        prefix = "k8s.io/cluster-autoscaler/node-template/label/"
        node = node_manifest(
            view(
                asg_tags={prefix + "spot-rebalancer.io/enabled": "true", "eks:nodegroup-name": "ng-1", "other": "x"},
                instance_tags={prefix + "team": "a", prefix + "spot-rebalancer.io/enabled": "false"},
            )
        )
        labels = node["metadata"]["labels"]
        self.assertEqual(labels["spot-rebalancer.io/enabled"], "true", "ASG tags win over instance tags")
        self.assertEqual(labels["team"], "a")
        self.assertEqual(labels["eks.amazonaws.com/nodegroup"], "ng-1")
        self.assertNotIn("other", labels)

    def test_standalone_instance_has_no_nodegroup(self) -> None:
        labels = node_manifest(view(asg_name=None, capacity_type="ON_DEMAND"))["metadata"]["labels"]
        self.assertNotIn("eks.amazonaws.com/nodegroup", labels)
        self.assertEqual(labels["eks.amazonaws.com/capacityType"], "ON_DEMAND")

    def test_capacity_type_rules(self) -> None:
        self.assertEqual(decide_capacity_type({}, None, None, None), "ON_DEMAND")
        self.assertEqual(decide_capacity_type({}, "spot", None, None), "SPOT")
        self.assertEqual(decide_capacity_type({}, None, "spot", None), "SPOT")
        self.assertEqual(decide_capacity_type({"bed/capacity-type": "spot"}, None, None, None), "SPOT")
        self.assertEqual(decide_capacity_type({"bed/capacity-type": "on-demand"}, "spot", "spot", None), "ON_DEMAND")
        all_spot = {"InstancesDistribution": {"OnDemandBaseCapacity": 0, "OnDemandPercentageAboveBaseCapacity": 0}}
        self.assertEqual(decide_capacity_type({}, None, None, all_spot), "SPOT")
        some_on_demand = {
            "InstancesDistribution": {"OnDemandBaseCapacity": 1, "OnDemandPercentageAboveBaseCapacity": 0}
        }
        self.assertEqual(decide_capacity_type({}, None, None, some_on_demand), "ON_DEMAND")


def ready_status(node: dict[str, Any]) -> str | None:
    """The status of a Node manifest's Ready condition, if it has one."""
    conditions = node.get("status", {}).get("conditions", [])
    return next((c["status"] for c in conditions if c["type"] == "Ready"), None)


class FakeCoreV1:
    """The CoreV1Api calls the bridge makes, over a dict of Node manifests."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, Any]] = {}
        self.creates = 0

    def list_node(self, **_: Any) -> Any:
        return SimpleNamespace(
            items=[
                SimpleNamespace(
                    metadata=SimpleNamespace(name=n["metadata"]["name"], annotations=n["metadata"].get("annotations")),
                    spec=SimpleNamespace(provider_id=n.get("spec", {}).get("providerID")),
                    status=SimpleNamespace(
                        conditions=[
                            SimpleNamespace(type=c["type"], status=c["status"])
                            for c in n.get("status", {}).get("conditions", [])
                        ]
                    ),
                )
                for n in self.nodes.values()
            ]
        )

    def create_node(self, body: dict[str, Any], **_: Any) -> Any:
        from kubernetes.client.exceptions import ApiException

        name = body["metadata"]["name"]
        if name in self.nodes:
            raise ApiException(status=409, reason="AlreadyExists")
        self.nodes[name] = body
        self.creates += 1
        return SimpleNamespace(metadata=SimpleNamespace(name=name, uid=f"uid-{name}"))

    def patch_node_status(self, name: str, body: dict[str, Any], **_: Any) -> None:
        """A strategic merge of conditions (merged by type), as the API server does for Nodes."""
        conditions = self.nodes[name].setdefault("status", {}).setdefault("conditions", [])
        for patched in body["status"]["conditions"]:
            conditions[:] = [c for c in conditions if c["type"] != patched["type"]] + [patched]

    def delete_node(self, name: str, **_: Any) -> None:
        from kubernetes.client.exceptions import ApiException

        if self.nodes.pop(name, None) is None:
            raise ApiException(status=404, reason="NotFound")


class FakeLeases:
    """The CoordinationV1Api calls the bridge makes for node Leases, over a dict of Lease manifests."""

    def __init__(self) -> None:
        self.leases: dict[str, dict[str, Any]] = {}
        self.renewals = 0

    @staticmethod
    def _missing(name: str) -> Exception:
        from kubernetes.client.exceptions import ApiException

        return ApiException(status=404, reason=f"NotFound {name}")

    def create_namespaced_lease(self, namespace: str, body: dict[str, Any], **_: Any) -> None:
        from kubernetes.client.exceptions import ApiException

        assert namespace == NODE_LEASE_NAMESPACE
        name = body["metadata"]["name"]
        if name in self.leases:
            raise ApiException(status=409, reason="AlreadyExists")
        self.leases[name] = body

    def read_namespaced_lease(self, name: str, namespace: str, **_: Any) -> Any:
        if name not in self.leases:
            raise self._missing(name)
        return SimpleNamespace(spec=SimpleNamespace(holder_identity=self.leases[name]["spec"].get("holderIdentity")))

    def patch_namespaced_lease(self, name: str, namespace: str, body: dict[str, Any], **_: Any) -> None:
        if name not in self.leases:
            raise self._missing(name)
        lease = self.leases[name]
        lease["spec"].update(body.get("spec", {}))
        lease["metadata"].update(body.get("metadata", {}))
        self.renewals += 1

    def delete_namespaced_lease(self, name: str, namespace: str, **_: Any) -> None:
        if self.leases.pop(name, None) is None:
            raise self._missing(name)


class NodeBridgeTest(unittest.TestCase):
    """Reconciliation against moto's in-process backends (this process's own) and a fake API."""

    def setUp(self) -> None:
        from moto import mock_aws

        self.mock = mock_aws()
        self.mock.start()
        self.world = MotoWorld(REGION, ActivityLog(), CapacityFaults())
        self.world.install_engine(Timing(launch_delay=0, termination_delay=0))
        self.now = 100.0
        self.core = FakeCoreV1()
        self.leases = FakeLeases()
        self.autoscaling = boto3.client("autoscaling", region_name=REGION)
        self.world.create_launch_template("lt-bridge", "m5.large", spot=True)
        self.autoscaling.create_auto_scaling_group(
            AutoScalingGroupName="workers",
            LaunchTemplate={"LaunchTemplateName": "lt-bridge", "Version": "$Latest"},
            AvailabilityZones=["us-east-1a"],
            MinSize=0,
            MaxSize=5,
            DesiredCapacity=2,
            Tags=[
                {"Key": "k8s.io/cluster-autoscaler/node-template/label/spot-rebalancer.io/enabled", "Value": "true"},
                {"Key": "eks:nodegroup-name", "Value": "ng-workers"},
            ],
        )

    def tearDown(self) -> None:
        self.mock.stop()

    def bridge(self, not_ready: NotReadyFaults | None = None) -> NodeBridge:
        return NodeBridge(
            self.world,
            "unused",
            boot_delay=2.0,
            interval=0.5,
            clock=lambda: self.now,
            api=self.core,
            not_ready_faults=not_ready,
            leases=self.leases,
        )

    def asg_members(self) -> list[str]:
        group = self.autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=["workers"])["AutoScalingGroups"][0]
        return [i["InstanceId"] for i in group["Instances"]]

    def test_nodes_follow_instances_after_the_boot_delay(self) -> None:
        bridge = self.bridge()
        self.core.nodes["kind-control-plane"] = {"metadata": {"name": "kind-control-plane", "annotations": {}}}
        bridge.reconcile_once()
        self.assertEqual(bridge.nodes(), {}, "nothing before the boot delay")

        self.now += 2.5
        bridge.reconcile_once()
        members = self.asg_members()
        self.assertEqual(sorted(bridge.nodes()), sorted(members))
        node = self.core.nodes[bridge.nodes()[members[0]]]
        labels = node["metadata"]["labels"]
        self.assertEqual(labels["eks.amazonaws.com/nodegroup"], "ng-workers")
        self.assertEqual(labels["eks.amazonaws.com/capacityType"], "SPOT")
        self.assertEqual(labels["spot-rebalancer.io/enabled"], "true")
        self.assertRegex(node["metadata"]["name"], r"^ip-\d+-\d+-\d+-\d+\.ec2\.internal$")

        victim = members[0]
        replacement = self.world.reclaim_instance(victim)["replacements"][0]
        bridge.reconcile_once()
        self.assertNotIn(victim, bridge.nodes(), "the reclaimed instance's Node goes at once")
        self.assertNotIn(replacement, bridge.nodes(), "its replacement waits for the boot delay")
        self.now += 2.5
        bridge.reconcile_once()
        self.assertIn(replacement, bridge.nodes())
        self.assertIn("kind-control-plane", self.core.nodes, "a Node the bridge did not make is never touched")

    def test_nodes_wait_for_in_service_and_stay_while_terminating(self) -> None:
        engine = self.world.install_engine(
            Timing(launch_delay=5, termination_delay=5, boot_delay=1), clock=lambda: self.now
        )
        bridge = self.bridge()
        bridge.reconcile_once()
        self.now += 2.5
        bridge.reconcile_once()
        old = sorted(bridge.nodes())
        self.assertEqual(len(old), 2)
        self.autoscaling.set_desired_capacity(AutoScalingGroupName="workers", DesiredCapacity=3)
        (new,) = set(self.asg_members()) - set(old)
        self.now += 4
        bridge.reconcile_once()
        self.assertNotIn(new, bridge.nodes(), "a Pending instance has no Node")
        self.now += 1
        with self.world.lock:
            engine.tick()
        bridge.reconcile_once()
        self.assertNotIn(new, bridge.nodes(), "the boot delay counts from InService")
        self.now += 1
        bridge.reconcile_once()
        self.assertIn(new, bridge.nodes())

        with self.world.lock:
            engine.terminate_in_group(old[0], decrement=True)
        bridge.reconcile_once()
        self.assertIn(old[0], bridge.nodes(), "a Terminating instance keeps its Node")
        self.now += 5
        with self.world.lock:
            engine.tick()
        bridge.reconcile_once()
        self.assertNotIn(old[0], bridge.nodes(), "gone with its instance")

    def test_a_restarted_bridge_adopts_existing_nodes(self) -> None:
        first = self.bridge()
        first.reconcile_once()
        self.now += 2.5
        first.reconcile_once()
        creates = self.core.creates

        second = self.bridge()
        second.reconcile_once()
        self.assertEqual(second.nodes(), first.nodes())
        self.assertEqual(self.core.creates, creates, "no duplicates")

    def test_standby_and_standalone_instances(self) -> None:
        bridge = self.bridge()
        standalone = self.world.run_instance(tags={"Name": "loose"}, spot=True)
        bridge.reconcile_once()
        self.now += 2.5
        bridge.reconcile_once()
        node = self.core.nodes[bridge.nodes()[standalone.id]]
        self.assertNotIn("eks.amazonaws.com/nodegroup", node["metadata"]["labels"])
        self.assertEqual(node["metadata"]["labels"]["eks.amazonaws.com/capacityType"], "SPOT")

        member = self.asg_members()[0]
        self.autoscaling.enter_standby(
            AutoScalingGroupName="workers", InstanceIds=[member], ShouldDecrementDesiredCapacity=True
        )
        bridge.reconcile_once()
        self.assertNotIn(member, bridge.nodes(), "only InService members are Nodes")

    def test_a_name_taken_by_a_foreign_node_is_left_alone(self) -> None:
        bridge = self.bridge()
        bridge.reconcile_once()
        member = self.asg_members()[0]
        name = next(v.private_dns_name for v in self.world.node_candidates() if v.instance_id == member)
        self.core.nodes[name] = {"metadata": {"name": name, "annotations": {}}}
        self.now += 2.5
        bridge.reconcile_once()
        self.assertNotIn(member, bridge.nodes())
        self.assertEqual(self.core.nodes[name]["metadata"]["annotations"], {})

    def test_an_instance_a_real_kubelet_registered_gets_no_node(self) -> None:
        bridge = self.bridge()
        bridge.reconcile_once()
        kind_worker, other = self.asg_members()
        self.core.nodes["kind-worker"] = {
            "metadata": {"name": "kind-worker", "annotations": {}},
            "spec": {"providerID": f"aws:///us-east-1a/{kind_worker}"},
        }
        self.now += 2.5
        bridge.reconcile_once()
        self.assertEqual(list(bridge.nodes()), [other])
        self.assertEqual(self.core.creates, 1)
        self.assertEqual(self.core.nodes["kind-worker"]["metadata"]["annotations"], {})

    def test_a_not_ready_fault_holds_new_nodes_not_ready_until_cleared(self) -> None:
        faults = NotReadyFaults()
        bridge = self.bridge(faults)
        bridge.reconcile_once()
        self.now += 2.5
        bridge.reconcile_once()
        serving = self.asg_members()
        self.assertEqual(self.leases.leases, {}, "kwok holds the Leases of healthy Nodes, not the bridge")

        faults.arm("workers")
        self.autoscaling.set_desired_capacity(AutoScalingGroupName="workers", DesiredCapacity=3)
        (new,) = set(self.asg_members()) - set(serving)
        bridge.reconcile_once()
        self.now += 2.5
        bridge.reconcile_once()
        name = bridge.nodes()[new]
        node = self.core.nodes[name]
        self.assertNotIn("kwok.x-k8s.io/node", node["metadata"]["annotations"])
        self.assertEqual(ready_status(node), "False")
        lease = self.leases.leases[name]
        self.assertEqual(lease["spec"]["holderIdentity"], name, "held as a kubelet holds it, so kwok keeps off")
        self.assertEqual(lease["metadata"]["ownerReferences"][0]["uid"], f"uid-{name}")
        for old in serving:
            self.assertIsNone(ready_status(self.core.nodes[bridge.nodes()[old]]), "Nodes made before are untouched")

        renewals = self.leases.renewals
        self.now += 5
        bridge.reconcile_once()
        self.assertEqual(self.leases.renewals, renewals, "not due yet")
        self.now += 5
        bridge.reconcile_once()
        self.assertEqual(self.leases.renewals, renewals + 1, "renewed every 10 s, as a kubelet renews")
        self.assertEqual(ready_status(node), "False", "still not Ready while the fault is armed")

        faults.disarm("workers")
        bridge.reconcile_once()
        self.assertEqual(ready_status(node), "True", "the cleared fault lets the kubelet post Ready")

        self.world.reclaim_instance(new)
        bridge.reconcile_once()
        self.assertNotIn(name, self.core.nodes)
        self.assertNotIn(name, self.leases.leases, "its Lease goes with it")

    def test_a_held_node_name_whose_lease_someone_else_holds_is_left_alone(self) -> None:
        faults = NotReadyFaults()
        faults.arm("workers")
        bridge = self.bridge(faults)
        bridge.reconcile_once()
        member = self.asg_members()[0]
        name = next(v.private_dns_name for v in self.world.node_candidates() if v.instance_id == member)
        self.leases.leases[name] = {"metadata": {"name": name}, "spec": {"holderIdentity": "kwok-controller"}}
        self.now += 2.5
        bridge.reconcile_once()
        self.assertNotIn(member, bridge.nodes())
        self.assertNotIn(name, self.core.nodes)
        self.assertEqual(self.leases.leases[name]["spec"]["holderIdentity"], "kwok-controller")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO if os.environ.get("SELFTEST_LOGS") else logging.CRITICAL)
    unittest.main()
