//! Tokenization with byte offsets, through the `tokenizers` crate: the same
//! `tokenizer.json` that transformers loads, so ids are identical to
//! `tokenizer(text, add_special_tokens=False)`.
//!
//! Byte-level BPE tokenizers (GPT-2, Llama-3, Qwen, cl100k-style: no normalizer,
//! a regex split then byte-level mapping, plain BPE) also get a fast path
//! (`FastBpe`): the same added-token split (leftmost-longest), the same regex
//! engine (onig, through `tokenizers::utils::SysRegex`), and the same merge
//! order (lowest rank first, leftmost on ties), on bytes and ids instead of
//! `tokenizers`' normalized strings with per-char alignments. It is used only
//! when the file is of that shape and a self-check against the `tokenizers`
//! crate passes at load; everything else goes through the crate.
use std::cmp::Reverse;
use std::collections::BinaryHeap;

use aho_corasick::{AhoCorasick, MatchKind};
use rustc_hash::FxHashMap;
use serde_json::Value as Json;
use tokenizers::utils::SysRegex;
use tokenizers::Tokenizer;

use crate::error::{CoreError, Result};

/// One encoded text: token ids and, per token, the byte range `[start, end)`
/// of the text it came from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub offsets: Vec<(usize, usize)>,
}

/// A loaded tokenizer. Truncation and padding stored in the file are switched
/// off, as `apply_chat_template(..., truncation=False, padding=False)` does.
pub struct Tok {
    inner: Tokenizer,
    hash: String,
    fast: Option<FastBpe>,
    /// The special tokens `tokenizer(text)` adds around a text (before, after);
    /// see `set_added_specials`.
    added: (Vec<u32>, Vec<u32>),
}

impl Tok {
    /// Load from the JSON text of a `tokenizer.json` (with the fast path when it applies).
    pub fn from_json(json: &str) -> Result<Self> {
        Self::from_json_with(json, true)
    }

    /// Load; `allow_fast = false` always uses the `tokenizers` crate.
    pub fn from_json_with(json: &str, allow_fast: bool) -> Result<Self> {
        let mut inner: Tokenizer = json
            .parse()
            .map_err(|e| CoreError::Tokenizer(format!("cannot load tokenizer.json: {e}")))?;
        let hash = hash_of(&inner)?;
        inner
            .with_truncation(None)
            .map_err(|e| CoreError::Tokenizer(format!("cannot disable truncation: {e}")))?;
        inner.with_padding(None);
        let mut tok = Self {
            inner,
            hash,
            fast: None,
            added: (Vec::new(), Vec::new()),
        };
        if allow_fast {
            let fast = serde_json::from_str::<Json>(json)
                .ok()
                .and_then(|v| FastBpe::from_json(&v));
            tok.fast = fast.filter(|f| tok.agrees(f));
        }
        Ok(tok)
    }

    /// Whether the fast byte-level BPE path is in use.
    pub fn is_fast(&self) -> bool {
        self.fast.is_some()
    }

    /// Self-check of the fast path against the crate on a text with every kind of piece.
    fn agrees(&self, fast: &FastBpe) -> bool {
        let mut probe = String::from(
            "Hello, world! It's 2024-07-26: 12345 apples\tand  spaces   \n\n\r\n  x\u{a0}y \
             caf\u{e9} na\u{ef}ve \u{65e5}\u{672c}\u{8a9e} \u{1f389}\u{1f680} \u{200d}\u{0301} ' \"quotes\" don't I'LL \
             <b>&amp;</b> {\"k\": [1, 2.5]} ---=== ... \u{2014}\u{2019}",
        );
        for t in &fast.added_probe {
            probe.push_str(t);
            probe.push_str(" x");
            probe.push_str(t);
        }
        probe.push_str(&" ".repeat(40));
        match (self.encode_slow(&probe), fast.encode(&probe)) {
            (Ok(a), b) => a == b,
            _ => false,
        }
    }

    /// sha256 (hex) of the tokenizer's canonical serialization, as loaded: what
    /// `tokenizers.Tokenizer.from_file(path).to_str()` (and transformers'
    /// `backend_tokenizer.to_str()`) hashes to, whatever the file's formatting.
    pub fn canonical_hash(&self) -> &str {
        &self.hash
    }

    /// Load from a `tokenizer.json` file (`allow_fast`: see `from_json_with`).
    pub fn from_file(path: &str, allow_fast: bool) -> Result<Self> {
        let json = std::fs::read_to_string(path)
            .map_err(|e| CoreError::Tokenizer(format!("cannot read {path}: {e}")))?;
        Self::from_json_with(&json, allow_fast)
    }

    /// Encode `text` without adding special tokens (the chat template already has them).
    pub fn encode(&self, text: &str) -> Result<Encoded> {
        match &self.fast {
            Some(f) => Ok(f.encode(text)),
            None => self.encode_slow(text),
        }
    }

    /// Encode with the `tokenizers` crate.
    pub fn encode_slow(&self, text: &str) -> Result<Encoded> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| CoreError::Tokenizer(format!("cannot encode text: {e}")))?;
        Ok(Encoded {
            ids: enc.get_ids().to_vec(),
            offsets: enc.get_offsets().to_vec(),
        })
    }

    /// Fix the special tokens `encode_ids_special` adds as transformers'
    /// `tokenizer(text)` does: those of tokenizer.json's post-processor (which
    /// transformers 5 keeps, dropping tokenizer_config.json's add_bos_token /
    /// add_eos_token when a tokenizer.json exists), read off a probe and checked
    /// on a second text.
    pub fn set_added_specials(&mut self) -> Result<()> {
        let with = |text: &str, specials: bool| -> Result<Vec<u32>> {
            self.inner
                .encode_fast(text, specials)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| CoreError::Tokenizer(format!("cannot encode text: {e}")))
        };
        let unknown = || {
            CoreError::Tokenizer(
                "cannot tell which special tokens the post-processor of tokenizer.json adds around a text".into(),
            )
        };
        let probe = "Hello world, 12";
        let (plain, full) = (with(probe, false)?, with(probe, true)?);
        let at = (0..=full.len().saturating_sub(plain.len()))
            .find(|&i| full.get(i..i + plain.len()) == Some(&plain[..]))
            .ok_or_else(unknown)?;
        self.added = (full[..at].to_vec(), full[at + plain.len()..].to_vec());
        let check = "another text: a b c";
        if with(check, true)? != self.encode_ids_special(check)? {
            return Err(unknown());
        }
        Ok(())
    }

    /// Ids of `text` with the special tokens transformers' `tokenizer(text)`
    /// adds (`set_added_specials`; none until it is called).
    pub fn encode_ids_special(&self, text: &str) -> Result<Vec<u32>> {
        let ids = self.encode_ids(text)?;
        let (before, after) = &self.added;
        let mut out = Vec::with_capacity(before.len() + ids.len() + after.len());
        out.extend_from_slice(before);
        out.extend(ids);
        out.extend_from_slice(after);
        Ok(out)
    }

    /// Ids only (no offsets), for callers that do not mask.
    pub fn encode_ids(&self, text: &str) -> Result<Vec<u32>> {
        if let Some(f) = &self.fast {
            return Ok(f.encode(text).ids);
        }
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| CoreError::Tokenizer(format!("cannot encode text: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

fn hash_of(tok: &Tokenizer) -> Result<String> {
    use sha2::{Digest, Sha256};
    let canonical = serde_json::to_string(tok)
        .map_err(|e| CoreError::Tokenizer(format!("cannot serialize the tokenizer: {e}")))?;
    Ok(Sha256::digest(canonical.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

// ------------------------------------------------------------------ fast byte-level BPE
const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// GPT-2's byte-to-unicode table: the char each byte is written as in the vocabulary.
pub(crate) fn byte_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable = (b'!' as u32..=b'~' as u32).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b);
        out[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
    }
    out
}

/// Byte-level BPE on bytes and ids; see the module docs for when it is used.
pub struct FastBpe {
    /// added tokens matched on the raw text (normalized=false), then on the rest (normalized=true)
    added: Vec<(AhoCorasick, Vec<u32>)>,
    added_probe: Vec<String>,
    regex: SysRegex,
    vocab: FxHashMap<Vec<u8>, u32>,
    byte_ids: [u32; 256],
    merges: FxHashMap<(u32, u32), (u32, u32)>,
    ignore_merges: bool,
}

impl FastBpe {
    /// Build from a parsed tokenizer.json when it has the supported shape; None otherwise.
    pub fn from_json(v: &Json) -> Option<Self> {
        if !v["normalizer"].is_null() {
            return None;
        }
        let pattern = split_pattern(&v["pre_tokenizer"])?;
        if !post_processor_ok(&v["post_processor"]) {
            return None;
        }
        let m = &v["model"];
        let empty = |k: &str| m[k].is_null() || m[k].as_str() == Some("");
        if m["type"] != "BPE"
            || !m["dropout"].is_null()
            || m["byte_fallback"].as_bool().unwrap_or(false)
        {
            return None;
        }
        if !empty("continuing_subword_prefix") || !empty("end_of_word_suffix") {
            return None;
        }
        let chars = byte_chars();
        let mut inverse: FxHashMap<char, u8> = FxHashMap::default();
        for (b, c) in chars.iter().enumerate() {
            inverse.insert(*c, b as u8);
        }
        let to_bytes =
            |s: &str| -> Option<Vec<u8>> { s.chars().map(|c| inverse.get(&c).copied()).collect() };
        let mut vocab = FxHashMap::default();
        let mut by_str: FxHashMap<&str, u32> = FxHashMap::default();
        for (k, id) in m["vocab"].as_object()? {
            let id = id.as_u64()? as u32;
            by_str.insert(k.as_str(), id);
            if let Some(bytes) = to_bytes(k) {
                vocab.insert(bytes, id);
            }
        }
        let mut byte_ids = [0u32; 256];
        for (b, c) in chars.iter().enumerate() {
            byte_ids[b] = *by_str.get(c.to_string().as_str())?;
        }
        let mut merges = FxHashMap::default();
        for (rank, mv) in m["merges"].as_array()?.iter().enumerate() {
            let (a, b) = match mv {
                Json::String(s) => s.split_once(' ')?,
                Json::Array(p) if p.len() == 2 => (p[0].as_str()?, p[1].as_str()?),
                _ => return None,
            };
            let joined = format!("{a}{b}");
            let (ia, ib, inew) = (
                *by_str.get(a)?,
                *by_str.get(b)?,
                *by_str.get(joined.as_str())?,
            );
            merges.insert((ia, ib), (rank as u32, inew));
        }
        let mut raw: (Vec<String>, Vec<u32>) = (Vec::new(), Vec::new());
        let mut norm: (Vec<String>, Vec<u32>) = (Vec::new(), Vec::new());
        for t in v["added_tokens"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            let flag = |k: &str| t[k].as_bool().unwrap_or(false);
            if flag("lstrip") || flag("rstrip") || flag("single_word") {
                return None;
            }
            let content = t["content"].as_str()?.to_string();
            let id = t["id"].as_u64()? as u32;
            let side = if flag("normalized") {
                &mut norm
            } else {
                &mut raw
            };
            side.0.push(content);
            side.1.push(id);
        }
        let mut added = Vec::new();
        let mut added_probe = Vec::new();
        for (contents, ids) in [raw, norm] {
            if contents.is_empty() {
                continue;
            }
            let ac = AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(&contents)
                .ok()?;
            added_probe.extend(contents.iter().cloned());
            added.push((ac, ids));
        }
        Some(Self {
            added,
            added_probe,
            regex: SysRegex::new(&pattern).ok()?,
            vocab,
            byte_ids,
            merges,
            ignore_merges: m["ignore_merges"].as_bool().unwrap_or(false),
        })
    }

    /// Encode `text`: ids and byte offsets (widened to whole characters, as `tokenizers` reports them).
    pub fn encode(&self, text: &str) -> Encoded {
        let mut out = Encoded {
            ids: Vec::with_capacity(text.len() / 3),
            offsets: Vec::with_capacity(text.len() / 3),
        };
        self.split_added(text, 0, 0, &mut out);
        for o in out.offsets.iter_mut() {
            while o.0 > 0 && !text.is_char_boundary(o.0) {
                o.0 -= 1;
            }
            while o.1 < text.len() && !text.is_char_boundary(o.1) {
                o.1 += 1;
            }
        }
        out
    }

    /// Split `text` (at byte `base` of the whole) by the added tokens of pass `pass`, then go on.
    fn split_added(&self, text: &str, base: usize, pass: usize, out: &mut Encoded) {
        let Some((ac, ids)) = self.added.get(pass) else {
            self.pre_tokenize(text, base, out);
            return;
        };
        let mut prev = 0;
        for m in ac.find_iter(text) {
            if m.start() > prev {
                self.split_added(&text[prev..m.start()], base + prev, pass + 1, out);
            }
            out.ids.push(ids[m.pattern().as_usize()]);
            out.offsets.push((base + m.start(), base + m.end()));
            prev = m.end();
        }
        if prev < text.len() {
            self.split_added(&text[prev..], base + prev, pass + 1, out);
        }
    }

    fn pre_tokenize(&self, text: &str, base: usize, out: &mut Encoded) {
        let mut prev = 0;
        for (s, e) in self.regex.find_iter(text) {
            if s > prev {
                self.bpe(&text.as_bytes()[prev..s], base + prev, out);
            }
            if e > s {
                self.bpe(&text.as_bytes()[s..e], base + s, out);
            }
            prev = e;
        }
        if prev < text.len() {
            self.bpe(&text.as_bytes()[prev..], base + prev, out);
        }
    }

    /// BPE of one piece, as `tokenizers`' `Word::merge_all`: repeatedly merge the
    /// pair with the lowest rank (leftmost on ties).
    fn bpe(&self, piece: &[u8], base: usize, out: &mut Encoded) {
        if piece.len() == 1 {
            out.ids.push(self.byte_ids[piece[0] as usize]);
            out.offsets.push((base, base + 1));
            return;
        }
        if self.ignore_merges {
            if let Some(&id) = self.vocab.get(piece) {
                out.ids.push(id);
                out.offsets.push((base, base + piece.len()));
                return;
            }
        }
        // symbols as a linked list over byte positions
        let n = piece.len();
        let mut id: Vec<u32> = piece.iter().map(|&b| self.byte_ids[b as usize]).collect();
        let mut len: Vec<usize> = vec![1; n];
        let mut prev: Vec<isize> = (0..n as isize).map(|i| i - 1).collect();
        let mut next: Vec<isize> = (1..=n as isize)
            .map(|i| if i as usize == n { -1 } else { i })
            .collect();
        // min-heap on (rank, position)
        let mut heap: BinaryHeap<Reverse<(u32, usize, u32)>> = BinaryHeap::with_capacity(n);
        for i in 0..n - 1 {
            if let Some(&(rank, new)) = self.merges.get(&(id[i], id[i + 1])) {
                heap.push(Reverse((rank, i, new)));
            }
        }
        while let Some(Reverse((_, pos, new))) = heap.pop() {
            if len[pos] == 0 || next[pos] == -1 {
                continue;
            }
            let right = next[pos] as usize;
            match self.merges.get(&(id[pos], id[right])) {
                Some(&(_, expect)) if expect == new => {}
                _ => continue, // a stale entry
            }
            id[pos] = new;
            len[pos] += len[right];
            next[pos] = next[right];
            len[right] = 0;
            if next[right] >= 0 {
                prev[next[right] as usize] = pos as isize;
            }
            if prev[pos] >= 0 {
                let p = prev[pos] as usize;
                if let Some(&(rank, nid)) = self.merges.get(&(id[p], id[pos])) {
                    heap.push(Reverse((rank, p, nid)));
                }
            }
            if next[pos] >= 0 {
                let q = next[pos] as usize;
                if let Some(&(rank, nid)) = self.merges.get(&(id[pos], id[q])) {
                    heap.push(Reverse((rank, pos, nid)));
                }
            }
        }
        let mut i = 0isize;
        while i >= 0 {
            let u = i as usize;
            out.ids.push(id[u]);
            out.offsets.push((base + u, base + u + len[u]));
            i = next[u];
        }
    }
}

/// The split regex of a supported pre-tokenizer, or None.
fn split_pattern(pt: &Json) -> Option<String> {
    let byte_level = |p: &Json, regex: bool| {
        p["type"] == "ByteLevel"
            && !p["add_prefix_space"].as_bool().unwrap_or(true)
            && p["use_regex"].as_bool().unwrap_or(true) == regex
    };
    if byte_level(pt, true) {
        return Some(GPT2_PATTERN.to_string());
    }
    if pt["type"] == "Sequence" {
        let items = pt["pretokenizers"].as_array()?;
        if items.len() == 2
            && items[0]["type"] == "Split"
            && items[0]["behavior"] == "Isolated"
            && !items[0]["invert"].as_bool().unwrap_or(false)
            && byte_level(&items[1], false)
        {
            return items[0]["pattern"]["Regex"].as_str().map(str::to_string);
        }
    }
    None
}

fn post_processor_ok(pp: &Json) -> bool {
    match pp["type"].as_str() {
        None => pp.is_null(),
        Some("TemplateProcessing") => true, // adds nothing without special tokens
        Some("ByteLevel") => !pp["trim_offsets"].as_bool().unwrap_or(true),
        Some("Sequence") => pp["processors"]
            .as_array()
            .is_some_and(|ps| ps.iter().all(post_processor_ok)),
        _ => false,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tiny byte-level tokenizer.json: no merges, so every byte is one token.
    pub(crate) fn byte_level_json(specials: &[&str]) -> String {
        let alphabet: Vec<char> = byte_alphabet();
        let mut vocab = serde_json::Map::new();
        let mut added = Vec::new();
        for (i, s) in specials.iter().enumerate() {
            vocab.insert((*s).to_string(), serde_json::json!(i));
            added.push(
                serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true}),
            );
        }
        for (j, c) in alphabet.iter().enumerate() {
            vocab.insert(c.to_string(), serde_json::json!(specials.len() + j));
        }
        serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": []}
        })
        .to_string()
    }

    /// GPT-2's byte-to-unicode table, in byte order.
    fn byte_alphabet() -> Vec<char> {
        let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
            .chain(0xA1..=0xAC)
            .chain(0xAE..=0xFF)
            .collect();
        let mut cs = bs.clone();
        let mut n = 0;
        for b in 0..256u32 {
            if !bs.contains(&b) {
                bs.push(b);
                cs.push(256 + n);
                n += 1;
            }
        }
        let mut pairs: Vec<(u32, u32)> = bs.into_iter().zip(cs).collect();
        pairs.sort();
        pairs
            .into_iter()
            .map(|(_, c)| char::from_u32(c).unwrap())
            .collect()
    }

    #[test]
    fn byte_offsets_cover_the_text() {
        let tok = Tok::from_json(&byte_level_json(&["<|end|>"])).unwrap();
        let text = "hé<|end|>x";
        let enc = tok.encode(text).unwrap();
        // h, é (2 bytes -> 2 tokens), <|end|>, x
        assert_eq!(enc.ids.len(), 5);
        assert_eq!(enc.ids[3], 0);
        assert_eq!(enc.offsets[3], (3, 10));
        assert_eq!(enc.offsets[0], (0, 1));
        assert_eq!(*enc.offsets.last().unwrap(), (10, 11));
        assert_eq!(tok.encode_ids(text).unwrap(), enc.ids);
    }

    /// A byte-level tokenizer with merges (and the `tokenizers` crate as the oracle).
    fn with_merges(ignore_merges: bool, pretok: serde_json::Value) -> String {
        let mut v: serde_json::Value =
            serde_json::from_str(&byte_level_json(&["<|end|>", "<s>"])).unwrap();
        let merges = [
            "h e",
            "l l",
            "he ll",
            "hell o",
            "Ġ t",
            "Ġt h",
            "Ġth e",
            "1 2",
            "12 3",
            "Ġ Ġ",
            "ĠĠ ĠĠ",
            "Ċ Ċ",
            "a a",
            "aa a",
            "Ã ©",
            "ð Ł",
            "e l",
            "el l",
        ];
        let vocab = v["model"]["vocab"].as_object_mut().unwrap();
        for m in merges {
            let joined = m.replace(' ', "");
            if !vocab.contains_key(&joined) {
                let n = vocab.len();
                vocab.insert(joined, serde_json::json!(n));
            }
        }
        v["model"]["merges"] = serde_json::json!(merges);
        v["model"]["ignore_merges"] = serde_json::json!(ignore_merges);
        v["pre_tokenizer"] = pretok;
        v.to_string()
    }

    #[test]
    fn fast_path_matches_the_tokenizers_crate() {
        let gpt2 = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        let split = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"},
             "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]});
        let pieces = [
            "hello", " the", "hell", "aaaa", "aaaaaaa", "123456", " ", "  ", "     ", "\n\n\n",
            "é", "café", "🎉", "x", "<|end|>", "<s>", "<|end", "'s", "'LL", "\t", "日本", ",",
            "...", "ell", "\r\n", "\u{a0}",
        ];
        for (ignore, pt) in [
            (false, gpt2.clone()),
            (true, gpt2),
            (false, split.clone()),
            (true, split),
        ] {
            let json = with_merges(ignore, pt);
            let tok = Tok::from_json(&json).unwrap();
            assert!(tok.is_fast(), "the fast path should apply");
            let fast = tok.fast.as_ref().unwrap();
            let mut x: u64 = 7;
            for _ in 0..300 {
                let mut text = String::new();
                for _ in 0..12 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    text.push_str(pieces[(x >> 33) as usize % pieces.len()]);
                }
                assert_eq!(
                    fast.encode(&text),
                    tok.encode_slow(&text).unwrap(),
                    "{text:?}"
                );
            }
        }
    }

    #[test]
    fn unsupported_shapes_use_the_crate() {
        let mut v: serde_json::Value =
            serde_json::from_str(&byte_level_json(&["<|end|>"])).unwrap();
        v["normalizer"] = serde_json::json!({"type": "NFC"});
        assert!(!Tok::from_json(&v.to_string()).unwrap().is_fast());
        let mut v: serde_json::Value =
            serde_json::from_str(&byte_level_json(&["<|end|>"])).unwrap();
        v["added_tokens"][0]["lstrip"] = serde_json::json!(true);
        assert!(!Tok::from_json(&v.to_string()).unwrap().is_fast());
        assert!(!Tok::from_json_with(&byte_level_json(&[]), false)
            .unwrap()
            .is_fast());
    }

    #[test]
    fn bad_json_is_a_tokenizer_error() {
        assert!(matches!(Tok::from_json("{}"), Err(CoreError::Tokenizer(_))));
    }
}
