//! Placeholder; the bench agent is being written.
fn main() {}
