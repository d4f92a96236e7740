//! `vibebox::image::download` against a real HTTP/1.1 server on 127.0.0.1: fresh
//! download, cache hit, resume after a cut connection, checksum refusal, unreachable
//! server, servers that ignore ranges.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::Digest;
use vibebox::image::download::{self, DownloadError};

const SIZE: usize = 3 << 20;
const NO_CUT: u64 = u64::MAX;

/// What the test server saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    range: Option<String>,
}

/// A one-file HTTP/1.1 server: honours `Range: bytes=N-`, records every request, and
/// can be told to ignore ranges or to cut the next response off after some bytes.
struct Server {
    port: u16,
    body: Arc<Vec<u8>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Body bytes to send in the next response before dropping the connection.
    cut_next_after: Arc<AtomicU64>,
    ignore_range: Arc<AtomicBool>,
    /// Status to answer instead of the file (0: serve the file).
    status: Arc<AtomicUsize>,
}

impl Server {
    fn start(body: Vec<u8>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = Server {
            port: listener.local_addr().unwrap().port(),
            body: Arc::new(body),
            seen: Arc::default(),
            cut_next_after: Arc::new(AtomicU64::new(NO_CUT)),
            ignore_range: Arc::default(),
            status: Arc::default(),
        };
        let (body, seen, cut, ignore, status) = (
            server.body.clone(),
            server.seen.clone(),
            server.cut_next_after.clone(),
            server.ignore_range.clone(),
            server.status.clone(),
        );
        // The accept thread lives until the test process exits.
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (body, seen, cut, ignore, status) = (
                    body.clone(),
                    seen.clone(),
                    cut.clone(),
                    ignore.clone(),
                    status.clone(),
                );
                std::thread::spawn(move || {
                    let _ = serve(conn, &body, &seen, &cut, &ignore, &status);
                });
            }
        });
        server
    }

    fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/images/{name}", self.port)
    }

    fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn serve(
    conn: TcpStream,
    body: &[u8],
    seen: &Mutex<Vec<Seen>>,
    cut: &AtomicU64,
    ignore_range: &AtomicBool,
    status: &AtomicUsize,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_string();
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.trim().eq_ignore_ascii_case("range")
        {
            range = Some(v.trim().to_string());
        }
    }
    seen.lock().unwrap().push(Seen {
        path,
        range: range.clone(),
    });
    let mut conn = conn;

    let forced = status.load(Ordering::SeqCst);
    if forced != 0 {
        write!(
            conn,
            "HTTP/1.1 {forced} Forced\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        return Ok(());
    }

    let len = body.len() as u64;
    let start = range
        .as_deref()
        .filter(|_| !ignore_range.load(Ordering::SeqCst))
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<u64>().ok());
    let (head, from) = match start {
        None => (format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n"), 0),
        Some(s) if s >= len => {
            write!(
                conn,
                "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )?;
            return Ok(());
        }
        Some(s) => (
            format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {s}-{}/{len}\r\nContent-Length: {}\r\n",
                len - 1,
                len - s
            ),
            s,
        ),
    };
    write!(
        conn,
        "{head}Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
    )?;
    let rest = &body[from as usize..];
    let n = cut.swap(NO_CUT, Ordering::SeqCst).min(rest.len() as u64) as usize;
    conn.write_all(&rest[..n])?;
    conn.flush()?;
    // Drain nothing more; closing both ways cuts the response if n < rest.len().
    let _ = conn.shutdown(Shutdown::Both);
    Ok(())
}

/// Deterministic pseudo-random bytes (xorshift64*): incompressible, and any byte in
/// the wrong place changes the checksum.
fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn sha512(data: &[u8]) -> String {
    sha2::Sha512::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn partial_of(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(download::PARTIAL_SUFFIX);
    PathBuf::from(p)
}

/// The names of the files in `dir` that are not lock files.
fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.ends_with(".lock"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn setup(seed: u64) -> (Server, Vec<u8>, String, tempfile::TempDir) {
    let body = content(SIZE, seed);
    let sum = sha512(&body);
    (
        Server::start(body.clone()),
        body,
        sum,
        tempfile::tempdir().unwrap(),
    )
}

#[test]
fn fresh_download_verifies_and_lands_in_the_cache() {
    let (server, body, sum, cache) = setup(1);
    let url = server.url("debian-13-generic-amd64.qcow2");
    let path = download::fetch(&url, cache.path(), &sum, false).unwrap();

    assert_eq!(path, download::cache_path(&url, cache.path()));
    assert_eq!(path.parent(), Some(cache.path()));
    assert!(
        path.file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .ends_with("-debian-13-generic-amd64.qcow2")
    );
    assert!(std::fs::read(&path).unwrap() == body, "content differs");
    assert!(!partial_of(&path).exists());
    let reqs = server.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].path, "/images/debian-13-generic-amd64.qcow2");
    assert_eq!(reqs[0].range, None, "a fresh download asks for everything");
}

#[test]
fn second_fetch_is_a_cache_hit_without_requests() {
    let (server, _body, sum, cache) = setup(2);
    let url = server.url("img.qcow2");
    let first = download::fetch(&url, cache.path(), &sum, false).unwrap();
    assert_eq!(server.requests().len(), 1);
    // Uppercase hex is the same sum.
    let second = download::fetch(&url, cache.path(), &sum.to_uppercase(), false).unwrap();
    assert_eq!(first, second);
    assert_eq!(server.requests().len(), 1, "a cache hit makes no request");
}

#[test]
fn damaged_cache_entry_is_fetched_again() {
    let (server, body, sum, cache) = setup(3);
    let url = server.url("img.qcow2");
    let path = download::fetch(&url, cache.path(), &sum, false).unwrap();
    std::fs::write(&path, b"bit rot").unwrap();
    let again = download::fetch(&url, cache.path(), &sum, false).unwrap();
    assert!(std::fs::read(&again).unwrap() == body);
    assert_eq!(server.requests().len(), 2);
}

#[test]
fn cut_download_keeps_partial_and_resumes_with_range() {
    let (server, body, sum, cache) = setup(4);
    let url = server.url("img.qcow2");
    let final_path = download::cache_path(&url, cache.path());
    let partial = partial_of(&final_path);

    server
        .cut_next_after
        .store(SIZE as u64 / 2, Ordering::SeqCst);
    let err = download::fetch(&url, cache.path(), &sum, false).unwrap_err();
    assert!(
        matches!(err, DownloadError::ConnectionLost { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("127.0.0.1"), "{msg}");
    assert!(msg.contains("resume"), "{msg}");
    assert!(!final_path.exists(), "nothing under the final name");
    let offset = std::fs::metadata(&partial).unwrap().len();
    assert_eq!(offset, SIZE as u64 / 2, "everything that arrived is kept");
    assert!(std::fs::read(&partial).unwrap() == body[..offset as usize]);

    let path = download::fetch(&url, cache.path(), &sum, false).unwrap();
    assert_eq!(path, final_path);
    assert!(std::fs::read(&path).unwrap() == body);
    assert!(!partial.exists());
    let reqs = server.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[1].range.as_deref(), Some(&*format!("bytes={offset}-")));
}

#[test]
fn checksum_mismatch_is_refused_and_removed() {
    let (server, body, _sum, cache) = setup(5);
    let url = server.url("img.qcow2");
    let wrong = sha512(b"something else");
    let err = download::fetch(&url, cache.path(), &wrong, false).unwrap_err();
    assert!(
        matches!(err, DownloadError::ChecksumMismatch { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains(&wrong), "expected sum in {msg}");
    assert!(msg.contains(&sha512(&body)), "actual sum in {msg}");
    assert_eq!(
        files_in(cache.path()),
        Vec::<String>::new(),
        "bad file kept"
    );
}

#[test]
fn unreachable_server_is_a_network_error_and_leaves_nothing() {
    // A port that was just free: connecting is refused at once.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cache = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{port}/img.qcow2");
    let started = std::time::Instant::now();
    let err = download::fetch(&url, cache.path(), &sha512(b"x"), false).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(matches!(err, DownloadError::Network { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("cannot reach 127.0.0.1:{port}: ")),
        "{msg}"
    );
    assert!(msg.contains("vibebox image build"), "{msg}");
    assert!(!msg.contains('\n'), "one line: {msg}");
    assert!(!download::cache_path(&url, cache.path()).exists());
    assert_eq!(files_in(cache.path()), Vec::<String>::new());
}

#[test]
fn server_ignoring_range_still_gives_the_right_file() {
    let (server, body, sum, cache) = setup(6);
    let url = server.url("img.qcow2");
    let final_path = download::cache_path(&url, cache.path());
    // A stale partial of the right length but wrong bytes: appending the full 200
    // body to it, or keeping it, would both fail the checksum.
    std::fs::create_dir_all(cache.path()).unwrap();
    std::fs::write(partial_of(&final_path), vec![0u8; 1000]).unwrap();
    server.ignore_range.store(true, Ordering::SeqCst);

    let path = download::fetch(&url, cache.path(), &sum, false).unwrap();
    assert!(std::fs::read(&path).unwrap() == body);
    let reqs = server.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].range.as_deref(), Some("bytes=1000-"));
}

#[test]
fn complete_partial_answered_416_is_verified_and_kept() {
    let (server, body, sum, cache) = setup(7);
    let url = server.url("img.qcow2");
    let final_path = download::cache_path(&url, cache.path());
    std::fs::write(partial_of(&final_path), &body).unwrap();

    let path = download::fetch(&url, cache.path(), &sum, false).unwrap();
    assert_eq!(path, final_path);
    assert!(std::fs::read(&path).unwrap() == body);
    assert_eq!(
        server.requests()[0].range.as_deref(),
        Some(&*format!("bytes={SIZE}-"))
    );
}

#[test]
fn interrupted_download_keeps_partial_and_resumes() {
    let (server, body, sum, cache) = setup(8);
    let url = server.url("img.qcow2");
    let final_path = download::cache_path(&url, cache.path());
    let checks = AtomicUsize::new(0);
    // "Ctrl-C" arrives after a few chunks.
    let stop = || checks.fetch_add(1, Ordering::SeqCst) >= 3;
    let err = download::fetch_with(&url, cache.path(), &sum, false, &stop).unwrap_err();
    assert!(matches!(err, DownloadError::Interrupted), "{err:?}");
    assert!(!final_path.exists());
    let offset = std::fs::metadata(partial_of(&final_path)).unwrap().len();
    assert!(offset > 0 && offset < SIZE as u64, "{offset}");

    let path = download::fetch(&url, cache.path(), &sum, false).unwrap();
    assert!(std::fs::read(&path).unwrap() == body);
    assert_eq!(
        server.requests()[1].range.as_deref(),
        Some(&*format!("bytes={offset}-"))
    );
}

#[test]
fn http_error_names_status_and_url() {
    let (server, _body, sum, cache) = setup(9);
    server.status.store(404, Ordering::SeqCst);
    let url = server.url("gone.qcow2");
    let err = download::fetch(&url, cache.path(), &sum, false).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DownloadError::Http { .. }), "{err:?}");
    assert!(msg.contains("404"), "{msg}");
    assert!(msg.contains(&url), "{msg}");
    assert_eq!(files_in(cache.path()), Vec::<String>::new());
}

#[test]
fn fetch_text_is_bounded() {
    let text = format!("{}  img.qcow2\n", "ab".repeat(64));
    let server = Server::start(text.clone().into_bytes());
    let url = server.url("SHA512SUMS");
    assert_eq!(download::fetch_text(&url, 4096).unwrap(), text);
    assert_eq!(
        download::parse_sums(&download::fetch_text(&url, 4096).unwrap(), "img.qcow2"),
        Some("ab".repeat(64))
    );
    let err = download::fetch_text(&url, 10).unwrap_err();
    assert!(matches!(err, DownloadError::TooLarge { .. }), "{err:?}");

    let big = Server::start(content(SIZE, 10));
    let err = download::fetch_text(&big.url("SHA512SUMS"), 64 << 10).unwrap_err();
    assert!(matches!(err, DownloadError::TooLarge { .. }), "{err:?}");
}

#[test]
fn reading_a_request_from_the_test_server_works_with_plain_std() {
    // Guards the fixture itself: a Range request gets exactly the tail.
    let server = Server::start(content(1000, 11));
    let mut c = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(c, "GET /x HTTP/1.1\r\nHost: t\r\nRange: bytes=990-\r\n\r\n").unwrap();
    let mut resp = Vec::new();
    c.read_to_end(&mut resp).unwrap();
    let head_end = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(resp.starts_with(b"HTTP/1.1 206"));
    assert_eq!(&resp[head_end..], &content(1000, 11)[990..]);
}
