//! Base images: the immutable, prepared guest images under `~/.vibebox/images/`.

pub mod digest;
pub mod qcow2;
