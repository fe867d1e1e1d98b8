//! Label masks from the rendered text and the tokenizer's offsets.
//!
//! The conversation is rendered once in full and tokenized once; what is
//! trained is a set of byte spans of that text, found by rendering prefixes:
//! the span of assistant turn `i` is the text between
//! `render(messages[:i], add_generation_prompt=True)` and
//! `render(messages[:i+1])`. It therefore includes the end-of-turn tokens the
//! template appends (`<|im_end|>`, `<|eot_id|>`, `</s>`), which the model must
//! learn to emit. A template whose prefixes are not prefixes of the whole
//! rendering cannot be masked this way: never a silent shift.
//!
//! A token is trained when any of its bytes lies in a trained span, and the
//! first token of every segment is never trained (nothing predicts it).
//!
//! Where the template carries `{% generation %}` blocks, they give the spans
//! instead; where it is not prefix-stable, `--mask assistant` splits the
//! conversation into one example per assistant turn (`render_and_mask`).
//! Where even one turn alone does not render after its own generation prompt
//! (a template that strips the reasoning from every assistant turn, as the
//! DeepSeek-R1 distills', or a turn whose reasoning is a field the template
//! never renders, as QwQ's), that turn is written as at inference
//! (`inference_turn`): the generation prompt, then the turn as the model
//! writes it after that prompt, then the template's end of turn.
use crate::error::{CoreError, Result};
use crate::rows::Conversation;
use crate::template::{ChatTemplate, Vars};
use minijinja::Value;

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

/// What `render_and_mask` makes of one conversation: one rendering, or, where
/// the template is not prefix-stable and `--mask assistant` asks for every
/// turn, one rendering per assistant turn (`split` says why).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Masked {
    pub renders: Vec<Rendered>,
    pub split: Option<String>,
    /// How many turns were written as at inference (`inference_turn`), and why.
    pub inference: Option<(usize, String)>,
}

impl Masked {
    fn one(r: Rendered) -> Self {
        Self {
            renders: vec![r],
            split: None,
            inference: None,
        }
    }
}

/// Render a conversation and find its trained spans.
///
/// Turns before `conv.trainable_from` (the prompt) are never trained by
/// `assistant`/`last`; `completion` trains from the generation prompt after
/// the first `conv.completion_start` messages to the end.
///
/// A template with `{% generation %}` blocks gives the `assistant`/`last`
/// spans itself (the blocks of the trained turns, as transformers'
/// `return_assistant_tokens_mask`). Otherwise, with `--mask assistant` on a
/// template that is not prefix-stable and `split_turns` (formats of one
/// segment per row), every assistant turn becomes its own rendering: the
/// conversation up to that turn, rendered with that turn last, trained on it.
pub fn render_and_mask(
    tpl: &ChatTemplate,
    conv: &Conversation,
    mask: MaskKind,
    vars: &Vars,
    split_turns: bool,
) -> Result<Masked> {
    let messages = &conv.messages[..];
    let is_assistant = &conv.is_assistant[..];
    let prompt_len = conv.trainable_from;
    let render = |m: &[Value], gen: bool| tpl.render_with(m, gen, vars);
    let (text, marks) = tpl.render_marked(messages, false, vars)?;
    let spans = match mask {
        MaskKind::All => vec![(0, text.len())],
        MaskKind::Completion => {
            let start = conv.completion_start;
            if start >= messages.len() {
                return Err(CoreError::Input(
                    "nothing after the prompt to train (mask 'completion')".into(),
                ));
            }
            let prefix = render(&messages[..start], true)?;
            if let Some(why) = not_prefix(&prefix, &text, start, true) {
                if start + 1 == messages.len() && is_assistant[start] {
                    // a completion of one assistant turn: as at inference, if it renders so
                    return only_turn_at_inference(&render, messages, start, prefix, why);
                }
                return Err(unstable(&why));
            }
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
            if tpl.has_generation() {
                // every block, or those that open after the text before the first trained
                // turn (rendered without the generation prompt, which a block may hold)
                let from = if mask == MaskKind::Assistant && prompt_len == 0 {
                    0
                } else {
                    common_prefix(&render(&messages[..turns[0]], false)?, &text)
                };
                let spans = marks.into_iter().filter(|&(a, _)| a >= from).collect();
                return Ok(Masked::one(Rendered { text, spans }));
            }
            let mut spans = Vec::with_capacity(turns.len());
            for &i in &turns {
                let start = render(&messages[..i], true)?;
                let end = if i + 1 == messages.len() {
                    text.clone()
                } else {
                    render(&messages[..i + 1], false)?
                };
                let why = not_prefix(&start, &end, i, true)
                    .or_else(|| not_prefix(&end, &text, i + 1, false));
                if let Some(why) = why {
                    if mask == MaskKind::Assistant && split_turns {
                        return per_turn(&render, messages, &turns, text, why);
                    }
                    if turns == [messages.len() - 1] {
                        // one trained turn, the last: as at inference, if it renders so
                        return only_turn_at_inference(&render, messages, i, start, why);
                    }
                    return Err(unstable(&why));
                }
                spans.push((start.len(), end.len()));
            }
            spans
        }
    };
    Ok(Masked::one(Rendered { text, spans }))
}

/// One rendering per assistant turn `i`: `messages[..=i]`, trained from the
/// generation prompt after `messages[..i]` to the end.
fn per_turn(
    render: &dyn Fn(&[Value], bool) -> Result<String>,
    messages: &[Value],
    turns: &[usize],
    full: String,
    why: String,
) -> Result<Masked> {
    let mut renders = Vec::with_capacity(turns.len());
    let mut inference: Option<(usize, String)> = None;
    for &i in turns {
        let start = render(&messages[..i], true)?;
        let text = if i + 1 == messages.len() {
            full.clone()
        } else {
            render(&messages[..i + 1], false)?
        };
        if let Some(e) = not_prefix(&start, &text, i, true) {
            let r = inference_turn(render, messages, i, start).map_err(|why| {
                CoreError::Template(format!(
                    "chat template is not prefix-stable, and not even for assistant turn {} alone: {e}; \
                     {why}; use a template with {{% generation %}} markers (TRL's *_training.jinja) \
                     or --mask all",
                    i + 1
                ))
            })?;
            match &mut inference {
                Some((n, _)) => *n += 1,
                None => inference = Some((1, e)),
            }
            renders.push(r);
            continue;
        }
        let spans = vec![(start.len(), text.len())];
        renders.push(Rendered { text, spans });
    }
    Ok(Masked {
        renders,
        split: Some(why),
        inference,
    })
}

/// The one trained turn `i` (the last message) written as at inference, where
/// `why` says why the template cannot render it after its generation prompt.
fn only_turn_at_inference(
    render: &dyn Fn(&[Value], bool) -> Result<String>,
    messages: &[Value],
    i: usize,
    start: String,
    why: String,
) -> Result<Masked> {
    let r =
        inference_turn(render, messages, i, start).map_err(|e| unstable(&format!("{why}; {e}")))?;
    Ok(Masked {
        renders: vec![r],
        split: None,
        inference: Some((1, why)),
    })
}

/// Stands for a turn's content when finding where the template puts it.
const SENTINEL: &str = "\u{e000}irtrain-turn\u{e001}";

/// Assistant turn `i` as the model meets it at inference: the generation
/// prompt after `messages[..i]`, then the turn as the model writes it after
/// that prompt, then what the template puts after a turn's content (its end
/// of turn), trained from the generation prompt on.
///
/// What the model writes is the turn's content, its reasoning first where the
/// message carries it as a field (`<think>\n{reasoning}\n</think>\n\n{content}`,
/// the layout Qwen3's template renders), less the part of the generation
/// prompt that opens it (`<think>\n`). The template itself says where the
/// content goes: `messages[..i]` and a stand-in turn are rendered, and the text
/// before the stand-in must be the generation prompt's beginning. Turns the
/// template does not render from their content alone (tool calls) are refused,
/// as is a turn without reasoning after a generation prompt that opens it.
fn inference_turn(
    render: &dyn Fn(&[Value], bool) -> Result<String>,
    messages: &[Value],
    i: usize,
    start: String,
) -> std::result::Result<Rendered, String> {
    let msg = &messages[i];
    let text_attr =
        |k: &str| -> Option<String> { msg.get_attr(k).ok()?.as_str().map(str::to_owned) };
    let has_calls = msg
        .get_attr("tool_calls")
        .is_ok_and(|v| !v.is_undefined() && !v.is_none() && v.len().unwrap_or(1) > 0);
    let content = match text_attr("content") {
        Some(c) if !has_calls => c,
        _ => {
            return Err(format!(
                "assistant turn {} is not plain text content (tool calls), so it cannot be written \
                 as at inference either",
                i + 1
            ))
        }
    };
    let reasoning = text_attr("reasoning_content").filter(|r| !r.is_empty());
    let body = match reasoning {
        Some(r) if !content.contains("</think>") => format!(
            "<think>\n{}\n</think>\n\n{}",
            r.trim_matches('\n'),
            content.trim_start_matches('\n')
        ),
        _ => content,
    };
    let mut with_stand_in = messages[..i].to_vec();
    with_stand_in.push(Value::from(minijinja::value::Serde(serde_json::json!(
        {"role": "assistant", "content": SENTINEL}
    ))));
    let shown = render(&with_stand_in, false).map_err(|e| e.to_string())?;
    let at = match shown
        .match_indices(SENTINEL)
        .map(|(k, _)| k)
        .collect::<Vec<_>>()[..]
    {
        [k] => k,
        _ => {
            return Err(format!(
                "the template does not render assistant turn {}'s content once, as given",
                i + 1
            ))
        }
    };
    let head = &shown[..at];
    let opener = match start.strip_prefix(head) {
        Some(opener) => opener,
        None => {
            // The turns before render differently once a turn follows them (Mistral-Nemo
            // puts the system prompt in the last user turn only while it is last). The
            // generation prompt is then what follows those turns rendered alone; of it,
            // the part the stand-in's rendering also puts just before the content is the
            // turn's header, and the rest opens the turn.
            let before = render(&messages[..i], false).map_err(|e| e.to_string())?;
            let Some(prompt) = start.strip_prefix(before.as_str()) else {
                return Err(format!(
                    "the template renders assistant turn {} after a different text than its \
                     generation prompt",
                    i + 1
                ));
            };
            let header = (0..=prompt.len())
                .rev()
                .find(|&k| prompt.is_char_boundary(k) && head.ends_with(&prompt[..k]))
                .unwrap_or(0);
            &prompt[header..]
        }
    };
    let Some(written) = body.strip_prefix(opener) else {
        return Err(format!(
            "assistant turn {} does not begin with what the generation prompt opens ({opener:?}): \
             give the turn its reasoning",
            i + 1
        ));
    };
    let text = format!("{start}{written}{}", &shown[at + SENTINEL.len()..]);
    Ok(Rendered {
        spans: vec![(start.len(), text.len())],
        text,
    })
}

fn common_prefix(a: &str, b: &str) -> usize {
    let n = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    // a char boundary of both
    (0..=n).rev().find(|&k| a.is_char_boundary(k)).unwrap_or(0)
}

/// Why `prefix` (the first `n` messages) is not a prefix of `whole`, if it is not.
fn not_prefix(prefix: &str, whole: &str, n: usize, generation_prompt: bool) -> Option<String> {
    if whole.starts_with(prefix) {
        return None;
    }
    let at = common_prefix(prefix, whole);
    let what = if generation_prompt {
        format!("the first {n} messages rendered with add_generation_prompt=True")
    } else {
        format!("the first {n} messages")
    };
    let excerpt = |s: &str| -> String { s[at..].chars().take(24).collect() };
    Some(format!(
        "{what} do not render as a prefix of the longer conversation (they differ at byte {at}: {:?} vs {:?})",
        excerpt(prefix),
        excerpt(whole)
    ))
}

fn unstable(why: &str) -> CoreError {
    CoreError::Template(format!(
        "chat template is not prefix-stable: {why}, so turns cannot be masked from prefixes; \
         use --mask all or another template"
    ))
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
    use minijinja::value::Serde;

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

    fn rm(t: &ChatTemplate, c: &Conversation, m: MaskKind) -> Result<Rendered> {
        let mut out = render_and_mask(t, c, m, &Vars::new(), false)?;
        assert_eq!(out.renders.len(), 1);
        Ok(out.renders.remove(0))
    }

    /// Each rendering's text and its (one) trained span's text.
    fn trained(m: &Masked) -> Vec<(&str, &str)> {
        m.renders
            .iter()
            .map(|r| (r.text.as_str(), &r.text[r.spans[0].0..r.spans[0].1]))
            .collect()
    }

    const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn assistant_spans_include_end_of_turn() {
        let t = ChatTemplate::new(CHATML, &[]).unwrap();
        let json = r#"[{"role":"system","content":"s"},{"role":"user","content":"u1"},{"role":"assistant","content":"a1"},{"role":"user","content":"u2"},{"role":"assistant","content":"a2"}]"#;
        let c = conv(json, 0, 4);
        let r = rm(&t, &c, MaskKind::Assistant).unwrap();
        let trained: Vec<&str> = r.spans.iter().map(|&(s, e)| &r.text[s..e]).collect();
        assert_eq!(trained, vec!["a1<|im_end|>\n", "a2<|im_end|>\n"]);
        let r = rm(&t, &c, MaskKind::Last).unwrap();
        assert_eq!(&r.text[r.spans[0].0..r.spans[0].1], "a2<|im_end|>\n");
        let r = rm(&t, &c, MaskKind::Completion).unwrap();
        assert_eq!(&r.text[r.spans[0].0..r.spans[0].1], "a2<|im_end|>\n");
        let r = rm(&t, &c, MaskKind::All).unwrap();
        assert_eq!(r.spans, vec![(0, r.text.len())]);
        // with a prompt of 3 messages, `assistant` only trains turns after it
        let r = rm(&t, &conv(json, 3, 3), MaskKind::Assistant).unwrap();
        assert_eq!(r.spans.len(), 1);
    }

    #[test]
    fn no_assistant_turn_is_an_input_error() {
        let t = ChatTemplate::new(CHATML, &[]).unwrap();
        let c = conv(r#"[{"role":"user","content":"u1"}]"#, 0, 1);
        assert!(matches!(
            rm(&t, &c, MaskKind::Assistant),
            Err(CoreError::Input(_))
        ));
        assert!(matches!(
            rm(&t, &c, MaskKind::Completion),
            Err(CoreError::Input(_))
        ));
        assert!(rm(&t, &c, MaskKind::All).is_ok());
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
        let err = rm(&t, &c, MaskKind::Assistant).unwrap_err();
        assert!(
            matches!(&err, CoreError::Template(msg) if msg.contains("prefix-stable")),
            "{err}"
        );
        assert!(rm(&t, &c, MaskKind::Last).is_ok());
        // --mask assistant on a format of one segment per row: one example per turn
        let m = render_and_mask(&t, &c, MaskKind::Assistant, &Vars::new(), true).unwrap();
        assert!(
            m.split.as_deref().unwrap().contains("differ at byte"),
            "{:?}",
            m.split
        );
        let texts = trained(&m);
        assert_eq!(texts, vec![("u|a|", "a|"), ("u|[old]|v|b|", "b|")]);
        // a generation prompt that opens what the turn must begin with, and a
        // turn without it: refused, naming the turn
        let src = "{% for m in messages %}{{ m.content }}|{% endfor %}{% if add_generation_prompt %}<think>{% endif %}";
        let t = ChatTemplate::new(src, &[]).unwrap();
        let err = render_and_mask(&t, &c, MaskKind::Assistant, &Vars::new(), true).unwrap_err();
        assert!(
            matches!(&err, CoreError::Template(msg) if msg.contains("not even for assistant turn 2")
                && msg.contains("does not begin with what the generation prompt opens")),
            "{err}"
        );
    }

    /// As the DeepSeek-R1 distills: the generation prompt opens `<think>`, and
    /// every rendered assistant turn drops its reasoning.
    const R1: &str = "{% for m in messages %}{% if m.role == 'user' %}<U>{{ m.content }}{% else %}<A>{{ m.content.split('</think>')[-1] }}<E>{% endif %}{% endfor %}{% if add_generation_prompt %}<A><think>\n{% endif %}";

    #[test]
    fn turns_that_lose_their_reasoning_are_written_as_at_inference() {
        let t = ChatTemplate::new(R1, &[]).unwrap();
        let json = r#"[{"role":"user","content":"u"},{"role":"assistant","content":"<think>\nr1\n</think>\n\na"},{"role":"user","content":"v"},{"role":"assistant","content":"b","reasoning_content":"r2"}]"#;
        let c = conv(json, 0, 3);
        let m = render_and_mask(&t, &c, MaskKind::Assistant, &Vars::new(), true).unwrap();
        let texts = trained(&m);
        assert_eq!(
            texts,
            vec![
                (
                    "<U>u<A><think>\nr1\n</think>\n\na<E>",
                    "r1\n</think>\n\na<E>"
                ),
                (
                    "<U>u<A>\n\na<E><U>v<A><think>\nr2\n</think>\n\nb<E>",
                    "r2\n</think>\n\nb<E>"
                ),
            ]
        );
        assert_eq!(m.inference.as_ref().map(|x| x.0), Some(2));
        // --mask last, and a row of several segments (as preference pairs): the last turn alone
        for split in [false, true] {
            let m = render_and_mask(&t, &c, MaskKind::Last, &Vars::new(), split).unwrap();
            assert_eq!(m.renders.len(), 1);
            assert_eq!(m.renders[0].text, texts[1].0);
            assert_eq!(m.inference.as_ref().map(|x| x.0), Some(1));
        }
        // --mask completion of one assistant turn, too
        let m = render_and_mask(&t, &c, MaskKind::Completion, &Vars::new(), false).unwrap();
        assert_eq!(m.renders[0].text, texts[1].0);
        // several trained turns on a row of several segments cannot be split: refused
        assert!(render_and_mask(&t, &c, MaskKind::Assistant, &Vars::new(), false).is_err());
        // as Mistral-Nemo: the system prompt goes into the last message when it is a user
        // turn, so no rendering of a conversation ending in a turn holds it
        let nemo = "{% for m in messages[1:] %}{% if m.role == 'user' %}[I]{% if loop.last %}{{ messages[0].content }} {% endif %}{{ m.content }}[/I]{% else %}{{ m.content }}</s>{% endif %}{% endfor %}";
        let t2 = ChatTemplate::new(nemo, &[]).unwrap();
        let c2 = conv(
            r#"[{"role":"system","content":"s"},{"role":"user","content":"u"},{"role":"assistant","content":"a"},{"role":"user","content":"v"},{"role":"assistant","content":"b"}]"#,
            0,
            4,
        );
        let m = render_and_mask(&t2, &c2, MaskKind::Assistant, &Vars::new(), true).unwrap();
        let texts = trained(&m);
        assert_eq!(
            texts,
            vec![
                ("[I]s u[/I]a</s>", "a</s>"),
                ("[I]u[/I]a</s>[I]s v[/I]b</s>", "b</s>")
            ]
        );
        // a turn without reasoning after a prompt that opens it: refused, naming it
        let c = conv(
            r#"[{"role":"user","content":"u"},{"role":"assistant","content":"a"}]"#,
            0,
            1,
        );
        let err = render_and_mask(&t, &c, MaskKind::Last, &Vars::new(), true).unwrap_err();
        assert!(
            format!("{err}").contains("assistant turn 2 does not begin with"),
            "{err}"
        );
    }

    #[test]
    fn generation_blocks_give_the_spans() {
        // the header stays outside the block; an unstable history does not matter
        let src = "{% for m in messages %}{% if m.role == 'assistant' %}<A>{% generation %}{% if loop.last %}{{ m.content }}{% else %}[old]{% endif %}</A>{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}{% if add_generation_prompt %}<A>{% endif %}";
        let t = ChatTemplate::new(src, &[]).unwrap();
        let c = conv(
            r#"[{"role":"user","content":"u"},{"role":"assistant","content":"a"},{"role":"user","content":"v"},{"role":"assistant","content":"b"}]"#,
            0,
            3,
        );
        let r = rm(&t, &c, MaskKind::Assistant).unwrap();
        assert_eq!(r.text, "u<A>[old]</A>v<A>b</A>");
        let trained: Vec<&str> = r.spans.iter().map(|&(s, e)| &r.text[s..e]).collect();
        assert_eq!(trained, vec!["[old]</A>", "b</A>"]);
        let r = rm(&t, &c, MaskKind::Last).unwrap();
        assert_eq!(
            r.spans
                .iter()
                .map(|&(s, e)| &r.text[s..e])
                .collect::<Vec<_>>(),
            vec!["b</A>"]
        );
        // the prompt's blocks are not trained
        let r = rm(&t, &conv(r#"[{"role":"user","content":"u"},{"role":"assistant","content":"a"},{"role":"user","content":"v"},{"role":"assistant","content":"b"}]"#, 3, 3), MaskKind::Assistant).unwrap();
        assert_eq!(r.spans.len(), 1);
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
