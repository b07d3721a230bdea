"""The node bridge: each running moto instance becomes a Kubernetes Node, as a kubelet would do it.

Every tick the bridge compares two sets and makes the second match the first:

- the instances that should be Nodes (``MotoWorld.node_candidates``: running, and InService when in
  an ASG) once seen for ``boot_delay`` seconds;
- the Nodes it owns: those annotated ``bed.local/instance-id`` (listed afresh every tick, so a
  restarted bridge adopts what an earlier one made, and a Node deleted by someone else comes back).

It creates what is missing and deletes Nodes whose instance is gone. Nodes without the annotation
are never touched, and an instance that already has one (a real kubelet registered it, with its
``spec.providerID`` naming the instance: a kind worker playing that instance) gets no Node of the
bridge's. kwok then makes the Nodes Ready: kwokctl runs it with ``--manage-all-nodes``, so it
takes every Node whose Lease in ``kube-node-lease`` nobody else holds (the ``kwok.x-k8s.io/node: fake``
annotation is kept for a kwok that selects by it).

While an ASG's not-Ready fault is armed (``NotReadyFaults``), a new Node of that ASG gets a kubelet
that never turns Ready, played by the bridge: it takes the Node's Lease first (holder: the node name,
as a kubelet does, so kwok leaves the Node alone), registers the Node with ``Ready=False``
(``KubeletNotReady``, CNI not initialised) and no kwok annotation, and renews the Lease every 10 s
for the Node's whole life, so the node lifecycle controller sees a live kubelet that is NotReady.
Once the fault is cleared, such a Node posts ``Ready=True`` (the CNI came up at last).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .faults import NotReadyFaults
from .world import InstanceView, MotoWorld

log = logging.getLogger(__name__)

INSTANCE_ID_ANNOTATION = "bed.local/instance-id"
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
# On a Node whose kubelet the bridge plays (the not-Ready fault): the bridge holds its Lease.
KUBELET_ANNOTATION = "bed.local/kubelet"
KUBELET_BY_BRIDGE = "bridge"
# cluster-autoscaler's convention: an ASG tag with this prefix puts a label on its nodes.
NODE_TEMPLATE_LABEL_PREFIX = "k8s.io/cluster-autoscaler/node-template/label/"
NODEGROUP_TAG = "eks:nodegroup-name"

NODE_CAPACITY = {"cpu": "4", "memory": "16Gi", "pods": "110"}

REQUEST_TIMEOUT_SECONDS = 5

# Used when the API server's own version cannot be read; Nodes otherwise report that version.
DEFAULT_KUBELET_VERSION = "v0.0.0-bed"

# A kubelet's node Lease: its defaults (nodeLeaseDurationSeconds 40, renewed every quarter of it).
NODE_LEASE_NAMESPACE = "kube-node-lease"
NODE_LEASE_SECONDS = 40
NODE_LEASE_RENEW_SECONDS = 10

# What a kubelet posts while its node's network plugin is not up (the usual "never Ready" on EKS).
NOT_READY_REASON = "KubeletNotReady"
NOT_READY_MESSAGE = (
    "container runtime network not ready: NetworkReady=false reason:NetworkPluginNotReady "
    "message:Network plugin returns error: cni plugin not initialized"
)
READY_REASON = "KubeletReady"
READY_MESSAGE = "kubelet is posting ready status"

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"


def api_time(moment: datetime) -> str:
    """A Kubernetes ``Time``: RFC 3339 in UTC, whole seconds."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def api_micro_time(moment: datetime) -> str:
    """A Kubernetes ``MicroTime`` (a Lease's renewTime): RFC 3339 in UTC, microseconds."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def ready_condition(ready: bool, now: datetime) -> dict[str, str]:
    """The Ready condition a kubelet posts, Ready or not."""
    return {
        "type": "Ready",
        "status": "True" if ready else "False",
        "reason": READY_REASON if ready else NOT_READY_REASON,
        "message": READY_MESSAGE if ready else NOT_READY_MESSAGE,
        "lastHeartbeatTime": api_time(now),
        "lastTransitionTime": api_time(now),
    }


def kubelet_conditions(now: datetime) -> list[dict[str, str]]:
    """Every condition a kubelet posts on registering a node that is not Ready (no pressure)."""
    healthy = [
        ("MemoryPressure", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
        ("DiskPressure", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
        ("PIDPressure", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
    ]
    return [
        *(
            {
                "type": kind,
                "status": "False",
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": api_time(now),
                "lastTransitionTime": api_time(now),
            }
            for kind, reason, message in healthy
        ),
        ready_condition(False, now),
    ]


def node_lease(name: str, now: datetime) -> dict[str, Any]:
    """The kubelet's Lease for Node ``name``: held by the node's name, as a kubelet holds it."""
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "namespace": NODE_LEASE_NAMESPACE},
        "spec": {
            "holderIdentity": name,
            "leaseDurationSeconds": NODE_LEASE_SECONDS,
            "renewTime": api_micro_time(now),
        },
    }


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


def node_manifest(
    view: InstanceView,
    kubelet_version: str = DEFAULT_KUBELET_VERSION,
    not_ready_since: datetime | None = None,
) -> dict[str, Any]:
    """The Node object for an instance: the pure heart of the bridge. With ``not_ready_since``, the
    Node of a kubelet that registered then and is not Ready (the bridge plays it, not kwok)."""
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
    if not_ready_since is None:
        annotations = {KWOK_ANNOTATION: "fake", INSTANCE_ID_ANNOTATION: view.instance_id}
    else:
        annotations = {KUBELET_ANNOTATION: KUBELET_BY_BRIDGE, INSTANCE_ID_ANNOTATION: view.instance_id}
    node: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
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
    if not_ready_since is not None:
        node["status"]["conditions"] = kubelet_conditions(not_ready_since)
    return node


@dataclass
class OwnedNode:
    """A Node the bridge made, as listed this tick."""

    name: str
    # The bridge plays its kubelet (and holds its Lease): the not-Ready fault was armed at registration.
    by_bridge: bool = False
    ready: bool = False


def owned_node(node: Any) -> tuple[str, OwnedNode] | None:
    """(instance id, what the bridge needs to know) of a listed Node, or None if it is not the bridge's."""
    annotations = node.metadata.annotations or {}
    instance_id = annotations.get(INSTANCE_ID_ANNOTATION)
    if not instance_id:
        return None
    conditions = (node.status.conditions if node.status is not None else None) or []
    return instance_id, OwnedNode(
        name=node.metadata.name,
        by_bridge=annotations.get(KUBELET_ANNOTATION) == KUBELET_BY_BRIDGE,
        ready=any(c.type == "Ready" and c.status == "True" for c in conditions),
    )


def provider_instance(node: Any) -> str | None:
    """The instance id at the end of a Node's ``aws:///<zone>/<instance-id>`` providerID, if any."""
    spec = getattr(node, "spec", None)
    provider_id = getattr(spec, "provider_id", None) or ""
    if not provider_id.startswith("aws://"):
        return None
    return provider_id.rsplit("/", 1)[-1] or None


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
        not_ready_faults: NotReadyFaults | None = None,
        leases: Any = None,
    ) -> None:
        """``api`` and ``leases`` are CoreV1Api- and CoordinationV1Api-like clients to use instead of
        ones built from ``kubeconfig``."""
        self.world = world
        self.kubeconfig = kubeconfig
        self.boot_delay = boot_delay
        self.interval = interval
        self.clock = clock
        self.not_ready_faults = not_ready_faults if not_ready_faults is not None else NotReadyFaults()
        self._first_seen: dict[str, float] = {}
        self._owned: dict[str, str] = {}  # instance id -> node name, as of the last tick
        self._owned_lock = threading.Lock()
        self._renewed: dict[str, float] = {}  # node name -> when the bridge last renewed its Lease
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="node-bridge", daemon=True)
        self._given_api = api
        self._given_leases = leases
        self._core: Any = api
        self._leases: Any = leases
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
                # Rebuild the clients next tick, in case they are the culprit.
                self._core, self._leases = self._given_api, self._given_leases
            self._stop.wait(self.interval)
        log.info("node bridge stopped")

    # -- one tick -------------------------------------------------------------------------------

    def reconcile_once(self) -> None:
        candidates = {view.instance_id: view for view in self.world.node_candidates()}
        due = self._due(candidates)
        core = self._client()
        owned, kubelets = self._list_nodes(core)
        for instance_id, node in owned.items():
            if instance_id not in candidates and self._delete(core, node):
                log.info("deleted Node %s (instance %s is gone)", node.name, instance_id)
        for instance_id, view in due.items():
            if instance_id in owned:
                continue
            if instance_id in kubelets:
                self._problems.warn(
                    f"kubelet {instance_id}", f"instance {instance_id} is Node {kubelets[instance_id]}: no Node made"
                )
                continue
            if (created := self._create(core, view)) is not None:
                owned[instance_id] = created
                kubelet = " (its kubelet never turns Ready)" if created.by_bridge else ""
                log.info("created Node %s for instance %s%s", created.name, instance_id, kubelet)
        for instance_id, node in owned.items():
            if node.by_bridge and instance_id in candidates:
                self._play_kubelet(core, node, candidates[instance_id])
        live = {n.name for i, n in owned.items() if i in candidates}
        self._renewed = {name: at for name, at in self._renewed.items() if name in live}
        with self._owned_lock:
            self._owned = {i: n.name for i, n in owned.items() if i in candidates}
        self._problems.resolved("tick")

    def _due(self, candidates: dict[str, InstanceView]) -> dict[str, InstanceView]:
        """The candidates seen for at least their boot delay (their ASG's, else the bridge's); an
        instance already Terminating gets no Node."""
        now = self.clock()
        for instance_id in list(self._first_seen):
            if instance_id not in candidates:
                del self._first_seen[instance_id]
        for instance_id in candidates:
            self._first_seen.setdefault(instance_id, now)
        return {
            i: v
            for i, v in candidates.items()
            if not v.leaving
            and now - self._first_seen[i] >= (v.boot_delay if v.boot_delay is not None else self.boot_delay)
        }

    def _client(self) -> Any:
        """The CoreV1Api, built from the kubeconfig on first use (and again after a failed tick),
        with the CoordinationV1Api for node Leases next to it."""
        if self._core is None:
            from kubernetes import client, config

            api_client = config.new_client_from_config(config_file=self.kubeconfig)
            version = client.VersionApi(api_client).get_code(_request_timeout=REQUEST_TIMEOUT_SECONDS)
            self._kubelet_version = version.git_version or DEFAULT_KUBELET_VERSION
            self._core = client.CoreV1Api(api_client)
            self._leases = client.CoordinationV1Api(api_client)
        return self._core

    def _list_nodes(self, core: Any) -> tuple[dict[str, OwnedNode], dict[str, str]]:
        """The Nodes the bridge owns, by instance id; and the other Nodes whose providerID names an
        instance (instance id -> Node name)."""
        owned, kubelets = {}, {}
        for node in core.list_node(_request_timeout=REQUEST_TIMEOUT_SECONDS).items:
            found = owned_node(node)
            if found is not None:
                owned[found[0]] = found[1]
            elif (instance_id := provider_instance(node)) is not None:
                kubelets[instance_id] = node.metadata.name
        return owned, kubelets

    def _create(self, core: Any, view: InstanceView) -> OwnedNode | None:
        from kubernetes.client.exceptions import ApiException

        name = node_name(view)
        by_bridge = self.not_ready_faults.is_armed(view.asg_name)
        now = datetime.now(timezone.utc)
        # The Lease first, so kwok never sees the Node without a holder (and never takes it).
        if by_bridge and not self._hold_lease(name, now):
            return None
        manifest = node_manifest(view, self._kubelet_version, not_ready_since=now if by_bridge else None)
        problem = None
        try:
            created = core.create_node(manifest, _request_timeout=REQUEST_TIMEOUT_SECONDS)
        except ApiException as exc:
            reason = "its name is taken by a Node the bridge does not own" if exc.status == 409 else exc.reason
            problem = f"cannot create Node {name}: {reason} ({exc.status})"
        except ValueError as exc:  # the client's own validation (pydantic) refused the manifest
            problem = f"cannot create Node {name}: {exc}"
        if problem is not None:
            self._problems.warn(f"create {view.instance_id}", problem)
            if by_bridge:
                self._release_lease(name)
            return None
        self._problems.resolved(f"create {view.instance_id}")
        if by_bridge:
            # As a kubelet does once it knows its Node: the Lease goes with the Node.
            self._renew_lease(name, owner_uid=getattr(created.metadata, "uid", None))
        return OwnedNode(name=name, by_bridge=by_bridge, ready=False)

    def _delete(self, core: Any, node: OwnedNode) -> bool:
        from kubernetes.client.exceptions import ApiException

        try:
            core.delete_node(node.name, _request_timeout=REQUEST_TIMEOUT_SECONDS)
        except ApiException as exc:
            if exc.status != 404:
                self._problems.warn(
                    f"delete {node.name}", f"cannot delete Node {node.name}: {exc.reason} ({exc.status})"
                )
                return False
        if node.by_bridge:
            self._release_lease(node.name)  # the garbage collector would, too (owner reference)
        return True

    # -- the kubelet of a Node that never turns Ready -------------------------------------------

    def _play_kubelet(self, core: Any, node: OwnedNode, view: InstanceView) -> None:
        """Renews the Node's Lease when due; posts Ready once its ASG's not-Ready fault is cleared."""
        last = self._renewed.get(node.name)
        if last is None or self.clock() - last >= NODE_LEASE_RENEW_SECONDS:
            self._renew_lease(node.name)
        if node.ready or self.not_ready_faults.is_armed(view.asg_name):
            return
        from kubernetes.client.exceptions import ApiException

        patch = {"status": {"conditions": [ready_condition(True, datetime.now(timezone.utc))]}}
        try:
            core.patch_node_status(
                node.name, patch, _content_type=STRATEGIC_MERGE_PATCH, _request_timeout=REQUEST_TIMEOUT_SECONDS
            )
        except ApiException as exc:
            self._problems.warn(f"ready {node.name}", f"cannot post Ready on Node {node.name}: {exc.reason}")
            return
        self._problems.resolved(f"ready {node.name}")
        node.ready = True
        log.info("Node %s turned Ready (the not-Ready fault on %s was cleared)", node.name, view.asg_name)

    def _hold_lease(self, name: str, now: datetime) -> bool:
        """Creates the kubelet's Lease for Node ``name``; False if someone else (kwok) holds it."""
        from kubernetes.client.exceptions import ApiException

        try:
            self._leases.create_namespaced_lease(
                NODE_LEASE_NAMESPACE, node_lease(name, now), _request_timeout=REQUEST_TIMEOUT_SECONDS
            )
        except ApiException as exc:
            if exc.status != 409:
                self._problems.warn(f"lease {name}", f"cannot create the Lease of Node {name}: {exc.reason}")
                return False
            existing = self._leases.read_namespaced_lease(
                name, NODE_LEASE_NAMESPACE, _request_timeout=REQUEST_TIMEOUT_SECONDS
            )
            holder = existing.spec.holder_identity if existing.spec is not None else None
            if holder != name:  # a Lease the bridge did not make: another kubelet (kwok) has this name
                self._problems.warn(f"lease {name}", f"the Lease of Node {name} is held by {holder}")
                return False
        self._problems.resolved(f"lease {name}")
        self._renewed[name] = self.clock()
        return True

    def _renew_lease(self, name: str, owner_uid: str | None = None) -> None:
        from kubernetes.client.exceptions import ApiException

        patch: dict[str, Any] = {
            "spec": {"holderIdentity": name, "renewTime": api_micro_time(datetime.now(timezone.utc))}
        }
        if owner_uid:
            patch["metadata"] = {
                "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": name, "uid": owner_uid}]
            }
        try:
            self._leases.patch_namespaced_lease(
                name, NODE_LEASE_NAMESPACE, patch, _content_type=MERGE_PATCH, _request_timeout=REQUEST_TIMEOUT_SECONDS
            )
        except ApiException as exc:
            if exc.status == 404:  # someone deleted it: take it again
                self._hold_lease(name, datetime.now(timezone.utc))
                return
            self._problems.warn(f"renew {name}", f"cannot renew the Lease of Node {name}: {exc.reason}")
            return
        self._problems.resolved(f"renew {name}")
        self._renewed[name] = self.clock()

    def _release_lease(self, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        self._renewed.pop(name, None)
        try:
            self._leases.delete_namespaced_lease(name, NODE_LEASE_NAMESPACE, _request_timeout=REQUEST_TIMEOUT_SECONDS)
        except ApiException as exc:
            if exc.status != 404:
                self._problems.warn(f"release {name}", f"cannot delete the Lease of Node {name}: {exc.reason}")
