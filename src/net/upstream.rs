//! How the gateway reaches the world on the guest's behalf: resolving names on the
//! host and dialling TCP from the host. Traits, so the gateway's tests can put their
//! own servers behind names without touching the host's DNS.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::time::Duration;

use hickory_proto::op::Message;
use hickory_proto::rr::{RData, RecordType};
use tokio::net::{TcpStream, UdpSocket};

use super::dns;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Resolves an allowed name to its IPv4 addresses, on the host.
pub trait Resolver: Send + Sync {
    fn resolve<'a>(&'a self, name: &'a str) -> BoxFuture<'a, io::Result<Vec<Ipv4Addr>>>;
}

/// Opens a TCP connection from the host.
pub trait Dialer: Send + Sync {
    fn dial(&self, ip: Ipv4Addr, port: u16) -> BoxFuture<'_, io::Result<TcpStream>>;
}

const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(15);

/// The host's own resolver (getaddrinfo: /etc/hosts, VPN split DNS and all), as the
/// user's other programs see names.
pub struct System;

impl Resolver for System {
    fn resolve<'a>(&'a self, name: &'a str) -> BoxFuture<'a, io::Result<Vec<Ipv4Addr>>> {
        Box::pin(async move {
            let addrs = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((name, 0)))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "resolving timed out"))??;
            let mut v4: Vec<Ipv4Addr> = addrs
                .filter_map(|a| match a.ip() {
                    IpAddr::V4(ip) => Some(ip),
                    IpAddr::V6(_) => None,
                })
                .collect();
            v4.dedup();
            Ok(v4)
        })
    }
}

/// One DNS server asked directly over UDP (`VIBEBOX_DNS_UPSTREAM=ip:port`): for a
/// host whose resolver should not be used, and for tests that run their own DNS.
pub struct Server(pub SocketAddr);

impl Resolver for Server {
    fn resolve<'a>(&'a self, name: &'a str) -> BoxFuture<'a, io::Result<Vec<Ipv4Addr>>> {
        Box::pin(async move {
            let bind: SocketAddr = if self.0.is_ipv4() {
                "0.0.0.0:0".parse().expect("literal")
            } else {
                "[::]:0".parse().expect("literal")
            };
            let sock = UdpSocket::bind(bind).await?;
            sock.connect(self.0).await?;
            let id: u16 = rand_id();
            let query = dns::build_query(id, name, RecordType::A);
            let mut buf = vec![0u8; 4096];
            for _attempt in 0..3 {
                sock.send(&query).await?;
                let got = tokio::time::timeout(RESOLVE_TIMEOUT / 3, sock.recv(&mut buf)).await;
                let Ok(n) = got else { continue };
                let n = n?;
                let Ok(msg) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                if msg.metadata.id != id {
                    continue;
                }
                return Ok(msg
                    .answers
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::A(a) => Some(a.0),
                        _ => None,
                    })
                    .collect());
            }
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer from the DNS server {}", self.0),
            ))
        })
    }
}

fn rand_id() -> u16 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.subsec_nanos() ^ std::process::id()) as u16
}

/// The resolver the supervisor uses: `VIBEBOX_DNS_UPSTREAM` if set, else the host's.
pub fn resolver_from_env() -> Result<Box<dyn Resolver>, String> {
    match std::env::var("VIBEBOX_DNS_UPSTREAM") {
        Ok(v) if !v.is_empty() => v
            .parse::<SocketAddr>()
            .map(|a| Box::new(Server(a)) as Box<dyn Resolver>)
            .map_err(|_| format!("VIBEBOX_DNS_UPSTREAM={v:?} is not ip:port (e.g. 127.0.0.1:53)")),
        _ => Ok(Box::new(System)),
    }
}

/// Dials from the host, bounded in time.
pub struct Direct;

impl Dialer for Direct {
    fn dial(&self, ip: Ipv4Addr, port: u16) -> BoxFuture<'_, io::Result<TcpStream>> {
        Box::pin(async move {
            tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect((ip, port)))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connecting timed out"))?
        })
    }
}
