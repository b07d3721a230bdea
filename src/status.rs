//! `spot-rebalancer status`: what an operator types first when something looks wrong. A table of the
//! opted-in nodes with a notice (all of them with `--all`): instance, node group, phase, claimed
//! replacement, taint, age since the notice, readiness and, for Failed/Skipped, the reason. `-o json`
//! for scripts; `--watch` prints each node's steps as they happen, timed from its notice.
//!
//! Read from the Nodes (the agent's notices, taints, readiness) and the controller's
//! `SpotReplacement` records in its namespace (phase, replacement, every step's time); the rows
//! ([`row`]), the table ([`table`]) and the watch's steps ([`timeline`]) are pure functions.
pub mod row;
pub mod table;
pub mod timeline;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    path::PathBuf,
    time::Duration,
};

use clap::{Args as ClapArgs, ValueEnum};
use futures::{StreamExt, stream};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api, Client, ResourceExt,
    api::ListParams,
    runtime::{WatchStreamExt, watcher},
};
use tokio_util::sync::CancellationToken;

use crate::{
    contract::{self, SpotReplacement, keys, record::Phase},
    node::OptInLabel,
};
use row::{Agent, Keys, Row};
use timeline::Watch;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const READ_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    KubeConfig(#[from] crate::kube_config::Error),
    #[error("connecting to the Kubernetes API: {0}")]
    Client(#[source] kube::Error),
    #[error("listing the Nodes labelled {selector}: {source}")]
    List {
        selector: String,
        #[source]
        source: kube::Error,
    },
    #[error("listing the SpotReplacement records in namespace {namespace}: {source}")]
    ListRecords {
        namespace: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing the output: {0}")]
    Output(#[source] std::io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Clone, ClapArgs)]
pub struct Args {
    /// Kubeconfig file; without it, the in-cluster service account (or `~/.kube/config`).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Nodes carrying this `KEY=VALUE` label are shown (the controller's `--opt-in-label`).
    #[arg(long, env = "OPT_IN_LABEL", default_value = "spot-rebalancer.io/enabled=true")]
    pub opt_in_label: OptInLabel,

    /// Namespace of the controller's `SpotReplacement` records (the controller's own).
    #[arg(
        short = 'n',
        long,
        env = "SPOT_REBALANCER_NAMESPACE",
        default_value = "spot-rebalancer"
    )]
    pub namespace: String,

    /// Label naming a node's node group.
    #[arg(long, env = "NODEGROUP_LABEL", default_value = keys::DEFAULT_NODEGROUP_LABEL,
          value_parser = crate::node::label_key)]
    pub nodegroup_label: String,

    /// Key of the termination taint (the controller's `--taint-key`).
    #[arg(long, env = "TAINT_KEY", default_value = keys::DEFAULT_TAINT_KEY)]
    pub taint_key: String,

    /// Label selector of the agent's pods (in any namespace): the AGENT column says whether each
    /// node has a Ready one.
    #[arg(
        long,
        env = "AGENT_SELECTOR",
        default_value = "app.kubernetes.io/name=spot-rebalancer,app.kubernetes.io/component=agent"
    )]
    pub agent_selector: String,

    /// Only these Nodes (repeat the flag for more).
    #[arg(long = "node", env = "STATUS_NODES", value_delimiter = ',')]
    pub nodes: Vec<String>,

    /// Output format: a table, or JSON (with `--watch`: one JSON object per line).
    #[arg(short, long, env = "STATUS_OUTPUT", value_enum, default_value_t = Output::Table)]
    pub output: Output,

    /// Also show opted-in nodes without any notice.
    #[arg(long, env = "STATUS_ALL")]
    pub all: bool,

    /// Keep watching; print one line per step of each noticed node (notice, scale-up, replacement
    /// claimed, Ready, taint, ...), timed from its notice.
    #[arg(short, long, env = "STATUS_WATCH")]
    pub watch: bool,

    /// With `--watch`: stop once every noticed node is in one of these phases (comma-separated,
    /// e.g. `Tainted,Failed,Skipped`).
    #[arg(long, env = "STATUS_UNTIL", requires = "watch", value_delimiter = ',')]
    pub until: Vec<Phase>,
}

/// Prints the table (or JSON) once, or watches until `shutdown` (or `--until`).
pub async fn run(args: Args, shutdown: CancellationToken) -> crate::Result<()> {
    let mut config = crate::kube_config::load(args.kubeconfig.as_deref())
        .await
        .map_err(Error::from)?;
    // An operator's command answers or says why, soon; a watch keeps kube's long read timeout.
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    if !args.watch {
        config.read_timeout = Some(READ_TIMEOUT);
    }
    let client = Client::try_from(config).map_err(Error::Client)?;
    let nodes: Api<Node> = Api::all(client.clone());
    let records: Api<SpotReplacement> = Api::namespaced(client.clone(), &args.namespace);
    if args.watch {
        watch(&args, nodes, records, shutdown).await?;
    } else {
        print_once(&args, nodes, records, Api::all(client)).await?;
    }
    Ok(())
}

impl Args {
    fn keys(&self) -> Keys {
        Keys {
            nodegroup_label: self.nodegroup_label.clone(),
            taint_key: self.taint_key.clone(),
        }
    }

    fn wants(&self, name: &str) -> bool {
        self.nodes.is_empty() || self.nodes.iter().any(|wanted| wanted == name)
    }
}

/// The row of `node`, with its record among `records`.
pub fn row_of<'a>(node: &Node, records: impl IntoIterator<Item = &'a SpotReplacement>, keys: &Keys) -> Row {
    let record = contract::record_of(records, &node.name_any(), node.metadata.uid.as_deref());
    Row::from_node(node, record, keys)
}

/// The rows to show of `nodes` (with their records among `records`), sorted by node name.
pub fn rows(
    nodes: &[Node],
    records: &[SpotReplacement],
    keys: &Keys,
    all: bool,
    wanted: impl Fn(&str) -> bool,
) -> Vec<Row> {
    let mut rows: Vec<Row> = nodes
        .iter()
        .filter(|node| wanted(&node.name_any()))
        .map(|node| row_of(node, records, keys))
        .filter(|row| all || row.is_active())
        .collect();
    rows.sort_by(|a, b| a.node.cmp(&b.node));
    rows
}

/// Each node's agent, from the agent pods: Ready wins over not Ready when a node has two (a rollout).
pub fn agents_by_node(pods: &[Pod]) -> BTreeMap<String, Agent> {
    let mut agents = BTreeMap::new();
    for pod in pods {
        let Some(node) = pod.spec.as_ref().and_then(|spec| spec.node_name.clone()) else {
            continue;
        };
        let ready = pod
            .status
            .as_ref()
            .and_then(|status| status.conditions.as_ref())
            .is_some_and(|conditions| {
                conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            });
        let agent = if ready { Agent::Ready } else { Agent::NotReady };
        let entry = agents.entry(node).or_insert(agent);
        if agent == Agent::Ready {
            *entry = Agent::Ready;
        }
    }
    agents
}

/// Fills each row's AGENT cell: a node with no agent pod is `Missing`.
pub fn with_agents(rows: &mut [Row], agents: &BTreeMap<String, Agent>) {
    for row in rows {
        row.agent = agents.get(&row.node).copied().unwrap_or(Agent::Missing);
    }
}

async fn print_once(
    args: &Args,
    nodes: Api<Node>,
    records: Api<SpotReplacement>,
    pods: Api<Pod>,
) -> Result<(), Error> {
    let selector = args.opt_in_label.selector();
    let list = nodes
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|source| Error::List {
            selector: selector.clone(),
            source,
        })?;
    let records = records
        .list(&ListParams::default())
        .await
        .map_err(|source| Error::ListRecords {
            namespace: args.namespace.clone(),
            source,
        })?;
    let mut rows = rows(&list.items, &records.items, &args.keys(), args.all, |name| {
        args.wants(name)
    });
    // One list of the agent pods (one per opted-in node), in every namespace; without the right to
    // list pods, the column says `?` and the rest of the table is still shown.
    match pods
        .list(&ListParams::default().labels(&args.agent_selector))
        .await
    {
        Ok(list) => with_agents(&mut rows, &agents_by_node(&list.items)),
        Err(error) => eprintln!("(AGENT unknown: listing the agent pods failed: {error})"),
    }
    let now = Timestamp::now();
    let text = match args.output {
        Output::Table => table::render_table(&rows, now),
        Output::Json => table::render_json(&rows, now),
    };
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes()).map_err(Error::Output)?;
    if args.output == Output::Table && rows.is_empty() && !args.all {
        eprintln!("(no opted-in node labelled {selector} has a notice; --all shows them all)");
    }
    Ok(())
}

/// What the watch sees: a Node or a record changed.
// One event at a time, moved once from the stream: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
enum Seen {
    Node(watcher::Event<Node>),
    Record(watcher::Event<SpotReplacement>),
}

async fn watch(
    args: &Args,
    nodes: Api<Node>,
    records: Api<SpotReplacement>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let selector = args.opt_in_label.selector();
    let keys = args.keys();
    eprintln!(
        "watching the Nodes labelled {selector} and the SpotReplacements in namespace {} (Ctrl-C to stop)",
        args.namespace
    );
    let node_events = watcher(nodes, watcher::Config::default().labels(&selector))
        .backoff(crate::kube_config::watch_backoff())
        .map(|event| event.map(Seen::Node));
    let record_events = watcher(records, watcher::Config::default())
        .backoff(crate::kube_config::watch_backoff())
        .map(|event| event.map(Seen::Record));
    let mut events = stream::select(node_events.boxed(), record_events.boxed());
    let mut watch = Watch::default();
    // The Nodes shown (the last state of a deleted one stays, for a record written after it went).
    let mut shown: BTreeMap<String, Node> = BTreeMap::new();
    let mut records: BTreeMap<String, SpotReplacement> = BTreeMap::new();
    let mut current: BTreeMap<String, Row> = BTreeMap::new();
    // Names listed since a watch (re)started its list; whatever else is current was deleted meanwhile.
    let mut listed_nodes: Option<BTreeSet<String>> = None;
    let mut listed_records: Option<BTreeSet<String>> = None;
    let (mut nodes_synced, mut records_synced) = (false, false);
    // A noticed node was deleted while watched (retired: its instance left the ASG).
    let mut noticed_gone = false;
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            event = events.next() => event,
        };
        let Some(event) = event else { return Ok(()) };
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                tracing::warn!(%error, "watching the Nodes or the SpotReplacements failed; retrying");
                continue;
            }
        };
        let now = Timestamp::now();
        let mut lines = Vec::new();
        // The Nodes whose row may have changed.
        let mut changed: Vec<String> = Vec::new();
        match event {
            Seen::Node(watcher::Event::Init) => listed_nodes = Some(BTreeSet::new()),
            Seen::Node(watcher::Event::InitDone) => {
                nodes_synced = true;
                let listed = listed_nodes.take().unwrap_or_default();
                let gone: Vec<String> = current
                    .keys()
                    .filter(|name| !listed.contains(*name))
                    .cloned()
                    .collect();
                for name in gone {
                    if current.remove(&name).is_some_and(|row| row.is_active()) {
                        noticed_gone = true;
                    }
                    lines.extend(watch.deleted(&name, now));
                }
            }
            Seen::Node(watcher::Event::InitApply(node) | watcher::Event::Apply(node)) => {
                let name = node.name_any();
                if let Some(listed) = listed_nodes.as_mut() {
                    listed.insert(name.clone());
                }
                if args.wants(&name) {
                    shown.insert(name.clone(), node);
                    let row = row_of(&shown[&name], records.values(), &keys);
                    lines = watch.update(&row, now);
                    current.insert(name, row);
                }
            }
            Seen::Node(watcher::Event::Delete(node)) => {
                let name = node.name_any();
                // Its last state may hold steps not seen yet (the retirement written just before).
                if args.wants(&name) {
                    lines = watch.update(&row_of(&node, records.values(), &keys), now);
                    shown.insert(name.clone(), node);
                }
                if current.remove(&name).is_some_and(|row| row.is_active()) {
                    noticed_gone = true;
                }
                lines.extend(watch.deleted(&name, now));
            }
            Seen::Record(watcher::Event::Init) => listed_records = Some(BTreeSet::new()),
            Seen::Record(watcher::Event::InitDone) => {
                records_synced = true;
                let listed = listed_records.take().unwrap_or_default();
                let gone: Vec<String> = records
                    .keys()
                    .filter(|name| !listed.contains(*name))
                    .cloned()
                    .collect();
                for name in gone {
                    changed.extend(records.remove(&name).map(|record| record.spec.node_name));
                }
            }
            Seen::Record(watcher::Event::InitApply(record) | watcher::Event::Apply(record)) => {
                let name = record.name_any();
                if let Some(listed) = listed_records.as_mut() {
                    listed.insert(name.clone());
                }
                changed.push(record.spec.node_name.clone());
                records.insert(name, record);
            }
            Seen::Record(watcher::Event::Delete(record)) => {
                records.remove(&record.name_any());
                changed.push(record.spec.node_name);
            }
        }
        for name in changed {
            let Some(node) = shown.get(&name) else { continue };
            let row = row_of(node, records.values(), &keys);
            lines.extend(watch.update(&row, now));
            if let Some(current) = current.get_mut(&name) {
                *current = row;
            }
        }
        let mut stdout = std::io::stdout().lock();
        for line in &lines {
            let text = match args.output {
                Output::Table => line.to_text(),
                // A line of plain strings and numbers always serializes.
                Output::Json => serde_json::to_string(line).unwrap_or_default(),
            };
            writeln!(stdout, "{text}").map_err(Error::Output)?;
        }
        stdout.flush().map_err(Error::Output)?;
        if nodes_synced
            && records_synced
            && !args.until.is_empty()
            && timeline::settled(current.values(), &args.until, noticed_gone)
        {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::row::tests::{node, record};
    use serde_json::json;

    #[test]
    fn rows_are_the_noticed_nodes_by_name_unless_all_are_asked_for() {
        let records = [record("c-failed", "Failed", json!({}))];
        let nodes = [
            node("b-quiet", json!({}), None, true),
            node("c-failed", json!({}), None, true),
            node(
                "a-noticed",
                json!({keys::REBALANCE_NOTICE_TIME: "2026-11-25T10:00:00Z"}),
                None,
                true,
            ),
        ];
        let names = |rows: Vec<Row>| rows.into_iter().map(|row| row.node).collect::<Vec<_>>();
        let keys = Keys::default();
        assert_eq!(
            names(rows(&nodes, &records, &keys, false, |_| true)),
            ["a-noticed", "c-failed"]
        );
        assert_eq!(
            names(rows(&nodes, &records, &keys, true, |_| true)),
            ["a-noticed", "b-quiet", "c-failed"]
        );
        assert_eq!(
            names(rows(&nodes, &records, &keys, true, |name| name == "b-quiet")),
            ["b-quiet"]
        );
    }

    fn agent_pod(node: &str, ready: bool) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": format!("agent-{node}-{ready}")},
            "spec": {"nodeName": node, "containers": []},
            "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
        }))
        .unwrap()
    }

    #[test]
    fn a_node_without_an_agent_pod_shows_none_and_a_rollout_counts_as_ready() {
        let nodes = [
            node("with-agent", json!({}), None, true),
            node("rolling", json!({}), None, true),
            node("stuck", json!({}), None, true),
            node("bare", json!({}), None, true),
        ];
        let pods = [
            agent_pod("with-agent", true),
            agent_pod("rolling", false),
            agent_pod("rolling", true),
            agent_pod("stuck", false),
        ];
        let mut rows = rows(&nodes, &[], &Keys::default(), true, |_| true);
        with_agents(&mut rows, &agents_by_node(&pods));
        let agents: Vec<(&str, Agent)> = rows.iter().map(|row| (row.node.as_str(), row.agent)).collect();
        assert_eq!(
            agents,
            [
                ("bare", Agent::Missing),
                ("rolling", Agent::Ready),
                ("stuck", Agent::NotReady),
                ("with-agent", Agent::Ready),
            ]
        );
    }
}
