//! Rows of the plain-text formats: `text`, and prompt/completion, preference,
//! unpaired and ranked rows with `--no-chat-template`. Their fields are strings,
//! tokenized as they are (TRL's non-conversational data), never rendered.
use serde_json::{Map, Value as Json};

use crate::error::{CoreError, Result};
use crate::rows::{kind, missing_fields, ranked, Format};

/// A row of a plain-text format: the prompt (none for `text`) and each
/// completion with its part and score; nothing is rendered.
#[derive(Debug, Clone, PartialEq)]
pub struct PlainRow {
    pub prompt: Option<String>,
    pub completions: Vec<(String, i32, f32)>,
}

/// A string field of a plain-text row.
fn plain_string(v: &Json, field: &str, format: Format) -> Result<String> {
    match v {
        Json::String(s) => Ok(s.clone()),
        Json::Array(_) if format != Format::Text => Err(CoreError::Input(format!(
            "'{field}' is a list of messages, but --no-chat-template reads plain strings (drop the flag for conversations)"
        ))),
        other => Err(CoreError::Input(format!(
            "'{field}' must be a string, not {}",
            kind(other)
        ))),
    }
}

/// Read a plain-text row (`text`, or a prompt/completion format with
/// `--no-chat-template`): strings only, no chat template.
pub fn parse_plain(row: &Map<String, Json>, format: Format) -> Result<PlainRow> {
    let missing = |fields: &[&str]| missing_fields(row, format, fields);
    let s = |field: &str| plain_string(&row[field], field, format);
    let nan = f32::NAN;
    Ok(match format {
        Format::Text => {
            missing(&["text"])?;
            PlainRow {
                prompt: None,
                completions: vec![(s("text")?, 0, nan)],
            }
        }
        Format::PromptCompletion => {
            missing(&["prompt", "completion"])?;
            PlainRow {
                prompt: Some(s("prompt")?),
                completions: vec![(s("completion")?, 0, nan)],
            }
        }
        Format::Unpaired => {
            missing(&["prompt", "completion", "label"])?;
            let Json::Bool(label) = row["label"] else {
                return Err(CoreError::Input(format!(
                    "'label' must be true or false, not {}",
                    kind(&row["label"])
                )));
            };
            let score = if label { 1.0 } else { 0.0 };
            PlainRow {
                prompt: Some(s("prompt")?),
                completions: vec![(s("completion")?, 0, score)],
            }
        }
        Format::Preference => {
            missing(&["prompt", "chosen", "rejected"])?;
            PlainRow {
                prompt: Some(s("prompt")?),
                completions: vec![(s("chosen")?, 0, nan), (s("rejected")?, 1, nan)],
            }
        }
        Format::Ranked => {
            missing(&["prompt", "completions", "scores"])?;
            let cands = ranked(row, |c, field| plain_string(c, field, format))?;
            PlainRow {
                prompt: Some(s("prompt")?),
                completions: cands
                    .into_iter()
                    .enumerate()
                    .map(|(rank, (score, c))| (c, rank as i32, score as f32))
                    .collect(),
            }
        }
        Format::Chat => {
            return Err(CoreError::Input(
                "chat rows are conversations: they need a chat template (drop --no-chat-template)"
                    .into(),
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rows::parse_object;

    #[test]
    fn plain_rows_are_strings() {
        let row = |l: &str| parse_object(l).unwrap();
        let p = parse_plain(&row(r#"{"text":"abc"}"#), Format::Text).unwrap();
        assert_eq!(p.prompt, None);
        assert_eq!(p.completions[0].0, "abc");
        let p = parse_plain(
            &row(r#"{"prompt":"q","chosen":"g","rejected":"b"}"#),
            Format::Preference,
        )
        .unwrap();
        let parts: Vec<(&str, i32)> = p
            .completions
            .iter()
            .map(|(c, k, _)| (c.as_str(), *k))
            .collect();
        assert_eq!(
            (p.prompt.as_deref(), parts),
            (Some("q"), vec![("g", 0), ("b", 1)])
        );
        let p = parse_plain(
            &row(r#"{"prompt":"q","completions":["a","b"],"scores":[0,1]}"#),
            Format::Ranked,
        )
        .unwrap();
        assert_eq!(p.completions[0], ("b".to_string(), 0, 1.0));
        let e = parse_plain(
            &row(r#"{"prompt":[{"role":"user","content":"q"}],"completion":"a"}"#),
            Format::PromptCompletion,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("'prompt' is a list of messages, but --no-chat-template"),
            "{e}"
        );
        let e = parse_plain(&row(r#"{"text":["a"]}"#), Format::Text).unwrap_err();
        assert!(
            e.to_string()
                .contains("'text' must be a string, not a list"),
            "{e}"
        );
        let e =
            parse_plain(&row(r#"{"prompt":"q","chosen":"g"}"#), Format::Preference).unwrap_err();
        assert!(e.to_string().contains("no 'rejected' field"), "{e}");
    }
}
