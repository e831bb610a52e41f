//! One delivery: claim its run, execute it (paced by its task's rate limit,
//! throttled by the APIs it calls), decide what becomes of it; and the
//! dead-letter queue's deliveries.

use std::{sync::Arc, time::Duration};

use tracing::Instrument;

use super::{Context, MAX_CRASH_COUNTS, WorkerConfig, batches::with_db};
use crate::{
    backoff::{Backoff, Policy},
    executor::{Outcome, RunRef, Submission},
    lifecycle::pause,
    queue::Delivery,
    registry::{ClaimRequest, Claimed, DeadLetter, Finish, Pace},
};

pub(super) async fn handle(ctx: Arc<Context>, delivery: Delivery) {
    let Some(run_id) = delivery.run_id else {
        tracing::warn!(body = %delivery.body, "dropping a message that is not a run id");
        delivery.ack();
        return;
    };
    let span =
        tracing::info_span!("delivery", run.id = %run_id, redelivered = delivery.redelivered);
    // A child of the Process call that accepted the run.
    if let Some(traceparent) = &delivery.traceparent {
        crate::trace::continue_trace(&span, traceparent);
    }
    let in_flight = ::metrics::gauge!(crate::metrics::WORKER_IN_FLIGHT);
    in_flight.increment(1.0);
    handle_run(ctx, delivery, run_id).instrument(span).await;
    in_flight.decrement(1.0);
}

async fn handle_run(ctx: Arc<Context>, delivery: Delivery, run_id: uuid::Uuid) {
    let _executing = ctx
        .executing
        .clone()
        .acquire_owned()
        .await
        .expect("the executing semaphore is never closed");
    if ctx.shutdown.is_cancelled() {
        // Prefetched, its turn came after the stop: not claimed, not acked;
        // the broker hands it to another worker when the channel closes.
        return;
    }
    let redelivered = delivery.redelivered;
    // One token per delivery: a claim retried after a lost answer is ours.
    let token = uuid::Uuid::new_v4();
    let request = ClaimRequest {
        run: run_id,
        redelivered,
        token,
    };
    let claimed = loop {
        let Some(claimed) = ctx.claims.call(request).await else {
            return; // shutting down: the broker redelivers
        };
        if let Some(claimed) = claimed {
            break claimed;
        }
        // A redelivered run may still be executing on a live worker (the
        // broker requeued its message when a connection dropped): wait
        // while its lease is alive, then take it over or find it finished.
        let live = redelivered
            && matches!(
                with_db(&ctx.registry, &ctx.shutdown, "lease check", move |r| {
                    r.held_by_live_lease(run_id)
                })
                .await,
                Some(Ok(true))
            );
        if !live || ctx.shutdown.is_cancelled() {
            tracing::debug!(run.id = %run_id, "already handled by another delivery");
            delivery.ack();
            return;
        }
        tokio::time::sleep(
            (ctx.config.lease / 4).clamp(Duration::from_millis(100), Duration::from_secs(5)),
        )
        .await;
    };
    ::metrics::counter!(crate::metrics::WORKER_CLAIMS).increment(1);
    ctx.held
        .lock()
        .expect("held runs poisoned")
        .insert(claimed.run_id, token);
    let finish = execute(&ctx, &claimed).await;
    let attempt = claimed.attempt;
    let finished = ctx.finishes.call((claimed, finish.clone())).await;
    ctx.held.lock().expect("held runs poisoned").remove(&run_id);
    if finished.is_none() {
        return;
    }
    let result = match &finish {
        Finish::Succeeded(_) => "succeeded",
        Finish::Retry { .. } => "retry",
        Finish::Dead { .. } => "dead",
        Finish::Throttled { .. } => "throttled",
        Finish::Paced { .. } => "paced",
    };
    ::metrics::counter!(crate::metrics::WORKER_FINISHES, "result" => result).increment(1);
    match &finish {
        Finish::Succeeded(_) => {
            tracing::info!(run.id = %run_id, attempt, "run succeeded")
        }
        Finish::Retry { error, after } => {
            tracing::warn!(run.id = %run_id, attempt, error = %error, retry_in_ms = after.as_millis() as u64, "run failed; will retry")
        }
        Finish::Dead { error } => {
            tracing::error!(run.id = %run_id, attempt, error = %error, "run is dead")
        }
        Finish::Throttled { error, after } => {
            tracing::info!(run.id = %run_id, attempt, error = %error, retry_in_ms = after.as_millis() as u64, "run throttled; will retry without using an attempt")
        }
        Finish::Paced { at } => {
            tracing::debug!(run.id = %run_id, start_at = %at, "run paced by its task's rate limit")
        }
    }
    delivery.ack();
}

/// Runs the claimed execution and decides what becomes of the run.
async fn execute(ctx: &Context, claimed: &Claimed) -> Finish {
    let form = claimed.form_id;
    let mut backoff = Backoff::reconnect();
    let tasks = loop {
        match ctx.catalog.tasks(form).await {
            Ok(tasks) => break tasks,
            Err(err) => {
                tracing::warn!(error = %err, "loading the form's tasks failed; retrying");
                if ctx.shutdown.is_cancelled() || !pause(&ctx.shutdown, backoff.next_delay()).await
                {
                    return Finish::Retry {
                        error: "worker shut down before running the task".into(),
                        after: Duration::ZERO,
                    };
                }
            }
        }
    };
    let Some(task) = tasks.iter().find(|t| t.id == claimed.task_id) else {
        return Finish::Dead {
            error: format!(
                "task {} is no longer attached to form {form}",
                claimed.task_id
            ),
        };
    };
    if !task.enabled {
        return Finish::Dead {
            error: format!("task '{}' is disabled", task.name),
        };
    }
    if let Some(pace) = task.pace() {
        if let Some(later) = pace_run(ctx, claimed, pace).await {
            return later;
        }
    }
    let submission = Submission {
        form_id: form.to_string(),
        submission_id: claimed.submission_id.to_string(),
        json: claimed.payload.to_string().into(),
        context_json: claimed
            .context
            .as_ref()
            .map_or_else(String::new, |c| c.to_string())
            .into(),
    };
    let run = RunRef {
        id: claimed.run_id,
        attempt: u32::try_from(claimed.attempt).unwrap_or(1),
    };
    let result = ctx.executor.run(task, &submission, run).await;
    let exhausted = claimed.attempt >= claimed.max_attempts;
    let crashes = {
        let mut counts = ctx.crashes.lock().expect("crash counts poisoned");
        // Only crashes this run's task likely caused count against it; a
        // neighbour in flight is retried as usual.
        let crashed = matches!(result.outcome, Outcome::Crashed { suspect: true, .. });
        let count = if crashed {
            if counts.len() >= MAX_CRASH_COUNTS {
                // Bounded: forget an arbitrary run's count.
                if let Some(&any) = counts.keys().next() {
                    counts.remove(&any);
                }
            }
            let count = counts.entry(claimed.run_id).or_insert(0);
            *count += 1;
            *count
        } else {
            0
        };
        if !crashed || count >= ctx.config.max_crashes {
            counts.remove(&claimed.run_id);
        }
        count
    };
    let (error, retryable, asked) = match result.outcome {
        Outcome::Succeeded(output) => match output.into_value() {
            Ok(output) => return Finish::Succeeded(output),
            Err(error) => (error, false, None),
        },
        Outcome::Crashed { error, .. } if crashes >= ctx.config.max_crashes.max(1) => {
            return Finish::Dead {
                error: format!("its plugin host crashed {crashes} times while running it: {error}"),
            };
        }
        Outcome::Crashed { error, .. } => (error, true, None),
        Outcome::Failed {
            error,
            retryable,
            retry_after,
        } => (error, retryable, retry_after),
        Outcome::TimedOut(error) => (error, true, None),
    };
    if let (true, Some(asked)) = (retryable, asked) {
        // The API asked to come back later: a throttle, not a failure of
        // the run. It waits (with jitter, so throttled runs do not all come
        // back at once) without using an attempt, up to --max-throttled-ms.
        let after = throttle_delay(asked).min(ctx.config.retry_max);
        if claimed.throttled + after <= ctx.config.max_throttled {
            return Finish::Throttled {
                error: format!("throttled, retrying in {} ms: {error}", after.as_millis()),
                after,
            };
        }
    }
    if !retryable {
        Finish::Dead { error }
    } else if exhausted {
        Finish::Dead {
            error: format!("gave up after {} attempts: {error}", claimed.attempt),
        }
    } else {
        // Our backoff, or longer when the plugin passed on a Retry-After.
        let backoff = retry_delay(&ctx.config, claimed.attempt);
        // Clamped: a plugin's Retry-After never postpones a run beyond
        // --retry-max-ms.
        Finish::Retry {
            error,
            after: asked
                .map_or(backoff, |asked| asked.max(backoff))
                .min(ctx.config.retry_max),
        }
    }
}

/// How close to its start time a paced run may be started.
const SLOT_SLACK: Duration = Duration::from_millis(50);

/// Takes the run's start time from its task's rate limit (`pace`): `None`
/// when it may start now, else [`Finish::Paced`] with the start time it
/// reserved. A run coming back to a slot it holds starts at once, unless the
/// slot is long past (the workers were away meanwhile): starting every such
/// run at once would burst, so it reserves a new one.
async fn pace_run(ctx: &Context, claimed: &Claimed, pace: Pace) -> Option<Finish> {
    let now = chrono::Utc::now();
    let tolerance = pace.interval.max(Duration::from_secs(5));
    let holds = claimed.slot_at.is_some_and(|at| {
        at <= now + SLOT_SLACK && (now - at).to_std().is_ok_and(|late| late <= tolerance)
    });
    if holds {
        return None;
    }
    match with_db(&ctx.registry, &ctx.shutdown, "rate limit", move |r| {
        r.reserve_slot(&pace)
    })
    .await
    {
        Some(Ok(at)) if at <= now + SLOT_SLACK => None,
        Some(Ok(at)) => Some(Finish::Paced { at }),
        Some(Err(err)) => Some(Finish::Retry {
            error: format!("reserving a start time under the task's rate limit failed: {err}"),
            after: retry_delay(&ctx.config, claimed.attempt),
        }),
        // Shutting down: back to the queue as it was.
        None => Some(Finish::Throttled {
            error: "worker shut down before running the task".into(),
            after: Duration::ZERO,
        }),
    }
}

/// The wait after an API's Retry-After of `asked`: that, plus up to a
/// quarter of it (at least up to a second) at random.
pub fn throttle_delay(asked: Duration) -> Duration {
    let spread = (asked / 4).max(Duration::from_secs(1));
    asked + spread.mul_f64(fastrand::f64())
}

/// The delay before attempt `attempt + 1`: base × 2^(attempt−1), capped, ±25%.
pub fn retry_delay(config: &WorkerConfig, attempt: i32) -> Duration {
    let doublings = u32::try_from(attempt.saturating_sub(1)).unwrap_or(0);
    Policy::new(config.retry_base, config.retry_max).delay(doublings)
}

pub(super) async fn handle_dead_letter(ctx: Arc<Context>, delivery: Delivery) {
    let Some(run_id) = delivery.run_id else {
        delivery.ack();
        return;
    };
    let reason = format!(
        "delivery limit reached: the worker died {} times while running it (see the worker logs)",
        ctx.config.queue.delivery_limit
    );
    let result = match with_db(&ctx.registry, &ctx.shutdown, "dead letter", move |r| {
        r.dead_lettered(run_id, &reason)
    })
    .await
    {
        None => return,
        Some(Ok(result)) => result,
        Some(Err(err)) => {
            tracing::error!(run.id = %run_id, error = %err, "recording a dead letter failed; dropping the message");
            delivery.ack();
            return;
        }
    };
    match result {
        DeadLetter::MarkedDead => {
            tracing::error!(run.id = %run_id, "run killed its workers repeatedly; marked dead")
        }
        DeadLetter::Republish => {
            tracing::warn!(run.id = %run_id, "dead-lettered before it ran; handed back to the relay")
        }
        DeadLetter::Ignored => {}
    }
    delivery.ack();
}
