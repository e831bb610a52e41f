// @generated automatically by Diesel CLI.

diesel::table! {
    answers (response_id, question_id) {
        response_id -> Uuid,
        question_id -> Uuid,
        value -> Jsonb,
    }
}

diesel::table! {
    forms (id) {
        id -> Uuid,
        title -> Text,
        metadata -> Jsonb,
        created_at -> Timestamptz,
        owner_email -> Nullable<Text>,
    }
}

diesel::table! {
    questions (id) {
        id -> Uuid,
        form_id -> Uuid,
        key -> Text,
        label -> Text,
        kind -> Text,
        required -> Bool,
        options -> Jsonb,
        position -> Int4,
        metadata -> Jsonb,
    }
}

diesel::table! {
    responses (id) {
        id -> Uuid,
        form_id -> Uuid,
        metadata -> Jsonb,
        submitted_at -> Timestamptz,
        post_processing -> Text,
        post_processed_at -> Nullable<Timestamptz>,
        post_processing_error -> Nullable<Text>,
    }
}

diesel::joinable!(answers -> questions (question_id));
diesel::joinable!(answers -> responses (response_id));
diesel::joinable!(questions -> forms (form_id));
diesel::joinable!(responses -> forms (form_id));

diesel::allow_tables_to_appear_in_same_query!(answers, forms, questions, responses,);
