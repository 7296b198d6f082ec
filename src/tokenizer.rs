//! Tokenizers built with Hugging Face's `tokenizers` crate and saved as a standard
//! `tokenizer.json`, so that Python's `AutoTokenizer` loads exactly what kiln trained with.
//!
//! - `char`: one token per character of the corpus: a BPE model with an empty merge list (each
//!   character is its own token) and a `Fuse` decoder, which joins tokens without spaces.
//! - `bpe`: GPT-2-style byte-level BPE trained on the corpus to `vocab_size` tokens.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Model, Tokenizer};

use crate::config::TokenizerKind;

/// The end-of-text token added to byte-level BPE vocabularies (as GPT-2 does).
pub const BPE_EOS: &str = "<|endoftext|>";

/// Text is encoded in pieces of about this many bytes, in parallel.
const ENCODE_CHUNK_BYTES: usize = 1 << 16;

#[derive(Clone)]
pub struct KilnTokenizer {
    inner: Tokenizer,
    kind: TokenizerKind,
}

impl KilnTokenizer {
    /// Builds a tokenizer of the given kind from the training corpus.
    pub fn train(kind: TokenizerKind, text: &str, vocab_size: usize) -> Result<Self> {
        let inner = match kind {
            TokenizerKind::Char => char_tokenizer(text)?,
            TokenizerKind::Bpe => bpe_tokenizer(text, vocab_size)?,
        };
        Ok(Self { inner, kind })
    }

    /// Loads a `tokenizer.json` written by kiln (or any Hugging Face fast tokenizer).
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| anyhow!("cannot load tokenizer {}: {e}", path.display()))?;
        let kind = match inner.get_pre_tokenizer() {
            Some(_) => TokenizerKind::Bpe,
            None => TokenizerKind::Char,
        };
        Ok(Self { inner, kind })
    }

    /// Parses a serialized `tokenizer.json`.
    pub fn from_json(json: &str) -> Result<Self> {
        let inner: Tokenizer = json
            .parse()
            .map_err(|e| anyhow!("cannot parse tokenizer.json: {e}"))?;
        let kind = match inner.get_pre_tokenizer() {
            Some(_) => TokenizerKind::Bpe,
            None => TokenizerKind::Char,
        };
        Ok(Self { inner, kind })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner
            .save(path, true)
            .map_err(|e| anyhow!("cannot write tokenizer {}: {e}", path.display()))
    }

    /// The serialized `tokenizer.json`.
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(true)
            .map_err(|e| anyhow!("cannot serialize tokenizer: {e}"))
    }

    pub fn kind(&self) -> TokenizerKind {
        self.kind
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The end-of-sequence token, if the vocabulary has one.
    pub fn eos_token(&self) -> Option<&'static str> {
        self.inner.token_to_id(BPE_EOS).map(|_| BPE_EOS)
    }

    /// Encodes text. A character-level tokenizer refuses characters it has never seen instead of
    /// silently dropping them.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        if self.kind == TokenizerKind::Char {
            let vocab = self.inner.get_model().get_vocab();
            let mut buf = [0u8; 4];
            if let Some(c) = text.chars().find(|c| !vocab.contains_key(&*c.encode_utf8(&mut buf))) {
                bail!(
                    "character {c:?} (U+{:04X}) is not in the character tokenizer's vocabulary",
                    c as u32
                );
            }
        }
        let chunks = split_at_word_starts(text, ENCODE_CHUNK_BYTES);
        let encodings = self
            .inner
            .encode_batch_fast(chunks, false)
            .map_err(|e| anyhow!("tokenization failed: {e}"))?;
        Ok(encodings.iter().flat_map(|e| e.get_ids().iter().copied()).collect())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow!("cannot decode token ids: {e}"))
    }
}

fn char_tokenizer(text: &str) -> Result<Tokenizer> {
    let chars: BTreeSet<char> = text.chars().collect();
    if chars.is_empty() {
        bail!("cannot build a character tokenizer from an empty corpus");
    }
    let vocab = chars
        .iter()
        .enumerate()
        .map(|(id, c)| (c.to_string(), id as u32))
        .collect::<Vocab>();
    let model = BPE::builder()
        .vocab_and_merges(vocab, Vec::new())
        .build()
        .map_err(|e| anyhow!("cannot build character vocabulary: {e}"))?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_decoder(Some(Fuse::new()));
    Ok(tokenizer)
}

fn bpe_tokenizer(text: &str, vocab_size: usize) -> Result<Tokenizer> {
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(vec![AddedToken::from(BPE_EOS, true)])
        .build()
        .into();
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let chunks = split_at_word_starts(text, ENCODE_CHUNK_BYTES);
    tokenizer
        .train(&mut trainer, chunks.into_iter())
        .map_err(|e| anyhow!("BPE training failed: {e}"))
        .context("training the byte-level BPE tokenizer")?;
    Ok(tokenizer)
}

/// Splits text into pieces of roughly `target` bytes, cutting only between a newline and a
/// following non-whitespace character. Such a cut is a boundary of every pre-tokenizer kiln
/// uses, so encoding the pieces separately gives exactly the tokens of the whole text.
fn split_at_word_starts(text: &str, target: usize) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut pieces = Vec::with_capacity(text.len() / target + 1);
    let mut start = 0;
    let mut i = target;
    while i < bytes.len() {
        let starts_word = bytes[i - 1] == b'\n'
            && text.is_char_boundary(i)
            && text[i..].chars().next().is_some_and(|c| !c.is_whitespace());
        if starts_word {
            pieces.push(&text[start..i]);
            start = i;
            i += target;
        } else {
            i += 1;
        }
    }
    if start < text.len() {
        pieces.push(&text[start..]);
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_pieces_cover_the_text_in_order() {
        let text = "a b\nc\n\n d\ne\nf g\n".repeat(50);
        let pieces = split_at_word_starts(&text, 7);
        assert!(pieces.len() > 10);
        assert_eq!(pieces.concat(), text);
        for p in &pieces[1..] {
            assert!(!p.starts_with(char::is_whitespace));
        }
    }
}
