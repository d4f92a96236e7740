//! Network policy. The rule language lives here now; the gateway that enforces it on
//! the host comes with the network-policy issue.

pub mod policy;
