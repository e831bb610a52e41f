//! `slang`: finds the slang in a text answer, using the dictionary of the
//! city given by another answer (synchronous), as in the original brief.
//!
//! Output: `{"city": "...", "known_city": bool, "matches": [{"term", "meaning"}]}`.
//! See README.md for the config.

use std::collections::HashMap;

use plugin_api::{Input, Task, TaskError, Value, json};
use schemars::JsonSchema;
use serde::Deserialize;

/// The lookup task.
pub struct Slang {
    text_field: String,
    city_field: String,
    /// Lower-cased city → lower-cased term → meaning.
    dictionaries: HashMap<String, HashMap<String, String>>,
}

/// City → term → meaning.
type Dictionaries = HashMap<String, HashMap<String, String>>;

/// The task's config.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct Config {
    /// The answer holding the text to look in.
    #[serde(default = "default_text_field")]
    pub text_field: String,
    /// The answer naming the city whose dictionary applies.
    #[serde(default = "default_city_field")]
    pub city_field: String,
    /// The dictionaries: city → {term: meaning}.
    pub dictionaries: Dictionaries,
}

fn default_text_field() -> String {
    "text".into()
}

fn default_city_field() -> String {
    "city".into()
}

/// The dictionaries with cities and terms lower-cased.
fn lowered(dictionaries: Dictionaries) -> Dictionaries {
    dictionaries
        .into_iter()
        .map(|(city, terms)| {
            let terms = terms
                .into_iter()
                .map(|(term, meaning)| (term.to_lowercase(), meaning))
                .collect();
            (city.to_lowercase(), terms)
        })
        .collect()
}

impl Slang {
    /// Builds the task from its dictionaries (task configs name no files).
    pub fn new(config: Config) -> Result<Self, TaskError> {
        let dictionaries = config.dictionaries;
        Ok(Slang {
            text_field: config.text_field,
            city_field: config.city_field,
            dictionaries: lowered(dictionaries),
        })
    }
}

/// The words of `text`, lower-cased, and the text itself normalised for phrases.
fn words(text: &str) -> (Vec<String>, String) {
    let lowered = text.to_lowercase();
    let words: Vec<String> = lowered
        .split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect();
    let normalised = format!(" {} ", words.join(" "));
    (words, normalised)
}

impl Task for Slang {
    fn run(&self, input: &Input) -> Result<Value, TaskError> {
        let answers = input.answers();
        let get = |field: &str| answers.get(field).and_then(Value::as_str);
        let text = get(&self.text_field)
            .ok_or_else(|| TaskError::permanent(format!("no text answer '{}'", self.text_field)))?;
        let city = get(&self.city_field)
            .ok_or_else(|| TaskError::permanent(format!("no city answer '{}'", self.city_field)))?;
        let Some(dictionary) = self.dictionaries.get(&city.trim().to_lowercase()) else {
            return Ok(json!({ "city": city, "known_city": false, "matches": [] }));
        };
        let (words, normalised) = words(text);
        let mut matches: Vec<(&String, &String)> = dictionary
            .iter()
            .filter(|(term, _)| {
                if term.contains(' ') {
                    normalised.contains(&format!(" {term} "))
                } else {
                    words.iter().any(|w| w == *term)
                }
            })
            .collect();
        // In the order they appear in the text.
        matches
            .sort_by_key(|(term, _)| normalised.find(&format!(" {term} ")).unwrap_or(usize::MAX));
        Ok(json!({
            "city": city,
            "known_city": true,
            "matches": matches.iter().map(|(term, meaning)| json!({"term": term, "meaning": meaning})).collect::<Vec<_>>(),
        }))
    }
}

plugin_api::export_plugin!("slang" => Slang::new);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_words_and_phrases_of_the_right_city_only() {
        let task = Slang::new(plugin_api::decode_config(json!({
            "text_field": "comment", "city_field": "city",
            "dictionaries": {
                "Lagos": {"wahala": "trouble", "no wahala": "no problem", "japa": "to emigrate"},
                "London": {"innit": "isn't it"},
            },
        })).expect("config"))
        .expect("config");
        let input = |comment: &str, city: &str| {
            Input::new(
                "f",
                "s",
                json!({"answers": {"comment": comment, "city": city}}),
                1,
            )
        };

        let out = task
            .run(&input("No wahala, but my cousin wants to JAPA!", "lagos"))
            .expect("runs");
        assert_eq!(out["known_city"], true);
        let terms: Vec<_> = out["matches"]
            .as_array()
            .expect("matches")
            .iter()
            .map(|m| m["term"].clone())
            .collect();
        assert_eq!(terms, [json!("no wahala"), json!("wahala"), json!("japa")]);

        let london = task.run(&input("wahala innit", "London")).expect("runs");
        assert_eq!(
            london["matches"],
            json!([{"term": "innit", "meaning": "isn't it"}])
        );

        let unknown = task.run(&input("wahala", "Paris")).expect("runs");
        assert_eq!(
            unknown,
            json!({"city": "Paris", "known_city": false, "matches": []})
        );

        let missing = task.run(&Input::new(
            "f",
            "s",
            json!({"answers": {"city": "Lagos"}}),
            1,
        ));
        assert!(missing.is_err_and(|e| e.message().contains("no text answer 'comment'")));
    }
}
