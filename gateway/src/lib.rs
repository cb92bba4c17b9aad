//! medmesh-gateway: the HTTP/FHIR gateway for local apps. Work in progress.

pub mod fhir;
