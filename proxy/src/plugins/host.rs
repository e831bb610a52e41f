//! The plugin host: `daisy plugin-host`, the child process that runs one
//! library's plugin code so that a crash, hang or leak takes down only it.
//!
//! Daisy starts it with one end of a Unix socket pair as stdin and a
//! scrubbed environment. It loads the library, says [`Hello`], then reads
//! requests on the main thread and runs them on a fixed pool of threads;
//! replies go out through one writer thread, batched. It holds no tokio
//! runtime and no database or broker connection. When the socket closes
//! (Daisy retired it, or Daisy died) it exits at once, whatever its threads
//! are doing.

use std::{
    collections::HashMap,
    io::Write,
    os::{fd::FromRawFd, unix::net::UnixStream},
    path::PathBuf,
    sync::{Arc, Mutex, OnceLock, mpsc},
    thread,
};

use plugin_api::host::{Library, RunInput, TaskHandle};
use prost::Message;

use super::wire::{self, ErrorKind, Hello, Reply, Request, WireError};

/// What `daisy plugin-host` is told on its command line.
#[derive(Debug, Clone)]
pub struct HostArgs {
    /// The private copy of the library to load.
    pub library: PathBuf,
    /// The module's name, for messages.
    pub module: String,
    /// Threads running tasks.
    pub threads: usize,
    /// Resident memory above which the host reports itself over its limit.
    pub memory_limit_mib: u64,
}

struct Instance {
    func: String,
    config_json: String,
    task: OnceLock<Result<Arc<TaskHandle>, String>>,
}

/// Runs the host until Daisy closes the socket; never returns.
pub fn main(args: HostArgs) -> ! {
    // SAFETY: fd 0 is the socket Daisy passed; it is dup'ed before /dev/null
    // takes its place, so plugin code reading stdin cannot eat our frames.
    let socket = unsafe {
        let fd = libc::dup(0);
        if fd < 0 {
            libc::_exit(70);
        }
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::close(null);
        }
        UnixStream::from_raw_fd(fd)
    };
    let mut reader = socket.try_clone().unwrap_or_else(|_| exit(71));
    let (replies, outbox) = mpsc::channel::<Vec<u8>>();
    thread::Builder::new()
        .name("plugin-host-writer".into())
        .spawn(move || write_replies(socket, outbox))
        .unwrap_or_else(|_| exit(71));

    let library = match Library::load(&args.library) {
        Ok(library) => {
            let hello = Hello {
                error: String::new(),
                name: library.name().into(),
                version: library.version().into(),
                api_version: library.api_version().into(),
                tasks: library.tasks().map(str::to_owned).collect(),
            };
            send(&replies, &hello);
            library
        }
        Err(err) => {
            send(
                &replies,
                &Hello {
                    error: err.to_string(),
                    ..Default::default()
                },
            );
            // Let the writer deliver the Hello; Daisy then closes the socket.
            drop(replies);
            loop {
                if matches!(wire::read_blocking(&mut reader), Ok(None) | Err(_)) {
                    exit(0);
                }
            }
        }
    };

    let instances: Arc<Mutex<HashMap<u64, Arc<Instance>>>> = Arc::default();
    let (work, queue) = mpsc::channel::<(Request, Arc<Instance>)>();
    let queue = Arc::new(Mutex::new(queue));
    for i in 0..args.threads.max(1) {
        let (queue, replies, module) = (queue.clone(), replies.clone(), args.module.clone());
        let limit = args.memory_limit_mib;
        thread::Builder::new()
            .name(format!("plugin-run-{i}"))
            .spawn(move || {
                loop {
                    let next = queue.lock().map(|q| q.recv());
                    let Ok(Ok((request, instance))) = next else {
                        return;
                    };
                    let reply = run(&library, &module, limit, request, &instance);
                    send(&replies, &reply);
                }
            })
            .unwrap_or_else(|_| exit(71));
    }

    loop {
        let body = match wire::read_blocking(&mut reader) {
            Ok(Some(body)) => body,
            // Daisy closed the socket (or died): leave now, hung threads and all.
            Ok(None) | Err(_) => exit(0),
        };
        let Ok(mut request) = Request::decode(&body[..]) else {
            exit(72);
        };
        let instance = {
            let mut instances = instances.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(create) = request.create.take() {
                instances
                    .entry(request.instance)
                    .or_insert_with(|| {
                        Arc::new(Instance {
                            func: create.func,
                            config_json: create.config_json,
                            task: OnceLock::new(),
                        })
                    })
                    .clone()
            } else if let Some(found) = instances.get(&request.instance) {
                found.clone()
            } else {
                send(
                    &replies,
                    &failure(
                        request.id,
                        ErrorKind::Retryable,
                        "plugin host lost the task's definition".into(),
                    ),
                );
                continue;
            }
        };
        if work.send((request, instance)).is_err() {
            exit(71);
        }
    }
}

fn run(
    library: &Library,
    module: &str,
    memory_limit_mib: u64,
    request: Request,
    instance: &Instance,
) -> Reply {
    // Concurrent first runs of one instance wait for one constructor; other
    // instances are not held up by it.
    let task = instance.task.get_or_init(|| {
        library
            .instantiate(&instance.func, &instance.config_json)
            .map(Arc::new)
            .map_err(|err| err.to_string())
    });
    let task = match task {
        Ok(task) => task,
        Err(err) => return failure(request.id, ErrorKind::Create, err.clone()),
    };
    let outcome = task.run(RunInput {
        form_id: &request.form_id,
        submission_id: &request.submission_id,
        submission_json: &request.submission_json,
        attempt: request.attempt,
    });
    if memory_limit_mib > 0 {
        let resident = resident_mib();
        if resident > memory_limit_mib {
            return failure(
                request.id,
                ErrorKind::OverMemory,
                format!(
                    "plugin host for '{module}' went over its memory limit ({resident} MiB resident, limit {memory_limit_mib} MiB); the host is recycled"
                ),
            );
        }
    }
    match outcome {
        Ok(output) => Reply {
            id: request.id,
            output_json: Some(output.to_string()),
            error: None,
        },
        Err(err) => {
            let kind = if err.is_retryable() {
                ErrorKind::Retryable
            } else {
                ErrorKind::Permanent
            };
            let mut reply = failure(request.id, kind, err.message().to_owned());
            if let Some(error) = reply.error.as_mut() {
                error.retry_after_ms = err
                    .retry_after()
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            }
            reply
        }
    }
}

fn failure(id: u64, kind: ErrorKind, message: String) -> Reply {
    Reply {
        id,
        output_json: None,
        error: Some(WireError {
            kind: kind as i32,
            message,
            retry_after_ms: 0,
        }),
    }
}

fn send(replies: &mpsc::Sender<Vec<u8>>, message: &impl Message) {
    let mut frame = Vec::new();
    wire::encode(message, &mut frame);
    // The writer only stops when the socket is gone, and then we exit.
    let _ = replies.send(frame);
}

/// Writes queued frames, as many per `write` as are waiting.
fn write_replies(mut socket: UnixStream, frames: mpsc::Receiver<Vec<u8>>) {
    while let Ok(mut batch) = frames.recv() {
        while let Ok(more) = frames.try_recv() {
            batch.extend_from_slice(&more);
        }
        if socket.write_all(&batch).is_err() {
            exit(0);
        }
    }
}

/// This process's resident memory, from `/proc/self/statm`.
fn resident_mib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    (pages * page) >> 20
}

/// Leaves without running atexit handlers or destructors: plugin threads
/// may still be running, and nothing here needs flushing.
fn exit(code: i32) -> ! {
    // SAFETY: `_exit` ends the process; no Rust code runs after it.
    unsafe { libc::_exit(code) }
}
