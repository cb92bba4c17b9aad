//! The gateway's bearer token: made at node init, stored 0600, compared in
//! constant time.

use std::fmt;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A bearer token. Only its SHA-256 is kept, so the secret itself is not
/// held in the server's memory and comparisons take the same time whatever
/// the length or content of the candidate.
#[derive(Clone)]
pub struct Token {
    digest: [u8; 32],
}

impl Token {
    /// From the token text.
    pub fn new(secret: &str) -> Self {
        Self {
            digest: Sha256::digest(secret.as_bytes()).into(),
        }
    }

    /// Whether the `Authorization` header value carries this token. The
    /// scheme is matched without regard to case (RFC 9110 §11.1: `bearer`
    /// is `Bearer`), as client libraries send it either way.
    pub fn accepts(&self, authorization: Option<&str>) -> bool {
        let Some((scheme, candidate)) = authorization.and_then(|h| h.trim_start().split_once(' ')) else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case("bearer") {
            return false;
        }
        let digest: [u8; 32] = Sha256::digest(candidate.trim().as_bytes()).into();
        self.digest.ct_eq(&digest).into()
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_the_exact_bearer_token() {
        let token = Token::new("s3cret");
        assert!(token.accepts(Some("Bearer s3cret")));
        assert!(token.accepts(Some("bearer s3cret")));
        assert!(token.accepts(Some("BEARER s3cret")));
        assert!(!token.accepts(Some("Bearers3cret")));
        assert!(!token.accepts(Some("bearer")));
        assert!(!token.accepts(Some("Bearer s3cret2")));
        assert!(!token.accepts(Some("Basic s3cret")));
        assert!(!token.accepts(Some("s3cret")));
        assert!(!token.accepts(None));
        assert!(!format!("{token:?}").contains("s3cret"));
    }
}
