//! The record model's errors are variants of the crate's one [`Error`]
//! (`crate::error`); re-exported here so the model reads on its own.

pub use crate::error::{Error, Result};
