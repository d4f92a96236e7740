//! Network policy: the rule language, and the parts of the gateway that enforce it on
//! the host (pure parsers and checks first; each takes the guest's bytes as hostile).

pub mod decide;
pub mod device;
pub mod dhcp;
pub mod dns;
pub mod frame;
pub mod gateway;
pub mod http;
pub mod netlog;
pub mod policy;
pub mod ranges;
pub mod sni;
pub mod upstream;
