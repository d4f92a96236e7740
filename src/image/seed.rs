//! The cloud-init NoCloud seed for the one preparing boot of a pulled image.
//!
//! The seed is served over HTTP on host loopback, which the guest reaches as
//! `10.0.2.2` through QEMU user networking, and named by the SMBIOS serial number
//! (`ds=nocloud;s=http://10.0.2.2:<port>/`). That needs no host tool at all: no ISO
//! or FAT writer, the same on macOS and Linux. The seed holds only the public guest
//! recipe, so serving it on loopback for a few minutes gives nothing away.
//!
//! user-data is `#cloud-config` followed by JSON: YAML accepts JSON, and JSON is
//! what serde writes without another crate.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use base64::Engine;
use serde_json::json;

use super::recipe;

/// Where the guest finds the host's loopback under QEMU user networking.
pub const HOST_FROM_GUEST: &str = "10.0.2.2";
/// The file that cloud-init runs (see images/pull/prepare.sh).
pub const PREPARE_PATH: &str = "/usr/lib/vibebox/prepare.sh";

/// Every file the preparing guest needs, as (guest path, mode, body).
pub fn guest_files() -> Vec<(String, u32, &'static str)> {
    let dir = format!("/{}", recipe::GUEST_DIR);
    let mut files: Vec<(String, u32, &'static str)> = recipe::GUEST_FILES
        .iter()
        .map(|(name, body)| {
            let mode = if *name == "vibebox-init" {
                0o755
            } else {
                0o644
            };
            (format!("{dir}/{name}"), mode, *body)
        })
        .collect();
    files.push((format!("{dir}/setup.sh"), 0o644, recipe::SETUP));
    files.push((format!("{dir}/packages.txt"), 0o644, recipe::PACKAGES));
    files.push((PREPARE_PATH.to_string(), 0o755, recipe::PREPARE));
    files
}

/// The cloud-config: write the guest files, create no user, run prepare.sh.
pub fn user_data() -> String {
    let write_files: Vec<_> = guest_files()
        .into_iter()
        .map(|(path, mode, body)| {
            json!({
                "path": path,
                "encoding": "b64",
                "content": base64::engine::general_purpose::STANDARD.encode(body),
                "permissions": format!("{mode:04o}"),
            })
        })
        .collect();
    let config = json!({
        // No default user (`debian`): vibebox-init makes the only account, with
        // the host user's uid, at each session's boot.
        "users": [],
        "ssh_pwauth": false,
        "write_files": write_files,
        "runcmd": [["sh", PREPARE_PATH]],
    });
    format!("#cloud-config\n{config}\n")
}

pub fn meta_data(instance_id: &str) -> String {
    format!(
        "{}\n",
        json!({ "instance-id": instance_id, "local-hostname": "vibebox" })
    )
}

/// The SMBIOS serial number that points cloud-init at the seed.
pub fn smbios_serial(port: u16) -> String {
    format!("ds=nocloud;s=http://{HOST_FROM_GUEST}:{port}/")
}

/// The response to one request path: `None` is 404.
pub fn respond(path: &str, user_data: &str, meta_data: &str) -> Option<String> {
    match path.split(['?', '#']).next().unwrap_or("") {
        "/user-data" => Some(user_data.to_string()),
        "/meta-data" => Some(meta_data.to_string()),
        "/vendor-data" => Some(String::new()),
        _ => None,
    }
}

/// The seed, served on `127.0.0.1:<port>` until dropped.
pub struct Server {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// How many requests were read, for the "the guest never asked" diagnosis. Counted
    /// before the answer is sent, so a client that has its answer sees itself counted.
    served: Arc<std::sync::atomic::AtomicUsize>,
}

impl Server {
    pub fn start(instance_id: &str) -> std::io::Result<Server> {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (user, meta) = (user_data(), meta_data(instance_id));
        let thread = {
            let stop = stop.clone();
            let served = served.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(conn) = conn {
                        let _ = serve_one(conn, &user, &meta, &served);
                    }
                }
            })
        };
        Ok(Server {
            port,
            stop,
            thread: Some(thread),
            served,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn requests(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One HTTP/1.0-style exchange: read the request head, answer, close.
fn serve_one(
    conn: TcpStream,
    user: &str,
    meta: &str,
    served: &std::sync::atomic::AtomicUsize,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    conn.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?).take(16 << 10);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    served.fetch_add(1, Ordering::SeqCst);
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let body = if method == "GET" || method == "HEAD" {
        respond(path, user, meta)
    } else {
        None
    };
    let mut conn = conn;
    match body {
        Some(body) => {
            write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            if method == "GET" {
                conn.write_all(body.as_bytes())?;
            }
        }
        None => conn.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?,
    }
    conn.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_is_cloud_config_json_with_every_guest_file() {
        let text = user_data();
        let json_text = text.strip_prefix("#cloud-config\n").expect("header");
        let v: serde_json::Value = serde_json::from_str(json_text).unwrap();
        assert_eq!(v["users"], json!([]));
        assert_eq!(v["runcmd"], json!([["sh", PREPARE_PATH]]));
        let files = v["write_files"].as_array().unwrap();
        assert_eq!(files.len(), recipe::GUEST_FILES.len() + 3);
        let find = |p: &str| files.iter().find(|f| f["path"] == p).expect(p);
        let init = find("/usr/lib/vibebox/vibebox-init");
        assert_eq!(init["permissions"], "0755");
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(init["content"].as_str().unwrap())
            .unwrap();
        assert_eq!(decoded, recipe::GUEST_FILES[0].1.as_bytes());
        assert_eq!(find(PREPARE_PATH)["permissions"], "0755");
        assert_eq!(find("/usr/lib/vibebox/setup.sh")["permissions"], "0644");
        find("/usr/lib/vibebox/packages.txt");
    }

    #[test]
    fn seed_paths_and_serial() {
        assert_eq!(smbios_serial(8123), "ds=nocloud;s=http://10.0.2.2:8123/");
        let meta = meta_data("vibebox-prepare-1");
        let v: serde_json::Value = serde_json::from_str(&meta).unwrap();
        assert_eq!(v["instance-id"], "vibebox-prepare-1");
        assert_eq!(respond("/user-data", "U", "M").as_deref(), Some("U"));
        assert_eq!(respond("/meta-data?x=1", "U", "M").as_deref(), Some("M"));
        assert_eq!(respond("/vendor-data", "U", "M").as_deref(), Some(""));
        assert_eq!(respond("/network-config", "U", "M"), None);
        assert_eq!(respond("/../etc/passwd", "U", "M"), None);
    }

    #[test]
    fn server_answers_over_real_tcp() {
        let server = Server::start("id-1").unwrap();
        let get = |path: &str| {
            let mut c = TcpStream::connect((Ipv4Addr::LOCALHOST, server.port())).unwrap();
            write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).unwrap();
            out
        };
        let meta = get("/meta-data");
        assert!(meta.starts_with("HTTP/1.1 200 OK\r\n"), "{meta}");
        assert!(meta.ends_with(&meta_data("id-1")), "{meta}");
        assert!(get("/user-data").contains("#cloud-config\n{"));
        assert!(get("/nope").starts_with("HTTP/1.1 404"));
        assert_eq!(server.requests(), 3);
        drop(server);
    }
}
