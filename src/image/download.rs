//! Verified, resumable, cached downloads for `vibebox image pull`.
//!
//! A cloud image is hundreds of megabytes fetched over networks that drop, so a
//! download is written to `<file>.partial` and continued with a `Range` request on the
//! next run instead of starting over. Nothing gets the final name before its SHA-512
//! matches the published sum: a file under its final name in the cache is always a
//! verified one, and a corrupt or tampered download is deleted, never kept.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use super::digest;
use crate::interrupt;

/// Giving up on a server that does not accept the connection at all.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Giving up on a connection that stalls: no byte for this long.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How much is read (and written) at a time; also how often Ctrl-C is checked while
/// data flows.
const CHUNK: usize = 256 << 10;
/// How often a fetch waiting for another process's download of the same file checks
/// for Ctrl-C.
const LOCK_POLL: Duration = Duration::from_millis(200);
/// The suffix of a download in progress.
pub const PARTIAL_SUFFIX: &str = ".partial";

const OFFLINE_HINT: &str =
    "check your network, or build the image with `vibebox image build` (Linux)";

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("{0:?} is not an http:// or https:// URL")]
    BadUrl(String),
    #[error(
        "the expected SHA-512 {0:?} is not 128 hex digits; this is a bug in the image catalog, please report it"
    )]
    BadExpectedSum(String),
    #[error("cannot reach {host}: {detail}; {OFFLINE_HINT}")]
    Network { host: String, detail: String },
    #[error(
        "the download from {host} broke off: {detail}; what arrived is kept in {}, run the same command again to resume",
        partial.display()
    )]
    ConnectionLost {
        host: String,
        detail: String,
        partial: PathBuf,
    },
    #[error(
        "{url} answered HTTP {status}; the file may have moved: try again later, or build the image with `vibebox image build` (Linux)"
    )]
    Http { status: String, url: String },
    #[error(
        "{url} arrived corrupt or was tampered with: expected SHA-512 {expected}, got {actual}; the bad file was removed, run the command again"
    )]
    ChecksumMismatch {
        url: String,
        expected: String,
        actual: String,
    },
    #[error(
        "no space left on the disk holding {}: free some space (e.g. `vibebox image rm` of unused images) and run the command again; the download resumes where it stopped",
        dir.display()
    )]
    DiskFull { dir: PathBuf },
    #[error(
        "{url} answered with another part of the file than asked for; the partial download was removed, run the command again"
    )]
    BadRange { url: String },
    #[error("{url} is larger than {max} bytes, which is more than this file can be; refusing it")]
    TooLarge { url: String, max: usize },
    #[error("{url} is not UTF-8 text")]
    NotText { url: String },
    #[error("download interrupted; what arrived is kept and the next run resumes from there")]
    Interrupted,
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// The SHA-512 listed for `file_name` in a `SHA512SUMS` file, in lowercase.
///
/// Lines are `<128 hex>  <name>` (text mode) or `<128 hex> *<name>` (binary mode), as
/// `sha512sum` writes them. A line whose sum is not exactly 128 hex digits is ignored,
/// and a name listed twice with different sums gives `None`: the file comes from a
/// server, and an ambiguous answer must not pick one.
pub fn parse_sums(text: &str, file_name: &str) -> Option<String> {
    let mut found: Option<String> = None;
    for line in text.lines() {
        let Some((sum, rest)) = line.trim().split_once(char::is_whitespace) else {
            continue;
        };
        let rest = rest.trim_start();
        let name = rest.strip_prefix('*').unwrap_or(rest);
        if name != file_name || !is_sha512_hex(sum) {
            continue;
        }
        let sum = sum.to_ascii_lowercase();
        match &found {
            Some(prev) if *prev != sum => return None,
            _ => found = Some(sum),
        }
    }
    found
}

pub fn is_sha512_hex(s: &str) -> bool {
    s.len() == 128 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The host (with port, if any) of an http(s) URL.
pub fn host_of(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit('@').next().unwrap_or(authority);
    (!host.is_empty()).then_some(host)
}

/// Where `url` is cached: `<cache_dir>/<16 hex of sha256(url)>-<basename>`.
///
/// The hash keeps two URLs with the same file name (a new `latest/` next to an old
/// one on another mirror) apart; the basename keeps the cache readable. The basename
/// comes from a server-chosen URL, so it is reduced to a harmless file name.
pub fn cache_path(url: &str, cache_dir: &Path) -> PathBuf {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let path = rest.split(['?', '#']).next().unwrap_or("");
    let path = path.split_once('/').map_or("", |(_, p)| p);
    let base = path.rsplit('/').next().unwrap_or("");
    cache_dir.join(format!(
        "{}-{}",
        &digest::sha256(url.as_bytes())[..16],
        sanitise(base)
    ))
}

/// A file name made only of `[A-Za-z0-9._-]`, not starting with a dot, at most 100
/// characters.
fn sanitise(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let clean = clean.trim_start_matches('.');
    let clean: String = clean.chars().take(100).collect();
    if clean.is_empty() {
        "download".to_string()
    } else {
        clean
    }
}

fn partial_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(PARTIAL_SUFFIX);
    PathBuf::from(p)
}

fn lock_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.lock"))
}

/// Downloads `url` into `cache_dir` unless a verified copy is there already, and
/// returns the path of the verified file. Ctrl-C (`crate::interrupt`) stops it.
pub fn fetch(
    url: &str,
    cache_dir: &Path,
    expected_sha512: &str,
    progress: bool,
) -> Result<PathBuf, DownloadError> {
    fetch_with(
        url,
        cache_dir,
        expected_sha512,
        progress,
        &interrupt::requested,
    )
}

/// [`fetch`] with the "stop now" question asked of `stop` instead of the Ctrl-C
/// flag, which a test cannot raise without stopping every other test too.
pub fn fetch_with(
    url: &str,
    cache_dir: &Path,
    expected_sha512: &str,
    progress: bool,
    stop: &dyn Fn() -> bool,
) -> Result<PathBuf, DownloadError> {
    let host = host_of(url).ok_or_else(|| DownloadError::BadUrl(url.to_string()))?;
    if !is_sha512_hex(expected_sha512) {
        return Err(DownloadError::BadExpectedSum(expected_sha512.to_string()));
    }
    let expected = expected_sha512.to_ascii_lowercase();
    fs::create_dir_all(cache_dir).map_err(|e| io_error(cache_dir, cache_dir, e))?;
    let path = cache_path(url, cache_dir);

    // A second vibebox pulling the same image waits here, then finds the first one's
    // file in the cache, instead of both appending to one `.partial`.
    let _lock = lock(&lock_path(&path), cache_dir, stop)?;

    if path.exists() {
        if sha512(&path, cache_dir)? == expected {
            return Ok(path);
        }
        // A stale or damaged cache entry: fetch it again.
        remove(&path)?;
    }

    let partial = partial_path(&path);
    download(url, host, &partial, cache_dir, progress, stop)?;

    let actual = sha512(&partial, cache_dir)?;
    if actual != expected {
        remove(&partial)?;
        return Err(DownloadError::ChecksumMismatch {
            url: url.to_string(),
            expected,
            actual,
        });
    }
    fs::rename(&partial, &path).map_err(|e| io_error(&path, cache_dir, e))?;
    Ok(path)
}

/// Fetches a small text file (a `SHA512SUMS`) of at most `max_bytes`: the server is
/// not trusted to send something small.
pub fn fetch_text(url: &str, max_bytes: usize) -> Result<String, DownloadError> {
    let host = host_of(url).ok_or_else(|| DownloadError::BadUrl(url.to_string()))?;
    let resp = agent(host).get(url).call().map_err(|e| network(host, e))?;
    let status = resp.status();
    if status != ureq::http::StatusCode::OK {
        return Err(http_error(status, url));
    }
    let mut bytes = Vec::new();
    resp.into_body()
        .into_reader()
        .take(max_bytes as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| network(host, ureq::Error::from(e)))?;
    if bytes.len() > max_bytes {
        return Err(DownloadError::TooLarge {
            url: url.to_string(),
            max: max_bytes,
        });
    }
    String::from_utf8(bytes).map_err(|_| DownloadError::NotText {
        url: url.to_string(),
    })
}

/// Gets `url` into `partial`, continuing what is there. On return without error the
/// file holds the whole body (not yet verified).
fn download(
    url: &str,
    host: &str,
    partial: &Path,
    cache_dir: &Path,
    progress: bool,
    stop: &dyn Fn() -> bool,
) -> Result<(), DownloadError> {
    if stop() {
        return Err(DownloadError::Interrupted);
    }
    let offset = match fs::metadata(partial) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => return Err(io_error(partial, cache_dir, e)),
    };
    let mut req = agent(host).get(url);
    if offset > 0 {
        req = req.header("Range", format!("bytes={offset}-"));
    }
    let resp = req.call().map_err(|e| network(host, e))?;
    let status = resp.status().as_u16();
    let (start, total) = match status {
        // The whole file: a fresh download, or a server that ignores ranges.
        200 => (0, resp.body().content_length()),
        // The server continues where we stopped.
        206 if offset > 0 => {
            if content_range_start(&resp) != Some(offset) {
                // Some other part of the file cannot be appended; start clean next time.
                remove(partial)?;
                return Err(DownloadError::BadRange {
                    url: url.to_string(),
                });
            }
            (offset, resp.body().content_length().map(|n| n + offset))
        }
        // Nothing beyond what we have: the partial is the whole file, and the
        // checksum decides whether it is right.
        416 if offset > 0 => return Ok(()),
        _ => return Err(http_error(resp.status(), url)),
    };

    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .append(start > 0)
        .truncate(start == 0)
        .open(partial)
        .map_err(|e| io_error(partial, cache_dir, e))?;

    let bar = progress_bar(progress, start, total, partial);
    let mut body = resp.into_body().into_reader();
    let mut buf = vec![0u8; CHUNK];
    let mut have = start;
    let lost = |detail: String| DownloadError::ConnectionLost {
        host: host.to_string(),
        detail,
        partial: partial.to_path_buf(),
    };
    loop {
        if stop() {
            bar.abandon();
            return Err(DownloadError::Interrupted);
        }
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                bar.abandon();
                return Err(lost(describe(&ureq::Error::from(e))));
            }
        };
        file.write_all(&buf[..n])
            .map_err(|e| io_error(partial, cache_dir, e))?;
        have += n as u64;
        bar.set_position(have);
    }
    if let Some(total) = total
        && have < total
    {
        bar.abandon();
        return Err(lost(format!(
            "the connection closed after {have} of {total} bytes"
        )));
    }
    // On disk before it can be renamed to its final name.
    file.sync_all()
        .map_err(|e| io_error(partial, cache_dir, e))?;
    bar.finish_and_clear();
    Ok(())
}

/// The HTTP client: timeouts so a dead network fails in seconds rather than hanging,
/// status codes handled here rather than as errors, and the environment's proxy
/// settings except for loopback addresses, which a proxy cannot reach.
fn agent(host: &str) -> ureq::Agent {
    let mut config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_resolve(Some(CONNECT_TIMEOUT))
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_per_read(Some(READ_TIMEOUT))
        .timeout_per_write(Some(READ_TIMEOUT))
        .user_agent(concat!("vibebox/", env!("CARGO_PKG_VERSION")));
    // macOS: the system's TLS and the roots its keychain trusts (see Cargo.toml).
    #[cfg(target_os = "macos")]
    {
        config = config.tls_config(
            ureq::tls::TlsConfig::builder()
                .provider(ureq::tls::TlsProvider::NativeTls)
                .root_certs(ureq::tls::RootCerts::PlatformVerifier)
                .build(),
        );
    }
    let bare = host.rsplit_once(':').map_or(host, |(h, _)| h);
    if matches!(bare, "localhost" | "127.0.0.1" | "[::1]") {
        config = config.proxy(None);
    }
    config.build().new_agent()
}

/// The first byte of a 206 answer, from `Content-Range: bytes START-END/TOTAL`.
fn content_range_start(resp: &ureq::http::Response<ureq::Body>) -> Option<u64> {
    let v = resp.headers().get("content-range")?.to_str().ok()?;
    let range = v.trim().strip_prefix("bytes")?.trim_start();
    range.split('-').next()?.trim().parse().ok()
}

fn progress_bar(show: bool, start: u64, total: Option<u64>, partial: &Path) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let name = partial
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let name = name.strip_suffix(PARTIAL_SUFFIX).unwrap_or(&name);
    // Drop the cache-key prefix: the user knows the file by its own name.
    let name = name.split_once('-').map_or(name, |(_, n)| n).to_string();
    let (bar, template) = match total {
        Some(t) => (
            ProgressBar::new(t),
            "{msg} [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        ),
        None => (
            ProgressBar::new_spinner(),
            "{spinner} {msg} {bytes} {binary_bytes_per_sec}",
        ),
    };
    bar.set_style(
        ProgressStyle::with_template(template)
            .expect("template")
            .progress_chars("=> "),
    );
    bar.set_message(name);
    bar.set_position(start);
    // The rate and ETA count only what this run fetches, not the resumed part.
    bar.reset_eta();
    bar
}

/// Waits for the download lock, checking `stop` in between, so Ctrl-C works while
/// another process holds it.
fn lock(path: &Path, cache_dir: &Path, stop: &dyn Fn() -> bool) -> Result<File, DownloadError> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| io_error(path, cache_dir, e))?;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(fs::TryLockError::WouldBlock) => {
                if stop() {
                    return Err(DownloadError::Interrupted);
                }
                std::thread::sleep(LOCK_POLL);
            }
            Err(fs::TryLockError::Error(e)) => return Err(io_error(path, cache_dir, e)),
        }
    }
}

fn sha512(path: &Path, cache_dir: &Path) -> Result<String, DownloadError> {
    digest::sha512_file(path).map_err(|e| io_error(path, cache_dir, e))
}

fn remove(path: &Path) -> Result<(), DownloadError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(DownloadError::Io {
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// A file-system error; a full disk gets its own message, naming the directory to
/// make room in.
fn io_error(path: &Path, dir: &Path, e: io::Error) -> DownloadError {
    if matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    ) {
        DownloadError::DiskFull {
            dir: dir.to_path_buf(),
        }
    } else {
        DownloadError::Io {
            path: path.to_path_buf(),
            source: e,
        }
    }
}

fn network(host: &str, e: ureq::Error) -> DownloadError {
    DownloadError::Network {
        host: host.to_string(),
        detail: describe(&e),
    }
}

/// A ureq error in words for the user, without ureq's `io:` style prefixes.
fn describe(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Io(e) => e.to_string(),
        ureq::Error::Timeout(t) => format!("timed out ({t})"),
        ureq::Error::HostNotFound => "the host name does not resolve".to_string(),
        other => other.to_string(),
    }
}

fn http_error(status: ureq::http::StatusCode, url: &str) -> DownloadError {
    DownloadError::Http {
        status: match status.canonical_reason() {
            Some(reason) => format!("{} {reason}", status.as_u16()),
            None => status.as_u16().to_string(),
        },
        url: url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn sum(c: char) -> String {
        std::iter::repeat_n(c, 128).collect()
    }

    #[test]
    fn parse_sums_finds_the_named_file() {
        let text = format!(
            "{}  debian-13-generic-arm64.qcow2\n{}  debian-13-generic-amd64.qcow2\n",
            sum('1'),
            sum('B'),
        );
        assert_eq!(
            parse_sums(&text, "debian-13-generic-amd64.qcow2"),
            Some(sum('b')),
            "lowercased"
        );
        assert_eq!(
            parse_sums(&text, "debian-13-generic-arm64.qcow2"),
            Some(sum('1'))
        );
    }

    #[test]
    fn parse_sums_missing_name() {
        let text = format!("{A}  other.qcow2\n");
        assert_eq!(parse_sums(&text, "debian.qcow2"), None);
        assert_eq!(parse_sums("", "debian.qcow2"), None);
        // A name that merely contains the wanted one does not match.
        let text = format!("{A}  debian.qcow2.sig\n");
        assert_eq!(parse_sums(&text, "debian.qcow2"), None);
    }

    #[test]
    fn parse_sums_rejects_bad_hex() {
        let short = &A[..127];
        let not_hex = format!("{}g", &A[..127]);
        let long = format!("{A}a");
        for bad in [short, &not_hex, &long] {
            let text = format!("{bad}  f.qcow2\n");
            assert_eq!(parse_sums(&text, "f.qcow2"), None, "{bad}");
        }
    }

    #[test]
    fn parse_sums_binary_mode_and_crlf() {
        let text = format!("{A} *f.qcow2\r\n");
        assert_eq!(parse_sums(&text, "f.qcow2"), Some(A.to_string()));
    }

    #[test]
    fn parse_sums_refuses_conflicting_entries() {
        let text = format!("{A}  f.qcow2\n{}  f.qcow2\n", sum('b'));
        assert_eq!(parse_sums(&text, "f.qcow2"), None);
        let text = format!("{A}  f.qcow2\n{A} *f.qcow2\n");
        assert_eq!(parse_sums(&text, "f.qcow2"), Some(A.to_string()));
    }

    #[test]
    fn cache_path_is_keyed_by_url_and_sanitised() {
        let dir = Path::new("/c");
        let a = cache_path("https://h/x/debian.qcow2?sig=1#frag", dir);
        let name = a.file_name().unwrap().to_str().unwrap();
        assert_eq!(a.parent(), Some(dir));
        assert_eq!(name.len(), 16 + 1 + "debian.qcow2".len());
        assert!(name.ends_with("-debian.qcow2"), "{name}");
        assert_ne!(a, cache_path("https://other/x/debian.qcow2", dir));
        assert_eq!(a, cache_path("https://h/x/debian.qcow2?sig=1#frag", dir));

        for (url, base) in [
            ("https://h/a/..", "download"),
            ("https://h/", "download"),
            ("https://h", "download"),
            ("https://h/a/.hidden", "hidden"),
            ("https://h/a/x%2F..%2Fy", "x_2F.._2Fy"),
            ("https://h/a/sp ace\\b", "sp_ace_b"),
        ] {
            let p = cache_path(url, dir);
            let name = p.file_name().unwrap().to_str().unwrap();
            assert_eq!(&name[17..], base, "{url}");
            assert_eq!(p.parent(), Some(dir));
        }
        let long = format!("https://h/{}", "x".repeat(500));
        let p = cache_path(&long, dir);
        assert_eq!(p.file_name().unwrap().len(), 17 + 100);
    }

    #[test]
    fn host_of_urls() {
        assert_eq!(
            host_of("https://cloud.debian.org/a/b"),
            Some("cloud.debian.org")
        );
        assert_eq!(host_of("http://127.0.0.1:8080/x"), Some("127.0.0.1:8080"));
        assert_eq!(host_of("http://u:p@h?x"), Some("h"));
        assert_eq!(host_of("ftp://h/x"), None);
        assert_eq!(host_of("https:///x"), None);
    }

    #[test]
    fn bad_inputs_fail_before_any_request() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            fetch("file:///etc/passwd", dir.path(), A, false),
            Err(DownloadError::BadUrl(_))
        ));
        assert!(matches!(
            fetch("http://127.0.0.1:9/x", dir.path(), "abc", false),
            Err(DownloadError::BadExpectedSum(_))
        ));
    }

    #[test]
    fn disk_full_names_the_directory() {
        let e = io_error(
            Path::new("/c/f.partial"),
            Path::new("/c"),
            io::Error::from_raw_os_error(nix::libc::ENOSPC),
        );
        assert!(matches!(e, DownloadError::DiskFull { .. }));
        assert!(
            e.to_string()
                .contains("no space left on the disk holding /c")
        );
    }
}
