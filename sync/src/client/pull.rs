//! Pulling a peer's log page by page.

use libp2p::PeerId;
use medmesh_crypto::PatientId;
use tracing::{debug, info};

use crate::backend::{Backend, Cursor, ItemKind};
use crate::client::reconcile::reconcile;
use crate::client::transfer::{TransferFor, TransferOutcome, transfer};
use crate::client::{Client, Link, unexpected};
use crate::wire::{MAX_OFFERS_PER_PAGE, Offer, Request, Response};
use crate::{Error, Result, SyncReport};

/// Pages one pull takes at most; the rest comes with the next pull, from the
/// cursor stored after each page. A peer that always answers `more` with
/// progress cannot keep a pull (and its slot) busy for ever.
pub(crate) const MAX_PAGES_PER_PULL: u64 = 4096;

/// Pulls pages from `peer` until its log is exhausted (or
/// [`MAX_PAGES_PER_PULL`] pages came); the cursor is stored only after the
/// page it covers was ingested.
///
/// Snapshot offers collected on the way are taken at the end, when the
/// pages have brought the grants and key shares they need; a collection
/// whose transfer fails is reconciled instead (its envelopes were left out
/// of the pages).
pub(crate) async fn pull<B: Backend, L: Link>(client: &Client<B, L>, peer: PeerId) -> Result<SyncReport> {
    let mut report = SyncReport::default();
    let mut offers: Vec<Offer> = Vec::new();
    // Patients of pages that left envelopes pending: the peer holds them,
    // so it may well hold the grant they wait for — one this node scanned
    // past while its own grant had not started, or whose reconciliation
    // failed. Reconciling with the peer asks for it again.
    let mut waiting: Vec<PatientId> = Vec::new();
    let mut cursor = client.backend.cursor(&peer)?.unwrap_or_default();
    // Pages that offer a snapshot transfer carry no envelopes of it: the
    // stored cursor stays before the first of them until the transfers (or
    // the reconciliations replacing them) are done, so a restart in between
    // pulls those pages again instead of skipping their envelopes for good.
    let mut held = false;
    loop {
        let limit = client.page_limit;
        let snapshots = (client.snapshot_min > 0).then(|| offers.iter().map(|o| o.source).collect());
        let response = client
            .request(
                peer,
                Request::Pull {
                    cursor,
                    limit,
                    snapshots,
                },
            )
            .await?;
        let (instance, next, more, items, page_offers) = match response {
            Response::Page {
                instance,
                next,
                more,
                items,
                offers,
            } => (instance, next, more, items, offers),
            other => return Err(unexpected(peer, "pull", &other)),
        };
        if items.len() > limit as usize {
            return Err(Error::Wire {
                message: "page",
                reason: "more items than the limit asked for",
            });
        }
        if !page_offers.is_empty() && client.snapshot_min == 0 {
            return Err(Error::Wire {
                message: "page",
                reason: "snapshot offers to a puller that takes none",
            });
        }
        for offer in page_offers {
            if offers.contains(&offer) {
                continue;
            }
            if offers.len() < MAX_OFFERS_PER_PAGE {
                offers.push(offer);
            } else {
                // Over what one pull takes (the request lists at most this
                // many): the page left the transfer's envelopes out all the
                // same, so the patient is reconciled instead — else the
                // cursor would move past them for good.
                waiting.push(offer.patient);
            }
        }
        let same_instance = instance == cursor.instance;
        if same_instance && next < cursor.seq {
            return Err(Error::Wire {
                message: "page",
                reason: "cursor went backwards",
            });
        }
        if !same_instance {
            // A store is restored or rebuilt between pulls, not during one:
            // a peer whose instance changes again mid-pull would reset the
            // cursor on every page and never let the pull end.
            if report.pages > 0 {
                return Err(Error::Wire {
                    message: "page",
                    reason: "store instance changed within one pull",
                });
            }
            info!(%peer, %instance, "peer store instance changed; cursor reset");
        }
        report.pages += 1;
        report.received += items.len() as u64;
        // Who the page's envelopes belong to, read without verifying (the
        // ingest verifies; this only picks whom to reconcile).
        let mut envelope_patients: Vec<PatientId> = Vec::new();
        for item in items.iter().filter(|i| i.kind == ItemKind::Envelope) {
            if let Ok(h) = medmesh_crypto::CompactHeader::of_stored_envelope(&item.bytes)
                && !envelope_patients.contains(&h.header().patient)
            {
                envelope_patients.push(h.header().patient);
            }
        }
        let ingested = client.ingest(peer, items).await?;
        if ingested.pending > 0 {
            waiting.extend(envelope_patients);
        }
        report.ingest.add(ingested);
        let new = Cursor { instance, seq: next };
        held |= !offers.is_empty();
        if !held {
            client.backend.set_cursor(&peer, new).await?;
        }
        // Stop on the server's word, or when it makes no progress (a peer
        // that lies about `more` must not keep us looping).
        let stalled = same_instance && next == cursor.seq;
        cursor = new;
        if !more || stalled {
            break;
        }
        if report.pages >= MAX_PAGES_PER_PULL {
            debug!(%peer, pages = report.pages, "page budget of one pull spent; the rest comes with the next pull");
            break;
        }
    }
    let mut to_reconcile = waiting;
    for offer in offers {
        match transfer(
            client,
            peer,
            offer.patient,
            offer.collection,
            TransferFor::Offer(offer.source),
        )
        .await
        {
            Ok((r, TransferOutcome::Complete)) => report.add(r),
            Ok((r, outcome)) => {
                debug!(%peer, collection = %offer.collection, ?outcome, "snapshot transfer incomplete; reconciling");
                report.add(r);
                to_reconcile.push(offer.patient);
            }
            Err(e) => {
                debug!(%peer, collection = %offer.collection, cause = %e, "snapshot transfer failed; reconciling");
                to_reconcile.push(offer.patient);
            }
        }
    }
    to_reconcile.sort_unstable();
    to_reconcile.dedup();
    for patient in to_reconcile {
        report.add(reconcile(client, peer, patient).await?);
    }
    if held {
        client.backend.set_cursor(&peer, cursor).await?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::BTreeSet;
    use std::sync::{Arc, Mutex};

    use libp2p::PeerId;
    use medmesh_crypto::{Collection, PatientId, SecretIdentity};

    use crate::backend::{Cursor, InstanceId};
    use crate::client::{Client, Link};
    use crate::config::Config;
    use crate::memory::MemoryBackend;
    use crate::wire::{MAX_OFFERS_PER_PAGE, Offer, Request, Response};

    /// A peer whose one page offers more transfers than a pull takes, has
    /// none to give when asked, and lists nothing in summaries; it keeps
    /// the requests it got.
    struct Offering {
        offers: Vec<Offer>,
        asked: Mutex<Vec<Request>>,
    }

    impl Link for Offering {
        async fn request(&self, _peer: PeerId, request: Request) -> crate::Result<Response> {
            self.asked.lock().unwrap().push(request.clone());
            Ok(match request {
                Request::Pull { .. } => Response::Page {
                    instance: InstanceId([7; 16]),
                    next: 1,
                    more: false,
                    items: Vec::new(),
                    offers: self.offers.clone(),
                },
                Request::Snapshot { .. } => Response::Snapshot(None),
                Request::Summary { .. } => Response::Summary {
                    consent: Vec::new(),
                    collections: Vec::new(),
                },
                other => panic!("unexpected request {other:?}"),
            })
        }
    }

    /// A peer that answers every page with `more`: with a new store instance
    /// each time, or with progress for ever.
    struct Endless {
        new_instance_each_page: bool,
        pages: Mutex<u64>,
    }

    impl Link for Endless {
        async fn request(&self, _peer: PeerId, request: Request) -> crate::Result<Response> {
            let Request::Pull { cursor, .. } = request else {
                panic!("unexpected request {request:?}");
            };
            let mut pages = self.pages.lock().unwrap();
            *pages += 1;
            let instance = if self.new_instance_each_page {
                InstanceId(u128::from(*pages).to_be_bytes())
            } else {
                InstanceId([7; 16])
            };
            Ok(Response::Page {
                instance,
                next: cursor.seq + 1,
                more: true,
                items: Vec::new(),
                offers: Vec::new(),
            })
        }
    }

    fn endless_client(new_instance_each_page: bool) -> (Client<MemoryBackend, Endless>, PeerId) {
        let link = Endless {
            new_instance_each_page,
            pages: Mutex::new(0),
        };
        let me = SecretIdentity::generate().unwrap().practice_id().unwrap().peer_id();
        let peer = SecretIdentity::generate().unwrap().practice_id().unwrap().peer_id();
        let client = Client::new(Arc::new(MemoryBackend::new()), link, me, &Config::default());
        (client, peer)
    }

    /// A peer changing its store instance on every page used to reset the
    /// cursor each time and keep the pull going for ever; the second change
    /// within one pull is now a wire error.
    #[tokio::test]
    async fn a_store_instance_that_changes_within_a_pull_ends_it() {
        let (client, peer) = endless_client(true);
        let err = client.pull(peer).await.unwrap_err();
        assert!(matches!(err, crate::Error::Wire { .. }), "{err:?}");
        assert_eq!(*client.link.pages.lock().unwrap(), 2);
    }

    /// A peer that always has more: one pull takes its page budget, stores
    /// the cursor, and ends; the next pull goes on from there.
    #[tokio::test]
    async fn a_pull_ends_after_its_page_budget_and_the_next_goes_on() {
        let (client, peer) = endless_client(false);
        let report = client.pull(peer).await.unwrap();
        assert_eq!(report.pages, super::MAX_PAGES_PER_PULL);
        let cursor = crate::Backend::cursor(&*client.backend, &peer).unwrap().unwrap();
        assert_eq!(cursor.seq, super::MAX_PAGES_PER_PULL);
        client.pull(peer).await.unwrap();
        let cursor = crate::Backend::cursor(&*client.backend, &peer).unwrap().unwrap();
        assert_eq!(cursor.seq, 2 * super::MAX_PAGES_PER_PULL);
    }

    /// Every offered transfer's envelopes were left out of the page: a
    /// patient whose offer did not fit in what the pull takes is reconciled
    /// like one whose transfer failed, so nothing is skipped for good.
    #[tokio::test]
    async fn offers_beyond_what_a_pull_takes_are_reconciled() {
        let patients: Vec<PatientId> = (0..=MAX_OFFERS_PER_PAGE)
            .map(|_| SecretIdentity::generate().unwrap().patient_id())
            .collect();
        let offers = patients
            .iter()
            .enumerate()
            .map(|(i, p)| Offer {
                patient: *p,
                collection: Collection::Core,
                source: [u8::try_from(i).unwrap(); 32],
            })
            .collect();
        let link = Offering {
            offers,
            asked: Mutex::new(Vec::new()),
        };
        let me = SecretIdentity::generate().unwrap().practice_id().unwrap().peer_id();
        let peer = SecretIdentity::generate().unwrap().practice_id().unwrap().peer_id();
        let backend = Arc::new(MemoryBackend::new());
        let client = Client::new(backend.clone(), link, me, &Config::default());
        client.pull(peer).await.unwrap();

        let asked = client.link.asked.lock().unwrap();
        let reconciled: BTreeSet<PatientId> = asked
            .iter()
            .filter_map(|r| match r {
                Request::Summary { patient, .. } => Some(*patient),
                _ => None,
            })
            .collect();
        assert_eq!(reconciled, patients.iter().copied().collect::<BTreeSet<_>>());
        assert_eq!(
            crate::Backend::cursor(&*backend, &peer).unwrap(),
            Some(Cursor {
                instance: InstanceId([7; 16]),
                seq: 1
            })
        );
    }
}
