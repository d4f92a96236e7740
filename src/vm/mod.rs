//! Everything about the virtual machine: host facts, the QEMU command line, who the
//! guest user is and what is shared into it.

pub mod fwcfg;
pub mod guest;
pub mod host;
pub mod launch;
pub mod lifetime;
pub mod mounts;
pub mod ownership;
pub mod pin;
pub mod protect;
pub mod qemu;
pub mod qmp;
pub mod ready;
pub mod snapshot;
pub mod virtiofsd;
