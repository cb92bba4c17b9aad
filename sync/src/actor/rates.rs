//! The token-bucket rates of sync's limits.

use medmesh_node::rate::Rate;

use crate::config::Limits;

/// Inbound requests of one peer.
pub(crate) fn requests(limits: &Limits) -> Rate {
    Rate::per_second(limits.requests_per_second, limits.request_burst)
}

/// Dials made on behalf of one source.
pub(crate) fn dials_per_source(limits: &Limits) -> Rate {
    Rate::per_minute(limits.dials_per_minute_per_source, limits.dial_burst_per_source)
}

/// Dials made on behalf of any remote input.
pub(crate) fn dials(limits: &Limits) -> Rate {
    Rate::per_minute(limits.dials_per_minute, limits.dial_burst)
}
