//! The use cases over sessions: open (find-or-create, approve), delete, prune.
//! One path for each, so that every way of removing a session stops its VM first,
//! outside every global lock, and removes state only once the VM is gone.

pub mod agents;
pub mod attach;
pub mod delete;
pub mod fetch;
pub mod open;
pub mod project;
pub mod protected;
pub mod tasks;

pub use crate::store::SessionId;
