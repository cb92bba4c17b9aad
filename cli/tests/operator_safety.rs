//! Issue 15, item 10: what a local user on the node's host, or a hurried
//! operator, could get wrong — a home open to other users, a node key left
//! plain when a passphrase was given, a one-character passphrase — run as
//! real `medmesh` processes.
#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use common::{NodeProcess, json_lines, medmesh, stderr};

/// A node passphrase strong enough to seal with.
const NODE_PASS: &str = "plinth otter marrow quasar";
const PLAIN_MAGIC: &[u8] = b"medmesh/node-key/plain/1";

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn peer_id(output: &std::process::Output) -> String {
    assert!(output.status.success(), "{}", stderr(output));
    json_lines(output)[0]["peer_id"].as_str().unwrap().to_owned()
}

#[test]
fn an_open_home_is_tightened_and_said_so() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(home.join("node")).unwrap();
    std::fs::write(
        home.join("node/config.json"),
        b"{\"listen\":[],\"gateway\":\"127.0.0.1:0\",\"peers\":[],\"mdns\":false}",
    )
    .unwrap();
    set_mode(&home, 0o755);
    set_mode(&home.join("node"), 0o755);
    set_mode(&home.join("node/config.json"), 0o644);

    let out = medmesh(&home).args(["--json", "node", "init"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    for (path, expected) in [
        (home.clone(), 0o700),
        (home.join("node"), 0o700),
        (home.join("node/config.json"), 0o600),
        (home.join("node/node.key"), 0o600),
        (home.join("node/gateway.token"), 0o600),
    ] {
        assert_eq!(mode(&path), expected, "{}", path.display());
    }
    let said = stderr(&out);
    for name in ["home was mode 0755", "node was mode 0755", "config.json was mode 0644"] {
        assert!(said.contains(name), "stderr does not say {name:?}: {said}");
    }
    // Nothing left to tighten: nothing said.
    let out = medmesh(&home).args(["--json", "node", "id"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("tightened"), "{}", stderr(&out));

    // The store sled creates (0644 by itself) is the owner's alone too.
    let node = NodeProcess::start(&home);
    let mut pending = vec![home.join("node/store")];
    let mut files = 0;
    while let Some(path) = pending.pop() {
        let m = mode(&path);
        assert_eq!(m & 0o077, 0, "{} is mode {m:o}", path.display());
        if path.is_dir() {
            pending.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else {
            files += 1;
        }
    }
    assert!(files > 0, "the store has no files");
    drop(node);
}

#[test]
fn a_plain_node_key_is_sealed_in_place_when_a_passphrase_is_given() {
    let home = tempfile::tempdir().unwrap();
    let key = home.path().join("node/node.key");
    let plain_id = peer_id(&medmesh(home.path()).args(["--json", "node", "init"]).output().unwrap());
    assert!(std::fs::read(&key).unwrap().starts_with(PLAIN_MAGIC));

    let out = medmesh(home.path())
        .env("MEDMESH_NODE_PASSPHRASE", NODE_PASS)
        .args(["--json", "node", "init"])
        .output()
        .unwrap();
    assert_eq!(peer_id(&out), plain_id, "sealing keeps the identity");
    assert!(stderr(&out).contains("now sealed"), "{}", stderr(&out));
    let sealed = std::fs::read(&key).unwrap();
    assert!(!sealed.starts_with(PLAIN_MAGIC), "the key is still plain");
    assert_eq!(mode(&key), 0o600);
    // No temporary file is left beside it.
    let names: Vec<String> = std::fs::read_dir(home.path().join("node"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");

    // From now on the key needs its passphrase.
    let out = medmesh(home.path()).args(["--json", "node", "id"]).output().unwrap();
    assert!(!out.status.success());
    assert_eq!(stderr(&out).trim().lines().count(), 1, "{}", stderr(&out));
    let out = medmesh(home.path())
        .env("MEDMESH_NODE_PASSPHRASE", NODE_PASS)
        .args(["--json", "node", "id"])
        .output()
        .unwrap();
    assert_eq!(peer_id(&out), plain_id);
}

#[test]
fn weak_passphrases_are_refused_with_one_line_and_nothing_written() {
    let home = tempfile::tempdir().unwrap();
    // Private already: stderr holds the refusal alone.
    set_mode(home.path(), 0o700);
    for weak in ["x", "password1234"] {
        let out = medmesh(home.path())
            .env("MEDMESH_PASSPHRASE", weak)
            .args(["patient", "new"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{weak}: accepted");
        let said = stderr(&out);
        assert_eq!(said.trim().lines().count(), 1, "{said}");
        assert!(said.contains("keystore passphrase is too"), "{said}");
        assert!(!home.path().join("patient/keystore.mmks").exists());

        let out = medmesh(home.path())
            .env("MEDMESH_NODE_PASSPHRASE", weak)
            .args(["node", "init"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{weak}: accepted for the node key");
        assert!(stderr(&out).contains("node passphrase is too"), "{}", stderr(&out));
        assert!(!home.path().join("node/node.key").exists());
    }
}

#[test]
fn the_node_passphrase_comes_from_a_file_or_a_systemd_credential() {
    let home = tempfile::tempdir().unwrap();
    let secrets = tempfile::tempdir().unwrap();
    let file = secrets.path().join("node-passphrase");
    std::fs::write(&file, format!("{NODE_PASS}\n")).unwrap();
    let out = medmesh(home.path())
        .arg("--node-passphrase-file")
        .arg(&file)
        .args(["--json", "node", "init"])
        .output()
        .unwrap();
    let id = peer_id(&out);
    assert!(
        !std::fs::read(home.path().join("node/node.key"))
            .unwrap()
            .starts_with(PLAIN_MAGIC)
    );

    let out = medmesh(home.path()).args(["--json", "node", "id"]).output().unwrap();
    assert!(!out.status.success(), "a sealed key opened without its passphrase");
    let out = medmesh(home.path())
        .arg("--node-passphrase-file")
        .arg(&file)
        .args(["--json", "node", "id"])
        .output()
        .unwrap();
    assert_eq!(peer_id(&out), id);

    // systemd: LoadCredential=medmesh-node-passphrase:… sets CREDENTIALS_DIRECTORY.
    std::fs::copy(&file, secrets.path().join("medmesh-node-passphrase")).unwrap();
    let out = medmesh(home.path())
        .env("CREDENTIALS_DIRECTORY", secrets.path())
        .args(["--json", "node", "id"])
        .output()
        .unwrap();
    assert_eq!(peer_id(&out), id);

    let empty = secrets.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let out = medmesh(home.path())
        .arg("--node-passphrase-file")
        .arg(&empty)
        .args(["node", "id"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is empty"), "{}", stderr(&out));
}

/// Files the running node creates later are its owner's alone too: a large
/// document makes sled write a blob file (values over 128 KiB) while the
/// node runs, long after the home was tightened at start. sled creates its
/// files 0644 by itself; the process umask (0077) keeps them private.
#[test]
fn files_a_running_node_creates_are_private() {
    let root = tempfile::tempdir().unwrap();
    let (practice, patient) = (root.path().join("practice"), root.path().join("patient"));
    let node = NodeProcess::start(&practice);
    let did = common::new_patient(&patient);
    common::grant_to_node(&patient, &node, true);
    // Incompressible (Automerge deflates a change's columns): base64 of a xorshift stream.
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let data: String = (0..300 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(B64[(x % 64) as usize])
        })
        .collect();
    let bundle = serde_json::json!({"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:6f1c2a9e-0d3b-4f7a-8c21-5b9e4d7a1c02",
         "resource": {"resourceType": "Patient", "name": [{"family": "Lindqvist"}]}},
        {"resource": {"resourceType": "DocumentReference", "status": "current",
                      "subject": {"reference": "urn:uuid:6f1c2a9e-0d3b-4f7a-8c21-5b9e4d7a1c02"},
                      "content": [{"attachment": {"contentType": "application/pdf", "data": data}}]}}]});
    let file = root.path().join("bundle.json");
    std::fs::write(&file, bundle.to_string()).unwrap();
    let out = medmesh(&practice)
        .args(["--json", "fhir", "import", "--patient", &did])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    let mut pending = vec![practice.join("node/store")];
    let mut blobs = 0;
    while let Some(path) = pending.pop() {
        let m = mode(&path);
        assert_eq!(m & 0o077, 0, "{} is mode {m:o}", path.display());
        if path.is_dir() {
            pending.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else if path.parent().is_some_and(|p| p.ends_with("blobs")) {
            blobs += 1;
        }
    }
    assert!(
        blobs > 0,
        "sled wrote no blob file: the test checks nothing it created while running"
    );
    drop(node);
}
