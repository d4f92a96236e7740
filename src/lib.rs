//! vibebox as a library: the binary in `main.rs` only parses and dispatches; benches
//! and tests reach the same code through here.

pub mod cli;
pub mod commands;
pub mod config;
pub mod explain;
pub mod image;
pub mod interrupt;
pub mod net;
pub mod paths;
pub mod session;
pub mod ssh;
pub mod statefile;
pub mod supervisor;
pub mod tomlpos;
pub mod vm;
