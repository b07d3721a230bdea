"""The node bridge: each running moto instance becomes a Kubernetes Node, as a kubelet would do it.

Every tick the bridge compares two sets and makes the second match the first:

- the instances that should be Nodes (``MotoWorld.node_candidates``: running, and InService when in
  an ASG) once seen for ``boot_delay`` seconds;
- the Nodes it owns: those annotated ``bed.local/instance-id`` (listed afresh every tick, so a
  restarted bridge adopts what an earlier one made, and a Node deleted by someone else comes back).

It creates what is missing and deletes Nodes whose instance is gone. Nodes without the annotation
are never touched. kwok (``kwok.x-k8s.io/node: fake``) then makes the Nodes Ready.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from .world import InstanceView, MotoWorld

log = logging.getLogger(__name__)

INSTANCE_ID_ANNOTATION = "bed.local/instance-id"
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
# cluster-autoscaler's convention: an ASG tag with this prefix puts a label on its nodes.
NODE_TEMPLATE_LABEL_PREFIX = "k8s.io/cluster-autoscaler/node-template/label/"
NODEGROUP_TAG = "eks:nodegroup-name"

NODE_CAPACITY = {"cpu": "4", "memory": "16Gi", "pods": "110"}

REQUEST_TIMEOUT_SECONDS = 5

# Used when the API server's own version cannot be read; Nodes otherwise report that version.
DEFAULT_KUBELET_VERSION = "v0.0.0-bed"


def template_labels(tags: dict[str, str]) -> dict[str, str]:
    """Labels named by cluster-autoscaler node-template tags, prefix removed."""
    return {
        key[len(NODE_TEMPLATE_LABEL_PREFIX) :]: value
        for key, value in tags.items()
        if key.startswith(NODE_TEMPLATE_LABEL_PREFIX) and len(key) > len(NODE_TEMPLATE_LABEL_PREFIX)
    }


def node_name(view: InstanceView) -> str:
    """The instance's private DNS name (``ip-10-1-2-3.ec2.internal``), a valid DNS-1123 subdomain."""
    return view.private_dns_name.lower()


def node_manifest(view: InstanceView, kubelet_version: str = DEFAULT_KUBELET_VERSION) -> dict[str, Any]:
    """The Node object for an instance: the pure heart of the bridge."""
    name = node_name(view)
    machine_id = uuid.uuid5(uuid.NAMESPACE_URL, f"aws:///{view.instance_id}")
    labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "topology.kubernetes.io/region": view.region,
        "topology.kubernetes.io/zone": view.availability_zone,
        "node.kubernetes.io/instance-type": view.instance_type,
        "eks.amazonaws.com/capacityType": view.capacity_type,
        "type": "kwok",
    }
    nodegroup = view.asg_tags.get(NODEGROUP_TAG) or view.asg_name or view.instance_tags.get(NODEGROUP_TAG)
    if nodegroup:
        labels["eks.amazonaws.com/nodegroup"] = nodegroup
    # Instance tags first, so the ASG's own tags win on a clash.
    labels.update(template_labels(view.instance_tags))
    labels.update(template_labels(view.asg_tags))
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {KWOK_ANNOTATION: "fake", INSTANCE_ID_ANNOTATION: view.instance_id},
        },
        "spec": {"providerID": f"aws:///{view.availability_zone}/{view.instance_id}"},
        "status": {
            "capacity": dict(NODE_CAPACITY),
            "allocatable": dict(NODE_CAPACITY),
            "addresses": [
                {"type": "InternalIP", "address": view.private_ip},
                {"type": "Hostname", "address": name},
                {"type": "InternalDNS", "address": name},
            ],
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "osImage": "Amazon Linux 2023 (test bed)",
                "kernelVersion": "6.1.0-bed",
                "containerRuntimeVersion": "containerd://2.0.0-bed",
                "kubeletVersion": kubelet_version,
                "kubeProxyVersion": kubelet_version,
                "machineID": machine_id.hex,
                "systemUUID": str(machine_id),
                "bootID": str(machine_id),
            },
        },
    }


class ProblemLog:
    """Logs a recurring problem once, then again only when it changes or every ``every`` seconds."""

    def __init__(self, every: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._last: dict[str, tuple[str, float]] = {}
        self._every = every
        self._clock = clock

    def warn(self, key: str, message: str) -> None:
        now = self._clock()
        last = self._last.get(key)
        if last is None or last[0] != message or now - last[1] >= self._every:
            log.warning("%s", message)
            self._last[key] = (message, now)

    def resolved(self, key: str) -> None:
        if self._last.pop(key, None) is not None:
            log.info("%s: recovered", key)


class NodeBridge:
    """Runs the reconcile loop in a daemon thread; see the module doc."""

    def __init__(
        self,
        world: MotoWorld,
        kubeconfig: str,
        boot_delay: float,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
        api: Any = None,
    ) -> None:
        """``api`` is a CoreV1Api-like client to use instead of one built from ``kubeconfig``."""
        self.world = world
        self.kubeconfig = kubeconfig
        self.boot_delay = boot_delay
        self.interval = interval
        self.clock = clock
        self._first_seen: dict[str, float] = {}
        self._owned: dict[str, str] = {}  # instance id -> node name, as of the last tick
        self._owned_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="node-bridge", daemon=True)
        self._given_api = api
        self._core: Any = api
        self._kubelet_version = DEFAULT_KUBELET_VERSION
        self._problems = ProblemLog()

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def nodes(self) -> dict[str, str]:
        """Instance id -> Node name for the Nodes the bridge owns."""
        with self._owned_lock:
            return dict(self._owned)

    def _run(self) -> None:
        log.info("node bridge started (boot delay %.1fs, every %.1fs)", self.boot_delay, self.interval)
        while not self._stop.is_set():
            try:
                self.reconcile_once()
            except Exception as exc:  # never let one bad tick end the bridge
                self._problems.warn("tick", f"node bridge tick failed: {exc!r}")
                self._core = self._given_api  # rebuild the client next tick, in case it is the culprit
            self._stop.wait(self.interval)
        log.info("node bridge stopped")

    # -- one tick -------------------------------------------------------------------------------

    def reconcile_once(self) -> None:
        candidates = {view.instance_id: view for view in self.world.node_candidates()}
        due = self._due(candidates)
        core = self._client()
        owned = self._list_owned(core)
        for instance_id, name in owned.items():
            if instance_id not in candidates and self._delete(core, name):
                log.info("deleted Node %s (instance %s is gone)", name, instance_id)
        for instance_id, view in due.items():
            if instance_id not in owned and self._create(core, view):
                owned[instance_id] = node_name(view)
                log.info("created Node %s for instance %s", node_name(view), instance_id)
        with self._owned_lock:
            self._owned = {i: n for i, n in owned.items() if i in candidates}
        self._problems.resolved("tick")

    def _due(self, candidates: dict[str, InstanceView]) -> dict[str, InstanceView]:
        """The candidates seen for at least ``boot_delay`` seconds."""
        now = self.clock()
        for instance_id in list(self._first_seen):
            if instance_id not in candidates:
                del self._first_seen[instance_id]
        for instance_id in candidates:
            self._first_seen.setdefault(instance_id, now)
        return {i: v for i, v in candidates.items() if now - self._first_seen[i] >= self.boot_delay}

    def _client(self) -> Any:
        """The CoreV1Api, built from the kubeconfig on first use (and again after a failed tick)."""
        if self._core is None:
            from kubernetes import client, config

            api_client = config.new_client_from_config(config_file=self.kubeconfig)
            version = client.VersionApi(api_client).get_code(_request_timeout=REQUEST_TIMEOUT_SECONDS)
            self._kubelet_version = version.git_version or DEFAULT_KUBELET_VERSION
            self._core = client.CoreV1Api(api_client)
        return self._core

    def _list_owned(self, core: Any) -> dict[str, str]:
        owned = {}
        for node in core.list_node(_request_timeout=REQUEST_TIMEOUT_SECONDS).items:
            instance_id = (node.metadata.annotations or {}).get(INSTANCE_ID_ANNOTATION)
            if instance_id:
                owned[instance_id] = node.metadata.name
        return owned

    def _create(self, core: Any, view: InstanceView) -> bool:
        from kubernetes.client.exceptions import ApiException

        manifest = node_manifest(view, self._kubelet_version)
        try:
            core.create_node(manifest, _request_timeout=REQUEST_TIMEOUT_SECONDS)
        except ApiException as exc:
            reason = "its name is taken by a Node the bridge does not own" if exc.status == 409 else exc.reason
            self._problems.warn(
                f"create {view.instance_id}", f"cannot create Node {node_name(view)}: {reason} ({exc.status})"
            )
            return False
        except ValueError as exc:  # the client's own validation (pydantic) refused the manifest
            self._problems.warn(f"create {view.instance_id}", f"cannot create Node {node_name(view)}: {exc}")
            return False
        self._problems.resolved(f"create {view.instance_id}")
        return True

    def _delete(self, core: Any, name: str) -> bool:
        from kubernetes.client.exceptions import ApiException

        try:
            core.delete_node(name, _request_timeout=REQUEST_TIMEOUT_SECONDS)
        except ApiException as exc:
            if exc.status == 404:
                return True
            self._problems.warn(f"delete {name}", f"cannot delete Node {name}: {exc.reason} ({exc.status})")
            return False
        return True
