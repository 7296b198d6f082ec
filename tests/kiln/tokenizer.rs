use kiln::config::TokenizerKind;
use kiln::tokenizer::{BPE_EOS, KilnTokenizer};

fn corpus() -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::read_to_string(super::common::small_corpus(dir.path(), 200_000)).unwrap()
}

#[test]
fn char_tokenizer_round_trips_and_has_one_token_per_character() {
    let text = corpus();
    let tok = KilnTokenizer::train(TokenizerKind::Char, &text, 0).unwrap();
    let distinct: std::collections::BTreeSet<char> = text.chars().collect();
    assert_eq!(tok.vocab_size(), distinct.len());
    let sample = &text[1000..5000];
    let ids = tok.encode(sample).unwrap();
    assert_eq!(ids.len(), sample.chars().count());
    assert_eq!(tok.decode(&ids).unwrap(), sample);
    // The whole corpus, encoded in parallel pieces, decodes back exactly.
    let all = tok.encode(&text).unwrap();
    assert_eq!(all.len(), text.chars().count());
    assert_eq!(tok.decode(&all).unwrap(), text);
}

#[test]
fn char_tokenizer_refuses_unseen_characters() {
    let tok = KilnTokenizer::train(TokenizerKind::Char, "abc abc\n", 0).unwrap();
    let err = tok.encode("abz").unwrap_err().to_string();
    assert!(err.contains("'z'"), "{err}");
}

#[test]
fn bpe_tokenizer_round_trips_any_text_and_compresses() {
    let text = corpus();
    let tok = KilnTokenizer::train(TokenizerKind::Bpe, &text, 400).unwrap();
    assert_eq!(tok.vocab_size(), 400);
    assert!(tok.token_to_id(BPE_EOS).is_some());
    let sample = &text[2000..8000];
    let ids = tok.encode(sample).unwrap();
    // 144 merges on a small corpus: about 1.7 bytes per token.
    assert!(ids.len() * 3 < sample.len() * 2, "{} tokens for {} bytes", ids.len(), sample.len());
    assert_eq!(tok.decode(&ids).unwrap(), sample);
    // Byte-level: text the corpus never contained still round-trips.
    let foreign = "naïve café — 東京 🚀\n\ttabs  and  spaces";
    assert_eq!(tok.decode(&tok.encode(foreign).unwrap()).unwrap(), foreign);
    // Piecewise parallel encoding equals encoding as one piece.
    let whole = tok.encode(&text).unwrap();
    assert_eq!(tok.decode(&whole).unwrap(), text);
}

#[test]
fn saved_tokenizers_reload_identically() {
    let text = corpus();
    let dir = tempfile::tempdir().unwrap();
    for kind in [TokenizerKind::Char, TokenizerKind::Bpe] {
        let tok = KilnTokenizer::train(kind, &text, 300).unwrap();
        let path = dir.path().join("tokenizer.json");
        tok.save(&path).unwrap();
        let again = KilnTokenizer::from_file(&path).unwrap();
        assert_eq!(again.kind(), Some(kind));
        assert_eq!(again.vocab_size(), tok.vocab_size());
        let sample = &text[..3000];
        assert_eq!(again.encode(sample).unwrap(), tok.encode(sample).unwrap());
        // The file is a standard tokenizer.json.
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(json["model"]["type"], "BPE");
    }
}

/// Characters where GPT-2's split pattern decides something: every kind of white space
/// (Unicode's and the ASCII controls that are not), letters, marks, numbers of each category,
/// apostrophes, punctuation, symbols, scripts without spaces and emoji.
const PALETTE: &[char] = &[
    'a', 'Z', 'é', 'ß', 'ǅ', 'ʰ', 'א', 'ب', 'ह', '\u{093F}', '\u{0301}', '日', '本', '한', 'ก', '0', '7', '²', '½', 'Ⅻ', '٣', '߀',
    ' ', ' ', ' ', '\t', '\n', '\r', '\u{0B}', '\u{0C}', '\u{1C}', '\u{1F}', '\u{85}', '\u{A0}', '\u{1680}', '\u{2003}', '\u{200A}',
    '\u{200B}', '\u{2028}', '\u{2029}', '\u{202F}', '\u{205F}', '\u{3000}', '\u{FEFF}', '\'', '\'', 's', 't', 'r', 'e', 'v', 'm', 'l', 'd',
    '’', '.', ',', '!', '-', '_', '$', '€', '+', '<', '|', '🦀', '👍', '\u{1F3FD}', '\u{E000}', '\u{10FFFD}', '\0',
];

fn palette_text(seed: u64, len: usize) -> String {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| PALETTE[rng.random_range(0..PALETTE.len())]).collect()
}

/// kiln's faster corpus encoder for its byte-level BPE (src/byte_level_bpe.rs) gives exactly
/// the ids of Hugging Face `tokenizers`' full pipeline.
#[test]
fn the_fast_bpe_corpus_encoder_gives_the_ids_of_the_tokenizers_pipeline() {
    let mut training = corpus();
    training.push_str(&palette_text(1, 20_000));
    training.push_str(" it's we're they've I'm you'll he'd");
    let tok = KilnTokenizer::train(TokenizerKind::Bpe, &training, 1500).unwrap();
    let check = |text: &str| {
        let fast = tok.encode_corpus(text).unwrap();
        let full = tok.encode(text).unwrap();
        assert!(fast == full, "the encoders differ on {text:?}");
    };
    for seed in 0..300 {
        check(&palette_text(seed + 100, 1 + (seed as usize * 37) % 400));
    }
    check(&corpus()[..50_000]);
    // Longer than one encoding chunk (64 KiB), with lines ending in white space before their
    // newline, blank lines and CRLF, where a cut must not fall.
    let lines: String = (0..6000).map(|i| format!("line {i} ends{}\n", ["", " ", "  ", "\t", "\r", " \n"][i % 6])).collect();
    check(&lines);
    check(&format!("a{BPE_EOS}b {BPE_EOS}\n"));
    check("");
    check("   ");
    check("x \n\n \t y  ");
    // Every code point, next to letters, digits, spaces and itself, in blocks.
    let chars: Vec<char> = (0..=0x10FFFFu32).filter_map(char::from_u32).collect();
    for block in chars.chunks(4096) {
        let text: String = block.iter().map(|&c| format!("a{c}1 {c}{c}  {c}b\n{c}' ")).collect();
        let fast = tok.encode_corpus(&text).unwrap();
        let full = tok.encode(&text).unwrap();
        if fast != full {
            let bad = block.iter().find(|&&c| {
                let t = format!("a{c}1 {c}{c}  {c}b\n{c}' ");
                tok.encode_corpus(&t).unwrap() != tok.encode(&t).unwrap()
            });
            panic!("the encoders differ around {bad:?}");
        }
    }
}
