//! A host's tasks: frames out, replies in (and, when the socket closes,
//! the cause of the host's death for every call in flight), output to the
//! log.

use std::{
    os::unix::process::ExitStatusExt,
    sync::{Arc, atomic::Ordering},
};

use prost::Message;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt},
    sync::mpsc,
};

use super::Host;
use crate::plugins::wire::{self, Reply};

pub(super) async fn write_frames(
    mut socket: tokio::net::unix::OwnedWriteHalf,
    mut frames: mpsc::UnboundedReceiver<Vec<u8>>,
) {
    while let Some(mut batch) = frames.recv().await {
        while let Ok(more) = frames.try_recv() {
            batch.extend_from_slice(&more);
        }
        if socket.write_all(&batch).await.is_err() {
            return;
        }
    }
}

pub(super) async fn read_replies(
    host: Arc<Host>,
    mut socket: tokio::net::unix::OwnedReadHalf,
    mut child: tokio::process::Child,
) {
    loop {
        tokio::select! {
            frame = wire::read_async(&mut socket) => match frame {
                Ok(Some(body)) => match Reply::decode(&body[..]) {
                    Ok(reply) => {
                        let waiting = host.pending.lock().expect("pending poisoned").remove(&reply.id);
                        if let Some(waiting) = waiting {
                            let _ = waiting.send(Ok(reply));
                        }
                    }
                    Err(err) => {
                        tracing::error!(plugin.module = %host.module, error = %err, "plugin host sent a bad frame; killing it");
                        let _ = child.start_kill();
                        break;
                    }
                },
                Ok(None) | Err(_) => break,
            },
            () = host.kill.notified() => {
                let _ = child.start_kill();
            }
        }
    }
    let status = child.wait().await.ok();
    host.dead.store(true, Ordering::Release);
    ::metrics::gauge!(crate::metrics::HOSTS_ALIVE).decrement(1.0);
    // Killed by Daisy (retired, recycled, timed out) or died by itself.
    let counter = if host.killed.load(Ordering::Acquire) {
        crate::metrics::HOST_RECYCLES
    } else {
        crate::metrics::HOST_CRASHES
    };
    ::metrics::counter!(counter, "module" => host.module.clone()).increment(1);
    let cause = describe(status);
    let pending: Vec<_> = host
        .pending
        .lock()
        .expect("pending poisoned")
        .drain()
        .collect();
    if !host.killed.load(Ordering::Acquire) {
        tracing::error!(
            plugin.module = %host.module,
            host.pid = host.pid,
            cause = %cause,
            runs_in_flight = pending.len(),
            "plugin host died"
        );
    }
    for (_, waiting) in pending {
        let _ = waiting.send(Err(cause.clone()));
    }
}

/// "SIGSEGV", "exit code 3", ...
pub(super) fn describe(status: Option<std::process::ExitStatus>) -> String {
    let Some(status) = status else {
        return "unknown cause".into();
    };
    if let Some(signal) = status.signal() {
        return signal_name(signal);
    }
    match status.code() {
        Some(code) => format!("exit code {code}"),
        None => "unknown cause".into(),
    }
}

fn signal_name(signal: i32) -> String {
    let name = match signal {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGINT => "SIGINT",
        _ => return format!("signal {signal}"),
    };
    name.to_owned()
}

/// Sends a host's output to Daisy's log, a line an event, tagged with its library.
pub(super) async fn forward_output(
    module: String,
    pid: u32,
    stream: &'static str,
    out: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
) {
    let mut lines = tokio::io::BufReader::new(out).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let line: String = line.chars().take(4096).collect();
        tracing::warn!(plugin.module = %module, host.pid = pid, stream, "{line}");
    }
}
