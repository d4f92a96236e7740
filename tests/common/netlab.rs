//! The outside world for the network tests and benchmark: a network namespace joined
//! to the host by a veth pair, with servers on documentation addresses (standing for
//! public hosts; `tests/fixtures/net/servers.py`), and a DNS upstream on loopback that
//! answers the test's names and records every question it gets; and a real sshd on
//! 198.51.100.30:22 serving a git repository (for `git` over SSH); an echo server on
//! 198.51.100.10:7000 that holds connections open. The host's end of the veth is
//! 198.51.100.1. Needs root and openssh-server.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

pub struct NetLab {
    ns: String,
    servers: Child,
    sshd: Child,
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
        let _ = Command::new("ip")
            .args(["netns", "del", &ns])
            .stderr(Stdio::null())
            .status();
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

        let sshd = start_sshd(&ns, dir.path());

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
            sshd,
            dir,
            dns_port,
            asked,
        }
    }

    /// What reached the servers.
    pub fn served(&self) -> String {
        fs::read_to_string(self.dir.path().join("servers.log")).unwrap_or_default()
    }

    /// The private key the sshd accepts (for root), and the repository it serves.
    pub fn ssh_key(&self) -> std::path::PathBuf {
        self.dir.path().join("client")
    }

    pub fn repo(&self) -> std::path::PathBuf {
        self.dir.path().join("repo.git")
    }

    pub fn was_asked(&self, name: &str) -> bool {
        self.asked.lock().unwrap().iter().any(|n| n == name)
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        for c in [&mut self.servers, &mut self.sshd] {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

fn run(c: &mut Command) {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// sshd in the namespace on 198.51.100.30:22, root allowed by key, serving a bare
/// repository with one commit; returns once it accepts connections.
fn start_sshd(ns: &str, dir: &Path) -> Child {
    let sshd = Path::new("/usr/sbin/sshd");
    assert!(
        sshd.exists(),
        "the network test needs sshd: apt install openssh-server"
    );
    for k in ["hostkey", "client"] {
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(dir.join(k)));
    }
    // The guest user reads the key from the project share and copies it.
    let mut perms = fs::metadata(dir.join("client")).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
    fs::set_permissions(dir.join("client"), perms).unwrap();
    fs::copy(dir.join("client.pub"), dir.join("authorized_keys")).unwrap();
    let work = dir.join("work");
    fs::create_dir_all(&work).unwrap();
    fs::write(work.join("README"), "from git.test\n").unwrap();
    let git = |args: &[&str]| {
        run(Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@t"])
            .arg("-C")
            .arg(&work)
            .args(args));
    };
    git(&["init", "-q", "-b", "main"]);
    git(&["add", "README"]);
    git(&["commit", "-q", "-m", "one"]);
    run(Command::new("git")
        .args(["clone", "-q", "--bare"])
        .arg(&work)
        .arg(dir.join("repo.git")));
    fs::create_dir_all("/run/sshd").unwrap();
    let log = fs::File::create(dir.join("sshd.log")).unwrap();
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(sshd)
        .args([
            "-D",
            "-e",
            "-f",
            "/dev/null",
            "-o",
            "ListenAddress=198.51.100.30:22",
        ])
        .arg("-o")
        .arg(format!("HostKey={}", dir.join("hostkey").display()))
        .arg("-o")
        .arg(format!(
            "AuthorizedKeysFile={}",
            dir.join("authorized_keys").display()
        ))
        .args([
            "-o",
            "StrictModes=no",
            "-o",
            "PermitRootLogin=prohibit-password",
        ])
        .args(["-o", "PidFile=none", "-o", "UsePAM=no"])
        .stderr(log)
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if std::net::TcpStream::connect("198.51.100.30:22").is_ok() {
            return child;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!(
        "sshd did not start: {}",
        fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
    );
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
        // The host's end of the veth: a public-looking address of the host itself.
        ("hostveth.test", [198, 51, 100, 1]),
        // An IP literal asked as a name: the host's resolver answers it with itself.
        ("198.51.100.20", [198, 51, 100, 20]),
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
