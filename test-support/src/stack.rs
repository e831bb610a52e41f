//! A whole Daisy for plugin tests ([`Stack`]): a migrated database, a
//! plugins directory, queues, `daisy serve` and `daisy worker` tuned for
//! tests with their logs kept, and a client; shown the logs if the test
//! fails.

use std::time::Duration;

use proto::v1::post_sub_proxy_client::PostSubProxyClient;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::{
    artifacts::PluginsDir,
    broker::TestQueue,
    daisy::{Daisy, Launcher, wait_for_runs},
    db::TestDb,
    net::free_port,
};

/// A whole Daisy for plugin tests: a migrated database, a plugins directory,
/// queues of its own, `daisy serve` and `daisy worker` processes (with extra
/// environment for the plugins), and a client.
pub struct Stack {
    // The processes go first: fields drop in order, and a live worker would
    // declare the queues again after `queue` deleted them.
    _serve: Daisy,
    _worker: Daisy,
    more_workers: Vec<Daisy>,
    daisy: Launcher,
    /// The processes' stderr, one file each; shown if the test fails.
    logs: tempfile::TempDir,
    /// Daisy's database.
    pub db: TestDb,
    /// The plugins directory.
    pub plugins: PluginsDir,
    /// The queues.
    pub queue: TestQueue,
    /// A client of `daisy serve`.
    pub client: PostSubProxyClient<Channel>,
}

impl Stack {
    /// Installs `plugins` (crate lib name, module) and starts Daisy with `env`.
    pub async fn start(plugins: &[(&str, &str)], env: &[(&str, &str)]) -> Stack {
        Self::start_with(plugins, env, &[], &[]).await
    }

    /// [`Stack::start`], with extra arguments for `serve` and for `worker`.
    pub async fn start_with(
        plugins: &[(&str, &str)],
        env: &[(&str, &str)],
        serve_args: &[&str],
        worker_args: &[&str],
    ) -> Stack {
        let (db, dir, queue) = (TestDb::daisy(), PluginsDir::new(), TestQueue::new());
        for (krate, module) in plugins {
            dir.install(krate, module);
        }
        let logs = tempfile::tempdir().expect("a logs directory");
        let daisy = Launcher::test(&db.url, dir.path(), &queue, &queue.url)
            .env(env)
            .logs(logs.path());
        let serve = daisy.serve(free_port(), serve_args);
        let worker = daisy.worker(worker_args);
        let client = serve.client().await;
        Stack {
            db,
            plugins: dir,
            queue,
            client,
            _serve: serve,
            _worker: worker,
            more_workers: Vec::new(),
            daisy,
            logs,
        }
    }

    /// Everything `serve` and the workers wrote to stderr so far (their
    /// logs, at `RUST_LOG`'s level: `error` unless `env` says otherwise).
    pub fn logs(&self) -> String {
        let mut all = String::new();
        if let Ok(dir) = std::fs::read_dir(self.logs.path()) {
            let mut files: Vec<_> = dir.flatten().map(|e| e.path()).collect();
            files.sort();
            for file in files {
                all.push_str(&std::fs::read_to_string(&file).unwrap_or_default());
            }
        }
        all
    }

    /// Starts one more `daisy worker` on the same database and queues.
    pub fn add_worker(&mut self) {
        self.more_workers.push(self.daisy.worker(&[]));
    }

    /// Attaches a task with plain SQL; returns its id.
    pub fn attach(
        &self,
        form: Uuid,
        name: &str,
        module: &str,
        func: &str,
        is_async: bool,
        config: &serde_json::Value,
    ) -> Uuid {
        self.db.attach(form, name, module, func, is_async, config)
    }

    /// Calls Process with a new submission id; returns it and the response.
    pub async fn process(
        &mut self,
        form: Uuid,
        submission: serde_json::Value,
    ) -> (String, proto::v1::ProcessResponse) {
        self.process_with(form, submission, None).await
    }

    /// Calls Process with a new submission id and `context`; returns the
    /// submission id and the response.
    pub async fn process_with(
        &mut self,
        form: Uuid,
        submission: serde_json::Value,
        context: Option<proto::v1::SubmissionContext>,
    ) -> (String, proto::v1::ProcessResponse) {
        let submission_id = Uuid::new_v4().to_string();
        let request = proto::v1::ProcessRequest {
            form_id: form.to_string(),
            submission_id: submission_id.clone(),
            submission: Some(proto::json::json_to_struct(submission).expect("a JSON object")),
            context,
        };
        let response = self
            .client
            .process(request)
            .await
            .expect("Process answers OK")
            .into_inner();
        (submission_id, response)
    }

    /// Waits until the submission's asynchronous runs are settled
    /// (succeeded or dead) and returns all its runs.
    pub async fn settled(&mut self, submission_id: &str, limit: Duration) -> Vec<proto::v1::Run> {
        use proto::v1::RunState;
        wait_for_runs(&mut self.client, submission_id, limit, |runs| {
            runs.iter().any(|r| r.is_async)
                && runs
                    .iter()
                    .all(|r| matches!(r.state(), RunState::Succeeded | RunState::Dead))
        })
        .await
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // A failing test shows what the processes logged.
        if std::thread::panicking() {
            eprintln!(
                "--- daisy logs ---\n{}--- end of daisy logs ---",
                self.logs()
            );
        }
    }
}
