//! The outside world for the network tests and benchmark: a network namespace joined
//! to the host by a veth pair, with servers on documentation addresses (standing for
//! public hosts; `tests/fixtures/net/servers.py`), and a DNS upstream on loopback that
//! answers the test's names and records every question it gets. Needs root.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

pub struct NetLab {
    ns: String,
    servers: Child,
    dir: tempfile::TempDir,
    pub dns_port: u16,
    pub asked: Arc<Mutex<Vec<String>>>,
}

impl NetLab {
    pub fn new() -> NetLab {
        let id = std::process::id() % 100_000;
        let ns = format!("vbxt{id}");
        let (host_if, ns_if) = (format!("vbxh{id}"), format!("vbxn{id}"));
        let ip = |args: &str| {
            let st = Command::new("ip").args(args.split(' ')).status().unwrap();
            assert!(st.success(), "ip {args}");
        };
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        ip(&format!("netns add {ns}"));
        ip(&format!("link add {host_if} type veth peer name {ns_if}"));
        ip(&format!("link set {ns_if} netns {ns}"));
        ip(&format!("addr add 198.51.100.1/24 dev {host_if}"));
        ip(&format!("link set {host_if} up"));
        for a in ["198.51.100.10/24", "198.51.100.20/24", "198.51.100.30/24"] {
            ip(&format!("-n {ns} addr add {a} dev {ns_if}"));
        }
        ip(&format!("-n {ns} link set {ns_if} up"));
        ip(&format!("-n {ns} link set lo up"));

        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let st = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=allowed.test", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "openssl");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/net/servers.py");
        let mut servers = Command::new("ip")
            .args(["netns", "exec", &ns, "python3"])
            .arg(script)
            .arg(dir.path().join("servers.log"))
            .arg(&cert)
            .arg(&key)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(servers.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "the test servers did not start");

        let asked = Arc::new(Mutex::new(Vec::new()));
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let dns_port = sock.local_addr().unwrap().port();
        {
            let asked = asked.clone();
            std::thread::spawn(move || test_dns(sock, &asked));
        }
        NetLab {
            ns,
            servers,
            dir,
            dns_port,
            asked,
        }
    }

    /// What reached the servers.
    pub fn served(&self) -> String {
        fs::read_to_string(self.dir.path().join("servers.log")).unwrap_or_default()
    }

    pub fn was_asked(&self, name: &str) -> bool {
        self.asked.lock().unwrap().iter().any(|n| n == name)
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        let _ = self.servers.kill();
        let _ = self.servers.wait();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// The test's DNS upstream: its names, NXDOMAIN for the rest, every question kept.
fn test_dns(sock: std::net::UdpSocket, asked: &Mutex<Vec<String>>) {
    use hickory_proto::op::{Message, MessageType, ResponseCode};
    use hickory_proto::rr::{RData, Record, rdata::A};
    let answers: &[(&str, [u8; 4])] = &[
        ("allowed.test", [198, 51, 100, 10]),
        ("bench.test", [198, 51, 100, 10]),
        ("other.test", [198, 51, 100, 20]),
        ("git.test", [198, 51, 100, 30]),
        ("rebind.allowed.test", [127, 0, 0, 1]),
        ("lan.allowed.test", [10, 1, 2, 3]),
    ];
    let mut buf = [0u8; 2048];
    loop {
        let Ok((n, peer)) = sock.recv_from(&mut buf) else {
            return;
        };
        let Ok(q) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        let Some(question) = q.queries.first() else {
            continue;
        };
        let name = question
            .name
            .to_ascii()
            .trim_end_matches('.')
            .to_lowercase();
        asked.lock().unwrap().push(name.clone());
        let mut r = Message::new(q.metadata.id, MessageType::Response, q.metadata.op_code);
        r.add_query(question.clone());
        match answers.iter().find(|(n, _)| *n == name) {
            Some((_, ip)) => {
                r.add_answer(Record::from_rdata(
                    question.name.clone(),
                    30,
                    RData::A(A((*ip).into())),
                ));
            }
            None => r.metadata.response_code = ResponseCode::NXDomain,
        }
        let _ = sock.send_to(&r.to_vec().unwrap(), peer);
    }
}
