//! The `medmesh` binary as users and scripts run it: every command's happy
//! path that works without a network, the bad-input rows (one-line error,
//! non-zero exit, nothing half-written), and `--json` output that parses.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Output;

use assert_cmd::Command;
use serde_json::Value;

const PASS: &str = "correct horse battery staple";

fn medmesh(home: &Path) -> Command {
    let mut cmd = Command::cargo_bin("medmesh").unwrap();
    cmd.arg("--home")
        .arg(home)
        .env("MEDMESH_PASSPHRASE", PASS)
        .env_remove("MEDMESH_HOME");
    cmd
}

fn json_lines(output: &Output) -> Vec<Value> {
    String::from_utf8(output.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn patient_new_and_id_print_the_same_did() {
    let home = tempfile::tempdir().unwrap();
    let out = medmesh(home.path())
        .args(["--json", "patient", "new"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let did = json_lines(&out)[0]["did"].as_str().unwrap().to_owned();
    assert!(did.starts_with("did:key:z6Mk"), "{did}");
    let out = medmesh(home.path()).args(["--json", "patient", "id"]).output().unwrap();
    assert_eq!(json_lines(&out)[0]["did"], did.as_str());
    let keystore = home.path().join("patient/keystore.mmks");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&keystore).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    // The keystore holds no plaintext secret or did.
    let bytes = std::fs::read(&keystore).unwrap();
    assert!(!bytes.windows(did.len()).any(|w| w == did.as_bytes()));
}

#[test]
fn patient_new_refuses_to_overwrite() {
    let home = tempfile::tempdir().unwrap();
    medmesh(home.path()).args(["patient", "new"]).assert().success();
    let before = std::fs::read(home.path().join("patient/keystore.mmks")).unwrap();
    let out = medmesh(home.path()).args(["patient", "new"]).output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("refusing to overwrite"), "{}", stderr(&out));
    assert_eq!(
        std::fs::read(home.path().join("patient/keystore.mmks")).unwrap(),
        before
    );
}

#[test]
fn wrong_passphrase_and_missing_keystore_are_one_line_errors() {
    let home = tempfile::tempdir().unwrap();
    // A home open to others gets a line of its own saying it was tightened
    // (cli/tests/operator_safety.rs); this one is private already.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let out = medmesh(home.path()).args(["patient", "id"]).output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("medmesh patient new"), "{}", stderr(&out));
    assert_eq!(stderr(&out).trim().lines().count(), 1, "{}", stderr(&out));

    medmesh(home.path()).args(["patient", "new"]).assert().success();
    let out = medmesh(home.path())
        .env("MEDMESH_PASSPHRASE", "wrong")
        .args(["patient", "id"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("wrong passphrase"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"));
}

#[test]
fn node_init_is_idempotent_and_id_token_work() {
    let home = tempfile::tempdir().unwrap();
    let first = medmesh(home.path()).args(["--json", "node", "init"]).output().unwrap();
    assert!(first.status.success(), "{}", stderr(&first));
    let peer = json_lines(&first)[0]["peer_id"].as_str().unwrap().to_owned();
    assert!(peer.starts_with("12D3KooW"), "{peer}");
    let token = std::fs::read(home.path().join("node/gateway.token")).unwrap();
    let again = medmesh(home.path()).args(["--json", "node", "init"]).output().unwrap();
    assert_eq!(json_lines(&again)[0]["peer_id"], peer.as_str());
    assert_eq!(std::fs::read(home.path().join("node/gateway.token")).unwrap(), token);
    let id = medmesh(home.path()).args(["--json", "node", "id"]).output().unwrap();
    assert_eq!(json_lines(&id)[0]["peer_id"], peer.as_str());
    let printed = medmesh(home.path()).args(["node", "token"]).output().unwrap();
    assert_eq!(String::from_utf8(printed.stdout).unwrap().trim().as_bytes(), &token[..]);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        for file in ["node.key", "gateway.token"] {
            let mode = std::fs::metadata(home.path().join("node").join(file))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
    }
}

#[test]
fn node_id_without_init_says_what_to_do() {
    let home = tempfile::tempdir().unwrap();
    let out = medmesh(home.path()).args(["node", "id"]).output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("medmesh node init"), "{}", stderr(&out));
}

#[test]
fn gateway_refuses_non_loopback_without_the_flag() {
    let home = tempfile::tempdir().unwrap();
    let out = medmesh(home.path())
        .args(["node", "run", "--gateway", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--allow-remote-gateway"), "{}", stderr(&out));
}

#[test]
fn completions_for_every_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::cargo_bin("medmesh")
            .unwrap()
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).contains("medmesh"), "{shell}");
    }
}

#[test]
fn help_on_every_command() {
    for args in [
        vec!["--help"],
        vec!["node", "--help"],
        vec!["node", "run", "--help"],
        vec!["patient", "--help"],
        vec!["fhir", "import", "--help"],
        vec!["audit", "verify", "--help"],
        vec!["demo", "--help"],
    ] {
        Command::cargo_bin("medmesh").unwrap().args(&args).assert().success();
    }
}

#[test]
fn audit_verify_on_a_stopped_node() {
    let home = tempfile::tempdir().unwrap();
    medmesh(home.path()).args(["node", "init"]).assert().success();
    let out = medmesh(home.path())
        .args(["--json", "audit", "verify"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json_lines(&out)[0]["intact"], true);
}

#[test]
fn fhir_import_without_a_running_node_says_what_to_do() {
    let home = tempfile::tempdir().unwrap();
    medmesh(home.path()).args(["node", "init"]).assert().success();
    let file = home.path().join("p.json");
    std::fs::write(&file, r#"{"resourceType":"Patient"}"#).unwrap();
    let out = medmesh(home.path())
        .args(["fhir", "import"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("medmesh node run"), "{}", stderr(&out));
}

/// The README's run command: two practices, a patient, consent at work.
#[test]
fn demo_verifies_every_step() {
    let out = Command::cargo_bin("medmesh")
        .unwrap()
        .args(["--json", "demo"])
        .env_remove("MEDMESH_HOME")
        .timeout(std::time::Duration::from_secs(120))
        .output()
        .unwrap();
    assert!(out.status.success(), "demo failed: {}", stderr(&out));
    let steps = json_lines(&out);
    assert!(steps.len() >= 10, "{steps:?}");
    assert!(steps.iter().all(|s| s["ok"] == true));
    let last = steps.last().unwrap();
    assert!(last["what"].as_str().unwrap().contains("every step was verified"));
}
