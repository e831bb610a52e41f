//! The yardsticks every figure is set against, measured in the same run: a
//! bare tonic server answering `Process` with an empty response (the gRPC
//! limit, run as `daisy-bench bare-server` in a process of its own like
//! `daisy serve`), and PostgreSQL's one-row insert transactions (the outbox
//! limit).

use std::{
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context;
use diesel::{Connection, PgConnection, RunQueryDsl};
use proto::v1::{
    GetRunsRequest, GetRunsResponse, ProcessRequest, ProcessResponse,
    post_sub_proxy_server::{PostSubProxy, PostSubProxyServer},
};
use serde_json::json;
use test_support::{Process, TestDb, free_port};
use uuid::Uuid;

use crate::{
    load::{Load, line, load},
    report::Report,
};

/// The yardsticks' figures.
pub struct Yardsticks {
    /// The bare server at concurrency 32.
    pub bare32: Load,
    /// PostgreSQL's one-row insert transactions per second at concurrency 32.
    pub pg: f64,
}

/// Measures the yardsticks for `duration` each, on `db`, into `report`.
pub async fn measure(
    db: &TestDb,
    duration: Duration,
    report: &mut Report,
) -> anyhow::Result<Yardsticks> {
    let bare_addr = free_port();
    let bare = spawn_bare(bare_addr)?;
    let bare32 = load(bare_addr, 32, duration, Uuid::new_v4()).await;
    let bare1 = load(bare_addr, 1, duration, Uuid::new_v4()).await;
    drop(bare);
    report
        .rows
        .push(("bare server, c=32".into(), line(&bare32)));
    report.rows.push(("bare server, c=1".into(), line(&bare1)));
    report.json.insert("bare_c32".into(), bare32.json());
    report.json.insert("bare_c1".into(), bare1.json());

    let db_url = db.url.clone();
    let pg = tokio::task::spawn_blocking(move || pg_inserts(&db_url, 32, duration)).await??;
    report.rows.push((
        "PostgreSQL 1-row insert txns, c=32".into(),
        format!("{pg:>9.0}/s"),
    ));
    report.json.insert("pg_insert_c32_per_s".into(), json!(pg));
    Ok(Yardsticks { bare32, pg })
}

/// Starts the bare server on `addr`, in a process of its own; it stops
/// when the handle is dropped.
pub fn spawn_bare(addr: SocketAddr) -> anyhow::Result<Process> {
    Ok(Process::new(
        Command::new(std::env::current_exe()?)
            .args(["bare-server", "--addr", &addr.to_string()])
            .spawn()
            .context("starting the bare server")?,
    ))
}

/// Serves the bare server on `addr` until killed.
pub async fn bare_server(addr: SocketAddr) -> anyhow::Result<()> {
    tonic::transport::Server::builder()
        .add_service(PostSubProxyServer::new(Bare))
        .serve(addr)
        .await
        .context("bare server")
}

/// Answers Process with an empty response: the gRPC limit on this machine.
struct Bare;

#[tonic::async_trait]
impl PostSubProxy for Bare {
    async fn process(
        &self,
        _: tonic::Request<ProcessRequest>,
    ) -> Result<tonic::Response<ProcessResponse>, tonic::Status> {
        Ok(tonic::Response::new(ProcessResponse::default()))
    }
    async fn get_runs(
        &self,
        _: tonic::Request<GetRunsRequest>,
    ) -> Result<tonic::Response<GetRunsResponse>, tonic::Status> {
        Ok(tonic::Response::new(GetRunsResponse::default()))
    }
}

/// PostgreSQL's one-row insert transactions per second at `concurrency`.
fn pg_inserts(url: &str, concurrency: usize, duration: Duration) -> anyhow::Result<f64> {
    let mut conn = PgConnection::establish(url)?;
    diesel::sql_query("CREATE TABLE IF NOT EXISTS bench_yardstick (id uuid PRIMARY KEY, payload jsonb NOT NULL, at timestamptz NOT NULL DEFAULT now())")
        .execute(&mut conn)?;
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let threads: Vec<_> = (0..concurrency)
        .map(|_| {
            let url = url.to_owned();
            std::thread::spawn(move || -> anyhow::Result<u64> {
                let mut conn = PgConnection::establish(&url)?;
                let mut n = 0;
                while Instant::now() < deadline {
                    diesel::sql_query(format!(
                        "INSERT INTO bench_yardstick (id, payload) VALUES ('{}', '{{\"answers\": {{\"name\": \"Ada\", \"rating\": 5}}}}')",
                        Uuid::new_v4()
                    ))
                    .execute(&mut conn)?;
                    n += 1;
                }
                Ok(n)
            })
        })
        .collect();
    let mut total = 0;
    for thread in threads {
        total += thread.join().expect("insert thread")?;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}
