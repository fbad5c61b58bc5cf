//! The extproxy agent as a library: the binary and the real-kernel tests share it.

pub mod agent;
pub mod bpffs;
pub mod diag;
pub mod dns;
pub mod egress;
pub mod gc;
pub mod health;
pub mod host;
pub mod inspect;
pub mod kube;
pub mod loader;
pub mod lock;
pub mod manifest;
pub mod maps;
pub mod metrics;
pub mod names;
pub mod objects;
pub mod pins;
pub mod podlinks;
pub mod reconcile;
pub mod refusals;
pub mod snat;
pub mod state;
pub mod translate;
pub mod upgrade;
pub mod watch;
