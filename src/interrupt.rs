//! Ctrl-C and SIGTERM during long jobs (image builds, downloads): the job notices,
//! stops its child process and cleans up instead of dying with half-written files.
//! Only for the job: once it ends, the signals act as before again, so Ctrl-C still
//! ends the boot or the wait that follows an automatic image step.

use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

static REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: nix::libc::c_int) {
    REQUESTED.store(true, Ordering::SeqCst);
}

const SIGNALS: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

/// While alive, SIGINT, SIGTERM and SIGHUP set the flag [`requested`] reads instead of
/// ending the process; dropping it puts back the handling they had before.
#[must_use = "the signals are routed to the flag only while the guard lives"]
pub struct Guard {
    previous: Vec<(Signal, SigAction)>,
}

/// Routes SIGINT, SIGTERM and SIGHUP to a flag for as long as the guard lives.
pub fn install() -> Guard {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    let mut previous = Vec::new();
    for sig in SIGNALS {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        if let Ok(old) = unsafe { sigaction(sig, &action) } {
            previous.push((sig, old));
        }
    }
    Guard { previous }
}

impl Drop for Guard {
    fn drop(&mut self) {
        for (sig, old) in self.previous.drain(..).rev() {
            // SAFETY: restores the disposition this process had before `install`.
            unsafe {
                let _ = sigaction(sig, &old);
            }
        }
    }
}

pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The disposition as a comparable word: default, ignore, or a handler address.
    fn current(sig: Signal) -> usize {
        let probe = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
        // SAFETY: reads the disposition by swapping it out and back at once.
        unsafe {
            let old = sigaction(sig, &probe).unwrap();
            sigaction(sig, &old).unwrap();
            match old.handler() {
                SigHandler::SigDfl => 0,
                SigHandler::SigIgn => 1,
                SigHandler::Handler(f) => f as usize,
                SigHandler::SigAction(f) => f as usize,
            }
        }
    }

    #[test]
    fn dropping_the_guard_gives_the_signals_back() {
        let before = current(Signal::SIGHUP);
        let guard = install();
        assert_eq!(current(Signal::SIGHUP), on_signal as *const () as usize);
        drop(guard);
        assert_eq!(current(Signal::SIGHUP), before);
    }
}
