// @generated automatically by Diesel CLI.

diesel::table! {
    api_keys (id) {
        id -> Uuid,
        name -> Text,
        token_sha256 -> Bytea,
        forms -> Nullable<Array<Nullable<Uuid>>>,
        admin -> Bool,
        created_at -> Timestamptz,
        last_used_at -> Nullable<Timestamptz>,
        revoked_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    plugin_quarantines (sha256, func) {
        sha256 -> Text,
        func -> Text,
        module -> Text,
        crashes -> Int4,
        quarantined_until -> Timestamptz,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    rate_slots (bucket) {
        bucket -> Text,
        next_at -> Timestamptz,
    }
}

diesel::table! {
    submissions (id) {
        id -> Uuid,
        form_id -> Uuid,
        payload -> Jsonb,
        created_at -> Timestamptz,
        context -> Nullable<Jsonb>,
    }
}

diesel::table! {
    sync_runs (id, started_at) {
        id -> Uuid,
        submission_id -> Uuid,
        form_id -> Uuid,
        task_id -> Uuid,
        task_name -> Text,
        state -> Text,
        error -> Nullable<Text>,
        output -> Nullable<Jsonb>,
        started_at -> Timestamptz,
        finished_at -> Timestamptz,
    }
}

diesel::table! {
    task_run_attempts (run_id, attempt, started_at) {
        run_id -> Uuid,
        attempt -> Int4,
        worker -> Text,
        started_at -> Timestamptz,
        finished_at -> Timestamptz,
        outcome -> Text,
        error -> Nullable<Text>,
    }
}

diesel::table! {
    task_runs (id) {
        id -> Uuid,
        submission_id -> Uuid,
        form_id -> Uuid,
        task_id -> Uuid,
        task_name -> Text,
        is_async -> Bool,
        state -> Text,
        attempts -> Int4,
        max_attempts -> Int4,
        last_error -> Nullable<Text>,
        output -> Nullable<Jsonb>,
        next_attempt_at -> Timestamptz,
        published_at -> Nullable<Timestamptz>,
        started_at -> Nullable<Timestamptz>,
        finished_at -> Nullable<Timestamptz>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        claim_token -> Nullable<Uuid>,
        lease_until -> Nullable<Timestamptz>,
        throttled_ms -> Int8,
        slot_at -> Nullable<Timestamptz>,
        trace_context -> Nullable<Text>,
        finished_by -> Nullable<Text>,
    }
}

diesel::table! {
    tasks (id) {
        id -> Uuid,
        form_id -> Uuid,
        name -> Text,
        module -> Text,
        func -> Text,
        async_status -> Bool,
        config -> Jsonb,
        enabled -> Bool,
        timeout_ms -> Int4,
        max_attempts -> Int4,
        created_at -> Timestamptz,
        isolation -> Nullable<Text>,
        rate_per_minute -> Nullable<Int4>,
        rate_group -> Nullable<Text>,
    }
}

diesel::joinable!(task_run_attempts -> task_runs (run_id));

diesel::allow_tables_to_appear_in_same_query!(
    api_keys,
    plugin_quarantines,
    rate_slots,
    submissions,
    sync_runs,
    task_run_attempts,
    task_runs,
    tasks,
);
