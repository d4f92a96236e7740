//! The control protocol between `vibebox` clients and a session's supervisor:
//! newline-delimited JSON over a unix socket, versioned. A client sends one request;
//! the supervisor answers with a stream of state messages. An `attach` connection is
//! a reference: it counts for as long as it stays open.

use serde::{Deserialize, Serialize};

pub const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// Hold a reference and receive the state as it changes.
    Attach,
    /// One `Status` reply, then the supervisor closes.
    Status,
    /// Stop the VM now (saving it for the next start where it can); replies with
    /// states until `stopped`.
    Stop,
    /// Stop the VM by shutting the guest down: the next start boots cold.
    #[serde(rename = "stop-cold")]
    StopCold,
    /// Publish a guest port on the host's loopback until the VM stops (or it is
    /// removed); one `Notice` reply saying what was done, or an `Error`.
    Publish {
        host: u16,
        guest: u16,
        /// The host address to listen on; 127.0.0.1 when absent.
        #[serde(default)]
        addr: Option<std::net::Ipv4Addr>,
    },
    /// Stop publishing a guest port (until the VM stops); one reply as `Publish`.
    Unpublish { guest: u16 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub v: u32,
    pub op: Op,
}

/// How to reach the guest's sshd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// The guest's own IPv4 address, as it reported it.
    pub guest_ipv4: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum Message {
    Starting,
    Booting {
        accel: String,
        image: String,
    },
    Ready {
        ssh: Endpoint,
        /// Non-fatal problems the guest reported while booting.
        warnings: Vec<String>,
    },
    Stopping,
    Stopped,
    Error {
        message: String,
        log: String,
    },
    /// A line for the attached terminals while the VM runs (a port published).
    Notice {
        text: String,
    },
    /// Reply to `status`: the VM's state (`booting`, `running`, `stopping`,
    /// `stopped`) and the number of attached clients.
    Status {
        vm: String,
        clients: u32,
    },
}

pub fn encode<T: Serialize>(m: &T) -> String {
    let mut s = serde_json::to_string(m).expect("protocol messages serialize");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format() {
        assert_eq!(
            encode(&Request {
                v: VERSION,
                op: Op::Attach
            }),
            "{\"v\":1,\"op\":\"attach\"}\n"
        );
        let ready = Message::Ready {
            ssh: Endpoint {
                host: "127.0.0.1".into(),
                port: 2222,
                user: "al".into(),
                guest_ipv4: Some("10.0.2.15".into()),
            },
            warnings: vec![],
        };
        let line = encode(&ready);
        assert!(line.starts_with("{\"state\":\"ready\""), "{line}");
        assert_eq!(serde_json::from_str::<Message>(&line).unwrap(), ready);
        assert_eq!(
            serde_json::from_str::<Message>("{\"state\":\"stopping\"}").unwrap(),
            Message::Stopping
        );
    }
}
