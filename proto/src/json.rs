//! Conversions between protobuf's `Struct`/`Value` and `serde_json::Value`.

use prost_types::{ListValue, Struct, Value, value::Kind};
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};
use serde_json::Value as Json;

/// A protobuf `Struct` as a JSON object.
pub fn struct_to_json(s: &Struct) -> Json {
    Json::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_to_json(v)))
            .collect(),
    )
}

/// A protobuf `Value` as JSON. Whole numbers become integers, so a plugin
/// sees `3`, not `3.0`.
pub fn value_to_json(v: &Value) -> Json {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::BoolValue(b)) => Json::Bool(*b),
        Some(Kind::NumberValue(n)) => match whole(*n) {
            Some(i) => Json::from(i),
            None => serde_json::Number::from_f64(*n).map_or(Json::Null, Json::Number),
        },
        Some(Kind::StringValue(s)) => Json::String(s.clone()),
        Some(Kind::ListValue(l)) => Json::Array(l.values.iter().map(value_to_json).collect()),
        Some(Kind::StructValue(s)) => struct_to_json(s),
    }
}

/// `n` as an integer if it is a whole number that a double holds exactly,
/// so that a plugin sees `3`, not `3.0`.
fn whole(n: f64) -> Option<i64> {
    (n.fract() == 0.0 && n.abs() < 9_007_199_254_740_992.0).then_some(n as i64)
}

/// A protobuf `Struct` as JSON text: what [`struct_to_json`] and then
/// `to_string` give, written straight from the message without building a
/// `serde_json::Value` on the way (the submit path's copy of a submission).
pub fn struct_to_json_text(s: &Struct) -> String {
    serde_json::to_string(&AsJson::Struct(s)).expect("JSON text of a Struct has no failure case")
}

/// A protobuf message serialized as the JSON [`value_to_json`] makes of it.
enum AsJson<'a> {
    Struct(&'a Struct),
    Value(&'a Value),
}

impl Serialize for AsJson<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let value = match self {
            AsJson::Struct(s) => {
                return ser.collect_map(s.fields.iter().map(|(k, v)| (k, AsJson::Value(v))));
            }
            AsJson::Value(value) => value,
        };
        match &value.kind {
            None | Some(Kind::NullValue(_)) => ser.serialize_unit(),
            Some(Kind::BoolValue(b)) => ser.serialize_bool(*b),
            Some(Kind::NumberValue(n)) => match whole(*n) {
                Some(i) => ser.serialize_i64(i),
                None if n.is_finite() => ser.serialize_f64(*n),
                None => ser.serialize_unit(),
            },
            Some(Kind::StringValue(s)) => ser.serialize_str(s),
            Some(Kind::ListValue(l)) => ser.collect_seq(l.values.iter().map(AsJson::Value)),
            Some(Kind::StructValue(s)) => AsJson::Struct(s).serialize(ser),
        }
    }
}

/// JSON text as a protobuf `Value`: what [`json_to_value`] makes of it once
/// parsed, without a `serde_json::Value` on the way (a plugin host's output
/// on the submit path).
pub fn json_text_to_value(text: &str) -> serde_json::Result<Value> {
    serde_json::from_str::<ProtoValue>(text).map(|v| v.0)
}

/// A protobuf `Value` deserialized straight from JSON.
struct ProtoValue(Value);

impl<'de> Deserialize<'de> for ProtoValue {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        de.deserialize_any(ProtoVisitor)
    }
}

struct ProtoVisitor;

fn kind(kind: Kind) -> ProtoValue {
    ProtoValue(Value { kind: Some(kind) })
}

impl<'de> de::Visitor<'de> for ProtoVisitor {
    type Value = ProtoValue;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<ProtoValue, E> {
        Ok(kind(Kind::NullValue(0)))
    }

    fn visit_none<E>(self) -> Result<ProtoValue, E> {
        Ok(kind(Kind::NullValue(0)))
    }

    fn visit_bool<E>(self, b: bool) -> Result<ProtoValue, E> {
        Ok(kind(Kind::BoolValue(b)))
    }

    fn visit_i64<E>(self, n: i64) -> Result<ProtoValue, E> {
        Ok(kind(Kind::NumberValue(n as f64)))
    }

    fn visit_u64<E>(self, n: u64) -> Result<ProtoValue, E> {
        Ok(kind(Kind::NumberValue(n as f64)))
    }

    fn visit_f64<E>(self, n: f64) -> Result<ProtoValue, E> {
        Ok(kind(Kind::NumberValue(n)))
    }

    fn visit_str<E>(self, s: &str) -> Result<ProtoValue, E> {
        Ok(kind(Kind::StringValue(s.to_owned())))
    }

    fn visit_string<E>(self, s: String) -> Result<ProtoValue, E> {
        Ok(kind(Kind::StringValue(s)))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<ProtoValue, A::Error> {
        let mut values = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(ProtoValue(value)) = seq.next_element()? {
            values.push(value);
        }
        Ok(kind(Kind::ListValue(ListValue { values })))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<ProtoValue, A::Error> {
        let mut fields = std::collections::BTreeMap::new();
        while let Some((key, ProtoValue(value))) = map.next_entry::<String, ProtoValue>()? {
            fields.insert(key, value);
        }
        Ok(kind(Kind::StructValue(Struct { fields })))
    }
}

/// JSON as a protobuf `Value`.
pub fn json_to_value(v: Json) -> Value {
    let kind = match v {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Json::String(s) => Kind::StringValue(s),
        Json::Array(a) => Kind::ListValue(ListValue {
            values: a.into_iter().map(json_to_value).collect(),
        }),
        Json::Object(o) => Kind::StructValue(Struct {
            fields: o.into_iter().map(|(k, v)| (k, json_to_value(v))).collect(),
        }),
    };
    Value { kind: Some(kind) }
}

/// A JSON object as a protobuf `Struct`; `None` if `v` is not an object.
pub fn json_to_struct(v: Json) -> Option<Struct> {
    match json_to_value(v).kind {
        Some(Kind::StructValue(s)) => Some(s),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn json_survives_a_round_trip_through_protobuf() {
        let doc = json!({
            "name": "Ada", "age": 36, "ratio": 0.5, "ok": true, "none": null,
            "tags": ["a", 1, {"deep": [false]}],
        });
        let s = json_to_struct(doc.clone()).expect("an object becomes a Struct");
        assert_eq!(struct_to_json(&s), doc);
        assert_eq!(json_to_struct(json!([1])), None);
    }

    #[test]
    fn json_text_is_what_the_json_value_prints() {
        let mut s = json_to_struct(json!({
            "name": "Ada \"the first\"\n", "age": 36, "ratio": 0.5, "ok": true, "none": null,
            "big": 1e300, "tiny": -2.5e-8, "negative": -7, "unicode": "é\u{1F600}",
            "tags": ["a", 1, {"deep": [false, [], {}]}], "empty": {},
        }))
        .expect("an object");
        for (name, n) in [
            ("nan", f64::NAN),
            ("inf", f64::INFINITY),
            ("huge", 2f64.powi(60)),
        ] {
            s.fields.insert(
                name.into(),
                Value {
                    kind: Some(Kind::NumberValue(n)),
                },
            );
        }
        s.fields.insert("unset".into(), Value { kind: None });
        assert_eq!(struct_to_json_text(&s), struct_to_json(&s).to_string());
        assert_eq!(struct_to_json_text(&Struct::default()), "{}");
    }

    #[test]
    fn json_text_parses_to_what_the_json_value_converts_to() {
        for text in [
            r#"{"name":"Ada \"q\" \u00e9","age":36,"ratio":0.5,"ok":true,"none":null,"tags":["a",1,{"deep":[false,[],{}]}],"big":18446744073709551615,"neg":-9007199254740993,"tiny":-2.5e-8,"dup":1,"dup":2}"#,
            "[]",
            "\"just text\"",
            "null",
            "7",
        ] {
            let direct = json_text_to_value(text).expect("valid JSON");
            let via = json_to_value(serde_json::from_str(text).expect("valid JSON"));
            assert_eq!(direct, via, "{text}");
        }
        assert!(json_text_to_value("{\"a\": }").is_err());
        assert!(json_text_to_value("[1] trailing").is_err());
    }
}
