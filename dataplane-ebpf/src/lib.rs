#![no_std]
//! Host-side stub so the agent can name this package as a build-dependency
//! (cargo then rebuilds the agent when the programs change). The programs
//! themselves are the `serviceless` binary target in src/main.rs.
