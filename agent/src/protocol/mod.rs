//! Protocol handlers. Each takes an accepted loop connection whose identity and
//! original destination are known, and relays it upstream while recording.
//!
//! `http` terminates HTTP/1.1 and decides each request; `postgres` answers
//! the start-up and logs in upstream with the stored credential, then relays;
//! `tcp` relays bytes. Targets registered with a protocol that has no handler
//! yet (ssh, https, kubernetes) are relayed as raw TCP (the agent says so at
//! start-up).
pub mod http;
pub mod postgres;
pub mod tcp;
