//! Runs the README's walkthrough block (```` ```sh walkthrough ````) as it
//! stands, with the built `medmesh` first on `PATH`, so the README's
//! commands stay true.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn walkthrough() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start = readme
        .find("```sh walkthrough\n")
        .expect("README has a walkthrough block");
    let body = &readme[start + "```sh walkthrough\n".len()..];
    body[..body.find("\n```").expect("walkthrough block is closed")].to_owned()
}

#[test]
fn readme_walkthrough_runs() {
    if Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        eprintln!("skipping: the README walkthrough needs curl, which is not installed");
        return;
    }
    let bin = assert_cmd::cargo::cargo_bin("medmesh");
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("walkthrough.sh");
    std::fs::write(
        &script,
        format!(
            // Whatever happens, no node outlives the test.
            "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\nexport TMPDIR={}\n{}",
            dir.path().display(),
            walkthrough()
        ),
    )
    .unwrap();
    let mut child = Command::new("bash")
        .arg(&script)
        .env("PATH", path)
        .env_remove("MEDMESH_HOME")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the walkthrough did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(
        status.success(),
        "walkthrough failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("did:key:z6Mk"), "{stdout}");
    assert!(stdout.contains(r#""by_collection":{"core":1,"labs":1}"#), "{stdout}");
    assert!(stdout.contains("revoked"), "{stdout}");
    assert_eq!(stdout.matches("audit log intact").count(), 2, "{stdout}");
}
