//! The load generator: `Process` calls from many clients at once for a set
//! time, and what they measured ([`Load`]: throughput, latency histogram,
//! errors by status code).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use proto::v1::{ProcessRequest, post_sub_proxy_client::PostSubProxyClient};
use serde_json::{Value, json};
use uuid::Uuid;

/// One load run's results.
#[derive(Debug, Clone)]
pub struct Load {
    ok: u64,
    errors: BTreeMap<String, u64>,
    elapsed: Duration,
    hist: Histogram<u64>,
}

impl Load {
    /// Successful calls per second.
    pub fn throughput(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    /// Failed calls by status code.
    pub fn errors(&self) -> &BTreeMap<String, u64> {
        &self.errors
    }

    /// The latency at quantile `q`, in microseconds.
    pub fn us(&self, q: f64) -> u64 {
        self.hist.value_at_quantile(q)
    }

    /// Its figures for `report.json`.
    pub fn json(&self) -> Value {
        json!({
            "ok": self.ok, "errors": self.errors, "seconds": self.elapsed.as_secs_f64(),
            "throughput_per_s": self.throughput(),
            "latency_us": {"p50": self.us(0.5), "p90": self.us(0.9), "p99": self.us(0.99), "p999": self.us(0.999), "max": self.hist.max()},
        })
    }
}

/// The run of median throughput among `loads` (the upper one of an even
/// count's middle two).
pub fn median_load(mut loads: Vec<Load>) -> Load {
    loads.sort_by(|a, b| a.throughput().total_cmp(&b.throughput()));
    loads.swap_remove(loads.len() / 2)
}

/// `l`'s figures for the table.
pub fn line(l: &Load) -> String {
    let errors = if l.errors.is_empty() {
        String::new()
    } else {
        format!("  errors {:?}", l.errors)
    };
    format!(
        "{:>9.0}/s  p50 {:>6} µs  p90 {:>6}  p99 {:>6}  p99.9 {:>6}  max {:>7}{errors}",
        l.throughput(),
        l.us(0.5),
        l.us(0.9),
        l.us(0.99),
        l.us(0.999),
        l.hist.max()
    )
}

/// Drives Process for `form` at `concurrency` for `duration` (after a
/// warm-up), at the server at `addr`.
pub async fn load(addr: SocketAddr, concurrency: usize, duration: Duration, form: Uuid) -> Load {
    let mut channels = Vec::new();
    for _ in 0..concurrency.div_ceil(8) {
        channels.push(test_support::connect(addr).await);
    }
    let submission = proto::json::json_to_struct(json!({
        "answers": {"name": "Ada Lovelace", "phone": "+44 20 7946 0000", "rating": 5, "comment": "quick and painless"},
        "metadata": {"device": "tablet-7", "locale": "en-GB"},
    }))
    .expect("an object");
    let run = |measure: Duration| {
        let channels = channels.clone();
        let submission = submission.clone();
        async move {
            let deadline = Instant::now() + measure;
            let workers = (0..concurrency).map(|i| {
                let mut client = PostSubProxyClient::new(channels[i % channels.len()].clone());
                let submission = submission.clone();
                tokio::spawn(async move {
                    let mut hist = Histogram::<u64>::new(3).expect("histogram");
                    let (mut ok, mut errors) = (0u64, BTreeMap::<String, u64>::new());
                    while Instant::now() < deadline {
                        let request = ProcessRequest {
                            form_id: form.to_string(),
                            submission_id: Uuid::new_v4().to_string(),
                            submission: Some(submission.clone()),
                            context: None,
                        };
                        let sent = Instant::now();
                        match client.process(request).await {
                            Ok(_) => {
                                ok += 1;
                                let _ = hist.record(sent.elapsed().as_micros() as u64);
                            }
                            Err(status) => {
                                *errors.entry(format!("{:?}", status.code())).or_default() += 1
                            }
                        }
                    }
                    (ok, errors, hist)
                })
            });
            let started = Instant::now();
            let results = join_all(workers).await;
            let elapsed = started.elapsed();
            let mut total = Load {
                ok: 0,
                errors: BTreeMap::new(),
                elapsed,
                hist: Histogram::new(3).expect("histogram"),
            };
            for (ok, errors, hist) in results {
                total.ok += ok;
                for (code, n) in errors {
                    *total.errors.entry(code).or_default() += n;
                }
                total.hist.add(hist).expect("same histogram bounds");
            }
            total
        }
    };
    run(Duration::from_secs(1)).await; // warm-up: connections, plugin loads, caches
    run(duration).await
}

/// The results of `handles`, in order.
async fn join_all<T: Send + 'static>(
    handles: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<T> {
    let mut out = Vec::new();
    for handle in handles.collect::<Vec<_>>() {
        out.push(handle.await.expect("load task"));
    }
    out
}
