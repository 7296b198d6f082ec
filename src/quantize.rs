//! `kiln quantize MODEL --type T --out FILE.gguf`: a model (kiln bundle, Hugging Face
//! directory or kiln checkpoint) written as GGUF the way llama.cpp's `convert_hf_to_gguf.py`
//! writes that architecture, so that llama.cpp runs it: its metadata keys, its tensor names,
//! the row permutation it applies to Llama's query and key projections (llama.cpp rotates
//! interleaved pairs where Hugging Face rotates halves), and the tokenizer embedded.
//!
//! Types: `f32`, `f16`, `bf16`, `q8_0`, `q4_0` (see [`crate::quants`]). As the converter does,
//! one-dimensional tensors (norms, biases) stay F32 whatever the type, and a matrix whose rows
//! do not divide into 32-value blocks falls back to F16 under a quantized type.
//!
//! The tokenizer: a byte-level BPE (kiln's own, GPT-2's, Llama-3's, Qwen2's) is written as
//! llama.cpp's `gpt2` model with its merges and the pre-tokenizer name llama.cpp knows it by; a
//! SentencePiece-style BPE (byte fallback, `▁` for spaces: Llama-2's, TinyLlama's, Mistral's)
//! as its `llama` model with scores from the merge ranks and byte tokens typed as such; the
//! original `tokenizer.json` rides along under `tokenizer.huggingface.json`, so that
//! `kiln generate --model FILE.gguf` tokenizes exactly as the source model. A character
//! vocabulary, which llama.cpp has no tokenizer type for, is refused.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value as Json;

use crate::config::TokenizerKind;
use crate::gguf::{TensorType, Value};
use crate::model::{ArchConfig, LlamaShape};
use crate::model_files::ModelFiles;
use crate::tokenizer::KilnTokenizer;

/// `--type`: the encoding of the model's matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
}

impl QuantType {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "f32" => QuantType::F32,
            "f16" => QuantType::F16,
            "bf16" => QuantType::Bf16,
            "q8_0" => QuantType::Q8_0,
            "q4_0" => QuantType::Q4_0,
            _ => return None,
        })
    }

    pub fn tensor_type(self) -> TensorType {
        match self {
            QuantType::F32 => TensorType::F32,
            QuantType::F16 => TensorType::F16,
            QuantType::Bf16 => TensorType::BF16,
            QuantType::Q8_0 => TensorType::Q8_0,
            QuantType::Q4_0 => TensorType::Q4_0,
        }
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_ALL_F32`, `MOSTLY_F16`, ...).
    fn file_type(self) -> u32 {
        match self {
            QuantType::F32 => 0,
            QuantType::F16 => 1,
            QuantType::Q4_0 => 2,
            QuantType::Q8_0 => 7,
            QuantType::Bf16 => 32,
        }
    }
}

/// How a model's architecture is written in GGUF: llama.cpp's architecture name, its metadata
/// keys, and for Llama the row permutation of the query and key (llama.cpp's `llama` rotates
/// interleaved pairs; `qwen2` rotates halves as Hugging Face does; GPT-2 has no rotation but
/// stores its Conv1D weights transposed, `[in, out]`, which the converter turns into Linear's
/// `[out, in]`).
enum Layout {
    Llama { name: &'static str, permute: bool, shape: LlamaShape },
    Gpt2(crate::model::Gpt2Config),
}

impl Layout {
    fn of(arch: &ArchConfig) -> Result<Self> {
        let shape = arch.llama_shape();
        Ok(match (arch, shape) {
            (ArchConfig::Llama(_) | ArchConfig::Mistral(_), Some(shape)) => Layout::Llama { name: "llama", permute: true, shape },
            (ArchConfig::Qwen2(_), Some(shape)) => Layout::Llama { name: "qwen2", permute: false, shape },
            (ArchConfig::Gpt2(c), _) => Layout::Gpt2(c.clone()),
            _ => bail!("kiln quantize writes Llama, Mistral, Qwen2 and GPT-2 models, not {}", arch.architecture().class_name()),
        })
    }

    fn name(&self) -> &'static str {
        match self {
            Layout::Llama { name, .. } => name,
            Layout::Gpt2(_) => "gpt2",
        }
    }

    fn vocab_size(&self) -> usize {
        match self {
            Layout::Llama { shape, .. } => shape.vocab_size,
            Layout::Gpt2(c) => c.vocab_size,
        }
    }

    /// The `<arch>.*` keys, with the types llama.cpp reads them as.
    fn metadata(&self) -> Vec<(String, Value)> {
        let key = |k: &str| format!("{}.{k}", self.name());
        let u32 = |k: &str, v: usize| (key(k), Value::U32(v as u32));
        match self {
            Layout::Llama { shape, .. } => vec![
                u32("vocab_size", shape.vocab_size),
                u32("context_length", shape.max_position_embeddings),
                u32("embedding_length", shape.hidden_size),
                u32("block_count", shape.num_layers),
                u32("feed_forward_length", shape.intermediate_size),
                u32("rope.dimension_count", shape.head_dim()),
                u32("attention.head_count", shape.num_heads),
                u32("attention.head_count_kv", shape.num_kv_heads),
                (key("attention.layer_norm_rms_epsilon"), Value::F32(shape.rms_norm_eps as f32)),
                (key("rope.freq_base"), Value::F32(shape.rope_theta as f32)),
            ],
            Layout::Gpt2(c) => vec![
                u32("vocab_size", c.vocab_size),
                u32("context_length", c.n_positions),
                u32("embedding_length", c.n_embd),
                u32("block_count", c.n_layer),
                u32("feed_forward_length", c.inner()),
                u32("attention.head_count", c.n_head),
                (key("attention.layer_norm_epsilon"), Value::F32(c.layer_norm_epsilon as f32)),
            ],
        }
    }

    fn tensor_name(&self, hf: &str) -> Option<String> {
        match self {
            Layout::Llama { .. } => gguf_tensor_name(hf),
            Layout::Gpt2(_) => gpt2_tensor_name(hf),
        }
    }

    /// A tensor's shape in GGUF's (row-major) terms, from Hugging Face's.
    fn gguf_shape(&self, hf: &str, shape: Vec<usize>) -> Vec<usize> {
        match (self, shape.as_slice()) {
            (Layout::Gpt2(_), &[rows, cols]) if is_conv1d_weight(hf) => vec![cols, rows],
            _ => shape,
        }
    }

    /// A tensor's values in GGUF's layout, from Hugging Face's of `shape`.
    fn gguf_values(&self, hf: &str, values: Vec<f32>, shape: &[usize]) -> Vec<f32> {
        match (self, shape) {
            (Layout::Llama { permute: true, shape: s, .. }, _) => match permuted_heads(hf, s) {
                Some(heads) => permute_rows(&values, heads, shape.get(1).copied().unwrap_or(1), false),
                None => values,
            },
            (Layout::Gpt2(_), &[rows, cols]) if is_conv1d_weight(hf) => crate::params::transpose(&values, rows, cols),
            _ => values,
        }
    }
}

/// GPT-2's Conv1D weights, stored `[in, out]`.
pub fn is_conv1d_weight(hf: &str) -> bool {
    [".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight"].iter().any(|s| hf.ends_with(s))
}

/// llama.cpp's name for a Hugging Face parameter of a GPT-2.
pub fn gpt2_tensor_name(hf: &str) -> Option<String> {
    const LAYER_PARTS: [(&str, &str); 6] = [
        ("ln_1", "attn_norm"),
        ("attn.c_attn", "attn_qkv"),
        ("attn.c_proj", "attn_output"),
        ("ln_2", "ffn_norm"),
        ("mlp.c_fc", "ffn_up"),
        ("mlp.c_proj", "ffn_down"),
    ];
    match hf {
        "transformer.wte.weight" => return Some("token_embd.weight".into()),
        "transformer.wpe.weight" => return Some("position_embd.weight".into()),
        "transformer.ln_f.weight" => return Some("output_norm.weight".into()),
        "transformer.ln_f.bias" => return Some("output_norm.bias".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("transformer.h.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = part.rsplit_once('.')?;
    let (_, gguf) = LAYER_PARTS.iter().find(|(h, _)| *h == module)?;
    Some(format!("blk.{layer}.{gguf}.{suffix}"))
}

/// llama.cpp's name for a Hugging Face parameter of a Llama-family model.
pub fn gguf_tensor_name(hf: &str) -> Option<String> {
    const LAYER_PARTS: [(&str, &str); 9] = [
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
    ];
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = part.rsplit_once('.')?;
    let (_, gguf) = LAYER_PARTS.iter().find(|(h, _)| *h == module)?;
    Some(format!("blk.{layer}.{gguf}.{suffix}"))
}

/// Which of Llama's projections llama.cpp's converter permutes, and with how many heads:
/// the query's rows by `num_heads`, the key's by `num_kv_heads`.
fn permuted_heads(hf: &str, shape: &LlamaShape) -> Option<usize> {
    let module = hf.rsplit_once('.')?.0;
    if module.ends_with("self_attn.q_proj") {
        Some(shape.num_heads)
    } else if module.ends_with("self_attn.k_proj") {
        Some(shape.num_kv_heads)
    } else {
        None
    }
}

/// Reorders the rows of a `[heads * head_dim, cols]` projection (or its bias) from Hugging
/// Face's rotate-half layout to llama.cpp's interleaved one: within each head, row `2i + j`
/// takes row `j * head_dim / 2 + i` (`convert_hf_to_gguf.py`'s `permute`). `inverse` undoes it.
pub fn permute_rows(values: &[f32], heads: usize, cols: usize, inverse: bool) -> Vec<f32> {
    let rows = values.len() / cols;
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0f32; values.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let interleaved = h * head_dim + 2 * i + j;
                let halves = h * head_dim + j * half + i;
                let (to, from) = if inverse { (halves, interleaved) } else { (interleaved, halves) };
                out[to * cols..(to + 1) * cols].copy_from_slice(&values[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

/// What `kiln quantize` wrote.
pub struct QuantizeReport {
    pub tensors: usize,
    pub bytes: u64,
    /// Matrices kept in F16 because their rows do not divide into blocks.
    pub fallbacks: Vec<String>,
}

pub fn quantize(model: &Path, ty: QuantType, out: &Path) -> Result<QuantizeReport> {
    let files = ModelFiles::open(model)?;
    let layout = Layout::of(&files.arch)?;
    let tokenizer = files.tokenizer.as_ref().ok_or_else(|| anyhow!("{} has no tokenizer.json to embed in the GGUF file", model.display()))?;
    let name = model.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());

    let mut metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(layout.name().into())),
        ("general.name".into(), Value::String(name)),
        ("general.file_type".into(), Value::U32(ty.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
    ];
    metadata.extend(layout.metadata());
    metadata.extend(tokenizer_metadata(tokenizer, layout.vocab_size()).with_context(|| format!("{}: its tokenizer", model.display()))?);

    let names = files.names();
    let mut tensors = Vec::with_capacity(names.len());
    let mut fallbacks = Vec::new();
    for hf in &names {
        let gguf = layout.tensor_name(hf).ok_or_else(|| anyhow!("{}: no llama.cpp name for tensor `{hf}`", model.display()))?;
        let dims = layout.gguf_shape(hf, files.shape(hf)?);
        let wanted = ty.tensor_type();
        let stored = if dims.len() == 1 {
            TensorType::F32
        } else if wanted.byte_len(&dims).is_none() {
            fallbacks.push(gguf.clone());
            TensorType::F16
        } else {
            wanted
        };
        tensors.push((gguf, dims, stored));
    }
    let infos = crate::gguf::write_file(out, &metadata, &tensors, |i| {
        let tensor = files.read(&names[i])?;
        let values = layout.gguf_values(&names[i], tensor.values, &tensor.shape);
        Ok(crate::quants::quantize(&values, tensors[i].2))
    })?;
    Ok(QuantizeReport { tensors: infos.len(), bytes: std::fs::metadata(out).map(|m| m.len()).unwrap_or(0), fallbacks })
}

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// A byte-fallback token, `<0x0A>`.
fn is_byte_token(token: &str) -> bool {
    token.len() == 6 && token.starts_with("<0x") && token.ends_with('>') && u8::from_str_radix(&token[3..5], 16).is_ok()
}

/// llama.cpp's `llama` (SentencePiece) vocabulary of a byte-fallback BPE: a token's score is
/// minus the rank of the merge that makes it (llama.cpp merges the adjacent pair whose joined
/// token scores highest, which is the BPE's lowest-ranked merge), 0 for tokens no merge makes;
/// a space prefix where the tokenizer prepends `▁`.
fn sentencepiece_metadata(json: &Json, tokens: &[String], merges: &[String]) -> Result<Vec<(String, Value)>> {
    let mut rank = std::collections::HashMap::new();
    for (r, merge) in merges.iter().enumerate() {
        let (a, b) = merge.split_once(' ').ok_or_else(|| anyhow!("merge {merge:?} is not two tokens"))?;
        rank.entry(format!("{a}{b}")).or_insert(r);
    }
    let scores = tokens.iter().map(|t| Value::F32(rank.get(t).map_or(0.0, |&r| -(r as f32)))).collect();
    let add_space_prefix = prepends_space(&json["normalizer"]) || prepends_space(&json["pre_tokenizer"]);
    Ok(vec![
        ("tokenizer.ggml.model".to_string(), Value::String("llama".into())),
        ("tokenizer.ggml.scores".to_string(), Value::Array(crate::gguf::ValueType::F32, scores)),
        ("tokenizer.ggml.add_space_prefix".to_string(), Value::Bool(add_space_prefix)),
    ])
}

/// Whether a normalizer or pre-tokenizer puts `▁` before the text (Llama-2's `Prepend`, a
/// `Metaspace` that prepends), looking inside sequences.
fn prepends_space(v: &Json) -> bool {
    match v["type"].as_str() {
        Some("Prepend") => v["prepend"] == "\u{2581}",
        Some("Metaspace") => v["prepend_scheme"] != "never" && v["add_prefix_space"] != false,
        Some("Sequence") => v["normalizers"].as_array().or(v["pretokenizers"].as_array()).into_iter().flatten().any(prepends_space),
        _ => false,
    }
}

/// The pre-tokenizer regexes llama.cpp knows by name, as the `tokenizers` library spells them
/// in a `Split` pre-tokenizer (GPT-2's is the `ByteLevel` pre-tokenizer's own regex).
const LLAMA3_SPLIT: &str = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const QWEN2_SPLIT: &str = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/// `tokenizer.ggml.pre` for a byte-level BPE's pre-tokenizer, if llama.cpp knows it.
fn pre_tokenizer_name(pre: &Json) -> Option<&'static str> {
    let byte_level = |p: &Json| p["type"] == "ByteLevel";
    if byte_level(pre) {
        // GPT-2's own: the ByteLevel regex, no prefix space.
        return (pre["use_regex"] != false && pre["add_prefix_space"] != true).then_some("gpt-2");
    }
    if pre["type"] != "Sequence" {
        return None;
    }
    let parts = pre["pretokenizers"].as_array()?;
    let [split, last] = parts.as_slice() else { return None };
    if split["type"] != "Split" || !byte_level(last) || last["use_regex"] != false {
        return None;
    }
    match split["pattern"]["Regex"].as_str()? {
        LLAMA3_SPLIT => Some("llama-bpe"),
        QWEN2_SPLIT => Some("qwen2"),
        _ => None,
    }
}

/// The `tokenizer.*` metadata of `tokenizer` for a model of `vocab_size` rows.
fn tokenizer_metadata(tokenizer: &KilnTokenizer, vocab_size: usize) -> Result<Vec<(String, Value)>> {
    if tokenizer.kind() == Some(TokenizerKind::Char) {
        bail!(
            "kiln's character vocabulary has no llama.cpp tokenizer type to be written as; train \
             with data.tokenizer = \"bpe\" (or a tokenizer.json) to export to GGUF"
        );
    }
    let json: Json = serde_json::from_str(&tokenizer.to_json()?)?;
    let model = &json["model"];
    if model["type"] != "BPE" {
        bail!("only BPE tokenizers are written to GGUF (this one is a {} model)", model["type"].as_str().unwrap_or("?"));
    }
    let n = tokenizer.vocab_size();
    if n > vocab_size {
        bail!("the tokenizer has {n} tokens, more than the model's {vocab_size} embedding rows");
    }
    let added: std::collections::BTreeMap<u64, bool> =
        json["added_tokens"].as_array().into_iter().flatten().filter_map(|t| Some((t["id"].as_u64()?, t["special"] == true))).collect();
    // SentencePiece-style (byte fallback, `▁` for spaces): llama.cpp's `llama` vocabulary.
    let sentencepiece = model["byte_fallback"] == true;
    let unk = model["unk_token"].as_str().and_then(|t| tokenizer.token_to_id(t));
    let mut tokens = Vec::with_capacity(vocab_size);
    let mut types = Vec::with_capacity(vocab_size);
    for id in 0..vocab_size {
        match tokenizer.id_to_token(id as u32) {
            Some(token) if id < n => {
                types.push(match added.get(&(id as u64)) {
                    _ if Some(id as u32) == unk => UNKNOWN,
                    Some(true) => CONTROL,
                    Some(false) => USER_DEFINED,
                    None if sentencepiece && is_byte_token(&token) => BYTE,
                    None => NORMAL,
                });
                tokens.push(token);
            }
            // Rows past the tokenizer's (or ids it skips), as the converter pads them.
            _ => {
                tokens.push(format!("[PAD{id}]"));
                types.push(UNUSED);
            }
        }
    }
    let merges: Vec<String> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            Json::String(s) => Ok(s.clone()),
            Json::Array(pair) => match pair.as_slice() {
                [Json::String(a), Json::String(b)] => Ok(format!("{a} {b}")),
                _ => bail!("a merge is not a pair of strings: {m}"),
            },
            _ => bail!("a merge is neither a string nor a pair: {m}"),
        })
        .collect::<Result<_>>()?;
    let mut out = if sentencepiece {
        sentencepiece_metadata(&json, &tokens, &merges)?
    } else {
        let pre = pre_tokenizer_name(&json["pre_tokenizer"]).ok_or_else(|| {
            anyhow!("its pre-tokenizer is none of those llama.cpp knows by name (GPT-2's, Llama-3's, Qwen2's): {}", json["pre_tokenizer"])
        })?;
        vec![
            ("tokenizer.ggml.model".to_string(), Value::String("gpt2".into())),
            ("tokenizer.ggml.pre".to_string(), Value::String(pre.into())),
            ("tokenizer.ggml.merges".to_string(), Value::strings(merges)),
        ]
    };
    out.push(("tokenizer.ggml.tokens".to_string(), Value::strings(tokens)));
    out.push(("tokenizer.ggml.token_type".to_string(), Value::Array(crate::gguf::ValueType::I32, types.into_iter().map(Value::I32).collect())));
    if let Some(unk) = unk {
        out.push(("tokenizer.ggml.unknown_token_id".into(), Value::U32(unk)));
    }
    let special = tokenizer.special_tokens();
    // llama.cpp takes token 11 for a BOS or EOS left unsaid; a tokenizer without BOS gets its
    // EOS there, as GPT-2's has (and adds none).
    let eos = special.eos_token_ids.first().copied();
    let bos = special.bos_token_id.or(eos);
    if let Some(bos) = bos {
        out.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(bos)));
    }
    if let Some(eos) = eos {
        out.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(eos)));
    }
    if let Some(pad) = special.pad_token_id {
        out.push(("tokenizer.ggml.padding_token_id".into(), Value::U32(pad)));
    }
    // Whether a text's encoding starts with BOS, as transformers' `tokenizer(text)` does it.
    let adds_bos = special.bos_token_id.is_some_and(|bos| tokenizer.encode("a").ok().and_then(|ids| ids.first().copied()) == Some(bos));
    out.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(adds_bos)));
    out.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)));
    out.push(("tokenizer.huggingface.json".into(), Value::String(tokenizer.to_json()?)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_permutation_interleaves_halves_and_its_inverse_undoes_it() {
        // Two heads of head_dim 4, one column: rows [h0: 0 1 2 3, h1: 4 5 6 7].
        let rows: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let permuted = permute_rows(&rows, 2, 1, false);
        assert_eq!(permuted, vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
        assert_eq!(permute_rows(&permuted, 2, 1, true), rows);
    }

    #[test]
    fn hugging_face_names_map_to_llama_cpps() {
        assert_eq!(gguf_tensor_name("model.layers.3.self_attn.k_proj.bias").as_deref(), Some("blk.3.attn_k.bias"));
        assert_eq!(gguf_tensor_name("model.layers.0.post_attention_layernorm.weight").as_deref(), Some("blk.0.ffn_norm.weight"));
        assert_eq!(gguf_tensor_name("lm_head.weight").as_deref(), Some("output.weight"));
        assert_eq!(gguf_tensor_name("model.layers.x.mlp.up_proj.weight"), None);
    }
}
