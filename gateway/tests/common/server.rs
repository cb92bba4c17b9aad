//! A gateway over real HTTP on 127.0.0.1:0 with the in-memory backend, and a
//! reqwest client that sends the token: what the HTTP tests talk to.

use std::sync::Arc;
use std::time::Duration;

use medmesh_gateway::{Config, Token};
use serde_json::Value;

use crate::mem::MemBackend;

/// The bearer token of every test server.
pub(crate) const TOKEN: &str = "test-token-1234";

/// A running gateway; stops when dropped.
pub(crate) struct Server {
    pub(crate) base: String,
    pub(crate) client: reqwest::Client,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Server {
    /// Starts a gateway with this body limit (and `_count` capped at 20).
    pub(crate) async fn start(body_limit: usize) -> Self {
        Self::start_with(|config| config.body_limit = body_limit).await
    }

    /// Starts a gateway whose configuration `edit` changes (`_count` capped
    /// at 20 first).
    pub(crate) async fn start_with(edit: impl FnOnce(&mut Config)) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = Config::for_addr(addr);
        config.max_count = 20;
        edit(&mut config);
        let app = medmesh_gateway::router(Arc::new(MemBackend::new()), Token::new(TOKEN), config);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(medmesh_gateway::serve(listener, app, async {
            let _ = rx.await;
        }));
        Self {
            base: format!("http://{addr}"),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            shutdown: Some(tx),
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub(crate) async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .bearer_auth(TOKEN)
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }

    pub(crate) async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).bearer_auth(TOKEN).send().await.unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}
