//! vibebox as a library: the binary in `main.rs` only parses and dispatches; benches
//! and tests reach the same code through here.
//!
//! Layers import only downward (a module may use anything below it, nothing above):
//!
//! ```text
//! commands/    thin: parse arguments, call one use case, print (one y/N prompt)
//! session/     the use cases: open (find-or-create), delete, prune; one path each
//! supervisor/  boot, lifecycle, control socket, shutdown, gateway wiring
//! image/       build, pull, download, export, catalog, recipe
//! vm/  net/    the QEMU driver; the network gateway (pure parsers and decisions)
//! config/      vibebox.toml schema and validation, host facts, approvals
//! store/       passive state on disk: filenames, atomic locked state files, the
//!              index, instance records, guest-writable files read defensively;
//!              it never starts or stops a process
//! ```
//!
//! `paths` and `statefile` live in `store` and are re-exported here because nearly
//! every module names them.

pub mod cli;
pub mod commands;
pub mod config;
pub mod escape;
pub mod explain;
pub mod image;
pub mod interrupt;
pub mod net;
pub mod session;
pub mod ssh;
pub mod store;
pub mod supervisor;
pub mod tomlpos;
pub mod vm;

pub use store::{paths, statefile};
