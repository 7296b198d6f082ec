//! Tokenizers as Hugging Face's `tokenizers` crate runs them, saved as a standard
//! `tokenizer.json`, so that Python's `AutoTokenizer` loads exactly what kiln trained with.
//!
//! kiln trains two kinds itself:
//! - `char`: one token per character of the corpus: a BPE model with an empty merge list (each
//!   character is its own token), no normalizer or pre-tokenizer, and a `Fuse` decoder.
//! - `bpe`: GPT-2-style byte-level BPE trained on the corpus to `vocab_size` tokens.
//!
//! Any other `tokenizer.json` (Llama-2's byte-fallback BPE, Llama-3's and GPT-2's byte-level
//! BPE, T5's Unigram, ...) is used as it is: [`KilnTokenizer::encode`] gives what transformers'
//! `tokenizer(text)` gives (post-processor tokens such as `<s>` included) and
//! [`KilnTokenizer::decode`] what its `decode(ids, skip_special_tokens=True)` gives. The
//! special tokens a model directory declares besides `tokenizer.json` (`tokenizer_config.json`,
//! the ids in `config.json` and `generation_config.json`) travel with it as [`SpecialTokens`].

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Model, Tokenizer};

use crate::byte_level_bpe::ByteLevelBpe;
use crate::config::TokenizerKind;

/// The end-of-text token added to byte-level BPE vocabularies (as GPT-2 does).
pub const BPE_EOS: &str = "<|endoftext|>";

/// Text is encoded in pieces of about this many bytes, in parallel, where that is exact.
const ENCODE_CHUNK_BYTES: usize = 1 << 16;

/// What a model directory says about its tokenizer's special tokens outside `tokenizer.json`.
/// A checkpoint and a bundle carry it on, so a fine-tune keeps its base model's tokens.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SpecialTokens {
    /// `tokenizer_config.json` as the pretrained directory had it (special tokens, chat
    /// template, added tokens...); `None` for the tokenizers kiln trains.
    pub tokenizer_config: Option<Value>,
    pub bos_token_id: Option<u32>,
    /// Generation stops at any of these (Llama-3 instruct models list several).
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

#[derive(Clone)]
pub struct KilnTokenizer {
    inner: Tokenizer,
    /// `Some` for the two kinds kiln trains, recognised by the shape kiln writes.
    kind: Option<TokenizerKind>,
    /// Cutting the text between a newline and a non-space character gives the same tokens as
    /// encoding it whole (see [`chunking_is_exact`]).
    chunkable: bool,
    /// The faster corpus encoder for kiln's own byte-level BPE.
    fast: Option<ByteLevelBpe>,
    special: SpecialTokens,
}

impl KilnTokenizer {
    /// Builds a tokenizer of the given kind from the training corpus.
    pub fn train(kind: TokenizerKind, text: &str, vocab_size: usize) -> Result<Self> {
        let inner = match kind {
            TokenizerKind::Char => char_tokenizer(text)?,
            TokenizerKind::Bpe => bpe_tokenizer(text, vocab_size)?,
        };
        Self::wrap(inner, None)
    }

    /// Loads a `tokenizer.json` (kiln's own or any Hugging Face fast tokenizer).
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| anyhow!("cannot load tokenizer {}: {e}", path.display()))?;
        Self::wrap(inner, None).with_context(|| format!("tokenizer {}", path.display()))
    }

    /// Loads a model directory's `tokenizer.json` with the special tokens its other files
    /// declare; `None` when it has no `tokenizer.json`.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Ok(None);
        }
        let tokenizer = Self::from_file(&path)?;
        let special = SpecialTokens::read(dir, &tokenizer)?;
        Ok(Some(tokenizer.with_special_tokens(special)))
    }

    /// Parses a serialized `tokenizer.json` with the special tokens saved beside it (a
    /// checkpoint's sidecar keeps both).
    pub fn from_json(json: &str, special: Option<SpecialTokens>) -> Result<Self> {
        let inner: Tokenizer = json
            .parse()
            .map_err(|e| anyhow!("cannot parse tokenizer.json: {e}"))?;
        Self::wrap(inner, special)
    }

    fn wrap(inner: Tokenizer, special: Option<SpecialTokens>) -> Result<Self> {
        let json: Value = serde_json::from_str(
            &inner.to_string(false).map_err(|e| anyhow!("cannot serialize tokenizer: {e}"))?,
        )?;
        let kind = own_kind(&json);
        let fast = (kind == Some(TokenizerKind::Bpe) && json["model"]["dropout"].is_null() && json["model"]["ignore_merges"] != true)
            .then(|| ByteLevelBpe::new(&inner));
        let mut tokenizer = Self {
            chunkable: chunking_is_exact(&json, kind),
            fast,
            inner,
            kind,
            special: SpecialTokens::default(),
        };
        tokenizer.special = match special {
            Some(s) => s,
            None => SpecialTokens::of_own(&tokenizer),
        };
        Ok(tokenizer)
    }

    /// The same tokenizer with other special tokens.
    pub fn with_special_tokens(mut self, special: SpecialTokens) -> Self {
        self.special = special;
        self
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
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

    /// The kind kiln trained, or `None` for a pretrained tokenizer.
    pub fn kind(&self) -> Option<TokenizerKind> {
        self.kind
    }

    /// A few words for the model card: `char`, `byte-level BPE`, or the model type.
    pub fn describe(&self) -> String {
        match self.kind {
            Some(TokenizerKind::Char) => "char".to_string(),
            Some(TokenizerKind::Bpe) => "byte-level BPE".to_string(),
            None => {
                let json = self.inner.to_string(false).ok().and_then(|s| serde_json::from_str::<Value>(&s).ok());
                json.and_then(|j| j["model"]["type"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| "pretrained".to_string())
            }
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The text as transformers' `tokenizer(text)` encodes it: special tokens the
    /// post-processor adds (a Llama `<s>`) included.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.check_chars(text)?;
        let encoding = self
            .inner
            .encode_fast(text, true)
            .map_err(|e| anyhow!("tokenization failed: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// A training corpus as one stream of tokens, without the special tokens a post-processor
    /// adds to each encoded text. kiln's byte-level BPE goes through its faster encoder
    /// (`byte_level_bpe.rs`, the same ids); others are encoded in parallel pieces where that
    /// gives the same tokens as one piece, else whole.
    pub fn encode_corpus(&self, text: &str) -> Result<Vec<u32>> {
        self.check_chars(text)?;
        let chunks = if self.chunkable {
            split_at_word_starts(text, ENCODE_CHUNK_BYTES)
        } else {
            vec![text]
        };
        if let Some(fast) = &self.fast {
            use rayon::prelude::*;
            let pieces: Vec<Vec<u32>> = chunks.par_iter().map(|c| fast.encode(&self.inner, c)).collect::<Result<_>>()?;
            return Ok(pieces.concat());
        }
        let encodings = self
            .inner
            .encode_batch_fast(chunks, false)
            .map_err(|e| anyhow!("tokenization failed: {e}"))?;
        Ok(encodings.iter().flat_map(|e| e.get_ids().iter().copied()).collect())
    }

    /// A character-level tokenizer refuses characters it has never seen instead of silently
    /// dropping them (a BPE model without an unknown token drops them).
    fn check_chars(&self, text: &str) -> Result<()> {
        if self.kind == Some(TokenizerKind::Char) {
            let vocab = self.inner.get_model().get_vocab();
            let mut buf = [0u8; 4];
            if let Some(c) = text.chars().find(|c| !vocab.contains_key(&*c.encode_utf8(&mut buf))) {
                bail!(
                    "character {c:?} (U+{:04X}) is not in the character tokenizer's vocabulary",
                    c as u32
                );
            }
        }
        Ok(())
    }

    /// Whether a text cut by [`is_exact_cut`] encodes, piece by piece, to the ids of the whole.
    pub fn encodes_pieces_exactly(&self) -> bool {
        self.chunkable
    }

    /// The text of `ids` as transformers' `decode(ids, skip_special_tokens=True)` gives it.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let text = self
            .inner
            .decode(ids, true)
            .map_err(|e| anyhow!("cannot decode token ids: {e}"))?;
        Ok(if self.cleans_up_spaces() { clean_up_tokenization(&text) } else { text })
    }

    /// transformers' `clean_up_tokenization_spaces`, which it skips for BPE models.
    fn cleans_up_spaces(&self) -> bool {
        let asked = self.special.tokenizer_config.as_ref().and_then(|c| c["clean_up_tokenization_spaces"].as_bool());
        asked == Some(true) && !matches!(self.inner.get_model(), tokenizers::ModelWrapper::BPE(_))
    }
}

impl SpecialTokens {
    /// The special tokens of a tokenizer kiln trained: its `<|endoftext|>` ends a text.
    fn of_own(tokenizer: &KilnTokenizer) -> Self {
        Self {
            eos_token_ids: tokenizer.token_to_id(BPE_EOS).into_iter().collect(),
            ..Self::default()
        }
    }

    /// Reads what `dir` declares, as transformers resolves it: ids from
    /// `generation_config.json`, else `config.json`, else the tokens `tokenizer_config.json`
    /// names; a chat template kept in `chat_template.jinja` is folded into the config.
    fn read(dir: &Path, tokenizer: &KilnTokenizer) -> Result<Self> {
        let json = |name: &str| -> Result<Option<Value>> {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(text) => serde_json::from_str(&text)
                    .map(Some)
                    .with_context(|| format!("{} is not JSON", path.display())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
            }
        };
        let mut tokenizer_config = json("tokenizer_config.json")?;
        let template = dir.join("chat_template.jinja");
        if template.exists() {
            let text = std::fs::read_to_string(&template)
                .with_context(|| format!("cannot read {}", template.display()))?;
            let config = tokenizer_config.get_or_insert_with(|| Value::Object(Default::default()));
            if let Some(map) = config.as_object_mut() {
                map.entry("chat_template").or_insert(Value::String(text));
            }
        }
        let generation = json("generation_config.json")?.unwrap_or_default();
        let model = json("config.json")?.unwrap_or_default();
        let by_token = |key: &str| -> Option<u32> {
            let config = tokenizer_config.as_ref()?;
            // A token is written as its text or as an AddedToken object.
            let token = match &config[key] {
                Value::String(s) => s.as_str(),
                Value::Object(o) => o.get("content")?.as_str()?,
                _ => return None,
            };
            tokenizer.token_to_id(token)
        };
        let ids = |key: &str| -> Vec<u32> {
            [&generation[key], &model[key]]
                .into_iter()
                .map(id_list)
                .find(|ids| !ids.is_empty())
                .unwrap_or_default()
        };
        let first = |key: &str, token_key: &str| ids(key).first().copied().or_else(|| by_token(token_key));
        let mut eos_token_ids = ids("eos_token_id");
        if eos_token_ids.is_empty() {
            eos_token_ids = by_token("eos_token").into_iter().collect();
        }
        Ok(Self {
            bos_token_id: first("bos_token_id", "bos_token"),
            eos_token_ids,
            pad_token_id: first("pad_token_id", "pad_token"),
            tokenizer_config,
        })
    }

    /// `eos_token_id` as `config.json` writes it: one id, or a list when there are several.
    pub fn eos_json(&self) -> Value {
        match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => Value::from(*one),
            many => Value::from(many.to_vec()),
        }
    }
}

/// An id or a list of ids, as config files write them; anything else is none.
fn id_list(v: &Value) -> Vec<u32> {
    match v {
        Value::Number(n) => n.as_u64().map(|i| i as u32).into_iter().collect(),
        Value::Array(a) => a.iter().filter_map(|i| i.as_u64().map(|i| i as u32)).collect(),
        _ => Vec::new(),
    }
}

/// Which of the tokenizers kiln trains `json` (a serialized `tokenizer.json`) is, if either:
/// the exact shape `char_tokenizer` or `bpe_tokenizer` writes.
fn own_kind(json: &Value) -> Option<TokenizerKind> {
    let model = &json["model"];
    let plain = json["normalizer"].is_null()
        && json["post_processor"].is_null()
        && model["type"] == "BPE"
        && model["unk_token"].is_null()
        && model["byte_fallback"] != true
        && model["continuing_subword_prefix"].is_null()
        && model["end_of_word_suffix"].is_null();
    if !plain {
        return None;
    }
    let no_merges = model["merges"].as_array().is_some_and(Vec::is_empty);
    if json["pre_tokenizer"].is_null() && no_merges && json["decoder"]["type"] == "Fuse" {
        return Some(TokenizerKind::Char);
    }
    let byte_level = |v: &Value| v["type"] == "ByteLevel" && v["add_prefix_space"] == false && v["use_regex"] == true;
    if byte_level(&json["pre_tokenizer"]) && json["decoder"]["type"] == "ByteLevel" {
        return Some(TokenizerKind::Bpe);
    }
    None
}

/// Whether encoding pieces cut by [`split_at_word_starts`] gives the tokens of the whole text.
/// A cut falls after a newline standing alone between non-space characters ([`is_exact_cut`]),
/// which is a boundary of kiln's char tokenizer (every character is a token) and of GPT-2's
/// byte-level split pattern, with nothing before them that looks across it: no normalizer, no
/// prefix space, no added tokens spanning a newline.
/// Anything else (a SentencePiece `▁` prepended to each piece, a custom split pattern) is
/// encoded whole.
fn chunking_is_exact(json: &Value, kind: Option<TokenizerKind>) -> bool {
    if kind.is_none() {
        return false;
    }
    let added = json["added_tokens"].as_array().map_or(&[][..], Vec::as_slice);
    added.iter().all(|t| t["content"].as_str().is_some_and(|c| !c.contains('\n')))
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

/// transformers' `clean_up_tokenization`: no space before punctuation and English clitics.
fn clean_up_tokenization(text: &str) -> String {
    let mut text = text.to_string();
    for (from, to) in [
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ] {
        text = text.replace(from, to);
    }
    text
}

/// Splits text into pieces of roughly `target` bytes, cutting only where [`is_exact_cut`]
/// says (see [`chunking_is_exact`] for when that is exact).
fn split_at_word_starts(text: &str, target: usize) -> Vec<&str> {
    let mut pieces = Vec::with_capacity(text.len() / target + 1);
    let mut start = 0;
    let mut i = target;
    while i < text.len() {
        if is_exact_cut(text, i) {
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

/// Whether `text` may be cut before byte `i`: after a newline that stands alone between two
/// non-space characters. GPT-2's pattern makes that newline a piece of its own in the whole
/// text and at the end of the first part alike, and starts the next piece afresh after it; a
/// newline after other white space is not such a boundary (`"a  \nb"` is `a`, `  `, `\n`,
/// `b`, but `"a  \n"` alone ends in the one piece `  \n`).
pub fn is_exact_cut(text: &str, i: usize) -> bool {
    let bytes = text.as_bytes();
    i >= 2
        && i < bytes.len()
        && bytes[i - 1] == b'\n'
        && text.is_char_boundary(i)
        && text[i..].chars().next().is_some_and(|c| !c.is_whitespace())
        && text[..i - 1].chars().next_back().is_some_and(|c| !c.is_whitespace())
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

    #[test]
    fn cuts_fall_only_after_a_newline_alone_between_words() {
        assert!(is_exact_cut("a\nb", 2));
        assert!(!is_exact_cut("a \nb", 3));
        assert!(!is_exact_cut("a\r\nb", 3));
        assert!(!is_exact_cut("a\n b", 2));
        assert!(!is_exact_cut("\nb", 1));
        assert!(is_exact_cut("é\n日", 3));
    }
}
