//! `meshkv torture`: real members under faults, with histories checked for
//! linearizability. See docs/reliability.md.

pub mod check;
pub mod election;
pub mod lease;
pub mod lock;
pub mod netns;
pub mod ports;
pub mod run;
