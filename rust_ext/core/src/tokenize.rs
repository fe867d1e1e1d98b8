//! Tokenization with byte offsets, through the `tokenizers` crate: the same
//! `tokenizer.json` that transformers loads, so ids are identical to
//! `tokenizer(text, add_special_tokens=False)`.
use crate::error::{CoreError, Result};
use tokenizers::Tokenizer;

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
}

impl Tok {
    /// Load from the JSON text of a `tokenizer.json`.
    pub fn from_json(json: &str) -> Result<Self> {
        let mut inner: Tokenizer = json
            .parse()
            .map_err(|e| CoreError::Tokenizer(format!("cannot load tokenizer.json: {e}")))?;
        let hash = hash_of(&inner)?;
        inner
            .with_truncation(None)
            .map_err(|e| CoreError::Tokenizer(format!("cannot disable truncation: {e}")))?;
        inner.with_padding(None);
        Ok(Self { inner, hash })
    }

    /// sha256 (hex) of the tokenizer's canonical serialization, as loaded: what
    /// `tokenizers.Tokenizer.from_file(path).to_str()` (and transformers'
    /// `backend_tokenizer.to_str()`) hashes to, whatever the file's formatting.
    pub fn canonical_hash(&self) -> &str {
        &self.hash
    }

    /// Load from a `tokenizer.json` file.
    pub fn from_file(path: &str) -> Result<Self> {
        let json = std::fs::read_to_string(path)
            .map_err(|e| CoreError::Tokenizer(format!("cannot read {path}: {e}")))?;
        Self::from_json(&json)
    }

    /// Encode `text` without adding special tokens (the chat template already has them).
    pub fn encode(&self, text: &str) -> Result<Encoded> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| CoreError::Tokenizer(format!("cannot encode text: {e}")))?;
        Ok(Encoded { ids: enc.get_ids().to_vec(), offsets: enc.get_offsets().to_vec() })
    }

    /// Ids only (no offsets), for callers that do not mask.
    pub fn encode_ids(&self, text: &str) -> Result<Vec<u32>> {
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
    Ok(Sha256::digest(canonical.as_bytes()).iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny byte-level tokenizer.json: no merges, so every byte is one token.
    pub(crate) fn byte_level_json(specials: &[&str]) -> String {
        let alphabet: Vec<char> = byte_alphabet();
        let mut vocab = serde_json::Map::new();
        let mut added = Vec::new();
        for (i, s) in specials.iter().enumerate() {
            vocab.insert((*s).to_string(), serde_json::json!(i));
            added.push(serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true}));
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
        let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
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
        pairs.into_iter().map(|(_, c)| char::from_u32(c).unwrap()).collect()
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

    #[test]
    fn bad_json_is_a_tokenizer_error() {
        assert!(matches!(Tok::from_json("{}"), Err(CoreError::Tokenizer(_))));
    }
}
