//! FHIR R4 views of what is not a FHIR resource in the node: a consent grant
//! as a `Consent`, an audit entry as an `AuditEvent`. Read-only, built on
//! demand (`GET /fhir/Consent`, `GET /fhir/AuditEvent`); never stored.

use medmesh_crypto::{Access, Grant};
use medmesh_node::audit::{Action, ActorKind, AuditEntry};
use serde_json::{Value, json};

fn instant(ms: u64) -> String {
    medmesh_node::records::format_instant(i64::try_from(ms).unwrap_or(i64::MAX))
}

/// A grant as a FHIR R4 Consent (a read-only view of the consent registry):
/// `revoked` when the node holds a revocation of it, its status judged at `now`.
pub fn consent(grant: &Grant, revoked: bool, now: u64) -> Value {
    let t = grant.terms();
    let status = if revoked {
        "inactive"
    } else if grant.in_force(now, false) {
        "active"
    } else if now < t.not_before {
        "proposed"
    } else {
        "inactive"
    };
    let mut period = json!({ "start": instant(t.not_before) });
    if let Some(end) = t.expires {
        period["end"] = json!(instant(end));
    }
    let purpose = match t.purpose.as_str() {
        "emergency" => "ETREAT",
        "payment" => "HPAYMT",
        "operations" => "HOPERAT",
        "research" => "HRESCH",
        _ => "TREAT",
    };
    let actions: Vec<Value> = match t.access {
        Access::Read => vec![
            json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentaction", "code": "access"}]}),
        ],
        Access::ReadWrite => vec![
            json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentaction", "code": "access"}]}),
            json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentaction", "code": "correct"}]}),
        ],
    };
    json!({
        "resourceType": "Consent",
        "id": grant.id().to_string(),
        "status": status,
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"identifier": {"system": "urn:ietf:rfc:3986", "value": t.patient.to_string()}},
        "dateTime": instant(t.issued_at),
        "policyRule": {"text": "medmesh consent grant, signed by the patient (ed25519)"},
        "provision": {
            "type": "permit",
            "period": period,
            "actor": [{
                "role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}]},
                "reference": {"identifier": {"system": "urn:medmesh:peer-id", "value": t.grantee.to_string()}}
            }],
            "action": actions,
            "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": purpose}],
            "class": t.collections.iter().map(|c| json!({"system": "urn:medmesh:collection", "code": c.as_str()})).collect::<Vec<_>>(),
        }
    })
}

/// An audit entry as a FHIR R4 AuditEvent, observed by the node `node_peer`.
pub fn audit_event(entry: &AuditEntry, node_peer: &str) -> Value {
    let (action, subtype) = match entry.action {
        Action::Read => ("R", "read"),
        Action::Write => ("U", "write"),
        Action::Receive => ("C", "receive"),
        Action::Disclose => ("E", "disclose"),
        Action::Grant => ("C", "grant"),
        Action::Revoke => ("D", "revoke"),
        Action::KeyShare => ("C", "key-share"),
        Action::Reject => ("E", "reject"),
        Action::Exclude => ("D", "exclude"),
        Action::Quarantine => ("E", "quarantine"),
    };
    let who_system = match entry.actor_kind {
        ActorKind::LocalApp => "urn:medmesh:app",
        ActorKind::Peer | ActorKind::Node => "urn:medmesh:peer-id",
        ActorKind::Patient => "urn:ietf:rfc:3986",
    };
    let outcome = if entry.outcome == "ok" { "0" } else { "4" };
    let mut event = json!({
        "resourceType": "AuditEvent",
        "id": format!("audit-{}", entry.seq),
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest"},
        "subtype": [{"system": "urn:medmesh:audit-action", "code": subtype}],
        "action": action,
        "recorded": instant(entry.time),
        "outcome": outcome,
        "outcomeDesc": entry.outcome,
        "agent": [{
            "requestor": true,
            "who": {"identifier": {"system": who_system, "value": entry.actor_id}}
        }],
        "source": {"observer": {"identifier": {"system": "urn:medmesh:peer-id", "value": node_peer}}},
    });
    let mut entities: Vec<Value> = entry
        .items
        .iter()
        .map(|id| json!({"what": {"identifier": {"system": "urn:medmesh:item-id", "value": id.to_string()}}}))
        .collect();
    if let Some(patient) = &entry.patient {
        entities.push(json!({"what": {"identifier": {"system": "urn:ietf:rfc:3986", "value": patient.to_string()}}, "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1"}}));
    }
    if let Some(grant) = &entry.grant {
        entities.push(json!({"what": {"identifier": {"system": "urn:medmesh:grant-id", "value": grant.to_string()}}}));
    }
    if !entities.is_empty() {
        event["entity"] = Value::Array(entities);
    }
    event
}
