//! Fake Google for the demo; run it with `cargo run -p example-fake-google -- --help`.
//!
//! Serves the token endpoint, Sheets and Drive on loopback, and prints each
//! spreadsheet's header and rows when it stops (SIGTERM or ctrl-c).

use clap::Parser;

#[derive(Parser)]
#[command(name = "example-fake-google")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:18090")]
    addr: String,
    /// PEM public key that verifies the service account's JWTs.
    #[arg(long)]
    public_key: std::path::PathBuf,
    /// The service account's email (the JWT's issuer).
    #[arg(long)]
    issuer: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let google = example_fake_google::Google::new(&std::fs::read(&args.public_key)?, &args.issuer);
    let listener = tokio::net::TcpListener::bind(&args.addr).await?;
    let base = google.clone().serve(listener).await;
    eprintln!("fake Google serving at {base}");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    for (id, rows) in google.rows.lock().expect("lock").iter() {
        println!("spreadsheet {id}");
        println!(
            "  header: {}",
            serde_json::Value::Array(google.header_of(id))
        );
        for row in rows {
            println!("  row:    {}", serde_json::Value::Array(row.clone()));
        }
    }
    Ok(())
}
