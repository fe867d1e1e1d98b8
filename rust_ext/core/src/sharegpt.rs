//! ShareGPT conversations (axolotl / LLaMA-Factory) as chat messages:
//! `conversations` (or `conversation`) stands for `messages`, and a message
//! `{"from", "value"}` for `{"role", "content"}` with the speakers mapped as
//! `SHAREGPT_ROLES` says (`function_call` becomes an assistant turn whose
//! `tool_calls` is the JSON of its value); a row's string `system` field
//! becomes a leading system turn unless the conversation starts with one.
use serde_json::{Map, Value as Json};

use crate::error::{CoreError, Result};
use crate::rows::{kind, message_list};

/// ShareGPT speakers (`from`) and the role each becomes: axolotl's defaults
/// (human/user, gpt/assistant, system, tool) and LLaMA-Factory's tags
/// (observation: a tool result; function_call: an assistant tool call).
pub const SHAREGPT_ROLES: [(&str, &str); 8] = [
    ("human", "user"),
    ("user", "user"),
    ("gpt", "assistant"),
    ("assistant", "assistant"),
    ("system", "system"),
    ("tool", "tool"),
    ("observation", "tool"),
    ("function_call", "assistant"),
];

/// A ShareGPT conversation as messages (a leading system turn from the row's
/// string `system` field when the conversation has none).
pub fn messages(row: &Map<String, Json>, field: &str) -> Result<Vec<Json>> {
    let Json::Array(items) = &row[field] else {
        return Err(CoreError::Input(format!(
            "'{field}' must be a list of messages, not {}",
            kind(&row[field])
        )));
    };
    let mut msgs = Vec::with_capacity(items.len() + 1);
    if let Some(Json::String(system)) = row.get("system") {
        let has_system = items
            .first()
            .and_then(|m| m.get("from").or_else(|| m.get("role")))
            .is_some_and(|f| f == "system");
        if !has_system {
            msgs.push(serde_json::json!({"role": "system", "content": system}));
        }
    }
    for (i, m) in items.iter().enumerate() {
        msgs.push(match m {
            Json::Object(obj) if obj.contains_key("from") => message(obj, field, i)?,
            other => other.clone(), // role/content messages under a ShareGPT name
        });
    }
    message_list(&Json::Array(msgs), field)
}

/// One `{"from", "value"}` message as `{"role", "content"}` (other keys kept).
fn message(obj: &Map<String, Json>, field: &str, i: usize) -> Result<Json> {
    let from = match &obj["from"] {
        Json::String(f) => f.as_str(),
        other => {
            return Err(CoreError::Input(format!(
                "{field}[{i}].from is not a string but {}",
                kind(other)
            )))
        }
    };
    let Some(&(_, role)) = SHAREGPT_ROLES.iter().find(|(f, _)| *f == from) else {
        let known: Vec<&str> = SHAREGPT_ROLES.iter().map(|(f, _)| *f).collect();
        return Err(CoreError::Input(format!(
            "unknown ShareGPT speaker {from:?} in {field}[{i}].from (expected one of {})",
            known.join(", ")
        )));
    };
    let value = match obj.get("value") {
        Some(Json::String(v)) => v.clone(),
        Some(other) => {
            return Err(CoreError::Input(format!(
                "{field}[{i}].value must be a string, not {}",
                kind(other)
            )))
        }
        None => return Err(CoreError::Input(format!("{field}[{i}] has no 'value'"))),
    };
    let mut out: Map<String, Json> = obj
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "from" | "value" | "role" | "content"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    out.insert("role".into(), Json::from(role));
    if from == "function_call" {
        out.insert("tool_calls".into(), tool_calls(&value, field, i)?);
    } else {
        out.insert("content".into(), Json::from(value));
    }
    Ok(Json::Object(out))
}

/// LLaMA-Factory's `function_call` value (`{"name", "arguments"}` or a list of
/// them, as JSON text) as transformers' `tool_calls`.
fn tool_calls(value: &str, field: &str, i: usize) -> Result<Json> {
    let bad = |why: &str| {
        CoreError::Input(format!(
            "{field}[{i}] (function_call): the value must be JSON {{\"name\": ..., \"arguments\": ...}} or a list of them; {why}"
        ))
    };
    let parsed: Json = serde_json::from_str(value).map_err(|e| bad(&e.to_string()))?;
    let calls = match parsed {
        Json::Array(calls) => calls,
        one => vec![one],
    };
    if calls.is_empty() {
        return Err(bad("it is an empty list"));
    }
    calls
        .into_iter()
        .map(|c| match c {
            Json::Object(f) if f.get("name").is_some_and(Json::is_string) => {
                Ok(serde_json::json!({"type": "function", "function": Json::Object(f)}))
            }
            _ => Err(bad("a call has no string 'name'")),
        })
        .collect::<Result<Vec<Json>>>()
        .map(Json::Array)
}

#[cfg(test)]
mod tests {
    use crate::rows::{parse_row, Format};

    fn err(line: &str) -> String {
        parse_row(line, Format::Chat).unwrap_err().to_string()
    }

    #[test]
    fn each_speaker_maps_once_to_a_known_role() {
        let speakers: std::collections::BTreeSet<&str> =
            super::SHAREGPT_ROLES.iter().map(|(f, _)| *f).collect();
        assert_eq!(speakers.len(), super::SHAREGPT_ROLES.len());
        assert!(super::SHAREGPT_ROLES
            .iter()
            .all(|(_, r)| crate::rows::ROLES.contains(r)));
    }

    #[test]
    fn sharegpt_roles_system_field_and_function_calls() {
        let line = r#"{"system":"be brief","conversations":[{"from":"human","value":"weather?"},{"from":"function_call","value":"{\"name\": \"get\", \"arguments\": {\"city\": \"Oslo\"}}"},{"from":"observation","value":"rain"},{"from":"gpt","value":"Rain.","weight":1}]}"#;
        let s = parse_row(line, Format::Chat).unwrap();
        let c = &s[0].conversation;
        let roles: Vec<String> = c
            .messages
            .iter()
            .map(|m| m.get_attr("role").unwrap().to_string())
            .collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool", "assistant"]);
        assert_eq!(c.is_assistant, vec![false, false, true, false, true]);
        let call = c.messages[2].get_attr("tool_calls").unwrap();
        assert_eq!(
            call.get_item_by_index(0)
                .unwrap()
                .get_attr("function")
                .unwrap()
                .get_attr("name")
                .unwrap()
                .to_string(),
            "get"
        );
        assert_eq!(c.messages[4].get_attr("weight").unwrap().to_string(), "1");
        assert_eq!(c.completion_start, 4);
        // a system turn in the conversation (either spelling) wins over the field
        let role = r#"{"system":"x","conversations":[{"role":"system","content":"s"},{"from":"human","value":"u"}]}"#;
        assert_eq!(
            parse_row(role, Format::Chat).unwrap()[0]
                .conversation
                .messages
                .len(),
            2
        );
        let own = r#"{"system":"x","conversation":[{"from":"system","value":"s"},{"from":"human","value":"u"},{"from":"gpt","value":"a"}]}"#;
        assert_eq!(
            parse_row(own, Format::Chat).unwrap()[0]
                .conversation
                .messages
                .len(),
            3
        );
        assert!(err(r#"{"conversations":[{"from":"bard","value":"x"}]}"#)
            .contains("unknown ShareGPT speaker \"bard\" in conversations[0].from"));
        assert!(err(r#"{"conversations":[{"from":"gpt"}]}"#)
            .contains("conversations[0] has no 'value'"));
        assert!(err(r#"{"conversations":[{"from":"human","value":"u"},{"from":"function_call","value":"get(1)"}]}"#)
            .contains("conversations[1] (function_call): the value must be JSON"));
    }
}
