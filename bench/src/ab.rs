//! `daisy-bench ab --against OTHER`: this build's `daisy serve` against
//! another build's, side by side on one database, for the figures an
//! optimisation needs before and after. Both serve the same form (one
//! synchronous echo task); they are loaded in turn, round after round, so
//! the machine's drift hits both alike, and each round's ratio is reported
//! with their median.

use std::{path::PathBuf, time::Duration};

use test_support::free_port;
use uuid::Uuid;

use crate::{
    Env,
    load::{Load, load},
};

/// What `ab` compares, and for how long.
pub struct Ab {
    /// The other build's `daisy` binary (B; this build's is A).
    pub against: PathBuf,
    /// Rounds of one A load and one B load.
    pub rounds: usize,
    /// Seconds per load.
    pub seconds: u64,
    /// Clients per load.
    pub concurrency: usize,
    /// Extra `daisy serve` flags, for both.
    pub serve_args: Vec<String>,
}

/// Runs the rounds and prints each, then the medians.
pub async fn run(env: &Env, ab: &Ab) -> anyhow::Result<()> {
    let form = Uuid::new_v4();
    env.db
        .attach(form, "echo0", "echo", "echo", false, &serde_json::json!({}));
    let args: Vec<&str> = ab.serve_args.iter().map(String::as_str).collect();
    let (a_addr, b_addr) = (free_port(), free_port());
    let a = env.daisy.serve(a_addr, &args);
    let b = env.daisy.with_bin(&ab.against).serve(b_addr, &args);
    let duration = Duration::from_secs(ab.seconds);
    // Warm both (hosts started, connections pooled) before measuring.
    load(a_addr, ab.concurrency, Duration::from_secs(1), form).await;
    load(b_addr, ab.concurrency, Duration::from_secs(1), form).await;
    let mut ratios = Vec::new();
    let mut p50s = Vec::new();
    for round in 0..ab.rounds {
        // Alternate which goes first, so that drift within a round (the
        // machine, the tables growing) does not always favour the same one.
        let (first, second) = if round % 2 == 0 {
            (a_addr, b_addr)
        } else {
            (b_addr, a_addr)
        };
        env.db.settle().await;
        let x = load(first, ab.concurrency, duration, form).await;
        env.db.settle().await;
        let y = load(second, ab.concurrency, duration, form).await;
        let (la, lb): (&Load, &Load) = if round % 2 == 0 { (&x, &y) } else { (&y, &x) };
        let ratio = lb.throughput() / la.throughput();
        println!(
            "round {round}: A {:>8.0}/s p50 {:>5} µs   B {:>8.0}/s p50 {:>5} µs   B/A {:.3}",
            la.throughput(),
            la.us(0.5),
            lb.throughput(),
            lb.us(0.5),
            ratio
        );
        for (name, l) in [("A", la), ("B", lb)] {
            if !l.errors().is_empty() {
                println!("  {name} failed calls: {:?}", l.errors());
            }
        }
        ratios.push(ratio);
        p50s.push((la.us(0.5), lb.us(0.5)));
    }
    drop((a, b));
    ratios.sort_by(f64::total_cmp);
    let mut a50: Vec<u64> = p50s.iter().map(|p| p.0).collect();
    let mut b50: Vec<u64> = p50s.iter().map(|p| p.1).collect();
    a50.sort_unstable();
    b50.sort_unstable();
    println!(
        "median B/A throughput {:.3} (min {:.3}, max {:.3}); median p50 A {} µs, B {} µs",
        ratios[ratios.len() / 2],
        ratios[0],
        ratios[ratios.len() - 1],
        a50[a50.len() / 2],
        b50[b50.len() / 2]
    );
    Ok(())
}
