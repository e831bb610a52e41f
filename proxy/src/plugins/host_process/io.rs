//! A host's tasks: frames out, replies in (and, when the socket closes,
//! the cause of the host's death for every call in flight), output to the
//! log.

use std::{
    os::unix::process::ExitStatusExt,
    sync::{Arc, Mutex, atomic::Ordering},
};

use prost::Message;
use tokio::{io::AsyncBufReadExt, sync::Notify};

use super::Host;
use crate::plugins::wire::{self, Reply};

/// The socket's writing end, shared by the calls. A call that is alone on
/// its host, and finds no write in progress, writes its frame itself, at
/// once, with a non-blocking write (no hand-off to another task: one
/// wake-up less per run when calls are few). Otherwise its frame is queued:
/// the writer task lets every task that is ready run first, then writes
/// all that is queued in one write, so calls that come together cost the
/// host one wake-up and both sides one system call (batches when calls are
/// many). What a direct write leaves unwritten is queued too.
pub(super) struct Frames {
    socket: tokio::net::unix::OwnedWriteHalf,
    queue: Mutex<Queue>,
    wake: Notify,
}

#[derive(Default)]
struct Queue {
    /// Bytes the writer task has yet to write; empty unless `writing`.
    bytes: Vec<u8>,
    /// The writer task owns the socket until the queue is empty.
    writing: bool,
    /// The socket failed, or the host is gone.
    closed: bool,
}

impl Frames {
    pub(super) fn new(socket: tokio::net::unix::OwnedWriteHalf) -> Frames {
        Frames {
            socket,
            queue: Mutex::default(),
            wake: Notify::new(),
        }
    }

    /// Sends `frame`, in order with every frame sent before it: written at
    /// once unless `batch` (other calls are in flight, so more frames are
    /// likely to follow within the scheduler's round); false once the socket
    /// failed or was closed.
    pub(super) fn send(&self, frame: &[u8], batch: bool) -> bool {
        let mut queue = self.queue.lock().expect("frames poisoned");
        if queue.closed {
            return false;
        }
        if queue.writing || batch {
            queue.bytes.extend_from_slice(frame);
            if !queue.writing {
                queue.writing = true;
                self.wake.notify_one();
            }
            return true;
        }
        let written = match self.socket.try_write(frame) {
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(_) => {
                queue.closed = true;
                return false;
            }
        };
        if written < frame.len() {
            queue.bytes.extend_from_slice(&frame[written..]);
            queue.writing = true;
            self.wake.notify_one();
        }
        true
    }

    /// Ends the writer task; later sends fail.
    pub(super) fn close(&self) {
        self.queue.lock().expect("frames poisoned").closed = true;
        self.wake.notify_one();
    }
}

/// Writes what [`Frames::send`] queued, until the frames are closed.
pub(super) async fn write_frames(frames: Arc<Frames>) {
    loop {
        frames.wake.notified().await;
        // Let the tasks that are ready run first: the frames they send
        // join this write.
        tokio::task::yield_now().await;
        loop {
            let batch = {
                let mut queue = frames.queue.lock().expect("frames poisoned");
                if queue.closed {
                    return;
                }
                if queue.bytes.is_empty() {
                    queue.writing = false;
                    break;
                }
                std::mem::take(&mut queue.bytes)
            };
            let mut at = 0;
            while at < batch.len() {
                let written = match frames.socket.writable().await {
                    Ok(()) => match frames.socket.try_write(&batch[at..]) {
                        Ok(n) => Ok(n),
                        Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
                        Err(err) => Err(err),
                    },
                    Err(err) => Err(err),
                };
                match written {
                    Ok(n) => at += n,
                    Err(_) => {
                        frames.queue.lock().expect("frames poisoned").closed = true;
                        return;
                    }
                }
            }
        }
    }
}

pub(super) async fn read_replies(
    host: Arc<Host>,
    socket: tokio::net::unix::OwnedReadHalf,
    mut child: tokio::process::Child,
) {
    // Many replies in one read when many calls are in flight.
    let mut socket = tokio::io::BufReader::with_capacity(64 * 1024, socket);
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
