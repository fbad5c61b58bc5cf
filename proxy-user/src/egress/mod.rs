//! Cluster egress: one address per IP family that every flow of a Service leaves from, whichever
//! node its client is on (see DESIGN.md, "Cluster egress").

pub mod config;
pub mod lease;
