//! The client side of the protocol: the steps a node takes to get what its
//! peers may send it (pull, snapshot transfer, reconciliation, anti-entropy).

pub(crate) mod anti_entropy;
pub(crate) mod pull;
pub(crate) mod reconcile;
pub(crate) mod transfer;
