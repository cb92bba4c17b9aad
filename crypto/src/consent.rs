//! Consent: grants and revocations signed by the patient, and the validity
//! rules that depend only on signed data (never on arrival order), so every
//! node that holds the same items decides the same.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use ciborium::Value;

use crate::canon::{self, Fields};
use crate::id::{ActorId, PatientId, PracticeId, SecretIdentity, Timestamp, verify};
use crate::{Error, Result};

/// Domain tag of a grant signature.
pub const GRANT_TAG: &[u8] = b"medmesh/grant/v1";
/// Domain tag of a revocation signature.
pub const REVOCATION_TAG: &[u8] = b"medmesh/revocation/v1";
/// Largest encoded grant accepted.
pub const MAX_GRANT_BYTES: usize = 16 * 1024;
/// Largest encoded revocation accepted.
pub const MAX_REVOCATION_BYTES: usize = 64 * 1024;
/// How far an envelope's signed created-at may precede a grant's not-before
/// and still count as inside it (clocks of practices disagree).
pub const NOT_BEFORE_SKEW_MS: u64 = 5 * 60 * 1000;

const FORMAT_VERSION: u64 = 1;
/// Most address hints a grant carries.
pub const MAX_ADDRESS_HINTS: usize = 16;
const MAX_HINT_LEN: usize = 256;
const MAX_CUT_ACTORS: usize = 1024;
const MAX_PURPOSE_LEN: usize = 32;

/// A part of a patient's record with its own key lineage; grants name them.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub enum Collection {
    /// Demographics, problems, allergies, procedures, encounters, …
    Core,
    /// Medication requests, statements, dispenses.
    Medications,
    /// Observations, diagnostic reports, specimens.
    Labs,
    /// Document references and binaries.
    Documents,
    /// Appointments.
    Scheduling,
    /// Claims, explanations of benefit, coverage.
    Billing,
    /// Restricted-sensitivity resources; never part of "all".
    Sensitive,
}

impl Collection {
    /// Every collection, in wire order.
    pub const ALL: [Collection; 7] = [
        Self::Core,
        Self::Medications,
        Self::Labs,
        Self::Documents,
        Self::Scheduling,
        Self::Billing,
        Self::Sensitive,
    ];

    /// The name used on the command line and on the wire.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Core => "core",
            Self::Medications => "medications",
            Self::Labs => "labs",
            Self::Documents => "documents",
            Self::Scheduling => "scheduling",
            Self::Billing => "billing",
            Self::Sensitive => "sensitive",
        }
    }

    /// Parses a comma-separated list; `all` means every collection except
    /// `sensitive`, which is granted only by name. Sorted and deduplicated.
    ///
    /// # Errors
    /// [`Error::UnknownCollection`], or an empty list.
    pub fn parse_list(list: &str) -> Result<Vec<Collection>> {
        let mut out = Vec::new();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "all" {
                out.extend(Self::ALL.iter().filter(|c| **c != Self::Sensitive));
            } else {
                out.push(name.parse()?);
            }
        }
        out.sort();
        out.dedup();
        if out.is_empty() {
            return Err(Error::InvalidField {
                field: "collections",
                reason: "empty",
            });
        }
        Ok(out)
    }
}

impl fmt::Display for Collection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Collection {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| Error::UnknownCollection(s.chars().take(32).collect()))
    }
}

/// What a grant lets the grantee do.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Access {
    /// Receive and read the covered collections.
    Read,
    /// Also write to them; the grantee's envelopes are accepted.
    ReadWrite,
}

impl Access {
    fn wire(self) -> u64 {
        match self {
            Self::Read => 0,
            Self::ReadWrite => 1,
        }
    }

    fn from_wire(v: u64) -> Result<Self> {
        match v {
            0 => Ok(Self::Read),
            1 => Ok(Self::ReadWrite),
            _ => Err(Error::InvalidField {
                field: "access",
                reason: "unknown access level",
            }),
        }
    }

    /// `read` or `read-write`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::ReadWrite => "read-write",
        }
    }
}

/// A grant's random 16-byte id, printed as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GrantId(pub [u8; 16]);

impl GrantId {
    /// A fresh random id.
    ///
    /// # Errors
    /// [`Error::Random`].
    pub fn generate() -> Result<Self> {
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(|_| Error::Random)?;
        Ok(Self(id))
    }
}

impl fmt::Display for GrantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for GrantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GrantId({self})")
    }
}

impl FromStr for GrantId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let mut id = [0u8; 16];
        hex::decode_to_slice(s, &mut id).map_err(|_| Error::InvalidField {
            field: "grant id",
            reason: "expected 32 hex digits",
        })?;
        Ok(Self(id))
    }
}

/// What the patient consents to, before signing.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct GrantTerms {
    /// Random id.
    pub id: GrantId,
    /// The patient who grants (and signs).
    pub patient: PatientId,
    /// The practice that receives.
    pub grantee: PracticeId,
    /// Covered collections: explicit, sorted, no duplicates, not empty.
    pub collections: Vec<Collection>,
    /// Read or read-write.
    pub access: Access,
    /// Start of the window.
    pub not_before: Timestamp,
    /// End of the window (exclusive), if any.
    pub expires: Option<Timestamp>,
    /// Why: `treatment`, `emergency`, … (lowercase token).
    pub purpose: String,
    /// When the patient signed.
    pub issued_at: Timestamp,
    /// Multiaddrs of nodes that hold the patient's data.
    pub address_hints: Vec<String>,
}

/// A grant signed by its patient. Only [`Grant::sign`] and [`Grant::decode`]
/// make one, so every `Grant` value carries a verified signature.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Grant {
    terms: GrantTerms,
    encoded: Vec<u8>,
}

fn check_purpose(purpose: &str) -> Result<()> {
    let ok = !purpose.is_empty()
        && purpose.len() <= MAX_PURPOSE_LEN
        && purpose.bytes().all(|b| b.is_ascii_lowercase() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidField {
            field: "purpose",
            reason: "expected a lowercase token such as treatment",
        })
    }
}

fn check_collections(collections: &[Collection]) -> Result<()> {
    if collections.is_empty() {
        return Err(Error::InvalidField {
            field: "collections",
            reason: "empty",
        });
    }
    if collections.windows(2).any(|w| w[0] >= w[1]) {
        return Err(Error::InvalidField {
            field: "collections",
            reason: "not sorted and unique",
        });
    }
    Ok(())
}

impl GrantTerms {
    fn check(&self) -> Result<()> {
        check_collections(&self.collections)?;
        check_purpose(&self.purpose)?;
        if self.expires.is_some_and(|e| e <= self.not_before) {
            return Err(Error::InvalidField {
                field: "expires",
                reason: "not after not-before",
            });
        }
        if self.address_hints.len() > MAX_ADDRESS_HINTS || self.address_hints.iter().any(|h| h.len() > MAX_HINT_LEN) {
            return Err(Error::InvalidField {
                field: "address hints",
                reason: "too many or too long",
            });
        }
        Ok(())
    }

    fn to_value(&self) -> Value {
        Value::Array(vec![
            canon::uint(FORMAT_VERSION),
            canon::bytes(&self.id.0),
            canon::bytes(self.patient.as_bytes()),
            canon::bytes(self.grantee.as_bytes()),
            Value::Array(self.collections.iter().map(|c| canon::text(c.as_str())).collect()),
            canon::uint(self.access.wire()),
            canon::uint(self.not_before),
            canon::opt_uint(self.expires),
            canon::text(&self.purpose),
            canon::uint(self.issued_at),
            Value::Array(self.address_hints.iter().map(|h| canon::text(h)).collect()),
        ])
    }

    fn from_value(value: Value) -> Result<Self> {
        let mut f = Fields::versioned("grant", value, FORMAT_VERSION, 11)?;
        let id = GrantId(f.bytes()?);
        let patient = PatientId::from_bytes(f.bytes()?)?;
        let grantee = PracticeId::from_bytes(f.bytes()?)?;
        let collections = f
            .array(Collection::ALL.len())?
            .into_iter()
            .map(|v| match v {
                Value::Text(t) => t.parse(),
                _ => Err(Error::Malformed {
                    kind: "grant",
                    reason: "collection is not text",
                }),
            })
            .collect::<Result<Vec<_>>>()?;
        let access = Access::from_wire(f.uint()?)?;
        let not_before = f.uint()?;
        let expires = f.opt_uint()?;
        let purpose = f.text(MAX_PURPOSE_LEN)?;
        let issued_at = f.uint()?;
        let address_hints = f
            .array(MAX_ADDRESS_HINTS)?
            .into_iter()
            .map(|v| match v {
                Value::Text(t) if t.len() <= MAX_HINT_LEN => Ok(t),
                _ => Err(Error::Malformed {
                    kind: "grant",
                    reason: "bad address hint",
                }),
            })
            .collect::<Result<Vec<_>>>()?;
        let terms = Self {
            id,
            patient,
            grantee,
            collections,
            access,
            not_before,
            expires,
            purpose,
            issued_at,
            address_hints,
        };
        terms.check()?;
        Ok(terms)
    }
}

/// Encodes `[body, signature]`, the wire form of every signed object but envelopes.
pub(crate) fn signed_wire(body: Value, signature: &[u8; 64]) -> Vec<u8> {
    canon::encode(&Value::Array(vec![body, canon::bytes(signature)]))
}

/// Splits a signed wire object into its body value, the body's canonical
/// bytes (what the signature covers) and the signature.
pub(crate) fn split_signed(
    kind: &'static str,
    bytes: &[u8],
    max: usize,
    max_items: usize,
) -> Result<(Value, Vec<u8>, [u8; 64])> {
    let value = canon::decode(kind, bytes, max, max_items)?;
    let mut f = Fields::new(kind, value, 2)?;
    let body = f.value()?;
    let signature = f.bytes::<64>()?;
    // The whole input was canonical, so this is exactly the signed sub-slice.
    let body_bytes = canon::encode(&body);
    Ok((body, body_bytes, signature))
}

impl Grant {
    /// Signs `terms` with the patient's key.
    ///
    /// # Errors
    /// [`Error::WrongSigner`] when `patient` is not `terms.patient`;
    /// [`Error::InvalidField`] when the terms break a rule.
    pub fn sign(terms: GrantTerms, patient: &SecretIdentity) -> Result<Self> {
        if patient.patient_id() != terms.patient {
            return Err(Error::WrongSigner {
                kind: "grant",
                expected: "the patient it names",
            });
        }
        terms.check()?;
        let body = terms.to_value();
        let signature = patient.sign(GRANT_TAG, &canon::encode(&body));
        Ok(Self {
            encoded: signed_wire(body, &signature),
            terms,
        })
    }

    /// The patient an encoded grant names, read **without** checking its
    /// signature: only for saying who is acting where the claim grants
    /// nothing (a peer whose own key is the named patient is that patient).
    ///
    /// # Errors
    /// Any decoding error.
    pub fn claimed_patient(bytes: &[u8]) -> Result<PatientId> {
        let (body, _, _) = split_signed("grant", bytes, MAX_GRANT_BYTES, 64)?;
        Ok(GrantTerms::from_value(body)?.patient)
    }

    /// Parses and verifies a grant; the signature is checked before any
    /// field is trusted.
    ///
    /// # Errors
    /// Any decoding error, [`Error::BadSignature`].
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let (body, body_bytes, signature) = split_signed("grant", bytes, MAX_GRANT_BYTES, 64)?;
        let terms = GrantTerms::from_value(body)?;
        verify(
            &terms.patient.verifying_key()?,
            GRANT_TAG,
            &body_bytes,
            &signature,
            "grant",
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
    pub fn terms(&self) -> &GrantTerms {
        &self.terms
    }

    /// The grant's id.
    pub fn id(&self) -> GrantId {
        self.terms.id
    }

    /// Whether the grant names `collection`.
    pub fn covers(&self, collection: Collection) -> bool {
        self.terms.collections.contains(&collection)
    }

    /// In force at `now`: not revoked and `now` inside [not-before, expiry).
    pub fn in_force(&self, now: Timestamp, revoked: bool) -> bool {
        !revoked && now >= self.terms.not_before && self.terms.expires.is_none_or(|e| now < e)
    }

    /// Whether a change authored by the grantee under this grant is valid,
    /// judged on signed data alone: its signed created-at inside the window
    /// (with [`NOT_BEFORE_SKEW_MS`] before not-before), and, if the grant
    /// was revoked, its (actor, seq) inside the revocation's cut and its
    /// created-at not after the revocation's issued-at. A revocation that
    /// does not revoke this grant (other grant id or other patient) admits
    /// nothing.
    pub fn admits_change(
        &self,
        collection: Collection,
        created_at: Timestamp,
        actor: &ActorId,
        seq: u64,
        revocation: Option<&Revocation>,
    ) -> bool {
        self.terms.access == Access::ReadWrite
            && self.covers(collection)
            && created_at.saturating_add(NOT_BEFORE_SKEW_MS) >= self.terms.not_before
            && self.terms.expires.is_none_or(|e| created_at < e)
            && actor.belongs_to(self.terms.grantee.as_bytes())
            && revocation.is_none_or(|r| r.revokes(self) && created_at <= r.terms.issued_at && r.cut_admits(actor, seq))
    }
}

/// What the patient signs to end a grant.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct RevocationTerms {
    /// The patient (and signer).
    pub patient: PatientId,
    /// The grant it ends.
    pub grant_id: GrantId,
    /// When the patient signed.
    pub issued_at: Timestamp,
    /// For each of the grantee's actors, the highest change sequence the
    /// node the patient reached had accepted; later changes are invalid.
    pub cut: BTreeMap<ActorId, u64>,
}

/// A revocation signed by its patient. Final.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Revocation {
    terms: RevocationTerms,
    encoded: Vec<u8>,
}

impl RevocationTerms {
    fn to_value(&self) -> Value {
        Value::Array(vec![
            canon::uint(FORMAT_VERSION),
            canon::bytes(self.patient.as_bytes()),
            canon::bytes(&self.grant_id.0),
            canon::uint(self.issued_at),
            Value::Array(
                self.cut
                    .iter()
                    .map(|(actor, seq)| Value::Array(vec![canon::bytes(&actor.0), canon::uint(*seq)]))
                    .collect(),
            ),
        ])
    }

    fn from_value(value: Value) -> Result<Self> {
        let mut f = Fields::versioned("revocation", value, FORMAT_VERSION, 5)?;
        let patient = PatientId::from_bytes(f.bytes()?)?;
        let grant_id = GrantId(f.bytes()?);
        let issued_at = f.uint()?;
        let mut cut = BTreeMap::new();
        let mut previous: Option<ActorId> = None;
        for entry in f.array(MAX_CUT_ACTORS)? {
            let mut e = Fields::new("revocation", entry, 2)?;
            let actor = ActorId(e.bytes()?);
            let seq = e.uint()?;
            // Sorted, unique actors: one encoding per cut.
            if previous.is_some_and(|p| p >= actor) {
                return Err(Error::NonCanonical { kind: "revocation" });
            }
            previous = Some(actor);
            cut.insert(actor, seq);
        }
        Ok(Self {
            patient,
            grant_id,
            issued_at,
            cut,
        })
    }
}

impl Revocation {
    /// Signs `terms` with the patient's key.
    ///
    /// # Errors
    /// [`Error::WrongSigner`], or a cut over `MAX_CUT_ACTORS` actors.
    pub fn sign(terms: RevocationTerms, patient: &SecretIdentity) -> Result<Self> {
        if patient.patient_id() != terms.patient {
            return Err(Error::WrongSigner {
                kind: "revocation",
                expected: "the patient it names",
            });
        }
        if terms.cut.len() > MAX_CUT_ACTORS {
            return Err(Error::InvalidField {
                field: "cut",
                reason: "too many actors",
            });
        }
        let body = terms.to_value();
        let signature = patient.sign(REVOCATION_TAG, &canon::encode(&body));
        Ok(Self {
            encoded: signed_wire(body, &signature),
            terms,
        })
    }

    /// The patient an encoded revocation names, read **without** checking
    /// its signature ([`Grant::claimed_patient`]).
    ///
    /// # Errors
    /// Any decoding error.
    pub fn claimed_patient(bytes: &[u8]) -> Result<PatientId> {
        let (body, _, _) = split_signed("revocation", bytes, MAX_REVOCATION_BYTES, 8 + 3 * MAX_CUT_ACTORS)?;
        Ok(RevocationTerms::from_value(body)?.patient)
    }

    /// Parses and verifies a revocation.
    ///
    /// # Errors
    /// Any decoding error, [`Error::BadSignature`].
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let (body, body_bytes, signature) =
            split_signed("revocation", bytes, MAX_REVOCATION_BYTES, 8 + 3 * MAX_CUT_ACTORS)?;
        let terms = RevocationTerms::from_value(body)?;
        verify(
            &terms.patient.verifying_key()?,
            REVOCATION_TAG,
            &body_bytes,
            &signature,
            "revocation",
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
    pub fn terms(&self) -> &RevocationTerms {
        &self.terms
    }

    /// The revoked grant.
    pub fn grant_id(&self) -> GrantId {
        self.terms.grant_id
    }

    /// Whether change `seq` of `actor` lies inside the cut.
    pub fn cut_admits(&self, actor: &ActorId, seq: u64) -> bool {
        self.terms.cut.get(actor).is_some_and(|max| seq <= *max)
    }

    /// Whether this revocation ends `grant` (same patient and grant id).
    pub fn revokes(&self, grant: &Grant) -> bool {
        self.terms.grant_id == grant.id() && self.terms.patient == grant.terms().patient
    }
}

/// The cut a revocation carries, from the changes of the revoked grantee
/// that a node holds, each as (collection, actor, seq): per actor, the
/// highest seq n such that its changes 1..=n of one collection are all
/// held (the highest over collections, since a cut names actors only). A
/// change whose predecessors are missing, such as one claiming seq 2^62
/// for a fresh actor, inflates nothing; an actor without seq 1 is left out.
pub fn revocation_cut(held: impl IntoIterator<Item = (Collection, ActorId, u64)>) -> BTreeMap<ActorId, u64> {
    let mut seqs: BTreeMap<(ActorId, Collection), Vec<u64>> = BTreeMap::new();
    for (collection, actor, seq) in held {
        seqs.entry((actor, collection)).or_default().push(seq);
    }
    let mut cut: BTreeMap<ActorId, u64> = BTreeMap::new();
    for ((actor, _), mut list) in seqs {
        list.sort_unstable();
        let mut contiguous = 0u64;
        for seq in list {
            if seq == contiguous.saturating_add(1) {
                contiguous = seq;
            } else if seq > contiguous {
                break;
            }
        }
        if contiguous > 0 {
            let max = cut.entry(actor).or_insert(0);
            *max = (*max).max(contiguous);
        }
    }
    cut
}
