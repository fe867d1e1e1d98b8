//! Label masks from the rendered text and the tokenizer's offsets.
//!
//! The conversation is rendered once in full and tokenized once; what is
//! trained is a set of byte spans of that text, found by rendering prefixes:
//! the span of assistant turn `i` is the text between
//! `render(messages[:i], add_generation_prompt=True)` and
//! `render(messages[:i+1])`. It therefore includes the end-of-turn tokens the
//! template appends (`<|im_end|>`, `<|eot_id|>`, `</s>`), which the model must
//! learn to emit. A template whose prefixes are not prefixes of the whole
//! rendering cannot be masked this way and is an error, never a silent shift.
//!
//! A token is trained when any of its bytes lies in a trained span, and the
//! first token of every segment is never trained (nothing predicts it).
use crate::error::{CoreError, Result};
use crate::rows::Conversation;
use crate::template::ChatTemplate;

pub const IGNORE_INDEX: i32 = -100;

/// Which tokens are trained (`--mask`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskKind {
    /// Every assistant turn (of the completion, for formats with a prompt).
    Assistant,
    /// The final assistant turn only.
    Last,
    /// Everything after the prompt.
    Completion,
    /// Every token.
    All,
}

impl MaskKind {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "assistant" => Self::Assistant,
            "last" => Self::Last,
            "completion" => Self::Completion,
            "all" => Self::All,
            _ => {
                return Err(CoreError::Input(format!(
                    "unknown mask {s:?} (assistant, last, completion, all)"
                )))
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Assistant => "assistant",
            Self::Last => "last",
            Self::Completion => "completion",
            Self::All => "all",
        }
    }
}

/// The full rendering of a conversation and its trained byte spans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    pub spans: Vec<(usize, usize)>,
}

/// Render a conversation and find its trained spans.
///
/// Turns before `conv.trainable_from` (the prompt) are never trained by
/// `assistant`/`last`; `completion` trains from the generation prompt after
/// the first `conv.completion_start` messages to the end.
pub fn render_and_mask(
    tpl: &ChatTemplate,
    conv: &Conversation,
    mask: MaskKind,
) -> Result<Rendered> {
    let messages = &conv.messages[..];
    let is_assistant = &conv.is_assistant[..];
    let prompt_len = conv.trainable_from;
    let text = tpl.render(messages, false)?;
    let spans = match mask {
        MaskKind::All => vec![(0, text.len())],
        MaskKind::Completion => {
            let start = conv.completion_start;
            if start >= messages.len() {
                return Err(CoreError::Input(
                    "nothing after the prompt to train (mask 'completion')".into(),
                ));
            }
            let prefix = tpl.render(&messages[..start], true)?;
            check_prefix(&prefix, &text, start, true)?;
            vec![(prefix.len(), text.len())]
        }
        MaskKind::Assistant | MaskKind::Last => {
            let turns: Vec<usize> = (prompt_len..messages.len())
                .filter(|&i| is_assistant[i])
                .collect();
            let turns: Vec<usize> = match (mask, turns.last()) {
                (_, None) => {
                    let what = if prompt_len > 0 {
                        "no assistant turn after the prompt"
                    } else {
                        "no assistant turn"
                    };
                    return Err(CoreError::Input(format!(
                        "{what} to train (mask '{}')",
                        mask.name()
                    )));
                }
                (MaskKind::Last, Some(&last)) => vec![last],
                _ => turns,
            };
            let mut spans = Vec::with_capacity(turns.len());
            for i in turns {
                let start = tpl.render(&messages[..i], true)?;
                let end = if i + 1 == messages.len() {
                    text.clone()
                } else {
                    tpl.render(&messages[..i + 1], false)?
                };
                check_prefix(&start, &end, i, true)?;
                check_prefix(&end, &text, i + 1, false)?;
                spans.push((start.len(), end.len()));
            }
            spans
        }
    };
    Ok(Rendered { text, spans })
}

fn check_prefix(prefix: &str, whole: &str, n: usize, generation_prompt: bool) -> Result<()> {
    if whole.starts_with(prefix) {
        return Ok(());
    }
    let at = prefix
        .bytes()
        .zip(whole.bytes())
        .take_while(|(a, b)| a == b)
        .count();
    let what = if generation_prompt {
        format!("the first {n} messages rendered with add_generation_prompt=True")
    } else {
        format!("the first {n} messages")
    };
    Err(CoreError::Template(format!(
        "chat template is not prefix-stable: {what} do not render as a prefix of the longer conversation \
         (they differ at byte {at}), so turns cannot be masked from prefixes; use --mask all or another template"
    )))
}

/// Labels for one tokenized segment: the token id where the token overlaps a
/// trained span, `IGNORE_INDEX` elsewhere and at position 0.
pub fn labels_from_offsets(
    ids: &[u32],
    offsets: &[(usize, usize)],
    spans: &[(usize, usize)],
) -> Vec<i32> {
    let mut labels = vec![IGNORE_INDEX; ids.len()];
    let spans: Vec<(usize, usize)> = spans.iter().copied().filter(|(a, b)| b > a).collect();
    for (j, (&id, &(s, e))) in ids.iter().zip(offsets).enumerate() {
        // spans are few (one per trained turn): a direct check is cheapest
        let hit = spans.iter().any(|&(a, b)| {
            if s == e {
                a <= s && s < b
            } else {
                a < e && s < b
            }
        });
        if hit {
            labels[j] = id as i32;
        }
    }
    if let Some(first) = labels.first_mut() {
        *first = IGNORE_INDEX;
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;
    use minijinja::value::{Serde, Value};

    fn conv(json: &str, trainable_from: usize, completion_start: usize) -> Conversation {
        let v: Vec<serde_json::Value> = serde_json::from_str(json).unwrap();
        let is_assistant = v.iter().map(|m| m["role"] == "assistant").collect();
        let messages = v.into_iter().map(|m| Value::from(Serde(m))).collect();
        Conversation {
            messages,
            is_assistant,
            trainable_from,
            completion_start,
        }
    }

    const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn assistant_spans_include_end_of_turn() {
        let t = ChatTemplate::new(CHATML, &[]).unwrap();
        let json = r#"[{"role":"system","content":"s"},{"role":"user","content":"u1"},{"role":"assistant","content":"a1"},{"role":"user","content":"u2"},{"role":"assistant","content":"a2"}]"#;
        let c = conv(json, 0, 4);
        let r = render_and_mask(&t, &c, MaskKind::Assistant).unwrap();
        let trained: Vec<&str> = r.spans.iter().map(|&(s, e)| &r.text[s..e]).collect();
        assert_eq!(trained, vec!["a1<|im_end|>\n", "a2<|im_end|>\n"]);
        let r = render_and_mask(&t, &c, MaskKind::Last).unwrap();
        assert_eq!(&r.text[r.spans[0].0..r.spans[0].1], "a2<|im_end|>\n");
        let r = render_and_mask(&t, &c, MaskKind::Completion).unwrap();
        assert_eq!(&r.text[r.spans[0].0..r.spans[0].1], "a2<|im_end|>\n");
        let r = render_and_mask(&t, &c, MaskKind::All).unwrap();
        assert_eq!(r.spans, vec![(0, r.text.len())]);
        // with a prompt of 3 messages, `assistant` only trains turns after it
        let r = render_and_mask(&t, &conv(json, 3, 3), MaskKind::Assistant).unwrap();
        assert_eq!(r.spans.len(), 1);
    }

    #[test]
    fn no_assistant_turn_is_an_input_error() {
        let t = ChatTemplate::new(CHATML, &[]).unwrap();
        let c = conv(r#"[{"role":"user","content":"u1"}]"#, 0, 1);
        assert!(matches!(
            render_and_mask(&t, &c, MaskKind::Assistant),
            Err(CoreError::Input(_))
        ));
        assert!(matches!(
            render_and_mask(&t, &c, MaskKind::Completion),
            Err(CoreError::Input(_))
        ));
        assert!(render_and_mask(&t, &c, MaskKind::All).is_ok());
    }

    #[test]
    fn unstable_prefix_is_a_template_error() {
        // drops earlier assistant turns' content: not prefix-stable
        let src = "{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}[old]{% else %}{{ m.content }}{% endif %}|{% endfor %}";
        let t = ChatTemplate::new(src, &[]).unwrap();
        let c = conv(
            r#"[{"role":"user","content":"u"},{"role":"assistant","content":"a"},{"role":"user","content":"v"},{"role":"assistant","content":"b"}]"#,
            0,
            3,
        );
        let err = render_and_mask(&t, &c, MaskKind::Assistant).unwrap_err();
        assert!(
            matches!(&err, CoreError::Template(msg) if msg.contains("prefix-stable")),
            "{err}"
        );
        assert!(render_and_mask(&t, &c, MaskKind::Last).is_ok());
    }

    #[test]
    fn labels_by_overlap_and_first_token_masked() {
        let ids = [10, 11, 12, 13, 14];
        let offsets = [(0, 2), (2, 4), (4, 6), (6, 6), (6, 9)];
        assert_eq!(
            labels_from_offsets(&ids, &offsets, &[(3, 6)]),
            vec![-100, 11, 12, -100, -100]
        );
        assert_eq!(
            labels_from_offsets(&ids, &offsets, &[(0, 9)]),
            vec![-100, 11, 12, 13, 14]
        );
        assert_eq!(
            labels_from_offsets(&ids, &offsets, &[(0, 1), (8, 9)]),
            vec![-100, -100, -100, -100, 14]
        );
        assert_eq!(labels_from_offsets(&ids, &offsets, &[]), vec![-100; 5]);
        assert_eq!(
            labels_from_offsets(&ids, &offsets, &[(6, 7)]),
            vec![-100, -100, -100, 13, 14]
        );
    }
}
