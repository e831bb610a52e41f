// @generated automatically by Diesel CLI.

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
    }
}
