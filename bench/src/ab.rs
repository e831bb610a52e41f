//! `daisy-bench ab --against OTHER`: this build's `daisy serve` against
//! another build's, side by side on one database, for the figures an
//! optimisation needs before and after. Both serve the same form (one
//! synchronous echo task); they are loaded in turn, round after round, so
//! the machine's drift hits both alike, and each round's ratio is reported
//! with their median.

use std::{path::PathBuf, time::Duration};

use test_support::free_port;
use uuid::Uuid;

use crate::{Env, load::load};

/// What `ab` compares, and for how long.
#[derive(clap::Args)]
pub struct Ab {
    /// The other build's `daisy` binary (B; this build's is A).
    #[arg(long)]
    against: PathBuf,
    /// Rounds (one load of each per round).
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Seconds per load.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Clients per load.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Extra `daisy serve` flags for both (e.g. `--serve-arg=--isolation=in-process`).
    #[arg(long = "serve-arg", allow_hyphen_values = true)]
    serve_args: Vec<String>,
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
    // Warm both (hosts started, connections pooled) before measuring.
    load(a_addr, ab.concurrency, Duration::from_secs(1), form).await;
    load(b_addr, ab.concurrency, Duration::from_secs(1), form).await;
    let measure = async |addr| {
        env.db.settle().await;
        load(addr, ab.concurrency, Duration::from_secs(ab.seconds), form).await
    };
    let (mut ratios, mut a50, mut b50) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ab.rounds {
        // Alternate which goes first, so that drift within a round (the
        // machine, the tables growing) does not always favour the same one.
        let (la, lb) = if round % 2 == 0 {
            let la = measure(a_addr).await;
            (la, measure(b_addr).await)
        } else {
            let lb = measure(b_addr).await;
            (measure(a_addr).await, lb)
        };
        let ratio = lb.throughput() / la.throughput();
        println!(
            "round {round}: A {:>8.0}/s p50 {:>5} µs   B {:>8.0}/s p50 {:>5} µs   B/A {:.3}",
            la.throughput(),
            la.us(0.5),
            lb.throughput(),
            lb.us(0.5),
            ratio
        );
        for (name, l) in [("A", &la), ("B", &lb)] {
            if !l.errors().is_empty() {
                println!("  {name} failed calls: {:?}", l.errors());
            }
        }
        ratios.push(ratio);
        a50.push(la.us(0.5));
        b50.push(lb.us(0.5));
    }
    drop((a, b));
    ratios.sort_by(f64::total_cmp);
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
