//! Prepared datasets: `kiln prepare` over txt, jsonl and gzip sources checked against Hugging
//! Face `tokenizers` and numpy (tests/python/prepared_tokens.py), cache reuse and staleness,
//! bad input refused naming the file and line, damaged shards refused, a killed prepare,
//! mixture proportions, and bit-exact resume across shard boundaries and mid-mixture.

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use kiln::config::{Config, SourceConfig, TokenizerKind};
use kiln::data::{Corpus, TrainLoader};
use kiln::dataset::{Dataset, Manifest};
use kiln::prepare::{TokenizerChoice, prepare};
use kiln::train::Learner;

use super::common::{repo_path, small_corpus, tiny_config};

fn kiln(args: &[&str], config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).arg("--config").arg(config).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The prepared directory `kiln prepare` printed as its last line.
fn prepared_dir(o: &Output) -> PathBuf {
    assert!(o.status.success(), "kiln prepare failed: {}", stderr(o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    PathBuf::from(stdout.lines().last().expect("a last line").trim())
}

fn write_config(dir: &Path, config: &Config) -> PathBuf {
    let path = dir.join("run.toml");
    std::fs::write(&path, config.to_toml_string()).unwrap();
    path
}

fn source(path: &Path, weight: Option<f64>) -> SourceConfig {
    SourceConfig { path: path.to_owned(), text_field: "text".into(), weight, split: Default::default() }
}

fn jsonl(path: &Path, docs: &[&str]) {
    let lines: Vec<String> = docs.iter().map(|d| serde_json::json!({"id": 1, "text": d}).to_string()).collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn gzip(path: &Path, bytes: &[u8]) {
    let mut enc = flate2::write::GzEncoder::new(std::fs::File::create(path).unwrap(), flate2::Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap();
}

/// Four sources (a text file, a directory of jsonl files one of them gzip-compressed, a glob of
/// jsonl, a glob of parquet files) and their documents in the order kiln must read them.
fn sources(dir: &Path) -> (Vec<SourceConfig>, Vec<Vec<String>>) {
    let text = std::fs::read_to_string(small_corpus(dir, 20_000)).unwrap();
    std::fs::write(dir.join("a.txt"), &text).unwrap();
    let docs_b = ["First document, with  double spaces\tand a tab.", "Ünïcödé: 日本語のテキスト 🦀 and digits 12345", "", "Line one\nline two\n\n"];
    let docs_c = ["The gzip file's only document."];
    let b = dir.join("b");
    std::fs::create_dir_all(&b).unwrap();
    jsonl(&b.join("part-0.jsonl"), &docs_b);
    let c_lines = serde_json::json!({"text": docs_c[0]}).to_string() + "\n";
    gzip(&b.join("part-1.jsonl.gz"), c_lines.as_bytes());
    let d = dir.join("d");
    std::fs::create_dir_all(&d).unwrap();
    jsonl(&d.join("x-1.jsonl"), &["glob one"]);
    jsonl(&d.join("x-2.jsonl"), &["glob two"]);
    std::fs::write(d.join("ignored.md"), "not a source").unwrap();
    // Parquet as pyarrow writes it: snappy (its default) in several row groups, and zstd.
    let p = dir.join("p");
    std::fs::create_dir_all(&p).unwrap();
    let docs_p: Vec<String> = (0..40).map(|i| format!("Parquet row {i}: {}", "words ".repeat(i % 7))).collect();
    let refs: Vec<Option<&str>> = docs_p.iter().map(|d| Some(d.as_str())).collect();
    parquet(&p.join("p-0.parquet"), &refs[..30], "snappy", 8);
    parquet(&p.join("p-1.parquet"), &refs[30..], "zstd", 1 << 20);
    let configs = vec![
        source(&dir.join("a.txt"), None),
        source(&b, None),
        source(&d.join("x-*.jsonl"), None),
        source(&p.join("*.parquet"), None),
    ];
    let mut b_all: Vec<String> = docs_b.iter().map(|s| s.to_string()).collect();
    b_all.extend(docs_c.iter().map(|s| s.to_string()));
    (configs, vec![vec![text], b_all, vec!["glob one".into(), "glob two".into()], docs_p])
}

fn check_with_python(prepared: &Path, docs: &[Vec<String>], work: &Path) -> serde_json::Value {
    let docs_path = work.join("documents.json");
    std::fs::write(&docs_path, serde_json::to_string(docs).unwrap()).unwrap();
    let out = python(&[OsStr::new("check"), prepared.as_os_str(), docs_path.as_os_str()]);
    serde_json::from_slice(&out.stdout).unwrap()
}

fn python(args: &[&OsStr]) -> Output {
    let out = Command::new("python3").arg(repo_path("tests/python/prepared_tokens.py")).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "prepared_tokens.py {args:?} (needs numpy, tokenizers and pyarrow: `bash scripts/test.sh` installs them into .venv): {}",
        stderr(&out)
    );
    out
}

/// `docs` written by pyarrow as a parquet file's `text` column.
fn parquet(path: &Path, docs: &[Option<&str>], codec: &str, row_group_rows: usize) {
    let docs_path = path.with_extension("docs.json");
    std::fs::write(&docs_path, serde_json::to_string(docs).unwrap()).unwrap();
    let rows = row_group_rows.to_string();
    python(&[OsStr::new("write-parquet"), path.as_os_str(), docs_path.as_os_str(), OsStr::new(codec), OsStr::new(&rows)]);
}

#[test]
fn prepare_writes_the_tokens_hugging_face_tokenizers_gives_each_document_plus_eos() {
    let dir = tempfile::tempdir().unwrap();
    let (sources, docs) = sources(dir.path());
    let mut config = tiny_config(dir.path());
    config.data.sources = sources;
    config.data.tokenizer = TokenizerKind::Bpe.into();
    config.data.vocab_size = 400;
    config.data.shard_tokens = 2_000;
    let out = kiln(&["prepare"], &write_config(dir.path(), &config));
    let prepared = prepared_dir(&out);
    assert!(prepared.starts_with(dir.path().join("cache")), "{}", prepared.display());
    let manifest = Manifest::read(&prepared).unwrap();
    assert_eq!(manifest.num_documents, 48);
    assert_eq!(manifest.sources.iter().map(|s| s.num_documents).collect::<Vec<_>>(), [1, 5, 2, 40]);
    assert_eq!(manifest.sources[1].files.len(), 2, "the directory's two jsonl files, not its other file");
    assert_eq!(manifest.sources[2].files.len(), 2);
    assert_eq!(serde_json::to_value(manifest.dtype).unwrap(), "u16");
    assert!(manifest.eos_token_id.is_some());
    assert!(manifest.shards.len() > 3, "the text source spans several 2,000-token shards");
    assert!(manifest.shards.iter().all(|s| s.num_tokens <= 2_000 && !s.path.contains('/')));
    let summary = check_with_python(&prepared, &docs, dir.path());
    assert_eq!(summary["tokens"], manifest.num_tokens);
    assert!(stderr(&out).contains("prepared"), "{}", stderr(&out));
    // Nothing besides the prepared directory and the lock file is left in the cache.
    let names: Vec<String> = std::fs::read_dir(dir.path().join("cache")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn a_pretrained_tokenizer_json_prepares_with_its_own_end_of_text() {
    let dir = tempfile::tempdir().unwrap();
    let (sources, docs) = sources(dir.path());
    let text = dir.path().join("a.txt");
    let made = Command::new("python3")
        .arg(repo_path("tests/python/hf_compat.py"))
        .args(["make-tokenizers"])
        .arg(dir.path().join("tok"))
        .arg("--text")
        .arg(&text)
        .output()
        .unwrap();
    assert!(made.status.success(), "hf_compat.py make-tokenizers: {}", stderr(&made));
    let llama3 = dir.path().join("tok/llama3/tokenizer.json");
    let mut config = tiny_config(dir.path());
    config.data.sources = sources;
    config.data.tokenizer = kiln::config::TokenizerSetting::File(llama3.clone());
    let prepared = prepared_dir(&kiln(&["prepare"], &write_config(dir.path(), &config)));
    let manifest = Manifest::read(&prepared).unwrap();
    let tokenizer = kiln::tokenizer::KilnTokenizer::from_file(&llama3).unwrap();
    // Its tokenizer_config.json names the EOS; the template's BOS is not added to documents.
    assert_eq!(manifest.eos_token_id, tokenizer.token_to_id("<|end_of_text|>"));
    check_with_python(&prepared, &docs, dir.path());
    // A run from scratch on the text source (the others are too short to split) trains with it
    // and keeps that EOS for its checkpoints and bundles.
    config.data.sources.truncate(1);
    let learner = Learner::new(config).unwrap();
    let trained_on = Manifest::read(learner.dataset_dir()).unwrap();
    assert_eq!((trained_on.eos_token_id, trained_on.tokenizer_sha256), (manifest.eos_token_id, manifest.tokenizer_sha256));
    assert_eq!(learner.tokenizer.special_tokens().eos_token_ids, vec![manifest.eos_token_id.unwrap()]);
}

#[test]
fn a_prepared_dataset_is_reused_and_a_changed_source_is_prepared_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config(dir.path());
    let file = write_config(dir.path(), &config);
    let first = prepared_dir(&kiln(&["prepare"], &file));
    let stamp = std::fs::metadata(first.join("manifest.json")).unwrap().modified().unwrap();
    // Training starts from it without tokenizing anything.
    let learner = Learner::new(config.clone()).unwrap();
    drop(learner);
    let again = kiln(&["prepare"], &file);
    assert_eq!(prepared_dir(&again), first);
    assert!(stderr(&again).contains("already prepared"), "{}", stderr(&again));
    assert_eq!(std::fs::metadata(first.join("manifest.json")).unwrap().modified().unwrap(), stamp);
    // A changed source changes the key: prepared again, never used stale.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut f = std::fs::OpenOptions::new().append(true).open(&config.data.path).unwrap();
    writeln!(f, "\nMORE TEXT.").unwrap();
    drop(f);
    let changed = prepared_dir(&kiln(&["prepare"], &file));
    assert_ne!(changed, first);
    let (old, new) = (Manifest::read(&first).unwrap(), Manifest::read(&changed).unwrap());
    assert!(new.num_tokens > old.num_tokens);
    // A run with a new output directory trains on the new tokens.
    config.output_dir = dir.path().join("out2");
    let learner = Learner::new(config).unwrap();
    assert_eq!(learner.dataset_dir(), changed.as_path());
}

#[test]
fn bad_records_are_refused_naming_file_and_line_unless_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let good = serde_json::json!({"text": "a fine document with enough words in it"}).to_string();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not-json.jsonl", format!("{good}\n{good}\n{{\"text\": oops}}\n").into_bytes(), "not-json.jsonl, line 3: not a JSON object"),
        ("missing.jsonl", format!("{good}\n{{\"body\": \"x\"}}\n").into_bytes(), "missing.jsonl, line 2: no field `text`"),
        ("number.jsonl", format!("{{\"text\": 5}}\n{good}\n").into_bytes(), "number.jsonl, line 1: field `text` is a number"),
        ("utf8.jsonl", [good.as_bytes(), b"\n{\"text\": \"\xff\xfe\"}\n"].concat(), "utf8.jsonl, line 2: not UTF-8"),
    ];
    for (name, bytes, message) in &cases {
        let case = dir.path().join(name.replace('.', "-"));
        std::fs::create_dir_all(&case).unwrap();
        let path = case.join(name);
        std::fs::write(&path, bytes).unwrap();
        let mut config = tiny_config(&case);
        config.data.sources = vec![source(&path, None)];
        let file = write_config(&case, &config);
        let out = kiln(&["prepare"], &file);
        assert_eq!(out.status.code(), Some(1), "{name}: {}", stderr(&out));
        assert!(stderr(&out).contains(message), "{name}: {}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
        // Nothing that could pass for a prepared dataset is left.
        for entry in std::fs::read_dir(&config.data.cache_dir).unwrap() {
            assert!(!entry.unwrap().path().join("manifest.json").exists());
        }
        // Skipped and counted when asked.
        config.data.skip_bad_records = true;
        let out = kiln(&["prepare"], &write_config(&case, &config));
        let manifest = Manifest::read(&prepared_dir(&out)).unwrap();
        assert_eq!(manifest.skipped.records, 1, "{name}");
        assert!(stderr(&out).contains("1 bad records skipped"), "{}", stderr(&out));
    }
    // Parquet: a null row is a bad record; a missing column is refused even when skipping.
    let pq = dir.path().join("pq");
    std::fs::create_dir_all(&pq).unwrap();
    let rows = [Some("a fine document with enough words in it"), None, Some("another fine document")];
    parquet(&pq.join("nulls.parquet"), &rows, "snappy", 1 << 20);
    let mut config = tiny_config(&pq);
    config.data.sources = vec![source(&pq.join("nulls.parquet"), None)];
    let out = kiln(&["prepare"], &write_config(&pq, &config));
    assert!(stderr(&out).contains("nulls.parquet, row 2: `text` is null"), "{}", stderr(&out));
    config.data.skip_bad_records = true;
    let manifest = Manifest::read(&prepared_dir(&kiln(&["prepare"], &write_config(&pq, &config)))).unwrap();
    assert_eq!((manifest.skipped.records, manifest.num_documents), (1, 2));
    config.data.sources[0].text_field = "body".into();
    let out = kiln(&["prepare"], &write_config(&pq, &config));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("nulls.parquet: no column `body` (its columns: id, text)"), "{}", stderr(&out));
    std::fs::write(pq.join("fake.parquet"), b"PAR1 not really").unwrap();
    config.data.sources = vec![source(&pq.join("fake.parquet"), None)];
    let out = kiln(&["prepare"], &write_config(&pq, &config));
    assert!(stderr(&out).contains("fake.parquet: not a readable parquet file") && !stderr(&out).contains("panicked"), "{}", stderr(&out));

    // Sources that name nothing usable.
    let mut config = tiny_config(dir.path());
    for (path, message) in [
        (dir.path().join("nothing-*.jsonl"), "matches no dataset file"),
        (dir.path().join("absent.txt"), "no such file or directory"),
        (dir.path().join("notes.md"), "not a dataset file kiln reads"),
    ] {
        std::fs::write(dir.path().join("notes.md"), "x").unwrap();
        config.data.sources = vec![source(&path, None)];
        let out = kiln(&["prepare"], &write_config(dir.path(), &config));
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr(&out).contains("data.sources[0].path") && stderr(&out).contains(message), "{}", stderr(&out));
    }
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    config.data.sources = vec![source(&empty, None)];
    let out = kiln(&["prepare"], &write_config(dir.path(), &config));
    assert!(stderr(&out).contains("empty.txt: the file is empty"), "{}", stderr(&out));
}

#[test]
fn a_damaged_or_missing_shard_is_refused_before_training_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config(dir.path());
    config.data.shard_tokens = 10_000;
    let prepared = prepare(&config.data, &TokenizerChoice::from_config(&config.data).unwrap()).unwrap().dir;
    let manifest = Manifest::read(&prepared).unwrap();
    let shard = prepared.join(&manifest.shards[1].path);
    let original = std::fs::read(&shard).unwrap();
    let damages: [(&str, Box<dyn Fn()>); 3] = [
        ("truncated", Box::new(|| std::fs::write(&shard, &original[..original.len() - 2]).unwrap())),
        ("does not match its SHA-256", Box::new(|| {
            let mut altered = original.clone();
            altered[10] ^= 1;
            std::fs::write(&shard, altered).unwrap();
        })),
        ("is missing", Box::new(|| std::fs::remove_file(&shard).unwrap())),
    ];
    for (i, (message, damage)) in damages.iter().enumerate() {
        damage();
        let mut run = config.clone();
        run.output_dir = dir.path().join(format!("out{i}"));
        let err = format!("{:#}", Learner::new(run.clone()).err().expect("refused"));
        assert!(err.contains(message) && err.contains(&manifest.shards[1].path), "{err}");
        // The CLI says so too, with a non-zero exit and no panic.
        let out = kiln(&["train"], &write_config(dir.path(), &run));
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr(&out).contains(message) && !stderr(&out).contains("panicked"), "{}", stderr(&out));
        std::fs::write(&shard, &original).unwrap();
    }
    Dataset::open(&prepared).expect("intact again");
}

#[test]
fn a_killed_prepare_leaves_nothing_that_passes_for_complete() {
    let dir = tempfile::tempdir().unwrap();
    // About 20 MB of jsonl, so the prepare is still running when it is killed.
    let text = std::fs::read_to_string(repo_path("data/shakespeare.txt")).unwrap();
    let lines: Vec<String> = text.split("\n\n").map(|p| serde_json::json!({"text": p}).to_string()).collect();
    let body = lines.join("\n") + "\n";
    let big = dir.path().join("big.jsonl");
    std::fs::write(&big, body.repeat(4)).unwrap();
    let mut config = tiny_config(dir.path());
    config.data.sources = vec![source(&big, None)];
    config.data.shard_tokens = 1 << 20;
    let file = write_config(dir.path(), &config);
    let cache = config.data.cache_dir.clone();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln")).args(["prepare", "--config"]).arg(&file).spawn().unwrap();
    // Kill it once a shard is being written in its staging directory.
    let started = std::time::Instant::now();
    let staging_shard = || -> bool {
        std::fs::read_dir(&cache).into_iter().flatten().flatten().any(|e| {
            e.file_name().to_string_lossy().contains(".staging-") && std::fs::read_dir(e.path()).into_iter().flatten().flatten().any(|f| f.file_name().to_string_lossy().ends_with(".bin"))
        })
    };
    while !staging_shard() {
        assert!(child.try_wait().unwrap().is_none(), "the prepare finished before it could be killed; make the corpus bigger");
        assert!(started.elapsed().as_secs() < 120, "no shard after 120 s");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(prepare_find(&config).is_none(), "a killed prepare must not look complete");
    for entry in std::fs::read_dir(&cache).unwrap() {
        assert!(!entry.unwrap().path().join("manifest.json").exists());
    }
    // The next one removes the debris and prepares it whole.
    let prepared = prepared_dir(&kiln(&["prepare"], &file));
    Dataset::open(&prepared).unwrap();
    let left: Vec<String> = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(left.iter().all(|n| !n.contains(".staging-")), "{left:?}");
}

fn prepare_find(config: &Config) -> Option<PathBuf> {
    kiln::prepare::find(&config.data, &TokenizerChoice::from_config(&config.data).unwrap()).unwrap()
}

/// Two sources whose characters differ (`a`/`b` against `x`/`y`), so each window's source shows.
fn two_sources(dir: &Path, weights: Option<(f64, f64)>) -> Config {
    let ab: String = (0..40_000).map(|i| if i % 7 == 0 { 'b' } else { 'a' }).collect();
    let xy: String = (0..20_000).map(|i| if i % 5 == 0 { 'y' } else { 'x' }).collect();
    std::fs::write(dir.join("ab.txt"), ab).unwrap();
    std::fs::write(dir.join("xy.txt"), xy).unwrap();
    let mut config = tiny_config(dir);
    config.data.sources = vec![source(&dir.join("ab.txt"), weights.map(|w| w.0)), source(&dir.join("xy.txt"), weights.map(|w| w.1))];
    config.data.shard_tokens = 3_000;
    config
}

fn source_shares(config: &Config, batches: usize) -> (f64, usize) {
    let prepared = prepare(&config.data, &TokenizerChoice::from_config(&config.data).unwrap()).unwrap().dir;
    let tokenizer = kiln::tokenizer::KilnTokenizer::from_file(&prepared.join("tokenizer.json")).unwrap();
    let a = tokenizer.token_to_id("a").unwrap() as i32;
    let b = tokenizer.token_to_id("b").unwrap() as i32;
    let weights = config.data.sources.iter().map(|s| s.weight).collect::<Option<Vec<f64>>>();
    let corpus = Arc::new(Corpus::new(Dataset::open(&prepared).unwrap(), weights, config.data.val_fraction, config.data.seq_len).unwrap());
    let mut loader = TrainLoader::new(corpus, config.data.seq_len, 8, 1).unwrap();
    let (mut first, mut windows) = (0usize, 0usize);
    let mut epoch = 0;
    for _ in 0..batches {
        let batch = loop {
            match loader.next_batch() {
                Some(batch) => break batch,
                None => {
                    epoch += 1;
                    loader.start_epoch(epoch);
                }
            }
        };
        for w in batch.inputs.chunks(batch.seq_len) {
            windows += 1;
            if w[0] == a || w[0] == b {
                first += 1;
            }
        }
    }
    (first as f64 / windows as f64, epoch)
}

#[test]
fn sources_are_mixed_by_weight_or_by_size() {
    let dir = tempfile::tempdir().unwrap();
    // Weighted 3:1, over two epochs: every prefix of an epoch's interleave is within one window
    // of the weights, so the share over 400 batches of 8 is 0.75 to within 2/3200.
    let weighted = two_sources(&dir.path().join("w").tap_mkdir(), Some((3.0, 1.0)));
    let (share, epochs) = source_shares(&weighted, 400);
    assert!((share - 0.75).abs() <= 2.0 / 3200.0 + 1e-12, "share {share}");
    assert!(epochs >= 1, "the run must cross an epoch");
    // Without weights, by size: 40,000 against 20,000 characters, 2/3 to within a window.
    let sized = two_sources(&dir.path().join("s").tap_mkdir(), None);
    let (share, _) = source_shares(&sized, 50);
    assert!((share - 2.0 / 3.0).abs() < 0.01, "share {share}");
}

trait Mkdir {
    fn tap_mkdir(self) -> Self;
}

impl Mkdir for PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

#[test]
fn a_resumed_run_over_shards_and_a_mixture_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = two_sources(dir.path(), Some((2.0, 1.0)));
    config.training.max_steps = 24;
    config.training.epochs = 1000;
    config.checkpoint.save_every_steps = 5;
    config.checkpoint.async_save = false;
    config.output_dir = dir.path().join("whole");
    let mut whole = Learner::new(config.clone()).unwrap();
    whole.fit().unwrap();

    config.output_dir = dir.path().join("interrupted");
    let mut first = Learner::new(config.clone()).unwrap();
    first.stop_after_step = Some(10);
    first.fit().unwrap();
    drop(first);
    let latest = config.checkpoint_dir().join("checkpoint_latest.safetensors");
    let mut resumed = Learner::resume(config, &latest).unwrap();
    assert_eq!(resumed.step, 10);
    resumed.fit().unwrap();
    assert!(kiln::params::named_tensors(whole.model()) == kiln::params::named_tensors(resumed.model()), "weights differ after the resume");
}

/// Documents of 1 to 40 words, as jsonl.
fn word_documents(path: &Path, count: usize) {
    let words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"];
    let docs: Vec<String> = (0..count).map(|i| (0..1 + (i * 7) % 40).map(|j| words[(i + j) % words.len()]).collect::<Vec<_>>().join(" ")).collect();
    let refs: Vec<&str> = docs.iter().map(String::as_str).collect();
    jsonl(path, &refs);
}

#[test]
fn validation_holds_out_whole_documents_nearest_the_fraction() {
    let dir = tempfile::tempdir().unwrap();
    word_documents(&dir.path().join("docs.jsonl"), 600);
    let mut config = tiny_config(dir.path());
    config.data.sources = vec![source(&dir.path().join("docs.jsonl"), None)];
    config.data.tokenizer = kiln::config::TokenizerSetting::Train(TokenizerKind::Bpe);
    config.data.vocab_size = 300;
    config.data.val_fraction = 0.1;
    let prepared = prepare(&config.data, &TokenizerChoice::from_config(&config.data).unwrap()).unwrap().dir;
    let dataset = Dataset::open(&prepared).unwrap();
    let eos = dataset.manifest.eos_token_id.expect("BPE ends documents");
    let tokens = dataset.sources[0].read(0, dataset.sources[0].len());
    let n = tokens.len() as u64;
    let corpus = Corpus::new(dataset, None, config.data.val_fraction, config.data.seq_len).unwrap();
    let (train, val) = (corpus.train_parts()[0], corpus.validation_parts()[0]);
    assert_eq!((train.start, train.end, val.end), (0, val.start, n));
    // The held-out part starts a document, and no document start is nearer the 10% cut.
    let at = val.start as usize;
    assert_eq!(tokens[at - 1], eos, "the split falls inside a document");
    let cut = n - (n as f64 * 0.1).round() as u64;
    let nearest = (1..tokens.len()).filter(|&p| tokens[p - 1] == eos).map(|p| (p as i64 - cut as i64).unsigned_abs()).min().unwrap();
    assert_eq!((at as i64 - cut as i64).unsigned_abs(), nearest);
    // Every validation window comes from the held-out documents.
    let val_batches = kiln::data::validation_batches(&corpus, config.data.seq_len, 8, 4);
    assert!(!val_batches.is_empty());
    let held_out: Vec<i32> = tokens[at..].iter().map(|&t| t as i32).collect();
    for batch in &val_batches {
        for w in batch.inputs.chunks(batch.seq_len) {
            assert!(held_out.windows(w.len()).any(|h| h == w), "a validation window outside the held-out documents");
        }
    }
}

#[test]
fn named_validation_sources_are_evaluated_whole_and_never_trained_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = two_sources(dir.path(), None);
    config.data.sources[1].split = kiln::config::Split::Validation;
    let cfg = write_config(dir.path(), &config);
    let manifest = Manifest::read(&prepared_dir(&kiln(&["prepare"], &cfg))).unwrap();
    assert_eq!(manifest.sources[1].split, kiln::config::Split::Validation);
    assert_eq!(manifest.sources[0].split, kiln::config::Split::Train);

    let prepared = prepare(&config.data, &TokenizerChoice::from_config(&config.data).unwrap()).unwrap().dir;
    let tokenizer = kiln::tokenizer::KilnTokenizer::from_file(&prepared.join("tokenizer.json")).unwrap();
    let xy = [tokenizer.token_to_id("x").unwrap() as i32, tokenizer.token_to_id("y").unwrap() as i32];
    let corpus = Arc::new(Corpus::new(Dataset::open(&prepared).unwrap(), config.data.train_weights(), config.data.val_fraction, config.data.seq_len).unwrap());
    assert_eq!(corpus.train_parts(), &[kiln::data::Part { source: 0, start: 0, end: 40_000 }]);
    assert_eq!(corpus.validation_parts(), &[kiln::data::Part { source: 1, start: 0, end: 20_000 }]);
    for batch in kiln::data::validation_batches(&corpus, config.data.seq_len, 8, 4) {
        assert!(batch.inputs.iter().all(|t| xy.contains(t)), "validation reads the training source");
    }
    let mut loader = TrainLoader::new(corpus, config.data.seq_len, 8, 1).unwrap();
    while let Some(batch) = loader.next_batch() {
        assert!(batch.inputs.iter().all(|t| !xy.contains(t)), "training reads the validation source");
    }

    // A validation source has no weight, and some source must be for training.
    let mut bad = config.clone();
    bad.data.sources[1].weight = Some(1.0);
    let err = bad.validate().unwrap_err().to_string();
    assert!(err.contains("data.sources[1].weight"), "{err}");
    let mut bad = config.clone();
    bad.data.sources[0].split = kiln::config::Split::Validation;
    let err = bad.validate().unwrap_err().to_string();
    assert!(err.contains("data.sources"), "{err}");
}

#[test]
fn a_text_file_larger_than_a_piece_streams_with_the_tokens_of_the_whole() {
    let dir = tempfile::tempdir().unwrap();
    let shakespeare = std::fs::read_to_string(repo_path("data/shakespeare.txt")).unwrap();
    // Past kiln's 8 MiB pieces, with lines ending in spaces before their newline.
    let text = format!("{shakespeare}{}", shakespeare.replace(".\n", ".  \n"));
    assert!(text.len() > kiln::sources::TEXT_PIECE_BYTES);
    std::fs::write(dir.path().join("big.txt"), &text).unwrap();
    let mut config = tiny_config(dir.path());
    config.data.sources = vec![source(&dir.path().join("big.txt"), None)];
    config.data.tokenizer = TokenizerKind::Bpe.into();
    config.data.vocab_size = 400;
    config.data.tokenizer_sample_mib = 1;
    let prepared = prepare(&config.data, &TokenizerChoice::from_config(&config.data).unwrap()).unwrap().dir;
    let manifest = Manifest::read(&prepared).unwrap();
    assert_eq!(manifest.num_documents, 1);
    let summary = check_with_python(&prepared, &[vec![text]], dir.path());
    assert_eq!(summary["tokens"], manifest.num_tokens);
}
