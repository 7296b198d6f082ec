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
