//! Delivery of a patient's consent items, as a node reports it (issue 16):
//! per target practice, "delivered" or "pending since when and why". One
//! reading of a node's [`OutboxReport`], shared by the patient's commands
//! and the gateway's `/api/outbox`.

use medmesh_crypto::PatientId;
use medmesh_sync::wire::OutboxReport;
use medmesh_sync::{ItemId, PeerId};
use serde_json::{Value, json};

/// Where the delivery of some consent items to one peer stands.
#[derive(Clone, PartialEq, Eq, Debug)]
pub(crate) enum Delivery {
    /// The node owes the peer none of them: delivered (or never owed).
    Delivered,
    /// The node still owes the peer some of them.
    Pending {
        /// When the oldest debt arose (ms since the Unix epoch).
        since: u64,
        /// Most tries of one of them that failed (0: the first is under way).
        attempts: u32,
        /// When the next try is due (ms since the Unix epoch).
        next_at: u64,
        /// Why the last try failed; empty before the first failure.
        error: String,
    },
    /// The node does not hold the item: it cannot tell.
    Unknown,
}

impl Delivery {
    /// Of the items `only` (all of the patient's when `None`) to `peer`,
    /// as `report` shows them.
    pub(crate) fn of(report: &OutboxReport, peer: PeerId, only: Option<&[ItemId]>) -> Self {
        let owed = report
            .owed
            .iter()
            .filter(|o| o.peer == peer && only.is_none_or(|items| items.contains(&o.item)));
        let mut pending: Option<Self> = None;
        for o in owed {
            pending = Some(match pending {
                None => Self::Pending {
                    since: o.since,
                    attempts: o.attempts,
                    next_at: o.next_at,
                    error: o.last_error.clone(),
                },
                Some(Self::Pending {
                    since,
                    attempts,
                    next_at,
                    error,
                }) => {
                    // The most-tried debt says best why delivery fails.
                    let (error, attempts) = if o.attempts > attempts {
                        (o.last_error.clone(), o.attempts)
                    } else {
                        (error, attempts)
                    };
                    Self::Pending {
                        since: since.min(o.since),
                        attempts,
                        next_at: next_at.min(o.next_at),
                        error,
                    }
                }
                Some(other) => other,
            });
        }
        pending.unwrap_or(Self::Delivered)
    }

    /// Whether the node has finished its first try (or delivered): a
    /// pending debt not tried yet may still go through at once.
    pub(crate) fn settled(&self) -> bool {
        !matches!(self, Self::Pending { attempts: 0, .. })
    }

    /// The JSON object for `peer`: `status` is `delivered`, `pending` or
    /// `unknown`; a pending one adds `since`, `since_at`, `attempts`,
    /// `next_at` and `error`.
    pub(crate) fn to_json(&self, peer: PeerId) -> Value {
        match self {
            Self::Delivered => json!({"peer": peer.to_string(), "status": "delivered"}),
            Self::Unknown => json!({"peer": peer.to_string(), "status": "unknown"}),
            Self::Pending {
                since,
                attempts,
                next_at,
                ..
            } => json!({
                "peer": peer.to_string(),
                "status": "pending",
                "since": since,
                "since_at": instant(*since),
                "attempts": attempts,
                "next_at": next_at,
                "error": self.why(),
            }),
        }
    }

    /// One line for people: "delivered", or `pending since <time>: <why>`.
    pub(crate) fn text(&self) -> String {
        match self {
            Self::Delivered => "delivered".to_owned(),
            Self::Unknown => "unknown (this node does not hold it)".to_owned(),
            Self::Pending { since, attempts, .. } => format!(
                "pending since {}: {}{}",
                instant(*since),
                self.why(),
                match attempts {
                    0 => String::new(),
                    1 => " (1 try; the node keeps trying)".to_owned(),
                    n => format!(" ({n} tries; the node keeps trying)"),
                }
            ),
        }
    }

    fn why(&self) -> String {
        match self {
            Self::Pending { attempts: 0, .. } => "the first try is under way".to_owned(),
            Self::Pending { error, .. } if error.is_empty() => "the last try failed".to_owned(),
            Self::Pending { error, .. } => error.clone(),
            _ => String::new(),
        }
    }
}

/// The whole report as JSON (the gateway's `/api/outbox`).
pub(crate) fn report_json(patient: &PatientId, report: &OutboxReport) -> Value {
    let owed: Vec<Value> = report
        .owed
        .iter()
        .map(|o| {
            json!({
                "item": o.item.to_string(),
                "peer": o.peer.to_string(),
                "since": o.since,
                "since_at": instant(o.since),
                "attempts": o.attempts,
                "next_at": o.next_at,
                "last_error": o.last_error,
            })
        })
        .collect();
    let held: Vec<String> = report.held.iter().map(ToString::to_string).collect();
    json!({
        "patient": patient.to_string(),
        "settling": report.settling,
        "owed": owed,
        "held": held,
    })
}

fn instant(ms: u64) -> String {
    medmesh_node::records::format_instant(i64::try_from(ms).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use medmesh_sync::wire::OwedItem;

    use super::*;

    fn owed(peer: PeerId, item: u8, since: u64, attempts: u32, error: &str) -> OwedItem {
        OwedItem {
            item: ItemId([item; 32]),
            peer,
            since,
            attempts,
            next_at: since + 2000,
            last_error: error.to_owned(),
        }
    }

    #[test]
    fn a_peer_owed_some_of_the_items_is_pending_with_the_most_tried_reason() {
        let (b, c) = (PeerId::random(), PeerId::random());
        let report = OutboxReport {
            settling: false,
            owed: vec![
                owed(b, 1, 5_000, 1, "dial refused"),
                owed(b, 2, 4_000, 3, "timed out"),
                owed(c, 9, 1_000, 7, "elsewhere"),
            ],
            held: vec![],
        };
        let mine = [ItemId([1; 32]), ItemId([2; 32])];
        let d = Delivery::of(&report, b, Some(&mine));
        assert_eq!(
            d,
            Delivery::Pending {
                since: 4_000,
                attempts: 3,
                next_at: 6_000,
                error: "timed out".into()
            }
        );
        assert!(d.settled());
        assert!(d.text().starts_with("pending since ") && d.text().contains("timed out"));
        assert_eq!(Delivery::of(&report, c, Some(&mine)), Delivery::Delivered);
        assert!(matches!(
            Delivery::of(&report, c, None),
            Delivery::Pending { attempts: 7, .. }
        ));
        let untried = OutboxReport {
            owed: vec![owed(b, 1, 5_000, 0, "")],
            ..report
        };
        assert!(!Delivery::of(&untried, b, None).settled());
    }
}
