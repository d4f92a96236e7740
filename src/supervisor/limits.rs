//! What keeps the supervisor answering while the guest presses on its bounds: enough
//! file descriptors for every connection the gateway lets the guest hold (so the
//! guest cannot starve the control socket), and a control loop that outlives a
//! failed `accept()`.

use std::future::Future;
use std::io;
use std::time::Duration;

use nix::sys::resource::{Resource, getrlimit, setrlimit};

use crate::net::gateway::Limits;

/// Descriptors the supervisor needs besides the gateway's host sockets: QEMU's and
/// virtiofsd's sockets and pipes, logs, the control socket and its clients.
const OTHER_FDS: u64 = 256;

/// The gateway's bounds, after raising the soft descriptor limit as far as they need
/// (never past the hard limit). Each guest, SSH or relayed connection holds one host socket;
/// where the hard limit is too low for the defaults (256 soft and hard on some
/// macOS set-ups), the bounds shrink to fit instead.
pub fn for_gateway() -> Limits {
    let d = Limits::default();
    let want = (d.connections + d.ssh + d.relays) as u64 + OTHER_FDS;
    fit(raise_nofile(want))
}

fn raise_nofile(want: u64) -> u64 {
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    if soft >= want {
        return soft;
    }
    let target = want.min(hard);
    match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
        Ok(()) => target,
        Err(e) => {
            tracing::warn!("cannot raise the file descriptor limit from {soft} to {target}: {e}");
            soft
        }
    }
}

/// The gateway's bounds that fit in `nofile` descriptors.
pub fn fit(nofile: u64) -> Limits {
    let d = Limits::default();
    let room = nofile.saturating_sub(OTHER_FDS) as usize;
    let ssh = d.ssh.min(room / 4);
    let relays = d.relays.min((room - ssh) / 3);
    let connections = d.connections.min(room - ssh - relays);
    if connections < d.connections {
        tracing::warn!(
            "file descriptor limit {nofile}: the guest may hold {connections} connections at once (not {})",
            d.connections
        );
    }
    Limits {
        connections,
        ssh,
        relays,
        ..d
    }
}

/// Back-off after a failed `accept()`, doubling up to the maximum while it fails.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Accepts until the task is dropped, handing each connection to `on`. A failed
/// `accept()` (out of descriptors while the guest holds its connections, a client
/// gone before it was accepted) is waited out: ending the loop would leave QEMU
/// running with no way for `vibebox stop` or a new client to reach it.
pub async fn accept_loop<C, Fut>(mut accept: impl FnMut() -> Fut, mut on: impl FnMut(C))
where
    Fut: Future<Output = io::Result<C>>,
{
    let mut backoff = BACKOFF_MIN;
    loop {
        match accept().await {
            Ok(c) => {
                backoff = BACKOFF_MIN;
                on(c);
            }
            Err(e) => {
                tracing::warn!("control socket: accept failed ({e}); trying again in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn the_bounds_fit_the_descriptors() {
        let d = Limits::default();
        let big = fit(1 << 20);
        assert_eq!(
            (big.connections, big.ssh, big.relays),
            (d.connections, d.ssh, d.relays)
        );
        for nofile in [0, 100, 256, 300, 1024, 1300] {
            let l = fit(nofile);
            assert!(
                (l.connections + l.ssh + l.relays) as u64 + OTHER_FDS <= nofile.max(OTHER_FDS),
                "{nofile}: {l:?}"
            );
        }
        assert!(fit(1024).ssh > 0);
        // The supervisor's own process: after raising, the defaults fit or were cut.
        let l = for_gateway();
        let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert!(
            (l.connections + l.ssh + l.relays) as u64 + OTHER_FDS <= soft,
            "{l:?} {soft}"
        );
    }

    #[tokio::test]
    async fn accept_errors_do_not_end_the_loop() {
        let calls = AtomicUsize::new(0);
        let mut got = Vec::new();
        let run = accept_loop(
            || {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    // Out of descriptors three times, then a client, then idle.
                    match n {
                        0..3 => Err(io::Error::from_raw_os_error(libc_emfile())),
                        3 => Ok(n),
                        _ => std::future::pending().await,
                    }
                }
            },
            |c| got.push(c),
        );
        let _ = tokio::time::timeout(Duration::from_secs(5), run).await;
        assert_eq!(got, [3]);
    }

    fn libc_emfile() -> i32 {
        nix::errno::Errno::EMFILE as i32
    }
}
