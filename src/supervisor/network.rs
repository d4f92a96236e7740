//! The session's network gateway, run by the supervisor for as long as its QEMU: the
//! policy read from vibebox.toml at this boot, DNS resolved on the host, and the
//! local SSH port relayed to the guest. A guest that edits vibebox.toml changes
//! nothing until the next boot (and then only with the host user's approval).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::net::decide::Policy;
use crate::net::dhcp::Lan;
use crate::net::gateway::{self, Inbound, Settings};
use crate::net::netlog::NetLog;
use crate::net::ranges::HostAddrs;
use crate::net::upstream;
use crate::paths::SessionDir;
use crate::vm::launch::NetEnds;

/// How long QEMU may take to connect its NIC after it starts.
const LINK_TIMEOUT: Duration = Duration::from_secs(60);

/// Host connections for published guest ports waiting for the gateway: few, it
/// takes them as fast as they come.
const INBOUND_QUEUE: usize = 64;

/// The running gateway; stopped when dropped (QEMU closing the link ends it too).
pub struct Gateway {
    task: JoinHandle<()>,
    /// Where host connections to published guest ports go (see `ports`).
    pub inbound: mpsc::Sender<Inbound>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn start(
    net: NetEnds,
    config: &Config,
    sd: &SessionDir,
    id: &str,
    resolver: Box<dyn upstream::Resolver>,
) -> Result<Gateway, String> {
    let limits = super::limits::for_gateway();
    let resolver: Arc<dyn upstream::Resolver> = resolver.into();
    let dialer: Arc<dyn upstream::Dialer> = Arc::new(upstream::Direct);
    let settings = Settings {
        lan: Lan::default(),
        policy: Policy::new(config.network.mode, &config.network.entries),
        log: NetLog::new(&sd.logs().join("network.log"), id),
        ssh_port: 22,
        host: HostAddrs::system(),
        host_ports: config.ports.host.clone(),
        limits,
    };
    let err = |e: std::io::Error| format!("cannot serve the VM's network: {e}");
    net.link.set_nonblocking(true).map_err(err)?;
    net.ssh.set_nonblocking(true).map_err(err)?;
    let link = tokio::net::UnixListener::from_std(net.link).map_err(err)?;
    let ssh = tokio::net::TcpListener::from_std(net.ssh).map_err(err)?;
    let (inbound, inbound_rx) = mpsc::channel(INBOUND_QUEUE);
    let task = tokio::spawn(async move {
        let stream = match tokio::time::timeout(LINK_TIMEOUT, link.accept()).await {
            Ok(Ok((s, _))) => s,
            Ok(Err(e)) => {
                tracing::error!("network: QEMU did not connect its NIC: {e}");
                return;
            }
            Err(_) => {
                tracing::error!("network: QEMU did not connect its NIC within {LINK_TIMEOUT:?}");
                return;
            }
        };
        drop(link);
        match gateway::serve(
            stream,
            settings,
            resolver,
            dialer,
            Some(ssh),
            Some(inbound_rx),
        )
        .await
        {
            Ok(()) => tracing::info!("network: QEMU closed the link"),
            Err(e) => tracing::error!("network: the link failed: {e}"),
        }
    });
    Ok(Gateway { task, inbound })
}
