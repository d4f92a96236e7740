//! Everything about the virtual machine: who the guest user is and what is shared into
//! it. The QEMU command line and QMP client join this module with the VM issue.

pub mod guest;
pub mod mounts;
