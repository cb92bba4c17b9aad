//! Helpers shared by the CLI tests that run real node processes.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code, unreachable_pub)]

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as StdCommand, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use assert_cmd::Command;
use serde_json::Value;

pub const PASS: &str = "correct horse battery staple";
pub const WAIT: Duration = Duration::from_secs(60);

pub fn medmesh(home: &Path) -> Command {
    let mut cmd = Command::cargo_bin("medmesh").unwrap();
    cmd.arg("--home")
        .arg(home)
        .env("MEDMESH_PASSPHRASE", PASS)
        .env_remove("MEDMESH_HOME")
        .timeout(WAIT);
    cmd
}

pub fn json_lines(output: &Output) -> Vec<Value> {
    String::from_utf8(output.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A `medmesh node run` process; SIGTERM on drop.
pub struct NodeProcess {
    child: Child,
    pub peer_id: String,
    pub listen: String,
    /// The gateway's base URL.
    pub gateway: String,
    home: PathBuf,
}

/// Where a node's log goes: nowhere, unless `MEDMESH_TEST_LOGS` is set (to
/// debug a failing test: then `node.log` in its home, appended across restarts).
fn node_log(home: &Path) -> Stdio {
    if std::env::var_os("MEDMESH_TEST_LOGS").is_none() {
        return Stdio::null();
    }
    std::fs::create_dir_all(home).unwrap();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(home.join("node.log"))
        .unwrap();
    Stdio::from(file)
}

impl NodeProcess {
    pub fn start(home: &Path) -> Self {
        Self::start_with(home, &["--listen", "/ip4/127.0.0.1/tcp/0"])
    }

    /// `node run` with these arguments (none: the addresses of the node's config).
    pub fn start_with(home: &Path, args: &[&str]) -> Self {
        let exe: PathBuf = assert_cmd::cargo::cargo_bin("medmesh");
        let mut child = StdCommand::new(exe)
            .arg("--home")
            .arg(home)
            .args(["--json", "node", "run"])
            .args(args)
            .env_remove("MEDMESH_HOME")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(node_log(home))
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let mut node = Self {
            child,
            peer_id: String::new(),
            listen: String::new(),
            gateway: String::new(),
            home: home.to_owned(),
        };
        let line = rx
            .recv_timeout(WAIT)
            .expect("the node did not print its ready line in time");
        let ready: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("ready line {line:?}: {e}"));
        node.peer_id = ready["peer_id"].as_str().unwrap().to_owned();
        node.gateway = ready["gateway"].as_str().unwrap_or_default().to_owned();
        node.listen = ready["listen"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .find(|a| a.contains("/tcp/"))
            .expect("a TCP listen address")
            .to_owned();
        assert!(node.listen.starts_with("/ip4/127.0.0.1/"), "{}", node.listen);
        node
    }

    /// `GET path` on this node's gateway with its bearer token (HTTP/1.1 by
    /// hand over a std TcpStream: the body as JSON, and the status).
    pub fn get(&self, path: &str) -> (u16, Value) {
        self.http("GET", path, None)
    }

    /// `POST path` with a FHIR JSON body on this node's gateway.
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.http("POST", path, Some(body))
    }

    /// `PUT path` (an update) with a FHIR JSON body on this node's gateway.
    pub fn put(&self, path: &str, body: &Value) -> (u16, Value) {
        self.http("PUT", path, Some(body))
    }

    fn http(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        use std::io::{Read as _, Write as _};
        let token = std::fs::read_to_string(self.home.join("node/gateway.token")).unwrap();
        let host = self.gateway.trim_start_matches("http://").to_owned();
        let mut stream = std::net::TcpStream::connect(&host).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let body = body.map(Value::to_string).unwrap_or_default();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {}\r\nAccept: application/fhir+json\r\n\
             Content-Type: application/fhir+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            token.trim(),
            body.len()
        )
        .unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).unwrap();
        let text = String::from_utf8(raw).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
        assert!(
            !head.to_ascii_lowercase().contains("transfer-encoding: chunked"),
            "a chunked answer: {head}"
        );
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    }

    /// SIGKILL (kill -9): no shutdown at all.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM (the `kill` command: no unsafe here), then wait for the exit.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        let _ = StdCommand::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `medmesh patient new` in `home`, asserted to succeed: the patient's did.
pub fn new_patient(home: &Path) -> String {
    let out = medmesh(home).args(["--json", "patient", "new"]).output().unwrap();
    assert!(out.status.success(), "patient new: {}", stderr(&out));
    json_lines(&out)[0]["did"].as_str().unwrap().to_owned()
}

/// `medmesh patient grant --node N --to N [--write]` (the patient grants the
/// node it reaches), asserted to succeed: the command's JSON line.
pub fn grant_to_node(patient: &Path, node: &NodeProcess, write: bool) -> Value {
    let mut cmd = medmesh(patient);
    cmd.args([
        "--json",
        "patient",
        "grant",
        "--node",
        &node.listen,
        "--to",
        &node.peer_id,
    ]);
    if write {
        cmd.arg("--write");
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "grant failed: {}", stderr(&out));
    json_lines(&out).remove(0)
}

/// `medmesh patient records --node N --type T`, asserted to succeed: one JSON
/// value per resource the patient reads from that node.
pub fn patient_records(patient: &Path, node: &NodeProcess, resource_type: &str) -> Vec<Value> {
    let out = medmesh(patient)
        .args([
            "--json",
            "patient",
            "records",
            "--node",
            &node.listen,
            "--type",
            resource_type,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "patient records: {}", stderr(&out));
    json_lines(&out)
}

/// The status `patient grants` shows for grant `id` ("in force", "revoked", …).
pub fn grant_status(patient: &Path, id: &str) -> String {
    let out = medmesh(patient).args(["--json", "patient", "grants"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    json_lines(&out)
        .into_iter()
        .find(|g| g["grant_id"] == id)
        .map(|g| g["status"].as_str().unwrap().to_owned())
        .unwrap()
}
