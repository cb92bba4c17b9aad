//! Benchmarks for the record model (placeholder, filled in below).
#![allow(missing_docs)]
fn main() {}
