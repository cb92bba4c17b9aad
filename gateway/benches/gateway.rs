//! Gateway benchmarks over loopback HTTP, printing figures and ratios (no
//! harness): the gateway on the in-memory record-document backend of the HTTP
//! tests.
//!
//! 1. `GET /fhir/Patient/{id}/$everything` of a patient with 1,000 resources,
//!    against axum serving the same bytes from memory in the same run.
//! 2. A 5,000-entry transaction Bundle: resources per second, against the
//!    record document's raw write path (same resources, no HTTP, no checks).
//! 3. 200 concurrent keep-alive clients mixing reads, searches and writes for
//!    `MEDMESH_BENCH_SECS` seconds (default 30): throughput, p50/p99, errors.
//!
//! `cargo bench -p medmesh-gateway --bench gateway`; `MEDMESH_BENCH_SECS=5`
//! shortens part 3; `MEDMESH_BENCH_ONLY=everything` (or `transaction`, `load`,
//! comma-separated) runs only those parts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mem.rs"]
mod mem;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::routing::get;
use medmesh_gateway::fhir::bundle::{SearchMode, Searchset};
use medmesh_gateway::{Config, Token};
use mem::MemBackend;
use serde_json::{Value, json};

const TOKEN: &str = "bench-token";

struct Gateway {
    base: String,
    backend: Arc<MemBackend>,
}

async fn start_gateway() -> Gateway {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = Config::for_addr(addr);
    config.body_limit = 64 * 1024 * 1024;
    config.request_timeout = Duration::from_secs(600);
    config.max_count = 1000;
    let backend = Arc::new(MemBackend::new());
    let app = medmesh_gateway::router(backend.clone(), Token::new(TOKEN), config);
    tokio::spawn(medmesh_gateway::serve(listener, app, std::future::pending()));
    Gateway {
        base: format!("http://{addr}"),
        backend,
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .unwrap()
}

fn observation(subject: &str, i: usize) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}], "text": "Heart rate"},
        "subject": {"reference": subject},
        "effectiveDateTime": format!("2024-01-{:02}T10:{:02}:00Z", i % 28 + 1, i % 60),
        "valueQuantity": {"value": 60 + (i % 40), "unit": "beats/minute", "system": "http://unitsofmeasure.org", "code": "/min"}
    })
}

/// A transaction Bundle: one Patient and `n - 1` Observations referencing it by `urn:uuid:`.
fn patient_bundle(n: usize) -> Value {
    let patient_url = "urn:uuid:00000000-0000-4000-8000-000000000000";
    let mut entries = vec![json!({
        "fullUrl": patient_url,
        "resource": {"resourceType": "Patient", "name": [{"family": "Bench", "given": ["Mark"]}], "gender": "other", "birthDate": "1980-02-29"},
        "request": {"method": "POST", "url": "Patient"}
    })];
    for i in 1..n {
        entries.push(json!({
            "fullUrl": format!("urn:uuid:00000000-0000-4000-8000-{i:012}"),
            "resource": observation(patient_url, i),
            "request": {"method": "POST", "url": "Observation"}
        }));
    }
    json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
}

async fn post_bundle(client: &reqwest::Client, base: &str, bundle: &Value) -> Value {
    let response = client
        .post(format!("{base}/fhir"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/fhir+json")
        .header("prefer", "return=minimal")
        .body(bundle.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

fn patient_id(response: &Value) -> String {
    let location = response["entry"][0]["response"]["location"].as_str().unwrap();
    location.split('/').nth(1).unwrap().to_owned()
}

async fn time_gets(client: &reqwest::Client, url: &str, token: bool, n: usize) -> (Duration, usize) {
    let mut bytes = 0;
    let started = Instant::now();
    for _ in 0..n {
        let mut request = client.get(url);
        if token {
            request = request.bearer_auth(TOKEN);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        bytes = response.bytes().await.unwrap().len();
    }
    (started.elapsed() / u32::try_from(n).unwrap(), bytes)
}

async fn everything_vs_static() {
    let gateway = start_gateway().await;
    let client = client();
    let created = post_bundle(&client, &gateway.base, &patient_bundle(1000)).await;
    let id = patient_id(&created);
    let url = format!("{}/fhir/Patient/{id}/$everything?_count=1000", gateway.base);
    let body = client
        .get(&url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let served: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(served["entry"].as_array().unwrap().len(), 1000);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/static",
        get(move || {
            let body = body.clone();
            async move { ([("content-type", "application/fhir+json")], body) }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    let static_url = format!("http://{addr}/static");

    // Warm up both, then measure them interleaved (one of each per round), so
    // that load from elsewhere on the machine hits both alike; medians.
    time_gets(&client, &url, true, 20).await;
    time_gets(&client, &static_url, false, 20).await;
    let n = 300;
    let (mut gateway_times, mut static_times) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let mut bytes = 0;
    for _ in 0..n {
        let (each, size) = time_gets(&client, &url, true, 1).await;
        gateway_times.push(each);
        bytes = size;
        static_times.push(time_gets(&client, &static_url, false, 1).await.0);
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let mean = |v: &[Duration]| v.iter().sum::<Duration>() / u32::try_from(v.len()).unwrap();
    let (gateway_mean, static_mean) = (mean(&gateway_times), mean(&static_times));
    let (gateway_each, static_each) = (median(&mut gateway_times), median(&mut static_times));
    println!(
        "## $everything, patient with 1,000 resources ({} KiB per response, {n} requests each, interleaved)",
        bytes / 1024
    );
    println!(
        "gateway $everything   {:>9.3} ms/request median   {:>9.3} mean",
        gateway_each.as_secs_f64() * 1e3,
        gateway_mean.as_secs_f64() * 1e3
    );
    println!(
        "axum static bytes     {:>9.3} ms/request median   {:>9.3} mean",
        static_each.as_secs_f64() * 1e3,
        static_mean.as_secs_f64() * 1e3
    );
    println!(
        "ratio gateway/static  {:>9.2}x median  {:>9.2}x mean   (target <= 2x)",
        gateway_each.as_secs_f64() / static_each.as_secs_f64(),
        gateway_mean.as_secs_f64() / static_mean.as_secs_f64()
    );
    // Where the gateway's time goes, in process (best of 200): the backend's
    // listing, then the Bundle written from the cached resource bytes.
    let (mut listing, mut assembly) = (Duration::MAX, Duration::MAX);
    for _ in 0..200 {
        let started = Instant::now();
        let all = medmesh_gateway::Backend::everything(gateway.backend.as_ref(), &id)
            .await
            .unwrap();
        listing = listing.min(started.elapsed());
        let started = Instant::now();
        let mut bundle = Searchset::new(url.as_str(), format!("{}/fhir", gateway.base)).total(all.len());
        for resource in all {
            bundle.push_rendered(resource, SearchMode::Include);
        }
        std::hint::black_box(bundle.to_bytes());
        assembly = assembly.min(started.elapsed());
    }
    println!(
        "in process: listing {:>7.1} µs, Bundle bytes {:>7.1} µs",
        listing.as_secs_f64() * 1e6,
        assembly.as_secs_f64() * 1e6
    );
}

async fn transaction_import() {
    let n = 5000;
    let bundle = patient_bundle(n);
    let client = client();
    println!("\n## transaction import, {n}-entry Bundle (Patient + Observations, urn:uuid references)");
    let mut best = f64::MAX;
    for run in 0..3 {
        let gateway = start_gateway().await;
        let started = Instant::now();
        let response = post_bundle(&client, &gateway.base, &bundle).await;
        let elapsed = started.elapsed().as_secs_f64();
        assert_eq!(response["entry"].as_array().unwrap().len(), n);
        assert_eq!(gateway.backend.len(), n);
        println!("run {run}: {elapsed:>7.3} s   {:>8.0} resources/s", n as f64 / elapsed);
        best = best.min(elapsed);
    }
    // The record document's raw write path: the same resources, created one change each.
    let resources: Vec<Value> = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let mut r = e["resource"].clone();
            if r["resourceType"] == "Observation" {
                r["subject"]["reference"] = json!("Patient/p0");
            }
            r
        })
        .collect();
    let actor = medmesh_node::records::actor_id(&[9; 32], [2; 8]);
    let mut doc = medmesh_node::records::RecordDoc::new();
    let started = Instant::now();
    for (i, r) in resources.iter().enumerate() {
        doc.create(&actor, 1_700_000_000_000, &format!("p{i}"), r).unwrap();
    }
    let raw = started.elapsed().as_secs_f64();
    println!(
        "records raw write path: {raw:>7.3} s   {:>8.0} resources/s",
        n as f64 / raw
    );
    println!("gateway best run / raw write path: {:.2}x the time", best / raw);
}

struct ClientReport {
    latencies_us: Vec<u32>,
    errors: usize,
    reads: usize,
    searches: usize,
    writes: usize,
}

async fn load(seconds: u64) {
    let clients: usize = 200;
    let gateway = start_gateway().await;
    let setup = client();
    let created = post_bundle(&setup, &gateway.base, &patient_bundle(200)).await;
    let pid = patient_id(&created);
    let ids: Arc<Vec<String>> = Arc::new(
        created["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let l = e["response"]["location"].as_str().unwrap();
                l.split("/_history").next().unwrap().to_owned()
            })
            .collect(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let base = gateway.base.clone();
        let ids = ids.clone();
        let stop = stop.clone();
        let pid = pid.clone();
        tasks.push(tokio::spawn(async move {
            // One client (one keep-alive connection) per task.
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .pool_max_idle_per_host(1)
                .build()
                .unwrap();
            let mut report = ClientReport {
                latencies_us: Vec::new(),
                errors: 0,
                reads: 0,
                searches: 0,
                writes: 0,
            };
            let mut i = c;
            while !stop.load(Ordering::Relaxed) {
                i = i.wrapping_mul(1_103_515_245).wrapping_add(12345) % 1_000_003;
                let roll = i % 100;
                let t = Instant::now();
                let result = if roll < 75 {
                    report.reads += 1;
                    client
                        .get(format!("{base}/fhir/{}", ids[i % ids.len()]))
                        .bearer_auth(TOKEN)
                        .send()
                        .await
                } else if roll < 80 {
                    report.searches += 1;
                    client
                        .get(format!("{base}/fhir/Observation?subject=Patient/{pid}&_count=10"))
                        .bearer_auth(TOKEN)
                        .send()
                        .await
                } else {
                    report.writes += 1;
                    client
                        .post(format!("{base}/fhir/Observation"))
                        .bearer_auth(TOKEN)
                        .header("content-type", "application/fhir+json")
                        .header("prefer", "return=minimal")
                        .body(observation(&format!("Patient/{pid}"), i).to_string())
                        .send()
                        .await
                };
                let ok = match result {
                    Ok(response) => response.status().is_success() && response.bytes().await.is_ok(),
                    Err(_) => false,
                };
                report
                    .latencies_us
                    .push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                if !ok {
                    report.errors += 1;
                }
            }
            report
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let (mut errors, mut reads, mut searches, mut writes) = (0, 0, 0, 0);
    for task in tasks {
        let r = task.await.unwrap();
        all.extend(r.latencies_us);
        errors += r.errors;
        reads += r.reads;
        searches += r.searches;
        writes += r.writes;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)] as f64 / 1000.0;
    println!("\n## {clients} concurrent keep-alive clients, {seconds} s, loopback");
    println!(
        "requests {} ({reads} reads, {searches} searches, {writes} creates)   {:.0} req/s",
        all.len(),
        all.len() as f64 / elapsed
    );
    println!(
        "latency p50 {:.2} ms   p99 {:.2} ms   max {:.2} ms",
        pct(0.50),
        pct(0.99),
        pct(1.0)
    );
    println!("errors {errors}");
    println!("resources at the end: {}", gateway.backend.len());
    assert_eq!(errors, 0, "errors under load");
}

fn main() {
    let seconds: u64 = std::env::var("MEDMESH_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    // `MEDMESH_BENCH_ONLY=everything,transaction,load` picks parts (default: all).
    let only = std::env::var("MEDMESH_BENCH_ONLY").unwrap_or_default();
    let wanted = |part: &str| only.is_empty() || only.split(',').any(|p| p.trim() == part);
    runtime.block_on(async {
        if wanted("everything") {
            everything_vs_static().await;
        }
        if wanted("transaction") {
            transaction_import().await;
        }
        if wanted("load") {
            load(seconds).await;
        }
    });
}
