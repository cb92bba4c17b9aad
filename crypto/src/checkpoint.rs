//! Audit checkpoints: a node's signed statement "my audit log holds `seq`
//! entries and entry `seq` hashes to `head`" (DESIGN §8, issue 15). The
//! node's audit log is a hash chain, so one checkpoint commits to every
//! entry up to `seq`; whoever keeps a checkpoint (the node, apart from its
//! log; the patient's CLI, in its keystore) can later tell a log that lost
//! entries (a lower head) or was rewritten (another hash at `seq`).

use ciborium::Value;

use crate::canon::{self, Fields};
use crate::consent::{signed_wire, split_signed};
use crate::id::verify;
use crate::{Error, PracticeId, Result, SecretIdentity, Timestamp};

/// Domain tag of checkpoint signatures.
pub const AUDIT_CHECKPOINT_TAG: &[u8] = b"medmesh/audit-checkpoint/v1";

/// Largest encoded checkpoint accepted (they are ~150 bytes).
pub const MAX_AUDIT_CHECKPOINT_BYTES: usize = 512;

const FORMAT_VERSION: u64 = 1;

/// What a checkpoint states.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct AuditCheckpointTerms {
    /// The node whose log it is (and whose key signs).
    pub node: PracticeId,
    /// How many entries the log holds (its last entry's seq; 0 when empty).
    pub seq: u64,
    /// The hash of entry `seq` (32 zero bytes when the log is empty).
    pub head: [u8; 32],
    /// When the node signed it (ms since the Unix epoch).
    pub time: Timestamp,
}

impl AuditCheckpointTerms {
    fn to_value(self) -> Value {
        Value::Array(vec![
            canon::uint(FORMAT_VERSION),
            canon::bytes(self.node.as_bytes()),
            canon::uint(self.seq),
            canon::bytes(&self.head),
            canon::uint(self.time),
        ])
    }

    fn from_value(value: Value) -> Result<Self> {
        let mut f = Fields::versioned("audit checkpoint", value, FORMAT_VERSION, 5)?;
        Ok(Self {
            node: PracticeId::from_bytes(f.bytes()?)?,
            seq: f.uint()?,
            head: f.bytes()?,
            time: f.uint()?,
        })
    }
}

/// A checkpoint whose signature verified (built only by signing or by
/// decoding with the signature checked).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct AuditCheckpoint {
    terms: AuditCheckpointTerms,
    encoded: Vec<u8>,
}

impl AuditCheckpoint {
    /// Signs `terms` with the node's key.
    ///
    /// # Errors
    /// [`Error::WrongSigner`] when `node` is not `terms.node`.
    pub fn sign(terms: AuditCheckpointTerms, node: &SecretIdentity) -> Result<Self> {
        if node.practice_id()? != terms.node {
            return Err(Error::WrongSigner {
                kind: "audit checkpoint",
                expected: "the node it names",
            });
        }
        let body = terms.to_value();
        let signature = node.sign(AUDIT_CHECKPOINT_TAG, &canon::encode(&body));
        Ok(Self {
            encoded: signed_wire(body, &signature),
            terms,
        })
    }

    /// Parses and verifies a checkpoint.
    ///
    /// # Errors
    /// Any decoding error, [`Error::BadSignature`].
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let (body, body_bytes, signature) = split_signed("audit checkpoint", bytes, MAX_AUDIT_CHECKPOINT_BYTES, 16)?;
        let terms = AuditCheckpointTerms::from_value(body)?;
        verify(
            &crate::Principal::Practice(terms.node).verifying_key()?,
            AUDIT_CHECKPOINT_TAG,
            &body_bytes,
            &signature,
            "audit checkpoint",
        )?;
        Ok(Self {
            terms,
            encoded: bytes.to_vec(),
        })
    }

    /// The canonical signed bytes.
    pub fn encoded(&self) -> &[u8] {
        &self.encoded
    }

    /// The signed terms.
    pub fn terms(&self) -> &AuditCheckpointTerms {
        &self.terms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_and_decodes_and_refuses_another_signer() {
        let node = SecretIdentity::from_seed(&[9; 32]);
        let terms = AuditCheckpointTerms {
            node: node.practice_id().unwrap(),
            seq: 42,
            head: [7; 32],
            time: 1_700_000_000_000,
        };
        let cp = AuditCheckpoint::sign(terms, &node).unwrap();
        assert_eq!(AuditCheckpoint::decode(cp.encoded()).unwrap(), cp);
        let other = SecretIdentity::from_seed(&[8; 32]);
        assert!(matches!(
            AuditCheckpoint::sign(terms, &other),
            Err(Error::WrongSigner { .. })
        ));
    }

    #[test]
    fn a_keystore_keeps_one_checkpoint_per_node() {
        let node = SecretIdentity::from_seed(&[9; 32]);
        let at = |seq| {
            AuditCheckpoint::sign(
                AuditCheckpointTerms {
                    node: node.practice_id().unwrap(),
                    seq,
                    head: [seq as u8; 32],
                    time: 1,
                },
                &node,
            )
            .unwrap()
        };
        let params = crate::KdfParams {
            m_cost_kib: 64,
            t_cost: 1,
            p_cost: 1,
        };
        let mut ks = crate::Keystore::new(SecretIdentity::from_seed(&[1; 32]), params);
        ks.remember_audit_checkpoint(at(3));
        ks.remember_audit_checkpoint(at(5));
        let file = ks.seal_with(b"pass", [0; 16], [0; 24]).unwrap();
        let back = crate::Keystore::unseal(&file, b"pass").unwrap();
        assert_eq!(back.audit_checkpoints, vec![at(5)]);
        assert_eq!(back.audit_checkpoint(&node.practice_id().unwrap()), Some(&at(5)));
    }
}
