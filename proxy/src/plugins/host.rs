//! The plugin host: `daisy plugin-host`, the child process that runs one
//! library's plugin code so that a crash, hang or leak takes down only it.
//! This is the code inside that process; Daisy's side of one host (spawning
//! it, calls, its death) is `plugins::host_process`.
//!
//! Daisy starts it with one end of a Unix socket pair as stdin and a
//! scrubbed environment. It loads the library, says [`Hello`], then a fixed
//! pool of threads takes turns reading a request and running it; replies
//! are written by whichever thread has one, batched under load. It holds no tokio
//! runtime and no database or broker connection. When the socket closes
//! (Daisy retired it, or Daisy died) it exits at once, whatever its threads
//! are doing.

use std::{
    collections::HashMap,
    io::{BufReader, Write},
    os::{fd::FromRawFd, unix::net::UnixStream},
    path::PathBuf,
    sync::{Arc, Mutex, OnceLock},
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

/// The task instances defined so far, by id.
type Instances = HashMap<u64, Arc<Instance>>;

/// What the host's threads share.
struct Shared {
    /// The socket's reading end and the instances defined so far: whoever
    /// holds it reads the next request (leader/follower, so a request goes
    /// from the socket to the thread that runs it without a hand-off).
    reader: Mutex<(BufReader<UnixStream>, Instances)>,
    replies: Replies,
    library: Library,
    module: String,
    memory_limit_mib: u64,
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
    let replies = Replies {
        socket,
        queue: Mutex::new((Vec::new(), false)),
    };
    let library = match Library::load(&args.library) {
        Ok(library) => {
            replies.send(&Hello {
                error: String::new(),
                name: library.name().into(),
                version: library.version().into(),
                api_version: library.api_version().into(),
                tasks: library.tasks().map(str::to_owned).collect(),
                schemas: library
                    .tasks()
                    .filter_map(|task| {
                        let schema = library.config_schema(task)?;
                        Some((task.to_owned(), schema.to_string()))
                    })
                    .collect(),
            });
            library
        }
        Err(err) => {
            replies.send(&Hello {
                error: err.to_string(),
                ..Default::default()
            });
            // Daisy closes the socket once it has read the Hello.
            loop {
                if matches!(wire::read_blocking(&mut reader), Ok(None) | Err(_)) {
                    exit(0);
                }
            }
        }
    };
    let shared = Arc::new(Shared {
        // Many requests in one read when many calls are in flight; the
        // next thread to lead takes the buffered ones without a read.
        reader: Mutex::new((BufReader::with_capacity(64 * 1024, reader), HashMap::new())),
        replies,
        library,
        module: args.module,
        memory_limit_mib: args.memory_limit_mib,
    });
    for i in 1..args.threads.max(1) {
        let shared = shared.clone();
        thread::Builder::new()
            .name(format!("plugin-run-{i}"))
            .spawn(move || serve(&shared))
            .unwrap_or_else(|_| exit(71));
    }
    serve(&shared)
}

/// Takes the next request off the socket, runs it, replies; forever.
fn serve(shared: &Shared) -> ! {
    loop {
        let (request, instance) = next_request(shared);
        let reply = run(
            &shared.library,
            &shared.module,
            shared.memory_limit_mib,
            request,
            &instance,
        );
        shared.replies.send(&reply);
    }
}

fn next_request(shared: &Shared) -> (Request, Arc<Instance>) {
    let mut guard = shared.reader.lock().unwrap_or_else(|p| p.into_inner());
    let (reader, instances) = &mut *guard;
    loop {
        let body = match wire::read_blocking(reader) {
            Ok(Some(body)) => body,
            // Daisy closed the socket (or died): leave now, hung threads and all.
            Ok(None) | Err(_) => exit(0),
        };
        let Ok(mut request) = Request::decode(&body[..]) else {
            exit(72);
        };
        let instance = match request.create.take() {
            Some(create) => instances
                .entry(request.instance)
                .or_insert_with(|| {
                    Arc::new(Instance {
                        func: create.func,
                        config_json: create.config_json,
                        task: OnceLock::new(),
                    })
                })
                .clone(),
            None => match instances.get(&request.instance) {
                Some(found) => found.clone(),
                None => {
                    shared.replies.send(&failure(
                        request.id,
                        ErrorKind::Retryable,
                        "plugin host lost the task's definition".into(),
                    ));
                    continue;
                }
            },
        };
        return (request, instance);
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
    // The output goes on as the plugin wrote it; Daisy's side parses it
    // (and refuses text that is not JSON) into whatever it needs.
    let outcome = task.run_json(RunInput {
        form_id: &request.form_id,
        submission_id: &request.submission_id,
        submission_json: &request.submission_json,
        attempt: request.attempt,
        run_id: &request.run_id,
        context_json: &request.context_json,
    });
    if memory_limit_mib > 0 {
        let peak = peak_resident_mib();
        if peak > memory_limit_mib {
            return failure(
                request.id,
                ErrorKind::OverMemory,
                format!(
                    "plugin host for '{module}' went over its memory limit ({peak} MiB resident at its peak, limit {memory_limit_mib} MiB); the host is recycled"
                ),
            );
        }
    }
    match outcome {
        Ok(output) => Reply {
            id: request.id,
            output_json: Some(output),
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

/// The socket's writing end. A thread with a reply appends it to the
/// queue; if no thread is writing, it becomes the writer and writes
/// everything queued (its own reply, and whatever others append meanwhile)
/// until the queue is empty. One write per reply when idle, batches under
/// load, and no hand-off to another thread either way.
struct Replies {
    socket: UnixStream,
    /// Frames waiting, and whether a thread is writing.
    queue: Mutex<(Vec<u8>, bool)>,
}

impl Replies {
    fn send(&self, message: &impl Message) {
        {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            wire::encode(message, &mut queue.0);
            if queue.1 {
                return; // the writer takes it
            }
            queue.1 = true;
        }
        loop {
            let batch = {
                let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                if queue.0.is_empty() {
                    queue.1 = false;
                    return;
                }
                std::mem::take(&mut queue.0)
            };
            if (&self.socket).write_all(&batch).is_err() {
                exit(0); // Daisy is gone
            }
        }
    }
}

/// The most memory this process has had resident, from `getrusage`: one
/// syscall per run (reading `/proc/self/statm` took three and a path
/// walk), and a run that allocates past the limit and frees it again
/// before returning is still caught.
fn peak_resident_mib() -> u64 {
    // SAFETY: getrusage writes only the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
            return 0;
        }
        usage
    };
    // Linux reports it in KiB.
    u64::try_from(usage.ru_maxrss).unwrap_or(0) >> 10
}

/// Leaves without running atexit handlers or destructors: plugin threads
/// may still be running, and nothing here needs flushing.
fn exit(code: i32) -> ! {
    // SAFETY: `_exit` ends the process; no Rust code runs after it.
    unsafe { libc::_exit(code) }
}
