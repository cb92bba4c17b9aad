//! How strong a new passphrase must be. A keystore or a sealed node key is an
//! offline target: whoever copies the file can guess at leisure, slowed only by
//! Argon2id. So a passphrase that seals something new must be long and not
//! guessable by the patterns people use (zxcvbn's estimate).

use anyhow::{Result, bail};

/// Fewest characters a new passphrase has.
pub(crate) const MIN_CHARS: usize = 12;

/// Lowest zxcvbn score accepted (0–4): 3 is "safely unguessable, moderate
/// protection from an offline slow-hash attack", which Argon2id is.
const MIN_SCORE: zxcvbn::Score = zxcvbn::Score::Three;

/// Refuses a passphrase too weak to seal `what` with, saying why in one line.
pub(crate) fn check_strength(passphrase: &str, what: &str) -> Result<()> {
    let chars = passphrase.chars().count();
    if chars < MIN_CHARS {
        bail!("the {what} is too short ({chars} characters): use at least {MIN_CHARS}, e.g. four or more random words");
    }
    let estimate = zxcvbn::zxcvbn(passphrase, &[]);
    if estimate.score() < MIN_SCORE {
        let why = estimate
            .feedback()
            .and_then(|f| f.warning())
            .map_or_else(|| "it is easy to guess".to_owned(), |w| w.to_string());
        bail!("the {what} is too weak ({why}): use four or more random words, or a longer passphrase");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_guessable_passphrases_are_refused() {
        for weak in ["x", "password", "passwordpassword", "aaaaaaaaaaaaaaaa", "123456789012"] {
            assert!(check_strength(weak, "keystore passphrase").is_err(), "{weak}");
        }
        for strong in [
            "correct horse battery staple",
            "demo passphrase: not for real records",
            "plinth otter marrow quasar",
        ] {
            assert!(check_strength(strong, "keystore passphrase").is_ok(), "{strong}");
        }
    }
}
