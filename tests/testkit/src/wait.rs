//! Polling with deadlines (a condition, a service's readiness), and free ports.

use std::future::Future;
use std::net::TcpListener;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::time::Instant;

const POLL: Duration = Duration::from_millis(50);

/// Polls `f` every 50 ms until it yields `true`, failing after `timeout` with a message naming
/// `what` (for example `"the consumer has 10 pending acks"`). A single call of `f` that runs past
/// the deadline is cut short and counts as a timeout.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, f()).await {
            Ok(true) => return Ok(()),
            Ok(false) if Instant::now() < deadline => tokio::time::sleep(POLL).await,
            _ => bail!("timed out after {timeout:?} waiting until {what}"),
        }
    }
}

/// Waits until the admin server at `admin` (`host:port`) answers `/readyz` with a success,
/// failing after `timeout` with a message naming `what` (e.g. `"ingest is ready"`) and what
/// `/readyz` still answers.
///
/// # Errors
///
/// When it is not ready in time.
pub async fn wait_ready(
    what: &str,
    admin: impl std::fmt::Display,
    timeout: Duration,
) -> anyhow::Result<()> {
    let url = format!("http://{admin}/readyz");
    let client = reqwest::Client::new();
    let waited = wait_until(what, timeout, || async {
        client
            .get(&url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    if let Err(e) = waited {
        // What the service still waits for, from its own answer.
        let answer = match client.get(&url).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(e) => e.to_string(),
        };
        bail!("{e}: {url} answers {answer}");
    }
    Ok(())
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released).
///
/// Another process can take it before it is used; prefer letting a server pick its own port
/// (port 0, or `-p -1` for nats-server) where it can report it.
///
/// # Panics
///
/// If no port can be bound on 127.0.0.1.
pub fn free_port() -> u16 {
    match free_ports(1) {
        Ok(ports) => ports[0],
        Err(err) => panic!("{err:#}"),
    }
}

/// `n` distinct free ports: all are held at once before being released (two calls of
/// [`free_port`] can return the same port). The same caveat as [`free_port`] applies.
///
/// # Errors
///
/// If a port cannot be bound on 127.0.0.1.
pub fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind(("127.0.0.1", 0)).context("binding 127.0.0.1:0"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr().context("reading a bound port")?.port()))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::{free_ports, wait_until};

    #[tokio::test]
    async fn wait_until_returns_once_true() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        wait_until("the third poll", Duration::from_secs(5), move || {
            let counter = counter.clone();
            async move { counter.fetch_add(1, Ordering::SeqCst) >= 2 }
        })
        .await
        .expect("condition becomes true");
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn wait_until_times_out_naming_what() {
        let err = wait_until("pigs fly", Duration::from_millis(120), || async { false })
            .await
            .expect_err("never true");
        assert!(err.to_string().contains("pigs fly"), "{err}");
    }

    #[tokio::test]
    async fn wait_until_cuts_a_hanging_poll_short() {
        let err = wait_until("a hanging poll", Duration::from_millis(100), || {
            std::future::pending::<bool>()
        })
        .await
        .expect_err("never answers");
        assert!(err.to_string().contains("a hanging poll"), "{err}");
    }

    #[test]
    fn free_ports_are_distinct() {
        let mut ports = free_ports(6).expect("ports");
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 6);
        assert!(ports.iter().all(|&p| p != 0));
    }
}
