//! Protocol handlers. Each takes an accepted loop connection whose identity and
//! original destination are known, and relays it upstream while recording.
//!
//! Only the raw TCP handler exists so far; targets registered with another
//! protocol are relayed by it until their handler lands (the agent says so at
//! start-up).
pub mod tcp;
