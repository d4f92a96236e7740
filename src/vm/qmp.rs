//! The QMP client: QEMU's control socket, through the `qapi` crate. The supervisor
//! uses it to learn the VM's state, to ask the guest to power off, and to quit QEMU;
//! events (SHUTDOWN, STOP, ...) arrive on a channel.

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use qapi::futures::{QapiService, QmpStreamTokio};
use qapi::qmp;
use tokio::io::WriteHalf;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

type Service = QapiService<QmpStreamTokio<WriteHalf<UnixStream>>>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to QEMU's control socket {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("QEMU did not answer in time")]
    Timeout,
    #[error("QEMU refused a command: {0}")]
    Command(String),
}

pub struct Qmp {
    service: Service,
    /// Names of QMP events as they arrive (`SHUTDOWN`, `POWERDOWN`, ...).
    pub events: mpsc::UnboundedReceiver<String>,
    /// Holds the socket's read half: aborted on drop, so the socket closes and QEMU
    /// (which serves one QMP client at a time) takes the next connection.
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

const TIMEOUT: Duration = Duration::from_secs(10);

impl Qmp {
    /// Connects and negotiates capabilities. `path` may be relative to the working
    /// directory, which keeps it short whatever the absolute path's length.
    pub async fn connect(path: &Path) -> Result<Qmp, Error> {
        let cerr = |source| Error::Connect {
            path: path.display().to_string(),
            source,
        };
        let negotiation = tokio::time::timeout(TIMEOUT, QmpStreamTokio::open_uds(path))
            .await
            .map_err(|_| Error::Timeout)?
            .map_err(cerr)?;
        let stream = tokio::time::timeout(TIMEOUT, negotiation.negotiate())
            .await
            .map_err(|_| Error::Timeout)?
            .map_err(cerr)?;
        let (service, mut events) = stream.into_parts();
        let (tx, rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            while let Some(ev) = events.next().await {
                let Ok(ev) = ev else { break };
                let name = serde_json::to_value(&ev)
                    .ok()
                    .and_then(|v| v.get("event").and_then(|e| e.as_str()).map(String::from))
                    .unwrap_or_else(|| format!("{ev:?}"));
                if tx.send(name).is_err() {
                    break;
                }
            }
        });
        Ok(Qmp {
            service,
            events: rx,
            reader,
        })
    }

    async fn run<C: qapi::qmp::QmpCommand>(&self, cmd: C) -> Result<C::Ok, Error> {
        match tokio::time::timeout(TIMEOUT, self.service.execute(cmd)).await {
            Err(_) => Err(Error::Timeout),
            Ok(Err(e)) => Err(Error::Command(e.to_string())),
            Ok(Ok(v)) => Ok(v),
        }
    }

    /// QEMU's run state (`running`, `paused`, `shutdown`, ...).
    pub async fn status(&self) -> Result<String, Error> {
        let s = self.run(qmp::query_status {}).await?;
        Ok(serde_json::to_value(s.status)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default())
    }

    /// Presses the ACPI power button: the guest shuts down cleanly if it listens.
    pub async fn powerdown(&self) -> Result<(), Error> {
        self.run(qmp::system_powerdown {}).await.map(|_| ())
    }

    /// Quits QEMU at once (the disk is flushed; the guest is not asked).
    pub async fn quit(&self) -> Result<(), Error> {
        match self.run(qmp::quit {}).await {
            // QEMU may close the socket before the reply arrives.
            Ok(_) | Err(Error::Command(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
