//! Human or JSON output. Results go to stdout, one JSON object per line
//! with `--json`; errors go to stderr as one line with what to do next.

use serde_json::Value;

pub(crate) struct Output {
    json: bool,
}

impl Output {
    pub(crate) fn new(json: bool) -> Self {
        Self { json }
    }

    pub(crate) fn is_json(&self) -> bool {
        self.json
    }

    /// Prints a result: `value` as one JSON line, or `human` as text.
    pub(crate) fn result(&self, value: &Value, human: &str) {
        if self.json {
            println!("{value}");
        } else {
            println!("{human}");
        }
    }

    /// Tells the user something a command did besides its result, on
    /// stderr: `value` as one JSON line, or `human` as text.
    pub(crate) fn notice(&self, value: &Value, human: &str) {
        if self.json {
            eprintln!("{value}");
        } else {
            eprintln!("{human}");
        }
    }

    pub(crate) fn error(&self, err: &anyhow::Error) {
        let chain: Vec<String> = err.chain().map(ToString::to_string).collect();
        if self.json {
            eprintln!("{}", serde_json::json!({ "error": chain.join(": ") }));
        } else {
            eprintln!("error: {}", chain.join(": "));
        }
    }
}
