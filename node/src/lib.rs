//! medmesh-node: what a node knows (storage, records, consent, audit). Work in progress.
pub mod records;
