//! `irtrain score`'s states: where the steps of a response end, from each token's exact bytes.
//!
//! A response is the tokens of a segment whose label is not -100. It is
//! `content`, then (when one is there) the end-of-turn token, then what the
//! template appends after the turn:
//!
//! - the end-of-turn token is the first *special* token (an added token with
//!   `special: true`, but the model's unknown token: `<|im_end|>`, `<|eot_id|>`,
//!   `</s>`, ...) of the response's trailing run of special and whitespace-only
//!   tokens (`<|im_end|>\n`, `<|end|>\n<|endoftext|>`); without one the whole
//!   response is content;
//! - the content is split into steps at the delimiter: a step ends where its
//!   delimiter ends (the delimiter belongs to the step it closes; a run of
//!   delimiters is one boundary; a delimiter at the very start opens no step),
//!   at the token holding that byte; the last step ends at the last content
//!   token; two steps ending in one token are kept once;
//! - the states are `s_0` (the position before the first response token), the
//!   end of every step, and the end-of-turn token as the terminal state;
//!   nothing after it is a state.
//!
//! Token bytes are exact: byte-level BPE through its byte alphabet (added tokens
//! as their content), any other tokenizer by incremental decoding (each token
//! gets the text its decoding adds; a character split over several tokens
//! belongs to the token completing it). The Python reference of all of this is
//! in `tests/test_score_steps.py`.
use rayon::prelude::*;
use std::sync::OnceLock;

use serde_json::Value as Json;
use tokenizers::Tokenizer;

use crate::error::{CoreError, Result};
use crate::tokenize::byte_chars;

/// The label of an untrained token (shard format).
const IGNORE_INDEX: i32 = -100;

/// Splits responses into states for one tokenizer; built once per vocabulary.
pub struct StepSplitter {
    json: String,
    /// the `tokenizers` tokenizer, for incremental decoding: loaded when first needed
    /// (never, for a byte-level vocabulary whose every id is in the table)
    tok: OnceLock<std::result::Result<Tokenizer, String>>,
    /// byte-level BPE: each id's bytes; None where an id is not in the byte
    /// alphabet (its segment then decodes incrementally, as any tokenizer)
    pieces: Option<Vec<Option<Box<[u8]>>>>,
    /// per id: an added token flagged special (a candidate end-of-turn token)
    special: Vec<bool>,
}

/// The states of every segment with a response, in segment order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Split {
    /// index of the segment (over all the arrays given, in order)
    pub segment: Vec<i64>,
    /// `states[offsets[i]..offsets[i + 1]]` are segment i's token positions (segment-relative)
    pub offsets: Vec<i64>,
    pub states: Vec<i64>,
    /// whether segment i's last state is its end-of-turn token
    pub terminal: Vec<bool>,
}

/// One shard's flat arrays: token ids, labels, and the `[S + 1]` segment offsets into them.
pub type Arrays<'a> = (&'a [u32], &'a [i32], &'a [i64]);

/// One segment's (index, states, terminal).
type SegmentStates = (i64, Vec<i64>, bool);

/// Tokens' bytes, flat: token k is `text[ends[k - 1]..ends[k]]`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pieces {
    pub text: Vec<u8>,
    pub ends: Vec<usize>,
}

impl Pieces {
    pub fn from_pieces(pieces: &[Vec<u8>]) -> Self {
        let mut out = Self::default();
        for p in pieces {
            out.push(p);
        }
        out
    }

    fn push(&mut self, p: &[u8]) {
        self.text.extend_from_slice(p);
        self.ends.push(self.text.len());
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn piece(&self, k: usize) -> &[u8] {
        &self.text[if k == 0 { 0 } else { self.ends[k - 1] }..self.ends[k]]
    }

    pub fn to_vecs(&self) -> Vec<Vec<u8>> {
        (0..self.len()).map(|k| self.piece(k).to_vec()).collect()
    }
}

impl StepSplitter {
    /// From the JSON text of a tokenizer (`tokenizer.json`, or transformers'
    /// `backend_tokenizer.to_str()`): the vocabulary, the added tokens and the decoder
    /// are read from it; the `tokenizers` crate loads it only for incremental decoding.
    pub fn from_json(json: &str) -> Result<Self> {
        let spec: Json = serde_json::from_str(json)
            .map_err(|e| CoreError::Tokenizer(format!("cannot read the tokenizer's JSON: {e}")))?;
        let bad =
            |what: &str| CoreError::Tokenizer(format!("the tokenizer's JSON has no valid {what}"));
        let mut added: Vec<(u32, &str, bool)> = Vec::new(); // (id, content, special)
        for t in spec["added_tokens"]
            .as_array()
            .map_or(&[][..], Vec::as_slice)
        {
            let id = t["id"].as_u64().ok_or_else(|| bad("added token id"))? as u32;
            let content = t["content"]
                .as_str()
                .ok_or_else(|| bad("added token content"))?;
            added.push((id, content, t["special"].as_bool().unwrap_or(false)));
        }
        // BPE and WordPiece: {token: id}; any other model gets no table (incremental decoding)
        let vocab: Vec<(&str, u32)> = spec["model"]["vocab"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(t, id)| Some((t.as_str(), id.as_u64()? as u32)))
                    .collect()
            })
            .unwrap_or_default();
        let mut this = Self {
            json: json.to_owned(),
            tok: OnceLock::new(),
            pieces: None,
            special: Vec::new(),
        };
        let size = vocab
            .iter()
            .map(|v| v.1)
            .chain(added.iter().map(|a| a.0))
            .max()
            .map_or(0, |m| m as usize + 1);
        let size = if vocab.is_empty() {
            size.max(this.tokenizer()?.get_vocab_size(true))
        } else {
            size
        };
        this.special = vec![false; size];
        for &(id, _, special) in &added {
            this.special[id as usize] = special;
        }
        // the unknown token stands for content it could not encode, never for the turn's end
        if let Some(unk) = spec["model"]["unk_token"].as_str() {
            let id = added
                .iter()
                .find(|a| a.1 == unk)
                .map(|a| a.0)
                .or_else(|| vocab.iter().find(|v| v.0 == unk).map(|v| v.1));
            if let Some(id) = id {
                this.special[id as usize] = false;
            }
        }
        if byte_level(&spec) && !vocab.is_empty() {
            let mut table = [None::<u8>; 0x180];
            for (b, c) in byte_chars().iter().enumerate() {
                table[*c as usize] = Some(b as u8);
            }
            let mut pieces: Vec<Option<Box<[u8]>>> = vec![None; size];
            for &(t, id) in &vocab {
                pieces[id as usize] = t
                    .chars()
                    .map(|c| table.get(c as usize).copied().flatten())
                    .collect::<Option<Vec<u8>>>()
                    .map(Vec::into_boxed_slice);
            }
            for &(id, content, _) in &added {
                pieces[id as usize] = Some(content.as_bytes().into()); // added tokens as their content
            }
            this.pieces = Some(pieces);
        }
        Ok(this)
    }

    fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tok
            .get_or_init(|| {
                self.json
                    .parse()
                    .map_err(|e| format!("cannot load the tokenizer: {e}"))
            })
            .as_ref()
            .map_err(|e| CoreError::Tokenizer(e.clone()))
    }

    /// Whether token bytes come from the byte alphabet (else incremental decoding).
    pub fn is_byte_level(&self) -> bool {
        self.pieces.is_some()
    }

    /// The exact bytes each token of `ids` contributes to the decoded text.
    pub fn token_bytes(&self, ids: &[u32]) -> Result<Vec<Vec<u8>>> {
        Ok(self.pieces_of(ids)?.to_vecs())
    }

    fn pieces_of(&self, ids: &[u32]) -> Result<Pieces> {
        if let Some(table) = &self.pieces {
            let mut out = Pieces {
                text: Vec::with_capacity(ids.len() * 4),
                ends: Vec::with_capacity(ids.len()),
            };
            let all = ids.iter().all(
                |&i| match table.get(i as usize).and_then(|p| p.as_deref()) {
                    Some(p) => {
                        out.push(p);
                        true
                    }
                    None => false,
                },
            );
            if all {
                return Ok(out);
            }
        }
        Ok(Pieces::from_pieces(&self.incremental_token_bytes(ids)?))
    }

    /// Per-token bytes by incremental decoding: two decodes of a small window that
    /// start at the same token (so decoders that strip a leading space agree) give
    /// each token the text it adds; a trailing incomplete character (U+FFFD) waits
    /// for the token that completes it.
    pub fn incremental_token_bytes(&self, ids: &[u32]) -> Result<Vec<Vec<u8>>> {
        let dec = |a: usize, b: usize| -> Result<Vec<char>> {
            if a == b {
                return Ok(Vec::new());
            }
            self.tokenizer()?
                .decode(&ids[a..b], false)
                .map(|s| s.chars().collect())
                .map_err(|e| CoreError::Tokenizer(format!("cannot decode tokens: {e}")))
        };
        let mut pieces = Vec::with_capacity(ids.len());
        // window start; tokens before `read` are all emitted; chars emitted past them
        let (mut prefix, mut read, mut extra) = (0usize, 0usize, 0usize);
        for k in 0..ids.len() {
            let before = dec(prefix, read)?.len();
            let now = dec(prefix, k + 1)?;
            let mut stable = now.len();
            if k + 1 < ids.len() {
                while stable > 0 && now[stable - 1] == '\u{fffd}' {
                    stable -= 1;
                }
            }
            let start = before + extra;
            pieces.push(if stable > start {
                now[start..stable].iter().collect::<String>().into_bytes()
            } else {
                Vec::new()
            });
            extra += stable.saturating_sub(start);
            if stable == now.len() {
                (prefix, read, extra) = (read, k + 1, 0);
            }
        }
        Ok(pieces)
    }

    fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// The states of one response (`resp`: ids of the response tokens), as indices
    /// into it: the end of every step, then the end-of-turn token; and whether
    /// that last one is there.
    pub fn response_states(&self, resp: &[u32], delimiter: &[u8]) -> Result<(Vec<usize>, bool)> {
        let pieces = self.pieces_of(resp)?;
        let eot = end_of_turn(&pieces, |k| self.is_special(resp[k]));
        let content = eot.unwrap_or(pieces.len());
        let text_end = if content == 0 {
            0
        } else {
            pieces.ends[content - 1]
        };
        let mut ends = step_ends(&pieces.text[..text_end], &pieces.ends[..content], delimiter);
        if let Some(e) = eot {
            ends.push(e);
        }
        Ok((ends, eot.is_some()))
    }

    /// Every segment's states, in one pass over all the arrays (segments in
    /// parallel; the result in order). A segment is skipped when no token of it
    /// is trained; its first token must not be (`s_0` is the one before).
    pub fn split(&self, arrays: &[Arrays<'_>], delimiter: &[u8]) -> Result<Split> {
        if delimiter.is_empty() {
            return Err(CoreError::Input(
                "the step delimiter must not be empty".into(),
            ));
        }
        let mut spans = Vec::new(); // (segment index, ids, labels)
        let mut n = 0i64;
        for &(ids, labels, offsets) in arrays {
            if ids.len() != labels.len() {
                return Err(CoreError::Input(
                    "input_ids and labels differ in length".into(),
                ));
            }
            for w in offsets.windows(2) {
                let (a, b) = (w[0], w[1]);
                if a < 0 || b < a || b as usize > ids.len() {
                    return Err(CoreError::Input(format!(
                        "segment {n}: offsets {a}..{b} are not inside the tokens"
                    )));
                }
                spans.push((
                    n,
                    &ids[a as usize..b as usize],
                    &labels[a as usize..b as usize],
                ));
                n += 1;
            }
        }
        let per: Vec<Result<Option<SegmentStates>>> = spans
            .par_iter()
            .map(|&(seg, ids, labels)| {
                let resp: Vec<usize> = (0..ids.len()).filter(|&t| labels[t] != IGNORE_INDEX).collect();
                let Some(&first) = resp.first() else { return Ok(None) };
                if first == 0 {
                    return Err(CoreError::Input(format!(
                        "segment {seg}: its first token is trained, so no state precedes the response"
                    )));
                }
                let r_ids: Vec<u32> = resp.iter().map(|&t| ids[t]).collect();
                let (ends, terminal) = self.response_states(&r_ids, delimiter)?;
                let mut states = Vec::with_capacity(ends.len() + 1);
                states.push(first as i64 - 1);
                states.extend(ends.iter().map(|&e| resp[e] as i64));
                Ok(Some((seg, states, terminal)))
            })
            .collect();
        let mut out = Split {
            offsets: vec![0],
            ..Split::default()
        };
        for r in per {
            if let Some((seg, states, terminal)) = r? {
                out.segment.push(seg);
                out.states.extend_from_slice(&states);
                out.offsets.push(out.states.len() as i64);
                out.terminal.push(terminal);
            }
        }
        Ok(out)
    }
}

/// Index of the end-of-turn token: the first special token of the trailing run
/// of special and whitespace-only tokens; None when that run has no special token.
pub fn end_of_turn(pieces: &Pieces, special: impl Fn(usize) -> bool) -> Option<usize> {
    let mut eot = None;
    for k in (0..pieces.len()).rev() {
        if special(k) {
            eot = Some(k);
        } else if !pieces.piece(k).iter().all(u8::is_ascii_whitespace) {
            break;
        }
    }
    eot
}

/// Index of the token that ends each step, for tokens whose bytes are `text`
/// (token k ends at byte `ends[k]`): never empty for a non-empty text of tokens,
/// strictly increasing, the last is `ends.len() - 1`.
pub fn step_ends(text: &[u8], ends: &[usize], delimiter: &[u8]) -> Vec<usize> {
    if ends.is_empty() {
        return Vec::new();
    }
    let d = delimiter.len();
    let last = ends.len() - 1;
    let mut out: Vec<usize> = Vec::new();
    let push = |t: usize, out: &mut Vec<usize>| {
        if out.last() != Some(&t) {
            out.push(t); // two steps ending in one token: kept once
        }
    };
    let mut i = 0usize;
    while let Some(j) = find(text, delimiter, i) {
        let mut e = j + d;
        while text[e..].starts_with(delimiter) {
            e += d; // a run of delimiters is one boundary
        }
        if j > 0 && e < text.len() {
            // a delimiter at the very start opens no step; one at the end closes the last step only
            push(ends.partition_point(|&x| x < e).min(last), &mut out);
        }
        i = e;
    }
    push(last, &mut out);
    out
}

fn find(text: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    let (first, rest) = needle.split_first()?;
    let mut at = from;
    while at + needle.len() <= text.len() {
        let k = text[at..=text.len() - needle.len()]
            .iter()
            .position(|b| b == first)?
            + at;
        if text[k + 1..].starts_with(rest) {
            return Some(k);
        }
        at = k + 1;
    }
    None
}

#[cfg(test)]
fn find_naive(text: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if from + needle.len() > text.len() {
        return None;
    }
    text[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// Whether the tokenizer decodes through the byte-level alphabet (its decoder, or
/// one of a sequence of decoders, is `ByteLevel`).
fn byte_level(spec: &Json) -> bool {
    let dec = &spec["decoder"];
    dec["type"] == "ByteLevel"
        || dec["decoders"]
            .as_array()
            .is_some_and(|d| d.iter().any(|x| x["type"] == "ByteLevel"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &[&str]) -> Pieces {
        Pieces::from_pieces(&s.iter().map(|x| x.as_bytes().to_vec()).collect::<Vec<_>>())
    }

    fn ends_of(s: &[&str], delimiter: &[u8]) -> Vec<usize> {
        let q = p(s);
        step_ends(&q.text, &q.ends, delimiter)
    }

    #[test]
    fn find_agrees_with_a_naive_search() {
        let text = b"aab\n\n\nxx\n\nab\naa\n";
        for needle in [
            &b"\n\n"[..],
            b"a",
            b"ab",
            b"\n",
            b"xx\n",
            b"zz",
            b"aab\n\n\nxx\n\nab\naa\n",
        ] {
            for from in 0..=text.len() {
                assert_eq!(
                    find(text, needle, from),
                    find_naive(text, needle, from),
                    "{needle:?} {from}"
                );
            }
        }
    }

    #[test]
    fn step_ends_on_hand_made_pieces() {
        assert_eq!(
            ends_of(&["a", "\n", "\nb", "c\n\n", "\n\n", "d"], b"\n\n"),
            vec![2, 4, 5]
        );
        assert_eq!(ends_of(&["\n\n", "x"], b"\n\n"), vec![1]);
        assert_eq!(ends_of(&["x\n\n"], b"\n\n"), vec![0]);
        assert_eq!(ends_of(&["x", "y"], b"\n\n"), vec![1]);
        assert_eq!(ends_of(&["x\n\ny"], b"\n\n"), vec![0]);
        assert_eq!(ends_of(&["s1 ", "##", "s2", "##"], b"##"), vec![1, 3]);
        assert!(ends_of(&[], b"\n\n").is_empty());
    }

    #[test]
    fn end_of_turn_is_the_first_special_of_the_trailing_run() {
        let sp = |ks: &'static [usize]| move |k: usize| ks.contains(&k);
        // "x", <|im_end|>, "\n": the special one; the newline after it is no state
        assert_eq!(end_of_turn(&p(&["x", "<e>", "\n"]), sp(&[1])), Some(1));
        // <|end|>, "\n", <|endoftext|>: the first one closes the turn
        assert_eq!(
            end_of_turn(&p(&["x", "<a>", "\n", "<b>"]), sp(&[1, 3])),
            Some(1)
        );
        // a special token inside the content is content
        assert_eq!(
            end_of_turn(&p(&["<a>", "x", "\n\n", "<b>"]), sp(&[0, 3])),
            Some(3)
        );
        assert_eq!(end_of_turn(&p(&["x", "\n"]), sp(&[])), None);
        assert_eq!(end_of_turn(&p(&["<a>"]), sp(&[0])), Some(0));
    }

    #[test]
    fn byte_level_pieces_and_states_of_a_chatml_response() {
        let json = crate::tokenize::tests::byte_level_json(&["<|im_end|>"]);
        let s = StepSplitter::from_json(&json).unwrap();
        assert!(s.is_byte_level());
        let tok: Tokenizer = json.parse().unwrap();
        let text = "ab\n\ncd<|im_end|>\n";
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        let pieces = s.token_bytes(&ids).unwrap();
        assert_eq!(pieces.concat(), text.as_bytes());
        assert_eq!(
            s.incremental_token_bytes(&ids).unwrap().concat(),
            text.as_bytes()
        );
        let (ends, terminal) = s.response_states(&ids, b"\n\n").unwrap();
        let eot = pieces.iter().position(|x| x == b"<|im_end|>").unwrap();
        assert!(terminal && *ends.last().unwrap() == eot && ends[ends.len() - 2] == eot - 1);
        // through `split`: positions in the segment, s_0 first; untrained segments skipped
        let mut all = vec![7u32, 7];
        all.extend(&ids);
        let mut labels = vec![IGNORE_INDEX; 2];
        labels.extend(ids.iter().map(|&i| i as i32));
        let offsets = [0i64, 1, all.len() as i64];
        let out = s.split(&[(&all, &labels, &offsets)], b"\n\n").unwrap();
        assert_eq!(out.segment, vec![1]);
        assert_eq!(out.states[0], 0);
        assert_eq!(
            out.states[1..],
            ends.iter().map(|&e| e as i64 + 1).collect::<Vec<_>>()[..]
        );
        assert_eq!(out.terminal, vec![true]);
        assert!(s.split(&[(&all, &labels, &offsets)], b"").is_err());
        let trained_first = [2i64, all.len() as i64];
        assert!(s
            .split(&[(&all, &labels, &trained_first)], b"\n\n")
            .is_err());
    }
}
