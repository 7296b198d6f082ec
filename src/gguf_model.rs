//! A GGUF file of a Llama, Qwen2 or GPT-2 model read back as the Hugging Face directory kiln
//! loads (`config.json`, an F32 `model.safetensors`, `tokenizer.json`), so that `kiln generate`,
//! `kiln eval` and `kiln convert` take GGUF files: tensors dequantized, renamed from llama.cpp's
//! names, Llama's query and key rows permuted back and GPT-2's Conv1D weights transposed back
//! to Hugging Face's layout.
//!
//! The tokenizer is the `tokenizer.huggingface.json` kiln embeds when the file has it, else
//! rebuilt from `tokenizer.ggml.*` for a byte-level BPE with GPT-2's pre-tokenizer.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::json;

use crate::gguf::{GgufFile, Value};
use crate::model::{ArchConfig, Architecture, LlamaShape};
use crate::quantize::{gguf_tensor_name, permute_rows};
use crate::safetensors_io::{PendingTensor, write_to};
use crate::tokenizer::{KilnTokenizer, SpecialTokens};

/// What a GGUF file holds, in Hugging Face's terms.
pub struct GgufModel {
    pub arch: ArchConfig,
    pub tokenizer: Option<KilnTokenizer>,
    /// Hugging Face name -> GGUF name, in state-dict order.
    names: Vec<(String, String)>,
    /// Heads by which a tensor's rows were permuted (Llama's query and key).
    permuted: BTreeMap<String, usize>,
    /// GPT-2's Conv1D weights, stored transposed.
    conv1d: std::collections::BTreeSet<String>,
    file: GgufFile,
}

fn get_u64(file: &GgufFile, key: &str) -> Result<u64> {
    file.get(key).and_then(Value::as_u64).ok_or_else(|| anyhow!("{}: metadata `{key}` is missing or not an integer", file.path.display()))
}

fn get_f64(file: &GgufFile, key: &str, default: f64) -> Result<f64> {
    match file.get(key) {
        None => Ok(default),
        Some(v) => v.as_f64().ok_or_else(|| anyhow!("{}: metadata `{key}` is not a number", file.path.display())),
    }
}

impl GgufModel {
    pub fn open(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let origin = path.display().to_string();
        let arch_name = file.get("general.architecture").and_then(Value::as_str).unwrap_or("").to_string();
        if arch_name == "gpt2" {
            return Self::open_gpt2(file);
        }
        let (architecture, permute) = match arch_name.as_str() {
            "llama" => (Architecture::Llama, true),
            "qwen2" => (Architecture::Qwen2, false),
            other => bail!("{origin}: general.architecture is {other:?}; kiln reads GGUF files of llama, qwen2 and gpt2 models"),
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let n = |k: &str| get_u64(&file, &key(k)).map(|v| v as usize);
        let embd = file.tensor("token_embd.weight").ok_or_else(|| anyhow!("{origin}: no tensor token_embd.weight"))?;
        let has = |name: &str| file.tensor(name).is_some();
        let shape = LlamaShape {
            vocab_size: embd.shape[0],
            hidden_size: n("embedding_length")?,
            num_layers: n("block_count")?,
            num_heads: n("attention.head_count")?,
            num_kv_heads: n("attention.head_count_kv").or_else(|_| n("attention.head_count"))?,
            intermediate_size: n("feed_forward_length")?,
            max_position_embeddings: n("context_length")?,
            rope_theta: get_f64(&file, &key("rope.freq_base"), 10000.0)?,
            rms_norm_eps: get_f64(&file, &key("attention.layer_norm_rms_epsilon"), 1e-6)?,
            tie_word_embeddings: !has("output.weight"),
            qkv_bias: has("blk.0.attn_q.bias"),
            o_bias: has("blk.0.attn_output.bias"),
            mlp_bias: has("blk.0.ffn_up.bias"),
            sliding_window: None,
        };
        if let Ok(rope) = n("rope.dimension_count")
            && rope != shape.hidden_size / shape.num_heads.max(1)
        {
            bail!("{origin}: rope.dimension_count {rope} is not the head size; kiln rotates whole heads");
        }
        shape.check(&origin)?;
        let arch = ArchConfig::of_shape(architecture, &shape, 0.02);
        arch.check(&origin)?;
        let mut names = Vec::new();
        let mut permuted = BTreeMap::new();
        for hf in arch.hf_param_names() {
            let gguf = gguf_tensor_name(&hf).ok_or_else(|| anyhow!("{origin}: no llama.cpp name for `{hf}`"))?;
            let info = file.tensor(&gguf).ok_or_else(|| anyhow!("{origin}: tensor {gguf} (`{hf}`) is missing"))?;
            let expected = hf_shape(&shape, &hf);
            if info.shape != expected {
                bail!("{origin}: tensor {gguf} is {:?}, but the metadata's shape gives {expected:?}", info.shape);
            }
            if permute {
                let module = hf.rsplit_once('.').map_or("", |(m, _)| m);
                if module.ends_with("q_proj") {
                    permuted.insert(hf.clone(), shape.num_heads);
                } else if module.ends_with("k_proj") {
                    permuted.insert(hf.clone(), shape.num_kv_heads);
                }
            }
            names.push((hf, gguf));
        }
        let tokenizer = read_tokenizer(&file).with_context(|| format!("{origin}: its tokenizer"))?;
        Ok(Self { arch, tokenizer, names, permuted, conv1d: Default::default(), file })
    }

    fn open_gpt2(file: GgufFile) -> Result<Self> {
        let origin = file.path.display().to_string();
        let n = |k: &str| get_u64(&file, &format!("gpt2.{k}")).map(|v| v as usize);
        let rows = |name: &str| file.tensor(name).map(|t| t.shape[0]).ok_or_else(|| anyhow!("{origin}: no tensor {name}"));
        let config = crate::model::Gpt2Config {
            vocab_size: rows("token_embd.weight")?,
            n_positions: rows("position_embd.weight")?,
            n_embd: n("embedding_length")?,
            n_layer: n("block_count")?,
            n_head: n("attention.head_count")?,
            n_inner: Some(n("feed_forward_length")?),
            activation_function: "gelu_new".into(),
            layer_norm_epsilon: get_f64(&file, "gpt2.attention.layer_norm_epsilon", 1e-5)?,
            initializer_range: 0.02,
            tie_word_embeddings: file.tensor("output.weight").is_none(),
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
        };
        config.check(&origin)?;
        let arch = ArchConfig::Gpt2(config);
        let mut names = Vec::new();
        let mut conv1d = std::collections::BTreeSet::new();
        for hf in arch.hf_param_names() {
            let gguf = crate::quantize::gpt2_tensor_name(&hf).ok_or_else(|| anyhow!("{origin}: no llama.cpp name for `{hf}`"))?;
            if file.tensor(&gguf).is_none() {
                bail!("{origin}: tensor {gguf} (`{hf}`) is missing");
            }
            if crate::quantize::is_conv1d_weight(&hf) {
                conv1d.insert(hf.clone());
            }
            names.push((hf, gguf));
        }
        let tokenizer = read_tokenizer(&file).with_context(|| format!("{origin}: its tokenizer"))?;
        Ok(Self { arch, tokenizer, names, permuted: BTreeMap::new(), conv1d, file })
    }

    /// The model's parameters as Hugging Face has them: name, shape, f32 values.
    pub fn tensor(&self, index: usize) -> Result<(String, Vec<usize>, Vec<f32>)> {
        let (hf, gguf) = &self.names[index];
        let info = self.file.tensor(gguf).expect("checked when opened");
        let mut values = self.file.read_f32(gguf)?;
        let mut shape = info.shape.clone();
        if let Some(&heads) = self.permuted.get(hf) {
            values = permute_rows(&values, heads, info.shape.get(1).copied().unwrap_or(1), true);
        }
        if let (true, &[rows, cols]) = (self.conv1d.contains(hf), info.shape.as_slice()) {
            values = crate::params::transpose(&values, rows, cols);
            shape = vec![cols, rows];
        }
        Ok((hf.clone(), shape, values))
    }

    pub fn num_tensors(&self) -> usize {
        self.names.len()
    }

    /// Writes the model as a Hugging Face directory into the empty or new `dir`.
    pub fn write_dir(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let config = match &self.tokenizer {
            Some(t) => crate::export::config_json(&self.arch, t),
            None => self.arch.to_hf(),
        };
        std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config)?)?;
        if let Some(t) = &self.tokenizer {
            t.save(&dir.join("tokenizer.json"))?;
        }
        self.write_safetensors(&dir.join("model.safetensors"))
    }

    /// Writes the model's tensors, dequantized, as an F32 safetensors file.
    pub fn write_safetensors(&self, path: &Path) -> Result<()> {
        let mut tensors = Vec::with_capacity(self.names.len());
        for i in 0..self.names.len() {
            let (name, shape, values) = self.tensor(i)?;
            tensors.push(PendingTensor::from_f32(name, shape, values));
        }
        let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let mut file = std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?);
        write_to(&mut file, &metadata, tensors).and_then(|_| std::io::Write::flush(&mut file)).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }
}

/// The Hugging Face shape of parameter `name` of a decoder of `shape`.
fn hf_shape(shape: &LlamaShape, name: &str) -> Vec<usize> {
    let (h, kv, f, v) = (shape.hidden_size, shape.num_kv_heads * shape.head_dim(), shape.intermediate_size, shape.vocab_size);
    let module = name.rsplit_once('.').map_or(name, |(m, _)| m);
    let bias = name.ends_with(".bias");
    let (rows, cols) = match module.rsplit('.').next().unwrap_or("") {
        "embed_tokens" | "lm_head" => (v, h),
        "q_proj" | "o_proj" => (h, h),
        "k_proj" | "v_proj" => (kv, h),
        "gate_proj" | "up_proj" => (f, h),
        "down_proj" => (h, f),
        _ => return vec![h],
    };
    if bias { vec![rows] } else { vec![rows, cols] }
}

/// The file's tokenizer: the embedded `tokenizer.json` when there is one, else a byte-level BPE
/// rebuilt from `tokenizer.ggml.*` (GPT-2's pre-tokenizer only); `None` without any.
fn read_tokenizer(file: &GgufFile) -> Result<Option<KilnTokenizer>> {
    let id = |k: &str| file.get(k).and_then(Value::as_u64).map(|v| v as u32);
    let special = SpecialTokens {
        tokenizer_config: None,
        bos_token_id: id("tokenizer.ggml.bos_token_id"),
        eos_token_ids: id("tokenizer.ggml.eos_token_id").into_iter().collect(),
        pad_token_id: id("tokenizer.ggml.padding_token_id"),
    };
    if let Some(text) = file.get("tokenizer.huggingface.json").and_then(Value::as_str) {
        return KilnTokenizer::from_json(text, Some(special)).map(Some);
    }
    let Some(model) = file.get("tokenizer.ggml.model").and_then(Value::as_str) else {
        return Ok(None);
    };
    let pre = file.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
    if model != "gpt2" || pre != "gpt-2" {
        bail!("tokenizer.ggml.model {model:?} with pre-tokenizer {pre:?} is not rebuilt by kiln (only gpt2 with gpt-2, or an embedded tokenizer.huggingface.json)");
    }
    let strings = |k: &str| -> Result<Vec<String>> {
        let items = file.get(k).and_then(Value::as_array).ok_or_else(|| anyhow!("metadata `{k}` is missing"))?;
        items.iter().map(|v| v.as_str().map(str::to_owned).ok_or_else(|| anyhow!("`{k}` holds a non-string"))).collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<u64> = file.get("tokenizer.ggml.token_type").and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_u64).collect()).unwrap_or_default();
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        match types.get(i).copied().unwrap_or(1) {
            // Padding rows are no tokens.
            5 => continue,
            t @ (3 | 4) => added.push(json!({"id": i, "content": token, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": t == 3})),
            _ => {}
        }
        vocab.insert(token.clone(), json!(i));
    }
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    KilnTokenizer::from_json(&tokenizer.to_string(), Some(special)).map(Some)
}
