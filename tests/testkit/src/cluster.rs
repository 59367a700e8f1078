//! A JetStream cluster of real `nats-server` processes on loopback.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use herald_common::natsbin::{Launch, LaunchError, NatsProcess};
use serde_json::Value;
use tempfile::TempDir;
use tokio::time::Instant;

use crate::binary::nats_server_binary;
use crate::server::START_DEADLINE;
use crate::wait::free_ports;

/// How long a cluster may take to elect a JetStream meta leader with every running node current.
const READY_DEADLINE: Duration = Duration::from_secs(30);

/// Whole-cluster start attempts: a port picked free can be taken by another process before the
/// node binds it, and then the cluster is started again on new ports.
const START_ATTEMPTS: usize = 3;

const CLUSTER_NAME: &str = "herald-test";

struct Node {
    name: String,
    port: u16,
    cluster_port: u16,
    monitor_port: u16,
    config: PathBuf,
    store: PathBuf,
    ports_dir: PathBuf,
    log: PathBuf,
    process: Option<NatsProcess>,
}

/// An n-node JetStream cluster on 127.0.0.1: each node has its own `server_name` (`n0`, `n1`,
/// ...), client, cluster-route and monitoring ports, configuration file and store directory.
/// Each node is started through `herald_common::natsbin::Launch` (the one nats-server launcher):
/// its configuration file holds its name and cluster block, the launcher's flags its ports and
/// store.
///
/// [`NatsCluster::start`] returns once a meta leader is elected and every node is current, so a
/// stream with as many replicas as nodes can be created straight away. All nodes are killed on
/// drop.
pub struct NatsCluster {
    binary: PathBuf,
    dir: TempDir,
    nodes: Vec<Node>,
    http: reqwest::Client,
}

impl NatsCluster {
    /// Starts an `n`-node cluster (`n >= 2`) and waits (up to 30 s) until it is ready (see
    /// [`NatsCluster::wait_ready`]).
    pub async fn start(n: usize) -> anyhow::Result<Self> {
        ensure!(n >= 2, "a cluster needs at least 2 nodes, asked for {n}");
        let binary = nats_server_binary()?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .context("building an HTTP client for the monitoring endpoints")?;
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            let mut cluster = Self::configure(binary.clone(), http.clone(), n)?;
            match cluster.launch().await {
                Ok(()) => return Ok(cluster),
                Err(err) => {
                    // A node that exited during start-up most likely lost a port race: try again
                    // on new ports. Anything else is a real failure. Dropping the attempt kills
                    // its nodes.
                    let node_exited = err.chain().any(|e| {
                        matches!(
                            e.downcast_ref::<LaunchError>(),
                            Some(LaunchError::Exited { .. })
                        )
                    });
                    if !node_exited {
                        return Err(err.context(format!("starting a {n}-node nats-server cluster")));
                    }
                    last_error = Some(err);
                }
            }
        }
        Err(last_error
            .unwrap_or_else(|| anyhow::anyhow!("no attempt made"))
            .context(format!("starting a {n}-node nats-server cluster")))
    }

    fn configure(binary: PathBuf, http: reqwest::Client, n: usize) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("herald-nats-cluster-")
            .tempdir()
            .context("creating a temporary directory for the cluster")?;
        let ports = free_ports(3 * n)?;
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            nodes.push(Node {
                name: format!("n{i}"),
                port: ports[3 * i],
                cluster_port: ports[3 * i + 1],
                monitor_port: ports[3 * i + 2],
                config: dir.path().join(format!("n{i}.conf")),
                store: dir.path().join(format!("n{i}-store")),
                ports_dir: dir.path().join(format!("n{i}-ports")),
                log: dir.path().join(format!("n{i}.log")),
                process: None,
            });
        }
        let routes: Vec<String> = nodes
            .iter()
            .map(|node| quote(&format!("nats-route://127.0.0.1:{}", node.cluster_port)))
            .collect();
        for node in &nodes {
            // Listen address, client and monitoring ports and the store come from the launcher's
            // flags.
            let config = format!(
                "server_name: {name}\n\
                 cluster {{\n  name: {cluster}\n  listen: {cluster_listen}\n  routes: [\n    {routes}\n  ]\n}}\n",
                name = quote(&node.name),
                cluster = quote(CLUSTER_NAME),
                cluster_listen = quote(&format!("127.0.0.1:{}", node.cluster_port)),
                routes = routes.join("\n    "),
            );
            std::fs::write(&node.config, config)
                .with_context(|| format!("writing {}", node.config.display()))?;
        }
        Ok(Self {
            binary,
            dir,
            nodes,
            http,
        })
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            self.start_node(i).await?;
        }
        self.wait_ready(READY_DEADLINE).await
    }

    /// Starts node `i` and waits (up to 10 s) for its ports file: it accepts connections then.
    async fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[i];
        let process = Launch::new(&self.binary, &node.store, &node.ports_dir, &node.log)
            .client_port(node.port)
            .monitor_port(node.monitor_port)
            .config_file(&node.config)
            .start_timeout(START_DEADLINE)
            .start()
            .await
            .with_context(|| format!("node {}", node.name))?;
        node.process = Some(process);
        Ok(())
    }

    /// The number of nodes, running or not.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no nodes (never true for a started cluster).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The client URLs of all nodes, in node order.
    pub fn urls(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.url(i)).collect()
    }

    /// The client URLs of all nodes, comma-separated (the form a server list takes in config).
    pub fn servers(&self) -> String {
        self.urls().join(",")
    }

    /// The client URL of node `i`.
    ///
    /// # Panics
    ///
    /// If `i` is out of range.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].port)
    }

    /// The HTTP monitoring base URL of node `i` (`/varz`, `/jsz`, ...).
    ///
    /// # Panics
    ///
    /// If `i` is out of range.
    pub fn monitor_url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i].monitor_port)
    }

    /// The `server_name` of node `i` (`n0`, `n1`, ...), as it appears in cluster and stream info.
    ///
    /// # Panics
    ///
    /// If `i` is out of range.
    pub fn node_name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The file node `i`'s output is appended to.
    ///
    /// # Panics
    ///
    /// If `i` is out of range.
    pub fn log_path(&self, i: usize) -> &Path {
        &self.nodes[i].log
    }

    /// Whether node `i`'s process is running.
    ///
    /// # Panics
    ///
    /// If `i` is out of range.
    pub fn is_running(&mut self, i: usize) -> bool {
        self.nodes[i]
            .process
            .as_mut()
            .is_some_and(NatsProcess::is_running)
    }

    /// Connects a client that knows every node's URL and fails over between them.
    ///
    /// # Panics
    ///
    /// If no node accepts the connection.
    pub async fn client(&self) -> async_nats::Client {
        let urls = self.urls();
        match async_nats::connect(urls.as_slice()).await {
            Ok(client) => client,
            Err(err) => panic!(
                "connecting to the nats cluster at {}: {err}",
                urls.join(",")
            ),
        }
    }

    /// Connects a client to node `i` only.
    ///
    /// # Panics
    ///
    /// If `i` is out of range or the node does not accept the connection.
    pub async fn node_client(&self, i: usize) -> async_nats::Client {
        let url = self.url(i);
        match async_nats::connect(&url).await {
            Ok(client) => client,
            Err(err) => panic!("connecting to nats cluster node {i} at {url}: {err}"),
        }
    }

    /// Kills node `i` (SIGKILL, like a crash) and waits for it to exit. Its store is kept. This
    /// does not wait for the remaining nodes to elect a new leader; call
    /// [`NatsCluster::wait_ready`] for that (after a meta leader dies, the election takes the
    /// Raft election timeout, several seconds).
    ///
    /// # Panics
    ///
    /// If `i` is out of range.
    pub async fn stop_node(&mut self, i: usize) {
        if let Some(process) = self.nodes[i].process.take() {
            process.kill().await;
        }
    }

    /// Starts node `i` again with the same configuration (ports, name, store; it is stopped first
    /// if running) and waits until it accepts connections and the cluster is ready again.
    ///
    /// # Panics
    ///
    /// If `i` is out of range.
    pub async fn restart_node(&mut self, i: usize) -> anyhow::Result<()> {
        self.stop_node(i).await;
        self.start_node(i).await.context("restarting")?;
        self.wait_ready(READY_DEADLINE).await
    }

    /// The index of the node that currently is the JetStream meta leader, by its own account.
    /// `None` while no running node claims leadership (during an election).
    pub async fn meta_leader(&self) -> Option<usize> {
        for (i, node) in self.nodes.iter().enumerate() {
            if node.process.is_none() {
                continue;
            }
            if let Some(meta) = self.meta_cluster(i).await
                && meta.get("leader").and_then(Value::as_str) == Some(node.name.as_str())
            {
                return Some(i);
            }
        }
        None
    }

    /// Waits until the running nodes have a JetStream meta leader that is itself running, every
    /// running node reports that leader, the leader sees every other running node as current, and
    /// the JetStream API answers a client. Fails early if a node process exits, and after
    /// `timeout` with the state last seen.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            for node in &mut self.nodes {
                if let Some(process) = node.process.as_mut() {
                    process
                        .check_running()
                        .with_context(|| format!("node {}", node.name))?;
                }
            }
            let state = match tokio::time::timeout_at(deadline, self.readiness()).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(state)) => state,
                Err(_) => "the last readiness check ran past the deadline".to_owned(),
            };
            if Instant::now() >= deadline {
                bail!("nats cluster not ready within {timeout:?}: {state}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `Ok` when ready, else a description of what is missing.
    async fn readiness(&self) -> Result<(), String> {
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].process.is_some())
            .collect();
        if running.is_empty() {
            return Err("no node is running".to_owned());
        }
        let mut leader: Option<String> = None;
        let mut leader_meta = None;
        for &i in &running {
            let name = &self.nodes[i].name;
            let meta = self
                .meta_cluster(i)
                .await
                .ok_or_else(|| format!("{name} reports no JetStream meta cluster"))?;
            let seen = meta
                .get("leader")
                .and_then(Value::as_str)
                .filter(|l| !l.is_empty())
                .ok_or_else(|| format!("{name} knows no meta leader"))?;
            match &leader {
                None => leader = Some(seen.to_owned()),
                Some(l) if l != seen => {
                    return Err(format!("nodes disagree on the meta leader ({l} vs {seen})"));
                }
                Some(_) => {}
            }
            if seen == name {
                leader_meta = Some(meta);
            }
        }
        let leader = leader.unwrap_or_default();
        let meta =
            leader_meta.ok_or_else(|| format!("meta leader {leader} is not a running node"))?;
        let replicas = meta
            .get("replicas")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for &i in &running {
            let name = &self.nodes[i].name;
            if *name == leader {
                continue;
            }
            let current = replicas.iter().any(|r| {
                r.get("name").and_then(Value::as_str) == Some(name.as_str())
                    && r.get("current").and_then(Value::as_bool) == Some(true)
            });
            if !current {
                return Err(format!("leader {leader} does not see {name} as current"));
            }
        }
        let leader_index = running
            .iter()
            .copied()
            .find(|&i| self.nodes[i].name == leader)
            .unwrap_or(running[0]);
        self.check_api(leader_index).await
    }

    async fn check_api(&self, i: usize) -> Result<(), String> {
        let client = async_nats::connect(self.url(i))
            .await
            .map_err(|err| format!("cannot connect to {}: {err}", self.nodes[i].name))?;
        let js = async_nats::jetstream::new(client);
        match tokio::time::timeout(Duration::from_secs(2), js.query_account()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) => Err(format!("JetStream account info failed: {err}")),
            Err(_) => Err("JetStream account info timed out".to_owned()),
        }
    }

    /// `meta_cluster` from node `i`'s `/jsz`, if it answers and has one.
    async fn meta_cluster(&self, i: usize) -> Option<Value> {
        let url = format!("{}/jsz", self.monitor_url(i));
        let response = self.http.get(url).send().await.ok()?;
        let jsz: Value = response.json().await.ok()?;
        jsz.get("meta_cluster").cloned()
    }
}

impl std::fmt::Debug for NatsCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsCluster")
            .field("urls", &self.urls())
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

/// A double-quoted string for a nats-server configuration file.
fn quote(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}
