//! Tests of the layout migrations: entries of older layouts are moved, and
//! a cut-off move resumes.

use medmesh_crypto::{Collection, Envelope, GrantId, SecretIdentity};

use super::*;
use crate::testing::{ChangeMaker, TestPatient};

/// A pending entry of layout 1 (grant id only) is found under its
/// envelope's patient once moved (at open).
#[test]
fn pending_entries_of_layout_1_are_moved_to_their_patient() {
    let dir = tempfile::tempdir().unwrap();
    let mut patient = TestPatient::new().unwrap();
    let practice = SecretIdentity::from_seed(&[8; 32]);
    let key = patient.key(Collection::Core, 0).unwrap();
    let change = ChangeMaker::new(&practice.public_bytes())
        .unwrap()
        .put("k", "v")
        .unwrap();
    let grant = GrantId([5; 16]);
    let envelope = Envelope::seal(
        (patient.id(), Collection::Core),
        &key,
        &practice,
        Some(grant),
        change.as_change(),
        1,
    )
    .unwrap()
    .encode();
    let hash = [3; 32];
    let store = SledStore::open(dir.path()).unwrap();
    let mut v1 = vec![0];
    v1.extend_from_slice(&grant.0);
    v1.extend_from_slice(&hash);
    // Layouts 1 and 2 numbered an envelope 1.
    let mut value = vec![1];
    value.extend_from_slice(&envelope);
    store.pending.insert(v1, value).unwrap();
    // What `open` does (reopening here would race sled's own lock release).
    store.migrate_pending_v1().unwrap();
    store.migrate_kinds_v2(&store.db.open_tree("meta").unwrap()).unwrap();
    let found = store
        .pending(Some(PendingReason::MissingGrant(patient.id(), grant)))
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!((found[0].hash, found[0].kind), (hash, ItemKind::Envelope));
    assert_eq!(found[0].bytes, envelope);
    assert_eq!(store.pending(None).unwrap().len(), 1);
}

/// The kind numbers of layout 2 (1 envelope, 2 grant, 3 revocation, 4
/// key share), put back into a layout-3 store's trees.
fn write_layout_2(store: &SledStore) {
    let v2 = |kind: ItemKind| match kind {
        ItemKind::Envelope => 1u8,
        ItemKind::Grant => 2,
        ItemKind::Revocation => 3,
        ItemKind::KeyShare => 4,
    };
    for (k, v) in store.items.iter().map(Result::unwrap) {
        let mut v = v.to_vec();
        v[0] = v2(ItemKind::from_code(v[0].into()).unwrap());
        store.items.insert(k, v).unwrap();
    }
    let meta_v2 = |v: &[u8]| {
        let mut a = codec::decode(v).unwrap();
        let kind = ItemKind::from_code(codec::get_uint(&a[0]).unwrap()).unwrap();
        a[0] = codec::uint(v2(kind).into());
        codec::encode(&ciborium::Value::Array(a))
    };
    for (k, v) in store.seqlog.iter().map(Result::unwrap) {
        store.seqlog.insert(k, meta_v2(&v)).unwrap();
    }
    for (k, v) in store.consent.iter().map(Result::unwrap) {
        let (meta, wire) = codec::split_consent_value(&k, &v).unwrap();
        let m = meta_v2(&codec::meta_value(&meta));
        let mut out = vec![2];
        out.extend_from_slice(&u32::try_from(m.len()).unwrap().to_be_bytes());
        out.extend_from_slice(&m);
        out.extend_from_slice(wire);
        store.consent.insert(k, out).unwrap();
    }
    store.db.open_tree("meta").unwrap().insert(LAYOUT_KEY, b"2").unwrap();
}

/// A store of layout 2 reads the same once its kinds are renumbered,
/// also when the move was cut off after its first chunk (it resumes
/// where it stopped and renumbers nothing twice).
#[test]
fn a_layout_2_store_moves_to_layout_3_and_resumes_a_cut_off_move() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let mut patient = TestPatient::new().unwrap();
    let mut batch = Batch::new();
    // More grants and shares than one migration chunk.
    for n in 0..(MIGRATION_CHUNK / 2 + 10) {
        let practice = SecretIdentity::from_seed(&[u8::try_from(n % 250).unwrap() + 1; 32]);
        let (_, items) = patient
            .onboard(practice.practice_id().unwrap(), Collection::Core)
            .unwrap();
        for item in items {
            let meta = crate::item::ItemMeta::describe(&item).unwrap();
            batch.push(Op::PutItem {
                meta,
                bytes: item.bytes,
                envelope: None,
            });
        }
    }
    store.commit(&batch).unwrap();
    let before = store.items_after(0, usize::MAX).unwrap();
    let consent_before = store.consent_items().unwrap();
    assert!(before.len() > MIGRATION_CHUNK, "{}", before.len());
    assert!(before.iter().any(|i| i.meta.kind == ItemKind::Grant));
    assert!(before.iter().any(|i| i.meta.kind == ItemKind::KeyShare));

    write_layout_2(&store);
    let meta = store.db.open_tree("meta").unwrap();
    // A move cut off after the first chunk of `items`: those entries
    // are renumbered already and the progress key names the last.
    let first: Vec<_> = store.items.iter().take(MIGRATION_CHUNK).map(Result::unwrap).collect();
    for (k, v) in &first {
        store
            .items
            .insert(k, codec::kind_renumbered_from_v2("items", v).unwrap())
            .unwrap();
    }
    meta.insert("layout-3-progress/items", &first.last().unwrap().0)
        .unwrap();
    assert!(
        store.items_after(0, usize::MAX).is_err() || store.items_after(0, usize::MAX).unwrap() != before,
        "the layout-2 numbers must not read as layout 3"
    );

    store.migrate_kinds_v2(&meta).unwrap();
    assert_eq!(store.items_after(0, usize::MAX).unwrap(), before);
    assert_eq!(store.consent_items().unwrap(), consent_before);
    assert_eq!(meta.get(LAYOUT_KEY).unwrap().as_deref(), Some(LAYOUT_VERSION));
    assert!(meta.scan_prefix("layout-3-progress/").next().is_none());
}
