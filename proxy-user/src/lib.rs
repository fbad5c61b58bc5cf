//! The extproxy agent as a library: the binary and the real-kernel tests share it.

pub mod agent;
pub mod diag;
pub mod egress;
pub mod gc;
pub mod host;
pub mod inspect;
pub mod kube;
pub mod loader;
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
pub mod watch;
