use kiln::config::{BackendKind, Config, ConfigError};

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml_str(text, "test.toml", &[])
}

fn error_text(text: &str, overrides: &[&str]) -> String {
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    match Config::from_toml_str(text, "test.toml", &overrides) {
        Ok(_) => panic!("expected a config error for {text:?} with {overrides:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn defaults_fill_missing_keys() {
    let config = parse("[training]\nmax_steps = 5\n").unwrap();
    assert_eq!(config.training.max_steps, 5);
    assert_eq!(config.model, Config::default().model);
    assert_eq!(config.training.backend, BackendKind::Flex);
}

#[test]
fn the_shipped_configs_parse() {
    for entry in std::fs::read_dir(super::common::repo_path("configs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            Config::load(&path, &[]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }
}

#[test]
fn unknown_keys_are_named_with_their_section() {
    let msg = error_text("[model]\nhiden_size = 64\n", &[]);
    assert!(msg.contains("model.hiden_size"), "{msg}");
    let msg = error_text("colour = 1\n", &[]);
    assert!(msg.contains("colour"), "{msg}");
    let msg = error_text("[modle]\nhidden_size = 64\n", &[]);
    assert!(msg.contains("modle"), "{msg}");
}

#[test]
fn wrong_types_are_named() {
    let msg = error_text("[training]\nmax_steps = \"lots\"\n", &[]);
    assert!(msg.contains("training.max_steps"), "{msg}");
    let msg = error_text("[training]\nbackend = \"tpu\"\n", &[]);
    assert!(msg.contains("training.backend"), "{msg}");
    let msg = error_text("[data]\ntokenizer = 3\n", &[]);
    assert!(msg.contains("data.tokenizer"), "{msg}");
}

#[test]
fn impossible_values_are_named() {
    let cases = [
        ("[model]\nhidden_size = 128\nnum_heads = 5\n", "model.num_heads"),
        ("[model]\nnum_heads = 4\nnum_kv_heads = 3\n", "model.num_kv_heads"),
        ("[model]\nhidden_size = 12\nnum_heads = 4\n", "model.num_heads"),
        ("[data]\nseq_len = 512\n", "data.seq_len"),
        ("[data]\nval_fraction = 1.5\n", "data.val_fraction"),
        ("[training]\nbatch_size = 0\n", "training.batch_size"),
        ("[training]\ngrad_accum_steps = 0\n", "training.grad_accum_steps"),
        ("[training]\nlearning_rate = -1.0\n", "training.learning_rate"),
        ("[training]\nmin_lr = 1.0\n", "training.min_lr"),
        ("[data]\ntokenizer = \"bpe\"\nvocab_size = 100\n", "data.vocab_size"),
        ("[model]\narchitecture = \"gpt2\"\nnum_heads = 4\nnum_kv_heads = 2\n", "model.num_kv_heads"),
        ("[model]\narchitecture = \"mistral\"\nsliding_window = 32\n[data]\nseq_len = 64\n", "data.seq_len"),
        ("[model]\nsliding_window = 32\n", "model.sliding_window"),
        ("[model]\narchitecture = \"bert\"\n", "model.architecture"),
        ("[checkpoint]\nmetric = \"accuracy\"\n", "checkpoint.metric"),
        ("[[data.sources]]\npath = \"a.jsonl\"\nweight = 0.0\n", "data.sources[0].weight"),
        ("[[data.sources]]\npath = \"a.jsonl\"\nweight = 1.0\n[[data.sources]]\npath = \"b.jsonl\"\n", "data.sources[1].weight"),
        ("[[data.sources]]\npath = \"a.jsonl\"\ntext_field = \"\"\n", "data.sources[0].text_field"),
        ("[[data.sources]]\npaht = \"a.jsonl\"\n", "paht"),
        ("[data]\nshard_tokens = 0\n", "data.shard_tokens"),
    ];
    for (text, key) in cases {
        let msg = error_text(text, &[]);
        assert!(msg.contains(key), "{text:?} gave {msg:?}, which does not name {key}");
    }
}

#[test]
fn overrides_set_values_and_are_checked_like_the_file() {
    let overrides = vec![
        "training.max_steps=200".to_string(),
        "training.backend=ndarray".to_string(),
        "training.learning_rate=3e-4".to_string(),
        "model.tie_word_embeddings=true".to_string(),
    ];
    let config = Config::from_toml_str("", "t", &overrides).unwrap();
    assert_eq!(config.training.max_steps, 200);
    assert_eq!(config.training.backend, BackendKind::Ndarray);
    assert_eq!(config.training.learning_rate, 3e-4);
    assert!(config.model.tie_word_embeddings);

    let msg = error_text("", &["training.max_stepz=3"]);
    assert!(msg.contains("training.max_stepz"), "{msg}");
    let msg = error_text("", &["training.max_steps"]);
    assert!(msg.contains("key=value"), "{msg}");
    let msg = error_text("", &["model.num_heads=7"]);
    assert!(msg.contains("model.num_heads"), "{msg}");
}

#[test]
fn resolved_config_round_trips_through_toml() {
    let config = parse("output_dir = \"x/y\"\n[training]\nmax_steps = 5\n[model]\ndropout = 0.25\n").unwrap();
    let again = parse(&config.to_toml_string()).unwrap();
    assert_eq!(config, again);
    // With sources and a tokenizer.json path.
    let config = parse(
        "[data]\ntokenizer = \"models/x/tokenizer.json\"\n[[data.sources]]\npath = \"a/*.jsonl\"\nweight = 2.0\n\
         [[data.sources]]\npath = \"b.parquet\"\ntext_field = \"content\"\nweight = 1.0\n",
    )
    .unwrap();
    assert_eq!(config.data.tokenizer, kiln::config::TokenizerSetting::File("models/x/tokenizer.json".into()));
    assert_eq!(config.data.sources[1].text_field, "content");
    assert_eq!(config.data.effective_sources().len(), 2);
    assert_eq!(parse(&config.to_toml_string()).unwrap(), config);
    assert_eq!(parse("[data]\ntokenizer = \"bpe\"\n").unwrap().data.tokenizer, kiln::config::TokenizerKind::Bpe.into());
}
