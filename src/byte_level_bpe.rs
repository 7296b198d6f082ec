//! A faster encoder for kiln's byte-level BPE (`data.tokenizer = "bpe"`), for preparing
//! corpora: the same pieces and merges as Hugging Face `tokenizers` gives, without the
//! per-piece bookkeeping its pipeline keeps for offsets and alignments (which costs about two
//! thirds of its time there), and with a per-thread cache of the pieces' ids, as tiktoken and
//! llm.c's tokenizers do. Text is split by GPT-2's pattern, each piece's bytes are mapped to
//! GPT-2's byte alphabet, and the piece goes to the tokenizer's own BPE model (`tokenizers`
//! does the merging). Tests hold it equal to `Tokenizer::encode` on varied text.
//!
//! It serves only the exact shape kiln writes (no normalizer, GPT-2's byte-level
//! pre-tokenizer without a prefix space, a plain BPE model); a text holding an added token's
//! content (`<|endoftext|>`) goes through the full pipeline, which extracts it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Result, anyhow};
use regex::Regex;
use tokenizers::{Model, Tokenizer};

/// GPT-2's split pattern without its `\s+(?!\S)` alternative, which the `regex` crate has no
/// look-ahead for; [`pieces`] applies it by hand.
static SPLIT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+").expect("the pattern is valid"));

/// Pieces cached per thread before the cache starts over (bounded memory on any corpus).
const CACHE_PIECES: usize = 1 << 20;

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The ids of pieces seen, for the encoder whose id is first.
    static CACHE: RefCell<(u64, HashMap<String, Vec<u32>>)> = RefCell::new((u64::MAX, HashMap::new()));
}

#[derive(Clone)]
pub struct ByteLevelBpe {
    id: u64,
    /// Texts holding any of these take the full pipeline.
    added: Vec<String>,
    byte_chars: [char; 256],
}

impl ByteLevelBpe {
    pub fn new(tokenizer: &Tokenizer) -> Self {
        let added = tokenizer.get_added_tokens_decoder().values().map(|t| t.content.clone()).collect();
        Self { id: NEXT_ID.fetch_add(1, Ordering::Relaxed), added, byte_chars: byte_chars() }
    }

    /// The ids `tokenizer.encode(text, false)` gives; `tokenizer` is the one this was made for.
    pub fn encode(&self, tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
        if self.added.iter().any(|a| text.contains(a.as_str())) {
            let encoding = tokenizer.encode_fast(text, false).map_err(|e| anyhow!("tokenization failed: {e}"))?;
            return Ok(encoding.get_ids().to_vec());
        }
        let model = tokenizer.get_model();
        CACHE.with_borrow_mut(|(owner, cache)| {
            if *owner != self.id {
                cache.clear();
                *owner = self.id;
            }
            let mut ids = Vec::with_capacity(text.len() / 3);
            let mut mapped = String::new();
            for piece in pieces(text) {
                if let Some(known) = cache.get(piece) {
                    ids.extend_from_slice(known);
                    continue;
                }
                mapped.clear();
                mapped.extend(piece.bytes().map(|b| self.byte_chars[b as usize]));
                let tokens = model.tokenize(&mapped).map_err(|e| anyhow!("tokenization failed: {e}"))?;
                let piece_ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
                ids.extend_from_slice(&piece_ids);
                if cache.len() >= CACHE_PIECES {
                    cache.clear();
                }
                cache.insert(piece.to_owned(), piece_ids);
            }
            Ok(ids)
        })
    }
}

/// The pieces GPT-2's pattern cuts `text` into. The pattern's `\s+(?!\S)` takes a run of
/// white space up to its last character when a non-space follows (which then starts the next
/// piece, e.g. as the space of ` word`), and the whole run at the end of the text; only a
/// single white-space character before a non-space falls through to its `\s+`.
pub fn pieces(text: &str) -> impl Iterator<Item = &str> {
    let mut pos = 0;
    std::iter::from_fn(move || {
        let m = SPLIT.find_at(text, pos)?;
        let piece = m.as_str();
        let mut end = m.end();
        if end < text.len() && piece.chars().all(char::is_whitespace) {
            let last = piece.chars().next_back().expect("a match is never empty");
            if piece.len() > last.len_utf8() {
                end -= last.len_utf8();
            }
        }
        let piece = &text[m.start()..end];
        pos = end;
        Some(piece)
    })
}

/// GPT-2's map from bytes to printable characters (`bytes_to_unicode` in its encoder.py):
/// printable Latin-1 bytes stand for themselves, the others for 256 onwards in order.
fn byte_chars() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut chars = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        chars[b as usize] = if printable(b) {
            b as char
        } else {
            next += 1;
            char::from_u32(next - 1).expect("256..512 are characters")
        };
    }
    chars
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_alphabet_is_the_one_tokenizers_uses() {
        let ours: std::collections::HashSet<char> = byte_chars().into_iter().collect();
        let theirs: std::collections::HashSet<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet().into_iter().collect();
        assert_eq!(ours, theirs);
        assert_eq!(byte_chars()[b' ' as usize], 'Ġ');
        assert_eq!(byte_chars()[b'\n' as usize], 'Ċ');
    }

    #[test]
    fn white_space_runs_split_as_gpt2s_look_ahead_does() {
        fn cut(t: &str) -> Vec<&str> {
            pieces(t).collect()
        }
        assert_eq!(cut("a  b"), ["a", " ", " b"]);
        assert_eq!(cut("a \n\n b"), ["a", " \n\n", " b"]);
        assert_eq!(cut("a\nb"), ["a", "\n", "b"]);
        assert_eq!(cut("a   "), ["a", "   "]);
        assert_eq!(cut("it's 12 cats!!"), ["it", "'s", " 12", " cats", "!!"]);
    }
}
