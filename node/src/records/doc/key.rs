//! Resource keys `"{resourceType}/{id}"`: building, splitting and checking them.

use crate::records::error::{Error, Result};

/// Builds a resource key `"{resourceType}/{id}"`, checking both parts.
///
/// # Errors
/// [`Error::InvalidKey`] when the type is not `[A-Z][A-Za-z]*` or the id is not a FHIR
/// id (`[A-Za-z0-9-.]{1,64}`).
pub fn resource_key(resource_type: &str, id: &str) -> Result<String> {
    check_type(resource_type)?;
    check_id(id)?;
    Ok(format!("{resource_type}/{id}"))
}

/// Splits a resource key into (type, id), checking it.
///
/// # Errors
/// [`Error::InvalidKey`] as for [`resource_key`].
pub fn split_key(key: &str) -> Result<(&str, &str)> {
    let (t, id) = key.split_once('/').ok_or(Error::InvalidKey {
        reason: "expected {resourceType}/{id}",
    })?;
    check_type(t)?;
    check_id(id)?;
    Ok((t, id))
}

fn check_type(t: &str) -> Result<()> {
    let mut chars = t.chars();
    let ok =
        chars.next().is_some_and(|c| c.is_ascii_uppercase()) && chars.all(|c| c.is_ascii_alphabetic()) && t.len() <= 64;
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidKey {
            reason: "resource type must be [A-Z][A-Za-z]*",
        })
    }
}

/// Whether `id` is a FHIR logical id: `[A-Za-z0-9-.]{1,64}`.
pub(crate) fn is_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn check_id(id: &str) -> Result<()> {
    if is_id(id) {
        Ok(())
    } else {
        Err(Error::InvalidKey {
            reason: "id must be [A-Za-z0-9-.]{1,64}",
        })
    }
}
