//! The data path of `irtrain prepare`, end to end in Rust:
//! JSON lines -> segments (render, tokenize with offsets, mask) -> over-long
//! handling -> best-fit-decreasing packing -> shards.
//!
//! Python hands over the input as byte buffers of JSON lines (one per row) and
//! gets back per-row errors and, at the end, the shard metadata and counts.
//! Rows are encoded in parallel (rayon); packing works on windows of
//! `window_tokens` tokens so that memory stays bounded however large the input.
use rayon::prelude::*;

use crate::error::{CoreError, Result};
use crate::mask::{labels_from_offsets, render_and_mask, MaskKind, IGNORE_INDEX};
use crate::pack::best_fit_decreasing;
use crate::plain::parse_plain;
use crate::rows::{parse_fields, read_row, Columns, Format};
use crate::shard::{Segment, ShardMeta, ShardWriter};
use crate::template::ChatTemplate;
use crate::template::Vars;
use crate::tokenize::Tok;

/// What to do with an example longer than `max_len` (`--truncation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truncation {
    Drop,
    /// Keep the end (drop tokens from the start).
    Left,
    /// Keep the start (drop tokens from the end).
    Right,
}

impl Truncation {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "drop" => Self::Drop,
            "left" => Self::Left,
            "right" => Self::Right,
            _ => {
                return Err(CoreError::Input(format!(
                    "unknown truncation {s:?} (drop, left, right)"
                )))
            }
        })
    }
}

/// A row that could not be turned into an example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowError {
    /// 1-based row (line) number in its source.
    pub row: u64,
    /// "data", "template", "tokenizer" or "io": which `irtrain.errors` class it maps to.
    pub kind: &'static str,
    pub message: String,
}

impl RowError {
    fn new(row: u64, e: CoreError) -> Self {
        let kind = match e {
            CoreError::Input(_) => "data",
            CoreError::Template(_) => "template",
            CoreError::Tokenizer(_) => "tokenizer",
            CoreError::Io(_) => "io",
        };
        Self {
            row,
            kind,
            message: e.to_string(),
        }
    }
}

/// One encoded example: its segments, in part order.
#[derive(Debug, Clone)]
pub struct Example {
    pub segments: Vec<Segment>,
}

impl Example {
    pub fn len(&self) -> usize {
        self.segments.iter().map(Segment::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Non-blank lines of a buffer with their 1-based row numbers.
pub fn split_lines(buf: &[u8], first_row: u64) -> Vec<(u64, &[u8])> {
    let mut out = Vec::new();
    for (i, line) in buf.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        out.push((first_row + i as u64, line));
    }
    out
}

/// What one row becomes: its examples (several when its assistant turns were
/// split into per-turn examples, with the reason).
#[derive(Debug, Clone)]
pub struct Encoded {
    pub examples: Vec<Example>,
    pub split: Option<String>,
    /// Assistant turns written as at inference (`mask::inference_turn`), and why.
    pub inference: Option<(u64, String)>,
}

/// The fields of a row always passed to the chat template as variables (as
/// transformers' `apply_chat_template(tools=..., documents=...)`).
pub const TEMPLATE_VARS: [&str; 2] = ["tools", "documents"];

/// Each row's (1-based row number, examples or error), as `Encoder::encode_lines` returns them.
pub type RowResults = Vec<(u64, std::result::Result<Encoded, RowError>)>;

/// Tokenizer + chat template + format + mask: turns rows into examples.
pub struct Encoder {
    tok: Tok,
    tpl: ChatTemplate,
    pub format: Format,
    pub mask: MaskKind,
    /// Row fields passed to the template: `TEMPLATE_VARS` and `--template-vars`.
    vars: Vec<String>,
    columns: Columns,
    /// The eos token text when rows are plain text (no chat template), else None.
    plain_eos: Option<String>,
}

impl Encoder {
    pub fn new(tok: Tok, tpl: ChatTemplate, format: Format, mask: MaskKind) -> Self {
        Self {
            tok,
            tpl,
            format,
            mask,
            vars: TEMPLATE_VARS.iter().map(|s| s.to_string()).collect(),
            columns: Columns::default(),
            plain_eos: None,
        }
    }

    /// Also pass these row fields to the template (`--template-vars`).
    pub fn with_template_vars(mut self, extra: &[String]) -> Self {
        for v in extra {
            if !self.vars.contains(v) {
                self.vars.push(v.clone());
            }
        }
        self
    }

    /// The template variables a row (after `--columns`) carries: a field named
    /// in `self.vars` and not null. `tools` and `documents` must be lists.
    fn row_vars(&self, row: &serde_json::Map<String, serde_json::Value>) -> Result<Vars> {
        let mut vars = Vars::new();
        for name in &self.vars {
            match row.get(name) {
                None | Some(serde_json::Value::Null) => {}
                Some(v) => {
                    if TEMPLATE_VARS.contains(&name.as_str()) && !v.is_array() {
                        return Err(CoreError::Input(format!(
                            "'{name}' must be a list (of {}), not {}",
                            if name == "tools" {
                                "tool definitions"
                            } else {
                                "documents"
                            },
                            match v {
                                serde_json::Value::String(_) =>
                                    "a string (a JSON text? give the list itself)",
                                serde_json::Value::Object(_) => "an object",
                                _ => "a scalar",
                            }
                        )));
                    }
                    vars.insert(
                        name.clone(),
                        minijinja::Value::from(minijinja::value::Serde(v.clone())),
                    );
                }
            }
        }
        Ok(vars)
    }

    /// How rows are read: `columns` renamed first; plain text (no chat template,
    /// as TRL treats non-conversational data) for the `text` format, and for the
    /// others when `chat_template` is false. Plain text needs the tokenizer's
    /// `eos` token.
    pub fn with_rows(
        mut self,
        columns: Columns,
        chat_template: bool,
        eos: Option<&str>,
    ) -> Result<Self> {
        self.columns = columns;
        if self.format == Format::Chat && !chat_template {
            return Err(CoreError::Input(
                "--no-chat-template: chat rows are conversations and need a chat template \
                 (it applies to string prompt/completion/chosen/rejected fields)"
                    .into(),
            ));
        }
        if self.format == Format::Text || !chat_template {
            let Some(eos) = eos else {
                return Err(CoreError::Tokenizer(format!(
                    "the tokenizer names no eos_token (tokenizer_config.json), which the {} format appends \
                     to every completion as TRL does",
                    if self.format == Format::Text { "text" } else { "--no-chat-template" }
                )));
            };
            self.tok.set_added_specials()?;
            self.plain_eos = Some(eos.to_string());
        }
        Ok(self)
    }

    /// Whether tokenization takes the fast byte-level BPE path (`Tok::is_fast`).
    pub fn fast_bpe(&self) -> bool {
        self.tok.is_fast()
    }

    /// See `Tok::canonical_hash`.
    pub fn tokenizer_hash(&self) -> &str {
        self.tok.canonical_hash()
    }

    /// Render a conversation given as a JSON list of message objects, normalised
    /// as transformers does (null values dropped, reasoning aliases) but not
    /// validated (for checks against transformers and for callers that render).
    pub fn render_json(&self, messages_json: &str, add_generation_prompt: bool) -> Result<String> {
        let msgs: Vec<serde_json::Map<String, serde_json::Value>> =
            serde_json::from_str(messages_json).map_err(|e| {
                CoreError::Input(format!("messages are not a JSON list of objects: {e}"))
            })?;
        let values: Vec<minijinja::Value> = msgs
            .iter()
            .map(|m| {
                minijinja::Value::from(minijinja::value::Serde(serde_json::Value::Object(
                    crate::rows::normalise(m),
                )))
            })
            .collect();
        self.tpl.render(&values, add_generation_prompt)
    }

    /// Encode one row. `example` becomes the segments' example id (of the
    /// first example; per-turn examples take the ids after it).
    pub fn encode_row(&self, line: &[u8], example: i64) -> Result<Encoded> {
        let text = std::str::from_utf8(line).map_err(|e| {
            let at = e.valid_up_to();
            CoreError::Input(format!(
                "not valid UTF-8: byte 0x{:02x} at column {}",
                line[at],
                at + 1
            ))
        })?;
        let row = read_row(text, &self.columns)?;
        if let Some(eos) = &self.plain_eos {
            return Ok(Encoded {
                examples: vec![self.encode_plain(&row, eos, example)?],
                split: None,
                inference: None,
            });
        }
        let specs = parse_fields(&row, self.format)?;
        let vars = self.row_vars(&row)?;
        // a row of one segment may become one example per assistant turn
        let split_turns = specs.len() == 1;
        let mut segments = Vec::with_capacity(specs.len());
        let mut split = None;
        let mut inference: Option<(u64, String)> = None;
        for spec in specs {
            let masked =
                render_and_mask(&self.tpl, &spec.conversation, self.mask, &vars, split_turns)?;
            split = masked.split;
            match (&mut inference, masked.inference) {
                (Some((total, _)), Some((n, _))) => *total += n as u64,
                (None, Some((n, why))) => inference = Some((n as u64, why)),
                (_, None) => {}
            }
            for r in masked.renders {
                let enc = self.tok.encode(&r.text)?;
                if enc.ids.is_empty() {
                    return Err(CoreError::Input(
                        "the conversation renders to no tokens".into(),
                    ));
                }
                let labels = labels_from_offsets(&enc.ids, &enc.offsets, &r.spans);
                if labels.iter().all(|&l| l == IGNORE_INDEX) {
                    return Err(CoreError::Input(format!(
                        "nothing to train: mask '{}' selects no token of {}",
                        self.mask.name(),
                        if spec.part == 0 {
                            "the example".to_string()
                        } else {
                            format!("segment {}", spec.part)
                        }
                    )));
                }
                segments.push(Segment {
                    input_ids: enc.ids,
                    labels,
                    example,
                    part: spec.part,
                    score: spec.score,
                });
            }
        }
        if split.is_some() {
            // one example per turn, numbered from `example`
            let examples = segments
                .into_iter()
                .enumerate()
                .map(|(k, mut s)| {
                    s.example = example + k as i64;
                    Example { segments: vec![s] }
                })
                .collect();
            return Ok(Encoded {
                examples,
                split,
                inference,
            });
        }
        Ok(Encoded {
            examples: vec![Example { segments }],
            split: None,
            inference,
        })
    }

    /// A plain-text row as TRL's SFT/DPO/KTO trainers tokenize non-conversational
    /// data: `tokenizer(prompt)` and `tokenizer(prompt + completion + eos)` (eos
    /// appended unless the completion ends with it; the post-processor's special
    /// tokens added), the completion trained from where the two first differ
    /// (the smallest such point over the row's completions, as DPO does). `text`
    /// rows and `--mask all` train every token.
    fn encode_plain(
        &self,
        row: &serde_json::Map<String, serde_json::Value>,
        eos: &str,
        example: i64,
    ) -> Result<Example> {
        let p = parse_plain(row, self.format)?;
        let prompt_ids = p
            .prompt
            .as_deref()
            .map(|s| self.tok.encode_ids_special(s))
            .transpose()?;
        let mut segments = Vec::with_capacity(p.completions.len());
        for (completion, part, score) in &p.completions {
            let mut text = String::with_capacity(completion.len() + eos.len());
            text.push_str(p.prompt.as_deref().unwrap_or(""));
            text.push_str(completion);
            if !completion.ends_with(eos) {
                text.push_str(eos);
            }
            let input_ids = self.tok.encode_ids_special(&text)?;
            let labels = input_ids.iter().map(|&t| t as i32).collect();
            segments.push(Segment {
                input_ids,
                labels,
                example,
                part: *part,
                score: *score,
            });
        }
        let prompt_len = match (&prompt_ids, self.mask) {
            (Some(ids), m) if m != MaskKind::All => segments
                .iter()
                .map(|s| {
                    ids.iter()
                        .zip(&s.input_ids)
                        .take_while(|(a, b)| a == b)
                        .count()
                })
                .min()
                .unwrap_or(0),
            _ => 0,
        };
        for s in &mut segments {
            let cut = prompt_len.max(1).min(s.labels.len());
            s.labels[..cut].fill(IGNORE_INDEX);
            if s.labels.iter().all(|&l| l == IGNORE_INDEX) {
                return Err(CoreError::Input(format!(
                    "nothing to train: {} tokenizes to {} token(s), all of them {}",
                    if p.prompt.is_some() {
                        "the completion"
                    } else {
                        "the text"
                    },
                    s.input_ids.len(),
                    if p.prompt.is_some() {
                        "shared with the prompt"
                    } else {
                        "untrained (the first token is never trained)"
                    }
                )));
            }
        }
        Ok(Example { segments })
    }

    /// Encode every non-blank line of `buf` in parallel (on the current rayon
    /// pool). Example ids count up from `first_example` in row order: one per
    /// row (a failed one too), one per example of a row split into per-turn
    /// examples. Returns the rows' results and the next free id.
    pub fn encode_lines(
        &self,
        buf: &[u8],
        first_row: u64,
        first_example: i64,
    ) -> (RowResults, i64) {
        let lines = split_lines(buf, first_row);
        let mut results: RowResults = lines
            .par_iter()
            .map(|&(row, line)| {
                (
                    row,
                    self.encode_row(line, 0).map_err(|e| RowError::new(row, e)),
                )
            })
            .collect();
        let mut next = first_example;
        for (_, r) in &mut results {
            match r {
                Ok(enc) => {
                    for ex in &mut enc.examples {
                        for s in &mut ex.segments {
                            s.example = next;
                        }
                        next += 1;
                    }
                }
                Err(_) => next += 1,
            }
        }
        (results, next)
    }
}

/// Over-long handling: the largest cap `c` with `sum(min(len_i, c)) <= max_len`
/// ("water filling": long segments are cut first, short ones stay whole).
pub fn truncation_cap(lens: &[usize], max_len: usize) -> usize {
    let (mut lo, mut hi) = (0usize, lens.iter().copied().max().unwrap_or(0));
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if lens.iter().map(|&l| l.min(mid)).sum::<usize>() <= max_len {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

/// Cut every segment of `ex` to at most `cap` tokens (keeping the end for
/// `Left`, the start for `Right`) and re-mask the new first tokens.
pub fn truncate(ex: &mut Example, cap: usize, how: Truncation) {
    for seg in &mut ex.segments {
        let n = seg.input_ids.len();
        if n <= cap {
            continue;
        }
        match how {
            Truncation::Left => {
                seg.input_ids.drain(..n - cap);
                seg.labels.drain(..n - cap);
            }
            Truncation::Right | Truncation::Drop => {
                seg.input_ids.truncate(cap);
                seg.labels.truncate(cap);
            }
        }
        if let Some(first) = seg.labels.first_mut() {
            *first = IGNORE_INDEX;
        }
    }
}

/// Settings of a `Preparer`.
#[derive(Debug, Clone)]
pub struct Options {
    pub max_len: usize,
    pub truncation: Truncation,
    pub pack: bool,
    pub shard_rows: usize,
    pub skip_invalid: bool,
    pub threads: usize,
    /// Pack once this many tokens are pending (0: max(4 Mi, 256 rows)).
    pub window_tokens: usize,
}

/// Counts for the report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub docs_in: u64,
    pub docs_out: u64,
    pub skipped: u64,
    pub dropped_too_long: u64,
    pub dropped_nothing_trained: u64,
    pub truncated: u64,
    pub segments: u64,
    pub rows: u64,
    pub tokens_total: u64,
    pub tokens_trained: u64,
    pub windows: u64,
    /// Rows split into per-turn examples, the examples they became, and why
    /// (the first such row's reason).
    pub split_rows: u64,
    pub split_examples: u64,
    pub split_reason: Option<String>,
    /// Assistant turns written as at inference, and why (the first reason).
    pub inference_turns: u64,
    pub inference_reason: Option<String>,
}

/// Result of feeding one buffer.
#[derive(Debug, Clone, Default)]
pub struct ChunkOutcome {
    pub rows: u64,
    pub errors: Vec<RowError>,
}

/// The whole pipeline, fed buffer by buffer.
pub struct Preparer {
    enc: Encoder,
    opts: Options,
    pool: rayon::ThreadPool,
    pending: Vec<Example>,
    pending_tokens: usize,
    window_tokens: usize,
    writer: ShardWriter,
    counts: Counts,
    next_example: i64,
}

impl Preparer {
    pub fn new(enc: Encoder, opts: Options, out_dir: &str) -> Result<Self> {
        if opts.max_len < 2 {
            return Err(CoreError::Input("max_len must be at least 2".into()));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(opts.threads)
            .build()
            .map_err(|e| CoreError::Input(format!("cannot start {} threads: {e}", opts.threads)))?;
        let window_tokens = if opts.window_tokens > 0 {
            opts.window_tokens
        } else {
            (4usize << 20).max(256 * opts.max_len)
        };
        let writer = ShardWriter::new(out_dir, opts.shard_rows)?;
        Ok(Self {
            enc,
            opts,
            pool,
            pending: Vec::new(),
            pending_tokens: 0,
            window_tokens,
            writer,
            counts: Counts::default(),
            next_example: 0,
        })
    }

    /// Encode the JSON lines of `buf` (rows numbered from `first_row`). Without
    /// `skip_invalid`, a buffer with errors commits nothing: the caller stops.
    pub fn add_lines(&mut self, buf: &[u8], first_row: u64) -> Result<ChunkOutcome> {
        let first = self.next_example;
        let enc = &self.enc;
        let (results, next) = self
            .pool
            .install(|| enc.encode_lines(buf, first_row, first));
        let mut outcome = ChunkOutcome {
            rows: results.len() as u64,
            errors: Vec::new(),
        };
        let mut examples = Vec::with_capacity(results.len());
        let mut split = (0u64, 0u64, None);
        let mut inference = (0u64, None);
        for (_, r) in results {
            match r {
                Ok(enc) => {
                    if let Some((n, why)) = enc.inference {
                        inference.0 += n;
                        inference.1.get_or_insert(why);
                    }
                    if let Some(why) = enc.split {
                        split.0 += 1;
                        split.1 += enc.examples.len() as u64;
                        split.2.get_or_insert(why);
                    }
                    examples.extend(enc.examples);
                }
                Err(e) => outcome.errors.push(e),
            }
        }
        if !outcome.errors.is_empty() && !self.opts.skip_invalid {
            return Ok(outcome);
        }
        self.next_example = next;
        self.counts.split_rows += split.0;
        self.counts.split_examples += split.1;
        if self.counts.split_reason.is_none() {
            self.counts.split_reason = split.2;
        }
        self.counts.inference_turns += inference.0;
        if self.counts.inference_reason.is_none() {
            self.counts.inference_reason = inference.1;
        }
        self.counts.docs_in += outcome.rows;
        self.counts.skipped += outcome.errors.len() as u64;
        for ex in examples {
            self.commit(ex)?;
        }
        if self.pending_tokens >= self.window_tokens {
            self.flush()?;
        }
        Ok(outcome)
    }

    fn commit(&mut self, mut ex: Example) -> Result<()> {
        let len = ex.len();
        if len > self.opts.max_len {
            if self.opts.truncation == Truncation::Drop {
                self.counts.dropped_too_long += 1;
                return Ok(());
            }
            let lens: Vec<usize> = ex.segments.iter().map(Segment::len).collect();
            let cap = truncation_cap(&lens, self.opts.max_len);
            truncate(&mut ex, cap, self.opts.truncation);
            let nothing = ex
                .segments
                .iter()
                .any(|s| s.labels.iter().all(|&l| l == IGNORE_INDEX));
            if cap == 0 || nothing {
                self.counts.dropped_nothing_trained += 1;
                return Ok(());
            }
            self.counts.truncated += 1;
        }
        self.counts.docs_out += 1;
        for s in &ex.segments {
            self.counts.segments += 1;
            self.counts.tokens_total += s.len() as u64;
            self.counts.tokens_trained +=
                s.labels.iter().filter(|&&l| l != IGNORE_INDEX).count() as u64;
        }
        if self.opts.pack {
            self.pending_tokens += ex.len();
            self.pending.push(ex);
        } else {
            let row: Vec<&Segment> = ex.segments.iter().collect();
            self.writer.push_row(&row)?;
            self.counts.rows += 1;
        }
        Ok(())
    }

    /// Pack the pending examples and write their rows.
    fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let lengths: Vec<usize> = self.pending.iter().map(Example::len).collect();
        let bins = best_fit_decreasing(&lengths, self.opts.max_len)?;
        for bin in &bins {
            let row: Vec<&Segment> = bin
                .iter()
                .flat_map(|&i| self.pending[i].segments.iter())
                .collect();
            self.writer.push_row(&row)?;
        }
        self.counts.rows += bins.len() as u64;
        self.counts.windows += 1;
        self.pending.clear();
        self.pending_tokens = 0;
        Ok(())
    }

    pub fn encoder(&self) -> &Encoder {
        &self.enc
    }

    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    /// Pack what is left and close the shards.
    pub fn finish(mut self) -> Result<(Vec<ShardMeta>, Counts)> {
        self.flush()?;
        let metas = self.writer.finish()?;
        Ok((metas, self.counts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lines_with_row_numbers() {
        let lines = split_lines(b"{\"a\":1}\r\n\n  \n{\"b\":2}\n", 5);
        assert_eq!(lines, vec![(5, &b"{\"a\":1}"[..]), (8, &b"{\"b\":2}"[..])]);
    }

    #[test]
    fn water_filling_cap() {
        assert_eq!(truncation_cap(&[10, 3], 8), 5);
        assert_eq!(truncation_cap(&[10, 10], 8), 4);
        assert_eq!(truncation_cap(&[3, 2], 100), 3);
        assert_eq!(truncation_cap(&[6], 4), 4);
    }

    #[test]
    fn truncation_keeps_the_right_end_and_remasks() {
        let seg = Segment {
            input_ids: vec![1, 2, 3, 4, 5],
            labels: vec![-100, 2, 3, 4, 5],
            example: 0,
            part: 0,
            score: 0.0,
        };
        let mut left = Example {
            segments: vec![seg.clone()],
        };
        truncate(&mut left, 3, Truncation::Left);
        assert_eq!(left.segments[0].input_ids, vec![3, 4, 5]);
        assert_eq!(left.segments[0].labels, vec![-100, 4, 5]);
        let mut right = Example {
            segments: vec![seg],
        };
        truncate(&mut right, 3, Truncation::Right);
        assert_eq!(right.segments[0].input_ids, vec![1, 2, 3]);
        assert_eq!(right.segments[0].labels, vec![-100, 2, 3]);
    }
}
