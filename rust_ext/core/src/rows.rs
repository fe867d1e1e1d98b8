//! Input rows (one JSON object each) to conversations to render, per format.
//!
//! | format | fields | segments (part) |
//! |---|---|---|
//! | `chat` | `messages` | the conversation (0) |
//! | `prompt-completion` | `prompt`, `completion` | prompt + completion (0) |
//! | `preference` | `chosen`, `rejected`, optional `prompt` | chosen (0), rejected (1) |
//! | `unpaired` | `prompt`, `completion`, `label` (bool) | prompt + completion (0), score 1.0/0.0 |
//! | `ranked` | `prompt`, `completions` (K ≥ 2), `scores` (K numbers) | best first (k = rank), score |
//!
//! `prompt` is a string (one user turn) or a list of messages; a completion is
//! a string (one assistant turn) or a list of messages. Preference `chosen` /
//! `rejected` may also be whole conversations sharing their prompt turns (as in
//! UltraFeedback-binarized); their prompts (every turn up to the last
//! non-assistant one) must then be equal, and equal to `prompt` when given.
//!
//! Messages are normalised as transformers does before rendering: keys whose
//! value is null are dropped, and reasoning given as `reasoning_content`,
//! `thinking` or `reasoning` is visible under the first two names.
use minijinja::value::Serde;
use minijinja::Value;
use serde_json::{Map, Value as Json};

use crate::error::{CoreError, Result};

pub const ROLES: [&str; 6] = [
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "ipython",
];

/// The input formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Chat,
    Preference,
    PromptCompletion,
    Unpaired,
    Ranked,
}

impl Format {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "chat" => Self::Chat,
            "preference" => Self::Preference,
            "prompt-completion" => Self::PromptCompletion,
            "unpaired" => Self::Unpaired,
            "ranked" => Self::Ranked,
            _ => {
                return Err(CoreError::Input(format!(
                    "unknown format {s:?} (chat, preference, prompt-completion, unpaired, ranked)"
                )))
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Preference => "preference",
            Self::PromptCompletion => "prompt-completion",
            Self::Unpaired => "unpaired",
            Self::Ranked => "ranked",
        }
    }

    /// The fields a row of this format must have.
    pub fn fields(self) -> &'static str {
        match self {
            Self::Chat => "'messages'",
            Self::Preference => {
                "'chosen' and 'rejected' (and 'prompt' unless they are whole conversations)"
            }
            Self::PromptCompletion => "'prompt' and 'completion'",
            Self::Unpaired => "'prompt', 'completion' and 'label'",
            Self::Ranked => "'prompt', 'completions' and 'scores'",
        }
    }
}

/// The format a row's keys say it has, if any.
pub fn detect_format(row: &Map<String, Json>) -> Option<Format> {
    let has = |k: &str| row.contains_key(k);
    if has("chosen") && has("rejected") {
        Some(Format::Preference)
    } else if has("completions") && has("scores") {
        Some(Format::Ranked)
    } else if has("completion") && has("label") {
        Some(Format::Unpaired)
    } else if has("prompt") && has("completion") {
        Some(Format::PromptCompletion)
    } else if has("messages") {
        Some(Format::Chat)
    } else {
        None
    }
}

/// Parse a JSON line and detect its format.
pub fn detect_format_line(line: &str) -> Result<Format> {
    let row = parse_object(line)?;
    detect_format(&row).ok_or_else(|| {
        let keys: Vec<&str> = row.keys().map(|k| k.as_str()).collect();
        CoreError::Input(format!(
            "cannot tell the format from the fields {keys:?}: expected 'messages' (chat), 'chosen'+'rejected' \
             (preference), 'prompt'+'completion' (prompt-completion), +'label' (unpaired) or \
             'completions'+'scores' (ranked); or pass --format"
        ))
    })
}

/// One conversation to render and mask.
#[derive(Debug, Clone)]
pub struct Conversation {
    pub messages: Vec<Value>,
    pub is_assistant: Vec<bool>,
    /// Leading messages never trained by the `assistant`/`last` masks (the
    /// prompt of prompt/completion formats; 0 for chat).
    pub trainable_from: usize,
    /// Where the completion starts (the `completion` mask trains from the
    /// generation prompt after these messages).
    pub completion_start: usize,
}

/// One segment of an example before tokenization.
#[derive(Debug, Clone)]
pub struct SegmentSpec {
    pub conversation: Conversation,
    pub part: i32,
    pub score: f32,
}

pub fn parse_object(line: &str) -> Result<Map<String, Json>> {
    match serde_json::from_str::<Json>(line) {
        Ok(Json::Object(m)) => Ok(m),
        Ok(other) => Err(CoreError::Input(format!(
            "row is not a JSON object but {}",
            kind(&other)
        ))),
        Err(e) => Err(CoreError::Input(format!("invalid JSON: {e}"))),
    }
}

fn kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "an object",
    }
}

/// Parse one row (a JSON object) of `format` into its segments.
pub fn parse_row(line: &str, format: Format) -> Result<Vec<SegmentSpec>> {
    let row = parse_object(line)?;
    let missing = |fields: &[&str]| -> Result<()> {
        let absent: Vec<&str> = fields
            .iter()
            .copied()
            .filter(|f| !row.contains_key(*f))
            .collect();
        if absent.is_empty() {
            return Ok(());
        }
        let keys: Vec<&str> = row.keys().map(|k| k.as_str()).collect();
        Err(CoreError::Input(format!(
            "row has no {} field (a {} row needs {}; it has {keys:?})",
            absent
                .iter()
                .map(|f| format!("'{f}'"))
                .collect::<Vec<_>>()
                .join(", "),
            format.name(),
            format.fields()
        )))
    };
    match format {
        Format::Chat => {
            missing(&["messages"])?;
            let msgs = message_list(&row["messages"], "messages")?;
            let completion_start = last_non_assistant(&msgs).map_or(0, |i| i + 1);
            Ok(vec![SegmentSpec {
                conversation: conversation(msgs, 0, completion_start),
                part: 0,
                score: f32::NAN,
            }])
        }
        Format::PromptCompletion => {
            missing(&["prompt", "completion"])?;
            let p = turns(&row["prompt"], "prompt", "user")?;
            let c = turns(&row["completion"], "completion", "assistant")?;
            Ok(vec![SegmentSpec {
                conversation: joined(p, c),
                part: 0,
                score: f32::NAN,
            }])
        }
        Format::Unpaired => {
            missing(&["prompt", "completion", "label"])?;
            let label = match &row["label"] {
                Json::Bool(b) => *b,
                other => {
                    return Err(CoreError::Input(format!(
                        "'label' must be true or false, not {}",
                        kind(other)
                    )))
                }
            };
            let p = turns(&row["prompt"], "prompt", "user")?;
            let c = turns(&row["completion"], "completion", "assistant")?;
            Ok(vec![SegmentSpec {
                conversation: joined(p, c),
                part: 0,
                score: if label { 1.0 } else { 0.0 },
            }])
        }
        Format::Preference => {
            missing(&["chosen", "rejected"])?;
            let chosen = turns(&row["chosen"], "chosen", "assistant")?;
            let rejected = turns(&row["rejected"], "rejected", "assistant")?;
            let prompt = match row.get("prompt") {
                None | Some(Json::Null) => None,
                Some(p) => Some(turns(p, "prompt", "user")?),
            };
            let whole = |m: &[Json]| m.iter().any(|x| x["role"] != "assistant");
            let (c, r) = if whole(&chosen) || whole(&rejected) {
                let (cp, cc) = split_prompt(chosen, "chosen")?;
                let (rp, rc) = split_prompt(rejected, "rejected")?;
                if cp != rp {
                    return Err(CoreError::Input(format!(
                        "chosen and rejected have different prompts (they differ at message {})",
                        first_difference(&cp, &rp) + 1
                    )));
                }
                if let Some(p) = &prompt {
                    if !prompt_matches(p, &row["prompt"], &cp) {
                        return Err(CoreError::Input(
                            "the 'prompt' field differs from the prompt turns of chosen/rejected"
                                .into(),
                        ));
                    }
                }
                (joined(cp.clone(), cc), joined(rp, rc))
            } else {
                let Some(p) = prompt else {
                    return Err(CoreError::Input(
                        "row has no 'prompt' field, and 'chosen'/'rejected' are not whole conversations".into(),
                    ));
                };
                (joined(p.clone(), chosen), joined(p, rejected))
            };
            Ok(vec![
                SegmentSpec {
                    conversation: c,
                    part: 0,
                    score: f32::NAN,
                },
                SegmentSpec {
                    conversation: r,
                    part: 1,
                    score: f32::NAN,
                },
            ])
        }
        Format::Ranked => {
            missing(&["prompt", "completions", "scores"])?;
            let p = turns(&row["prompt"], "prompt", "user")?;
            let (Json::Array(cs), Json::Array(ss)) = (&row["completions"], &row["scores"]) else {
                return Err(CoreError::Input(
                    "'completions' and 'scores' must be lists".into(),
                ));
            };
            if cs.len() < 2 || cs.len() != ss.len() {
                return Err(CoreError::Input(format!(
                    "'completions' ({}) and 'scores' ({}) must be lists of the same length, at least 2",
                    cs.len(),
                    ss.len()
                )));
            }
            let mut cands = Vec::with_capacity(cs.len());
            for (k, (c, s)) in cs.iter().zip(ss).enumerate() {
                let score = s.as_f64().filter(|x| x.is_finite()).ok_or_else(|| {
                    CoreError::Input(format!("scores[{k}] is not a finite number"))
                })?;
                cands.push((score, turns(c, &format!("completions[{k}]"), "assistant")?));
            }
            // best first; equal scores keep their input order
            let mut order: Vec<usize> = (0..cands.len()).collect();
            order.sort_by(|&a, &b| cands[b].0.partial_cmp(&cands[a].0).unwrap().then(a.cmp(&b)));
            Ok(order
                .into_iter()
                .enumerate()
                .map(|(rank, k)| SegmentSpec {
                    conversation: joined(p.clone(), cands[k].1.clone()),
                    part: rank as i32,
                    score: cands[k].0 as f32,
                })
                .collect())
        }
    }
}

fn prompt_matches(p: &[Json], raw: &Json, derived: &[Json]) -> bool {
    match raw {
        // a string prompt is the content of the last prompt turn (UltraFeedback-binarized)
        Json::String(s) => derived
            .last()
            .is_some_and(|m| m.get("content").and_then(Json::as_str) == Some(s)),
        _ => p == derived,
    }
}

fn first_difference(a: &[Json], b: &[Json]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn last_non_assistant(msgs: &[Json]) -> Option<usize> {
    msgs.iter().rposition(|m| m["role"] != "assistant")
}

/// Split a whole conversation into (prompt turns, completion turns).
fn split_prompt(msgs: Vec<Json>, field: &str) -> Result<(Vec<Json>, Vec<Json>)> {
    let Some(i) = last_non_assistant(&msgs) else {
        return Err(CoreError::Input(format!("'{field}' has no prompt turn")));
    };
    if i + 1 == msgs.len() {
        return Err(CoreError::Input(format!(
            "'{field}' has no assistant response after its prompt"
        )));
    }
    let mut prompt = msgs;
    let completion = prompt.split_off(i + 1);
    Ok((prompt, completion))
}

fn joined(prompt: Vec<Json>, completion: Vec<Json>) -> Conversation {
    let n = prompt.len();
    let mut all = prompt;
    all.extend(completion);
    conversation(all, n, n)
}

fn conversation(msgs: Vec<Json>, trainable_from: usize, completion_start: usize) -> Conversation {
    let is_assistant = msgs.iter().map(|m| m["role"] == "assistant").collect();
    let messages = msgs.into_iter().map(|m| Value::from(Serde(m))).collect();
    Conversation {
        messages,
        is_assistant,
        trainable_from,
        completion_start,
    }
}

/// A string (one turn of `role`) or a list of messages.
fn turns(v: &Json, field: &str, role: &str) -> Result<Vec<Json>> {
    match v {
        Json::String(s) => Ok(vec![serde_json::json!({"role": role, "content": s})]),
        Json::Array(_) => message_list(v, field),
        other => Err(CoreError::Input(format!(
            "'{field}' must be a string or a list of messages, not {}",
            kind(other)
        ))),
    }
}

/// Validate and normalise a list of messages.
pub fn message_list(v: &Json, field: &str) -> Result<Vec<Json>> {
    let Json::Array(items) = v else {
        return Err(CoreError::Input(format!(
            "'{field}' must be a list of messages, not {}",
            kind(v)
        )));
    };
    if items.is_empty() {
        return Err(CoreError::Input(format!("'{field}' is an empty list")));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, m) in items.iter().enumerate() {
        let Json::Object(obj) = m else {
            return Err(CoreError::Input(format!(
                "{field}[{i}] is not an object but {}",
                kind(m)
            )));
        };
        let role = match obj.get("role") {
            Some(Json::String(r)) => r.as_str(),
            Some(other) => {
                return Err(CoreError::Input(format!(
                    "{field}[{i}].role is not a string but {}",
                    kind(other)
                )))
            }
            None => return Err(CoreError::Input(format!("{field}[{i}] has no 'role'"))),
        };
        if !ROLES.contains(&role) {
            return Err(CoreError::Input(format!(
                "unknown role {role:?} in {field}[{i}] (expected one of {})",
                ROLES.join(", ")
            )));
        }
        match obj.get("content") {
            Some(Json::String(_)) | Some(Json::Array(_)) => {}
            None | Some(Json::Null) if obj.get("tool_calls").is_some_and(|t| !t.is_null()) => {}
            None | Some(Json::Null) => {
                return Err(CoreError::Input(format!(
                    "{field}[{i}] ({role}) has no 'content'"
                )))
            }
            Some(other) => {
                return Err(CoreError::Input(format!(
                    "{field}[{i}].content must be a string, not {}",
                    kind(other)
                )))
            }
        }
        out.push(Json::Object(normalise(obj)));
    }
    Ok(out)
}

const REASONING: [&str; 3] = ["reasoning_content", "thinking", "reasoning"];

/// transformers' message normalisation: drop null values; alias reasoning fields.
pub fn normalise(obj: &Map<String, Json>) -> Map<String, Json> {
    let plain: Map<String, Json> = obj
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let Some(reasoning) = REASONING.iter().find_map(|k| plain.get(*k)).cloned() else {
        return plain;
    };
    // {"thinking": r, **message, "reasoning_content": r}
    let mut out = Map::new();
    out.insert("thinking".into(), reasoning.clone());
    for (k, v) in plain {
        out.insert(k, v);
    }
    out.insert("reasoning_content".into(), reasoning);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(line: &str, f: Format) -> String {
        match parse_row(line, f) {
            Err(CoreError::Input(m)) => m,
            other => panic!("expected an input error, got {other:?}"),
        }
    }

    #[test]
    fn detects_formats() {
        assert_eq!(
            detect_format_line(r#"{"messages":[]}"#).unwrap(),
            Format::Chat
        );
        assert_eq!(
            detect_format_line(r#"{"prompt":"a","chosen":"b","rejected":"c"}"#).unwrap(),
            Format::Preference
        );
        assert_eq!(
            detect_format_line(r#"{"prompt":"a","completion":"b"}"#).unwrap(),
            Format::PromptCompletion
        );
        assert_eq!(
            detect_format_line(r#"{"prompt":"a","completion":"b","label":true}"#).unwrap(),
            Format::Unpaired
        );
        assert_eq!(
            detect_format_line(r#"{"prompt":"a","completions":[],"scores":[]}"#).unwrap(),
            Format::Ranked
        );
        assert!(detect_format_line(r#"{"text":"a"}"#).is_err());
    }

    #[test]
    fn chat_completion_starts_after_last_user_turn() {
        let s = parse_row(
            r#"{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"},{"role":"user","content":"c"},{"role":"assistant","content":"d"}]}"#,
            Format::Chat,
        )
        .unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].conversation.completion_start, 3);
        assert_eq!(s[0].conversation.trainable_from, 0);
        assert_eq!(
            s[0].conversation.is_assistant,
            vec![false, true, false, true]
        );
    }

    #[test]
    fn preference_whole_conversations_share_prompts() {
        let ok = r#"{"prompt":"q","chosen":[{"role":"user","content":"q"},{"role":"assistant","content":"good"}],"rejected":[{"role":"user","content":"q"},{"role":"assistant","content":"bad"}]}"#;
        let s = parse_row(ok, Format::Preference).unwrap();
        assert_eq!((s[0].part, s[1].part), (0, 1));
        assert_eq!(s[0].conversation.completion_start, 1);
        let differ = r#"{"chosen":[{"role":"user","content":"q"},{"role":"assistant","content":"good"}],"rejected":[{"role":"user","content":"other"},{"role":"assistant","content":"bad"}]}"#;
        assert!(err(differ, Format::Preference).contains("different prompts"));
        let field = r#"{"prompt":"zzz","chosen":[{"role":"user","content":"q"},{"role":"assistant","content":"good"}],"rejected":[{"role":"user","content":"q"},{"role":"assistant","content":"bad"}]}"#;
        assert!(err(field, Format::Preference).contains("'prompt' field differs"));
        let strings = parse_row(
            r#"{"prompt":"q","chosen":"good","rejected":"bad"}"#,
            Format::Preference,
        )
        .unwrap();
        assert_eq!(strings[1].conversation.messages.len(), 2);
    }

    #[test]
    fn ranked_sorts_best_first() {
        let s = parse_row(
            r#"{"prompt":"q","completions":["a","b","c"],"scores":[0.1,0.9,0.5]}"#,
            Format::Ranked,
        )
        .unwrap();
        let scores: Vec<f32> = s.iter().map(|x| x.score).collect();
        assert_eq!(scores, vec![0.9, 0.5, 0.1]);
        assert_eq!(s.iter().map(|x| x.part).collect::<Vec<_>>(), vec![0, 1, 2]);
    }

    #[test]
    fn bad_rows() {
        assert!(err("{not json", Format::Chat).contains("invalid JSON"));
        assert!(err("[1]", Format::Chat).contains("not a JSON object"));
        assert!(err(r#"{"text":"a"}"#, Format::Chat).contains("no 'messages' field"));
        assert!(err(
            r#"{"messages":[{"role":"robot","content":"a"}]}"#,
            Format::Chat
        )
        .contains("unknown role \"robot\""));
        assert!(err(r#"{"messages":[{"role":"user"}]}"#, Format::Chat).contains("no 'content'"));
        assert!(err(
            r#"{"prompt":"a","completion":"b","label":"yes"}"#,
            Format::Unpaired
        )
        .contains("'label'"));
        assert!(err(
            r#"{"prompt":"a","completions":["x"],"scores":[1]}"#,
            Format::Ranked
        )
        .contains("at least 2"));
    }

    #[test]
    fn normalises_like_transformers() {
        let m = message_list(&serde_json::json!([{"role":"assistant","content":"x","tool_calls":null,"reasoning":"r"}]), "m").unwrap();
        let keys: Vec<&String> = m[0].as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "thinking",
                "role",
                "content",
                "reasoning",
                "reasoning_content"
            ]
        );
    }
}
